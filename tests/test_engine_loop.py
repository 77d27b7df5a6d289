"""The engine loop on the tiny model (CPU): one running batch of mixed policies is exact, streams add up, aborts free
slots and KV, a full queue refuses, metrics are labelled by canonical policy, a failing row fails alone and a failing
step fails only the requests in it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from server.engine.loop import DrainingError, EngineLoop, Output, QueueFullError
from server.engine.request import Request
from server.engine.generate import Batch, Engine, GenerationResult
from server.metrics import Metrics
from server.engine.sampling import SamplingParams

TIMEOUT = 30.0  # seconds; a hang fails the test instead of blocking the run
MODEL = "tiny"


class Collector:
    """A sink: records every Output (the engine thread calls it) and signals when the final one arrives.

    on_output runs on the engine thread after each Output is recorded; it may block it (to hold the loop still)."""

    def __init__(self, on_output: Callable[[Collector, Output], None] | None = None) -> None:
        self.outputs: list[Output] = []
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._on_output = on_output

    def __call__(self, out: Output) -> None:
        with self._lock:
            self.outputs.append(out)
        if self._on_output is not None:
            self._on_output(self, out)
        if out.finished:
            self.done.set()

    def wait(self) -> Output:
        assert self.done.wait(TIMEOUT), "request did not finish"
        return self.outputs[-1]

    @property
    def token_ids(self) -> list[int]:
        with self._lock:
            return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(o.text for o in self.outputs)


class Gate:
    """Holds the engine thread inside a sink at the n-th output until the test releases it."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, c: Collector, out: Output) -> None:
        if len(c.outputs) == self.at:
            self.reached.set()
            assert self.release.wait(TIMEOUT)

    def wait(self) -> None:
        assert self.reached.wait(TIMEOUT), "the gated request never reached its gate"


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


@pytest.fixture(params=[False, True], ids=["stepwise", "overlapped"])
def loop_engine(request, tiny_engine: Engine, overlapped_engine: Engine) -> Engine:
    """The loop's engine: each decode step read before the next, or overlapped (the CUDA default). Expected
    results come from `tiny_engine` alone, step by step."""
    return overlapped_engine if request.param else tiny_engine


@pytest.fixture
def make_loop(loop_engine: Engine) -> Iterator[Callable[..., EngineLoop]]:
    loops: list[EngineLoop] = []

    def make(**options) -> EngineLoop:
        kw = dict(max_num_seqs=4, max_model_len=64, queue_capacity=32, kv_budget_tokens=8192,
                  metrics=Metrics(model=MODEL))
        kw.update(options)
        loop = EngineLoop(loop_engine, **kw)
        loops.append(loop)
        loop.start()
        return loop

    yield make
    for loop in loops:
        loop.stop()
        assert not loop.alive, "the engine thread did not stop"


@pytest.fixture
def make_gate(make_loop) -> Iterator[Callable[[int], Gate]]:
    """Gates that are released at teardown (before the loops stop), so a failed test never leaves one shut."""
    gates: list[Gate] = []

    def make(at: int) -> Gate:
        gates.append(Gate(at))
        return gates[-1]

    yield make
    for gate in gates:
        gate.release.set()


def request(engine: Engine, rid: str, prompt: list[int], policy: str, **params) -> Request:
    params.setdefault("ignore_eos", True)
    return Request(rid, prompt, SamplingParams(**params), engine.compile(policy))


def alone(engine: Engine, r: Request) -> GenerationResult:
    return engine.generate([r.prompt_ids], policy=r.schedule.policy, params=r.params)[0]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"model": MODEL, **labels}) or 0.0


def policy_labels(metrics: Metrics) -> set[str]:
    return {s.labels["policy"] for m in metrics.registry.collect() for s in m.samples if "policy" in s.labels}


# -- exactness and streaming --------------------------------------------------------------------------------------

POLICIES = ["full", "skip:2", "pairs:1-4", "loop:1-4x2", "reverse:1-4"]


