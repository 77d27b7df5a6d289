"""`painters search`: policy strings, the candidate families, SLEB's greedy order and the scan on hand-made numbers;
then the whole search on a tiny model whose layer 3 adds nothing: it must find that layer, and the preset file it
writes must load in the server."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from clients.client import PaintersClient
from clients.evaluate import EvalSession, argmax
from clients.probe import Probe
from clients.search import (
    Candidate,
    Scored,
    SearchResult,
    angular_family,
    block_influence_family,
    finalists_of,
    parallel_group_family,
    parallel_pairs_family,
    presets_yaml,
    scan,
    schedule_policy,
    search_command,
    skip_policy,
    sleb_family,
    sleb_order,
)
from clients.tasks import load_task
from tests.conftest import tiny_llama_with_identity_layer
from tests.serving import serve_tiny

IDENTITY = 3


def test_policy_strings():
    assert skip_policy([5]) == "skip:5-5"  # never `skip:5`, which drops five centred layers
    assert skip_policy([9, 3, 10, 11]) == "skip:3,9-11"
    assert skip_policy([4, 5, 6]) == "skip:4-6"
    assert schedule_policy(8, [(2, 3)]) == "schedule:0-1,2+3/pairs,4-7"
    assert schedule_policy(8, [(1, 2), (5, 6)]) == "schedule:0,1+2/pairs,3-4,5+6/pairs,7"
    assert schedule_policy(6, [(0, 1, 2)], combine="mean") == "schedule:0+1+2/mean,3-5"


def probe(S: int = 8) -> Probe:
    """Layer 5 moves the state least, then 4, 3; the most alike blocks sit around 3-5."""
    bi = np.array([0.9, 0.5, 0.4, 0.2, 0.1, 0.05, 0.3, 0.8])
    rows = []
    for n in range(1, S // 2 + 1):
        rows.append(np.array([0.05 * n + (0.0 if 3 <= i <= 5 and i + n <= 6 else 0.3) + 0.01 * i
                              for i in range(S + 1 - n)]))
    return Probe(model="m", policy="full", schedule="schedule:0-7", steps=[str(i) for i in range(S)],
                 num_sequences=4, num_tokens=40, similarity=np.eye(S + 1), block_influence=bi,
                 angular_distance=rows)


def test_candidate_families_from_a_probe():
    p = probe()
    bi = block_influence_family(p, 8, most=3)
    assert [c.policy for c in bi] == ["skip:5-5", "skip:4-5", "skip:3-5"]
    ang = angular_family(p, 8, most=3)
    assert [c.policy for c in ang] == ["skip:3-3", "skip:3-4", "skip:3-5"]
    pairs = parallel_pairs_family(p, 8, most=2)
    # d(i, i + 2): 3 best, then 4 (overlaps 3: passed over), then 1
    assert [c.policy for c in pairs] == ["schedule:0-2,3+4/pairs,5-7", "schedule:0,1+2/pairs,3+4/pairs,5-7"]
    assert pairs[1].size == 4 and pairs[1].layers == (1, 2, 3, 4)
    group = parallel_group_family(p, 8, most=3)
    assert [c.policy for c in group] == ["schedule:0-2,3+4+5/pairs,6-7"]
    # the first and last layers are never touched, whatever the probe says
    assert all(0 not in c.layers and 7 not in c.layers for c in [*bi, *ang, *pairs, *group])
    assert [c.policy for c in sleb_family([4, 2])] == ["skip:4-4", "skip:2,4"]


def test_sleb_removes_what_raises_the_loss_least():
    cost = {1: 0.5, 2: 0.1, 3: 0.0, 4: 0.3}  # removal costs that add up

    async def loss(removed: list[int]) -> float:
        return 2.0 + sum(cost[i] for i in removed) + (0.5 if {2, 3} <= set(removed) else 0.0)  # 2 and 3 clash

    order = asyncio.run(sleb_order(loss, [1, 2, 3, 4], steps=3))
    # alone 2 is the next cheapest, but beside 3 it costs 0.6: the greedy takes 4, then 1
    assert [layer for layer, _ in order] == [3, 4, 1]
    assert [loss for _, loss in order] == pytest.approx([2.0, 2.3, 2.8])
    assert asyncio.run(sleb_order(loss, [1], steps=3)) == [(1, 2.5)]


def candidate(family: str, size: int) -> Candidate:
    return Candidate(family, f"skip:1-{size}", size, tuple(range(1, size + 1)))


def test_scan_stops_after_patience_misses_and_scores_each_policy_once():
    scores = {"skip:1-1": 1.0, "skip:1-2": 0.95, "skip:1-3": 0.7, "skip:1-4": 0.92, "skip:1-5": 0.5, "skip:1-6": 0.6,
              "skip:1-7": 0.99}
    asked: list[str] = []

    async def score(policy: str):
        asked.append(policy)
        return None, scores[policy]

    families = {"a": [candidate("a", k) for k in range(1, 8)], "b": [candidate("b", 2), candidate("b", 3)]}
    got = asyncio.run(scan(families, score, budget=0.9, patience=2))
    # a: a miss (3) then a pass (4) resets the count; two misses in a row (5, 6) end the family before 7
    assert [(s.candidate.family, s.candidate.size, s.passed) for s in got] == [
        ("a", 1, True), ("a", 2, True), ("a", 3, False), ("a", 4, True), ("a", 5, False), ("a", 6, False),
        ("b", 2, True), ("b", 3, False)]
    assert sorted(asked) == sorted(set(asked)) and "skip:1-7" not in asked  # each policy scored once
    best = finalists_of(got)
    assert [(s.candidate.family, s.candidate.size) for s in best] == [("a", 4), ("b", 2)]
    same = finalists_of([Scored(candidate("a", 2), None, 1.0, True), Scored(candidate("b", 2), None, 1.0, True)])
    assert len(same) == 1  # two families, one policy: one finalist


def test_presets_yaml_loads_as_the_servers_preset_file(tmp_path):
    from server.settings import load_presets

    result = SearchResult(task="arc_easy", budget=0.9, model="m", num_layers=8, full_accuracy=0.6,
                          random_baseline=0.25, search_items=50, source="x.jsonl", scored=[], finalists=[], sleb=[],
                          full_loss=None)
    path = tmp_path / "none.yaml"
    path.write_text(presets_yaml(result))
    assert load_presets(path) == {"arc_easy-90": "full"}


# -- the whole search on a tiny model with a removable layer ------------------------------------------------------


def arc_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice("abcdefghij klmnop") for _ in range(k))  # noqa: E731
    return [{"query": f"Question: {text(20)}\nAnswer:", "choices": [text(3) for _ in range(4)], "gold": 0}
            for _ in range(n)]


def label_with_the_full_model(url: str, path, rows: list[dict]) -> None:
    """Gold = the full model's own choice, so that the full model scores 1 and any change shows."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task("arc_easy", path=path)

    async def golds() -> list[int]:
        async with EvalSession.open(url, concurrency=8) as s:
            scorer = s.scorer("full")
            return [argmax([ll.logprob for ll in await scorer.loglikelihoods(item.pairs)]) for item in task.items]

    path.write_text("".join(json.dumps({**r, "gold": g}) + "\n" for r, g in zip(rows, asyncio.run(golds()))))


