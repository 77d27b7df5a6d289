"""benchmarks/bench_priority.py serves a backlog and then urgent requests under both scheduling policies: a short
run on the tiny model, checked against what each policy must give."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_urgent_requests_overtake_the_backlog_only_under_priority(tiny_engine) -> None:
    spec = importlib.util.spec_from_file_location("bench_priority", ROOT / "benchmarks" / "bench_priority.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for policy in ("fcfs", "priority"):
        got = module.run(tiny_engine, policy, batch=6, urgent=2, rows=2, new_tokens=4)
        assert len(got["batch"]) == 6 and len(got["urgent"]) == 2
        urgent = [admitted for _, _, admitted in got["urgent"]]
        backlog = [admitted for _, _, admitted in got["batch"]]
        if policy == "fcfs":  # after the whole backlog
            assert min(urgent) >= max(backlog)
        else:  # as the first rows ended, before the backlog's last ones
            assert max(urgent) < max(backlog)
        assert all(queued >= 0 and e2e > 0 for queued, e2e, _ in got["urgent"] + got["batch"])