def test_concurrent_requests_equal_each_run_alone(tiny_engine, make_loop):
    """12 requests over 5 schedule groups, 3 slots: they queue, join running groups and leave at different steps."""
    requests = [
        request(tiny_engine, f"r{i}", [3 + (7 * i + j) % 120 for j in range(1 + i % 7)], POLICIES[i % 5],
                max_tokens=3 + i % 6, ignore_eos=i % 2 == 0)
        for i in range(12)
    ]
    expected = {r.id: alone(tiny_engine, r) for r in requests}
    loop = make_loop(max_num_seqs=3)
    sinks = {r.id: Collector() for r in requests}
    for r in requests[:5]:
        loop.submit(r, sinks[r.id])
    sinks["r0"].wait()  # the rest arrive while the first groups are running
    for r in requests[5:]:
        loop.submit(r, sinks[r.id])
    for r in requests:
        final = sinks[r.id].wait()
        want, got = expected[r.id], final.result
        assert final.error is None and got is not None
        assert got.token_ids == want.token_ids, (r.id, r.schedule.policy)
        assert got.finish_reason == want.finish_reason and got.policy == want.policy
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), rtol=1e-4, atol=1e-4)
    assert loop.steps > 12  # several groups really ran interleaved, not one request per step


def test_streamed_outputs_add_up_to_the_final_result(tiny_engine, make_loop):
    r = request(tiny_engine, "s", [5, 6, 7, 8], "skip:2", max_tokens=8, logprobs=2)
    loop = make_loop()
    sink = Collector()
    loop.submit(r, sink)
    final = sink.wait()
    result = final.result
    assert result is not None and final.error is None
    assert [o.finished for o in sink.outputs] == [False] * (len(sink.outputs) - 1) + [True]
    assert all(o.token_ids for o in sink.outputs[:-1])  # every step streams its token
    assert sink.token_ids == result.token_ids == alone(tiny_engine, r).token_ids
    assert len(result.token_ids) == 8 and result.finish_reason == "length"
    assert sink.text == result.text
    assert [p for o in sink.outputs for p in o.logprobs] == result.logprobs
    assert [d for o in sink.outputs for d in o.top_logprobs] == result.top_logprobs
    assert all(len(d) == 2 for d in result.top_logprobs)
    assert result.policy == "skip:2-3"  # canonical
    t = result.timings
    assert t.ttft_s > 0 and t.prefill_s > 0 and t.decode_s > 0 and t.queue_s >= 0
    assert len(t.per_token_s) == len(result.token_ids) - 1


def test_a_request_longer_than_the_context_ends_at_it(tiny_engine, make_loop):
    """A request whose max_tokens would pass max_model_len ends by length at max_model_len, with the tokens it gets
    alone, and leaves no KV behind."""
    r = request(tiny_engine, "long", [5, 6, 7, 8, 9], "skip:2", max_tokens=40)
    loop = make_loop(max_model_len=16)
    sink = Collector()
    loop.submit(r, sink)
    final = sink.wait()
    assert final.error is None and final.result.finish_reason == "length"
    assert len(final.result.token_ids) == 16 - 5 == len(sink.token_ids)
    want = tiny_engine.generate([r.prompt_ids], policy="skip:2", params=SamplingParams(max_tokens=11, ignore_eos=True))
    assert final.result.token_ids == want[0].token_ids
    wait_until(lambda: loop.num_running == 0, "the request has left")
    assert loop.batch.kv_usage() == 0.0


def test_a_stop_string_is_never_streamed(tiny_engine, make_loop):
    prompt = [5, 6, 7]
    text = tiny_engine.generate([prompt], policy="full", params=SamplingParams(max_tokens=10, ignore_eos=True))[0].text
    stop = text[2:4]
    assert stop not in text[:3], "pick another prompt: the stop string must first appear at index 2"
    r = request(tiny_engine, "stop", prompt, "full", max_tokens=10, stop=(stop,))
    loop = make_loop()
    sink = Collector()
    loop.submit(r, sink)
    result = sink.wait().result
    assert result is not None and result.finish_reason == "stop"
    assert result.text == text[:2]
    assert sink.text == result.text  # the held-back start of the stop string was never sent


def test_a_stop_string_inside_min_tokens_does_not_unsay_streamed_text(tiny_engine, make_loop):
    prompt = [5, 6, 7]
    text = tiny_engine.generate([prompt], policy="full", params=SamplingParams(max_tokens=10, ignore_eos=True))[0].text
    r = request(tiny_engine, "min", prompt, "full", max_tokens=10, stop=(text[:2],), min_tokens=4)
    loop = make_loop()
    sink = Collector()
    loop.submit(r, sink)
    result = sink.wait().result
    assert result is not None
    assert sink.text == result.text
    assert len(result.text) >= 4  # min_tokens of text was generated and kept


# -- abort ------------------------------------------------------------------------------------------------------


