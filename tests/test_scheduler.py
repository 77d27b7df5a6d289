"""The scheduler on its own: plain data in, plain data out; no model and no torch."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from server.policy.compiler import compile_schedule
from server.engine.kv_manager import KVManager
from server.policy.policy import as_policy
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import KVBudgetError, PriorityError, QueueFullError, Scheduler, SchedulingPolicy


def req(id: str, *, slots: int = 4, length: int = 16, t: float = 0.0, priority: int = 0) -> Request:
    """A request of `length` tokens (prompt + max_tokens) whose schedule has `slots` KV slots (full over `slots`
    layers)."""
    schedule = compile_schedule(as_policy("full"), slots)
    return Request(id, [0] * (length - 1), SamplingParams(max_tokens=1), schedule, arrival=t, priority=priority)


def sched(*, running: int = 8, capacity: int = 100, blocks: int = 64, block: int = 16,
          policy: SchedulingPolicy = "fcfs") -> Scheduler:
    return Scheduler(max_running=running, queue_capacity=capacity, kv=KVManager(num_blocks=blocks, block_size=block),
                     policy=policy)


def ids(requests) -> tuple[str, ...]:
    return tuple(r.id for r in requests)


def test_everyone_running_decodes_every_step_whatever_the_policy():
    s = sched()
    for r in (req("a", slots=4), req("b", slots=2), req("c", slots=8)):
        s.enqueue(r)
    first = s.admit()
    assert ids(first.admitted) == ("a", "b", "c") and first.running == ()
    second = s.admit()
    assert second.admitted == () and ids(second.running) == ("a", "b", "c")


def test_admission_stops_at_max_running():
    s = sched(running=2)
    for r in "abc":
        s.enqueue(req(r))
    assert ids(s.admit().admitted) == ("a", "b")
    assert s.admit().admitted == ()
    s.finish("a", "stop")
    assert ids(s.admit().admitted) == ("c",)


def test_reservation_is_slots_times_length_in_blocks():
    s = sched(blocks=10, block=16)
    s.enqueue(req("skip", slots=3, length=17))  # 3 slots x 2 blocks
    s.enqueue(req("full", slots=4, length=16))  # 4 x 1
    s.enqueue(req("next", slots=1, length=1))
    out = s.admit()
    assert ids(out.admitted) == ("skip", "full") and s.kv.reserved_blocks == 10
    s.finish("skip", "stop")
    assert ids(s.admit().admitted) == ("next",) and s.kv.reserved_blocks == 5


def test_a_request_that_does_not_fit_now_waits_and_younger_ones_never_overtake_it():
    s = sched(blocks=8)
    s.enqueue(req("big", slots=6, length=16))
    assert ids(s.admit().admitted) == ("big",)
    s.enqueue(req("large", slots=4, length=16))  # does not fit beside "big"
    s.enqueue(req("tiny", slots=1, length=16))  # would fit, but is younger
    assert s.admit().admitted == ()
    s.finish("big", "stop")
    assert ids(s.admit().admitted) == ("large", "tiny")


def test_a_request_that_could_never_fit_is_refused_naming_the_limit():
    s = sched(blocks=10, block=16)
    with pytest.raises(KVBudgetError, match=r"160 slot-tokens.*at most 32"):
        s.enqueue(req("hostile", slots=5, length=100))
    assert s.num_waiting == 0


def test_queue_capacity_counts_waiting_requests():
    s = sched(capacity=2, running=1)
    s.enqueue(req("a"))
    s.enqueue(req("b"))
    with pytest.raises(QueueFullError, match="capacity 2"):
        s.enqueue(req("c"))
    s.admit()
    s.enqueue(req("c"))


def test_finish_ends_a_waiting_or_running_request_once_and_frees_its_reservation():
    s = sched(running=1)
    s.enqueue(req("a"))
    s.enqueue(req("b"))
    s.admit()
    assert s.finish("b", "abort").finish_reason == "abort" and s.num_waiting == 0
    assert s.kv.reserved_blocks == 4
    assert s.finish("a", "abort").finish_reason == "abort" and s.num_running == 0 and s.kv.reserved_blocks == 0
    assert s.finish("a", "stop") is None and s.finish("nobody", "abort") is None


def test_has_work():
    s = sched(blocks=4)
    assert not s.has_work
    s.enqueue(req("a", slots=4))
    assert s.has_work
    s.admit()
    assert s.has_work  # running
    s.enqueue(req("b", slots=4))
    s.finish("a", "stop")
    assert s.has_work
    s.admit()
    s.finish("b", "stop")
    assert not s.has_work


def test_fcfs_refuses_a_priority_naming_the_policy_that_takes_it():
    s = sched()
    s.check_priority(0)
    with pytest.raises(PriorityError, match=r"priority 3: .*first come, first served.*--scheduling-policy priority"):
        s.enqueue(req("a", priority=3))
    assert s.num_waiting == 0


def test_priority_admits_lower_values_first_then_the_oldest():
    s = sched(running=4, policy="priority")
    for rid, p in (("late", 5), ("a", 0), ("urgent", -1), ("b", 0)):
        s.enqueue(req(rid, priority=p))
    assert ids(s.admit().admitted) == ("urgent", "a", "b", "late")


def test_priority_head_waits_for_room_and_nothing_behind_it_overtakes():
    s = sched(blocks=8, policy="priority")
    s.enqueue(req("big", slots=6))
    s.admit()
    s.enqueue(req("tiny", slots=1, priority=1))  # would fit now
    s.enqueue(req("urgent", slots=4, priority=0))  # does not fit beside "big", and goes before "tiny"
    assert s.admit().admitted == () and s.has_work  # running "big"
    s.finish("big", "stop")
    assert ids(s.admit().admitted) == ("urgent", "tiny")


def test_requests_ended_while_waiting_leave_the_order_and_it_stays_bounded():
    s = sched(running=1, capacity=1000, policy="priority")
    s.enqueue(req("runner"))
    s.admit()
    for i in range(500):  # each waits behind "runner" with a priority below the head's, then is aborted
        s.enqueue(req(f"w{i}", priority=10 + i % 3))
        s.finish(f"w{i}", "abort")
    s.enqueue(req("next", priority=7))
    assert len(s._order) <= 2 * s.num_waiting + 64 + 1, "ended requests' entries are dropped, not kept"
    s.finish("runner", "stop")
    assert ids(s.admit().admitted) == ("next",) and s.num_waiting == 0


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / admit / finish / abort sequences against the scheduler's promises: FCFS, limits, budget."""

    policy: SchedulingPolicy = "fcfs"

    def __init__(self) -> None:
        super().__init__()
        self.s = sched(running=3, capacity=5, blocks=12, block=4, policy=self.policy)
        self.n = 0
        self.order: list[str] = []  # arrival order of everything ever added

    @rule(slots=st.integers(1, 6), length=st.integers(1, 12), priority=st.integers(-2, 2))
    def add(self, slots: int, length: int, priority: int) -> None:
        self.n += 1
        rid = f"r{self.n}"
        try:
            self.s.enqueue(req(rid, slots=slots, length=length, t=self.n,
                               priority=priority if self.policy == "priority" else 0))
            self.order.append(rid)
        except (QueueFullError, KVBudgetError):
            pass

    @rule()
    def schedule(self) -> None:
        waiting = list(self.s.waiting)  # arrival order
        if self.policy == "priority":  # sorted is stable: the oldest first among equal priorities
            waiting.sort(key=lambda rid: self.s.waiting[rid].priority)
        out = self.s.admit()
        assert list(ids(out.admitted)) == waiting[: len(out.admitted)], "the head first, never overtaken"
        if len(out.admitted) < len(waiting):
            head = self.s.waiting[waiting[len(out.admitted)]]
            assert (self.s.num_running == self.s.max_running
                    or self.s.kv.reserved_blocks + self.s.kv.reservation(head) > self.s.kv.num_blocks)

    @rule(data=st.data())
    def finish_one(self, data: st.DataObject) -> None:
        if self.s.running:
            self.s.finish(data.draw(st.sampled_from(sorted(self.s.running))), "stop")

    @rule(data=st.data())
    def abort_one(self, data: st.DataObject) -> None:
        if self.order:
            self.s.finish(data.draw(st.sampled_from(self.order)), "abort")

    @invariant()
    def within_limits(self) -> None:
        assert self.s.num_running <= self.s.max_running
        assert self.s.kv.reserved_blocks <= self.s.kv.num_blocks
        assert set(self.s.kv.reserved) == set(self.s.running), "a reservation exactly for each running request"
        assert self.s.num_waiting <= self.s.queue_capacity
        assert not set(self.s.waiting) & set(self.s.running)


class PrioritySchedulerMachine(SchedulerMachine):
    """The same promises under the priority policy: the lowest priority value, then the oldest, is the head."""

    policy: SchedulingPolicy = "priority"


test_scheduler_state_machine = SchedulerMachine.TestCase
test_scheduler_state_machine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_priority_scheduler_state_machine = PrioritySchedulerMachine.TestCase
test_priority_scheduler_state_machine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
