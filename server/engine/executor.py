"""The executor: runs a step plan over a batch of rows that may each follow a different schedule; owns the KV cache.

A forward call appends T tokens to every row (rows shorter than T are right-padded) and returns logits. The rows'
schedules go to the planner, which returns an ordered list of layer applications; each application gathers its rows'
input buffers, runs the layer once for all of them (one batched matmul, whatever their schedules), writes and reads
each row's own KV slot, and adds its output into each row's destination buffer. Index tensors of a plan are built
once per padded layout (the plan, and which schedule each batch row follows) and kept, up to `MAX_PROGRAMS`, least
recently used first; which sequence sits in a row only changes the KV table rows, gathered per call. A forward makes
no host sync: every shape comes from the rows (plain data) the caller passes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from server.policy.compiler import Schedule, Slot
from server.engine.graphs import PAD, DecodeGraphs
from server.engine.kv_cache import PagedKVCache
from server.engine.transfer import to_device
from server.model.model import GroupMode, Transformer
from server.model.paged_attention import paged_attention, paged_layout
from server.model import triton_attention
from server.model.triton_attention import paged_decode_attention
from server.policy.planner import Apply, Boundary, Copy, Merge, StepPlan, plan_step


@dataclass(frozen=True)
class Row:
    """One sequence in a forward call."""

    seq: Hashable  # the request's id (its KV blocks are kept under it)
    schedule: Schedule
    start: int  # tokens already cached
    num_new: int  # real tokens appended by this call (the rest of T is padding)


# (layer, position) pairs a fused group computes at once. A decode step's group (rows x members) stays under it at
# the default batch sizes; a 28-layer parallel group over a 2,000-token prompt would hold 56,000 positions'
# activations at once (SmolLM2: +1.8 GiB against full's +0.2).
MAX_GROUP_TOKENS = 8192


@dataclass
class _Apply:
    entry: Apply
    rows: Tensor  # [m] batch rows the application covers (a row may appear twice: a group naming a layer twice)
    rowset: int  # index of `rows` among the program's distinct row sets (their masks and rotary rows are shared)
    src: Tensor  # [G, m] buffer read per (layer, row)
    dst: Tensor  # [G, m] buffer written
    scale: Tensor | None  # [G, m, 1, 1], None when all 1
    kv: slice | None  # attention: this application's [G*m] entries in the program's KV lists
    whole: bool  # one layer over every row, h -> h, scale 1: no gather or scatter needed
    span: slice | None  # its rows are the batch's rows a..b-1, in order, once each: views instead of gathers
    src_one: int | None  # the one buffer every (layer, row) reads, if there is one
    dst_one: int | None  # the one buffer every (layer, row) writes, if there is one
    dst_per_row: bool  # every layer writes a row to the same buffer: sum over layers first, scatter once
    flat_dst: Tensor  # [G*m] or [m]: index into buffers viewed as [buffers x rows, T, d]
    members: tuple[int, ...] = ()  # `rows` on the host


@dataclass
class _RowOp:
    entry: Copy | Merge | Boundary
    rows: Tensor
    span: slice | None = None  # its rows are the batch's rows a..b-1, in order: views instead of gathers


@dataclass
class _Program:
    """A plan's index tensors for one padded layout (schedule of each batch row)."""

    plan: StepPlan  # held so that its id, the cache key, is not reused
    ops: list[_Apply | _RowOp]
    kv_pairs: tuple[tuple[int, Slot], ...]  # (batch row, slot) of every (attention application, layer, row)
    kv_batch: Tensor  # [N] the batch row of each


MAX_PROGRAMS = 64  # compiled layouts kept (a layout is a plan and a schedule per row)
# How decode attention reads the cache: "gathered" copies each row's context out of the pool and runs SDPA (the
# faster one on the CPU below ~512-token contexts, and needs no compile); "in_place" reads the pool where it lies
# through FlexAttention (compiled on first use; see benchmarks/bench_attention.py); "triton" reads it where it lies
# through our Triton kernel over the block table (server/model/triton_attention.py; CUDA, or Triton's interpreter
# for tests). "auto" is "triton" on CUDA where the kernel, at its fastest tiling, measured faster than "gathered" at
# load (`triton_attention.timings`), else "gathered". Prefill always gathers.
AttentionMode = Literal["auto", "gathered", "in_place", "triton"]
ATTENTION_MODES: tuple[str, ...] = ("auto", "gathered", "in_place", "triton")


