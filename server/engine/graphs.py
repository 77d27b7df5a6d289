"""Captured decode steps: a decode step replays a CUDA graph instead of launching each of its kernels.

A decode step's kernels depend on the batch's layout (which schedule each row follows), its number of rows, and, when
attention gathers each row's context, on how many KV blocks the longest row reads. Token ids, positions and block
tables are data. So a step is captured per *padded layout*: rows grouped by schedule (schedules in the order of their
keys), the groups padded to buckets (1, 2, 4, 8, then multiples of 8, as vLLM buckets its graph batch sizes): every
group to the bucket of the largest while the step stays within `SHARED_UP_TO` rows, else each group to its own
(`group_buckets`); and the context rounded up to a bucket of blocks (1, 2, 4, 8, then multiples of 8) where attention
gathers it (attention that reads the pool in place, FlexAttention or the Triton kernel, covers every block and needs
none). Padding rows name the table row that holds only the scratch block: they write and read there, and their
logits are dropped. A row joining or leaving changes nothing until its group crosses a bucket; a schedule whose last
row left keeps a group of padding rows for `KEEP_STEPS` decode steps where that reads no more weights (a `skip:k`
group beside a `full` one: the plan reads no layer more), so rows of it coming back find the layout as it was; and
a layout seen once is kept: graphs are held least recently used first, up to `MAX_GRAPHS` of them owning up to
`MAX_GRAPH_BYTES` (their outputs and static inputs), their intermediates in one shared memory pool.

Why a graph per layout rather than per layer application: a step of any policy mix is then one replay (one launch);
the price is a capture per new layout, counted in `stats()`. Under a churning mix, one bucket per group made the
layouts the product of the groups' buckets (83 layouts over 1,500 steps of 3 policies at ~8 rows, 109 captures with
the bound of 32); one shared bucket leaves the schedules present times one bucket (benchmarks/bench_layouts.py,
docs/results/bench-gpu.md). A graph per layer application would be shared by every mix, but at ~70 replays a step
with the gathers and scatters between them left eager.

A graph reads static buffers: token ids [Bp, 1] and one packed int64 vector (each row's start [Bp], its new tokens
[Bp], the KV table row of every (attention application, layer, row) [N], and where each real row sits among the padded
ones [Bp]). A replay copies this step's values in (one host-to-device copy from pinned memory), scatters the token ids
and gathers the real rows' logits out of the graph's [Bp, V]. Capture follows torch's recipe: run the step once on a
side stream (it compiles what compiles lazily; a decode step is idempotent: it rewrites the same keys and values),
then capture it. On the CPU there is no graph: the same padded step runs eagerly over the same buffers, which is what
the CPU tests compare with the unpadded step.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from server.engine.transfer import pinned

if TYPE_CHECKING:
    from server.engine.executor import Executor, Row, _Program
    from server.policy.compiler import Schedule
    from server.policy.planner import StepPlan

log = logging.getLogger(__name__)
MAX_GRAPHS = 32  # captured layouts kept
# bytes the kept graphs may own: each its output logits [Bp, V] float32 and its static inputs (a 128-row step of
# Gemma 3's 262k vocabulary owns 134 MB; the intermediates live in one shared pool, as large as the largest step's)
MAX_GRAPH_BYTES = 1 << 30
# padded rows up to which every group of a step shares one bucket (`group_buckets`): below ~130 rows a bf16 decode
# step on an H100 or H200 is still bound by streaming its weights (~700 Tflop/s over 4.8 TB/s), so padding rows are
# nearly free there
SHARED_UP_TO = 128
# decode steps a schedule with no rows left keeps its group (padding rows only) where the step reads no more weights
# with it: a wide mix at ~8 rows makes 76 layouts over 1,500 steps without, fewer with (benchmarks/bench_layouts.py)
KEEP_STEPS = 256
# empty groups a step keeps at most (the most recently seen schedules): policies are user input, and without a bound a
# stream of distinct `skip:a-b` beside `full` kept dozens (112 padded rows for 6 real ones, each planned every step)
MAX_KEPT = 4
PAD = object()  # the `seq` of a padding row


def bucket(n: int) -> int:
    """What n rows (or blocks) are padded to: 1, 2, 4, 8, then the next multiple of 8."""
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def group_buckets(sizes: list[int], *, shared_up_to: int = SHARED_UP_TO) -> list[int]:
    """The rows each group of a step is padded to, for groups of `sizes` rows: all to the bucket of the largest while
    that pads the step to at most `shared_up_to` rows, else each to its own bucket. Shared, a step's layout is the
    schedules present and one bucket, whatever the split between them: under a churning mix that is a few layouts
    where one bucket per group makes their product (benchmarks/bench_layouts.py). The price is padding rows, which a
    decode step that streams its weights carries almost free (they read only the scratch block)."""
    shared = bucket(max(sizes))
    if shared * len(sizes) <= shared_up_to:
        return [shared] * len(sizes)
    return [bucket(n) for n in sizes]


@dataclass(frozen=True)
class Layout:
    """A decode step's padded layout: what its graph is captured for."""

    schedules: tuple[Schedule, ...]  # its groups' (in key order): what the step's plan is made of
    padded: list[Row]  # the rows grouped by schedule, each group padded with PAD rows to its bucket
    where: list[int]  # where each real row sits among the padded ones
    counts: tuple[int, ...]  # each group's bucket
    num_blocks: int  # KV blocks per row that attention covers