def test_abort_running_request_stops_it_and_frees_its_slot(tiny_engine, make_loop, make_gate):
    loop = make_loop(max_num_seqs=1)
    gate = make_gate(3)
    victim = Collector(gate)
    loop.submit(request(tiny_engine, "victim", [5, 6, 7], "pairs:1-4", max_tokens=40), victim)
    gate.wait()  # the engine thread is inside the victim's third output
    loop.abort("victim")
    gate.release.set()
    # One slot: the next request of the same group can only run once the victim has left it.
    follow = request(tiny_engine, "follow", [9, 10], "pairs:1-4", max_tokens=3)
    after = Collector()
    loop.submit(follow, after)
    assert after.wait().result.token_ids == alone(tiny_engine, follow).token_ids
    wait_until(lambda: loop.num_running == 0 and loop.num_waiting == 0, "every slot is free")
    assert len(victim.outputs) == 3 and len(victim.token_ids) == 3  # nothing after the abort
    assert not victim.done.is_set()
    loop.stop()
    assert sample(loop.metrics, "painters:request_success_total", policy="pairs:1-4", finished_reason="abort") == 1
    # an aborted request is counted, but its latencies are not observed: only "follow" has them
    for name in ("e2e_request_latency", "time_to_first_token", "request_prefill_time"):
        assert sample(loop.metrics, f"painters:{name}_seconds_count", policy="pairs:1-4") == 1, name


def test_abort_waiting_request_removes_it(tiny_engine, make_loop, make_gate):
    loop = make_loop(max_num_seqs=1)
    gate = make_gate(1)
    busy = Collector(gate)
    loop.submit(request(tiny_engine, "busy", [5, 6, 7], "full", max_tokens=4), busy)
    gate.wait()
    waiting = Collector()
    loop.submit(request(tiny_engine, "waiting", [9, 10], "full", max_tokens=4), waiting)
    assert loop.num_waiting == 1
    loop.abort("waiting")
    loop.abort("never-submitted")  # unknown ids are ignored
    assert loop.num_waiting == 0
    gate.release.set()
    assert busy.wait().result.finish_reason == "length"
    wait_until(lambda: loop.num_running == 0, "the busy request has left")
    loop.stop()
    assert waiting.outputs == []
    assert sample(loop.metrics, "painters:request_success_total", policy="full", finished_reason="abort") == 1
    assert sample(loop.metrics, "painters:request_success_total", policy="full", finished_reason="length") == 1


def test_abort_reaches_a_request_in_another_group(tiny_engine, make_loop, make_gate):
    loop = make_loop(max_num_seqs=2)
    other = Collector()
    gate = make_gate(2)
    victim = Collector(gate)
    # Both decode in every step, whatever their policies.
    loop.submit(request(tiny_engine, "other", [5, 6, 7], "full", max_tokens=20), other)
    loop.submit(request(tiny_engine, "victim", [5, 6, 7], "skip:2", max_tokens=20), victim)
    gate.wait()  # inside a step
    loop.abort("victim")
    gate.release.set()
    other.wait()
    wait_until(lambda: loop.num_running == 0, "both have left")
    assert len(victim.token_ids) <= 3, f"{len(victim.token_ids)} tokens streamed; the abort came at the 2nd"


# -- queue full -------------------------------------------------------------------------------------------------


def test_full_queue_refuses_and_the_loop_keeps_serving(tiny_engine, make_loop, make_gate):
    loop = make_loop(max_num_seqs=1, queue_capacity=2)
    gate = make_gate(1)
    first = Collector(gate)
    loop.submit(request(tiny_engine, "first", [5, 6], "full", max_tokens=3), first)
    gate.wait()  # running, and the loop is held: nothing leaves the queue
    queued = {rid: Collector() for rid in ("q1", "q2")}
    for rid, sink in queued.items():
        loop.submit(request(tiny_engine, rid, [7, 8], "skip:2", max_tokens=3), sink)
    refused = Collector()
    with pytest.raises(QueueFullError, match="capacity 2"):
        loop.submit(request(tiny_engine, "refused", [7, 8], "skip:2", max_tokens=3), refused)
    gate.release.set()
    for sink in [first, *queued.values()]:
        assert sink.wait().result.finish_reason == "length"
    later = request(tiny_engine, "later", [11, 12, 13], "reverse:1-4", max_tokens=4)
    sink = Collector()
    loop.submit(later, sink)
    assert sink.wait().result.token_ids == alone(tiny_engine, later).token_ids
    assert refused.outputs == []


# -- metrics ----------------------------------------------------------------------------------------------------


