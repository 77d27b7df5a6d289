"""The schedule compiler: (policy, number of layers) -> an immutable schedule of steps. Pure; imports no torch.

A schedule is what the executor runs: a tuple of steps, each one layer or a group of layers that read the same
input, with the KV-cache slot of every attention it runs. A slot is (layer, occurrence): the k-th time the schedule
runs that layer. Slot ids do not depend on the rest of the schedule, so `full` and `skip:10` name the same slot for
layer 20 and `loop:x3` uses occurrences 0-2 of its layers. A skipped layer has no slot; a layer run twice has two.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

from server.policy.policy import RANGE_KINDS, Combine, Group, Policy, PolicyError, parse_policy


Slot = tuple[int, int]  # (layer, occurrence)


@dataclass(frozen=True)
class Step:
    layers: tuple[int, ...]
    slots: tuple[Slot, ...]  # one KV slot per layer: (layer, how many times the schedule ran it before)
    combine: Combine = "mean"

    @property
    def parallel(self) -> bool:
        return len(self.layers) > 1


@dataclass(frozen=True)
class Schedule:
    steps: tuple[Step, ...]
    num_layers: int  # of the model
    policy: str  # canonical policy string (metrics label)

    @cached_property  # derived facts are computed once per schedule: the engine asks every step
    def num_slots(self) -> int:
        return sum(len(s.layers) for s in self.steps)

    @cached_property
    def slots(self) -> tuple[Slot, ...]:
        """Every slot the schedule writes, in execution order (each once)."""
        return tuple(slot for step in self.steps for slot in step.slots)

    @cached_property
    def key(self) -> str:
        """Canonical string of what runs; equal keys mean identical computation (the batching key)."""
        return str(Policy("schedule", steps=tuple(Group(s.layers, s.combine) for s in self.steps)))

    @property
    def layer_runs(self) -> int:
        """Decoder-layer evaluations per token (the cost of the schedule in layer units)."""
        return self.num_slots


def default_span(num_layers: int) -> tuple[int, int]:
    """The middle range a range-taking policy uses when given none: all but the first and last ceil(L/8) layers
    (30 layers -> 4-25), the 'painters' the paper finds interchangeable."""
    edge = max(1, -(-num_layers // 8))
    if num_layers - 2 * edge < 2:
        edge = max(0, (num_layers - 2) // 2)
    return edge, num_layers - 1 - edge


def examples(num_layers: int | None) -> list[str]:
    """A policy of each kind that this many layers can run (30 layers: skip:10, skip:12-17, pairs:4-25,
    parallel:8-22, ..., schedule:0-9,10+11/pairs,12-29); without a count, the kinds that need no range."""
    if num_layers is None or num_layers < 5:
        return ["full", "pairs", "parallel", "reverse", "repeat"][: 1 if num_layers is not None and num_layers < 2
                                                                  else None]
    n = num_layers
    a, b = default_span(n)
    lo, hi = centred_span(n, max(1, n // 5))
    m1, m2 = n // 4 + 1, n - n // 4 - 1  # the middle half
    k = n // 3
    return ["full", f"skip:{n // 3}", f"skip:{lo}-{hi}", "pairs", f"pairs:{a}-{b}", f"parallel:{m1}-{m2}",
            f"loop:{m1}-{m2}x3", f"reverse:{m1}-{m2}", f"shuffle:{m1}-{m2}:7", f"repeat:{m1}-{m2}",
            f"schedule:0-{k - 1},{k}+{k + 1}/pairs,{k + 2}-{n - 1}"]


def centred_span(num_layers: int, count: int) -> tuple[int, int]:
    """The `count` layers centred in the stack (30 layers, 10 -> 10-19)."""
    start = (num_layers - count) // 2
    return start, start + count - 1


MIN_GROUP_CAP = 8  # a parallel group may have max(layers, this) members


def resolve(policy: Policy, num_layers: int) -> Policy:
    """Fill in defaults against the model and check every index: the canonical form of the policy."""
    if num_layers < 1:
        raise PolicyError("the model has no layers")
    top = num_layers - 1

    def check_span(span: tuple[int, int]) -> tuple[int, int]:
        if span[1] > top:
            raise PolicyError(
                f"layer range {span[0]}-{span[1]} is outside this model's layers 0-{top} ({num_layers} layers)"
            )
        return span

    k = policy.kind
    if k == "full":
        return policy
    if k == "skip":
        if policy.count is not None:
            if policy.count >= num_layers:
                raise PolicyError(f"cannot skip {policy.count} of {num_layers} layers; skip at most {num_layers - 1}")
            if policy.count == 0:
                return Policy("full")
            return Policy("skip", span=centred_span(num_layers, policy.count))
        if policy.layers is not None:
            bad = [i for i in policy.layers if i > top]
            if bad:
                raise PolicyError(f"layers {bad} are outside this model's layers 0-{top}")
            if len(policy.layers) >= num_layers:
                raise PolicyError("cannot skip every layer")
            lo, hi = policy.layers[0], policy.layers[-1]
            if list(policy.layers) == list(range(lo, hi + 1)):
                return Policy("skip", span=(lo, hi))
            return Policy("skip", layers=policy.layers)
        assert policy.span is not None
        span = check_span(policy.span)
        if span[1] - span[0] + 1 >= num_layers:
            raise PolicyError("cannot skip every layer")
        return Policy("skip", span=span)
    if k == "schedule":
        assert policy.steps is not None
        for g in policy.steps:
            bad = [i for i in g.layers if not 0 <= i <= top]
            if bad:
                raise PolicyError(f"schedule names layers {bad}, outside this model's layers 0-{top}")
            # a group runs its members at once, its buffers one per member: as wide as the model at most (the
            # widest documented group, `parallel` over every layer; a few repeats on a tiny model), not a 4 KB
            # policy's 2,000 (~30 GB at 480 tokens on SmolLM2)
            if len(g.layers) > max(num_layers, MIN_GROUP_CAP):
                raise PolicyError(f"a parallel group has {len(g.layers)} members; at most "
                                  f"{max(num_layers, MIN_GROUP_CAP)} (this model's layers) may run in one group")
        return policy  # (a one-layer group's combine rule is already "mean": `Group`)
    assert k in RANGE_KINDS
    span = check_span(policy.span if policy.span is not None else default_span(num_layers))
    return Policy(k, span=span, times=policy.times, seed=policy.seed)


def compile_schedule(policy: Policy | str, num_layers: int) -> Schedule:
    """Turn a policy into the steps that run. Pure: the same inputs always give the same schedule."""
    if isinstance(policy, str):
        policy = parse_policy(policy)
    p = resolve(policy, num_layers)
    groups = _groups(p, num_layers)
    steps: list[Step] = []
    runs: dict[int, int] = {}  # layer -> times run so far
    for layers, combine in groups:
        slots = []
        for layer in layers:
            slots.append((layer, runs.get(layer, 0)))
            runs[layer] = runs.get(layer, 0) + 1
        steps.append(Step(layers, tuple(slots), combine))
    return Schedule(tuple(steps), num_layers, str(p))


def _groups(p: Policy, n: int) -> list[tuple[tuple[int, ...], Combine]]:
    single = lambda i: ((i,), "mean")  # noqa: E731
    if p.kind == "full":
        return [single(i) for i in range(n)]
    if p.kind == "skip":
        dropped = set(p.layers) if p.layers is not None else set(range(p.span[0], p.span[1] + 1))  # type: ignore[index]
        return [single(i) for i in range(n) if i not in dropped]
    if p.kind == "schedule":
        return [(g.layers, g.combine) for g in p.steps]  # type: ignore[union-attr]
    a, b = p.span  # type: ignore[misc]
    middle = list(range(a, b + 1))
    if p.kind == "pairs":
        mid = [((i, i + 1), "pairs") if i + 1 <= b else single(i) for i in range(a, b + 1, 2)]
    elif p.kind == "parallel":
        mid = [(tuple(middle), "mean")]
    elif p.kind == "loop":
        mid = [(tuple(middle), "mean")] * p.times
    elif p.kind == "reverse":
        mid = [single(i) for i in reversed(middle)]
    elif p.kind == "shuffle":
        order = middle[:]
        random.Random(p.seed).shuffle(order)
        mid = [single(i) for i in order]
    elif p.kind == "repeat":
        centre = (a + b) // 2
        mid = [single(centre) for _ in middle]
    else:  # pragma: no cover - resolve() rejects unknown kinds
        raise AssertionError(p.kind)
    # A one-layer group (range of one layer) is a plain step.
    mid = [(ls, "mean") if len(ls) == 1 else (ls, c) for ls, c in mid]
    return [single(i) for i in range(a)] + mid + [single(i) for i in range(b + 1, n)]
