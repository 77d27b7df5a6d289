"""`painters search`: the fastest layer policy that keeps a stated share of the full model's score on one or more
tasks, checked against the paper's own naive policies on items the search never chose on.

Each task's items are cut into three disjoint runs: screening items, selection items and held-out items.

1. The full model is scored on all three and probed over the screening texts.
2. Candidates come in families, each ordered from mild to aggressive: skip the k steps of lowest block influence
   (ShortGPT); skip the n consecutive layers whose input and output are closest in angular distance (Gromov et al.);
   run pairs, or one group, of the most alike consecutive layers in parallel; skip the first k layers of a greedy
   removal order in the manner of SLEB; and the paper's own policies, the baseline families: the k centred layers
   skipped, run as centred pairs, or run in parallel. Policies are explicit (`skip:a,b,c`, `schedule:...`), so a
   preset means the same layers on any server of this model. The first and last layers are never candidates.
3. Screening: each family is scored on the screening items with a continuous score (each item's probability of its
   gold answer, normalised like the accuracy, the tasks pooled: `screen_budget`) until `patience` candidates in a
   row miss the budget.
4. Selection: per family, the most aggressive screened candidates are scored on the selection items; one passes when
   a lower confidence bound of its normalised accuracy (paired with `full` on the same items) clears the budget, on
   every task or on their mean. The first to pass is the family's finalist. Any test that passes can make the
   preset, so the confidence holds for all of them together (Bonferroni over the tests selection may make).
5. Speed: every finalist and the centred skips up to the finalists' size are load-tested beside `full`
   (`clients/loadtest.py`); nothing about speed is modelled.
6. Held-out: each finalist, fastest first, is scored on the held-out items beside the baseline policy of the closest
   measured speed-up. The preset is the fastest finalist that matches or beats that baseline there (mean normalised
   score over the tasks) without the held-out items contradicting the budget. A baseline finalist matches itself, so
   where no searched policy holds up the paper's policy is the preset, and the file says so; with no finalist, `full`.
7. The presets are written as YAML that `painters serve --policy-presets` loads (name: policy, the numbers in
   comments), with a report (`.report.json`, `.report.md`). Every score and load test is kept in `--cache`: a rerun
   resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
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
    ResultCache,
    TaskResult,
    normalized_difference,
    normalized_paired,
    ratio_estimate,
)
from clients.loadtest import BUILTIN_PROMPTS, LoadtestError, load_prompts, run_loadtest
from clients.probe import Probe, ProbeError, run_probe, task_texts
from clients.study import centred_span, quadrature_mean
from clients.tasks import (
    Cloze,
    DataError,
    Document,
    Generation,
    Item,
    MultipleChoice,
    Task,
    TASKS,
    load_task,
    task_names,
)

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("arc_easy", "hellaswag", "lambada_openai", "piqa")
BASELINE_FAMILIES = ("centred skip", "centred pairs", "centred parallel")  # the paper's own policies
PROBE_FAMILIES = ("block influence", "angular distance", "parallel pairs", "parallel group")
FAMILIES = (*PROBE_FAMILIES, "SLEB", *BASELINE_FAMILIES)
BudgetOn = Literal["each", "mean"]


class SearchError(RuntimeError):
    """The search cannot run or cannot conclude; the message says why and what to change."""


# -- policy strings ----------------------------------------------------------------------------------------------


def _runs(layers: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in sorted(set(layers)):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def skip_policy(layers: Sequence[int]) -> str:
    """`skip:3,7-9`; one layer is `skip:5-5` (`skip:5` would drop five centred layers)."""
    assert layers
    runs = _runs(layers)
    if len(runs) == 1:
        return f"skip:{runs[0][0]}-{runs[0][1]}"
    return "skip:" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def schedule_policy(num_layers: int, groups: Sequence[Sequence[int]], *, combine: str = "pairs") -> str:
    """Every layer once, in order, with each of `groups` (consecutive, disjoint) run as one parallel step."""
    starts = {g[0]: tuple(g) for g in groups}
    assert all(list(g) == list(range(g[0], g[-1] + 1)) and len(g) >= 2 for g in starts.values())
    steps: list[str] = []
    run: list[int] = []
    i = 0
    while i < num_layers:
        if i in starts:
            steps += [f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0])] if run else []
            run = []
            steps.append("+".join(map(str, starts[i])) + f"/{combine}")
            i = starts[i][-1] + 1
        else:
            run.append(i)
            i += 1
    steps += [f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0])] if run else []
    return "schedule:" + ",".join(steps)


# -- candidates --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    family: str
    policy: str
    size: int  # layers skipped, or layers made parallel: how aggressive within its family
    layers: tuple[int, ...]  # the layers it skips or groups

    @property
    def baseline(self) -> bool:
        return self.family in BASELINE_FAMILIES

    @property
    def skipped(self) -> int:
        return 0 if self.policy.startswith(("schedule", "pairs", "parallel")) else len(self.layers)

    def describe(self) -> str:
        verb = {"centred pairs": "pairs over", "centred parallel": "parallel"}.get(self.family, "skip")
        verb = "parallel" if self.family.startswith("parallel") else verb
        return f"{verb} {len(self.layers)} layer{'s' if len(self.layers) != 1 else ''}"


def inner(num_layers: int) -> range:
    """Layers a candidate may touch: all but the first and the last."""
    return range(1, num_layers - 1)


def block_influence_family(probe: Probe, num_layers: int, *, most: int) -> list[Candidate]:
    order = [i for i in probe.least_influential() if i in inner(num_layers)]
    return [Candidate("block influence", skip_policy(order[:k]), k, tuple(sorted(order[:k])))
            for k in range(1, min(most, len(order)) + 1)]


def alike_blocks(probe: Probe, num_layers: int, n: int) -> tuple[int, float] | None:
    """The start of the n consecutive inner layers with the smallest angular distance d(start, start + n)."""
    if not 1 <= n <= len(probe.angular_distance):
        return None
    row = probe.angular_distance[n - 1]
    starts = [i for i in inner(num_layers) if i + n - 1 in inner(num_layers)]
    if not starts:
        return None
    best = min(starts, key=lambda i: (row[i], i))
    return best, float(row[best])


def angular_family(probe: Probe, num_layers: int, *, most: int) -> list[Candidate]:
    out = []
    for n in range(1, most + 1):
        found = alike_blocks(probe, num_layers, n)
        if found:
            layers = tuple(range(found[0], found[0] + n))
            out.append(Candidate("angular distance", skip_policy(layers), n, layers))
    return out


def parallel_pairs_family(probe: Probe, num_layers: int, *, most: int) -> list[Candidate]:
    """Disjoint pairs (i, i + 1) by how little the pair moves the state, d(i, i + 2); the k best run as pairs."""
    if len(probe.angular_distance) < 2:
        return []
    row = probe.angular_distance[1]
    ranked = sorted((i for i in inner(num_layers) if i + 1 in inner(num_layers)), key=lambda i: (row[i], i))
    chosen: list[int] = []
    out = []
    for i in ranked:
        if any(abs(i - j) < 2 for j in chosen):
            continue
        chosen.append(i)
        groups = sorted((j, j + 1) for j in chosen)
        out.append(Candidate("parallel pairs", schedule_policy(num_layers, groups), 2 * len(chosen),
                             tuple(x for g in groups for x in g)))
        if len(chosen) >= most:
            break
    return out


def parallel_group_family(probe: Probe, num_layers: int, *, most: int) -> list[Candidate]:
    """One group of the n most alike consecutive layers, n = 3 .. `most`, reading one input (combine `pairs`)."""
    out = []
    for n in range(3, most + 1):
        found = alike_blocks(probe, num_layers, n)
        if found:
            layers = tuple(range(found[0], found[0] + n))
            out.append(Candidate("parallel group", schedule_policy(num_layers, [layers]), n, layers))
    return out


def baseline_families(num_layers: int, *, most: int) -> dict[str, list[Candidate]]:
    """The paper's policies, n centred layers (`centred_span`, as the server centres `skip:n`): skipped (n = 1 ..
    `most`), run as consecutive pairs sharing their input (n even), run as one parallel group (n >= 2)."""
    fits = [n for n in range(1, most + 1) if centred_span(num_layers, n)[0] >= 1
            and centred_span(num_layers, n)[1] <= num_layers - 2]

    def span(n: int) -> tuple[int, ...]:
        a, b = centred_span(num_layers, n)
        return tuple(range(a, b + 1))

    def text(n: int) -> str:
        a, b = centred_span(num_layers, n)
        return f"{a}-{b}"

    return {"centred skip": [Candidate("centred skip", f"skip:{text(n)}", n, span(n)) for n in fits],
            "centred pairs": [Candidate("centred pairs", f"pairs:{text(n)}", n, span(n)) for n in fits
                              if n % 2 == 0],
            "centred parallel": [Candidate("centred parallel", f"parallel:{text(n)}", n, span(n)) for n in fits
                                 if n >= 2]}


def sleb_family(order: Sequence[int]) -> list[Candidate]:
    return [Candidate("SLEB", skip_policy(order[:k]), k, tuple(sorted(order[:k]))) for k in range(1, len(order) + 1)]


async def sleb_order(loss: Callable[[list[int]], Awaitable[float]], candidates: Sequence[int], *, steps: int,
                     on_step: Callable[[], None] = lambda: None) -> list[tuple[int, float]]:
    """SLEB's greedy removal: each round removes the candidate whose removal (with those already removed) gives the
    lowest loss; (layer, loss after removing it) per round."""
    removed: list[int] = []
    trace: list[tuple[int, float]] = []
    for _ in range(steps):
        options = [c for c in candidates if c not in removed]
        if not options:
            break
        losses = {c: await loss(sorted([*removed, c])) for c in options}
        best = min(options, key=lambda c: (losses[c], c))
        removed.append(best)
        trace.append((best, losses[best]))
        on_step()
    return trace


def gold_pair(item: Item) -> tuple[str, str]:
    """(context, the right continuation) whose loglikelihood SLEB's loss sums."""
    if isinstance(item, MultipleChoice):
        return item.contexts[item.gold], item.continuations[item.gold]
    if isinstance(item, Cloze):
        return item.context, item.continuation
    if isinstance(item, Generation):
        return item.prompt, " " + item.answer
    assert isinstance(item, Document)
    return "", item.text[:2000]