@pytest.fixture(scope="module")
def url():
    # max_model_len 256: the speed check load-tests with the built-in prompts (the longest has 212 tokens)
    with serve_tiny(model_factory=lambda: tiny_llama_with_identity_layer(IDENTITY), max_model_len=256) as u:
        yield u


def test_search_finds_the_removable_layer(url, tmp_path):
    from server.settings import load_presets

    data = tmp_path / "data"
    (data / "arc").mkdir(parents=True)
    arc = data / "arc" / "arc_easy_test_olmes.jsonl"
    label_with_the_full_model(url, arc, arc_rows(60, seed=0))  # 40 to search, 20 held out
    (data / "piqa").mkdir()
    piqa = data / "piqa" / "piqa_validation.jsonl"
    piqa.write_text("".join(json.dumps({"goal": f"How to {i}?", "sol1": "Slowly.", "sol2": "Fast.", "label": i % 2})
                            + "\n" for i in range(10)))
    out = tmp_path / "presets.yaml"
    app = typer.Typer()
    app.command("search")(search_command)
    app.command("other")(lambda: None)
    args = ["search", "--url", url, "--task", "arc_easy", "--data", str(arc), "--budget", "0.95", "--limit", "40",
            "--heldout", "20", "--report-tasks", "piqa,hellaswag", "--report-limit", "10", "--sleb-steps", "2",
            "--out", str(out), "--requests", "3", "--concurrency", "2", "--max-tokens", "4", "--rounds", "2", "--json",
            "--cache", str(tmp_path / "cache")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json")}
    again = CliRunner().invoke(app, args)  # resumes: every score and loss from the cache, only speed measured again
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json")} == cached
    assert json.loads(again.stdout)["candidates"] == report["candidates"]
    report = json.loads(again.stdout)  # the file on disk is the second run's (speeds measured afresh)
    assert report["full"]["accuracy"] == 1.0
    assert [s["layer"] for s in report["sleb_order"]][0] == IDENTITY  # removing it costs nothing
    presets = report["presets"]
    assert presets, report["candidates"]
    skips = {name: p for name, p in presets.items() if p["policy"].startswith("skip")}
    assert {p["policy"] for p in skips.values()} == {f"skip:{IDENTITY}-{IDENTITY}"}  # nothing else is removable
    for p in presets.values():
        assert p["normalized"] >= 0.95 and p["speedup"] > 0
        assert IDENTITY in next(c["layers"] for c in report["candidates"] if c["policy"] == p["policy"])
        assert p["report"]["arc_easy (held-out)"] == pytest.approx(1.0)  # an exact no-op generalises exactly
        assert "piqa" in p["report"]
    assert report["report_items"] == {"arc_easy (held-out)": 20, "piqa": 10}
    assert any("hellaswag" in note for note in report["notes"])  # no data for it: left out, and said so
    # the preset file is the server's format, fastest first under the plain name
    loaded = load_presets(out)
    assert list(loaded) == list(presets) and list(loaded)[0] == "arc_easy-95"
    assert all(loaded[name] == p["policy"] for name, p in presets.items())
    assert "# arc_easy-95:" in out.read_text()
    assert (tmp_path / "presets.report.md").read_text().startswith("# Search: arc_easy, budget 0.95")
    with serve_tiny(model_factory=lambda: tiny_llama_with_identity_layer(IDENTITY), policy_presets=out,
                    max_model_len=256) as served:
        with PaintersClient(served, model="tiny@arc_easy-95") as client:
            assert client.completions("hello", max_tokens=2).painters.policy == loaded["arc_easy-95"]