def resolve_attention(attention: AttentionMode, model: Transformer) -> AttentionMode:
    """The decode-attention path `attention` means for `model` on its device ("auto" measured once per shape);
    a mode that cannot run there is refused, saying why."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    if attention == "triton":
        triton_attention.require(model.device)
    if attention != "auto":
        return attention
    a = model.args
    times = triton_attention.timings(heads=a.n_heads, kv_heads=a.n_kv_heads, head_dim=a.head_dim, dtype=model.dtype,
                                     device=model.device)
    return "triton" if times and times.pays() else "gathered"


class Executor:
    def __init__(
        self, model: Transformer, *, num_blocks: int, block_size: int = 16, max_len: int,
        group_mode: GroupMode = "batched", attention: AttentionMode = "auto", graphs: bool | None = None,
        fuse: bool = False,
    ) -> None:
        """graphs: decode steps through `DecodeGraphs` (captured CUDA graphs over padded, bucketed layouts); None
        turns them on where they pay, on CUDA with fused groups. On the CPU the same padded path runs eagerly
        (tests use it there; it buys nothing). fuse: those steps run the layer math through torch.compile
        (`Transformer.fused`: fewer kernels per layer in each replay); refused with graphs=False, no effect where
        graphs=None leaves them off."""
        a = model.args
        self.model, self.group_mode, self.max_len = model, group_mode, max_len
        self.attention = resolve_attention(attention, model)  # never "auto"
        self.tiling = triton_attention.Tiling() if self.attention != "triton" else triton_attention.tiling_for(
            heads=a.n_heads, kv_heads=a.n_kv_heads, head_dim=a.head_dim, dtype=model.dtype, device=model.device)
        self.cache = PagedKVCache(num_blocks=num_blocks, block_size=block_size, max_len=max_len,
                                  n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, dtype=model.dtype, device=model.device)
        self._attn_cost, self._mlp_cost = model.unit_bytes()
        self._compiled: OrderedDict[tuple, _Program] = OrderedDict()  # least recently used first
        self._streams: list[torch.cuda.Stream] = []
        self._block_col = torch.zeros(self.cache.pool.shape[0], dtype=torch.int32, device=model.device)  # in place
        if fuse and graphs is False:
            raise ValueError("fuse needs captured decode steps (graphs): compiled layer math called eagerly costs "
                             "more host time in Dynamo's guards than its fusion saves")
        if graphs is None:  # where there are no captured steps (the CPU), fuse has nothing to change
            graphs = model.device.type == "cuda" and group_mode == "batched"
        self.graphs = DecodeGraphs(self, fuse=fuse) if graphs else None

    def release(self, seq: Hashable) -> None:
        """A sequence left: its KV blocks return to the pool (compiled programs stay: they name no sequence)."""
        self.cache.free(seq)

    def warm_up(self, schedule: Schedule, *, rows: tuple[int, ...] = (1, 2), transient: bool = False) -> None:
        """Decode one token for each count of `rows` placeholder sequences under `schedule`, then free their KV: the
        captured steps of those layouts exist, and with `fuse` the layer math is compiled (for one row, then for
        any number: the second count makes the rows dimension dynamic), before the first request needs them. A
        no-op without captured steps; counts whose blocks the pool cannot spare are left out. transient: as
        `forward`'s (a draft's schedule)."""
        if self.graphs is None:
            return
        dev = self.model.device
        for n in rows:
            if n * schedule.num_slots > self.cache.num_blocks - self.cache.used_blocks:
                break  # a pool this small warms up what fits
            seqs = [("warm-up", n, i) for i in range(n)]
            try:
                self.forward(torch.zeros(n, 1, dtype=torch.long, device=dev), [Row(q, schedule, 0, 1) for q in seqs],
                             logits_at=torch.zeros(n, dtype=torch.long, device=dev), transient=transient)
            finally:
                for q in seqs:
                    self.release(q)

    def plan(self, rows: list[Row], *, boundaries: bool = False) -> StepPlan:
        distinct = tuple(dict.fromkeys(r.schedule for r in rows))
        return plan_step(distinct, attn_cost=self._attn_cost, mlp_cost=self._mlp_cost, boundaries=boundaries)

    def units_read(self, schedules: tuple[Schedule, ...]) -> int:
        """Weight bytes of the layer units one step over rows of `schedules` (distinct, in this order) reads."""
        plan = plan_step(schedules, attn_cost=self._attn_cost, mlp_cost=self._mlp_cost)
        return plan.units_read(attn_cost=self._attn_cost, mlp_cost=self._mlp_cost)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, rows: list[Row], *, logits_at: Tensor | None = None, hidden: bool = False,
                capture: Callable[[int, Tensor, Tensor], None] | None = None, transient: bool = False) -> Tensor:
        """tokens [B, T]; rows[b] describes batch row b. logits_at: [B] index in T whose logits to return ([B, V]);
        None returns all positions ([B, T, V]). hidden: return the final hidden states instead ([B, T, d], before
        the final norm; padding positions hold what their padding computed), for a caller that reads many
        positions' logits a few at a time (`Transformer.logits`). capture(step, rows [m], h [m, T, d]) is called with the state
        entering every schedule step of those rows (step = number of steps done), for probes. transient: a step
        whose schedules are not the batch's own (a speculative draft's): a captured step does not count them among
        the recent schedules that later steps keep a group of padding rows for (`DecodeGraphs.layout`)."""
        B, T = tokens.shape
        assert len(rows) == B
        assert not (hidden and logits_at is not None), "hidden returns every position"
        for r in rows:
            assert r.start + r.num_new <= self.max_len, f"sequence of {r.start + r.num_new} exceeds {self.max_len}"
            self.cache.reserve(r.seq, r.schedule.slots, r.start + r.num_new)
        if (self.graphs is not None and capture is None and logits_at is not None and T == 1
                and all(r.num_new == 1 for r in rows)):  # (a prefill of one token per row is such a step too)
            return self.graphs.decode(tokens, rows, remember=not transient)  # one token a row: a captured step
        plan = self.plan(rows, boundaries=capture is not None)
        program = self._compile(plan, rows)
        kv_len = max(r.start + r.num_new for r in rows)
        inputs = self.step_inputs(program, rows)
        return self.run(plan, program, tokens, *inputs, top=kv_len, num_blocks=-(-kv_len // self.cache.block_size),
                        num_new=[r.num_new for r in rows], logits_at=logits_at, hidden=hidden, capture=capture)

    def step_inputs(self, program: _Program, rows: list[Row]) -> tuple[Tensor, Tensor, Tensor]:
        """What a step's tensor work reads from the rows, on the device, in one copy: where each row starts [B], how
        many tokens it appends [B], and the KV table row of every (attention application, layer, row) [N]."""
        host = torch.tensor([r.start for r in rows] + [r.num_new for r in rows] + self.kv_table_rows(program, rows),
                            dtype=torch.long)
        host = to_device(host, self.model.device)
        B = len(rows)
        return host[:B], host[B : 2 * B], host[2 * B :]

    def kv_table_rows(self, program: _Program, rows: list[Row]) -> list[int]:
        """The KV table row of every (attention application, layer, row) of the program; a padding row (seq PAD)
        names the row that holds only the scratch block."""
        cache = self.cache
        return [cache.pad_row if rows[b].seq is PAD else cache.table_row(rows[b].seq, slot)
                for b, slot in program.kv_pairs]

    def run(self, plan: StepPlan, program: _Program, tokens: Tensor, start: Tensor, new: Tensor, kv_rows: Tensor, *,
            top: int, num_blocks: int, num_new: list[int] | None, logits_at: Tensor | None, hidden: bool = False,
            capture: Callable[[int, Tensor, Tensor], None] | None = None, fused: bool = False) -> Tensor:
        """The step's tensor work, with no host sync: every shape comes from plain data. start, new [B] and
        kv_rows [N] as `step_inputs` makes them; top bounds the positions + 1; num_blocks: the KV blocks that
        gathered attention reads per row (covering every row's length); num_new: each row's new tokens on the host
        when some are padding (None: every row appends all T, as every decode row does); logits_at, hidden: what
        to return, as in `forward`; fused: the layer math through torch.compile (`Transformer.fused`)."""
        B, T = tokens.shape
        model, cache, dev = self.model, self.cache, self.model.device
        padded = num_new is not None and any(n != T for n in num_new)
        steps = torch.arange(T, device=dev)[None, :]
        if padded:  # a padding column repeats its row's last position: past it, it could leave the tables
            steps = torch.minimum(steps, (new - 1).clamp(min=0)[:, None])
        positions = start[:, None] + steps  # [B, T]
        valid = torch.arange(T, device=dev)[None, :] < new[:, None]
        rope = model.rope(positions, top=top)
        triton_decode = self.attention == "triton" and T == 1  # the kernel masks by position: no mask tensors
        mask, window_mask = (None, None) if triton_decode else model.masks(positions, num_blocks * cache.block_size)

        kv_at = cache.locate(kv_rows, positions[program.kv_batch],
                             valid[program.kv_batch] if padded else None)  # [N, T] where each writes
        kv_blocks = cache.block_ids(kv_rows, num_blocks)  # [N, nb] what each reads
        layout = kv_pos = kv_len = None
        if self.attention == "in_place" and T == 1:
            layout = paged_layout(cache.tables[kv_rows], positions[program.kv_batch], (start + new)[program.kv_batch],
                                  block_size=cache.block_size, block_col=self._block_col)
        elif triton_decode:
            kv_pos, kv_len = positions[program.kv_batch], (start + new)[program.kv_batch]  # [N, 1], [N]

        def real_positions(op: _Apply) -> Tensor:
            """Flat indices of the real tokens among the application's rows x T, from the rows (no host sync)."""
            members = range(B) if op.whole else op.members
            return to_device(torch.tensor([i * T + t for i, b in enumerate(members) for t in range(num_new[b])],
                                          dtype=torch.long), dev)

        views: dict[int, tuple[dict[bool, Tensor | None], dict[bool, tuple[Tensor, Tensor]], Tensor | None]] = {}

        def rows_view(op: _Apply) -> tuple[dict[bool, Tensor | None], dict[bool, tuple[Tensor, Tensor]], Tensor | None]:
            """Masks and rotary tables of the application's rows, by layer kind (sliding or not), and which of their
            positions are real tokens (None: all are); shared by row set."""
            got = views.get(op.rowset)
            if got is None:
                pick = (lambda t, rows=op.rows if op.span is None else op.span: t[rows])
                masks = {False: None if mask is None else pick(mask),
                         True: None if window_mask is None else pick(window_mask)}
                tables = {kind: (pick(c), pick(s)) for kind, (c, s) in rope.items()}
                keep = real_positions(op) if padded else None
                got = views[op.rowset] = (masks, tables, keep)
            return got

        buffers = tokens.new_zeros((plan.num_buffers, B, T, model.args.dim), dtype=model.dtype)
        buffers[0] = model.embed_tokens(tokens)
        for op in program.ops:
            if isinstance(op, _RowOp):
                if isinstance(op.entry, Boundary):
                    assert capture is not None
                    capture(op.entry.step, op.rows, buffers[0, op.rows])
                else:
                    _row_op(buffers, op)
                continue
            layers = op.entry.layers
            views_ = rows_view(op)  # on the main stream, before any side stream reads them
            if op.entry.kind == "mlp":
                self._run(buffers, op, lambda x, g0, g1, layers=layers, keep=views_[2]:
                          model.mlp(x, model.weights(layers[g0:g1]), keep, fused=fused))
                continue

            def attend(x: Tensor, g0: int, g1: int, op: _Apply = op, views_: tuple = views_) -> Tensor:
                G, m = x.shape[:2]
                kv = slice(op.kv.start + g0 * m, op.kv.start + g1 * m)
                at, blocks = kv_at[kv].reshape(-1), kv_blocks[kv]

                masks, tables, keep = views_
                chosen = op.entry.layers[g0:g1]
                kinds = [i in model.args.sliding_layers for i in chosen]
                windows = [model.args.sliding_window if k else None for k in kinds]
                mk = None
                if len(set(kinds)) == 1:
                    if masks[kinds[0]] is not None:
                        mk = masks[kinds[0]] if G == 1 else masks[kinds[0]].repeat(G, 1, 1, 1)
                    cos, sin = (t[None] for t in tables[kinds[0]])
                else:  # a fused group mixing windowed and global layers: each layer its own mask and rotary table
                    if masks[False] is not None:
                        mk = torch.cat([masks[k] for k in kinds])
                    cos, sin = (torch.stack([tables[k][j] for k in kinds]) for j in (0, 1))

                def cached(q: Tensor, new_kv: Tensor) -> Tensor:
                    cache.write(at, new_kv.reshape(-1, *new_kv.shape[3:]))  # [G, m, T, 2 kv, hd] -> [N, 2 kv, hd]
                    if layout is not None and len(set(kinds)) == 1:
                        return paged_attention(q, cache.pool, layout, kv, scale=model.args.query_scale,
                                               window=windows[0])
                    if kv_pos is not None:
                        scale, pos, lens = model.args.query_scale, kv_pos[kv], kv_len[kv]
                        if len(set(kinds)) == 1:
                            return paged_decode_attention(q, cache.pool, blocks, pos, lens, scale=scale,
                                                          window=windows[0], tiling=self.tiling)
                        # each layer of the group over its own m rows (q is [G*m, ...], layer-major), its own window
                        parts = [slice(g * m, (g + 1) * m) for g in range(G)]
                        return torch.cat([paged_decode_attention(q[r], cache.pool, blocks[r], pos[r], lens[r],
                                                                 scale=scale, window=w, tiling=self.tiling)
                                          for r, w in zip(parts, windows)])
                    return model.sdpa(q, *cache.read(blocks), mk)

                return model.attention(x, model.weights(chosen), cos, sin, cached, keep, fused=fused)

            self._run(buffers, op, attend)
        h = buffers[0]
        if hidden:
            return h.clone() if plan.num_buffers > 1 else h  # not holding the other buffers
        if logits_at is not None:
            return model.logits(h[torch.arange(B, device=dev), logits_at])  # [B, V]
        if not padded:
            return model.logits(h)
        out = model.logits(h[valid])  # [real tokens, V]: the LM head skips the padding too
        return out.new_zeros(B, T, out.shape[-1]).index_put_((valid,), out)

    # -- internals -----------------------------------------------------------------------------------------------

    def _run(self, buffers: Tensor, op: _Apply, unit: Callable[[Tensor, int, int], Tensor]) -> None:
        """Gather the application's inputs, run it (fused, or one layer per CUDA stream), scatter-add its outputs.
        unit(x, g0, g1) applies layers[g0:g1] to x [g1 - g0, m, T, d]. A fused group runs at most
        `MAX_GROUP_TOKENS` (layer, position) pairs at once, so a wide group over a long prefill holds the activations
        of a few layers, not of all of them."""
        if op.whole:
            buffers[0] += unit(buffers[0][None], 0, 1)[0]
            return
        G, m = op.src.shape
        if op.src_one is not None:  # one input for every layer (a group's shared input): no per-layer gather
            one = buffers[op.src_one, op.rows if op.span is None else op.span]
            x = one[None].expand(G, *one.shape)
        else:
            x = buffers[op.src, op.rows[None, :]]  # [G, m, T, d]
        streams = self.group_mode == "streams" and G > 1
        step = G if streams else max(1, MAX_GROUP_TOKENS // (m * x.shape[2]))
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            if streams:
                out = torch.cat(self._on_streams(x, [lambda g=g: unit(x[g : g + 1], g, g + 1) for g in range(G)]))
            else:
                out = unit(x[g0:g1], g0, g1)
            self._add_out(buffers, op, out, g0, g1)

    def _add_out(self, buffers: Tensor, op: _Apply, out: Tensor, g0: int, g1: int) -> None:
        """Scale layers g0..g1-1's outputs [g1 - g0, m, T, d] and add them into their destination buffers."""
        m = op.src.shape[1]
        if op.scale is not None:
            out = out * op.scale[g0:g1]
        if op.dst_per_row:
            out = out.sum(0) if g1 - g0 > 1 else out[0]  # [m, T, d]
            if op.span is not None and op.dst_one is not None:
                buffers[op.dst_one, op.span] += out
                return
            dst = op.flat_dst
        else:
            dst = op.flat_dst[g0 * m : g1 * m]
        flat = buffers.view(-1, *buffers.shape[2:])  # [buffers x rows, T, d]
        flat.index_add_(0, dst, out.reshape(-1, *out.shape[-2:]))

    def _on_streams(self, x: Tensor, jobs: list) -> list[Tensor]:
        if x.device.type != "cuda":
            return [job() for job in jobs]
        while len(self._streams) < len(jobs):
            self._streams.append(torch.cuda.Stream(device=x.device))
        main = torch.cuda.current_stream(x.device)
        outs: list[Tensor] = []
        for job, stream in zip(jobs, self._streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(job())
        for out, stream in zip(outs, self._streams):
            main.wait_stream(stream)
            out.record_stream(main)
        return outs

    def _compile(self, plan: StepPlan, rows: list[Row]) -> _Program:
        """The plan's index tensors for this batch layout (cached while the layout holds)."""
        klass = {s: i for i, s in enumerate(plan.schedules)}
        layout = (id(plan), tuple(klass[r.schedule] for r in rows))
        got = self._compiled.get(layout)
        if got is not None:
            self._compiled.move_to_end(layout)
            return got
        dev = self.model.device
        members: list[list[int]] = [[] for _ in plan.schedules]
        for b, r in enumerate(rows):
            members[klass[r.schedule]].append(b)
        # each queued from pinned memory: `torch.tensor(xs, device=...)` is a blocking copy, which made the host
        # wait for the decode step in flight whenever a new layout compiled (overlapped decoding)
        index = lambda xs: to_device(torch.tensor(xs, dtype=torch.long), dev)
        ops: list[_Apply | _RowOp] = []
        rowsets: dict[tuple[int, ...], int] = {}
        kv_pairs: list[tuple[int, Slot]] = []
        kv_batch: list[int] = []
        B = len(rows)
        for e in plan.entries:
            if not isinstance(e, Apply):
                ops.append(_RowOp(e, index(members[e.schedule]), _span(members[e.schedule])))
                continue
            batch_rows = [b for u in e.uses[0] for b in members[u.schedule]]
            src = [[u.src for u in uses for _ in members[u.schedule]] for uses in e.uses]
            dst = [[u.dst for u in uses for _ in members[u.schedule]] for uses in e.uses]
            scale = [[u.scale for u in uses for _ in members[u.schedule]] for uses in e.uses]
            kv = None
            if e.kind == "attn":
                start = len(kv_pairs)
                for uses in e.uses:
                    for u in uses:
                        for b in members[u.schedule]:
                            kv_pairs.append((b, u.slot))
                            kv_batch.append(b)
                kv = slice(start, len(kv_pairs))
            span = _span(batch_rows)
            whole = (len(e.layers) == 1 and span == slice(0, B) and set(src[0]) == {0} and set(dst[0]) == {0}
                     and set(scale[0]) == {1.0})
            all_one = all(s == 1.0 for layer in scale for s in layer)
            srcs, dsts = {v for layer in src for v in layer}, {v for layer in dst for v in layer}
            per_row = all(layer == dst[0] for layer in dst) and len(set(batch_rows)) == len(batch_rows)
            flat = [d * B + b for d, b in zip(dst[0], batch_rows)] if per_row else \
                [d * B + b for layer in dst for d, b in zip(layer, batch_rows)]
            ops.append(_Apply(
                e, index(batch_rows), rowsets.setdefault(tuple(batch_rows), len(rowsets)), index(src), index(dst),
                None if all_one else to_device(torch.tensor(scale, dtype=self.model.dtype), dev)[:, :, None, None],
                kv, whole, span, next(iter(srcs)) if len(srcs) == 1 else None,
                next(iter(dsts)) if len(dsts) == 1 else None, per_row, index(flat), tuple(batch_rows),
            ))
        program = _Program(plan, ops, tuple(kv_pairs), index(kv_batch))
        if len(self._compiled) >= MAX_PROGRAMS:
            self._compiled.popitem(last=False)
        self._compiled[layout] = program
        return program


def _span(rows: list[int]) -> slice | None:
    """rows as a slice when they are consecutive batch rows, once each, in order (as a captured step's groups are)."""
    return slice(rows[0], rows[-1] + 1) if rows and rows == list(range(rows[0], rows[-1] + 1)) else None


def _row_op(buffers: Tensor, op: _RowOp) -> None:
    e, rows = op.entry, op.rows if op.span is None else op.span
    if isinstance(e, Copy):
        buffers[e.dst_lo : e.dst_hi, rows] = buffers[e.src, rows][None]
    else:  # Merge: h = x + w * sum_i (t_i - x)
        x = buffers[1, rows]
        buffers[0, rows] = x + e.weight * (buffers[2 : 2 + e.members, rows] - x[None]).sum(0)
