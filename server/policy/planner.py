"""The step planner: the schedules present in a batch -> one ordered list of layer applications. Pure; no torch.

The unit of sharing is a layer's weights, not a schedule step: every row that applies layer 5's attention now, whatever
its schedule, joins one application (one batched matmul over all of them). Each row runs a small program over its own
buffers (0 = h, the residual stream; 1 = x, a group's shared input; 2 + i = member i of a mean/sum group):

    one layer l:                 h += A_l(h);  h += M_l(h)
    group, combine "pairs":      x = h;  h += sum_i A_i(x);  x = h;  h += sum_i M_i(x)
    group, "mean" / "sum":       x = h;  t_i = x;  t_i += A_i(x);  h = x + w sum_i (t_i - x);  h += w sum_i M_i(t_i)
                                 (w = 1/k for mean, 1 for sum)

A program is a list of stages: the applications of a stage are independent of each other (any order), the stages
run in order, and a stage's buffer operations (`Copy`, `Merge`) run before its first application. The plan is built
greedily: at each point every schedule has a set of ready units (its current stage); the planner applies the unit
whose application now costs no extra weight read (no schedule that still needs it later is left out), choosing the
lowest layer; when every choice costs a read, it re-reads the cheapest weights (attention, ~1/4 of a Llama layer)
rather than the MLP's. Schedules that run layers in increasing order therefore read every MLP once per pass, while
orders that conflict (a `pairs` row applies both attentions before either MLP, a `full` row alternates) re-read an
attention. Consecutive applications of adjacent layers to the same rows within one stage are fused into one
multi-layer application (one bmm over a view of the stacked weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from server.policy.compiler import Schedule, Slot

Kind = Literal["attn", "mlp"]
H, X, T0 = 0, 1, 2  # buffer ids: residual stream, group input, first group member


@dataclass(frozen=True)
class Use:
    """One schedule's part of an application: read buffer `src`, add `scale` x the unit's output to `dst`."""

    schedule: int  # index into StepPlan.schedules
    src: int
    dst: int
    scale: float = 1.0
    slot: Slot | None = None  # the KV slot written (attention only)


@dataclass(frozen=True)
class Apply:
    """Layers `layers` (adjacent, fused when more than one) of one kind over the rows of `uses[g]` for layer g.
    Every layer of a fused application has uses for the same schedules in the same order."""

    kind: Kind
    layers: tuple[int, ...]
    uses: tuple[tuple[Use, ...], ...]  # [layer][use]


@dataclass(frozen=True)
class Copy:
    """buffers[dst_lo:dst_hi] = buffers[src] for the rows of `schedule`."""

    schedule: int
    src: int
    dst_lo: int
    dst_hi: int


@dataclass(frozen=True)
class Merge:
    """h = x + weight * sum_{i < members} (t_i - x) for the rows of `schedule` (a mean/sum group's attention)."""

    schedule: int
    members: int
    weight: float


@dataclass(frozen=True)
class Boundary:
    """The rows of `schedule` have finished `step` steps: buffer h holds the state entering step `step` (the final
    output when it equals the number of steps). Only in plans made for probes."""

    schedule: int
    step: int


Entry = Apply | Copy | Merge | Boundary


@dataclass(frozen=True)
class StepPlan:
    schedules: tuple[Schedule, ...]
    entries: tuple[Entry, ...]
    num_buffers: int

    def reads(self, kind: Kind, layer: int) -> int:
        """How many times the plan reads the weights of (kind, layer)."""
        return sum(1 for e in self.entries if isinstance(e, Apply) and e.kind == kind and layer in e.layers)

    def units_read(self, *, attn_cost: int, mlp_cost: int) -> int:
        """The weight the plan reads in one step, re-reads included: each application reads its layers' units once,
        an attention costing attn_cost and an MLP mlp_cost (bytes, or any unit)."""
        return sum((attn_cost if e.kind == "attn" else mlp_cost) * len(e.layers)
                   for e in self.entries if isinstance(e, Apply))


@dataclass(frozen=True)
class _Op:
    kind: Kind
    layer: int
    src: int
    dst: int
    scale: float
    slot: Slot | None


@dataclass(frozen=True)
class _Stage:
    before: tuple[Copy | Merge, ...]
    ops: tuple[_Op, ...]
    step: int = 0  # the schedule step this stage belongs to


def program(schedule: Schedule, index: int = 0) -> list[_Stage]:
    """A schedule's computation as stages of independent unit applications (see the module docstring)."""
    stages: list[_Stage] = []
    for n, step in enumerate(schedule.steps):
        k = len(step.layers)
        pairs = list(zip(step.layers, step.slots))
        if k == 1:
            (layer, slot), = pairs
            stages.append(_Stage((), (_Op("attn", layer, H, H, 1.0, slot),), n))
            stages.append(_Stage((), (_Op("mlp", layer, H, H, 1.0, None),), n))
        elif step.combine == "pairs":
            snapshot = (Copy(index, H, X, X + 1),)
            stages.append(_Stage(snapshot, tuple(_Op("attn", l, X, H, 1.0, s) for l, s in pairs), n))
            stages.append(_Stage(snapshot, tuple(_Op("mlp", l, X, H, 1.0, None) for l, _ in pairs), n))
        else:
            w = 1.0 / k if step.combine == "mean" else 1.0
            before = (Copy(index, H, X, X + 1), Copy(index, X, T0, T0 + k))
            stages.append(_Stage(before, tuple(_Op("attn", l, X, T0 + i, 1.0, s) for i, (l, s) in enumerate(pairs)), n))
            stages.append(_Stage((Merge(index, k, w),),
                                 tuple(_Op("mlp", l, T0 + i, H, w, None) for i, (l, _) in enumerate(pairs)), n))
    return stages


def plan_step(schedules: tuple[Schedule, ...], *, attn_cost: int = 1, mlp_cost: int = 3,
              boundaries: bool = False) -> StepPlan:
    """Plan one forward pass over rows of `schedules` (distinct; rows of schedule i are 'schedule i' in the plan).
    attn_cost, mlp_cost: relative weight bytes of a layer's attention and MLP (only their order matters).
    boundaries: also mark where each schedule's steps end (`Boundary`), for probes that read the states there."""
    return _plan(tuple(schedules), attn_cost, mlp_cost, boundaries)


@lru_cache(maxsize=256)
def _plan(schedules: tuple[Schedule, ...], attn_cost: int, mlp_cost: int, boundaries: bool) -> StepPlan:
    programs = [program(s, i) for i, s in enumerate(schedules)]
    # later[i][j]: units that schedule i applies in stages after stage j
    later: list[list[frozenset[tuple[Kind, int]]]] = []
    for stages in programs:
        suffix: list[frozenset[tuple[Kind, int]]] = [frozenset()] * (len(stages) + 1)
        for j in range(len(stages) - 1, -1, -1):
            suffix[j] = suffix[j + 1] | {(op.kind, op.layer) for op in stages[j].ops}
        later.append(suffix[1:] + [frozenset()])
    stage = [0] * len(programs)
    pending: list[list[_Op]] = [list(p[0].ops) if p else [] for p in programs]
    raw: list[tuple[Entry, tuple[tuple[int, int], ...]]] = []  # entry, (schedule, stage) of its uses
    for i, p in enumerate(programs):
        if boundaries:
            raw.append((Boundary(i, 0), ()))
        if p:
            raw.extend((e, ()) for e in p[0].before)
    cost = {"attn": attn_cost, "mlp": mlp_cost}

    while any(pending):
        ready: dict[tuple[Kind, int], list[int]] = {}
        for i, ops in enumerate(pending):
            for op in ops:
                ready.setdefault((op.kind, op.layer), [])
                if i not in ready[(op.kind, op.layer)]:
                    ready[(op.kind, op.layer)].append(i)

        def price(unit: tuple[Kind, int]) -> tuple[int, int, int]:
            left_out = any(unit in later[i][stage[i]] for i in range(len(programs))
                           if pending[i] and i not in ready[unit])
            return (cost[unit[0]] if left_out else 0, unit[1], 0 if unit[0] == "attn" else 1)

        unit = min(ready, key=price)
        uses = []
        for i in ready[unit]:
            mine = [op for op in pending[i] if (op.kind, op.layer) == unit]
            uses.extend(Use(i, op.src, op.dst, op.scale, op.slot) for op in mine)
            pending[i] = [op for op in pending[i] if (op.kind, op.layer) != unit]
        raw.append((Apply(unit[0], (unit[1],), (tuple(uses),)), tuple((i, stage[i]) for i in ready[unit])))
        for i in ready[unit]:
            if pending[i]:
                continue
            nxt = programs[i][stage[i] + 1] if stage[i] + 1 < len(programs[i]) else None
            if boundaries and (nxt is None or nxt.step != programs[i][stage[i]].step):
                raw.append((Boundary(i, programs[i][stage[i]].step + 1), ()))
            if nxt is not None:
                stage[i] += 1
                raw.extend((e, ()) for e in nxt.before)
                pending[i] = list(nxt.ops)

    num_buffers = max([T0 + len(st.layers) for s in schedules for st in s.steps if len(st.layers) > 1] or [T0])
    return StepPlan(schedules, _fuse(raw), num_buffers)


def _fuse(raw: list[tuple[Entry, tuple[tuple[int, int], ...]]]) -> tuple[Entry, ...]:
    """Merge runs of applications of adjacent layers, same kind, same rows, same stage of every schedule, one use per
    schedule: they are independent, so they run as one bmm over a view of the stacked weights."""
    out: list[Entry] = []
    tags: list[tuple[tuple[int, int], ...] | None] = []
    for entry, tag in raw:
        prev = out[-1] if out else None
        if (
            isinstance(entry, Apply) and isinstance(prev, Apply) and tags[-1] == tag
            and prev.kind == entry.kind and entry.layers[0] == prev.layers[-1] + 1
            and len(entry.uses[0]) == len(tag) and len(prev.uses[0]) == len(tag)
            and [u.schedule for u in entry.uses[0]] == [u.schedule for u in prev.uses[0]]
        ):
            out[-1] = Apply(prev.kind, prev.layers + entry.layers, prev.uses + entry.uses)
            continue
        out.append(entry)
        tags.append(tag if isinstance(entry, Apply) else None)
    return tuple(out)
