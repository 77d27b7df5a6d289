"""benchmarks/bench_layouts.py counts the captured decode steps a churning mixed load needs per unit of capture:
a short load here, checked against the engine's own counters and against what the rules must give."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_mixed_load(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_layouts", ROOT / "benchmarks" / "bench_layouts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_layouts"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path / "layouts.json"
    (r,) = module.main(["--steps", "120", "--rows", "6", "--mixes", "p8", "--json", str(out)])
    assert json.loads(out.read_text()) == [r]
    assert r["decode_steps"] > 50 and r["mean_rows"] > 1
    own, shared = r["layout"]["own"], r["layout"]["shared"]
    engine = next(v for k, v in r["layout"].items() if k.endswith("+kept"))
    # the engine's own counter saw its layouts (shared buckets, groups kept for schedules whose rows left): the
    # same hit rate as the benchmark's count of them
    assert r["engine_stats"]["layout_hit_rate"] == engine["hit_rate"]
    assert engine["padded_over_real"] >= 1
    # one shared bucket never makes more layouts than a bucket per group, and pads at least as many rows
    assert shared["distinct"] <= own["distinct"] and shared["padded_over_real"] >= own["padded_over_real"] >= 1
    # without the context bucket a key can only merge with others
    assert r["context_free"]["own"]["distinct"] <= own["distinct"]
    assert r["application"]["replays_per_step"] > 30  # the tiny 30-layer model: ~2 applications per layer