async def gold_loss(session: EvalSession, policy: str, pairs: Sequence[tuple[str, str]]) -> float:
    """Mean negative loglikelihood per token of the gold continuations under `policy` (kept in the session's cache)."""
    key = {"policy": policy, "pairs": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()}
    if session.cache is not None and (hit := session.cache.load("gold_loss", key)) is not None:
        return float(hit)
    loss = await _gold_loss(session, policy, pairs)
    if session.cache is not None:
        session.cache.save("gold_loss", key, loss)
    return loss


async def _gold_loss(session: EvalSession, policy: str, pairs: Sequence[tuple[str, str]]) -> float:
    scorer = session.scorer(policy)

    async def one(pair: tuple[str, str]) -> tuple[float, int]:
        async with session.semaphore:
            ll = (await scorer.loglikelihoods([pair]))[0]
        return -ll.logprob, ll.tokens

    got = await asyncio.gather(*(one(p) for p in pairs))
    return sum(n for n, _ in got) / max(1, sum(t for _, t in got))


# -- estimates, bounds and the budget ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A normalised score, or a difference of two, over n items, with its paired standard error."""

    value: float | None
    se: float | None
    n: int

    def lower(self, z: float) -> float | None:
        return None if self.value is None else self.value - z * (self.se or 0.0)

    def upper(self, z: float) -> float | None:
        return None if self.value is None else self.value + z * (self.se or 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "se": self.se, "n": self.n}


def item_step(full: TaskResult) -> float:
    """One item on the normalised scale, 1 / (n |full accuracy - random|): the finest change n items can show."""
    scale = abs((full.accuracy or 0.0) - full.random_baseline)
    return math.inf if not full.n or scale < 1e-12 else 1 / (full.n * scale)


def normalized_estimate(result: TaskResult, full: TaskResult, *, soft: bool = False) -> Estimate:
    """`result` against `full` on the same items (0 = random, 1 = full), paired: its accuracy, or with `soft` its
    gold answers' probability (the accuracy where a task has none). The accuracy's error is never below one item's
    step: n items none of which changed say only that fewer than about one in n would."""
    soft = soft and bool(result.soft) and bool(full.soft)
    a, f = (result.soft, full.soft) if soft else (result.scores, full.scores)
    assert len(a) == len(f), f"{result.policy} and full were scored on different items"
    value, se = normalized_paired(a, f, full.random_baseline)
    if value is not None and not soft:
        se = max(se or 0.0, item_step(full))
    return Estimate(value, se, len(a))


def mean_estimate(estimates: Sequence[Estimate]) -> Estimate:
    """The mean over tasks (independent items: errors add in quadrature)."""
    values = [e.value for e in estimates]
    if not estimates or any(v is None for v in values):
        return Estimate(None, None, 0)
    return Estimate(sum(values) / len(values), quadrature_mean([e.se for e in estimates]),  # type: ignore[misc]
                    sum(e.n for e in estimates))


@dataclass(frozen=True)
class Check:
    """One policy against the budget on one run of items: its estimate per task, the bound that decided, the verdict."""

    per_task: dict[str, Estimate]
    bound: float | None  # the lowest task's lower bound (budget on each task), or the mean's (budget on the mean)
    passed: bool
    pooled: Estimate | None = None  # screening: the tasks pooled (see `screen_budget`), shown as the mean

    @property
    def mean(self) -> Estimate:
        return self.pooled or mean_estimate(list(self.per_task.values()))

    def to_json(self) -> dict[str, Any]:
        return {"bound": self.bound, "passed": self.passed, "mean": self.mean.to_json(),
                "tasks": {t: e.to_json() for t, e in self.per_task.items()}}


def check_budget(per_task: dict[str, Estimate], *, budget: float, on: BudgetOn, z: float) -> Check:
    """Passes when the lower confidence bound (estimate - z * stderr) clears the budget: on every task, or on the
    mean over the tasks. z = 0 judges the point estimate."""
    if on == "mean":
        bound = mean_estimate(list(per_task.values())).lower(z)
    else:
        lows = [e.lower(z) for e in per_task.values()]
        bound = None if not lows or any(x is None for x in lows) else min(lows)  # type: ignore[type-var]
    return Check(per_task, bound, bound is not None and bound >= budget)


def pooled_estimate(results: dict[str, TaskResult], full: dict[str, TaskResult]) -> Estimate:
    """The gold probability over every task's items at once, normalised: sum(policy - random) / sum(full - random).
    Each task weighs by how far the full model is above chance, so a task where it is barely above (HellaSwag on a
    135M model: a normalised scale of 0.01 on a few items) cannot swing the screen by noise."""
    x = [p - full[t].random_baseline for t, r in results.items() for p in (r.soft or r.scores)]
    y = [f - full[t].random_baseline for t in results for f in (full[t].soft or full[t].scores)]
    value, se = ratio_estimate(x, y)
    return Estimate(value, se, len(x))


def screen_budget(results: dict[str, TaskResult], full: dict[str, TaskResult], *, budget: float, on: BudgetOn
                  ) -> Check:
    """Screening on the gold answers' probability: with the budget on the mean, the pooled score's point estimate
    must reach it; on each task, a candidate is dropped only where a task's estimate is clearly below it (by more
    than one stderr), since a few items of a task near chance say little."""
    per_task = {t: normalized_estimate(r, full[t], soft=True) for t, r in results.items()}
    pooled = pooled_estimate(results, full)
    if on == "mean":
        return Check(per_task, pooled.value, pooled.value is not None and pooled.value >= budget, pooled)
    ups = [e.upper(1.0) for e in per_task.values()]
    bound = None if any(u is None for u in ups) else min(ups)  # type: ignore[type-var]
    return Check(per_task, bound, bound is not None and bound >= budget, pooled)


