"""The study's sweep, normalisation, cache and claim checks on synthetic scores; then `painters study` end to end on
the tiny server, resuming from its cache."""

from __future__ import annotations

import json
import re
import math
import random
from collections.abc import Callable

import numpy as np
import pytest

from clients.evaluate import ResultCache, TaskResult, mean_stderr
from clients.probe import Probe
from clients.study import (
    CLAIMS,
    VARIANTS,
    Z,
    StudyResult,
    area,
    build_result,
    centred_span,
    check_claims,
    combination,
    default_counts,
    gentle_slopes,
    middle_size,
    minus,
    plan,
    point,
    shared_space,
    study_markdown,
    write_outputs,
)
from clients.tasks import TASKS, MultipleChoice, Task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = 12  # middle: 2-9, eight layers
COUNTS = [2, 4, 6, 8]
SEEDS = 2
N_ITEMS = 1000
RANDOM = {"arc_easy": 0.25, "hellaswag": 0.25, "lambada_openai": 0.0}
FULL_ACC = {"arc_easy": 0.65, "hellaswag": 0.45, "lambada_openai": 0.5}


# -- the sweep ----------------------------------------------------------------------------------------------------


def test_spans_are_centred_like_the_servers_skip_count():
    assert centred_span(30, 10) == (10, 19)
    assert centred_span(30, 1) == (14, 14) and centred_span(30, 22) == (4, 25)
    assert centred_span(6, 3) == (1, 3)
    assert middle_size(30) == 22 and middle_size(6) == 4 and middle_size(12) == 8
    assert default_counts(30) == [2, 6, 10, 14, 18, 22]
    assert default_counts(6) == [2, 3, 4]


def test_plan_builds_explicit_policies_for_every_variant():
    runs = plan(30, [10], seeds=3)
    assert runs[("skip", 10)] == ["skip:10-19"]
    assert runs[("repeat", 10)] == ["repeat:10-19"]
    assert runs[("reverse", 10)] == ["reverse:10-19"]
    assert runs[("shuffle", 10)] == ["shuffle:10-19:0", "shuffle:10-19:1", "shuffle:10-19:2"]
    assert runs[("parallel", 10)] == ["parallel:10-19"]
    assert runs[("loop", 10)] == ["loop:10-19x3"]
    assert set(v for v, _ in runs) == set(VARIANTS)
    with pytest.raises(ValueError, match="counts must be 1-29"):
        plan(30, [30], seeds=1)


# -- normalisation ------------------------------------------------------------------------------------------------


def task_result(policy: str, task: str, scores: list[float], random: float = 0.25) -> TaskResult:
    return TaskResult(task=task, policy=policy, n=len(scores), accuracy=sum(scores) / len(scores),
                      stderr=mean_stderr(scores), random_baseline=random, scores=tuple(scores))


def test_point_normalises_with_a_stderr_paired_with_full():
    full = task_result("full", "arc_easy", [1.0] * 65 + [0.0] * 35)
    skip = task_result("skip:5-6", "arc_easy", [1.0] * 45 + [0.0] * 55)  # right on 45 of full's 65
    p = point(2, [skip], full)
    assert p.accuracy == pytest.approx(0.45)
    assert p.normalized == pytest.approx((0.45 - 0.25) / (0.65 - 0.25))
    # the ratio's linearisation per item: u_i = ((skip_i - r) - R (full_i - r)) / (full - r)
    R = p.normalized
    u = [((a - 0.25) - R * (f - 0.25)) / 0.4 for a, f in zip(skip.scores, full.scores)]
    assert p.stderr == pytest.approx(mean_stderr(u))
    assert p.stderr < mean_stderr(skip.scores) / 0.4  # the items skip shares with full cancel
    same = point(2, [full], full)
    assert same.normalized == pytest.approx(1.0) and same.stderr == pytest.approx(1 / (100 * 0.4))  # one item
    at_chance = task_result("full", "arc_easy", [1.0] * 25 + [0.0] * 75)
    assert point(2, [skip], at_chance).normalized is None  # no scale: the full model is at chance