def test_metrics_are_labelled_by_canonical_policy_and_reason(tiny_engine, make_loop):
    loop = make_loop()
    first_token = alone(tiny_engine, request(tiny_engine, "x", [9, 10], "skip:2", max_tokens=1)).token_ids[0]
    runs = [
        request(tiny_engine, "a", [5, 6, 7], "skip:2", max_tokens=4),
        request(tiny_engine, "b", [9, 10], "skip:2", max_tokens=5, stop_token_ids=(first_token,)),
        request(tiny_engine, "c", [5, 6, 7, 8, 9], "full", max_tokens=3),
    ]
    results = {}
    for r in runs:  # one at a time
        sink = Collector()
        loop.submit(r, sink)
        results[r.id] = sink.wait().result
    assert results["b"].finish_reason == "stop" and results["b"].token_ids == [first_token]
    loop.stop()  # the engine thread has recorded everything
    m = loop.metrics
    assert sample(m, "painters:time_to_first_token_seconds_count", policy="skip:2-3") == 2
    assert sample(m, "painters:time_to_first_token_seconds_count", policy="full") == 1
    assert sample(m, "painters:time_to_first_token_seconds_sum", policy="skip:2-3") > 0
    assert sample(m, "painters:e2e_request_latency_seconds_count", policy="full") == 1
    assert sample(m, "painters:time_per_output_token_seconds_count", policy="skip:2-3") == 3  # 4 tokens, 3 gaps
    assert sample(m, "painters:request_success_total", policy="skip:2-3", finished_reason="length") == 1
    assert sample(m, "painters:request_success_total", policy="skip:2-3", finished_reason="stop") == 1
    assert sample(m, "painters:request_success_total", policy="full", finished_reason="length") == 1
    assert sample(m, "painters:generation_tokens_total", policy="skip:2-3") == 5
    assert sample(m, "painters:prompt_tokens_total", policy="full") == 5
    # the latency histograms hold each request's own figures ("c" is the only full request)
    t = results["c"].timings
    for name, want in (("request_queue_time", t.queue_s), ("request_prefill_time", t.prefill_s),
                       ("request_decode_time", t.decode_s), ("time_to_first_token", t.ttft_s),
                       ("time_per_output_token", sum(t.per_token_s))):
        assert sample(m, f"painters:{name}_seconds_sum", policy="full") == pytest.approx(want), name
    assert sample(m, "painters:e2e_request_latency_seconds_sum", policy="full") >= t.total_s > t.ttft_s
    # steps that ran "c" (3 tokens): its prefill and first decode share one, the second decode is another;
    # overlapped, that decode's token is read a step later
    assert sample(m, "painters:batch_size_count", policy="full") == (3 if loop.batch.overlap else 2)
    assert sample(m, "painters:batch_size_sum", policy="full") == sample(m, "painters:batch_size_count", policy="full")
    # "a" (4 tokens) one step fewer than its tokens, "b" one: its prefill. Overlapped, "b"'s first decode step was in
    # flight when its first token stopped it; "c"'s first step reads that step, and drops its token: not a step of "b"
    assert sample(m, "painters:batch_size_count", policy="skip:2-3") == (5 if loop.batch.overlap else 4)
    assert m.registry.get_sample_value("painters:num_requests_running", {"model": MODEL}) == 0
    assert policy_labels(m) == {"skip:2-3", "full"}  # never the policy as the user spelled it
    body, content_type = m.render()
    assert b'painters:time_to_first_token_seconds_bucket{le="0.001",model="tiny",policy="skip:2-3"}' in body
    assert content_type.startswith("text/plain")


def test_policy_labels_beyond_max_policies_fold_into_other(tiny_engine, make_loop):
    loop = make_loop(metrics=Metrics(model=MODEL, max_policies=2))
    for i, policy in enumerate(["full", "skip:2", "reverse:1-4", "loop:1-4x2", "full"]):
        sink = Collector()
        loop.submit(request(tiny_engine, f"p{i}", [5, 6], policy, max_tokens=2), sink)
        sink.wait()
    loop.stop()
    m = loop.metrics
    assert policy_labels(m) == {"full", "skip:2-3", "other"}
    assert sample(m, "painters:request_success_total", policy="other", finished_reason="length") == 2
    assert sample(m, "painters:request_success_total", policy="full", finished_reason="length") == 2


# -- failures ---------------------------------------------------------------------------------------------------


