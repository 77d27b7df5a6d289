"""`painters probe`: how alike the hidden states entering a schedule's steps are, over a task's texts.

The server's POST /v1/probe reduces one batch (at most 64 prompts) to statistics; this module sends a task's texts in
batches, combines the batches' statistics (similarity and angular distance weighted by sequences, block influence by
tokens, as each was averaged), ranks what looks removable, and draws the paper's heatmap. Step i's input state is
x_i; x_S is the output of the last step. A step's block influence is BI_i = 1 - cos(x_i, x_{i+1}); a block of n
steps starting at i is as removable as its angular distance d(x_i, x_{i+n}) is small (Gromov et al.).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.progress import Progress

from clients.client import AsyncPaintersClient, PaintersError, Policy
from clients.console import Column, TextTable, VerboseOpt, command_line, console, fail, progress_bar, quiet_http_logs
from clients.tasks import Cloze, DataError, Document, Generation, MultipleChoice, Task, load_task
from clients.types import ProbeResponse

log = logging.getLogger(__name__)

MAX_PROMPTS = 64  # the endpoint's limit per request


class ProbeError(RuntimeError):
    """The probe cannot run (no endpoint, server unreachable, a policy rejected); the message says what to do."""


@dataclass(frozen=True)
class Block:
    """Steps start .. start + n - 1, judged by the angular distance between the states before and after them."""

    start: int
    n: int
    distance: float
    label: str  # "12-15" (step labels of the first and last step)

    @property
    def steps(self) -> range:
        return range(self.start, self.start + self.n)


@dataclass(frozen=True)
class Probe:
    """One policy's probe statistics over every text sent (several batches combined)."""

    model: str
    policy: str
    schedule: str
    steps: list[str]  # S step labels: "7", or "4+5/pairs" for a group
    num_sequences: int
    num_tokens: int
    similarity: np.ndarray  # [S + 1, S + 1]
    block_influence: np.ndarray  # [S]
    angular_distance: list[np.ndarray]  # row n - 1: [S + 1 - n], for n = 1 .. S // 2

    def __post_init__(self) -> None:
        S = len(self.steps)
        assert self.similarity.shape == (S + 1, S + 1) and self.block_influence.shape == (S,)
        assert [len(row) for row in self.angular_distance] == [S + 1 - n for n in range(1, S // 2 + 1)]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @classmethod
    def of(cls, r: ProbeResponse) -> Probe:
        return cls(model=r.model, policy=r.policy, schedule=r.schedule, steps=list(r.steps),
                   num_sequences=r.num_sequences, num_tokens=r.num_tokens, similarity=np.array(r.similarity),
                   block_influence=np.array(r.block_influence),
                   angular_distance=[np.array(row) for row in r.angular_distance])

    def least_influential(self, k: int | None = None) -> list[int]:
        """Step indices by block influence, lowest first (stable on ties)."""
        order = sorted(range(self.num_steps), key=lambda i: (self.block_influence[i], i))
        return order[:k]

    def block(self, start: int, n: int) -> Block:
        first, last = self.steps[start], self.steps[start + n - 1]
        return Block(start, n, float(self.angular_distance[n - 1][start]), first if n == 1 else f"{first}-{last}")

    def most_alike_blocks(self) -> list[Block]:
        """For each n = 1 .. S // 2, the n consecutive steps whose input and output states are closest."""
        return [self.block(int(np.argmin(row)), n) for n, row in enumerate(self.angular_distance, 1)]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "policy": self.policy, "schedule": self.schedule, "steps": self.steps,
            "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
            "similarity": self.similarity.tolist(), "block_influence": self.block_influence.tolist(),
            "angular_distance": [row.tolist() for row in self.angular_distance],
            "removable": {
                "steps_by_block_influence": [{"step": self.steps[i], "index": i,
                                              "block_influence": float(self.block_influence[i])}
                                             for i in self.least_influential()],
                "blocks_by_angular_distance": [{"n": b.n, "start": b.start, "steps": b.label,
                                                "angular_distance": b.distance}
                                               for b in self.most_alike_blocks()],
            },
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Probe:
        return cls.of(ProbeResponse.model_validate(obj))


def combine(responses: Sequence[ProbeResponse]) -> Probe:
    """Several batches of one policy as if they were one: each statistic is a mean over sequences (similarity,
    angular distance) or over tokens (block influence), so batches weigh by how many of those they averaged."""
    if not responses:
        raise ValueError("no probe responses to combine")
    first = responses[0]
    for r in responses[1:]:
        if (r.steps, r.policy, r.model) != (first.steps, first.policy, first.model):
            raise ValueError(f"cannot combine probes of different schedules: {first.policy} on {first.model} and "
                             f"{r.policy} on {r.model}")
    seqs = np.array([r.num_sequences for r in responses], dtype=float)
    toks = np.array([r.num_tokens for r in responses], dtype=float)

    def weighted(values: list[Any], weights: np.ndarray) -> np.ndarray:
        return np.tensordot(weights / weights.sum(), np.array(values, dtype=float), axes=1)

    rows = len(first.angular_distance)
    return Probe(
        model=first.model, policy=first.policy, schedule=first.schedule, steps=list(first.steps),
        num_sequences=int(seqs.sum()), num_tokens=int(toks.sum()),
        similarity=weighted([r.similarity for r in responses], seqs),
        block_influence=weighted([r.block_influence for r in responses], toks),
        angular_distance=[weighted([r.angular_distance[n] for r in responses], seqs) for n in range(rows)],
    )


# -- texts and requests -------------------------------------------------------------------------------------------


def probe_text(item: MultipleChoice | Cloze | Generation | Document) -> str:
    """The text a task item gives the probe: the context with its right answer, the prompt, or the document."""
    if isinstance(item, MultipleChoice):
        return item.contexts[item.gold] + item.continuations[item.gold]
    if isinstance(item, Cloze):
        return item.context + item.continuation
    if isinstance(item, Generation):
        return item.prompt
    return item.text


def batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    assert size >= 1
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _too_big(e: PaintersError) -> bool:
    """A batch over the endpoint's token bound (413, or a 400 about tokens): worth splitting."""
    return e.status == 413 or (e.status == 400 and "token" in e.message.lower() and "policy" not in e.message)


async def _probe_batch(client: AsyncPaintersClient, prompts: list[list[int]], policy: Policy) -> list[ProbeResponse]:
    """One batch, halved (recursively) when the server finds it too large."""
    try:
        return [await client.probe(prompts, policy=policy)]
    except PaintersError as e:
        if e.status == 404:
            raise ProbeError(f"{client.http.base_url} has no POST /v1/probe (HTTP 404): update the server") from None
        if e.status == 400 and "policy" in e.message:
            raise ProbeError(f"policy {policy!r} was rejected by the server: {e.message}") from None
        if not _too_big(e) or len(prompts) == 1:
            raise
        half = len(prompts) // 2
        first = await _probe_batch(client, prompts[:half], policy)
        return [*first, *await _probe_batch(client, prompts[half:], policy)]


DEFAULT_MAX_LENGTH = 512  # tokens kept per text: enough to see how alike layers are, cheap to probe


async def run_probe(url: str, texts: Sequence[str], *, policy: Policy = None, batch_size: int = 16,
                    max_length: int | None = None, model: str | None = None, api_key: str | None = None,
                    timeout: float = 600.0, progress: Progress | None = None) -> Probe:
    """Probe every text under `policy`, `batch_size` at a time; each text tokenized by the server and cut to its first
    `max_length` tokens (default: 512, or the server's max_model_len if that is less). The first, not the last: the
    tokenizer's BOS (Gemma's `<bos>`, the attention sink) stays in place, as the model always sees it; cut from the
    left, every long text began mid-sentence without it, and a batch mixed texts with and without one."""
    if not texts:
        raise ValueError("no texts to probe")
    if not 1 <= batch_size <= MAX_PROMPTS:
        raise ValueError(f"batch size must be 1-{MAX_PROMPTS} (the endpoint's limit), got {batch_size}")
    async with AsyncPaintersClient(url, model=model, api_key=api_key, timeout=timeout) as client:
        try:
            info = (await client.http.get("/tokenizer_info")).json()
        except httpx.HTTPError as e:
            raise ProbeError(f"cannot reach the server at {url}: {type(e).__name__}: {e}") from None
        server_max = int(info.get("model_max_length") or DEFAULT_MAX_LENGTH)
        limit = min(max_length or DEFAULT_MAX_LENGTH, server_max)
        task = progress.add_task("probe", total=len(texts)) if progress is not None else None
        responses: list[ProbeResponse] = []
        for batch in batches(texts, batch_size):
            ids = [(await client.tokenize(t))[:limit] for t in batch]
            responses += await _probe_batch(client, [i for i in ids if i], policy)
            if progress is not None and task is not None:
                progress.advance(task, len(batch))
    return combine(responses)


# -- output -------------------------------------------------------------------------------------------------------


def _tick_labels(labels: list[str], most: int = 40) -> tuple[list[int], list[str]]:
    every = max(1, -(-len(labels) // most))
    at = list(range(0, len(labels), every))
    return at, [labels[i] for i in at]


def plot_similarity(probe: Probe, path: Path, *, title: str | None = None) -> Path:
    """The paper's heatmap: cosine similarity between the states entering every pair of steps (and the output)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [*probe.steps, "out"]
    size = min(14.0, 4.0 + 0.22 * len(labels))
    fig = Figure(figsize=(size + 1.5, size), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(probe.similarity, cmap="viridis", vmin=min(0.0, float(probe.similarity.min())), vmax=1.0,
                      origin="upper")
    at, shown = _tick_labels(labels)
    ax.set_xticks(at, shown, rotation=90, fontsize=7)
    ax.set_yticks(at, shown, fontsize=7)
    ax.set_xlabel("hidden state entering step (layer); out = last step's output")
    ax.set_ylabel("hidden state entering step (layer)")
    ax.set_title(title or f"{probe.model} [{probe.policy}]: cosine similarity of hidden states")
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity (per sequence, averaged)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_removable(probe: Probe, path: Path, *, title: str | None = None) -> Path:
    """Two panels: block influence per step, and the smallest angular distance d(i, i + n) for each block size n."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.bar(range(probe.num_steps), probe.block_influence, color="tab:blue")
    at, shown = _tick_labels(probe.steps)
    left.set_xticks(at, shown, rotation=90, fontsize=7)
    left.set_xlabel("step (layer)")
    left.set_ylabel("block influence 1 - cos(x_i, x_i+1)")
    left.set_title("block influence (low: the step changes little)")
    blocks = probe.most_alike_blocks()
    right.plot([b.n for b in blocks], [b.distance for b in blocks], marker="o", color="tab:orange")
    for b in blocks:
        right.annotate(b.label, (b.n, b.distance), textcoords="offset points", xytext=(3, 4), fontsize=7)
    right.set_xlabel("block size n (consecutive steps)")
    right.set_ylabel("min over i of d(x_i, x_i+n)")
    right.set_title("most alike block of each size (angular distance)")
    right.grid(True, alpha=0.3)
    fig.suptitle(title or f"{probe.model} [{probe.policy}]")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def influence_table(probe: Probe, top: int) -> TextTable:
    t = TextTable([Column("rank", "right"), Column("step (layer)", keep_whole=True),
                   Column("block influence", "right")],
                  title=f"steps that change the state least (lowest block influence, {top} of {probe.num_steps})")
    for rank, i in enumerate(probe.least_influential(top), 1):
        t.add_row(str(rank), probe.steps[i], f"{probe.block_influence[i]:.4f}")
    return t


def blocks_table(probe: Probe) -> TextTable:
    t = TextTable([Column("n", "right"), Column("steps (layers)", keep_whole=True),
                   Column("angular distance d(start, start+n)", "right")],
                  title="the most alike block of each size (smallest angular distance between its input and output)")
    for b in probe.most_alike_blocks():
        t.add_row(str(b.n), b.label, f"{b.distance:.4f}")
    return t


def write_outputs(probe: Probe, out: Path, *, settings: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "probe.json"
    json_path.write_text(json.dumps({**settings, **probe.to_json()}, indent=1) + "\n")
    what = f"{settings.get('task', 'texts')}, {probe.num_sequences} sequences, {probe.num_tokens} tokens"
    return [json_path,
            plot_similarity(probe, out / "similarity.png",
                            title=f"{probe.model} [{probe.policy}]: cosine similarity of hidden states\n{what}"),
            plot_removable(probe, out / "removable.png", title=f"{probe.model} [{probe.policy}]: {what}")]


def task_texts(task: Task) -> list[str]:
    return [probe_text(item) for item in task.items]  # type: ignore[arg-type]


# -- `painters probe` ---------------------------------------------------------------------------------------------


def probe_command(
    ctx: typer.Context,
    task: Annotated[str, typer.Option("--task", "-t", help="whose texts to probe: lambada_openai, hellaswag, arc_easy, "
                                      "arc_challenge, piqa, winogrande, boolq, gsm8k, wikitext")],
    out: Annotated[Path, typer.Option(help="directory for probe.json, similarity.png and removable.png")],
    url: Annotated[str, typer.Option(help="the server's base URL")] = "http://127.0.0.1:8000",
    data: Annotated[Path | None, typer.Option(
        help="the task's data file, or a directory laid out like ../shared/data")] = None,
    limit: Annotated[int, typer.Option(help="the first N items of the task", min=1)] = 64,
    policy: Annotated[str | None, typer.Option(help="probe under this policy (default: the server's, e.g. full)")
                      ] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per request (the endpoint takes at most 64)", min=1,
                                            max=MAX_PROMPTS)] = 16,
    max_length: Annotated[int | None, typer.Option(help=f"keep each text's last N tokens (default: "
                                                   f"{DEFAULT_MAX_LENGTH}, at most the server's max_model_len)",
                                                   min=2)] = None,
    top: Annotated[int, typer.Option(help="rows of the block-influence table", min=1)] = 10,
    model: Annotated[str | None, typer.Option("--model", "-m", help="model name in the request body")] = None,
    api_key: Annotated[str | None, typer.Option(help="sent as 'Authorization: Bearer KEY'")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print probe.json's object instead of the tables")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Which layers are alike: the cosine-similarity heatmap of the hidden states, block influence and the angular
    distance of blocks, over a task's texts, from the server's POST /v1/probe."""
    quiet_http_logs(verbose=verbose)
    try:
        loaded = load_task(task, path=data, limit=limit)
        with progress_bar(transient=True) as bars:
            probe = asyncio.run(run_probe(url, task_texts(loaded), policy=policy, batch_size=batch_size,
                                          max_length=max_length, model=model, api_key=api_key, progress=bars))
        settings = {"command": command_line(ctx), "url": url, "task": task, "data": loaded.source, "limit": limit,
                    "max_length": max_length}
        paths = write_outputs(probe, out, settings=settings)
    except (DataError, ProbeError, PaintersError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    except httpx.HTTPError as e:
        raise fail(f"{url}: {type(e).__name__}: {e}") from None
    if as_json:
        typer.echo(json.dumps({**settings, **probe.to_json()}))
        return
    console.print(f"probe {probe.model} [{probe.policy}] on {task}: {probe.num_sequences} sequences, "
                  f"{probe.num_tokens} tokens, {probe.num_steps} steps", markup=False, highlight=False, soft_wrap=True)
    influence_table(probe, top).print(console)
    blocks_table(probe).print(console)
    console.print("wrote " + ", ".join(map(str, paths)), markup=False, highlight=False, soft_wrap=True)
