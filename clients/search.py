"""`painters search`: the fastest layer policy that keeps a stated share of the full model's score on a task.

1. The full model is scored on the search items (the first `limit` of the task) and probed over their texts.
2. Candidates come in families, each ordered from mild to aggressive: skip the k steps of lowest block influence
   (ShortGPT); skip the n consecutive layers whose input and output are closest in angular distance (Gromov et al.);
   run pairs, or one group, of the most alike consecutive layers in parallel; and skip the first k layers of a greedy
   removal order in the manner of SLEB (remove the layer whose removal raises the loglikelihood loss of the gold
   answers least, repeat). Policies are explicit (`skip:a,b,c`, `schedule:...`), so a preset means the same layers on
   any server of this model. The first and last layers are never candidates.
3. Each family is scored until it fails the budget `patience` times in a row; a candidate passes when its normalised
   score (0 = random, 1 = full) on the search items is at least the budget.
4. The most aggressive passing candidate of each family is a finalist; each is load-tested (`clients/loadtest.py`)
   beside `full`, and the fastest by measured TPOT p50 wins. Nothing about speed is modelled.
5. The presets are written as YAML that `painters serve --policy-presets` loads (name: policy, the numbers in comments),
   with a report (`.report.json`, `.report.md`) scoring every finalist on held-out items of the task and on other tasks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

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
    err,
    fail,
    progress_bar,
    quiet_http_logs,
)
from clients.evaluate import FULL, EvalError, EvalSession, normalized_score
from clients.loadtest import BUILTIN_PROMPTS, LoadtestError, load_prompts, run_loadtest
from clients.probe import Probe, ProbeError, run_probe, task_texts
from clients.tasks import (
    Cloze,
    DataError,
    Document,
    Generation,
    Item,
    MultipleChoice,
    Task,
    TASKS,
    find_in_dir,
    load_task,
)

log = logging.getLogger(__name__)

REPORT_TASKS = ("lambada_openai", "hellaswag", "arc_easy", "piqa")


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

    def describe(self) -> str:
        verb = "parallel" if self.family.startswith("parallel") else "skip"
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


# -- the search --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    accuracy: float | None
    normalized: float | None
    passed: bool


@dataclass(frozen=True)
class Finalist:
    name: str  # the preset's name
    candidate: Candidate
    normalized: float  # on the search items
    canonical: str
    tpot_p50_ms: float | None = None
    speedup: float | None = None  # full's TPOT p50 / this one's
    report: dict[str, float | None] = field(default_factory=dict)  # "task (held-out)" or task -> normalised score


@dataclass
class SearchResult:
    task: str
    budget: float
    model: str
    num_layers: int
    full_accuracy: float
    random_baseline: float
    search_items: int
    source: str
    scored: list[Scored]
    finalists: list[Finalist]  # fastest first
    sleb: list[tuple[int, float]]
    full_loss: float | None
    full_tpot_p50_ms: float | None = None
    report_tasks: dict[str, int] = field(default_factory=dict)  # task -> items scored in the report
    notes: list[str] = field(default_factory=list)

    @property
    def winner(self) -> Finalist | None:
        return self.finalists[0] if self.finalists else None

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task, "budget": self.budget, "model": self.model, "num_layers": self.num_layers,
            "data": self.source, "search_items": f"0-{self.search_items - 1}",
            "full": {"accuracy": self.full_accuracy, "random_baseline": self.random_baseline,
                     "tpot_p50_ms": self.full_tpot_p50_ms, "gold_loss": self.full_loss},
            "presets": {f.name: {"policy": f.candidate.policy, "canonical": f.canonical, "family": f.candidate.family,
                                 "normalized": f.normalized, "tpot_p50_ms": f.tpot_p50_ms, "speedup": f.speedup,
                                 "report": f.report} for f in self.finalists},
            "report_items": self.report_tasks,
            "sleb_order": [{"layer": layer, "loss": loss} for layer, loss in self.sleb],
            "candidates": [{**asdict(s.candidate), "accuracy": s.accuracy, "normalized": s.normalized,
                            "passed": s.passed} for s in self.scored],
            "notes": self.notes,
        }


Score = tuple[float | None, float | None]  # (accuracy, normalised score)


async def scan(families: dict[str, list[Candidate]], score: Callable[[str], Awaitable[Score]], *,
               budget: float, patience: int) -> list[Scored]:
    """Each family mild to aggressive, until `patience` candidates in a row miss the budget; a policy is scored once."""
    memo: dict[str, Score] = {}
    out: list[Scored] = []
    for candidates in families.values():
        misses = 0
        for c in candidates:
            if c.policy not in memo:
                memo[c.policy] = await score(c.policy)
            acc, norm = memo[c.policy]
            passed = norm is not None and norm >= budget
            out.append(Scored(c, acc, norm, passed))
            misses = 0 if passed else misses + 1
            if misses >= patience:
                break
    return out


def finalists_of(scored: Sequence[Scored]) -> list[Scored]:
    """Per family, the passing candidate that changes the most layers (the first such on ties); one per policy."""
    best: dict[str, Scored] = {}
    for s in scored:
        if s.passed and (s.candidate.family not in best or s.candidate.size > best[s.candidate.family].candidate.size):
            best[s.candidate.family] = s
    unique: dict[str, Scored] = {}
    for s in best.values():
        unique.setdefault(s.candidate.policy, s)
    return list(unique.values())


def slug(family: str) -> str:
    return family.lower().replace(" ", "-")


def preset_name(prefix: str, family: str | None = None) -> str:
    name = prefix if family is None else f"{prefix}-{slug(family)}"
    assert ":" not in name and "@" not in name
    return name


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


async def run_search(url: str, search: Task, *, budget: float, heldout: Task | None = None,
                     others: Sequence[Task] = (), prefix: str | None = None, calibration: int = 16,
                     sleb_steps: int | None = None, patience: int = 2, most: int | None = None,
                     requests: int = 8, concurrency: int = 4, max_tokens: int = 32, rounds: int = 3,
                     eval_concurrency: int = 16,
                     prompts: Sequence[str] = BUILTIN_PROMPTS, cache_dir: Path | None = None,
                     model: str | None = None, api_key: str | None = None, progress: Progress | None = None
                     ) -> SearchResult:
    if not 0 < budget <= 1.5:
        raise ValueError(f"budget is a share of the full model's normalised score, e.g. 0.9; got {budget}")
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
        full = await session.score(FULL, search, progress=progress)
        if full.accuracy is None or normalized_score(full.accuracy, full.accuracy, full.random_baseline) is None:
            raise SearchError(f"the full model scores {full.accuracy} on the {len(search.items)} search items of "
                              f"{search.name}, its random baseline {full.random_baseline:.3f}: nothing to keep; "
                              f"use more items (--limit) or a task with an accuracy")

        # candidates from the probe
        families: dict[str, list[Candidate]] = {}
        try:
            probe = await run_probe(url, task_texts(search)[:64], policy=FULL, model=model, api_key=api_key)
        except ProbeError as e:
            probe = None
            notes.append(f"no probe candidates: {e}")
            log.warning("no probe candidates: %s", e)
        if probe is not None:
            families["block influence"] = block_influence_family(probe, num_layers, most=most)
            families["angular distance"] = angular_family(probe, num_layers, most=most)
            families["parallel pairs"] = parallel_pairs_family(probe, num_layers, most=max(1, most // 2))
            families["parallel group"] = parallel_group_family(probe, num_layers, most=most)
        # SLEB's greedy order on the gold answers of the first `calibration` search items
        pairs = [gold_pair(item) for item in search.items[:calibration]]
        full_loss = await gold_loss(session, FULL, pairs)
        steps = sleb_steps if sleb_steps is not None else max(1, num_layers // 4)
        sleb_bar = phase("search: SLEB greedy removal", steps)
        order = await sleb_order(lambda layers: gold_loss(session, skip_policy(layers), pairs),
                                 list(inner(num_layers)), steps=steps, on_step=lambda: tick(sleb_bar))
        families["SLEB"] = sleb_family([layer for layer, _ in order])
        # score the families against the budget
        scan_bar = phase("search: candidates scored")

        async def score(policy: str) -> Score:
            r = await session.score(policy, search, progress=progress)
            tick(scan_bar)
            return r.accuracy, normalized_score(r.accuracy, full.accuracy, full.random_baseline)

        scored = await scan(families, score, budget=budget, patience=patience)
        chosen = finalists_of(scored)
        prefix = prefix or f"{search.name}-{round(budget * 100)}"
        finalists = [Finalist(preset_name(prefix, s.candidate.family), s.candidate,
                              s.normalized,  # type: ignore[arg-type]  (a passing candidate has a score)
                              await session.canonical(s.candidate.policy)) for s in chosen]
    if not finalists:
        notes.append(f"no candidate kept {budget:g} of the full model's score; the preset file holds `full`")
    speeds = await measure_speed(url, [f.candidate.policy for f in finalists], rounds=rounds,
                                 concurrency=concurrency, requests=requests, max_tokens=max_tokens, prompts=prompts,
                                 model=model, api_key=api_key, progress=progress)
    full_tpot = speeds[FULL][0]
    timed = [Finalist(f.name, f.candidate, f.normalized, f.canonical, *speeds.get(f.canonical, (None, None)))
             for f in finalists]
    timed.sort(key=lambda f: -(f.speedup or 0.0))
    if timed:  # the fastest takes the plain name
        w = timed[0]
        timed[0] = Finalist(preset_name(prefix), w.candidate, w.normalized, w.canonical, w.tpot_p50_ms, w.speedup)
    result = SearchResult(task=search.name, budget=budget, model=model_id, num_layers=num_layers,
                          full_accuracy=full.accuracy, random_baseline=full.random_baseline,
                          search_items=len(search.items), source=search.source, scored=scored, finalists=timed,
                          sleb=order, full_loss=full_loss,
                          full_tpot_p50_ms=full_tpot, notes=notes)
    return await report(url, result, heldout=heldout, others=others, eval_concurrency=eval_concurrency, model=model,
                        api_key=api_key, cache_dir=cache_dir, progress=progress)


async def report(url: str, result: SearchResult, *, heldout: Task | None, others: Sequence[Task],
                 eval_concurrency: int = 16, model: str | None = None, api_key: str | None = None,
                 cache_dir: Path | None = None, progress: Progress | None = None) -> SearchResult:
    """Does each preset generalise? Its normalised score on held-out items of the task and on other tasks."""
    tasks = ([(f"{result.task} (held-out)", heldout)] if heldout is not None else []) + [(t.name, t) for t in others]
    if not tasks or not result.finalists:
        return result
    async with EvalSession.open(url, concurrency=eval_concurrency, model=model, api_key=api_key,
                                cache_dir=cache_dir) as session:
        full = {label: await session.score(FULL, t, progress=progress) for label, t in tasks}
        finalists = []
        for f in result.finalists:
            scores: dict[str, float | None] = {}
            for label, t in tasks:
                r = await session.score(f.candidate.policy, t, progress=progress)
                scores[label] = normalized_score(r.accuracy, full[label].accuracy, full[label].random_baseline)
            finalists.append(Finalist(f.name, f.candidate, f.normalized, f.canonical, f.tpot_p50_ms, f.speedup,
                                      scores))
    result.finalists = finalists
    result.report_tasks = {label: len(t.items) for label, t in tasks}
    return result


# -- output ------------------------------------------------------------------------------------------------------


def presets_yaml(result: SearchResult) -> str:
    """name: "policy" per finalist (fastest first); everything measured about it in comments, so that the file stays
    the plain mapping `painters serve --policy-presets` loads."""
    lines = [f"# painters search: the fastest policies keeping >= {result.budget:g} of {result.model}'s normalised "
             f"score on {result.task}",
             f"# search items 0-{result.search_items - 1} of {result.source}; full model accuracy "
             f"{result.full_accuracy:.4f} (random {result.random_baseline:.3f}), TPOT p50 "
             f"{_num(result.full_tpot_p50_ms, '.1f')} ms",
             "# score = normalised score on the search items (0 = random, 1 = full); speed-up = full TPOT p50 / this",
             "# report (held-out items, other tasks): the .report.md beside this file"]
    if not result.finalists:
        lines += ["# no candidate kept the budget: the only preset is the full model",
                  f"{preset_name(f'{result.task}-{round(result.budget * 100)}')}: \"full\""]
    for f in result.finalists:
        lines.append(f"# {f.name}: {f.candidate.family}, {f.candidate.describe()}, score {f.normalized:.3f}, "
                     f"speed-up {_num(f.speedup, '.2f')}x (TPOT p50 {_num(f.tpot_p50_ms, '.1f')} ms)")
        lines.append(f"{f.name}: {json.dumps(f.candidate.policy)}")
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def report_markdown(result: SearchResult, *, command: str | None = None) -> str:
    lines = [f"# Search: {result.task}, budget {result.budget:g}, {result.model}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [f"Search items 0-{result.search_items - 1} of `{result.source}`: the full model scores "
              f"{result.full_accuracy:.4f} (random {result.random_baseline:.3f}). Speed: each finalist load-tested "
              f"beside `full` (TPOT p50 {_num(result.full_tpot_p50_ms, '.1f')} ms).", ""]
    labels = list(result.report_tasks)
    lines += ["## Presets (fastest first)", "",
              "| preset | policy | family | score (search) | speed-up | " + " | ".join(
                  f"{label} ({result.report_tasks[label]} items)" for label in labels) + " |",
              "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in labels) + " |"]
    for f in result.finalists:
        lines.append(f"| {f.name} | `{f.candidate.policy}` | {f.candidate.family} | {f.normalized:.3f} | "
                     f"{_num(f.speedup, '.2f')}x | " + " | ".join(_num(f.report.get(label), '.3f') for label in labels)
                     + " |")
    if not result.finalists:
        lines.append("| (none passed) | `full` | | 1.000 | 1.00x | " + " | ".join("" for _ in labels) + " |")
    lines += ["", "Scores are normalised against the full model on the same items (0 = random, 1 = full).", "",
              "## Candidates scored", "", "| family | policy | score | passed |", "| --- | --- | --- | --- |"]
    lines += [f"| {s.candidate.family} | `{s.candidate.policy}` | {_num(s.normalized, '.3f')} | "
              f"{'yes' if s.passed else 'no'} |" for s in result.scored]
    if result.sleb:
        lines += ["", f"SLEB's greedy order (mean NLL per gold token; full model {_num(result.full_loss, '.4f')}): "
                  + ", ".join(f"{layer} ({loss:.4f})" for layer, loss in result.sleb)]
    lines += [f"", *(f"- {n}" for n in result.notes)]
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


def split_items(task: Task, first: int) -> tuple[Task, Task | None]:
    """The first `first` items, and the rest (None when there is none)."""
    head = Task(task.spec, task.items[:first], task.source)
    rest = task.items[first:]
    return head, Task(task.spec, rest, task.source) if rest else None


def other_tasks(names: Sequence[str], *, data_dir: Path | None, limit: int) -> tuple[list[Task], list[str]]:
    """The report's other tasks that have data; and a note for each that has none."""
    tasks, missing = [], []
    for name in names:
        try:
            if data_dir is not None and find_in_dir(TASKS[name], data_dir) is None:
                raise DataError(f"no file for {name} in {data_dir}")
            tasks.append(load_task(name, data_dir=data_dir, limit=limit))
        except DataError as e:
            missing.append(f"report task {name} left out: {e}")
    return tasks, missing


