"""Continuous batching by schedule: which group of requests runs next, and who joins it. Plain data, no torch.

Requests with the same schedule key are decoded together as one group. Each engine step runs one group: the one
served least recently (round robin, so no group starves), with the waiting requests of its key admitted first,
oldest first. A request is admitted only while every older waiting request of another key could still be admitted
too, so a burst of one policy cannot starve an older request of another.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class QueueFullError(Exception):
    """The waiting queue is at capacity; the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class SchedRequest:
    id: str
    key: str  # schedule key: requests with equal keys are batched together
    arrival: float


@dataclass(frozen=True)
class SchedulerOutput:
    key: str | None  # the group to run this step; None when there is nothing to do
    admit: tuple[str, ...] = ()  # waiting requests that join the group in this step (prefill)
    running: tuple[str, ...] = ()  # requests already in the group (decode)


@dataclass
class _Group:
    members: list[str] = field(default_factory=list)
    last_served: int = -1


class Scheduler:
    def __init__(self, *, max_running: int, queue_capacity: int) -> None:
        self.max_running, self.queue_capacity = max_running, queue_capacity
        self.waiting: OrderedDict[str, SchedRequest] = OrderedDict()
        self.groups: dict[str, _Group] = {}
        self.steps = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(len(g.members) for g in self.groups.values())

    @property
    def has_work(self) -> bool:
        return bool(self.groups) or (bool(self.waiting) and self.num_running < self.max_running)

    def add(self, request: SchedRequest) -> None:
        if len(self.waiting) >= self.queue_capacity:
            raise QueueFullError(f"{len(self.waiting)} requests already waiting (capacity {self.queue_capacity})")
        assert request.id not in self.waiting, f"duplicate request id {request.id}"
        self.waiting[request.id] = request

    def abort(self, request_id: str) -> bool:
        """Drop a waiting request; returns True when it is running instead (the engine must abort it)."""
        if self.waiting.pop(request_id, None) is not None:
            return False
        return any(request_id in g.members for g in self.groups.values())

    def finish(self, request_ids: list[str]) -> None:
        """Running requests that left their group (finished or aborted); empty groups are dropped."""
        gone = set(request_ids)
        for key in list(self.groups):
            group = self.groups[key]
            group.members = [r for r in group.members if r not in gone]
            if not group.members:
                del self.groups[key]

    def schedule(self) -> SchedulerOutput:
        free = self.max_running - self.num_running
        candidates: dict[str, tuple[int, float]] = {}  # key -> (last served, oldest arrival)
        for key, group in self.groups.items():
            candidates[key] = (group.last_served, float("-inf"))
        if free > 0:
            for req in self.waiting.values():
                if req.key not in candidates:
                    candidates[req.key] = (-1, req.arrival)
        for key in sorted(candidates, key=lambda k: candidates[k]):
            admit = self._admit(key, free)
            group = self.groups.get(key)
            running = tuple(group.members) if group else ()
            if not admit and not running:  # its waiting requests must let older ones of other keys in first
                continue
            for request_id in admit:
                del self.waiting[request_id]
            group = self.groups.setdefault(key, _Group())
            group.members.extend(admit)
            self.steps += 1
            group.last_served = self.steps
            return SchedulerOutput(key, tuple(admit), running)
        return SchedulerOutput(None)

    def _admit(self, key: str, free: int) -> list[str]:
        admit: list[str] = []
        older_elsewhere = 0  # older waiting requests of other keys, each of which keeps a slot reserved
        for req in self.waiting.values():
            if req.key != key:
                older_elsewhere += 1
                continue
            if len(admit) + older_elsewhere >= free:
                break
            admit.append(req.id)
        return admit
