"""Admission: which waiting requests join the one running batch, first come first served. Plain data, no torch.

Every running request decodes every step, whatever its policy; the scheduler only decides who is running. It owns
that: the waiting queue and the running set, each running request with the KV blocks reserved for it. A request
reserves, when admitted, the blocks its whole length needs under its schedule (slots x ceil((prompt + max_tokens) /
block size)), so a running request never runs out of cache. The oldest waiting request is admitted as soon as
`max_running` and the KV budget allow; younger ones never overtake it, so a stream of small requests cannot starve
a large one. A request that could never fit is refused at `add` (`KVBudgetError`, a 400 naming the limit).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class QueueFullError(Exception):
    """The waiting queue is at capacity; the caller should retry later (HTTP 429)."""


class KVBudgetError(ValueError):
    """The request needs more KV cache than the whole budget; the message names the limit and what would fit."""


@dataclass(frozen=True)
class SchedRequest:
    id: str
    num_slots: int  # KV slots of its schedule (attention runs per token)
    max_len: int  # prompt + max_tokens
    arrival: float


@dataclass(frozen=True)
class SchedulerOutput:
    admit: tuple[str, ...] = ()  # waiting requests that join the batch in this step (prefill)
    running: tuple[str, ...] = ()  # requests already running (decode one token)


class Scheduler:
    def __init__(self, *, max_running: int, queue_capacity: int, kv_blocks: int, block_size: int) -> None:
        self.max_running, self.queue_capacity = max_running, queue_capacity
        self.kv_blocks, self.block_size = kv_blocks, block_size
        self.waiting: OrderedDict[str, SchedRequest] = OrderedDict()
        self.running: dict[str, int] = {}  # request id -> KV blocks reserved

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def reserved_blocks(self) -> int:
        return sum(self.running.values())

    @property
    def budget_slot_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    @property
    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.waiting) and self._fits(next(iter(self.waiting.values()))))

    def blocks(self, num_slots: int, max_len: int) -> int:
        return num_slots * -(-max_len // self.block_size)

    def check(self, num_slots: int, max_len: int) -> None:
        """Raise KVBudgetError when a request of this shape could never be admitted."""
        need = self.blocks(num_slots, max_len)
        if need > self.kv_blocks:
            fits = (self.kv_blocks // num_slots) * self.block_size
            raise KVBudgetError(
                f"this request needs {num_slots} KV slots (its policy's attention runs) x {max_len} tokens "
                f"(prompt + max_tokens) = {need * self.block_size} slot-tokens, but the server's KV budget is "
                f"{self.budget_slot_tokens} slot-tokens; under this policy prompt + max_tokens must be at most {fits}"
            )

    def add(self, request: SchedRequest) -> None:
        self.check(request.num_slots, request.max_len)
        if len(self.waiting) >= self.queue_capacity:
            raise QueueFullError(f"{len(self.waiting)} requests already waiting (capacity {self.queue_capacity})")
        assert request.id not in self.waiting and request.id not in self.running, f"duplicate id {request.id}"
        self.waiting[request.id] = request

    def abort(self, request_id: str) -> bool:
        """Drop a waiting request; returns True when it is running instead (the engine must abort it)."""
        if self.waiting.pop(request_id, None) is not None:
            return False
        return request_id in self.running

    def finish(self, request_ids: list[str]) -> None:
        """Running requests that left the batch (finished, aborted or failed): their reservations end."""
        for r in request_ids:
            self.running.pop(r, None)

    def schedule(self) -> SchedulerOutput:
        running = tuple(self.running)
        admit: list[str] = []
        while self.waiting:
            oldest = next(iter(self.waiting.values()))
            if not self._fits(oldest):
                break
            del self.waiting[oldest.id]
            self.running[oldest.id] = self.blocks(oldest.num_slots, oldest.max_len)
            admit.append(oldest.id)
        return SchedulerOutput(tuple(admit), running)

    def _fits(self, r: SchedRequest) -> bool:
        return (len(self.running) < self.max_running
                and self.reserved_blocks + self.blocks(r.num_slots, r.max_len) <= self.kv_blocks)