def contradicts(per_task: dict[str, Estimate], *, budget: float, on: BudgetOn, z: float) -> bool:
    """The items refute the budget: the upper confidence bound is below it (on some task, or on the mean)."""
    if on == "mean":
        up = mean_estimate(list(per_task.values())).upper(z)
        return up is not None and up < budget
    return any((u := e.upper(z)) is not None and u < budget for e in per_task.values())


# -- items: three disjoint runs per task -------------------------------------------------------------------------

SPLITS = ("screen", "select", "heldout")


@dataclass(frozen=True)
class Splits:
    """One task's items cut into disjoint consecutive runs (file order): screening, selection, held-out."""

    screen: Task
    select: Task
    heldout: Task

    @property
    def name(self) -> str:
        return self.screen.name

    def part(self, split: str) -> Task:
        assert split in SPLITS
        return getattr(self, split)

    def ranges(self) -> dict[str, list[int]]:
        """split -> [first, last] item index in the file."""
        out, start = {}, 0
        for split in SPLITS:
            n = len(self.part(split).items)
            out[split] = [start, start + n - 1]
            start += n
        return out


def split_task(task: Task, *, screen: int, select: int, heldout: int) -> Splits:
    n = len(task.items)
    if screen < 1 or select < 2 or heldout < 2 or n < screen + select + heldout:
        raise DataError(f"{task.source} has {n} {task.name} items; the search needs {screen} screening + {select} "
                        f"selection + {heldout} held-out (at least 1 + 2 + 2): lower --screen, --select or --heldout")
    a, b, c = screen, screen + select, screen + select + heldout
    return Splits(Task(task.spec, task.items[:a], task.source), Task(task.spec, task.items[a:b], task.source),
                  Task(task.spec, task.items[b:c], task.source))


# -- screening and selection -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    check: Check

    @property
    def passed(self) -> bool:
        return self.check.passed

    def to_json(self) -> dict[str, Any]:
        return {"family": self.candidate.family, "policy": self.candidate.policy, "size": self.candidate.size,
                "layers": list(self.candidate.layers), **self.check.to_json()}


async def scan(families: dict[str, list[Candidate]], check: Callable[[str], Awaitable[Check]], *,
               patience: int) -> list[Scored]:
    """Each family mild to aggressive, until `patience` candidates in a row miss the budget; a policy is scored once."""
    memo: dict[str, Check] = {}
    out: list[Scored] = []
    for candidates in families.values():
        misses = 0
        for c in candidates:
            if c.policy not in memo:
                memo[c.policy] = await check(c.policy)
            out.append(Scored(c, memo[c.policy]))
            misses = 0 if memo[c.policy].passed else misses + 1
            if misses >= patience:
                break
    return out


def to_select(screened: Sequence[Scored], *, tries: int) -> dict[str, list[Scored]]:
    """Per family, the screen-passing candidates selection may score, in its order: the most aggressive first, at
    most `tries`."""
    passing: dict[str, list[Scored]] = {}
    for s in screened:
        if s.passed:
            passing.setdefault(s.candidate.family, []).append(s)
    return {family: sorted(members, key=lambda m: -m.candidate.size)[:tries] for family, members in passing.items()}


def selection_tests(screened: Sequence[Scored], *, tries: int) -> int:
    """How many tests selection may make: each distinct policy `select` may score, and the fallback baseline's check
    (see `choose`). Any of them passing by chance can become the preset, so they share the error."""
    return len({s.candidate.policy for members in to_select(screened, tries=tries).values() for s in members}) + 1


def selection_z(confidence: float, tests: int) -> float:
    """The one-sided z of each selection test, so that all `tests` together pass a policy that misses the budget
    with probability at most 1 - confidence (Bonferroni: each test at (1 - confidence) / tests)."""
    return statistics.NormalDist().inv_cdf(1 - (1 - confidence) / max(tests, 1))


async def select(screened: Sequence[Scored], check: Callable[[str], Awaitable[Check]], *, tries: int
                 ) -> tuple[list[Scored], list[Scored]]:
    """Per family, its screen-passing candidates from the most aggressive down, at most `tries`, checked on the
    selection items until one passes: (every selection check, the finalists, one per policy, a baseline family's
    entry kept where a searched family found the same policy)."""
    memo: dict[str, Check] = {}
    checked: list[Scored] = []
    finalists: list[Scored] = []
    for members in to_select(screened, tries=tries).values():
        for s in members:
            if s.candidate.policy not in memo:
                memo[s.candidate.policy] = await check(s.candidate.policy)
            got = Scored(s.candidate, memo[s.candidate.policy])
            checked.append(got)
            if got.passed:
                finalists.append(got)
                break
    unique: dict[str, Scored] = {}
    for f in sorted(finalists, key=lambda f: not f.candidate.baseline):
        unique.setdefault(f.candidate.policy, f)
    return checked, [f for f in finalists if unique[f.candidate.policy] is f]


# -- speed -------------------------------------------------------------------------------------------------------


async def measure_speed(url: str, policies: Sequence[str], *, rounds: int, concurrency: int, requests: int,
                        max_tokens: int, prompts: Sequence[str], model: str | None, api_key: str | None,
                        progress: Progress | None = None) -> dict[str, tuple[float | None, float | None]]:
    """Canonical policy -> (TPOT p50 in ms, speed-up over full), each the median over `rounds` load tests. A round
    measures full first and then every policy (in a rotated order), so a change in the machine's load between
    rounds moves full and the policies alike and the per-round ratio stays fair."""
    tpots: dict[str, list[float]] = {}
    ups: dict[str, list[float]] = {}
    for r in range(rounds):
        k = r % max(1, len(policies))
        order = [*policies[k:], *policies[:k]]
        loads = await run_loadtest(url, [FULL, *order], concurrency=concurrency, requests=requests,
                                   max_tokens=max_tokens, warmup=1, prompts=prompts, model=model, api_key=api_key,
                                   progress=progress)
        full = loads[FULL].tpot.p50
        for name, load in loads.items():
            if load.tpot.p50:
                tpots.setdefault(name, []).append(load.tpot.p50 * 1e3)
                if full:
                    ups.setdefault(name, []).append(full / load.tpot.p50)
    out: dict[str, tuple[float | None, float | None]] = {
        name: (statistics.median(tpots[name]), statistics.median(ups[name]) if name in ups else None) for name in tpots}
    out.setdefault(FULL, (None, None))
    return out


def timed_baselines(finalists: Sequence[Finalist], baselines: dict[str, list[Candidate]]) -> list[Candidate]:
    """The baselines a finalist may be matched with: the centred skips up to one layer more than any finalist skips,
    and every baseline finalist; nothing when there is no finalist."""
    if not finalists:
        return []
    most = max((f.candidate.skipped for f in finalists), default=0)
    out = [c for c in baselines.get("centred skip", []) if c.size <= most + 1]
    return out + [f.candidate for f in finalists if f.candidate.baseline and f.candidate not in out]


def closest(speedup: float | None, baselines: dict[str, float | None]) -> str | None:
    """The baseline (canonical name) whose measured speed-up is closest to `speedup`."""
    known = {name: s for name, s in baselines.items() if s is not None}
    if speedup is None or not known:
        return None
    return min(known, key=lambda name: (abs(known[name] - speedup), name))


# -- held-out ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A finalist beside its equal-speed baseline on the held-out items, per task, paired over the same items."""

    baseline: str  # the baseline policy (canonical)
    baseline_speedup: float | None
    finalist: dict[str, Estimate]  # normalised scores
    base: dict[str, Estimate]
    difference: dict[str, Estimate]  # finalist - baseline
    accuracy: dict[str, tuple[float | None, float | None]]  # task -> the finalist's accuracy and its stderr
    base_accuracy: dict[str, tuple[float | None, float | None]]

    @property
    def mean_difference(self) -> Estimate:
        return mean_estimate(list(self.difference.values()))

    def to_json(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "baseline_speedup": self.baseline_speedup,
                "mean": {"finalist": mean_estimate(list(self.finalist.values())).to_json(),
                         "baseline": mean_estimate(list(self.base.values())).to_json(),
                         "difference": self.mean_difference.to_json()},
                "tasks": {t: {"finalist": self.finalist[t].to_json(), "baseline": self.base[t].to_json(),
                              "difference": self.difference[t].to_json(),
                              "finalist_accuracy": list(self.accuracy[t]),
                              "baseline_accuracy": list(self.base_accuracy[t])} for t in self.finalist}}


