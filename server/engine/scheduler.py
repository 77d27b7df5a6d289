"""The scheduler: the one owner of every `Request`, waiting then running, and of admission. Plain data, no torch.

Every running request decodes every step, whatever its policy; the scheduler decides who is running. A request is
admitted when `max_running` and the KV manager's budget allow (it reserves the blocks its whole length needs, so a
running request never runs out of cache). The waiting request at the head goes first, and none behind it overtakes
it, so a stream of small requests cannot starve a large one. The head is the oldest ("fcfs", the default), or under
"priority" the oldest of the lowest `priority` value (vLLM's --scheduling-policy priority; a running request is
never preempted: it holds its reservation to the end). A request that could never fit is refused at `enqueue`
(`KVBudgetError`, a 400 naming the limit). Whatever ends a request (finished, stopped, aborted, disconnected, failed,
drained), `finish` is where it leaves.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from server.engine.kv_manager import KVBudgetError, KVManager
from server.engine.request import Request, Status

__all__ = ["Admission", "DrainingError", "KVBudgetError", "PriorityError", "QueueFullError", "Scheduler",
           "SchedulingPolicy"]

SchedulingPolicy = Literal["fcfs", "priority"]


class DrainingError(RuntimeError):
    """The server is draining for shutdown and takes no new requests (HTTP 503)."""


class QueueFullError(Exception):
    """The waiting queue is at capacity; the caller should retry later (HTTP 429)."""


class PriorityError(ValueError):
    """A priority other than 0 where requests are served first come, first served (HTTP 400, as vLLM's)."""


@dataclass(frozen=True)
class Admission:
    """The scheduler's decision for one step: who joins (prefill) and who was already running (decode)."""

    admitted: tuple[Request, ...] = ()
    running: tuple[Request, ...] = ()


class Scheduler:
    def __init__(self, *, max_running: int, queue_capacity: int, kv: KVManager,
                 policy: SchedulingPolicy = "fcfs") -> None:
        self.max_running, self.queue_capacity, self.kv, self.policy = max_running, queue_capacity, kv, policy
        self.waiting: OrderedDict[str, Request] = OrderedDict()  # in arrival order
        self.running: dict[str, Request] = {}
        self._order: list[tuple[int, int, str]] = []  # heap of the waiting: (priority, arrival number, id)
        self._arrivals = itertools.count()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        head = self._head()
        return bool(self.running) or (head is not None and self._fits(head))

    def get(self, request_id: str) -> Request | None:
        return self.waiting.get(request_id) or self.running.get(request_id)

    def check_priority(self, priority: int) -> None:
        """Raise PriorityError when this scheduler does not order requests by `priority`."""
        if priority and self.policy != "priority":
            raise PriorityError(f"priority {priority}: this server serves requests first come, first served; send "
                                "0 or leave priority out (a server started with --scheduling-policy priority "
                                "serves lower values first)")

    def check(self, request: Request) -> None:
        """Raise PriorityError or KVBudgetError when a request of this shape could never be admitted."""
        self.check_priority(request.priority)
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
            priority = request.priority if self.policy == "priority" else 0
            heapq.heappush(self._order, (priority, next(self._arrivals), request.id))

    def admit(self) -> Admission:
        """Move the waiting requests that fit to running, head first (see the module's docstring), reserving their
        KV."""
        running = tuple(self.running.values())
        admitted: list[Request] = []
        while (head := self._head()) is not None and self._fits(head):
            heapq.heappop(self._order)
            del self.waiting[head.id]
            self.kv.reserve(head)
            head.status = Status.RUNNING
            self.running[head.id] = head
            admitted.append(head)
        return Admission(tuple(admitted), running)

    def finish(self, request_id: str, reason: str, error: str | None = None) -> Request | None:
        """End a request whatever the reason: it leaves the queue or the running set, and a running one's KV
        reservation and blocks are freed. Returns it (None when it is not here). A waiting request holds no KV, so
        ending one touches nothing the engine thread owns."""
        request = self.waiting.pop(request_id, None)
        if request is not None:
            if len(self._order) > 2 * len(self.waiting) + 64:  # its heap entry stays until `_head` meets it: drop
                # the ended ones' now and then (amortized O(1) each, where removing each at once would be O(waiting))
                self._order = [entry for entry in self._order if entry[2] in self.waiting]
                heapq.heapify(self._order)
        else:
            request = self.running.pop(request_id, None)
            if request is None:
                return None
            self.kv.free(request_id)
        request.set_finished(reason, error)
        request.status = Status.FINISHED
        return request

    def _head(self) -> Request | None:
        """The waiting request admitted next (heap entries of requests ended while waiting are dropped here)."""
        while self._order and self._order[0][2] not in self.waiting:
            heapq.heappop(self._order)
        return self.waiting[self._order[0][2]] if self._order else None

    def _fits(self, r: Request) -> bool:
        return len(self.running) < self.max_running and self.kv.can_reserve(r)