def search_command(
    ctx: typer.Context,
    task: Annotated[str, typer.Option("--task", "-t", help="the task to keep: lambada_openai, hellaswag, arc_easy, "
                                      "arc_challenge, piqa, winogrande, boolq, gsm8k")],
    out: Annotated[Path, typer.Option(help="the preset file to write (YAML); a .report.json and .report.md go "
                                      "beside it")] = Path("presets.yaml"),
    url: Annotated[str, typer.Option(help="the server's base URL")] = "http://127.0.0.1:8000",
    data: Annotated[Path | None, typer.Option(help="the task's data file, or a directory laid out like "
                                              "../shared/data")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="where the report's other tasks are (default: --data if a "
                                                  "directory, else two levels above it, as in ../shared/data)")] = None,
    budget: Annotated[float, typer.Option(help="the normalised score to keep (0 = random, 1 = full model)")] = 0.9,
    limit: Annotated[int, typer.Option(help="search items: the first N of the task", min=2)] = 100,
    heldout: Annotated[int | None, typer.Option(help="held-out items after them for the report (default: as many)",
                                                min=0)] = None,
    report_tasks: Annotated[str, typer.Option(help="other tasks the report scores each preset on")] = ",".join(
        REPORT_TASKS),
    report_limit: Annotated[int | None, typer.Option(help="items per other task (default: --limit)", min=1)] = None,
    calibration: Annotated[int, typer.Option(help="SLEB: search items whose gold answers make the loss", min=1)] = 16,
    sleb_steps: Annotated[int | None, typer.Option(help="SLEB: layers removed greedily (default: a quarter)", min=0)
                          ] = None,
    patience: Annotated[int, typer.Option(help="stop a family after this many misses in a row", min=1)] = 2,
    name: Annotated[str | None, typer.Option(help="preset name (default: TASK-BUDGET%, e.g. arc_easy-90)")] = None,
    cache: Annotated[Path | None, typer.Option(help="keep every score here and reuse it: an interrupted search "
                                               "resumes")] = None,
    requests: Annotated[int, typer.Option(help="loadtest: measured requests per finalist", min=1)] = 8,
    concurrency: Annotated[int, typer.Option(help="loadtest: requests in flight", min=1)] = 4,
    max_tokens: Annotated[int, typer.Option(help="loadtest: new tokens per request", min=1)] = 32,
    rounds: Annotated[int, typer.Option(help="loadtest rounds (full and every finalist each round); the median "
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
    """The fastest policy whose normalised score on the task's search items stays >= the budget: candidates from
    the probe and from a SLEB-style greedy removal, speed measured by a load test; writes a preset file."""
    quiet_http_logs(verbose=verbose)
    if name is not None and (":" in name or "@" in name):
        raise fail(f"--name {name!r} may not contain ':' or '@' (the server's preset names)")
    heldout = limit if heldout is None else heldout
    if data_dir is None and data is not None:  # ../shared/data/arc/x.jsonl -> ../shared/data
        data_dir = data if data.is_dir() else data.resolve().parent.parent
    try:
        whole = load_task(task, path=data, data_dir=data_dir, limit=limit + heldout)
        search, rest = split_items(whole, limit)
        if rest is None and heldout:
            err.print(f"[yellow]{whole.source} has no items after the first {limit}: no held-out report[/]")
        names = [t for t in (x.strip() for x in report_tasks.split(",")) if t and t != task]
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise DataError(f"unknown report task {', '.join(unknown)}; known: {', '.join(TASKS)}")
        others, missing = other_tasks(names, data_dir=data_dir, limit=report_limit or limit)
        with progress_bar() as bars:
            result = asyncio.run(run_search(
                url, search, budget=budget, heldout=rest, others=others, prefix=name, calibration=calibration,
                sleb_steps=sleb_steps, patience=patience, requests=requests, concurrency=concurrency,
                max_tokens=max_tokens, rounds=rounds, eval_concurrency=eval_concurrency,
                prompts=load_prompts(prompts) if prompts else BUILTIN_PROMPTS, cache_dir=cache, model=model,
                api_key=api_key, progress=bars))
        result.notes += missing
        command = command_line(ctx)
        paths = write_outputs(result, out, command=command)
    except (DataError, EvalError, SearchError, LoadtestError, PaintersError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    except httpx.HTTPError as e:
        raise fail(f"{url}: {type(e).__name__}: {e}") from None
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    labels = list(result.report_tasks)
    t = TextTable([Column("preset", keep_whole=True), Column("policy", keep_whole=True), Column("family"),
                   Column("score", "right"), Column("speed-up", "right"),
                   *(Column(label, "right") for label in labels)],
                  title=f"{result.task}: policies keeping >= {budget:g} of the full model (fastest first)")
    for f in result.finalists:
        t.add_row(f.name, f.candidate.policy, f.candidate.family, f"{f.normalized:.3f}", _num(f.speedup, ".2f") + "x",
                  *(_num(f.report.get(label), ".3f") for label in labels))
    t.print(console)
    for note in result.notes:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(map(str, paths)), markup=False, highlight=False, soft_wrap=True)
