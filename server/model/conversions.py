"""The GGUF conversion cache seen whole: what each cached conversion was made from, whether this environment reads it,
and pruning the ones it never will (`painters cache ls`, `painters cache prune`).

The loader (`server.model.loader`) owns the cache's keys; this module only reads them back. Stale means this
environment never reads it: another transformers version made it (an environment with that version sharing the cache
would convert it again), the alias now reads another key (another package version, or the path-keyed conversions
made before aliases were keyed by content), its GGUF is gone or changed, or a conversion was interrupted. A
conversion is a cache entry, so removing one wrongly costs a conversion on the next load, never a model; entries
whose use cannot be judged (an older conversion of a GGUF that is not an alias) are kept all the same. Hub downloads
live in Hugging Face's own cache (`hf cache ls`), not here.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.model.loader import (
    ALIASES, CONVERTING_PREFIX, SOURCE_FILE, ConversionSource, alias_dir, cache_root, file_identity,
)

# A conversion takes well under a minute: a temporary folder this old was left by one that was killed.
INTERRUPTED_AFTER_S = 3600.0

Status = Literal["in use", "stale", "kept"]


@dataclass(frozen=True)
class CachedConversion:
    path: Path
    size: int  # bytes on disk
    transformers: str | None  # the version that converted it, where known
    status: Status  # in use: this environment reads it; stale: it never will; kept: cannot tell
    reason: str  # why, in words


def scan(root: Path | None = None) -> list[CachedConversion]:
    """Every conversion in the cache (and every conversion folder left behind), by name."""
    root = root or cache_root()
    models = root / "models"
    live = {path: name for name in ALIASES if (path := alias_dir(name, root=root)) is not None}
    here = importlib.metadata.version("transformers")
    found = sorted(models.iterdir()) if models.is_dir() else []
    found += sorted(p for p in root.glob(f"{CONVERTING_PREFIX}*") if p.is_dir())
    return [_judge(path, live=live, here=here) for path in found if path.is_dir()]


def prune(root: Path | None = None, *, dry_run: bool = False) -> list[CachedConversion]:
    """The stale conversions, removed unless `dry_run`."""
    stale = [entry for entry in scan(root) if entry.status == "stale"]
    if not dry_run:
        for entry in stale:
            shutil.rmtree(entry.path, ignore_errors=True)
    return stale


def _judge(path: Path, *, live: dict[Path, str], here: str) -> CachedConversion:
    source = _source(path)
    version = source.transformers if source else _config_version(path)

    def entry(status: Status, reason: str) -> CachedConversion:
        return CachedConversion(path=path, size=_size(path), transformers=version, status=status, reason=reason)

    if path.name.startswith(CONVERTING_PREFIX):
        if time.time() - path.stat().st_mtime > INTERRUPTED_AFTER_S:
            return entry("stale", "an interrupted conversion")
        return entry("kept", "a conversion under way")
    if path in live:
        return entry("in use", f"{live[path]} here")
    if version is not None and version != here:
        return entry("stale", f"made by transformers {version}; here {here}")
    alias = source.alias if source else _alias_named(path)
    if alias is not None:
        reads = next((p for p, name in live.items() if name == alias), None)
        if reads is None:
            return entry("kept", f"{alias} is not installed here")
        return entry("stale", f"{alias} here reads {reads.name}")
    if source is None or source.gguf is None:
        return entry("kept", "source not recorded (an older conversion)")
    gguf = Path(source.gguf)
    if gguf.is_file() and file_identity(gguf) == source.identity:
        return entry("in use", str(gguf))
    return entry("stale", f"{gguf} is gone or changed")


def _source(path: Path) -> ConversionSource | None:
    try:
        return ConversionSource(**json.loads((path / SOURCE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _config_version(path: Path) -> str | None:
    """The version that wrote a conversion's config.json (transformers records it there)."""
    try:
        return json.loads((path / "config.json").read_text()).get("transformers_version")
    except (OSError, ValueError, AttributeError):
        return None


def _alias_named(path: Path) -> str | None:
    """The alias a conversion's folder is named for (`<alias>-<tag>`), if any."""
    prefix = path.name.rpartition("-")[0]
    return prefix if prefix in ALIASES else None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


__all__ = ["CachedConversion", "INTERRUPTED_AFTER_S", "prune", "scan"]
