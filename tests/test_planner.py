"""The step planner on its own: pure data, no model. A plan run on scalar 'layers' must give every row exactly its own
schedule, write each of its KV slots once, and read each MLP once per pass for increasing-order schedules."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from server.policy.compiler import Schedule, compile_schedule
from server.policy.planner import Apply, Boundary, Copy, Merge, StepPlan, plan_step

N = 12
NAMED = ["full", "skip:3", "skip:4-7", "pairs", "pairs:2-8", "parallel", "parallel:3-5", "loop:x3", "loop:2-9x2",
         "reverse", "shuffle:2-9:4", "repeat", "schedule:0-3,4+6/sum,5+7+9/mean,8+8/pairs,10-11",
         "schedule:0,3,2,1,4+5/pairs,11"]
INCREASING = ["full", "skip:3", "skip:4-7", "pairs", "pairs:2-8", "parallel", "parallel:3-5", "loop:x3",
              "loop:2-9x2"]


def unit(kind: str, layer: int, v: float) -> float:
    """A distinct nonlinear function per (kind, layer): any mix-up of inputs or units changes the result."""
    a = 0.7 + 0.13 * layer + (0.05 if kind == "mlp" else 0.0)
    return math.sin(a * v + 0.3 * layer) * (0.5 if kind == "attn" else 0.8)


def reference(schedule: Schedule, h: float) -> float:
    """The schedule's meaning, straight from the policy definitions (README's policy table)."""
    for step in schedule.steps:
        if len(step.layers) == 1:
            (i,) = step.layers
            h = h + unit("attn", i, h)
            h = h + unit("mlp", i, h)
        elif step.combine == "pairs":
            h2 = h + sum(unit("attn", i, h) for i in step.layers)
            h = h2 + sum(unit("mlp", i, h2) for i in step.layers)
        else:
            deltas = [unit("attn", i, h) + unit("mlp", i, h + unit("attn", i, h)) for i in step.layers]
            h = h + (sum(deltas) / len(deltas) if step.combine == "mean" else sum(deltas))
    return h


def run_plan(plan: StepPlan, inputs: list[float]) -> tuple[list[float], list[list[tuple[int, int]]]]:
    """Interpret the plan on one scalar row per schedule; returns outputs and each row's KV writes in order."""
    buf = [[0.0] * plan.num_buffers for _ in inputs]
    for b, v in zip(buf, inputs):
        b[0] = v
    writes: list[list[tuple[int, int]]] = [[] for _ in inputs]
    for e in plan.entries:
        if isinstance(e, Boundary):
            continue
        if isinstance(e, Copy):
            for j in range(e.dst_lo, e.dst_hi):
                buf[e.schedule][j] = buf[e.schedule][e.src]
        elif isinstance(e, Merge):
            b = buf[e.schedule]
            b[0] = b[1] + e.weight * sum(b[2 + i] - b[1] for i in range(e.members))
        else:
            assert isinstance(e, Apply)
            # All reads of a fused application happen before its writes.
            outs = [(u, unit(e.kind, layer, buf[u.schedule][u.src]))
                    for layer, uses in zip(e.layers, e.uses) for u in uses]
            for u, out in outs:
                buf[u.schedule][u.dst] += u.scale * out
                if e.kind == "attn":
                    assert u.slot is not None
                    writes[u.schedule].append(u.slot)
    return [b[0] for b in buf], writes


policy_sets = st.lists(st.sampled_from(NAMED), min_size=1, max_size=5, unique=True)


@settings(max_examples=200, deadline=None)
@given(policy_sets, st.floats(-2, 2))
def test_every_row_computes_exactly_its_schedule(policies: list[str], h: float) -> None:
    schedules = tuple(compile_schedule(p, N) for p in policies)
    plan = plan_step(schedules)
    outs, writes = run_plan(plan, [h] * len(schedules))
    for s, out, w in zip(schedules, outs, writes):
        assert math.isclose(out, reference(s, h), rel_tol=1e-12, abs_tol=1e-12), s.policy
        assert sorted(w) == sorted(s.slots) and len(set(w)) == len(w), "each slot written exactly once"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(INCREASING), min_size=1, max_size=4, unique=True))
def test_increasing_schedules_read_each_mlp_once_per_pass(policies: list[str]) -> None:
    schedules = tuple(compile_schedule(p, N) for p in policies)
    plan = plan_step(schedules)
    for layer in range(N):
        passes = max(Counter(i for st_ in s.steps for i in st_.layers)[layer] for s in schedules)
        assert plan.reads("mlp", layer) == passes, (policies, layer)
        # Attention may be re-read where orders conflict (full alternates, pairs and parallel apply attentions first).
        assert passes <= plan.reads("attn", layer) <= len(schedules) * passes, (policies, layer)


