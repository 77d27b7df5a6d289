"""The engine loop: a thread that owns the model and the running batch and runs schedule -> execute -> update steps.

HTTP handlers only `submit` requests (with a sink that receives `Output`s) and `abort` them; every tensor is
touched on this thread. Each step: the scheduler's output (plain data) says who is admitted; every running request
decodes one token in one forward pass whatever its policy, then the admitted ones are prefilled (their own call);
finished, aborted and failed sequences leave at once and free their KV blocks. A row that fails (its sampling or
stop check raised) ends alone with an error; a step that fails as a whole fails the requests in it.

Shutdown: `drain(deadline)` stops admitting, lets queued and running requests finish until the deadline, then ends
the rest with finish_reason "abort" (their clients get that final answer). If the thread itself dies, `failure`
says why and every request still here fails, so a watchdog can restart the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.compiler import Schedule
from server.generate import Engine, GenerationResult, Sequence, Timings
from server.metrics import Metrics, QueueStats, RequestStats, StepStats
from server.probe import ProbeStats
from server.sampling import SamplingParams
from server.scheduler import KVBudgetError, QueueFullError, Scheduler, SchedRequest

log = logging.getLogger(__name__)

__all__ = ["DrainingError", "EngineLoop", "EngineRequest", "KVBudgetError", "Output", "QueueFullError"]


class DrainingError(RuntimeError):
    """The loop is draining for shutdown and takes no new requests (HTTP 503)."""


@dataclass
class EngineRequest:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    schedule: Schedule
    arrival: float = field(default_factory=time.perf_counter)
    probe_prompts: list[list[int]] | None = None  # a probe: one forward pass of these, statistics instead of tokens

    def kv_length(self, block_size: int) -> int:
        """Tokens per slot to reserve: prompt + max_tokens, or every probe prompt rounded up to whole blocks."""
        if self.probe_prompts is not None:
            return sum(-(-len(p) // block_size) * block_size for p in self.probe_prompts)
        return len(self.prompt_ids) + max(1, self.params.max_tokens)


@dataclass
class Output:
    """What one step produced for one request: new tokens and text; the final result once finished."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    text: str  # new text since the previous output
    finished: bool = False
    result: GenerationResult | None = None
    error: str | None = None
    probe: ProbeStats | None = None


Sink = Callable[[Output], None]


@dataclass
class _Tracked:
    request: EngineRequest
    sink: Sink
    sequence: Sequence | None = None
    sent_tokens: int = 0
    sent_text: int = 0  # characters of sequence.text already sent


