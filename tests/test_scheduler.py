"""The scheduler on its own: plain data in, plain data out; no model and no torch."""

from __future__ import annotations

import random
from collections import defaultdict

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from server.scheduler import QueueFullError, Scheduler, SchedRequest, SchedulerOutput


def req(id: str, key: str | None = None, t: float = 0.0) -> SchedRequest:
    return SchedRequest(id, key or id[0], t)


def add_all(s: Scheduler, *requests: SchedRequest) -> None:
    for r in requests:
        s.add(r)


def members(s: Scheduler) -> dict[str, list[str]]:
    return {k: list(g.members) for k, g in s.groups.items()}


def check_plan(before_waiting: list[SchedRequest], before_groups: dict[str, list[str]], free: int,
               out: SchedulerOutput) -> None:
    """What one `schedule()` may do, given the state before it (shared by the simulation and the state machine)."""
    if out.key is None:
        assert out.admit == () and out.running == ()
        return
    assert out.running == tuple(before_groups.get(out.key, ()))
    of_key = [r.id for r in before_waiting if r.key == out.key]
    # The oldest waiting requests of the group's key, in arrival order.
    assert list(out.admit) == of_key[: len(out.admit)]
    assert len(out.admit) <= free
    # An older waiting request of another key keeps its slot: it is never overtaken into the last free slots.
    position = {r.id: i for i, r in enumerate(before_waiting)}
    for n, rid in enumerate(out.admit, start=1):
        older_elsewhere = sum(1 for r in before_waiting[: position[rid]] if r.key != out.key)
        assert n + older_elsewhere <= free, (rid, out, free)


def step(s: Scheduler) -> SchedulerOutput:
    before_waiting, before_groups, free = list(s.waiting.values()), members(s), s.max_running - s.num_running
    had_work = s.has_work
    out = s.schedule()
    assert (out.key is not None) == had_work  # work is never left undone, nothing runs without work
    check_plan(before_waiting, before_groups, free, out)
    return out


# -- one group ----------------------------------------------------------------------------------------------------


def test_same_key_is_admitted_together_up_to_max_running():
    s = Scheduler(max_running=3, queue_capacity=10)
    add_all(s, *(req(f"a{i}", "A", i) for i in range(5)))
    out = s.schedule()
    assert out == SchedulerOutput("A", ("a0", "a1", "a2"), ())
    assert s.num_running == 3 and s.num_waiting == 2
    # Full: the group decodes without admitting anyone.
    assert s.schedule() == SchedulerOutput("A", (), ("a0", "a1", "a2"))
    assert list(s.waiting) == ["a3", "a4"]


def test_new_requests_join_a_running_group_between_steps():
    s = Scheduler(max_running=4, queue_capacity=10)
    s.add(req("a0", "A", 0))
    assert s.schedule() == SchedulerOutput("A", ("a0",), ())
    s.add(req("a1", "A", 1))
    s.add(req("a2", "A", 2))
    assert s.schedule() == SchedulerOutput("A", ("a1", "a2"), ("a0",))
    assert s.schedule() == SchedulerOutput("A", (), ("a0", "a1", "a2"))
    assert list(s.groups) == ["A"] and s.num_running == 3


def test_finish_frees_capacity_and_drops_empty_groups():
    s = Scheduler(max_running=2, queue_capacity=10)
    add_all(s, req("a0", "A", 0), req("a1", "A", 1), req("a2", "A", 2))
    s.schedule()
    s.finish(["a0"])
    assert s.num_running == 1
    assert s.schedule() == SchedulerOutput("A", ("a2",), ("a1",))
    s.finish(["a1", "a2", "not-running"])  # unknown ids are ignored
    assert s.groups == {} and s.num_running == 0
    assert not s.has_work
    assert s.schedule() == SchedulerOutput(None)


# -- several groups ----------------------------------------------------------------------------------------------


def test_groups_take_turns_least_recently_served_first():
    s = Scheduler(max_running=6, queue_capacity=10)
    add_all(s, req("a0", "A", 0), req("b0", "B", 1), req("c0", "C", 2))
    first = [s.schedule().key for _ in range(3)]
    assert first == ["A", "B", "C"]  # each new group is prefilled in arrival order
    assert [s.schedule().key for _ in range(6)] == ["A", "B", "C", "A", "B", "C"]