def test_a_row_whose_sampling_raises_fails_alone_and_its_neighbour_finishes(tiny_engine, make_loop,
                                                                            poisoned_seed):
    """One running batch for every policy: a request whose sampler raises gets an error; the long request decoded
    beside it (another policy) finishes exactly as alone, and its KV and slot are freed."""
    healthy = request(tiny_engine, "healthy", [5, 6, 7], "full", max_tokens=12)
    expected = alone(tiny_engine, healthy).token_ids
    loop = make_loop()
    sinks = {"healthy": Collector(), "poisoned": Collector()}
    loop.submit(healthy, sinks["healthy"])
    loop.submit(request(tiny_engine, "poisoned", [9, 10], "skip:2", max_tokens=8, temperature=1.0, seed=poisoned_seed),
                sinks["poisoned"])
    failed = sinks["poisoned"].wait()
    assert failed.finished and failed.result is None and "probability tensor" in failed.error
    final = sinks["healthy"].wait()
    assert final.error is None and final.result.token_ids == expected
    wait_until(lambda: loop.num_running == 0, "every slot is free")
    assert loop.batch.kv_usage() == 0.0


def test_a_failing_step_fails_the_requests_in_it_and_the_loop_goes_on(tiny_engine, make_loop, monkeypatch):
    doomed = [request(tiny_engine, "a", [5, 6, 7], "full", max_tokens=8),
              request(tiny_engine, "b", [9, 10], "skip:2", max_tokens=8)]
    later = request(tiny_engine, "later", [9, 10], "skip:2", max_tokens=4)
    real_launch = Batch.launch
    raised = []

    def launch_failing_once(batch: Batch, inp):
        if len(inp.rows) == 2 and not raised:
            raised.append(True)
            raise RuntimeError("boom")
        return real_launch(batch, inp)

    monkeypatch.setattr(Batch, "launch", launch_failing_once)
    loop = make_loop()
    sinks = [Collector(), Collector()]
    for r, sink in zip(doomed, sinks):
        loop.submit(r, sink)
    for sink in sinks:
        failed = sink.wait()
        assert failed.finished and failed.result is None and "RuntimeError: boom" in failed.error
    assert raised
    sink = Collector()
    loop.submit(later, sink)  # the loop goes on
    assert sink.wait().result.token_ids == alone(tiny_engine, later).token_ids
    wait_until(lambda: loop.num_running == 0, "every slot is free")
    assert loop.alive and loop.batch.kv_usage() == 0.0


def test_a_failing_step_answers_a_request_it_had_already_finished(tiny_engine, loop_engine, monkeypatch):
    """A scoring request (echo, max_tokens=1) is finished by its prefill; the decode launch after it fails. The
    failure ends every running request with an error, but the first reason wins: the scoring request stayed
    "length", and, ended without an answer, its client waited forever. It gets its result now; the other its error."""
    real_launch = Batch.launch

    def launch(batch: Batch, inp):
        if inp.tokens.shape[1] == 1 and not inp.echo:  # the decode step
            raise RuntimeError("out of memory (injected)")
        return real_launch(batch, inp)

    monkeypatch.setattr(Batch, "launch", launch)
    loop = EngineLoop(loop_engine, max_num_seqs=4, max_model_len=64, queue_capacity=8, kv_budget_tokens=4096)
    scored = request(tiny_engine, "scored", [5, 6, 7, 8], "full", max_tokens=1, echo=True, logprobs=0)
    other = request(tiny_engine, "other", [9, 10, 11], "full", max_tokens=8)
    sinks = {r.id: Collector() for r in (scored, other)}
    for r in (scored, other):
        loop.submit(r, sinks[r.id])
    loop.step()
    assert sinks["scored"].done.is_set(), "the finished request was never answered"
    answer = sinks["scored"].outputs[-1]
    assert answer.result is not None and answer.result.finish_reason == "length" and answer.error is None
    assert answer.result.token_ids == alone(tiny_engine, scored).token_ids
    assert sinks["other"].wait().error == "engine error: RuntimeError: out of memory (injected)"
    assert loop.num_requests == 0 and loop.batch.kv.reserved == {}


def test_the_queue_gauges_exist_before_the_first_request(make_loop):
    """A labelled gauge has no series until it is set: a replica that schedule affinity sent nothing yet reported no
    queue at all (no series for Prometheus, none for the dashboard's replica list or the HPA)."""
    loop = make_loop()
    assert loop.metrics.registry.get_sample_value("painters:num_requests_running", {"model": MODEL}) == 0
    assert loop.metrics.registry.get_sample_value("painters:num_requests_waiting", {"model": MODEL}) == 0


