"""`painters study`: the experiments of "Transformer Layers as Painters" (Sun et al., 2024) on the served model.

For each variant (skip, middle repeat, reverse, random order, parallel, looped parallel) and each number n of affected
layers, the policy acts on the n layers centred in the stack. Every (policy, task) is scored like `painters eval` and
cached on disk, so a rerun resumes. Scores are normalised as in the paper (0 = the task's random baseline, 1 = the full
model); random order is averaged over seeds item by item. The paper's claims are functions of the results (`CLAIMS`),
each answering reproduced / not reproduced / inconclusive (within two standard errors) / not measured.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from rich.progress import Progress

from clients.client import PaintersError
from clients.console import (
    Column,
    TextTable,
    VerboseOpt,
    command_line,
    console,
    fail,
    progress_bar,
    quiet_http_logs,
)
from clients.evaluate import (
    FULL,
    EvalError,
    EvalSession,
    TaskResult,
    load_tasks,
    mean,
    mean_stderr,
    normalized_score,
    ratio_estimate,
)
from clients.probe import Probe, ProbeError, run_probe, task_texts
from clients.tasks import DataError, Task, task_names

log = logging.getLogger(__name__)

Variant = Literal["skip", "repeat", "reverse", "shuffle", "parallel", "loop"]
VARIANTS: tuple[Variant, ...] = ("skip", "repeat", "reverse", "shuffle", "parallel", "loop")
LABELS: dict[str, str] = {"skip": "skip", "repeat": "middle repeat", "reverse": "reverse",
                          "shuffle": "random order", "parallel": "parallel", "loop": "looped parallel (x3)"}
LOOP_TIMES = 3
ORDER_SENSITIVE_TASKS = ("arc_easy", "arc_challenge", "gsm8k")  # the paper's ARC and GSM8K

Z = 2.0  # a difference counts when it exceeds Z standard errors (about 95%)
GRACEFUL_START = 0.8  # skipping the fewest layers keeps at least this much of the full model...
GRACEFUL_SLOPE = 2.0  # ...and the score never falls faster than this many times the straight line from 1 (nothing
# skipped) to 0 (the whole middle skipped): a slope, not a cliff


# -- the sweep's policies -------------------------------------------------------------------------------------


def centred_span(num_layers: int, n: int) -> tuple[int, int]:
    """The n layers centred in the stack (30 layers, n = 10 -> 10-19), as the server centres `skip:10`."""
    start = (num_layers - n) // 2
    return start, start + n - 1


def middle_size(num_layers: int) -> int:
    """The middle layers: all but the first and last ceil(L/8) (the server's default range; 30 layers -> 22)."""
    edge = max(1, -(-num_layers // 8))
    if num_layers - 2 * edge < 2:
        edge = max(0, (num_layers - 2) // 2)
    return num_layers - 2 * edge


def default_counts(num_layers: int, *, points: int = 6) -> list[int]:
    """About `points` counts from 2 to the whole middle, evenly spaced (30 layers: 2, 6, 10, 14, 18, 22)."""
    top = middle_size(num_layers)
    if top <= 2:
        return [top]
    step = max(1, round((top - 2) / (points - 1)))
    counts = list(range(top, 1, -step))[::-1]
    return counts


def variant_policies(variant: Variant, num_layers: int, n: int, *, seeds: int) -> list[str]:
    """The explicit policy strings of one point of the sweep (random order: one per seed)."""
    a, b = centred_span(num_layers, n)
    span = f"{a}-{b}"
    if variant == "shuffle":
        return [f"shuffle:{span}:{seed}" for seed in range(seeds)]
    if variant == "loop":
        return [f"loop:{span}x{LOOP_TIMES}"]
    return [f"{variant}:{span}"]


def plan(num_layers: int, counts: Sequence[int], *, seeds: int) -> dict[tuple[Variant, int], list[str]]:
    """(variant, n) -> its policies; `full` is the reference and runs first."""
    for n in counts:
        if not 1 <= n <= num_layers - 1:
            raise ValueError(f"cannot affect {n} of {num_layers} layers; counts must be 1-{num_layers - 1}")
    return {(v, n): variant_policies(v, num_layers, n, seeds=seeds) for v in VARIANTS for n in counts}


# -- results ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One variant at one count on one task (random order: its seeds averaged item by item)."""

    n: int
    accuracy: float | None
    normalized: float | None
    stderr: float | None  # of the normalised score
    policies: tuple[str, ...]
    items: tuple[float, ...] = field(default=(), repr=False)  # each item's accuracy, seeds averaged

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": self.accuracy, "normalized": self.normalized, "stderr": self.stderr,
                "policies": list(self.policies)}


def point(n: int, results: Sequence[TaskResult], full: TaskResult) -> Point:
    """Average the seeds per item, then normalise; the stderr is paired with the full model on the same items
    (`paired_stderr`)."""
    policies = tuple(r.policy for r in results)
    per_item: list[float] = []
    if any(not r.scores for r in results) or len({len(r.scores) for r in results}) != 1:
        acc = mean([r.accuracy for r in results if r.accuracy is not None])
    else:
        per_item = [sum(s) / len(s) for s in zip(*(r.scores for r in results))]
        acc = mean(per_item)
    norm = normalized_score(acc, full.accuracy, full.random_baseline)
    se = None if norm is None else paired_stderr(per_item, full)
    return Point(n, acc, norm, se, policies, tuple(per_item))


def paired_stderr(combined: Sequence[float], full: TaskResult, *, total: float = 1.0) -> float | None:
    """The standard error of a normalised score, or of a weighted sum of them whose weights add up to `total`, from
    its per-item values `combined` (the weighted sum of the variants' item scores) and the full model's scores on the
    same items: the ratio's linearisation per item, so what a variant shares with the full model cancels and the full
    model's own noise counts. A score's error is never below one item's step (times `total`): n items none of which
    changed say only that fewer than about one in n would. None without per-item scores."""
    r, scale = full.random_baseline, (full.accuracy or 0.0) - full.random_baseline
    if len(combined) < 2 or len(full.scores) != len(combined) or scale <= 1e-12:
        return None
    _, se = ratio_estimate([x - total * r for x in combined], [f - r for f in full.scores])
    return None if se is None else max(se, abs(total) / (len(combined) * scale))


def quadrature_mean(ses: Sequence[float | None]) -> float | None:
    """The standard error of a mean of independent estimates with these errors."""
    if not ses or any(x is None for x in ses):
        return None
    return math.sqrt(sum(x * x for x in ses)) / len(ses)  # type: ignore[operator]


@dataclass(frozen=True)
class StudyResult:
    model: str
    num_layers: int
    counts: list[int]
    seeds: int
    full: dict[str, TaskResult]  # task -> the full model's result
    curves: dict[str, dict[str, list[Point]]]  # task -> variant -> a point per count
    probe: Probe | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.curves)

    def normalized_tasks(self) -> list[str]:
        """Tasks whose full model beats chance: only they have a normalised score."""
        return [t for t in self.tasks if all(p.normalized is not None for v in self.curves[t].values() for p in v)]

    def mean_curve(self, variant: str, tasks: Sequence[str] | None = None) -> list[Point]:
        """The normalised score averaged over tasks at each count; stderr of that mean (tasks independent)."""
        tasks = list(tasks) if tasks is not None else self.normalized_tasks()
        out = []
        for i, n in enumerate(self.counts):
            pts = [self.curves[t][variant][i] for t in tasks]
            norm = mean([p.normalized for p in pts if p.normalized is not None])
            ses = [p.stderr for p in pts]
            se = quadrature_mean(ses)
            out.append(Point(n, mean([p.accuracy for p in pts if p.accuracy is not None]), norm, se,
                             tuple(q for p in pts for q in p.policies)))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            **self.settings, "model": self.model, "num_layers": self.num_layers, "counts": self.counts,
            "seeds": self.seeds, "variants": {v: LABELS[v] for v in VARIANTS},
            "full": {t: r.to_json() for t, r in self.full.items()},
            "curves": {t: {v: [p.to_json() for p in pts] for v, pts in per.items()} for t, per in self.curves.items()},
            "mean": {v: [p.to_json() for p in self.mean_curve(v)] for v in VARIANTS},
            "claims": [c.to_json() for c in check_claims(self)],
            "probe": self.probe.to_json() if self.probe is not None else None,
        }


def build_result(raw: dict[str, dict[str, TaskResult]], runs: dict[tuple[Variant, int], list[str]], *,
                 model: str, num_layers: int, counts: Sequence[int], seeds: int, probe: Probe | None = None,
                 settings: dict[str, Any] | None = None) -> StudyResult:
    """raw: policy -> task -> result (`full` among them) -> the curves."""
    full = raw[FULL]
    curves = {task: {v: [point(n, [raw[p][task] for p in runs[(v, n)]], ref) for n in counts] for v in VARIANTS}
              for task, ref in full.items()}
    return StudyResult(model=model, num_layers=num_layers, counts=list(counts), seeds=seeds, full=full,
                       curves=curves, probe=probe, settings=settings or {})


# -- the paper's claims, as functions of the results -------------------------------------------------------------

Verdict = Literal["reproduced", "not reproduced", "inconclusive", "not measured"]


@dataclass(frozen=True)
class ClaimCheck:
    claim: str
    verdict: Verdict
    evidence: str

    def to_json(self) -> dict[str, str]:
        return {"claim": self.claim, "verdict": self.verdict, "evidence": self.evidence}


def _compare(diff: float, se: float | None) -> Verdict:
    """diff > 0 supports the claim; it counts when it is more than Z standard errors from 0."""
    margin = max(Z * (se or 0.0), 1e-9)  # equal up to rounding is no evidence either way
    if diff > margin:
        return "reproduced"
    if diff < -margin:
        return "not reproduced"
    return "inconclusive"


Weights = dict[tuple[str, int], float]  # (variant, index of the count) -> weight


def combination(r: StudyResult, weights: Weights, tasks: Sequence[str] | None = None
                ) -> tuple[float | None, float | None]:
    """sum of weight x normalised score, averaged over tasks, and its standard error. Every variant and the full
    model ran on the same items, so the error comes from each item's own weighted sum, paired with the full model's
    score (`paired_stderr`): much tighter than treating the points as independent, and right. Tasks have different
    items: their errors add in quadrature."""
    values, ses = [], []
    for t in tasks if tasks is not None else r.normalized_tasks():
        full = r.full[t]
        scale = (full.accuracy or 0.0) - full.random_baseline
        pts = {k: r.curves[t][k[0]][k[1]] for k in weights}
        if any(p.normalized is None for p in pts.values()) or not scale:
            return None, None
        values.append(sum(w * pts[k].normalized for k, w in weights.items()))  # type: ignore[operator]
        lengths = {len(p.items) for p in pts.values()} | {len(full.scores)}
        if len(lengths) == 1 and 0 not in lengths:
            n = lengths.pop()
            combined = [sum(w * pts[k].items[i] for k, w in weights.items()) for i in range(n)]
            ses.append(paired_stderr(combined, full, total=sum(weights.values())))
        else:  # no per-item scores: as if independent
            ses.append(math.sqrt(sum((w * pts[k].stderr) ** 2 for k, w in weights.items()))
                       if all(p.stderr is not None for p in pts.values()) else None)
    if not values:
        return None, None
    return sum(values) / len(values), quadrature_mean(ses)


def area(r: StudyResult, variant: str) -> Weights:
    """A curve's mean over the counts."""
    k = len(r.counts)
    return {(variant, i): 1 / k for i in range(k)}


def minus(a: Weights, b: Weights) -> Weights:
    out = dict(a)
    for key, w in b.items():
        out[key] = out.get(key, 0.0) - w
    return out


def _fmt(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ± {se:.2f}" if se is not None else "")


def _beats(claim: str, better: str, worse: str) -> Callable[[StudyResult], ClaimCheck]:
    def check(r: StudyResult) -> ClaimCheck:
        (a, _), (b, _) = combination(r, area(r, better)), combination(r, area(r, worse))
        diff, se = combination(r, minus(area(r, better), area(r, worse)))
        if a is None or b is None or diff is None:
            return ClaimCheck(claim, "not measured", "no task has a normalised score (the full model is at chance)")
        return ClaimCheck(claim, _compare(diff, se),
                          f"mean normalised score over n = {_counts(r)}: {LABELS[better]} {a:.2f}, {LABELS[worse]} "
                          f"{b:.2f}; difference {_fmt(diff, se)} (paired over items)")
    return check


def _counts(r: StudyResult) -> str:
    return ", ".join(map(str, r.counts))


def shared_space(r: StudyResult) -> ClaimCheck:
    """The probe's heatmap: the states entering the middle layers are more alike among themselves than they are to
    the states entering the outer layers at the same distance in the stack (similarity falls with distance in any
    deep stack, and middle pairs are on average closer than middle-outer ones, so unmatched means would read a pure
    decay as a shared space). Per distance, the mean middle-middle minus the mean middle-outer similarity; the claim
    holds when their mean over distances is over Z standard errors of it, the distances taken as independent (a
    rough error: one probe gives no per-sequence spread). Without a probe, the sweep's weaker evidence: reordering
    the fewest middle layers (reverse, random order) keeps most of the score."""
    claim = "Middle layers share a representation space"
    if r.probe is not None and r.probe.num_steps == r.num_layers:
        sim = r.probe.similarity
        L = r.num_layers
        edge = (L - middle_size(L)) // 2
        middle = range(edge, L - edge)
        outer = [i for i in range(L) if i not in middle]
        within = [sim[i, j] for i in middle for j in middle if i != j]
        across = [sim[i, j] for i in middle for j in outer]
        w, a = float(sum(within) / len(within)), float(sum(across) / len(across))
        diffs = []
        for d in range(1, L):
            w_d = [sim[i, j] for i in middle for j in middle if abs(i - j) == d]
            a_d = [sim[i, j] for i in middle for j in outer if abs(i - j) == d]
            if w_d and a_d:
                diffs.append(float(sum(w_d) / len(w_d) - sum(a_d) / len(a_d)))
        diff, se = sum(diffs) / len(diffs), mean_stderr(diffs)
        return ClaimCheck(claim, _compare(diff, se),
                          f"probe over {r.probe.num_sequences} sequences: mean cosine similarity between states "
                          f"entering middle layers {edge}-{L - edge - 1}: {w:.3f}; between those and the outer "
                          f"layers' states: {a:.3f}; at equal distances, middle-middle minus middle-outer "
                          f"{_fmt(diff, se)} (mean over {len(diffs)} distances, higher at "
                          f"{sum(x > 0 for x in diffs)})")
    value, se = combination(r, {("reverse", 0): 0.5, ("shuffle", 0): 0.5})
    if value is None:
        return ClaimCheck(claim, "not measured", "no probe and no normalised score")
    return ClaimCheck(claim, _compare(value - GRACEFUL_START, se),
                      f"no probe (the server has no /v1/probe); reordering the {r.counts[0]} centred layers keeps "
                      f"{_fmt(value, se)} of the full model (threshold {GRACEFUL_START})")


def gentle_slopes(slopes: Sequence[tuple[float | None, float | None]], limit: float) -> Verdict:
    """Whether the score never falls faster than `limit` per layer, from each step's slope and its standard error.
    Gentle everywhere needs every slope below the limit by Z standard errors (an intersection: no correction). Too
    steep somewhere needs one slope above it by a margin corrected for picking the steepest of several (Bonferroni:
    the steepest of k noisy slopes exceeds Z of its errors more often than one slope does); else inconclusive."""
    known = [(x, se) for x, se in slopes if x is not None]
    if not known:
        return "reproduced" if not slopes else "inconclusive"
    tail = 1 - statistics.NormalDist().cdf(Z)
    z_any = statistics.NormalDist().inv_cdf(1 - tail / len(known))
    if any(x - limit > max(z_any * (se or 0.0), 1e-9) for x, se in known):
        return "not reproduced"
    if len(known) == len(slopes) and all(_compare(limit - x, se) == "reproduced" for x, se in known):
        return "reproduced"
    return "inconclusive"


def graceful_skip(r: StudyResult) -> ClaimCheck:
    """Skipping the fewest layers keeps most of the score, and the score never falls much faster than a straight
    line to chance at the whole middle (GRACEFUL_SLOPE times it)."""
    claim = "Skipping middle layers degrades gracefully"
    start, start_se = combination(r, {("skip", 0): 1.0})
    if start is None:
        return ClaimCheck(claim, "not measured", "no task has a normalised score")
    limit = GRACEFUL_SLOPE / middle_size(r.num_layers)  # normalised score per skipped layer
    slopes = []
    for i in range(len(r.counts) - 1):
        gap = r.counts[i + 1] - r.counts[i]
        slope, se = combination(r, {("skip", i): 1 / gap, ("skip", i + 1): -1 / gap})
        slopes.append((slope, se, r.counts[i], r.counts[i + 1]))
    steepest = max(slopes, key=lambda x: x[0], default=None)  # type: ignore[arg-type, return-value]
    keeps = _compare(start - GRACEFUL_START, start_se)
    gentle = gentle_slopes([(s, se) for s, se, _, _ in slopes], limit)
    verdict: Verdict = ("not reproduced" if "not reproduced" in (keeps, gentle)
                        else "reproduced" if keeps == gentle == "reproduced" else "inconclusive")
    path = ", ".join(f"{p.n}: {p.normalized:.2f}" for p in r.mean_curve("skip"))
    fall = (f"; it falls at most {_fmt(steepest[0], steepest[1])} per layer (n = {steepest[2]} to {steepest[3]}), "
            f"graceful is <= {limit:.3f} ({GRACEFUL_SLOPE:g} / {middle_size(r.num_layers)} middle layers)"
            if steepest else "")
    return ClaimCheck(claim, verdict, f"skip's normalised score by n: {path}; the fewest keep "
                                      f"{_fmt(start, start_se)} (needs {GRACEFUL_START}){fall}")


def repeat_worst(r: StudyResult) -> ClaimCheck:
    claim = "Middle repeat is the worst variant"
    areas = {v: combination(r, area(r, v))[0] for v in VARIANTS}
    if any(a is None for a in areas.values()):
        return ClaimCheck(claim, "not measured", "no task has a normalised score")
    lowest_first = sorted(VARIANTS, key=lambda v: areas[v])  # type: ignore[arg-type, return-value]
    runner_up = next(v for v in lowest_first if v != "repeat")
    diff, se = combination(r, minus(area(r, runner_up), area(r, "repeat")))
    ranking = ", ".join(f"{LABELS[v]} {areas[v]:.2f}" for v in lowest_first)
    return ClaimCheck(claim, _compare(diff, se),  # type: ignore[arg-type]
                      f"mean normalised score over n = {_counts(r)}, lowest first: {ranking}; the next lowest minus "
                      f"middle repeat: {_fmt(diff, se)} (paired over items)")


def order_sensitive_tasks(r: StudyResult) -> ClaimCheck:
    """Order sensitivity of a task: 1 - its mean normalised score under reverse and random order."""
    claim = "ARC and GSM8K are the most order-sensitive tasks"
    tasks = r.normalized_tasks()
    named = [t for t in tasks if t in ORDER_SENSITIVE_TASKS]
    rest = [t for t in tasks if t not in ORDER_SENSITIVE_TASKS]
    if not named or not rest:
        return ClaimCheck(claim, "not measured", f"needs ARC or GSM8K and another task with normalised scores; "
                                                 f"measured: {', '.join(r.tasks)}")
    reorder = {k: w / 2 for v in ("reverse", "shuffle") for k, w in area(r, v).items()}
    sens: dict[str, tuple[float, float | None]] = {}
    for t in tasks:
        kept, se = combination(r, reorder, [t])
        sens[t] = (1 - kept, se)  # type: ignore[operator]
    least_named = min(named, key=lambda t: sens[t][0])
    most_rest = max(rest, key=lambda t: sens[t][0])
    se = math.hypot(sens[least_named][1] or 0.0, sens[most_rest][1] or 0.0)  # different items: independent
    ranking = ", ".join(f"{t} {_fmt(s, e)}" for t, (s, e) in sorted(sens.items(), key=lambda kv: -kv[1][0]))
    return ClaimCheck(claim, _compare(sens[least_named][0] - sens[most_rest][0], se),
                      f"order sensitivity (1 - mean normalised score under reverse and random order), most first: "
                      f"{ranking}")


CLAIMS: tuple[Callable[[StudyResult], ClaimCheck], ...] = (
    shared_space,
    graceful_skip,
    repeat_worst,
    _beats("Random order beats reverse", "shuffle", "reverse"),
    _beats("Parallel beats skip", "parallel", "skip"),
    _beats("Looped parallel beats parallel", "loop", "parallel"),
    order_sensitive_tasks,
)


def check_claims(r: StudyResult) -> list[ClaimCheck]:
    return [check(r) for check in CLAIMS]


# -- running ----------------------------------------------------------------------------------------------------


async def run_study(url: str, tasks: Sequence[Task], out: Path, *, counts: Sequence[int] | None = None,
                    seeds: int = 3, concurrency: int = 16, max_gen_tokens: int = 256, probe: bool = True,
                    model: str | None = None, api_key: str | None = None, progress: Progress | None = None
                    ) -> StudyResult:
    """Score `full` and every sweep policy on every task (cached under out/cache), then the curves and claims."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    async with EvalSession.open(url, concurrency=concurrency, max_gen_tokens=max_gen_tokens, model=model,
                                api_key=api_key, cache_dir=out / "cache") as session:
        num_layers = int((await session.client.policies())["num_layers"])
        counts = sorted(set(counts or default_counts(num_layers)))
        runs = plan(num_layers, counts, seeds=seeds)
        policies = [FULL, *dict.fromkeys(p for ps in runs.values() for p in ps)]
        todo = [(p, task) for p in policies for task in tasks if session.cached(p, task) is None]
        total = len(policies) * len(tasks)
        bar = progress.add_task("study", total=total, completed=total - len(todo)) if progress is not None else None
        for p in dict.fromkeys(p for p, _ in todo):
            await session.canonical(p)  # every policy still to run checked before anything long runs
        raw: dict[str, dict[str, TaskResult]] = {p: {} for p in policies}
        for p in policies:
            for task in tasks:
                if progress is not None and bar is not None and (p, task) in todo:
                    progress.update(bar, description=f"study: {task.name} [{p}]")
                raw[p][task.name] = await session.score(p, task, progress=progress)
                if progress is not None and bar is not None and (p, task) in todo:
                    progress.advance(bar)
        if progress is not None and bar is not None:
            progress.update(bar, description="study")
        probed = await _probe(session, url, tasks[0], model=model, api_key=api_key) if probe else None
    settings = {"url": url, "tasks": [t.name for t in tasks], "limit": max(len(t.items) for t in tasks),
                "data": {t.name: t.source for t in tasks}}
    return build_result(raw, runs, model=session.model_id, num_layers=num_layers, counts=counts, seeds=seeds,
                        probe=probed, settings=settings)


async def _probe(session: EvalSession, url: str, task: Task, *, model: str | None, api_key: str | None
                 ) -> Probe | None:
    """The full model's probe over the task's texts (cached like the scores); None without the endpoint."""
    texts = task_texts(task)[:64]
    assert session.cache is not None
    key = {"probe": FULL, "texts": hashlib.sha256(json.dumps(texts).encode()).hexdigest()}
    hit = session.cache.load("probe", key)
    if hit is not None:
        return Probe.from_json(hit)
    try:
        probe = await run_probe(url, texts, policy=FULL, model=model, api_key=api_key)
    except ProbeError as e:
        log.warning("no probe in the study: %s", e)
        return None
    session.cache.save("probe", key, probe.to_json())
    return probe


# -- output -----------------------------------------------------------------------------------------------------

COLORS = {"skip": "tab:blue", "repeat": "tab:red", "reverse": "tab:purple", "shuffle": "tab:orange",
          "parallel": "tab:green", "loop": "tab:olive"}


def plot_curves(curves: dict[str, list[Point]], path: Path, *, title: str) -> Path:
    """Normalised score against the number of affected layers, a line (with a ±1 stderr band) per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for variant, pts in curves.items():
        shown = [p for p in pts if p.normalized is not None]
        if not shown:
            continue
        xs, ys = [p.n for p in shown], [p.normalized for p in shown]
        ax.plot(xs, ys, marker="o", label=LABELS[variant], color=COLORS[variant])
        if all(p.stderr is not None for p in shown):
            low = [y - p.stderr for y, p in zip(ys, shown)]  # type: ignore[operator]
            high = [y + p.stderr for y, p in zip(ys, shown)]  # type: ignore[operator]
            ax.fill_between(xs, low, high, color=COLORS[variant], alpha=0.12)
    ax.set_xticks(sorted({p.n for pts in curves.values() for p in pts}))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="full model")
    ax.axhline(0.0, color="tab:gray", linestyle=":", linewidth=1, label="random baseline")
    ax.set_xlabel("number of affected middle layers (centred)")
    ax.set_ylabel("normalised score (0 = random, 1 = full model)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _table(r: StudyResult, curves: dict[str, list[Point]]) -> list[str]:
    lines = ["| variant | " + " | ".join(f"n = {n}" for n in r.counts) + " |",
             "| --- | " + " | ".join("---" for _ in r.counts) + " |"]
    for v, pts in curves.items():
        lines.append(f"| {LABELS[v]} | " + " | ".join(_fmt(p.normalized, p.stderr) for p in pts) + " |")
    return lines


def study_markdown(r: StudyResult, *, images: dict[str, str], command: str | None = None) -> str:
    """study.md: the claims and whether this model reproduces them, the curves as tables, the plots."""
    s = r.settings
    lines = [f"# The paper's experiments on {r.model} ({r.num_layers} layers)", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [f"Tasks: {', '.join(r.tasks)} (first {s.get('limit')} items each). Affected layers n = {_counts(r)}, "
              f"centred in the stack; random order averaged over {r.seeds} seeds; looped parallel runs the parallel "
              f"block {LOOP_TIMES} times. Scores are normalised per task (0 = random baseline, 1 = full model), ± one "
              f"standard error paired with the full model on the same items (never below one item's step).", "",
              "## The paper's claims on this model", "",
              "| claim | verdict | evidence |", "| --- | --- | --- |"]
    lines += [f"| {c.claim} | **{c.verdict}** | {c.evidence} |" for c in check_claims(r)]
    lines += ["", f"Verdicts are computed from the measurements (`clients/study.py`, `CLAIMS`): a comparison is "
                  f"*reproduced* or *not reproduced* when the difference exceeds {Z:g} standard errors, else "
                  f"*inconclusive*. Curves are compared by their mean normalised score over the counts; every "
                  f"variant and the full model ran on the same items, so a standard error comes from each item's own "
                  f"difference (paired). Graceful means keeping {GRACEFUL_START} at the fewest skipped layers and "
                  f"never falling faster than {GRACEFUL_SLOPE:g} times the straight line from 1 (nothing skipped) to "
                  f"0 (the whole middle).", ""]
    lines += ["## Full model", "", "| task | accuracy | random baseline |", "| --- | --- | --- |"]
    lines += [f"| {t} | {_fmt(f.accuracy, f.stderr)} | {f.random_baseline:.3f} |" for t, f in r.full.items()]
    lines += ["", "## All tasks (mean normalised score)", ""]
    if "all" in images:
        lines += [f"![all variants]({images['all']})", ""]
    lines += _table(r, {v: r.mean_curve(v) for v in VARIANTS})
    for task in r.tasks:
        lines += ["", f"## {task}", ""]
        if task in images:
            lines += [f"![{task}]({images[task]})", ""]
        lines += _table(r, r.curves[task])
    return "\n".join(lines) + "\n"


def write_outputs(r: StudyResult, out: Path, *, command: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    limit = r.settings.get("limit")
    images: dict[str, str] = {}
    paths = []
    for task in r.tasks:
        path = plot_curves(r.curves[task], out / f"study_{task}.png",
                           title=f"{r.model} on {task} (first {limit} items)")
        images[task] = path.name
        paths.append(path)
    tasks = r.normalized_tasks()
    path = plot_curves({v: r.mean_curve(v) for v in VARIANTS}, out / "study_all.png",
                       title=f"{r.model}: all variants, mean over {', '.join(tasks) or 'no task'}")
    images["all"] = path.name
    paths.append(path)
    json_path = out / "study.json"
    json_path.write_text(json.dumps(r.to_json(), indent=1) + "\n")
    md_path = out / "study.md"
    md_path.write_text(study_markdown(r, images=images, command=command))
    return [json_path, md_path, *paths]


# -- `painters study` -------------------------------------------------------------------------------------------


def parse_counts(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--counts takes comma-separated layer counts like 2,6,10, got {text!r}") from None
    return counts or None


def study_command(
    ctx: typer.Context,
    tasks: Annotated[str, typer.Option("--tasks", "--task", "-t", help="comma-separated, e.g. "
                                       "lambada_openai,hellaswag,arc_easy")],
    out: Annotated[Path, typer.Option(help="directory for study.json, study.md, the plots and the result cache")],
    url: Annotated[str, typer.Option(help="the server's base URL")] = "http://127.0.0.1:8000",
    limit: Annotated[int, typer.Option(help="the first N items of each task", min=1)] = 100,
    seeds: Annotated[int, typer.Option(help="random-order seeds averaged", min=1)] = 3,
    counts: Annotated[str | None, typer.Option(help="affected-layer counts, e.g. 2,6,10 (default: about six from 2 "
                                               "to the whole middle)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="directory laid out like ../shared/data")] = None,
    concurrency: Annotated[int, typer.Option(help="requests in flight", min=1)] = 16,
    num_fewshot: Annotated[int, typer.Option(help="GSM8K examples in the prompt", min=0)] = 5,
    max_gen_tokens: Annotated[int, typer.Option(help="GSM8K: new tokens at most", min=1)] = 256,
    probe: Annotated[bool, typer.Option(help="probe layer similarity for the shared-space claim")] = True,
    model: Annotated[str | None, typer.Option("--model", "-m", help="model name in the request body")] = None,
    api_key: Annotated[str | None, typer.Option(help="sent as 'Authorization: Bearer KEY'")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print study.json's object instead of the claims")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """The paper's sweep: skip, middle repeat, reverse, random order, parallel and looped parallel over the number of
    affected middle layers; plots, study.json and study.md with each claim checked. Cached: a rerun resumes."""
    quiet_http_logs(verbose=verbose)
    try:
        loaded = load_tasks(task_names(tasks), data_dir=data_dir, limit=limit, num_fewshot=num_fewshot)
        with progress_bar() as bars:
            result = asyncio.run(run_study(url, loaded, out, counts=parse_counts(counts), seeds=seeds,
                                           concurrency=concurrency, max_gen_tokens=max_gen_tokens, probe=probe,
                                           model=model, api_key=api_key, progress=bars))
        command = command_line(ctx)
        paths = write_outputs(result, out, command=command)
    except (DataError, EvalError, PaintersError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    except httpx.HTTPError as e:
        raise fail(f"{url}: {type(e).__name__}: {e}") from None
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    t = TextTable([Column("claim", keep_whole=True), Column("verdict"), Column("evidence")],
                  title=f"{result.model}: the paper's claims")
    for c in check_claims(result):
        t.add_row(c.claim, c.verdict, c.evidence)
    t.print(console)
    console.print("wrote " + ", ".join(map(str, paths)), markup=False, highlight=False, soft_wrap=True)