def compare(finalist: dict[str, TaskResult], base: dict[str, TaskResult], full: dict[str, TaskResult], *,
            baseline: str, baseline_speedup: float | None) -> Comparison:
    diff = {}
    for t, f in full.items():
        value, se = normalized_difference(finalist[t].scores, base[t].scores, f.scores, f.random_baseline)
        diff[t] = Estimate(value, se, f.n)
    norm = {t: Estimate(*normalized_paired(finalist[t].scores, f.scores, f.random_baseline), f.n)
            for t, f in full.items()}
    base_norm = {t: Estimate(*normalized_paired(base[t].scores, f.scores, f.random_baseline), f.n)
                 for t, f in full.items()}
    return Comparison(baseline, baseline_speedup, norm, base_norm, diff,
                      {t: (r.accuracy, r.stderr) for t, r in finalist.items()},
                      {t: (r.accuracy, r.stderr) for t, r in base.items()})


@dataclass(frozen=True)
class Finalist:
    candidate: Candidate
    canonical: str
    screen: Check
    selection: Check
    tpot_p50_ms: float | None = None
    speedup: float | None = None  # full's TPOT p50 / this one's
    heldout: Comparison | None = None

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.candidate.policy, "canonical": self.canonical, "family": self.candidate.family,
                "baseline_family": self.candidate.baseline, "screen": self.screen.to_json(),
                "selection": self.selection.to_json(), "tpot_p50_ms": self.tpot_p50_ms, "speedup": self.speedup,
                "heldout": self.heldout.to_json() if self.heldout else None}


Outcome = Literal["winner", "baseline", "full"]


@dataclass(frozen=True)
class Choice:
    """What the preset file holds: `presets` (name -> policy, the first under the plain name), why, and notes."""

    presets: dict[str, str]
    outcome: Outcome  # a searched policy, the paper's baseline, or the full model
    chosen: Finalist | None
    notes: list[str]


def holds_up(f: Finalist, *, budget: float, on: BudgetOn, z: float) -> tuple[bool, str]:
    """Whether the held-out items back the finalist: it matches or beats its equal-speed baseline (the mean normalised
    score over the tasks, point estimate) and its held-out scores do not refute the budget."""
    if f.heldout is None:
        return False, f"{f.candidate.policy}: not scored on held-out items"
    if f.speedup is not None and f.speedup <= 1.0:
        return False, f"{f.candidate.policy}: measured {f.speedup:.2f}x, no faster than `full`"
    d = f.heldout.mean_difference
    if d.value is None or d.value < 0:
        return False, (f"{f.candidate.policy} ({f.candidate.family}) lost to the equal-speed baseline "
                       f"`{f.heldout.baseline}` on held-out items: {_pm(d)}")
    if contradicts(f.heldout.finalist, budget=budget, on=on, z=z):
        return False, f"{f.candidate.policy}: the held-out items put it below the budget {budget:g}"
    return True, ""


def fallback(finalists: Sequence[Finalist], *, budget: float, on: BudgetOn, z: float) -> Comparison | None:
    """Where no finalist holds up: the held-out comparison of the fastest finalist scored there, whose equal-speed
    baseline the preset may fall back to, if that baseline is faster than `full` (or of unknown speed), the held-out
    items do not refute the budget for it, and it passes selection (see `choose`); else None."""
    if any(holds_up(f, budget=budget, on=on, z=z)[0] for f in finalists):
        return None
    cmp = next((f.heldout for f in finalists if f.heldout is not None), None)
    if cmp is None or (cmp.baseline_speedup or 2.0) <= 1.0 or contradicts(cmp.base, budget=budget, on=on, z=z):
        return None
    return cmp


def choose(finalists: Sequence[Finalist], *, prefix: str, budget: float, on: BudgetOn, z: float,
           fallback_selection: Check | None = None) -> Choice:
    """The fastest finalist the held-out items back, under the plain name; the other backed finalists as
    `prefix-family`. Where none holds up, the `fallback` baseline, if it passed selection on its own
    (`fallback_selection`, its check on the selection items: the bar every finalist cleared) and the held-out items
    do not refute the budget for it; else `full`. Held-out items only veto: they never pick the preset."""
    backed, notes = [], []
    for f in finalists:  # fastest first
        ok, why = holds_up(f, budget=budget, on=on, z=z)
        if ok:
            backed.append(f)
        elif why:
            notes.append(why)
    if backed:
        best = backed[0]
        presets = {preset_name(prefix): best.candidate.policy}
        for f in backed[1:]:
            presets.setdefault(preset_name(prefix, f.candidate.family), f.candidate.policy)
        if best.candidate.baseline:
            beaten = [f for f in finalists if not f.candidate.baseline and (f.speedup or 0) >= (best.speedup or 0)]
            notes.insert(0, f"the preset is the paper's own policy `{best.candidate.policy}`: "
                         + ("no faster searched policy matched or beat its equal-speed baseline on held-out items"
                            if beaten else "no searched policy that passed selection was faster"))
        return Choice(presets, "baseline" if best.candidate.baseline else "winner", best, notes)
    cmp = fallback(finalists, budget=budget, on=on, z=z)
    if cmp is not None:
        if fallback_selection is not None and fallback_selection.passed:
            notes.insert(0, f"nothing the search found matched or beat the paper's policy of the same speed on "
                         f"held-out items: the preset is that baseline, `{cmp.baseline}`, which passed selection "
                         f"(bound {_num(fallback_selection.bound, '.3f')})")
            return Choice({preset_name(prefix): cmp.baseline}, "baseline", None, notes)
        why = ("was not scored on the selection items" if fallback_selection is None
               else f"missed the budget on the selection items (bound {_num(fallback_selection.bound, '.3f')})")
        notes.append(f"the equal-speed baseline `{cmp.baseline}` {why}, so it is not the preset either")
    notes.insert(0, f"no policy kept {budget:g} of the full model's score and held up on held-out items: the "
                 f"preset is `full`")
    return Choice({preset_name(prefix): FULL}, "full", None, notes)


def slug(family: str) -> str:
    return family.lower().replace(" ", "-")


def preset_name(prefix: str, family: str | None = None) -> str:
    name = prefix if family is None else f"{prefix}-{slug(family)}"
    assert ":" not in name and "@" not in name
    return name


def _pm(e: Estimate, spec: str = "+.3f") -> str:
    if e.value is None:
        return "-"
    return format(e.value, spec) + ("" if e.se is None else f" ± {e.se:.3f}")