class EngineLoop:
    def __init__(self, engine: Engine, *, max_num_seqs: int, max_model_len: int, queue_capacity: int,
                 kv_budget_tokens: int, kv_block_size: int = 16, prefix_caching: bool = True,
                 metrics: Metrics | None = None) -> None:
        """kv_budget_tokens: KV cache size in slot-tokens (one token's keys and values in one slot)."""
        self.engine, self.metrics = engine, metrics
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        block = kv_block_size
        blocks = max(1, kv_budget_tokens // block)
        self.scheduler = Scheduler(max_running=max_num_seqs, queue_capacity=queue_capacity, kv_blocks=blocks,
                                   block_size=block)
        self.batch = engine.new_batch(max_len=max_model_len, num_blocks=blocks + 1, block_size=block,
                                      prefix_caching=prefix_caching)
        self._tracked: dict[str, _Tracked] = {}  # request id -> its sink and sequence, until it leaves
        self._by_seq: dict[int, _Tracked] = {}  # Sequence.id -> state (engine thread only)
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._draining = False
        self._abort_left = False  # set at the drain deadline: the engine thread ends every request still here
        self.failure: str | None = None  # why the engine thread died, if it did
        self._thread = threading.Thread(target=self._run, name="painters-engine", daemon=True)
        self.steps = 0

    # -- called from other threads ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def drain(self, deadline: float) -> int:
        """Stop admitting new requests; wait until the queued and running ones finish or `deadline` (time.monotonic())
        passes; then end the rest with finish_reason "abort". Returns how many were aborted."""
        with self._wake:
            self._draining = True
        while time.monotonic() < deadline and self._tracked and self.alive:
            time.sleep(0.02)
        with self._wake:
            left = len(self._tracked)
            if not left or not self.alive:
                return left
            self._abort_left = True
            self._wake.notify()
        while self._abort_left and self.alive:
            time.sleep(0.01)
        return left

    def check(self, request: EngineRequest) -> None:
        """Raise KVBudgetError when this request could never fit the KV budget."""
        self.scheduler.check(request.schedule.num_slots, request.kv_length(self.scheduler.block_size))

    def submit(self, request: EngineRequest, sink: Sink) -> None:
        """Queue a request; raises QueueFullError when the waiting queue is at capacity, KVBudgetError when it could
        never fit the KV budget."""
        max_len = request.kv_length(self.scheduler.block_size)
        with self._wake:
            if self._draining:
                raise DrainingError("the server is shutting down")
            self.scheduler.add(SchedRequest(request.id, request.schedule.num_slots, max_len, request.arrival))
            self._tracked[request.id] = _Tracked(request, sink)
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone): a waiting one is dropped now, a running one leaves within one step."""
        with self._wake:
            tracked = self._tracked.get(request_id)
            if tracked is None:
                return
            if self.scheduler.abort(request_id):
                self._aborts.add(request_id)
            else:
                del self._tracked[request_id]
                self._record(tracked, aborted=True)
                if self.metrics:
                    self.metrics.observe_queue(self._queue_stats())
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

    # -- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the thread dies: say why, and answer everyone still waiting on it
            self.failure = f"{type(e).__name__}: {e}"
            log.critical("engine thread died: %s", self.failure, exc_info=True)
            self._fail_all(list(self._tracked.values()), f"engine thread died: {self.failure}")
            raise

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._abort_left and not self.scheduler.has_work:
                    self._wake.wait(timeout=0.5)
                if self._stop:
                    return
                ending = self._abort_left
                if not ending:
                    plan = self.scheduler.schedule()
                    aborts, self._aborts = self._aborts, set()
                    admitted = [self._tracked[r] for r in plan.admit]
            if ending:
                self._end_left()
                continue
            try:
                self._step(admitted, aborts)
            except Exception as e:  # never let one bad step kill the server: fail the requests of this step
                log.exception("engine step failed")
                self._fail_all(admitted, f"engine error: {type(e).__name__}: {e}")

    def _step(self, admitted: list[_Tracked], aborts: set[str]) -> None:
        for request_id in aborts:
            tracked = self._tracked.get(request_id)
            if tracked is not None and tracked.sequence is not None:
                tracked.sequence.abort()
        self._reap()
        t0 = time.perf_counter()
        batch = self.batch
        decoding = len(batch.sequences)
        batch.step()
        self._drop([t for t in admitted if t.request.id in aborts])
        new = []
        for t in admitted:
            r = t.request
            if r.id in aborts:
                continue
            if r.probe_prompts is not None:
                self._probe(t)
                continue
            t.sequence = self.engine.new_sequence(r.prompt_ids, r.params, r.schedule, arrival=r.arrival)
            self._by_seq[t.sequence.id] = t
            new.append(t.sequence)
        batch.add(new)
        duration = time.perf_counter() - t0
        self.steps += 1
        for seq in batch.sequences:
            tracked = self._by_seq.get(seq.id)
            if tracked is not None:
                self._emit(tracked)
        if self.metrics and (decoding or new):
            sizes: dict[str, int] = {}
            for seq in batch.sequences:
                sizes[seq.schedule.policy] = sizes.get(seq.schedule.policy, 0) + 1
            for policy, size in sizes.items():
                self.metrics.observe_step(StepStats(policy, size, duration))
        queue = self._reap()
        if self.metrics:
            self.metrics.observe_queue(queue)

    def _reap(self) -> QueueStats:
        """Remove finished sequences from the batch (freeing their KV blocks) and from the scheduler."""
        done = self.batch.filter()
        with self._lock:
            finished_ids = []
            for seq in done:
                tracked = self._by_seq.pop(seq.id, None)
                if tracked is None:
                    continue
                finished_ids.append(tracked.request.id)
                self._tracked.pop(tracked.request.id, None)
                if seq.finish_reason == "error":
                    self._send_error(tracked, seq.error or "generation failed")
                self._record(tracked, aborted=seq.finish_reason == "abort")
            self.scheduler.finish(finished_ids)
            return self._queue_stats()

    def _emit(self, t: _Tracked) -> None:
        seq = t.sequence
        assert seq is not None
        finished = seq.finished
        # Hold back a tail that may still become a stop string or an incomplete character.
        hold = 0 if finished else max([len(s) - 1 for s in seq.params.stop] + [0])
        text_end = max(t.sent_text, len(seq.text) - hold)
        if not finished and seq.text.endswith("\ufffd"):
            text_end = t.sent_text
        n = len(seq.output_ids)
        if n == t.sent_tokens and text_end == t.sent_text and not finished:
            return
        out = Output(
            request_id=t.request.id,
            token_ids=seq.output_ids[t.sent_tokens:],
            logprobs=seq.logprobs[t.sent_tokens:],
            top_logprobs=seq.top_logprobs[t.sent_tokens:],
            text=seq.text[t.sent_text:text_end],
            finished=finished,
            result=seq.result() if finished else None,
        )
        t.sent_tokens, t.sent_text = n, text_end
        if seq.finish_reason in ("abort", "error"):
            return
        try:
            t.sink(out)
        except Exception:  # a sink whose client went away must not stop the loop
            log.debug("sink for %s failed", t.request.id, exc_info=True)

    def _record(self, t: _Tracked, *, aborted: bool) -> None:
        if not self.metrics:
            return
        seq = t.sequence
        if seq is None:  # aborted (or failed) before it ran
            waited = time.perf_counter() - t.request.arrival
            reason = "abort" if aborted else "error"
            self.metrics.observe_request(RequestStats(t.request.schedule.policy, reason, len(t.request.prompt_ids),
                                                      0, waited, 0, 0, 0, waited, ()))
            return
        tm = seq.timings
        self.metrics.observe_request(RequestStats(
            policy=t.request.schedule.policy, finished_reason="abort" if aborted else (seq.finish_reason or "abort"),
            prompt_tokens=len(seq.prompt_ids), generation_tokens=len(seq.output_ids), queue_s=tm.queue_s,
            prefill_s=tm.prefill_s, decode_s=tm.decode_s, ttft_s=tm.ttft_s,
            e2e_s=time.perf_counter() - seq.arrival, per_token_s=tuple(tm.per_token_s),
        ))

    def _probe(self, t: _Tracked) -> None:
        """Run a probe request at once (one forward pass); it leaves in the same step."""
        r = t.request
        assert r.probe_prompts is not None
        try:
            stats = self.batch.probe(r.probe_prompts, r.schedule)
            out = Output(r.id, [], [], [], "", finished=True, probe=stats)
        except Exception as e:  # this request alone fails
            log.exception("probe failed")
            out = Output(r.id, [], [], [], "", finished=True, error=f"probe failed: {type(e).__name__}: {e}")
        with self._lock:
            self._tracked.pop(r.id, None)
            self.scheduler.finish([r.id])
        try:
            t.sink(out)
        except Exception:
            log.debug("sink for %s failed", r.id, exc_info=True)

    def _drop(self, aborted: list[_Tracked]) -> None:
        """Requests aborted between their admission and their prefill: they leave without running."""
        with self._lock:
            for t in aborted:
                self._tracked.pop(t.request.id, None)
                self._record(t, aborted=True)
            self.scheduler.finish([t.request.id for t in aborted])

    def _queue_stats(self) -> QueueStats:
        return QueueStats(self.scheduler.num_running, self.scheduler.num_waiting, self.batch.kv_usage())

    def _send_error(self, t: _Tracked, message: str) -> None:
        try:
            t.sink(Output(t.request.id, [], [], [], "", finished=True, error=message))
        except Exception:
            log.debug("sink for %s failed", t.request.id, exc_info=True)

    def _end_left(self) -> None:
        """The drain deadline passed: every request still here ends now with finish_reason "abort"."""
        with self._lock:
            left = list(self._tracked.values())
        for t in left:
            if t.sequence is not None:  # running: its final output, then it leaves the batch and frees its KV
                t.sequence.abort()
                result = t.sequence.result()
            else:
                waited = time.perf_counter() - t.request.arrival
                result = GenerationResult(text="", prompt_token_ids=t.request.prompt_ids, token_ids=[], logprobs=[],
                                          top_logprobs=None, prompt_logprobs=None, prompt_top_logprobs=None,
                                          finish_reason="abort", policy=t.request.schedule.policy,
                                          timings=Timings(queue_s=waited))
                with self._lock:
                    self.scheduler.abort(t.request.id)
                    self._tracked.pop(t.request.id, None)
                self._record(t, aborted=True)
            try:
                t.sink(Output(t.request.id, [], [], [], "", finished=True, result=result))
            except Exception:
                log.debug("sink for %s failed", t.request.id, exc_info=True)
        log.warning("drain deadline passed: %d request(s) ended with finish_reason 'abort': %s", len(left),
                    ", ".join(t.request.id for t in left))
        queue = self._reap()  # the running ones leave the batch: their KV blocks are freed
        if self.metrics:
            self.metrics.observe_queue(queue)
        self._abort_left = False

    def _fail_all(self, admitted: list[_Tracked], message: str) -> None:
        """A step raised: every sequence of the batch and the admitted ones fail (their state is unknown)."""
        with self._lock:
            victims = [t for t in self._tracked.values()
                       if t in admitted or (t.sequence is not None and not t.sequence.finished)]
            for t in victims:
                if t.sequence is not None:
                    t.sequence.fail(message)
                    self._by_seq.pop(t.sequence.id, None)
                self._tracked.pop(t.request.id, None)
                self._record(t, aborted=False)
                self._send_error(t, message)
            self.scheduler.finish([t.request.id for t in victims])
        for seq in list(self.batch.sequences):
            seq.fail(message)
        self.batch.filter()
