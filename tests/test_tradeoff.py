"""The Pareto front and the plot on hand-made results, and `painters tradeoff` end to end on the tiny server."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from clients.evaluate import EvalResult, TaskResult
from clients.loadtest import PolicyResult, RequestResult
from clients.tradeoff import (
    TradeoffPoint,
    TradeoffResult,
    front_of,
    make_points,
    pareto_indices,
    plot_tradeoff,
    tradeoff_command,
    write_outputs,
)
from tests.serving import serve_tiny

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pareto_indices_on_hand_made_points():
    latency = [10.0, 6.0, 8.0, 6.0, 4.0, None, 12.0, 8.0]
    score = [0.80, 0.60, 0.55, 0.60, 0.30, 0.99, 0.80, 0.70]
    # 2 is beaten by 1 (faster and better); 3 duplicates 1; 5 has no latency; 6 is slower than 0 for the same score
    assert pareto_indices(latency, score) == [4, 1, 7, 0]
    assert pareto_indices([], []) == []
    assert pareto_indices([1.0], [None]) == []


def point(policy: str, acc: float, tpot: float | None, *, normalized: float | None = None) -> TradeoffPoint:
    return TradeoffPoint(policy=policy, accuracy={"piqa": acc}, mean_accuracy=acc, mean_normalized=normalized,
                         random_baseline=0.5, tpot_p50_ms=tpot, speedup=None if tpot is None else 10.0 / tpot)


POINTS = [point("full", 0.80, 10.0, normalized=1.0), point("skip:4", 0.70, 8.0, normalized=0.67),
          point("skip:8", 0.55, 6.0, normalized=0.17), point("pairs", 0.65, 9.0, normalized=0.5),
          point("loop:8-22x3", 0.52, 11.0, normalized=0.07)]


def test_front_of_either_axis_is_the_same_set():
    by_tpot = front_of(POINTS, x="tpot")
    by_speedup = front_of(POINTS, x="speedup")
    assert [p.policy for p in by_tpot] == ["skip:8", "skip:4", "full"]  # x ascending
    assert [p.policy for p in by_speedup] == ["full", "skip:4", "skip:8"]
    assert [p.policy for p in front_of(POINTS, y="normalized")] == ["skip:8", "skip:4", "full"]


def load(policy: str, tpot_s: float, *, tokens: int = 11) -> PolicyResult:
    requests = [RequestResult(start_s=0.0, e2e_s=0.1 + tpot_s * (tokens - 1), ttft_s=0.1, output_tokens=tokens,
                              prompt_tokens=5, policy=policy)] * 3
    return PolicyResult.from_requests(policy, policy, requests, duration_s=1.0)


def task_result(policy: str, task: str, acc: float | None, normalized: float | None, random: float = 0.5):
    return TaskResult(task=task, policy=policy, n=10, accuracy=acc, stderr=0.1, random_baseline=random,
                      normalized=normalized)


def test_make_points_joins_eval_and_loadtest():
    evals = EvalResult({
        "full": {"piqa": task_result("full", "piqa", 0.8, 1.0), "arc_easy": task_result("full", "arc_easy", 0.6, 1.0,
                                                                                          0.25),
                 "wikitext": task_result("full", "wikitext", None, None, 0.0)},
        "skip:4": {"piqa": task_result("skip:4", "piqa", 0.7, 2 / 3), "arc_easy": task_result("skip:4", "arc_easy",
                                                                                                0.4, 3 / 7, 0.25),
                   "wikitext": task_result("skip:4", "wikitext", None, None, 0.0)},
    })
    loads = {"full": load("full", 0.010), "skip:4": load("skip:4", 0.008)}
    full, skip = make_points(evals, loads)
    assert full.mean_accuracy == pytest.approx(0.7)  # wikitext has no accuracy: not in the mean
    assert skip.mean_normalized == pytest.approx((2 / 3 + 3 / 7) / 2)
    assert full.random_baseline == pytest.approx(0.375)
    assert full.tpot_p50_ms == pytest.approx(10.0) and skip.tpot_p50_ms == pytest.approx(8.0)
    assert skip.speedup == pytest.approx(1.25) and full.speedup == pytest.approx(1.0)
    assert skip.ttft_p50_ms == pytest.approx(100.0) and skip.output_tok_s == pytest.approx(33.0)
    assert full.pareto and skip.pareto  # slower but better, faster but worse
    assert full.accuracy == {"piqa": 0.8, "arc_easy": 0.6, "wikitext": None}
    result = TradeoffResult([full, skip], evals, loads, {"tasks": ["piqa", "arc_easy"]})
    js = result.to_json()
    assert js["pareto_front"] == ["skip:4", "full"]
    assert js["policies"]["skip:4"]["loadtest"]["p50_tpot_ms"] == pytest.approx(8.0)
    assert js["policies"]["skip:4"]["eval"]["piqa"]["accuracy"] == 0.7


@pytest.mark.parametrize("x, y", [("tpot", "accuracy"), ("speedup", "normalized")])
def test_plot_writes_a_png(tmp_path, x, y):
    path = plot_tradeoff(POINTS + [point("no-latency", 0.9, None)], tmp_path / "plots" / "tradeoff.png", x=x, y=y)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_without_points_still_writes_a_png(tmp_path):
    assert plot_tradeoff([], tmp_path / "empty.png").read_bytes().startswith(PNG_MAGIC)


def test_write_outputs(tmp_path):
    result = TradeoffResult(POINTS, EvalResult({}), {}, {"tasks": ["piqa"], "limit": 5})
    json_path, png_path = write_outputs(result, tmp_path / "out")
    assert json.loads(json_path.read_text())["pareto_front"] == ["skip:8", "skip:4", "full"]
    assert png_path.read_bytes().startswith(PNG_MAGIC)


def test_tradeoff_end_to_end_on_the_tiny_server(tmp_path):
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    (data / "piqa" / "piqa_validation.jsonl").write_text("".join(
        json.dumps({"goal": f"How to do {i}?", "sol1": "Slowly.", "sol2": "Quickly.", "label": i % 2}) + "\n"
        for i in range(5)))
    (data / "arc").mkdir()
    (data / "arc" / "arc_easy_test_olmes.jsonl").write_text("".join(
        json.dumps({"query": f"Question: {i}?\nAnswer:", "choices": ["a", "bb", "ccc"], "gold": i % 3}) + "\n"
        for i in range(5)))
    out = tmp_path / "out"
    app = typer.Typer()
    app.command("tradeoff")(tradeoff_command)
    app.command("other")(lambda: None)
    with serve_tiny(max_model_len=256) as url:  # the longest built-in loadtest prompt has 212 tokens
        r = CliRunner().invoke(app, [
            "tradeoff", "--url", url, "--tasks", "piqa,arc_easy", "--policies", "full,skip:2", "--limit", "3",
            "--out", str(out), "--data-dir", str(data), "--requests", "2", "--concurrency", "2", "--max-tokens", "3",
            "--warmup", "0"])
    assert r.exit_code == 0, r.output
    js = json.loads((out / "tradeoff.json").read_text())
    assert list(js["policies"]) == ["full", "skip:2-3"]
    for p in js["policies"].values():
        assert set(p["accuracy"]) == {"piqa", "arc_easy"} and p["eval"]["piqa"]["n"] == 3
        assert p["tpot_p50_ms"] > 0 and p["ttft_p50_ms"] > 0 and p["e2e_p50_ms"] > 0 and p["output_tok_s"] > 0
        assert p["loadtest"]["completed"] == 2
    assert js["policies"]["full"]["speedup"] == pytest.approx(1.0)
    assert js["policies"]["full"]["random_baseline"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert js["pareto_front"] and set(js["pareto_front"]) <= {"full", "skip:2-3"}
    assert (out / "tradeoff.png").read_bytes().startswith(PNG_MAGIC)
    assert "Pareto front" in r.stdout and "tradeoff.png" in r.stdout