# -- the search --------------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    model: str
    num_layers: int
    tasks: list[str]
    budget: float
    budget_on: BudgetOn
    confidence: float
    splits: dict[str, dict[str, list[int]]]  # task -> split -> [first, last] item index
    sources: dict[str, str]
    full: dict[str, dict[str, TaskResult]]  # split -> task -> the full model's result
    screened: list[Scored]
    selected: list[Scored]
    finalists: list[Finalist]  # fastest first
    speeds: dict[str, tuple[float | None, float | None]]  # canonical policy -> (TPOT p50 ms, speed-up); full too
    sleb: list[tuple[int, float]]
    full_loss: float | None
    choice: Choice
    cost: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    select_tests: int = 1  # the selection tests that share 1 - confidence

    @property
    def z(self) -> float:
        """Each selection test's z (Bonferroni over `select_tests`)."""
        return selection_z(self.confidence, self.select_tests)

    @property
    def winner(self) -> Finalist | None:
        return self.choice.chosen

    def resolution(self) -> dict[str, dict[str, float]]:
        """Per task, one item on the normalised scale in selection and held-out, and the margin (z stderr) the
        selection bound took off the finalists' scores (the median over them)."""
        out = {}
        for t in self.tasks:
            margins = [self.z * (s.check.per_task[t].se or 0.0) for s in self.selected if t in s.check.per_task]
            out[t] = {"select_items": self.full["select"][t].n, "select_item": item_step(self.full["select"][t]),
                      "heldout_items": self.full["heldout"][t].n, "heldout_item": item_step(self.full["heldout"][t]),
                      "select_margin": statistics.median(margins) if margins else math.nan}
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "num_layers": self.num_layers, "tasks": self.tasks, "budget": self.budget,
            "budget_on": self.budget_on, "confidence": self.confidence, "select_tests": self.select_tests,
            "z": self.z, "items": self.splits,
            "data": self.sources,
            "full": {split: {t: {"accuracy": r.accuracy, "stderr": r.stderr, "random_baseline": r.random_baseline,
                                 "n": r.n} for t, r in per.items()} for split, per in self.full.items()},
            "full_tpot_p50_ms": self.speeds.get(FULL, (None, None))[0], "full_gold_loss": self.full_loss,
            "presets": self.choice.presets, "outcome": self.choice.outcome,
            "finalists": [f.to_json() for f in self.finalists],
            "speeds": {p: {"tpot_p50_ms": t, "speedup": s} for p, (t, s) in self.speeds.items()},
            "resolution": self.resolution(), "cost": self.cost,
            "sleb_order": [{"layer": layer, "loss": loss} for layer, loss in self.sleb],
            "screened": [s.to_json() for s in self.screened], "selected": [s.to_json() for s in self.selected],
            "notes": [*self.choice.notes, *self.notes],
        }


def probe_texts(splits: Sequence[Splits], most: int = 64) -> list[str]:
    """The screening texts of every task, taken in turn, `most` in all."""
    per_task = [task_texts(s.screen) for s in splits]
    mixed = [t for row in zip(*per_task) for t in row] + [t for texts in per_task for t in texts]
    return list(dict.fromkeys(mixed))[:most]


