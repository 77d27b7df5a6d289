"""The engine loop: a thread that owns the model and the running batch and runs schedule -> execute -> update steps.

HTTP handlers only `submit` requests (with a sink that receives `Output`s) and `abort` them; every tensor is
touched on this thread. Each step: the scheduler admits (`Scheduler.admit`, plain data); the admitted requests are
prefilled (their own call) and their first tokens emitted; then every running request, the new ones included,
decodes one token in one forward pass whatever its policy (`Batch.decode`: `decode_input` -> `launch` -> `update`;
overlapped on CUDA, so the device runs this step while this thread emits the last, and the new requests' first
tokens are read and emitted after their first decode step is queued); new tokens and text are emitted. Every
request ends through `_end`, whatever the reason (finished, stopped, aborted, disconnected, failed, drained): it
leaves the scheduler, frees its KV, is counted in the metrics and gets its last answer there. A row that fails
(its sampling or stop check raised) ends alone with an error; a step that fails as a whole fails the requests
running in it.

Shutdown: `drain(deadline)` stops admitting, lets queued and running requests finish until the deadline, then ends
the rest with finish_reason "abort" (their clients get that final answer). A `Series` (a beam search: one client
request whose engine requests come in turn) begun before the drain is running too, between its requests as well: the
drain admits its requests and waits for it, and at the deadline cuts it. If the thread itself dies, `failure` says
why and every request still here fails, so a watchdog can restart the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.generate import Engine
from server.policy.compiler import Schedule
from server.metrics import Metrics, QueueStats, RequestStats, SpeculationStats, StepStats
from server.engine.request import Output, Request, Sink, Status
from server.engine.speculative import Speculation
from server.engine.scheduler import (Admission, DrainingError, KVBudgetError, PriorityError, QueueFullError, Scheduler,
                                     SchedulingPolicy)

log = logging.getLogger(__name__)

__all__ = ["DrainingError", "EngineLoop", "KVBudgetError", "Output", "PriorityError", "QueueFullError", "Request",
           "Series"]


@dataclass(eq=False)
class Series:
    """One client request served as engine requests submitted in turn (a beam search's steps), open from before its
    first request until after its last (`EngineLoop.open_series`, `close_series`). A drain counts it as running even
    while none of its requests is here."""

    cut: bool = False  # the drain deadline passed: its requests there ended with "abort", and new ones are refused


class EngineLoop:
    def __init__(self, engine: Engine, *, max_num_seqs: int, max_model_len: int, queue_capacity: int,
                 kv_budget_tokens: int, kv_block_size: int = 16, prefix_caching: bool = True,
                 prefix_cache_blocks: int | None = None, metrics: Metrics | None = None,
                 scheduling_policy: SchedulingPolicy = "fcfs", prefill_tokens: int | None = None,
                 speculation: Speculation | None = None) -> None:
        """kv_budget_tokens: KV cache size in slot-tokens (one token's keys and values in one slot);
        prefix_cache_blocks: cap on blocks kept only for prefix reuse (default a share of the budget);
        scheduling_policy: which waiting request is admitted first (`Scheduler`); prefill_tokens: prompt tokens
        prefilled per step at most, a longer prompt a piece per step (`Batch.add`); None: whole prompts.
        speculation: how rows draft tokens to verify (`server.engine.speculative`); None: the engine's."""
        self.engine, self.metrics = engine, metrics
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        blocks = max(1, kv_budget_tokens // kv_block_size)
        self.batch = engine.new_batch(max_len=max_model_len, num_blocks=blocks + 1, block_size=kv_block_size,
                                      prefix_caching=prefix_caching, prefix_blocks=prefix_cache_blocks,
                                      prefill_tokens=prefill_tokens, speculation=speculation)
        self.scheduler = Scheduler(max_running=max_num_seqs, queue_capacity=queue_capacity, kv=self.batch.kv,
                                   policy=scheduling_policy)
        self._aborts: set[str] = set()  # requests whose client left: running ones end at the next step
        self._lock = threading.RLock()  # re-entered when abort() ends a waiting request under it
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._draining = False
        self._abort_left = False  # set at the drain deadline: the engine thread ends every request still here
        self._series: set[Series] = set()  # open series: running, whether or not one of their requests is here
        self.failure: str | None = None  # why the engine thread died, if it did
        self._thread = threading.Thread(target=self._run, name="painters-engine", daemon=True)
        self.steps = 0

    # -- called from other threads ---------------------------------------------------------------------------

    def warm_up(self, schedule: Schedule) -> None:
        """Before `start` (the engine thread owns the tensors after it): capture, and with fused layer math compile,
        the decode steps of `schedule` at one and two rows, so the first requests do not wait for them."""
        assert not self._thread.is_alive(), "warm up before the engine thread starts"
        t = time.perf_counter()
        try:
            self.batch.warm_up(schedule)
        except Exception:  # noqa: BLE001 -- serving still works: the first steps capture and compile on demand
            log.exception("warm-up failed; decode steps will be captured as requests arrive")
            return
        graphs = self.batch.executor.graphs
        if graphs is not None:
            log.info("warm-up: %d decode steps captured in %.1f s", graphs.stats()["captures"],
                     time.perf_counter() - t)

    def start(self) -> None:
        self._refresh_gauges()  # they exist from the start (0 running, 0 waiting), not from the first request on:
        # a replica that affinity sends nothing still reports
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def num_requests(self) -> int:
        """Requests here, waiting or running (counted under the lock: admission moves them from one to the other,
        and a drain that counted in between would see none left and abort the request at once)."""
        with self._lock:
            return self.scheduler.num_waiting + self.scheduler.num_running

    @property
    def num_series(self) -> int:
        """Open series (`Series`)."""
        with self._lock:
            return len(self._series)

    def drain(self, deadline: float) -> int:
        """Stop admitting new requests; wait until the queued and running ones, and the open series, finish or
        `deadline` (time.monotonic()) passes; then cut the series and end the requests left with finish_reason
        "abort". Returns how many requests were aborted."""
        with self._wake:
            self._draining = True
        while time.monotonic() < deadline and (self.num_requests or self.num_series) and self.alive:
            time.sleep(0.02)
        with self._wake:
            # under the lock: a series' submit comes before its cut (and the request is ended below) or after, refused
            cut, self._series = self._series, set()
            for series in cut:
                series.cut = True
            if cut:
                log.warning("drain deadline passed: %d series (beam searches) cut", len(cut))
            left = self.num_requests
            if not left or not self.alive:
                return left
            self._abort_left = True
            self._wake.notify()
        while self._abort_left and self.alive:
            time.sleep(0.01)
        return left

    def check(self, request: Request) -> None:
        """Raise KVBudgetError when this request could never fit the KV budget, PriorityError when the scheduler
        does not order by its priority."""
        self.scheduler.check(request)

    def check_priority(self, priority: int) -> None:
        """Raise PriorityError when the scheduler does not order by `priority`."""
        self.scheduler.check_priority(priority)

    def longest(self, schedule: Schedule) -> int:
        """The most tokens (prompt + max_tokens) a request under `schedule` can ever hold in the KV budget."""
        return self.batch.kv.longest(schedule.num_slots)

    def submit(self, request: Request, sink: Sink) -> None:
        """Queue a request (`submit_all`)."""
        self.submit_all([(request, sink)])

    def submit_all(self, requests: Sequence[tuple[Request, Sink]], *, series: Series | None = None) -> None:
        """Queue requests that belong together (a request's prompts and choices), all or none: raises
        QueueFullError when the waiting queue cannot take them all, KVBudgetError when one could never fit the KV
        budget, DrainingError once a drain began (unless they are an open `series`' requests: it began before).
        Nothing is queued when it raises, so nothing is counted."""
        for request, sink in requests:
            request.sink = sink
        with self._wake:
            if self._draining and series not in self._series:
                raise DrainingError("the server is shutting down")
            self.scheduler.enqueue(*(request for request, _ in requests))
            self._refresh_gauges(counts_only=True)  # now, not at the end of a step that may be long under way
            self._wake.notify()

    def open_series(self) -> Series:
        """A series whose requests `submit_all` takes until `close_series`, through a drain begun meanwhile (until
        its deadline cuts it); DrainingError once a drain began."""
        with self._wake:
            if self._draining:
                raise DrainingError("the server is shutting down")
            series = Series()
            self._series.add(series)
            return series

    def close_series(self, series: Series) -> None:
        """The series submits nothing more: a drain no longer waits for it."""
        with self._wake:
            self._series.discard(series)

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone): a waiting one ends now, a running one within one step."""
        with self._wake:  # held throughout: the engine thread cannot admit it meanwhile
            request = self.scheduler.get(request_id)
            if request is None:
                return
            if request.status is not Status.RUNNING:
                self._end(request, "abort")  # waiting: it holds no KV, so ending it here touches no engine state
                self._refresh_gauges(counts_only=True)
            # a running one ends at the engine thread's next step, which refreshes the gauges
            self._aborts.add(request_id)
            self._wake.notify()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def failed(self) -> bool:
        """The engine thread died while it was meant to run (not stopped)."""
        return self.failure is not None or (self._thread.ident is not None and not self.alive and not self._stop)

    # -- the one end of every request -------------------------------------------------------------------------

    def _end(self, request: Request, reason: str, error: str | None = None, *, answer: bool = False) -> None:
        """End `request` whatever the reason: it leaves the scheduler (and its KV is freed), the batch, and the
        metrics count it; a failed one gets its error, and with `answer` it gets its final result (a drain)."""
        with self._lock:
            was_running = request.status is Status.RUNNING
            if self.scheduler.finish(request.id, reason, error) is None:
                return  # already ended
            self._aborts.discard(request.id)
        if was_running:
            self.batch.remove(request.id)
        self._record(request)
        if request.finish_reason == "error":
            self._send(request, Output(request.id, [], [], [], "", finished=True,
                                       error=request.error or "generation failed", error_code=request.error_code))
        elif answer:  # what it has not streamed yet (a held-back tail included), and its result
            self._send_rest(request)

    # -- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine.use_device()  # this thread launches the steps
            self._serve()
        except BaseException as e:  # the thread dies: say why, and answer everyone still waiting on it
            self.failure = f"{type(e).__name__}: {e}"
            log.critical("engine thread died: %s", self.failure, exc_info=True)
            with self._lock:
                everyone = [*self.scheduler.waiting.values(), *self.scheduler.running.values()]
            for r in everyone:  # answer=True: one that the dying step had already finished gets its result
                self._end(r, "error", f"engine thread died: {self.failure}", answer=True)
            raise

    def _serve(self) -> None:
        while True:
            with self._wake:
                while (not self._stop and not self._abort_left and not self._aborts
                       and not self.scheduler.has_work):
                    self._wake.wait(timeout=0.5)
                if self._stop:
                    return
            self.step()

    def step(self) -> None:
        """One engine step on the calling thread (the engine thread's loop body; tests drive it directly):
        end what the drain deadline or a client ended, admit, prefill, decode, emit."""
        with self._wake:
            ending = self._abort_left
            if not ending:
                admission = self.scheduler.admit()
                aborts, self._aborts = self._aborts, set()
                if admission.admitted:  # they count as running for the whole step (a long prefill, say)
                    self._refresh_gauges(counts_only=True)
        if ending:
            self._end_left()
            return
        try:
            self._step(admission, aborts)
        except Exception as e:  # never let one bad step kill the server: fail the requests of this step
            log.exception("engine step failed")
            with self._lock:
                running = list(self.scheduler.running.values())
            for r in running:  # answer=True: one that the step had already finished gets its result
                self._end(r, "error", f"engine error: {type(e).__name__}: {e}", answer=True)
            self._refresh_gauges()  # the step's own refresh did not run: they would hold the failed step's counts

    def _step(self, admission: Admission, aborts: set[str]) -> None:
        for request_id in aborts:
            request = self.scheduler.running.get(request_id)
            if request is not None:
                self._end(request, "abort")
        t0 = time.perf_counter()
        batch = self.batch
        new = []
        for r in admission.admitted:
            if r.finished:  # aborted between its admission and its prefill
                continue
            if r.probe_prompts is not None:
                self._probe(r)
                continue
            new.append(self.engine.start(r))
        # Prefill first, so that the new rows decode in this step's forward and, step by step, their first tokens
        # stream now. Overlapped, the prefill is only queued here: `decode` reads it after queueing the step, and
        # every emit below runs while that step is on the device.
        joined = batch.add(new)  # the new requests, and those whose prompt's last piece it computed
        for r in joined:
            if not r.finished:  # a request finished by its first token is answered once, below
                self._emit(r)
        decoded = batch.decode()  # schedule -> execute -> update; the requests whose token it read
        duration = time.perf_counter() - t0
        self.steps += 1
        for r in list(batch.sequences):
            if r.finished:  # counted before it is answered: a client that reads /metrics after its answer finds it
                self._end(r, r.finish_reason or "abort")
            self._emit(r)
        if self.metrics and (decoded or new):
            sizes: dict[str, int] = {}
            for r in {r.id: r for r in (*new, *decoded)}.values():  # a new request is prefilled and decoded once
                sizes[r.schedule.policy] = sizes.get(r.schedule.policy, 0) + 1
            for policy, size in sizes.items():
                self.metrics.observe_step(StepStats(policy, size, duration))
        verified = batch.take_verified()  # this step's drafts, per policy (counted each step, as vLLM's)
        if self.metrics:
            for policy, (rows, drafted, kept) in verified.items():
                self.metrics.observe_speculation(SpeculationStats(policy, rows, drafted, kept))
        self._refresh_gauges()

    def _emit(self, r: Request) -> None:
        if r.finish_reason in ("abort", "error"):
            return
        self._send_rest(r)

    def _send_rest(self, r: Request) -> None:
        """Stream what `r` has not sent yet; a finished request gets all of it and its result."""
        finished = r.finished
        # Hold back a tail that may still become a stop string or an incomplete character. A stop string kept in the
        # text (include_stop_str_in_output) needs none: the text is only cut after a match, never before what it sent.
        keeps = finished or r.params.include_stop_str_in_output
        hold = 0 if keeps else max([len(s) - 1 for s in r.params.stop] + [0])
        text_end = max(r.sent_text, len(r.text) - hold)
        if not finished and r.text.endswith("\ufffd"):
            text_end = r.sent_text
        n = len(r.output_ids)
        if n == r.sent_tokens and text_end == r.sent_text and not finished:
            return
        out = Output(
            request_id=r.id,
            token_ids=r.output_ids[r.sent_tokens:],
            logprobs=r.logprobs[r.sent_tokens:],
            top_logprobs=r.top_logprobs[r.sent_tokens:],
            text=r.text[r.sent_text:text_end],
            finished=finished,
            result=r.result() if finished else None,
            timings=None if finished else r.timings.snapshot(),
        )
        r.sent_tokens, r.sent_text = n, text_end
        self._send(r, out)

    def _send(self, r: Request, out: Output) -> None:
        if r.sink is None:
            return
        try:
            r.sink(out)
        except Exception:  # a sink whose client went away must not stop the loop
            log.debug("sink for %s failed", r.id, exc_info=True)

    def _record(self, r: Request) -> None:
        if not self.metrics or (r.probe_prompts is not None and not r.embed) or not r.counted:
            return  # a probe is a measurement, not a request served; an embedding request is one
        tm = r.timings
        prompt_tokens = len(r.prompt_ids) if r.probe_prompts is None else sum(map(len, r.probe_prompts))
        if r.scheduled is None:  # ended before it ran
            waited = time.perf_counter() - r.arrival
            self.metrics.observe_request(RequestStats(r.schedule.policy, r.finish_reason or "abort",
                                                      prompt_tokens, 0, waited, 0, 0, 0, waited, ()))
            return
        self.metrics.observe_request(RequestStats(
            policy=r.schedule.policy, finished_reason=r.finish_reason or "abort",
            prompt_tokens=prompt_tokens, generation_tokens=len(r.output_ids), queue_s=tm.queue_s,
            prefill_s=tm.prefill_s, decode_s=tm.decode_s, ttft_s=tm.ttft_s,
            e2e_s=time.perf_counter() - r.arrival, per_token_s=tuple(tm.per_token_s), cached_tokens=r.cached_tokens,
        ))

    def _probe(self, r: Request) -> None:
        """Run a probe or embedding request at once (one forward pass); it ends in the same step."""
        assert r.probe_prompts is not None
        what = "embedding" if r.embed else "probe"
        r.scheduled = t0 = time.perf_counter()
        r.timings.queue_s = t0 - r.arrival
        try:
            if r.embed:
                out = Output(r.id, [], [], [], "", finished=True,
                             embeddings=self.batch.embed(r.probe_prompts, r.schedule))
            else:
                out = Output(r.id, [], [], [], "", finished=True, probe=self.batch.probe(r.probe_prompts, r.schedule))
        except Exception as e:  # this request alone fails
            log.exception("%s failed", what)
            out = Output(r.id, [], [], [], "", finished=True, error=f"{what} failed: {type(e).__name__}: {e}")
        r.timings.prefill_s = time.perf_counter() - t0
        r.sink, sink = None, r.sink  # its answer is the probe output, not a generation result
        self._end(r, "stop" if out.error is None else "error", out.error)
        r.sink = sink
        self._send(r, out)

    def _refresh_gauges(self, *, counts_only: bool = False) -> None:
        """Set the queue gauges. The counts are read and set under the lock, so that a refresh from a submitting
        thread and one from the engine thread cannot land an older count over a newer one; the rest (KV, graphs) is
        the engine thread's state, read only there (`counts_only` elsewhere)."""
        if not self.metrics:
            return
        with self._lock:
            if counts_only:
                self.metrics.observe_counts(self.scheduler.num_running, self.scheduler.num_waiting)
            else:
                self.metrics.observe_queue(self._queue_stats())

    def _queue_stats(self) -> QueueStats:
        kv, graphs = self.batch.kv, self.batch.executor.graphs
        return QueueStats(self.scheduler.num_running, self.scheduler.num_waiting, kv.usage(),
                          kv.prefix_only_blocks, kv.prefix_blocks, None if graphs is None else graphs.stats())

    def _end_left(self) -> None:
        """The drain deadline passed: every request still here ends now with finish_reason "abort"."""
        with self._lock:
            left = [*self.scheduler.waiting.values(), *self.scheduler.running.values()]
        for r in left:
            self._end(r, "abort", answer=True)
        log.warning("drain deadline passed: %d request(s) ended with finish_reason 'abort': %s", len(left),
                    ", ".join(r.id for r in left))
        self._refresh_gauges()
        self._abort_left = False