def test_the_queue_gauges_count_a_request_from_its_submit_to_its_end(tiny_engine, monkeypatch):
    """The gauges were refreshed only at the end of a step: a request submitted or admitted during a step went
    uncounted until that step ended (a long prefill's seconds), and a waiting one its client left stayed counted
    until the next. An idle check reading them (the HPA's, a test's) saw an idle server where one was running."""
    loop = EngineLoop(tiny_engine, max_num_seqs=1, max_model_len=64, queue_capacity=8, kv_budget_tokens=4096,
                      metrics=Metrics(model=MODEL))

    def gauges() -> tuple[float, float]:
        return (sample(loop.metrics, "painters:num_requests_running"),
                sample(loop.metrics, "painters:num_requests_waiting"))

    loop.submit(request(tiny_engine, "a", [5, 6, 7], "full", max_tokens=3), Collector())
    loop.submit(request(tiny_engine, "b", [8, 9], "full", max_tokens=3), Collector())
    assert gauges() == (0, 2)
    during: list[tuple[float, float]] = []
    real_launch = Batch.launch

    def launch(batch: Batch, inp):
        during.append(gauges())
        return real_launch(batch, inp)

    monkeypatch.setattr(Batch, "launch", launch)
    loop.step()  # admits "a" (one slot): it counts as running from the step's start
    assert during and set(during) == {(1, 1)}
    loop.abort("b")  # its client left while it waited: it ends now, and the gauge says so now
    assert gauges() == (1, 0)


def test_a_request_is_counted_before_it_is_answered(make_loop, loop_engine):
    """Its answer was sent, then it was counted: a client that read /metrics on its answer could miss it (a test
    that counted requests after their 200s failed so when the machine was loaded)."""
    loop = make_loop()
    at_answer: list[tuple[float, float]] = []

    def on_output(c: Collector, out: Output) -> None:
        if out.finished:
            at_answer.append((sample(loop.metrics, "painters:request_success_total", policy="full",
                                     finished_reason="length"),
                              sample(loop.metrics, "painters:generation_tokens_total", policy="full")))

    sink = Collector(on_output)
    loop.submit(request(loop_engine, "a", [5, 6, 7], "full", max_tokens=3), sink)
    sink.wait()
    assert at_answer == [(1, 3)]


def test_a_failing_step_leaves_the_queue_gauges_current(tiny_engine, loop_engine, monkeypatch):
    """The gauges were refreshed only at the end of a step that did not raise: after a failed step the loop idles
    with the failed requests still counted running (an autoscaler reading them would hold its scale)."""
    loop = EngineLoop(loop_engine, max_num_seqs=4, max_model_len=64, queue_capacity=8, kv_budget_tokens=4096,
                      metrics=Metrics(model=MODEL))
    loop.submit(request(tiny_engine, "a", [5, 6, 7], "full", max_tokens=8), Collector())
    loop.step()
    assert sample(loop.metrics, "painters:num_requests_running") == 1

    def fail(batch: Batch, inp):
        raise RuntimeError("injected")

    monkeypatch.setattr(Batch, "launch", fail)
    loop.step()
    assert loop.num_requests == 0 and sample(loop.metrics, "painters:num_requests_running") == 0


def test_a_drain_waits_for_a_request_being_admitted(make_loop, make_gate, loop_engine, monkeypatch):
    """Admission moves a request from the queue to the running set under the loop's lock: a drain that counted
    outside it could see neither, end its wait at once and abort the request with its drain time unspent."""
    loop = make_loop(max_num_seqs=1)
    gate = make_gate(1)
    first, second = Collector(gate), Collector()
    loop.submit(request(loop_engine, "a", [5, 6, 7], "full", max_tokens=3), first)
    gate.wait()  # "a" runs; "b" waits for its slot
    loop.submit(request(loop_engine, "b", [8, 9], "full", max_tokens=3), second)
    admitting, go_on = threading.Event(), threading.Event()
    reserve = loop.scheduler.kv.reserve

    def slow(r: Request) -> None:  # admission of "b", between the queue and the running set
        admitting.set()
        assert go_on.wait(TIMEOUT)
        reserve(r)
    monkeypatch.setattr(loop.scheduler.kv, "reserve", slow)
    aborted: list[int] = []
    drain = threading.Thread(target=lambda: aborted.append(loop.drain(time.monotonic() + TIMEOUT)))
    drain.start()
    wait_until(lambda: loop.draining, "the drain began")
    gate.release.set()  # "a" finishes and "b" is admitted, slowly
    assert admitting.wait(TIMEOUT)
    time.sleep(0.1)  # the drain counts (every 20 ms) while admission holds "b"
    go_on.set()
    drain.join(TIMEOUT)
    assert first.wait().result.finish_reason == "length"
    assert aborted == [0] and second.wait().result.finish_reason == "length"