def test_full_and_pairs_share_every_mlp_and_reread_only_odd_attentions() -> None:
    full, pairs = compile_schedule("full", N), compile_schedule("pairs:2-9", N)
    plan = plan_step((full, pairs))
    assert all(plan.reads("mlp", i) == 1 for i in range(N))
    assert [i for i in range(N) if plan.reads("attn", i) == 2] == [3, 5, 7, 9]


def test_the_benchmark_mix_reads_each_layer_once_but_the_pairs_odd_attentions() -> None:
    mix = tuple(compile_schedule(p, 30) for p in ("full", "skip:8", "pairs"))
    plan = plan_step(mix)
    assert all(plan.reads("mlp", i) == 1 for i in range(30))
    assert sum(plan.reads("attn", i) for i in range(30)) == 30 + 11  # pairs:4-25 has 11 pairs


def test_units_read_counts_each_application_once_with_its_costs() -> None:
    full, skip, pairs = (compile_schedule(p, 30) for p in ("full", "skip:8", "pairs"))
    cost = dict(attn_cost=1, mlp_cost=2)
    assert plan_step((full,)).units_read(**cost) == 30 * 3
    assert plan_step((skip,)).units_read(**cost) == 22 * 3
    assert plan_step((full, skip)).units_read(**cost) == 30 * 3  # skip:8 reads a subset of full's units
    assert plan_step((full, skip, pairs)).units_read(**cost) == 30 * 3 + 11  # the pairs' re-read attentions


def test_parallel_rows_alone_run_their_group_as_one_fused_application() -> None:
    plan = plan_step((compile_schedule("parallel:2-9", N),))
    fused = [e for e in plan.entries if isinstance(e, Apply) and len(e.layers) > 1]
    assert [(e.kind, e.layers) for e in fused] == [("attn", tuple(range(2, 10))), ("mlp", tuple(range(2, 10)))]


def test_skip_rows_wait_while_full_rows_run_the_skipped_layers() -> None:
    plan = plan_step((compile_schedule("full", N), compile_schedule("skip:4-7", N)))
    assert all(plan.reads(k, i) == 1 for k in ("attn", "mlp") for i in range(N))
    layer8 = next(e for e in plan.entries if isinstance(e, Apply) and e.layers == (8,) and e.kind == "attn")
    assert {u.schedule for u in layer8.uses[0]} == {0, 1}


def test_same_slot_ids_across_schedules() -> None:
    full, skip, loop = (compile_schedule(p, N) for p in ("full", "skip:4-7", "loop:2-9x3"))
    assert (10, 0) in full.slots and (10, 0) in skip.slots
    assert {o for (layer, o) in loop.slots if layer == 5} == {0, 1, 2}


def test_plans_are_cached_by_the_schedules_present() -> None:
    a = plan_step((compile_schedule("full", N), compile_schedule("pairs", N)))
    b = plan_step((compile_schedule("full", N), compile_schedule("pairs", N)))
    assert a is b


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(NAMED), st.floats(-2, 2))
def test_boundaries_mark_the_state_entering_each_step(policy: str, h: float) -> None:
    """A probe plan marks every step boundary in order, and h there is the reference after that many steps."""
    schedule = compile_schedule(policy, N)
    plan = plan_step((schedule,), boundaries=True)
    buf = [h] + [0.0] * (plan.num_buffers - 1)
    seen = []
    for e in plan.entries:
        if isinstance(e, Boundary):
            prefix = Schedule(schedule.steps[: e.step], N, schedule.policy)
            assert math.isclose(buf[0], reference(prefix, h), rel_tol=1e-12, abs_tol=1e-12)
            seen.append(e.step)
        elif isinstance(e, Copy):
            for j in range(e.dst_lo, e.dst_hi):
                buf[j] = buf[e.src]
        elif isinstance(e, Merge):
            buf[0] = buf[1] + e.weight * sum(buf[2 + i] - buf[1] for i in range(e.members))
        else:
            outs = [(u, unit(e.kind, layer, buf[u.src])) for layer, uses in zip(e.layers, e.uses) for u in uses]
            for u, out in outs:
                buf[u.dst] += u.scale * out
    assert seen == list(range(len(schedule.steps) + 1))
    assert not any(isinstance(e, Boundary) for e in plan_step((schedule,)).entries)