@dataclass
class _Step:
    """One padded layout: its plan, program, static inputs and, on CUDA, the graph captured over them."""

    plan: StepPlan
    program: _Program
    tokens: Tensor  # [Bp, 1]
    inputs: Tensor  # [3 Bp + N] start, new tokens, KV table rows, where each real row sits
    run: Callable[[], Tensor]  # the eager step over the static buffers -> logits [Bp, V]
    own_bytes: int  # what the step keeps while it is kept: its static inputs and, captured, its output logits
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None  # the graph's output
    eager: bool = False  # capture failed: the padded step runs eagerly


class DecodeGraphs:
    """The executor's decode steps, each a replay of the graph of its padded layout."""

    def __init__(self, executor: Executor, *, max_graphs: int = MAX_GRAPHS, max_bytes: int = MAX_GRAPH_BYTES,
                 fuse: bool = False, shared_up_to: int = SHARED_UP_TO) -> None:
        """max_graphs, max_bytes: bounds on the layouts kept and on the bytes they own (`_Step.own_bytes`, counted
        the same on the CPU, where nothing is captured); the least recently used go first, the newest always stays.
        fuse: the steps run the layer math through torch.compile (`Transformer.fused`); it compiles in the warm-up
        run before a capture, so only the replays' kernels change. shared_up_to: see `group_buckets`."""
        # a proxy: the executor owns this object, and a strong reference back (held by every step's closure too)
        # made a cycle that kept a dropped batch's KV pool and graphs alive until the cyclic collector ran, which
        # it seldom does (a benchmark's 64-row pools, ~17 GB each on a 7B shape, piled up)
        self.executor = weakref.proxy(executor)
        self.max_graphs, self.max_bytes = max_graphs, max_bytes
        self.fuse, self.shared_up_to = fuse, shared_up_to
        self._steps: OrderedDict[tuple, _Step] = OrderedDict()  # least recently used first
        self._pool = None  # one CUDA graph memory pool shared by every graph
        self.captures = self.replays = self.failures = self.evictions = 0
        self.layouts = self.reuses = 0  # steps that built a new layout / found theirs kept (on the CPU too)
        self.pinned_bytes = 0  # growth of reserved device memory while capturing
        self.capture_s = 0.0  # host seconds spent capturing (each capture's warm-up step included)
        self._decodes = 0  # decode steps so far
        self._last_seen: dict[Schedule, int] = {}  # schedule -> the decode step it last had rows in
        self._free: dict[tuple[tuple[Schedule, ...], Schedule], bool] = {}  # (groups, absent one) -> it reads no more
        cache, model = executor.cache, executor.model
        self._top = cache.max_blocks * cache.block_size
        # grow the rotary tables once, to every position the cache can hold: a graph reads them where they lie, so
        # they must never be reallocated
        model.rope(torch.zeros(1, 1, dtype=torch.long, device=model.device), top=self._top)

    def stats(self) -> dict[str, int | float]:
        seen = self.captures + self.replays
        return {"graphs": len(self._steps), "captures": self.captures, "replays": self.replays,
                # replays of a graph captured at an earlier step, among all steps
                "hit_rate": self.replays / seen if seen else 0.0, "failures": self.failures,
                "evictions": self.evictions, "pinned_bytes": self.pinned_bytes, "capture_s": self.capture_s,
                "kept_bytes": sum(step.own_bytes for step in self._steps.values()),
                # the same count on any device: a step whose layout was kept, among all steps
                "layout_hit_rate": self.reuses / (self.reuses + self.layouts) if self.layouts else 0.0}

    def replay_s(self, repeats: int = 20) -> float:
        """Seconds of one replay of the most recently used graph alone (no host work around it): what the step
        costs the GPU, for telling kernel time from host time. CUDA only."""
        step = next(reversed(self._steps.values()))
        assert step.graph is not None, "no captured graph"
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        step.graph.replay()
        start.record()
        for _ in range(repeats):
            step.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

    def latest(self) -> Callable[[], Tensor]:
        """The most recently used layout's step over its static buffers, run eagerly (its graph, where captured,
        replays the same work): for benchmarks that capture it another way."""
        return next(reversed(self._steps.values())).run

    def layout(self, rows: list[Row]) -> Layout:
        """How a decode step of `rows` is padded: groups by schedule (in key order), padded to their buckets
        (`group_buckets`), and the blocks attention covers. Plain data: the layout, not the rows' tokens, decides the
        graph."""
        cache = self.executor.cache
        groups: dict = {}
        for b, r in enumerate(rows):
            groups.setdefault(r.schedule, []).append(b)
        order = sorted([*groups, *self._kept(groups)], key=lambda s: s.key)
        counts = group_buckets([len(groups.get(s, ())) or 1 for s in order], shared_up_to=self.shared_up_to)
        padded: list[Row] = []
        where = [0] * len(rows)
        for schedule, n in zip(order, counts):
            members = groups.get(schedule, [])
            for b in members:
                where[b] = len(padded)
                padded.append(rows[b])
            padded += [replace(rows[0], seq=PAD, schedule=schedule, start=0, num_new=1)] * (n - len(members))
        if self.executor.attention in ("in_place", "triton"):  # reads the pool in place: may cover every block
            nb = cache.max_blocks
        else:
            nb = min(bucket(-(-max(r.start + 1 for r in rows) // cache.block_size)), cache.max_blocks)
        return Layout(tuple(order), padded, where, tuple(counts), nb)

    def _remember(self, rows: list[Row]) -> None:
        """Count a decode step and the schedules in it; forget those past `KEEP_STEPS` (and, now and then, the
        checks made for them), so that what is remembered stays bounded by the schedules of recent steps."""
        self._decodes += 1
        for r in rows:
            self._last_seen[r.schedule] = self._decodes
        if self._decodes % KEEP_STEPS == 0:
            self._last_seen = {s: t for s, t in self._last_seen.items() if self._decodes - t < KEEP_STEPS}
            self._free.clear()

    def _kept(self, present: dict[Schedule, list[int]]) -> list[Schedule]:
        """Schedules with no rows in this step but rows in one of the last `KEEP_STEPS`, whose group of padding rows
        the step carries without reading more weights (checked one by one, the most recently seen first, against the
        groups so far): at most `MAX_KEPT`, and no more than keep the step within one shared bucket
        (`group_buckets`). Plain data, read only: `decode` records which schedules ran."""
        room = min(MAX_KEPT, self.shared_up_to // bucket(max(map(len, present.values()))) - len(present))
        recent = sorted((s for s, t in self._last_seen.items()
                         if s not in present and self._decodes - t < KEEP_STEPS),
                        key=lambda s: (-self._last_seen[s], s.key))
        kept: list[Schedule] = []
        for s in recent:
            if len(kept) >= room:
                break
            groups = tuple(sorted([*present, *kept], key=lambda g: g.key))
            free = self._free.get((groups, s))
            if free is None:
                ex = self.executor
                with_s = tuple(sorted([*groups, s], key=lambda g: g.key))
                free = self._free[(groups, s)] = ex.units_read(with_s) <= ex.units_read(groups)
            if free:
                kept.append(s)
        return kept

    def decode(self, tokens: Tensor, rows: list[Row], *, remember: bool = True) -> Tensor:
        """tokens [B, 1]; rows decode one token each (their KV blocks reserved) -> logits [B, V]. remember: count
        the step and its schedules among the recent ones (`_kept`); not a speculative draft's, whose schedule later
        steps should not pad for."""
        ex = self.executor
        layout = self.layout(rows)
        if remember:
            self._remember(rows)
        padded, where, nb = layout.padded, layout.where, layout.num_blocks
        # the layout's value, not its plan's id: plans are cached (least recently used first), and a plan made
        # afresh for the same schedules would have captured the same graph again
        key = (layout.schedules, layout.counts, nb)
        step = self._steps.get(key)
        if step is None:
            plan = ex.plan(padded)
            step = self._new(plan, ex._compile(plan, padded), len(padded), nb)
            self._steps[key] = step
            self.layouts += 1
            self._evict()
        else:
            self._steps.move_to_end(key)
            self.reuses += 1
        Bp, B = len(padded), len(rows)
        host = torch.tensor([r.start for r in padded] + [1] * Bp + ex.kv_table_rows(step.program, padded)
                            + where + [0] * (Bp - B), dtype=torch.long)
        step.inputs.copy_(pinned(host, tokens.device), non_blocking=True)
        at = step.inputs[-Bp:][:B]
        step.tokens.index_copy_(0, at, tokens)
        hit = step.graph is not None
        if not hit and not step.eager and tokens.device.type == "cuda":
            self._capture(step)
        if step.graph is None:
            logits = step.run()
        else:
            step.graph.replay()
            logits = step.logits
            self.replays += hit
        return logits.index_select(0, at)

    def _evict(self) -> None:
        """Drop the least recently used layouts while more are kept, or more bytes owned, than the bounds allow."""
        owned = sum(step.own_bytes for step in self._steps.values())
        while len(self._steps) > 1 and (len(self._steps) > self.max_graphs or owned > self.max_bytes):
            _, step = self._steps.popitem(last=False)
            owned -= step.own_bytes
            self.evictions += 1

    def _new(self, plan: StepPlan, program: _Program, Bp: int, nb: int) -> _Step:
        ex = self.executor
        dev = ex.model.device
        N = len(program.kv_pairs)
        tokens = torch.zeros(Bp, 1, dtype=torch.long, device=dev)
        inputs = torch.zeros(3 * Bp + N, dtype=torch.long, device=dev)
        logits_at = torch.zeros(Bp, dtype=torch.long, device=dev)
        start, new, kv_rows = inputs[:Bp], inputs[Bp : 2 * Bp], inputs[2 * Bp : 2 * Bp + N]

        def run() -> Tensor:
            return ex.run(plan, program, tokens, start, new, kv_rows, top=self._top, num_blocks=nb, num_new=None,
                          logits_at=logits_at, fused=self.fuse)

        logits_bytes = Bp * ex.model.args.vocab_size * 4  # float32, as `Transformer.logits` returns them
        own = tokens.nbytes + inputs.nbytes + logits_at.nbytes + logits_bytes
        return _Step(plan, program, tokens, inputs, run, own)

    def _capture(self, step: _Step) -> None:
        dev = step.tokens.device
        before = torch.cuda.memory_reserved(dev)
        t = time.perf_counter()
        try:
            main = torch.cuda.current_stream(dev)
            side = torch.cuda.Stream(dev)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                step.run()  # warm-up: lazy compiles and tables outside the capture
            main.wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                step.logits = step.run()
            step.graph = graph
            self.captures += 1
        except Exception:  # noqa: BLE001 -- the step still runs, eagerly: slower, exact
            log.exception("capturing a decode step failed; this layout runs eagerly")
            step.eager, step.graph, step.logits = True, None, None
            self.failures += 1
        self.pinned_bytes += max(0, torch.cuda.memory_reserved(dev) - before)
        self.capture_s += time.perf_counter() - t