def test_a_drain_waits_for_an_open_series_admits_its_requests_and_cuts_it_at_the_deadline(make_loop, make_gate,
                                                                                           loop_engine):
    """A series (a beam search's steps) begun before the drain is running between its requests too: the drain waits
    for it and admits its next request, refused to anyone else; at the deadline it is cut, its request running
    then ends with "abort", and it may submit nothing more. One closed in time no longer holds the drain."""
    loop = make_loop()
    done, cut = loop.open_series(), loop.open_series()
    aborted: list[int] = []
    drain = threading.Thread(target=lambda: aborted.append(loop.drain(time.monotonic() + 1.0)))
    drain.start()  # nothing is here: the two series alone hold it
    wait_until(lambda: loop.draining, "the drain began")
    with pytest.raises(DrainingError):
        loop.open_series()
    with pytest.raises(DrainingError):
        loop.submit_all([(request(loop_engine, "x", [5], "full", max_tokens=1), Collector())])
    finishes = Collector()
    loop.submit_all([(request(loop_engine, "a", [5, 6, 7], "full", max_tokens=2), finishes)], series=done)
    assert finishes.wait().result.finish_reason == "length"
    loop.close_series(done)
    with pytest.raises(DrainingError):  # closed: it runs no more
        loop.submit_all([(request(loop_engine, "y", [5], "full", max_tokens=1), Collector())], series=done)
    gate = make_gate(1)
    held = Collector(gate)
    loop.submit_all([(request(loop_engine, "b", [8, 9], "full", max_tokens=30), held)], series=cut)
    gate.wait()  # "b" runs, held, past the deadline
    wait_until(lambda: cut.cut, "the deadline cut the series")
    assert drain.is_alive() and not done.cut and loop.num_series == 0
    with pytest.raises(DrainingError):
        loop.submit_all([(request(loop_engine, "c", [5], "full", max_tokens=1), Collector())], series=cut)
    gate.release.set()
    drain.join(TIMEOUT)
    assert aborted == [1] and held.wait().result.finish_reason == "abort"
    assert loop.num_requests == 0


def test_a_drain_streams_the_tail_held_back_for_a_stop_string(tiny_engine, loop_engine):
    """Text that might still begin a stop string is held back from the stream. A drain ends the request: its final
    output carries that tail, so the streamed text adds up to the result's, as when it finishes."""
    loop = EngineLoop(loop_engine, max_num_seqs=4, max_model_len=64, queue_capacity=8, kv_budget_tokens=4096)
    r = request(tiny_engine, "s", [5, 6, 7], "full", max_tokens=20, stop=["qqqqqq"])
    sink = Collector()
    loop.submit(r, sink)
    for _ in range(6):
        loop.step()
    loop._abort_left = True  # what drain() sets at its deadline
    loop.step()
    assert sink.done.is_set()
    final = sink.outputs[-1]
    assert final.result.finish_reason == "abort" and len(final.result.text) >= 5
    assert "".join(o.text for o in sink.outputs) == final.result.text
    assert [t for o in sink.outputs for t in o.token_ids] == final.result.token_ids


def test_a_raising_sink_does_not_stop_the_loop(tiny_engine, make_loop):
    def explode(c: Collector, out: Output) -> None:
        raise ConnectionError("client went away")

    loop = make_loop()
    loop.submit(request(tiny_engine, "gone", [5, 6], "full", max_tokens=3), Collector(explode))
    r = request(tiny_engine, "next", [7, 8], "full", max_tokens=3)
    sink = Collector()
    loop.submit(r, sink)
    assert sink.wait().result.token_ids == alone(tiny_engine, r).token_ids
    wait_until(lambda: loop.num_running == 0, "both requests have left")
    assert loop.alive


# -- every exit path leaves nothing behind --------------------------------------------------------------------------


def test_a_pieced_prompts_first_token_streams_in_the_step_that_finishes_it(tiny_engine):
    """Step by step, a prompt computed in pieces streams its first token in the step that computes its last piece,
    before that step's decode, as a whole prompt's does (it came one decode step late, with the second)."""
    loop = EngineLoop(tiny_engine, max_num_seqs=2, max_model_len=64, queue_capacity=4, kv_budget_tokens=4096,
                      prefill_tokens=8)
    steps: list[tuple[int, int]] = []
    r = request(tiny_engine, "long", list(range(5, 35)), "full", max_tokens=3)
    loop.submit(r, lambda out: steps.append((loop.steps, len(out.token_ids))))
    while loop.scheduler.has_work:
        loop.step()
    assert steps[0] == (3, 1), steps  # 30 tokens: pieces of 8 in steps 0-2, the last 6 and a first token in step 3
    assert [n for _, n in steps] == [1, 1, 1]


