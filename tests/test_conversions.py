"""The conversion cache seen whole: which conversions this environment reads, which it never will, and pruning."""

from __future__ import annotations

import importlib.metadata
import json
import os
import time

import pytest
from typer.testing import CliRunner

from server.model.conversions import INTERRUPTED_AFTER_S, prune, scan
from server.model.loader import ALIASES, Alias, converted_dir, local_source


@pytest.fixture
def cache(file_alias, monkeypatch, tmp_path):
    """A cache holding one conversion of each kind; returns (root, {kind: folder name})."""
    install, _ = file_alias
    root = tmp_path / "cache"
    install(tmp_path / "env")
    names = {"alias": local_source("fake-file", cache=root).name}

    version = importlib.metadata.version
    with monkeypatch.context() as m:  # the same alias converted by another transformers
        m.setattr(importlib.metadata, "version", lambda dist: "0.0.1" if dist == "transformers" else version(dist))
        names["other version"] = local_source("fake-file", cache=root).name

    here = version("transformers")
    older = root / "models" / "fake-file-0123456789ab"  # keyed by path, before aliases were keyed by content
    older.mkdir()
    (older / "config.json").write_text(json.dumps({"transformers_version": here}))
    names["older key"] = older.name

    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF mine")
    names["gguf"] = converted_dir(gguf, root=root).name
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(b"GGUF changed")
    names["gguf changed"] = converted_dir(changed, root=root).name
    changed.write_bytes(b"GGUF changed again")
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(b"GGUF gone")
    names["gguf gone"] = converted_dir(gone, root=root).name
    gone.unlink()

    unrecorded = root / "models" / "someones-0123456789ab"  # no source file, not an alias
    unrecorded.mkdir()
    (unrecorded / "config.json").write_text(json.dumps({"transformers_version": here}))
    names["unrecorded"] = unrecorded.name

    monkeypatch.setitem(ALIASES, "absent", Alias("not-installed-anywhere", "1.0", file="absent.gguf"))
    absent = root / "models" / "absent-0123456789ab"
    absent.mkdir()
    names["not installed"] = absent.name

    interrupted, under_way = root / ".convert-old", root / ".convert-new"
    interrupted.mkdir(), under_way.mkdir()
    past = time.time() - INTERRUPTED_AFTER_S - 60
    os.utime(interrupted, (past, past))
    names["interrupted"], names["under way"] = interrupted.name, under_way.name
    return root, names


def test_scan_tells_what_this_environment_reads(cache):
    root, names = cache
    status = {entry.path.name: entry.status for entry in scan(root)}
    assert status == {
        names["alias"]: "in use", names["gguf"]: "in use",
        names["other version"]: "stale", names["older key"]: "stale", names["gguf changed"]: "stale",
        names["gguf gone"]: "stale", names["interrupted"]: "stale",
        names["unrecorded"]: "kept", names["not installed"]: "kept", names["under way"]: "kept",
    }
    reasons = {entry.path.name: entry.reason for entry in scan(root)}
    assert reasons[names["other version"]].startswith("made by transformers 0.0.1; here ")
    assert reasons[names["older key"]] == f"fake-file here reads {names['alias']}"
    assert next(e for e in scan(root) if e.path.name == names["alias"]).size == len(b"GGUF fake-file") + len(
        (root / "models" / names["alias"] / "painters-source.json").read_bytes())


def test_prune_removes_only_the_stale_and_nothing_converts_again(cache, file_alias):
    root, names = cache
    _, converted = file_alias
    before = {entry.path.name for entry in scan(root)}
    would = {entry.path.name for entry in prune(root, dry_run=True)}
    assert {entry.path.name for entry in scan(root)} == before  # a dry run removes nothing
    removed = {entry.path.name for entry in prune(root)}
    assert removed == would == {names[k] for k in ("other version", "older key", "gguf changed", "gguf gone",
                                                   "interrupted")}
    assert {entry.path.name for entry in scan(root)} == before - removed
    conversions = len(converted)
    assert local_source("fake-file", cache=root).name == names["alias"] and len(converted) == conversions
    assert prune(root) == []


def test_cache_commands(cache):
    from server.cli import app

    root, names = cache
    listed = CliRunner().invoke(app, ["cache", "ls", "--cache-dir", str(root)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert names["alias"] in listed.output and "fake-file here" in listed.output
    assert "10 entries" in listed.output and "removes the 5 stale" in listed.output
    dry = CliRunner().invoke(app, ["cache", "prune", "--dry-run", "--cache-dir", str(root)], env={"COLUMNS": "200"})
    assert dry.exit_code == 0 and "would remove 5 conversions" in dry.output
    assert (root / "models" / names["older key"]).exists()
    done = CliRunner().invoke(app, ["cache", "prune", "--cache-dir", str(root)], env={"COLUMNS": "200"})
    assert done.exit_code == 0 and "removed 5 conversions" in done.output
    assert not (root / "models" / names["older key"]).exists() and (root / "models" / names["alias"]).exists()


def test_an_empty_or_missing_cache_lists_nothing(tmp_path):
    assert scan(tmp_path / "nowhere") == [] and prune(tmp_path / "nowhere") == []