async def run_search(url: str, splits: Sequence[Splits], *, budget: float, budget_on: BudgetOn = "each",
                     confidence: float = 0.9, families: Sequence[str] = FAMILIES, prefix: str | None = None,
                     most: int | None = None, patience: int = 2, tries: int = 2, calibration: int = 4,
                     sleb_steps: int | None = None, report_finalists: int | None = None, requests: int = 8,
                     concurrency: int = 4, max_tokens: int = 32, rounds: int = 3, eval_concurrency: int = 16,
                     prompts: Sequence[str] = BUILTIN_PROMPTS, cache_dir: Path | None = None,
                     model: str | None = None, api_key: str | None = None, progress: Progress | None = None
                     ) -> SearchResult:
    if not 0 < budget <= 1.5:
        raise ValueError(f"budget is a share of the full model's normalised score, e.g. 0.9; got {budget}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence is the selection's one-sided level over all its tests, 0.5-0.999; got "
                         f"{confidence}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; known: "
                         f"{', '.join(FAMILIES)}")
    t0 = time.perf_counter()
    z = statistics.NormalDist().inv_cdf(confidence)
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"a task is named twice: {', '.join(names)}")
    prefix = prefix or (f"{names[0]}-{round(budget * 100)}" if len(names) == 1 else f"search-{round(budget * 100)}")
    notes: list[str] = []

    def phase(text: str, total: int | None = None) -> Any:
        return progress.add_task(text, total=total) if progress is not None else None

    def tick(task_id: Any) -> None:
        if progress is not None and task_id is not None:
            progress.advance(task_id)

    async with EvalSession.open(url, concurrency=eval_concurrency, model=model, api_key=api_key,
                                cache_dir=cache_dir) as session:
        num_layers = int((await session.client.policies())["num_layers"])
        model_id = (await session.client.models())[0]["id"]
        most = most or max(1, num_layers // 2)

        async def scores(policy: str, split: str) -> dict[str, TaskResult]:
            return {s.name: await session.score(policy, s.part(split), progress=progress) for s in splits}

        full = {split: await scores(FULL, split) for split in SPLITS}
        for split in SPLITS:  # below chance the normalised scale inverts: a worse policy would score above 1
            for t, r in full[split].items():
                if r.accuracy is None or r.accuracy - r.random_baseline <= 1e-12 or math.isinf(item_step(r)):
                    raise SearchError(f"the full model scores {r.accuracy} on the {r.n} {split} items of {t}, not "
                                      f"above its random baseline {r.random_baseline:.3f}: nothing to keep; use more "
                                      f"items (--{split}) or a task the model can do")

        # candidates: the probe's, SLEB's and the paper's
        fams: dict[str, list[Candidate]] = {}
        if any(f in families for f in PROBE_FAMILIES):
            try:
                probe = await run_probe(url, probe_texts(splits), policy=FULL, model=model, api_key=api_key)
            except ProbeError as e:
                probe = None
                notes.append(f"no probe candidates: {e}")
                log.warning("no probe candidates: %s", e)
            if probe is not None:
                made = {"block influence": block_influence_family(probe, num_layers, most=most),
                        "angular distance": angular_family(probe, num_layers, most=most),
                        "parallel pairs": parallel_pairs_family(probe, num_layers, most=max(1, most // 2)),
                        "parallel group": parallel_group_family(probe, num_layers, most=most)}
                fams.update({f: c for f, c in made.items() if f in families})
        order: list[tuple[int, float]] = []
        full_loss = None
        if "SLEB" in families:
            pairs = [gold_pair(item) for s in splits for item in s.screen.items[:calibration]]
            full_loss = await gold_loss(session, FULL, pairs)
            steps = sleb_steps if sleb_steps is not None else max(1, num_layers // 4)
            sleb_bar = phase("search: SLEB greedy removal", steps)
            order = await sleb_order(lambda layers: gold_loss(session, skip_policy(layers), pairs),
                                     list(inner(num_layers)), steps=steps, on_step=lambda: tick(sleb_bar))
            fams["SLEB"] = sleb_family([layer for layer, _ in order])
        baselines = baseline_families(num_layers, most=most)
        fams.update(baselines)  # always scored

        # screening (gold-answer probability, point estimate), then selection (accuracy, lower bound)
        screen_bar = phase("search: screened")
        select_bar = phase("search: selection")

        async def screen_check(policy: str) -> Check:
            got = await scores(policy, "screen")
            tick(screen_bar)
            return screen_budget(got, full["screen"], budget=budget, on=budget_on)

        screened = await scan(fams, screen_check, patience=patience)
        tests = selection_tests(screened, tries=tries)
        select_z = selection_z(confidence, tests)

        async def select_check(policy: str) -> Check:
            got = await scores(policy, "select")
            tick(select_bar)
            return check_budget({t: normalized_estimate(r, full["select"][t]) for t, r in got.items()},
                                budget=budget, on=budget_on, z=select_z)

        selected, chosen = await select(screened, select_check, tries=tries)
        screen_of = {s.candidate.policy: s.check for s in screened}
        finalists = [Finalist(s.candidate, await session.canonical(s.candidate.policy),
                              screen_of[s.candidate.policy], s.check) for s in chosen]

        # speed: every finalist and the baselines it may be matched with, beside full
        timed = timed_baselines(finalists, baselines)
        canon = {c.policy: await session.canonical(c.policy) for c in timed}
        policies = list(dict.fromkeys([*(f.canonical for f in finalists), *canon.values()]))
        speeds, measured = await cached_speed(
            session, url, policies, rounds=rounds, concurrency=concurrency, requests=requests,
            max_tokens=max_tokens, prompts=prompts, model=model, api_key=api_key,
            progress=progress) if policies else ({FULL: (None, None)}, False)
        finalists = sorted((replace_speed(f, speeds) for f in finalists), key=lambda f: -(f.speedup or 0.0))
        by_canonical = {canon[c.policy]: c for c in timed}
        base_speed = {name: speeds.get(name, (None, None))[1] for name in by_canonical}

        # held-out: each finalist (fastest first) beside the baseline of the closest measured speed-up
        heldout_bar = phase("search: held-out")
        cap = len(finalists) if not report_finalists else report_finalists
        first_baseline = next((f for f in finalists if f.candidate.baseline), None)
        compared = []
        for i, f in enumerate(finalists):
            if i >= cap and f is not first_baseline:
                compared.append(f)
                continue
            base = f.canonical if f.candidate.baseline else closest(f.speedup, base_speed)
            if base is None:
                compared.append(f)
                continue
            base_policy = f.candidate.policy if f.candidate.baseline else by_canonical[base].policy
            mine = await scores(f.candidate.policy, "heldout")
            theirs = mine if base_policy == f.candidate.policy else await scores(base_policy, "heldout")
            compared.append(replace_heldout(f, compare(mine, theirs, full["heldout"], baseline=base,
                                                       baseline_speedup=base_speed.get(base))))
            tick(heldout_bar)
        finalists = compared
        # where nothing holds up, the fallback baseline must clear selection as every finalist did
        fallback_selection = None
        if (cmp := fallback(finalists, budget=budget, on=budget_on, z=z)) is not None:
            fallback_selection = await select_check(by_canonical[cmp.baseline].policy if cmp.baseline in by_canonical
                                                    else cmp.baseline)
        spent = session.spent
    choice = choose(finalists, prefix=prefix, budget=budget, on=budget_on, z=z,
                    fallback_selection=fallback_selection)
    if not finalists:
        notes.append(f"no candidate passed selection (lower bound at {confidence:g} over {tests} tests >= "
                     f"{budget:g})")
    cost = {"wall_s": round(time.perf_counter() - t0, 1), "requests": spent.requests,
            "prompt_tokens": spent.prompt_tokens,
            "loadtest_tokens": rounds * (len(policies) + 1) * (requests + 1) * max_tokens if measured else 0}
    if session.cache is not None:
        cost = cumulative_cost(session.cache, {"tasks": names, "splits": {s.name: s.ranges() for s in splits}}, cost)
    return SearchResult(model=model_id, num_layers=num_layers, tasks=names, budget=budget, budget_on=budget_on,
                        confidence=confidence, splits={s.name: s.ranges() for s in splits},
                        sources={s.name: s.screen.source for s in splits}, full=full, screened=screened,
                        selected=selected, finalists=finalists, speeds=speeds, sleb=order, full_loss=full_loss,
                        choice=choice, cost=cost, notes=notes, select_tests=tests)


def cumulative_cost(cache: ResultCache, key: dict[str, Any], cost: dict[str, float]) -> dict[str, float]:
    """This run's cost plus what every earlier run of the search on the same tasks and items spent (a ledger kept
    in the cache, one entry per run): `runs` and `total_*` beside this run's figures, so that a resumed run's report
    shows what the whole search cost, not only its own last step."""
    runs = [*(cache.load("search_cost", key) or []), cost]
    cache.save("search_cost", key, runs)
    return {**cost, "runs": len(runs), **{f"total_{k}": round(sum(r.get(k, 0) for r in runs), 1) for k in cost}}


def replace_speed(f: Finalist, speeds: dict[str, tuple[float | None, float | None]]) -> Finalist:
    tpot, up = speeds.get(f.canonical, (None, None))
    return Finalist(f.candidate, f.canonical, f.screen, f.selection, tpot, up, f.heldout)


def replace_heldout(f: Finalist, heldout: Comparison) -> Finalist:
    return Finalist(f.candidate, f.canonical, f.screen, f.selection, f.tpot_p50_ms, f.speedup, heldout)


async def cached_speed(session: EvalSession, url: str, policies: Sequence[str], *, rounds: int, concurrency: int,
                       requests: int, max_tokens: int, prompts: Sequence[str], model: str | None,
                       api_key: str | None, progress: Progress | None
                       ) -> tuple[dict[str, tuple[float | None, float | None]], bool]:
    """`measure_speed`, kept in the session's cache: a resumed search does not load-test again; and whether it
    measured now."""
    key = {"policies": list(policies), "rounds": rounds, "concurrency": concurrency, "requests": requests,
           "max_tokens": max_tokens, "prompts": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()}
    if session.cache is not None and (hit := session.cache.load("speed", key)) is not None:
        return {name: (t, s) for name, (t, s) in hit.items()}, False
    speeds = await measure_speed(url, policies, rounds=rounds, concurrency=concurrency, requests=requests,
                                 max_tokens=max_tokens, prompts=prompts, model=model, api_key=api_key,
                                 progress=progress)
    if session.cache is not None:
        session.cache.save("speed", key, {name: list(v) for name, v in speeds.items()})
    return speeds, True


# -- output ------------------------------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _acc(value: tuple[float | None, float | None]) -> str:
    acc, se = value
    return "-" if acc is None else f"{acc:.3f}" + ("" if se is None else f" ± {se:.3f}")


def presets_yaml(result: SearchResult) -> str:
    """name: "policy" per preset (the chosen one first, under the plain name); everything measured in comments, so
    that the file stays the plain mapping `painters serve --policy-presets` loads."""
    c = result.choice
    tasks = ", ".join(result.tasks)
    lines = [f"# painters search: the fastest policy keeping >= {result.budget:g} of {result.model}'s normalised "
             f"score ({'on each task' if result.budget_on == 'each' else 'on the mean over the tasks'}: {tasks})",
             f"# selection: lower {result.confidence:g} confidence bound over its {result.select_tests} tests "
             f"(z = {result.z:.2f} each, paired with full) >= the budget; items per "
             "task (screen/select/held-out): " + "; ".join(
                 f"{t} {'/'.join(f'{a}-{b}' for a, b in r.values())}" for t, r in result.splits.items()),
             "# held-out: the preset must match or beat the paper's policy of the closest measured speed-up there",
             "# the .report.md beside this file has every number"]
    outcome = {"winner": "OUTCOME: a searched policy that matches or beats the paper's equal-speed policy on held-out "
                         "items",
               "baseline": "OUTCOME: nothing the search found beats the paper's equal-speed policy on held-out items; "
                           "the preset is the paper's policy",
               "full": "OUTCOME: no policy kept the budget and held up on held-out items; the preset is the full "
                       "model"}[c.outcome]
    lines.append(f"# {outcome}")
    lines += [f"# note: {n}" for n in c.notes]
    by_policy = {f.candidate.policy: f for f in result.finalists}
    by_canonical = {f.canonical: f for f in result.finalists}
    for name, policy in c.presets.items():
        f = by_policy.get(policy) or by_canonical.get(policy)
        if f is not None and f.heldout is not None:
            d = f.heldout.mean_difference
            held = mean_estimate(list(f.heldout.finalist.values()))
            lines.append(f"# {name}: {f.candidate.family}, {f.candidate.describe()}, speed-up "
                         f"{_num(f.speedup, '.2f')}x; selection bound {_num(f.selection.bound, '.3f')}; held-out mean "
                         f"{_pm(held, '.3f')}, vs `{f.heldout.baseline}` ({_num(f.heldout.baseline_speedup, '.2f')}x) "
                         f"{_pm(d)}")
        elif policy != FULL:
            tpot, up = result.speeds.get(policy, (None, None))
            lines.append(f"# {name}: the paper's policy, speed-up {_num(up, '.2f')}x")
        lines.append(f"{name}: {json.dumps(policy)}")
    return "\n".join(lines) + "\n"


def report_markdown(result: SearchResult, *, command: str | None = None) -> str:
    tasks = result.tasks
    lines = [f"# Search: {', '.join(tasks)}, budget {result.budget:g} "
             f"({'each task' if result.budget_on == 'each' else 'mean over tasks'}), {result.model}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    c = result.choice
    lines += [f"**Preset: `{next(iter(c.presets.values()))}`** ({c.outcome}). " + "".join(
        f"{n[0].upper()}{n[1:]}. " for n in c.notes).rstrip(), ""]
    lines += ["Items (file order, disjoint): " + "; ".join(
        f"{t}: screen {r['screen'][0]}-{r['screen'][1]}, select {r['select'][0]}-{r['select'][1]}, held-out "
        f"{r['heldout'][0]}-{r['heldout'][1]} of `{result.sources[t]}`" for t, r in result.splits.items()) + ".", ""]
    res = result.resolution()
    lines += ["## Resolution", "",
              f"Selection passes when estimate - {result.z:.2f} x stderr clears {result.budget:g}: one-sided "
              f"{result.confidence:g} over its {result.select_tests} tests together (Bonferroni). One item on the "
              "normalised scale:", "",
              "| task | full acc (select) | random | select items | one item | median margin z·SE | held-out items | "
              "one item |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in tasks:
        f, r = result.full["select"][t], res[t]
        lines.append(f"| {t} | {_acc((f.accuracy, f.stderr))} | {f.random_baseline:.3f} | {r['select_items']} | "
                     f"{_num(r['select_item'], '.3f')} | {_num(r['select_margin'], '.3f')} | {r['heldout_items']} | "
                     f"{_num(r['heldout_item'], '.3f')} |")
    lines += ["", "## Held-out: full, finalists, and the paper's policy of the closest measured speed-up", "",
              "Accuracy ± stderr (normalised score in brackets); difference = finalist - baseline in normalised score, "
              "paired over the same items.", "",
              "| policy | family | speed-up | " + " | ".join(tasks) + " | mean normalised | vs baseline |",
              "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " | --- | --- |"]
    fullh = result.full["heldout"]
    lines.append("| `full` | | 1.00x | " + " | ".join(_acc((fullh[t].accuracy, fullh[t].stderr)) for t in tasks)
                 + " | 1.000 | |")
    shown: set[str] = set()
    for f in result.finalists:
        h = f.heldout
        if h is None:
            lines.append(f"| `{f.candidate.policy}` | {f.candidate.family} | {_num(f.speedup, '.2f')}x | "
                         + " | ".join("not scored" for _ in tasks) + " | | |")
            continue
        cells = [f"{_acc(h.accuracy[t])} ({_num(h.finalist[t].value, '.2f')})" for t in tasks]
        lines.append(f"| `{f.candidate.policy}` | {f.candidate.family} | {_num(f.speedup, '.2f')}x | "
                     + " | ".join(cells) + f" | {_pm(mean_estimate(list(h.finalist.values())), '.3f')} | "
                     + ("itself" if h.baseline == f.canonical else
                        f"{_pm(h.mean_difference)} vs `{h.baseline}`") + " |")
        if h.baseline != f.canonical and h.baseline not in shown:
            shown.add(h.baseline)
            cells = [f"{_acc(h.base_accuracy[t])} ({_num(h.base[t].value, '.2f')})" for t in tasks]
            lines.append(f"| `{h.baseline}` | baseline | {_num(h.baseline_speedup, '.2f')}x | " + " | ".join(cells)
                         + f" | {_pm(mean_estimate(list(h.base.values())), '.3f')} | |")
    lines += ["", "Per task, finalist - baseline (normalised, paired): "]
    for f in result.finalists:
        if f.heldout is not None and f.heldout.baseline != f.canonical:
            lines.append(f"- `{f.candidate.policy}` vs `{f.heldout.baseline}`: " + ", ".join(
                f"{t} {_pm(f.heldout.difference[t])}" for t in tasks))
    lines += ["", "## Finalists (fastest first): screening and selection", "",
              "| policy | family | screen (gold prob., mean) | selection (accuracy, mean) | selection bound | speed-up "
              "| TPOT p50 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in result.finalists:
        lines.append(f"| `{f.candidate.policy}` | {f.candidate.family} | {_pm(f.screen.mean, '.3f')} | "
                     f"{_pm(f.selection.mean, '.3f')} | {_num(f.selection.bound, '.3f')} | {_num(f.speedup, '.2f')}x | "
                     f"{_num(f.tpot_p50_ms, '.1f')} ms |")
    lines += ["", f"Load tests: `full` TPOT p50 {_num(result.speeds.get(FULL, (None, None))[0], '.1f')} ms; "
              "measured speed-ups: " + ", ".join(f"`{p}` {_num(s, '.2f')}x" for p, (_, s) in result.speeds.items()
                                               if p != FULL) + "."]
    lines += ["", "## Candidates", "", "Screening: normalised probability of the gold answers (point estimate, mean "
              "over tasks; passes against the budget " + ("on every task" if result.budget_on == "each" else
                                                         "on the mean") + "). Selection: normalised accuracy.", "",
              "| family | policy | screen | passed | selection | bound | passed |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    sel = {s.candidate.policy: s.check for s in result.selected}
    for s in result.screened:
        k = sel.get(s.candidate.policy)
        lines.append(f"| {s.candidate.family} | `{s.candidate.policy}` | {_num(s.check.mean.value, '.3f')} | "
                     f"{'yes' if s.passed else 'no'} | {_num(k.mean.value, '.3f') if k else ''} | "
                     f"{_num(k.bound, '.3f') if k else ''} | {('yes' if k.passed else 'no') if k else ''} |")
    if result.sleb:
        lines += ["", f"SLEB's greedy order (mean NLL per gold token; full model {_num(result.full_loss, '.4f')}): "
                  + ", ".join(f"{layer} ({loss:.4f})" for layer, loss in result.sleb)]
    cost = result.cost
    lines += ["", f"Cost of this run: {cost.get('wall_s', 0):.0f} s wall, {int(cost.get('requests', 0))} scoring "
              f"requests with {int(cost.get('prompt_tokens', 0)):,} prompt tokens (results from the cache cost none), "
              f"about {int(cost.get('loadtest_tokens', 0)):,} tokens generated in load tests."]
    if cost.get("runs", 1) > 1:
        lines[-1] += (f" All {int(cost['runs'])} runs of this search on these items (the cache's ledger): "
                      f"{cost.get('total_wall_s', 0):.0f} s wall, {int(cost.get('total_requests', 0))} scoring requests "
                      f"with {int(cost.get('total_prompt_tokens', 0)):,} prompt tokens, about "
                      f"{int(cost.get('total_loadtest_tokens', 0)):,} tokens generated in load tests.")
    lines += ["", *(f"- {n}" for n in result.notes)]
    return "\n".join(lines).rstrip() + "\n"


def report_paths(out: Path) -> tuple[Path, Path]:
    stem = out.with_suffix("")
    return stem.with_name(stem.name + ".report.json"), stem.with_name(stem.name + ".report.md")


def write_outputs(result: SearchResult, out: Path, *, command: str | None = None) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(presets_yaml(result))
    json_path, md_path = report_paths(out)
    json_path.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    md_path.write_text(report_markdown(result, command=command))
    return [out, json_path, md_path]


# -- `painters search` -------------------------------------------------------------------------------------------


def load_splits(names: Sequence[str], *, data: Path | None, data_dir: Path | None, screen: int, select: int,
                heldout: int) -> list[Splits]:
    if data is not None and data.is_file() and len(names) > 1:
        raise DataError(f"--data {data} is one file but {len(names)} tasks were asked for; give a directory laid out "
                        f"like ../shared/data (--data-dir)")
    out = []
    for name in names:
        task = load_task(name, path=data if data is not None and data.is_file() else None,
                         data_dir=data_dir, limit=screen + select + heldout)
        if task.spec.kind not in ("multiple_choice", "cloze"):
            raise DataError(f"{name} has no per-item gold answer to screen on; the search takes multiple-choice and "
                            f"cloze tasks (arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, "
                            f"lambada_openai)")
        out.append(split_task(task, screen=screen, select=select, heldout=heldout))
    return out


def search_command(
    ctx: typer.Context,
    tasks: Annotated[str, typer.Option("--tasks", "--task", "-t", help="comma-separated tasks to keep: arc_easy, "
                                       "arc_challenge, hellaswag, piqa, winogrande, boolq, lambada_openai")
                     ] = ",".join(DEFAULT_TASKS),
    out: Annotated[Path, typer.Option(help="the preset file to write (YAML); a .report.json and .report.md go "
                                      "beside it")] = Path("presets.yaml"),
    url: Annotated[str, typer.Option(help="the server's base URL")] = "http://127.0.0.1:8000",
    data: Annotated[Path | None, typer.Option(help="the task's data file (one task), or a directory laid out like "
                                              "../shared/data")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="directory laid out like ../shared/data (default: --data if a "
                                                  "directory)")] = None,
    budget: Annotated[float, typer.Option(help="the normalised score to keep (0 = random, 1 = full model)")] = 0.9,
    budget_on: Annotated[str, typer.Option(help="'each': every task keeps the budget; 'mean': their mean does")
                         ] = "each",
    confidence: Annotated[float, typer.Option(help="one-sided level of the selection's lower bounds, over all its "
                                              "tests together (Bonferroni: 0.9 over 9 tests is estimate - 2.29 "
                                              "stderr each)")] = 0.9,
    screen: Annotated[int, typer.Option(help="screening items per task (the first N)", min=1)] = 50,
    select_items: Annotated[int, typer.Option("--select", help="selection items per task (the next N)", min=2)
                            ] = 200,
    heldout: Annotated[int, typer.Option(help="held-out items per task (the next N) for the check against the "
                                         "paper's policies", min=2)] = 200,
    families: Annotated[str, typer.Option(help="searched families (the paper's centred skip, pairs and parallel "
                                          "are always scored)")] = ",".join(f for f in FAMILIES
                                                                             if f not in BASELINE_FAMILIES),
    most: Annotated[int | None, typer.Option(help="layers a candidate may change at most (default: half)", min=1)
                    ] = None,
    patience: Annotated[int, typer.Option(help="stop screening a family after this many misses in a row", min=1)] = 2,
    tries: Annotated[int, typer.Option(help="selection: a family's most aggressive screened candidates tried", min=1)
                     ] = 2,
    report_finalists: Annotated[int, typer.Option(help="held-out: finalists scored, fastest first (0 = all; the "
                                                  "fastest baseline finalist always)", min=0)] = 0,
    calibration: Annotated[int, typer.Option(help="SLEB: screening items per task whose gold answers make the loss",
                                             min=1)] = 4,
    sleb_steps: Annotated[int | None, typer.Option(help="SLEB: layers removed greedily (default: a quarter)", min=0)
                          ] = None,
    name: Annotated[str | None, typer.Option(help="preset name (default: TASK-BUDGET%, e.g. arc_easy-90, or "
                                             "search-90 for several tasks)")] = None,
    cache: Annotated[Path | None, typer.Option(help="keep every score and load test here and reuse it: a rerun "
                                               "resumes")] = None,
    requests: Annotated[int, typer.Option(help="loadtest: measured requests per policy", min=1)] = 8,
    concurrency: Annotated[int, typer.Option(help="loadtest: requests in flight", min=1)] = 4,
    max_tokens: Annotated[int, typer.Option(help="loadtest: new tokens per request", min=1)] = 32,
    rounds: Annotated[int, typer.Option(help="loadtest rounds (full and every policy each round); the median "
                                        "speed-up counts", min=1)] = 3,
    prompts: Annotated[Path | None, typer.Option(
        help="loadtest: JSONL with a \"prompt\" field, or one prompt per line (default: 20 built-in prompts)",
        exists=True, dir_okay=False)] = None,
    eval_concurrency: Annotated[int, typer.Option(help="scoring requests in flight", min=1)] = 16,
    model: Annotated[str | None, typer.Option("--model", "-m", help="model name in the request body")] = None,
    api_key: Annotated[str | None, typer.Option(help="sent as 'Authorization: Bearer KEY'")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report's object instead of the table")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """The fastest policy whose normalised score keeps the budget with confidence on every task (or their mean),
    checked on held-out items against the paper's centred policies of the same measured speed; writes a preset
    file and its report."""
    quiet_http_logs(verbose=verbose)
    if name is not None and (":" in name or "@" in name):
        raise fail(f"--name {name!r} may not contain ':' or '@' (the server's preset names)")
    if budget_on not in ("each", "mean"):
        raise fail(f"--budget-on {budget_on!r}: give 'each' (every task keeps the budget) or 'mean'")
    if data_dir is None and data is not None and data.is_dir():
        data_dir = data
    chosen_families = [f.strip() for f in families.split(",") if f.strip()]
    try:
        names = task_names(tasks)
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise DataError(f"unknown task {', '.join(unknown)}; known: {', '.join(TASKS)}")
        splits = load_splits(names, data=data, data_dir=data_dir, screen=screen, select=select_items,
                             heldout=heldout)
        with progress_bar() as bars:
            result = asyncio.run(run_search(
                url, splits, budget=budget, budget_on=budget_on, confidence=confidence,  # type: ignore[arg-type]
                families=[*chosen_families, *BASELINE_FAMILIES], prefix=name, most=most, patience=patience,
                tries=tries, calibration=calibration, sleb_steps=sleb_steps, report_finalists=report_finalists,
                requests=requests, concurrency=concurrency, max_tokens=max_tokens, rounds=rounds,
                eval_concurrency=eval_concurrency, prompts=load_prompts(prompts) if prompts else BUILTIN_PROMPTS,
                cache_dir=cache, model=model, api_key=api_key, progress=bars))
        paths = write_outputs(result, out, command=command_line(ctx))
    except (DataError, EvalError, SearchError, LoadtestError, PaintersError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    except httpx.HTTPError as e:
        raise fail(f"{url}: {type(e).__name__}: {e}") from None
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    print_result(result)
    console.print("wrote " + ", ".join(map(str, paths)), markup=False, highlight=False, soft_wrap=True)


def print_result(result: SearchResult) -> None:
    res = result.resolution()
    t = TextTable([Column("task"), Column("select items", "right"), Column("one item", "right"),
                   Column("bound margin", "right"), Column("held-out items", "right"), Column("one item ", "right")],
                  title=f"resolution: selection bound at {result.confidence:g} over {result.select_tests} tests "
                        f"(z = {result.z:.2f} each), normalised scale")
    for task, r in res.items():
        t.add_row(task, str(r["select_items"]), _num(r["select_item"], ".3f"), _num(r["select_margin"], ".3f"),
                  str(r["heldout_items"]), _num(r["heldout_item"], ".3f"))
    t.print(console)
    t = TextTable([Column("policy", keep_whole=True), Column("family"), Column("speed-up", "right"),
                   Column("select bound", "right"), Column("held-out", "right"), Column("baseline", keep_whole=True),
                   Column("difference", "right")],
                  title=f"finalists, fastest first (budget {result.budget:g} on "
                        f"{'each task' if result.budget_on == 'each' else 'the mean'})")
    for f in result.finalists:
        h = f.heldout
        t.add_row(f.candidate.policy, f.candidate.family, _num(f.speedup, ".2f") + "x",
                  _num(f.selection.bound, ".3f"),
                  "-" if h is None else _pm(mean_estimate(list(h.finalist.values())), ".3f"),
                  "-" if h is None else h.baseline, "-" if h is None else _pm(h.mean_difference))
    t.print(console)
    for name, policy in result.choice.presets.items():
        console.print(f"preset {name}: {policy} ({result.choice.outcome})", markup=False, highlight=False)
    for note in [*result.choice.notes, *result.notes]:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    c = result.cost
    console.print(f"cost: {c.get('wall_s', 0):.0f} s wall, {int(c.get('requests', 0))} scoring requests, "
                  f"{int(c.get('prompt_tokens', 0)):,} prompt tokens", markup=False, highlight=False)
    if c.get("runs", 1) > 1:
        console.print(f"all {int(c['runs'])} runs of this search: {c.get('total_wall_s', 0):.0f} s wall, "
                      f"{int(c.get('total_requests', 0))} scoring requests, {int(c.get('total_prompt_tokens', 0)):,} "
                      "prompt tokens", markup=False, highlight=False)
