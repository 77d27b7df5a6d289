"""Terminal output of the client commands: tables that never cut a policy name, and no per-request log lines unless
--verbose (the real `painters` entry point, whose logging is at INFO, in a child process)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

from rich.console import Console

from clients.console import Column, TextTable, quiet_http_logs
from tests.serving import ROOT, serve_tiny

LONG = "schedule:0-9,10+11/pairs,12+13+14/mean,15,15,16-29"


def table() -> TextTable:
    t = TextTable([Column("policy", keep_whole=True), Column("mean acc", "right"), Column("TPOT p50 (ms)", "right"),
                   Column("speed-up", "right")], title="front")
    t.add_row(LONG, "0.4123", "45.31", "1.22x")
    t.add_row("full", "0.5000", "56.70", "1.00x")
    return t


def test_a_narrow_terminal_folds_other_columns_but_never_the_policy():
    for width in (40, 60, 200):
        out = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
        table().print(out)
        text = out.file.getvalue()
        assert LONG in text, (width, text)
        assert "…" not in text


def test_not_a_terminal_prints_a_plain_layout():
    out = Console(file=io.StringIO(), width=30)  # a file: not a terminal, and narrow
    table().print(out)
    lines = out.file.getvalue().splitlines()
    assert lines[0] == "front"
    assert lines[1].split() == ["policy", "mean", "acc", "TPOT", "p50", "(ms)", "speed-up"]
    assert lines[3].split() == [LONG, "0.4123", "45.31", "1.22x"]
    assert lines[4].split() == ["full", "0.5000", "56.70", "1.00x"]
    assert len({len(line) for line in lines[3:]}) == 1  # right-justified numbers line up


def test_quiet_http_logs():
    quiet_http_logs(verbose=False)
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    quiet_http_logs(verbose=True)
    assert logging.getLogger("httpx").isEnabledFor(logging.INFO)
    quiet_http_logs(verbose=False)


def test_painters_eval_shows_no_request_logs_unless_verbose(tmp_path):
    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps({"goal": f"How to {i}?", "sol1": "Slowly.", "sol2": "Fast.", "label": i % 2})
                            + "\n" for i in range(3)))
    with serve_tiny() as url:
        def run(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "server.cli", "eval", "--url", url, "--task", "piqa",
                                   "--data", str(data), "--policies", "full,skip:2", *extra],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)

        quiet, verbose = run(), run("--verbose")
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert "HTTP Request" not in quiet.stderr + quiet.stdout
    assert "HTTP Request" in verbose.stderr
    rows = [line.split() for line in quiet.stdout.splitlines()]
    assert any(r[:3] == ["piqa", "skip:2-3", "3"] for r in rows), quiet.stdout