def test_a_never_served_group_goes_first_oldest_arrival_first():
    s = Scheduler(max_running=6, queue_capacity=10)
    add_all(s, req("a0", "A", 0), req("b0", "B", 1))
    assert s.schedule().key == "A"
    assert s.schedule().key == "B"
    assert s.schedule().key == "A"
    # B is now the least recently served running group, but new keys with waiting requests come first.
    add_all(s, req("d0", "D", 5), req("c0", "C", 6), req("d1", "D", 7))
    assert s.schedule() == SchedulerOutput("D", ("d0", "d1"), ())
    assert s.schedule() == SchedulerOutput("C", ("c0",), ())
    assert [s.schedule().key for _ in range(4)] == ["B", "A", "D", "C"]


def test_older_request_of_another_key_is_admitted_before_newer_flood_requests():
    s = Scheduler(max_running=2, queue_capacity=10)
    add_all(s, req("a0", "A", 0), req("a1", "A", 1))
    s.schedule()
    add_all(s, req("b0", "B", 2), req("a2", "A", 3), req("a3", "A", 4))
    assert s.schedule() == SchedulerOutput("A", (), ("a0", "a1"))  # full: nobody is admitted
    s.finish(["a0"])
    assert s.schedule() == SchedulerOutput("B", ("b0",), ())
    s.finish(["a1"])
    assert s.schedule() == SchedulerOutput("A", ("a2",), ())
    assert list(s.waiting) == ["a3"]


def test_a_freed_slot_is_kept_for_the_older_request_even_on_the_other_groups_turn():
    s = Scheduler(max_running=3, queue_capacity=10)
    add_all(s, req("a0", "A", 0), req("a1", "A", 1), req("b0", "B", 2))
    assert [s.schedule().key for _ in range(2)] == ["A", "B"]
    add_all(s, req("b1", "B", 3), req("a2", "A", 4))
    s.finish(["a0"])  # one slot frees while it is A's turn
    assert s.schedule() == SchedulerOutput("A", (), ("a1",))  # a2 is newer than b1: it may not take the slot
    assert s.schedule() == SchedulerOutput("B", ("b1",), ("b0",))
    assert list(s.waiting) == ["a2"]


def test_no_group_starves_under_a_flood():
    """Key A keeps a backlog of waiting requests; B and C trickle in. Each is served within a bounded wait."""
    rng = random.Random(0)
    s = Scheduler(max_running=4, queue_capacity=64)
    remaining: dict[str, int] = {}
    added: dict[str, int] = {}
    admitted: dict[str, int] = {}
    served: dict[str, list[int]] = defaultdict(list)
    counter = 0

    def arrive(key: str, now: int) -> None:
        nonlocal counter
        counter += 1
        rid = f"{key}{counter}"
        s.add(SchedRequest(rid, key, float(counter)))
        added[rid] = now

    steps = 400
    for now in range(steps):
        if now % 8 == 0:
            arrive("B", now)
        if now % 11 == 0:
            arrive("C", now)
        while sum(1 for r in s.waiting.values() if r.key == "A") < 10:  # the flood
            arrive("A", now)
        out = step(s)
        assert out.key is not None
        served[out.key].append(now)
        for rid in out.admit:
            admitted[rid] = now
            remaining[rid] = rng.randint(1, 5)
        for rid in out.admit + out.running:
            remaining[rid] -= 1
        s.finish([rid for rid in out.admit + out.running if remaining[rid] == 0])
        assert s.num_running <= s.max_running

    for key in "ABC":
        gaps = [b - a for a, b in zip(served[key], served[key][1:])]
        assert len(served[key]) > 30 and max(gaps) <= 25, (key, max(gaps))
    waits = {rid: admitted[rid] - t for rid, t in added.items() if rid in admitted}
    trickle = [rid for rid in added if rid[0] in "BC"]
    assert all(rid in admitted for rid in trickle if added[rid] < steps - 40), "a B or C request never ran"
    assert max(waits[rid] for rid in trickle if rid in waits) <= 40
    # The flood does wait its turn: A's waits are not all zero, so the bound above is not vacuous.
    assert max(w for rid, w in waits.items() if rid[0] == "A") > 0


