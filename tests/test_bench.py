"""The engine benchmark: runs on a bare GPU machine (no HTTP layer imported) and reports P1, P2, P3."""

from __future__ import annotations

import json
import subprocess
import sys

from server.engine import bench


def test_bench_imports_no_http_layer_or_client():
    code = ("import sys, server.engine.bench; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'pydantic', 'httpx', 'uvicorn', 'clients', 'prometheus_client')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_random_weight_bench_reports_the_ratios(monkeypatch, capsys):
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=512, tie_word_embeddings=True))
    bench.main(["--model", "tiny", "--device", "cpu", "--random-weights", "--new-tokens", "4", "--repeats", "1",
                "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["P2"]) == {"6", "10", "15"} and result["P1"] > 0 and result["P3"] > 0
    assert result["runs"]["skip:10"]["policy"] == "skip:10-19" and result["runs"]["skip:10"]["layer_runs"] == 20
    assert result["runs"]["pairs"]["policy"] == "pairs:4-25" and result["head_layers"] > 0


def test_a_warmed_batch_replays_every_step_of_the_timed_run():
    """The benchmarks warmed one batch and timed another (Engine.generate makes one per call): on CUDA every timed
    run captured its decode steps again, one per context bucket, inside the clock. Counted on the CPU, which runs
    the same captured-step bookkeeping with graphs on."""
    from server.engine.generate import Engine
    from server.engine.sampling import SamplingParams
    from tests.conftest import CharTokenizer, tiny_llama

    engine = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    prompts, policies = [[5, 6, 7], [8, 9]], ["full", "skip:2"]
    batch = bench.warmed_batch(engine, prompts, policies, 40)
    graphs = batch.executor.graphs
    built, reused = graphs.layouts, graphs.reuses  # layouts built (on CUDA: captured) and kept ones used again
    engine.generate(prompts, policy=policies, params=SamplingParams(max_tokens=40, ignore_eos=True), batch=batch)
    assert graphs.layouts == built > 0 and graphs.reuses > reused
