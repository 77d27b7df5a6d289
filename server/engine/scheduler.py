"""The scheduler: the one owner of every `Request`, waiting then running, and of admission. Plain data, no torch.

Every running request decodes every step, whatever its policy; the scheduler decides who is running. A request is
admitted when `max_running` and the KV manager's budget allow (it reserves the blocks its whole length needs, so a
running request never runs out of cache). The oldest waiting request goes first; younger ones never overtake it, so
a stream of small requests cannot starve a large one. A request that could never fit is refused at `enqueue`
(`KVBudgetError`, a 400 naming the limit). Whatever ends a request (finished, stopped, aborted, disconnected, failed,
drained), `finish` is where it leaves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.engine.kv_manager import KVBudgetError, KVManager
from server.engine.request import Request, Status

__all__ = ["Admission", "DrainingError", "KVBudgetError", "QueueFullError", "Scheduler"]


class DrainingError(RuntimeError):
    """The server is draining for shutdown and takes no new requests (HTTP 503)."""


class QueueFullError(Exception):
    """The waiting queue is at capacity; the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class Admission:
    """The scheduler's decision for one step: who joins (prefill) and who was already running (decode)."""

    admitted: tuple[Request, ...] = ()
    running: tuple[Request, ...] = ()


class Scheduler:
    def __init__(self, *, max_running: int, queue_capacity: int, kv: KVManager) -> None:
        self.max_running, self.queue_capacity, self.kv = max_running, queue_capacity, kv
        self.waiting: OrderedDict[str, Request] = OrderedDict()
        self.running: dict[str, Request] = {}

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.waiting) and self._fits(next(iter(self.waiting.values()))))

    def get(self, request_id: str) -> Request | None:
        return self.waiting.get(request_id) or self.running.get(request_id)

    def check(self, request: Request) -> None:
        """Raise KVBudgetError when a request of this shape could never be admitted."""
        self.kv.check(request)

    def enqueue(self, *requests: Request) -> None:
        """Queue `requests` (one request's prompts and choices), all or none: QueueFullError when they do not all
        fit the queue."""
        for request in requests:
            self.check(request)
        if len(self.waiting) + len(requests) > self.queue_capacity:
            brings = f"; this request brings {len(requests)}" if len(requests) > 1 else ""
            raise QueueFullError(f"{len(self.waiting)} requests already waiting (capacity {self.queue_capacity})"
                                 f"{brings}")
        for request in requests:
            assert self.get(request.id) is None, f"duplicate id {request.id}"
            request.status = Status.WAITING
            self.waiting[request.id] = request

    def admit(self) -> Admission:
        """Move the oldest waiting requests that fit to running, reserving their KV."""
        running = tuple(self.running.values())
        admitted: list[Request] = []
        while self.waiting:
            oldest = next(iter(self.waiting.values()))
            if not self._fits(oldest):
                break
            del self.waiting[oldest.id]
            self.kv.reserve(oldest)
            oldest.status = Status.RUNNING
            self.running[oldest.id] = oldest
            admitted.append(oldest)
        return Admission(tuple(admitted), running)

    def finish(self, request_id: str, reason: str, error: str | None = None) -> Request | None:
        """End a request whatever the reason: it leaves the queue or the running set, and a running one's KV
        reservation and blocks are freed. Returns it (None when it is not here). A waiting request holds no KV, so
        ending one touches nothing the engine thread owns."""
        request = self.waiting.pop(request_id, None)
        if request is None:
            request = self.running.pop(request_id, None)
            if request is None:
                return None
            self.kv.free(request_id)
        request.set_finished(reason, error)
        request.status = Status.FINISHED
        return request

    def _fits(self, r: Request) -> bool:
        return len(self.running) < self.max_running and self.kv.can_reserve(r)
