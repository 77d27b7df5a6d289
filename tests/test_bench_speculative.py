"""benchmarks/bench_speculative.py on the tiny model: its configurations parse, and its run reports speed, the
share of drafts kept and every prompt's tokens, equal to decoding without drafts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("bench_speculative", ROOT / "benchmarks" / "bench_speculative.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_run_of_each_kind_of_configuration(tiny_engine) -> None:
    from server.engine.generate import Engine

    bench = _module()
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12, 9, 10]]
    results = {}
    for config in ("off", "ngram/3", "layer_skip/skip:2/2"):
        e = tiny_engine
        engine = Engine(e.model, e.tokenizer, eos_ids=e.eos_ids, config=e.config, speculation=bench.parse(config))
        results[config] = bench.run(engine, prompts, new_tokens=16)
    off = results["off"]
    assert off["kept"] is None and off["per_forward"] is None and off["tok_s"] > 0
    for config in ("ngram/3", "layer_skip/skip:2/2"):
        r = results[config]
        assert r["tokens"] == off["tokens"] and 0 <= r["kept"] <= 1 and 1 <= r["per_forward"] <= 4, config
    with pytest.raises(SystemExit, match="ngram/k"):
        bench.parse("medusa/3")