# -- queue, abort, idle ---------------------------------------------------------------------------------------------


def test_queue_capacity_counts_waiting_requests():
    s = Scheduler(max_running=1, queue_capacity=2)
    add_all(s, req("a0", "A", 0), req("a1", "A", 1))
    with pytest.raises(QueueFullError, match="capacity 2"):
        s.add(req("a2", "A", 2))
    assert list(s.waiting) == ["a0", "a1"]
    s.schedule()  # a0 leaves the queue to run: room for one more
    s.add(req("a2", "A", 2))
    with pytest.raises(QueueFullError):
        s.add(req("a3", "A", 3))


def test_abort_waiting_removes_it_and_abort_running_says_so():
    s = Scheduler(max_running=1, queue_capacity=10)
    add_all(s, req("a0", "A", 0), req("a1", "A", 1), req("b0", "B", 2))
    s.schedule()
    assert s.abort("a1") is False
    assert list(s.waiting) == ["b0"]
    assert s.abort("a0") is True
    assert s.num_running == 1  # still running until the engine reports it gone
    assert s.abort("nobody") is False
    s.finish(["a0"])
    assert s.schedule() == SchedulerOutput("B", ("b0",), ())
    assert s.schedule() == SchedulerOutput("B", (), ("b0",))  # a1 never comes back


def test_has_work_and_idle_schedule():
    s = Scheduler(max_running=1, queue_capacity=10)
    assert not s.has_work
    assert s.schedule() == SchedulerOutput(None)
    s.add(req("a0", "A", 0))
    assert s.has_work
    s.schedule()
    s.add(req("b0", "B", 1))
    assert s.has_work  # the running group still decodes
    assert s.schedule() == SchedulerOutput("A", (), ("a0",))  # b0 waits: no free slot
    s.finish(["a0"])
    assert s.has_work
    assert s.schedule() == SchedulerOutput("B", ("b0",), ())
    s.finish(["b0"])
    assert not s.has_work
    assert s.schedule().key is None


# -- random sequences ---------------------------------------------------------------------------------------------


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / finish / abort / schedule sequences, checked against the scheduler's promises."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(max_running=3, queue_capacity=5)
        self.n = 0
        self.ever_waiting: set[str] = set()

    def running_ids(self) -> list[str]:
        return [r for g in self.s.groups.values() for r in g.members]

    @rule(key=st.sampled_from("ABC"))
    def add(self, key: str) -> None:
        self.n += 1
        r = SchedRequest(f"r{self.n}", key, float(self.n))
        if self.s.num_waiting >= self.s.queue_capacity:
            with pytest.raises(QueueFullError):
                self.s.add(r)
            assert r.id not in self.s.waiting
        else:
            self.s.add(r)
            self.ever_waiting.add(r.id)

    @precondition(lambda self: self.s.num_running > 0)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        running = self.running_ids()
        gone = data.draw(st.lists(st.sampled_from(running), min_size=1, unique=True))
        self.s.finish(gone)
        assert not set(gone) & set(self.running_ids())

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.ever_waiting | {"unknown"})))
        was_waiting, was_running = rid in self.s.waiting, rid in self.running_ids()
        assert self.s.abort(rid) is was_running
        assert rid not in self.s.waiting
        if was_waiting:
            assert not was_running
        if was_running:  # what the engine does: the sequence leaves at its next step
            self.s.finish([rid])

    @rule()
    def schedule(self) -> None:
        waiting_before = set(self.s.waiting)
        out = step(self.s)
        assert set(out.admit) <= waiting_before and set(out.admit) <= self.ever_waiting

    @invariant()
    def consistent(self) -> None:
        running = self.running_ids()
        assert self.s.num_running == len(running) <= self.s.max_running
        assert len(running) == len(set(running))  # unique within and across groups
        assert not set(running) & set(self.s.waiting)
        assert all(g.members for g in self.s.groups.values())  # empty groups are dropped
        assert self.s.num_waiting <= self.s.queue_capacity
        assert all(r.id == rid for rid, r in self.s.waiting.items())


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_scheduler_state_machine = SchedulerMachine.TestCase