@pytest.mark.parametrize("prefill_tokens", [None, 3], ids=["whole", "chunked"])
def test_random_interleavings_leave_no_request_row_or_block_behind(tiny_engine, loop_engine, poisoned_seed,
                                                                  monkeypatch, prefill_tokens):
    """200 seeded random interleavings of submit / abort / disconnect / finish / fail (a poisoned row, a failing
    step) / drain / probe, driven step by step on this thread, with whole prompts and with prompts prefilled 3
    tokens per step (chunked: requests end while their prompt is in pieces too). After each: no request, row,
    reservation or KV block is left anywhere, prefix-only blocks are within their cap, and every request got one
    final answer (at most one if its client aborted it)."""
    import random

    from server.engine.scheduler import DrainingError

    rng = random.Random(13)
    real_launch = Batch.launch
    fail_next = [False]

    def launch(batch: Batch, inp):
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("injected step failure")
        return real_launch(batch, inp)

    monkeypatch.setattr(Batch, "launch", launch)
    loop = EngineLoop(loop_engine, max_num_seqs=3, max_model_len=48, queue_capacity=6, kv_budget_tokens=1024,
                      kv_block_size=4, prefix_cache_blocks=8, metrics=Metrics(model=MODEL),
                      prefill_tokens=prefill_tokens)
    finals: dict[str, int] = {}
    gone: set[str] = set()  # sinks whose client left
    aborted: set[str] = set()  # by their client: answered at most once

    def sink_for(rid: str):
        def sink(out: Output) -> None:
            if rid in gone:
                raise ConnectionError("client went away")
            if out.finished or out.error:
                finals[rid] = finals.get(rid, 0) + 1
        return sink

    n = 0
    shared = [5, 6, 7, 8, 9, 10, 11, 12]  # a common prefix, so prefix reuse and its cap are exercised
    for _ in range(200):
        submitted: list[str] = []
        for _ in range(rng.randint(3, 9)):
            event = rng.choices(["submit", "abort", "disconnect", "step", "fail", "drain"], [5, 1, 1, 4, 0.3, 0.2])[0]
            if event == "submit":
                n += 1
                rid = f"r{n}"
                prompt = (shared[: rng.randint(0, 8)] + [rng.randint(3, 120) for _ in range(rng.randint(1, 6))])
                policy = rng.choice(["full", "skip:2", "pairs:1-4", "loop:1-4x2"])
                kind = rng.random()
                params = dict(max_tokens=rng.randint(0, 5), ignore_eos=rng.random() < 0.8)
                if kind < 0.15:
                    params.update(temperature=1.0, seed=poisoned_seed)  # its sampler raises: it fails alone
                elif kind < 0.4:
                    params.update(temperature=0.9, top_p=0.8, top_k=rng.choice([0, 5]), seed=n, logprobs=2)
                elif kind < 0.5:
                    params.update(echo=True, logprobs=1)
                r = Request(rid, prompt, SamplingParams(**params), tiny_engine.compile(policy))
                if rng.random() < 0.05:
                    r.probe_prompts = [prompt, prompt[:2] or [3]]
                try:
                    loop.submit(r, sink_for(rid))
                    submitted.append(rid)
                except (QueueFullError, DrainingError):
                    pass
            elif event in ("abort", "disconnect") and submitted:
                rid = rng.choice(submitted)
                aborted.add(rid)
                if event == "disconnect":
                    gone.add(rid)
                loop.abort(rid)
            elif event == "step":
                loop.step()
            elif event == "fail":
                fail_next[0] = True
                loop.step()
            elif event == "drain":
                loop._abort_left = True  # what drain() sets at its deadline
                loop.step()
        while loop.scheduler.has_work or loop._aborts:
            loop.step()
        fail_next[0] = False
        kv, cache = loop.batch.kv, loop.batch.executor.cache
        assert loop.scheduler.num_waiting == 0 and loop.scheduler.num_running == 0
        assert loop.batch.sequences == [] and loop.batch.pieces == [] and kv.reserved == {}
        assert cache.used_blocks == 0 and not cache._rows and not cache._held and not cache._blocks
        assert kv.prefix_only_blocks <= kv.prefix_blocks
        assert all(count == 1 for count in finals.values()), "one final answer per request"
        unanswered = [rid for rid in submitted if rid not in aborted and rid not in finals]
        assert not unanswered, f"never answered: {unanswered}"
    m = loop.metrics.registry
    assert m.get_sample_value("painters:num_requests_running", {"model": MODEL}) == 0
    assert m.get_sample_value("painters:num_requests_waiting", {"model": MODEL}) == 0