def test_seeds_are_averaged_item_by_item():
    full = task_result("full", "piqa", [1.0, 1.0, 1.0, 0.0], random=0.5)
    seeds = [task_result("shuffle:1-2:0", "piqa", [1.0, 0.0, 1.0, 0.0], 0.5),
             task_result("shuffle:1-2:1", "piqa", [1.0, 1.0, 0.0, 0.0], 0.5)]
    p = point(2, seeds, full)
    per_item = [1.0, 0.5, 0.5, 0.0]
    assert p.accuracy == pytest.approx(0.5) and p.normalized == pytest.approx(0.0)
    assert p.stderr == pytest.approx(1 / (4 * 0.25))  # 4 items: one item's step is the whole scale
    assert p.policies == ("shuffle:1-2:0", "shuffle:1-2:1")


def test_cache_round_trips_and_keys_on_model_policy_and_items(tmp_path):
    item = MultipleChoice(contexts=("q",) * 2, continuations=(" a", " b"), gold=0, choice_lengths=(1, 1))
    other = MultipleChoice(contexts=("r",) * 2, continuations=(" a", " b"), gold=1, choice_lengths=(1, 1))
    task = Task(TASKS["piqa"], [item], "x.jsonl")
    cache = ResultCache(tmp_path, {"model": "m", "max_len": 128, "max_gen_tokens": 256})
    r = task_result("skip:1-1", "piqa", [1.0], 0.5)
    assert cache.get("skip:1-1", task) is None
    cache.put(r, task)
    assert cache.get("skip:1-1", task) == r
    assert cache.get("skip:2-2", task) is None
    assert cache.get("skip:1-1", Task(TASKS["piqa"], [other], "x.jsonl")) is None  # other items
    assert ResultCache(tmp_path, {"model": "n", "max_len": 128, "max_gen_tokens": 256}).get("skip:1-1", task) is None


# -- claims on synthetic sweeps -----------------------------------------------------------------------------------

Curve = Callable[[str, str, int], float]  # (task, variant, n) -> the normalised score to synthesise


def items(acc: float, *, shuffle: str | None = None) -> list[float]:
    """round(acc * N) right answers: the first items (every policy right on the easiest ones), or, with `shuffle`,
    spread over the items by a seed of that name (policies right on different items: a noisy comparison)."""
    ones = round(acc * N_ITEMS)
    out = [1.0] * ones + [0.0] * (N_ITEMS - ones)
    if shuffle is not None:
        random.Random(shuffle).shuffle(out)
    return out


def synthetic(curve: Curve, *, tasks=("arc_easy", "hellaswag", "lambada_openai"), probe: Probe | None = None,
              noisy: bool = False) -> StudyResult:
    runs = plan(LAYERS, COUNTS, seeds=SEEDS)
    raw: dict[str, dict[str, TaskResult]] = {"full": {}}
    for task in tasks:
        r, f = RANDOM[task], FULL_ACC[task]
        raw["full"][task] = task_result("full", task, items(f), r)
        for (variant, n), policies in runs.items():
            for seed, policy in enumerate(policies):
                norm = curve(task, variant, n) + (0.02 if seed else -0.02) * (variant == "shuffle")
                scores = items(r + norm * (f - r), shuffle=f"{policy}/{task}" if noisy else None)
                raw.setdefault(policy, {})[task] = task_result(policy, task, scores, r)
    return build_result(raw, runs, model="synthetic", num_layers=LAYERS, counts=COUNTS, seeds=SEEDS, probe=probe,
                        settings={"limit": N_ITEMS, "tasks": list(tasks)})


OFFSET = {"skip": 0.0, "repeat": -0.4, "reverse": -0.2, "shuffle": -0.1, "parallel": 0.1, "loop": 0.2}


