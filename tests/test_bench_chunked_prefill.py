"""benchmarks/bench_chunked_prefill.py on the tiny model: its run serves the streams and the long prompt under a
budget and under whole prompts, and reports gaps from the window it means (while the long prompt is prefilled)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_run_under_each_budget(tiny_engine) -> None:
    spec = importlib.util.spec_from_file_location("bench_chunked_prefill", ROOT / "benchmarks" / "bench_chunked_prefill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for budget in (None, 8):
        r = module.run(tiny_engine, budget, streams=2, prompt_tokens=60, new_tokens=24)
        assert 0 < r["gap_p50"] <= r["gap_max"] and 0 < r["ttft"] < r["wall"]