def paper_like(task: str, variant: str, n: int) -> float:
    """What the paper reports: skip slopes down, repeat worst, shuffle > reverse, loop > parallel > skip, and ARC
    hurt most by reordering."""
    order = -0.2 if task == "arc_easy" and variant in ("reverse", "shuffle") else 0.0
    return 0.95 - 0.1 * (n - 2) + OFFSET[variant] + order


def contrary(task: str, variant: str, n: int) -> float:
    """Every comparison the other way round, and skip collapsing at once."""
    base = 0.3 if n == 2 else 0.05
    order = 0.2 if task == "arc_easy" and variant in ("reverse", "shuffle") else 0.0
    return base - OFFSET[variant] * 0.5 + order


def verdicts(r: StudyResult) -> dict[str, str]:
    return {c.claim: c.verdict for c in check_claims(r)}


def similarity_probe(middle: float, outer: float) -> Probe:
    """The states entering the middle layers (2-9) alike at `middle`, to the outer ones at `outer`."""
    S = LAYERS
    sim = np.full((S + 1, S + 1), outer)
    sim[2:10, 2:10] = middle
    np.fill_diagonal(sim, 1.0)
    return Probe(model="synthetic", policy="full", schedule="schedule:0-11", steps=[str(i) for i in range(S)],
                 num_sequences=8, num_tokens=100, similarity=sim, block_influence=np.full(S, 0.1),
                 angular_distance=[np.full(S + 1 - n, 0.1 * n) for n in range(1, S // 2 + 1)])


def test_a_paper_like_sweep_reproduces_every_claim():
    r = synthetic(paper_like, probe=similarity_probe(0.9, 0.3))
    got = verdicts(r)
    assert len(got) == len(CLAIMS) == 7
    assert set(got.values()) == {"reproduced"}, got
    mean_skip = [p.normalized for p in r.mean_curve("skip")]
    assert mean_skip == pytest.approx([0.95, 0.75, 0.55, 0.35], abs=0.01)


def test_a_contrary_sweep_reproduces_none():
    r = synthetic(contrary, probe=similarity_probe(0.3, 0.9))
    assert set(verdicts(r).values()) == {"not reproduced"}, verdicts(r)


def test_a_similarity_that_only_falls_with_distance_is_no_shared_space():
    """Cosine similarity falling with distance alone, the same for every layer: the unmatched means (middle pairs
    are closer on average) read it as a shared space; at equal distances there is no difference."""
    S = LAYERS
    i = np.arange(S + 1)
    decay = similarity_probe(0.0, 0.0)
    decay = Probe(**{**decay.__dict__, "similarity": np.exp(-np.abs(i[:, None] - i[None, :]) / 4.0)})
    check = shared_space(synthetic(paper_like, probe=decay))
    assert check.verdict == "inconclusive", check
    assert re.search(r"middle-middle minus middle-outer -?0\.00 ± 0\.00", check.evidence), check.evidence
    assert shared_space(synthetic(paper_like, probe=similarity_probe(0.9, 0.3))).verdict == "reproduced"


def test_differences_within_noise_are_inconclusive():
    flat = synthetic(lambda task, variant, n: 0.5, noisy=True)
    got = verdicts(flat)
    for claim in ("Random order beats reverse", "Parallel beats skip", "Looped parallel beats parallel",
                  "Middle repeat is the worst variant", "ARC and GSM8K are the most order-sensitive tasks"):
        assert got[claim] == "inconclusive", claim
    assert got["Skipping middle layers degrades gracefully"] == "not reproduced"  # 0.5 kept, not 0.8


def test_differences_are_paired_over_items():
    # on ARC, parallel is right on 30 more of the 1000 items than skip, and on the same items otherwise
    r = synthetic(lambda task, variant, n: 0.575 if variant == "parallel" else 0.5, tasks=("arc_easy",))
    diff, se = combination(r, minus(area(r, "parallel"), area(r, "skip")))
    assert diff == pytest.approx(0.075, abs=0.003)
    assert se == pytest.approx(math.sqrt(0.03 * 0.97 / 999) / 0.4, rel=0.05)  # from the 30 items that differ
    independent = math.hypot(r.curves["arc_easy"]["parallel"][0].stderr, r.curves["arc_easy"]["skip"][0].stderr)
    assert Z * independent > diff > Z * se  # within noise as independent points, clear as paired items
    assert verdicts(r)["Parallel beats skip"] == "reproduced"


def test_scores_are_paired_with_full_over_items():
    """Skipping the fewest layers right on the full model's items but a few: its score is near 1 with a small error,
    since the items it shares with the full model cancel. Scaling the accuracy's own error instead read a wide one
    (the committed studies' "the fewest keep 1.00 +- 0.19" on 50 items)."""
    r = synthetic(lambda task, variant, n: 0.97 if n == COUNTS[0] else 0.5, tasks=("arc_easy",))
    kept, se = combination(r, {("skip", 0): 1.0})
    assert kept == pytest.approx(0.97, abs=0.003)
    unpaired = r.curves["arc_easy"]["skip"][0]
    full = r.full["arc_easy"]
    assert se == pytest.approx(unpaired.stderr) and se < 0.4 * mean_stderr(unpaired.items) / (
        full.accuracy - full.random_baseline)
    assert next(c for c in check_claims(r) if c.claim.startswith("Skipping")).evidence.count("0.97 ± 0.0") == 1


def test_the_mean_over_tasks_adds_their_errors_in_quadrature():
    """Tasks have different items, so their errors are independent: the mean of three has sqrt(sum se^2) / 3, less
    than their plain mean (which `combination` and the mean curve would report if they averaged them)."""
    r = synthetic(paper_like)
    per_task = [combination(r, {("skip", 1): 1.0}, [t]) for t in r.tasks]
    value, se = combination(r, {("skip", 1): 1.0})
    assert value == pytest.approx(sum(v for v, _ in per_task) / 3)
    assert se == pytest.approx(math.sqrt(sum(e * e for _, e in per_task)) / 3)
    assert se < sum(e for _, e in per_task) / 3
    curve = r.mean_curve("skip")[1]
    points = [r.curves[t]["skip"][1].stderr for t in r.tasks]
    assert curve.stderr == pytest.approx(math.sqrt(sum(e * e for e in points)) / 3)


def test_claims_that_cannot_be_measured_say_so():
    r = synthetic(paper_like, tasks=("hellaswag", "lambada_openai"))
    got = verdicts(r)
    assert got["ARC and GSM8K are the most order-sensitive tasks"] == "not measured"
    # no probe: the shared-space claim falls back to the sweep (reordering the fewest layers keeps most of it)
    shared = next(c for c in check_claims(r) if c.claim.startswith("Middle layers"))
    assert "no probe" in shared.evidence


def test_a_graceful_slope_and_a_cliff():
    cliff = synthetic(lambda task, variant, n: 0.95 if n <= 4 else 0.1)
    assert verdicts(cliff)["Skipping middle layers degrades gracefully"] == "not reproduced"
    evidence = next(c.evidence for c in check_claims(cliff) if c.claim.startswith("Skipping"))
    assert "falls at most 0.42" in evidence and "(n = 4 to 6)" in evidence and "<= 0.250" in evidence


def test_gentle_slopes_correct_for_picking_the_steepest():
    """The verdict took the steepest of several noisy slopes and tested it as if it were the only one (a winner's
    curse toward "too steep"), and called the curve gentle when that one slope was, whatever the others' errors."""
    limit = 0.2
    assert gentle_slopes([(0.10, 0.01), (0.05, 0.01)], limit) == "reproduced"
    assert gentle_slopes([(0.30, 0.01), (0.05, 0.01)], limit) == "not reproduced"
    # 2.2 errors above the limit: past Z = 2 for one slope, within the 2.39 that the steepest of three needs
    assert gentle_slopes([(0.222, 0.01), (0.05, 0.01), (0.05, 0.01)], limit) == "inconclusive"
    assert gentle_slopes([(0.222, 0.01)], limit) == "not reproduced"
    # the steepest is surely gentle, another slope is too uncertain to say
    assert gentle_slopes([(0.10, 0.001), (0.09, 0.1)], limit) == "inconclusive"
    assert gentle_slopes([], limit) == "reproduced"


def test_outputs_plots_json_and_markdown(tmp_path):
    r = synthetic(paper_like, probe=similarity_probe(0.9, 0.3))
    paths = write_outputs(r, tmp_path, command="painters study --tasks arc_easy")
    names = {p.name for p in paths}
    assert names == {"study.json", "study.md", "study_arc_easy.png", "study_hellaswag.png",
                     "study_lambada_openai.png", "study_all.png"}
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 10_000
    js = json.loads((tmp_path / "study.json").read_text())
    assert js["counts"] == COUNTS and js["num_layers"] == LAYERS
    assert [c["verdict"] for c in js["claims"]] == ["reproduced"] * 7
    assert js["curves"]["arc_easy"]["skip"][0]["normalized"] == pytest.approx(0.95, abs=0.01)
    assert len(js["curves"]["arc_easy"]["shuffle"][0]["policies"]) == SEEDS
    md = (tmp_path / "study.md").read_text()
    assert "| Looped parallel beats parallel | **reproduced** |" in md
    assert "![arc_easy](study_arc_easy.png)" in md and "painters study --tasks arc_easy" in md
    assert math.isclose(js["mean"]["skip"][-1]["normalized"], 0.35, abs_tol=0.01)
    assert study_markdown(r, images={}).count("| middle repeat |") == 4  # all tasks + three tasks


# -- `painters study` end to end on the tiny server ---------------------------------------------------------------


def test_study_command_runs_the_sweep_and_resumes(tmp_path):
    import typer
    from typer.testing import CliRunner

    from clients.study import study_command
    from tests.serving import serve_tiny

    data = tmp_path / "data" / "piqa"
    data.mkdir(parents=True)
    (data / "piqa_validation.jsonl").write_text("".join(
        json.dumps({"goal": f"How do I do thing {i}?", "sol1": "Carefully.", "sol2": "With a hammer.", "label": i % 2})
        + "\n" for i in range(6)))
    app = typer.Typer()
    app.command("study")(study_command)
    app.command("other")(lambda: None)
    out = tmp_path / "out"
    args = ["study", "--tasks", "piqa", "--data-dir", str(tmp_path / "data"), "--limit", "6", "--seeds", "2",
            "--out", str(out), "--json"]
    with serve_tiny() as url:
        first = CliRunner().invoke(app, [*args, "--url", url])
        assert first.exit_code == 0, first.output
        cached = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")}
        again = CliRunner().invoke(app, [*args, "--url", url])
    assert again.exit_code == 0, again.output
    js = json.loads(first.stdout)
    assert js["num_layers"] == 6 and js["counts"] == [2, 3, 4]  # the whole middle of six layers is 1-4
    assert [p["policies"] for p in js["curves"]["piqa"]["shuffle"]][0] == ["shuffle:2-3:0", "shuffle:2-3:1"]
    assert js["curves"]["piqa"]["loop"][2]["policies"] == ["loop:1-4x3"]
    assert len(js["claims"]) == 7 and js["probe"]["steps"] == [str(i) for i in range(6)]
    # 1 + 3 counts x (5 variants + 2 seeds) results, plus the probe; the rerun computed none of them again
    assert len(cached) == 1 + 3 * 7 + 1
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")} == cached
    assert json.loads(again.stdout)["curves"] == js["curves"]
    assert {p.name for p in out.iterdir()} >= {"study.json", "study.md", "study_piqa.png", "study_all.png"}
    md = (out / "study.md").read_text()  # says how it was made: the options given, defaults left out
    assert f"painters study --tasks piqa --out {out} --url {url} --limit 6 --seeds 2 --data-dir" in md
    assert "--json" in md and "--concurrency" not in md
