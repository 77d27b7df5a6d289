"""The engine loop: a thread that owns the model and its batches and runs schedule -> execute -> update steps.

HTTP handlers only `submit` requests (with a sink that receives `Output`s) and `abort` them; every tensor is
touched on this thread. One step runs one schedule group: new requests of that group are prefilled into it, the
rest decode one token; finished and aborted sequences leave at once and free their cache rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.generate import Batch, Engine, GenerationResult, Sequence
from server.metrics import Metrics, QueueStats, RequestStats, StepStats
from server.sampling import SamplingParams
from server.scheduler import QueueFullError, Scheduler, SchedRequest
from server.compiler import Schedule

log = logging.getLogger(__name__)

__all__ = ["EngineLoop", "EngineRequest", "Output", "QueueFullError"]


@dataclass
class EngineRequest:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    schedule: Schedule
    arrival: float = field(default_factory=time.perf_counter)


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
                 metrics: Metrics | None = None) -> None:
        self.engine, self.metrics = engine, metrics
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.scheduler = Scheduler(max_running=max_num_seqs, queue_capacity=queue_capacity)
        self._tracked: dict[str, _Tracked] = {}  # request id -> state, until it leaves
        self._by_seq: dict[int, _Tracked] = {}  # Sequence.id -> state (engine thread only)
        self._batches: dict[str, Batch] = {}
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
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

    def submit(self, request: EngineRequest, sink: Sink) -> None:
        """Queue a request; raises QueueFullError when the waiting queue is at capacity."""
        with self._wake:
            self.scheduler.add(SchedRequest(request.id, request.schedule.key, request.arrival))
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

    # -- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.scheduler.has_work:
                    self._wake.wait(timeout=0.5)
                if self._stop:
                    return
                plan = self.scheduler.schedule()
                aborts, self._aborts = self._aborts, set()
                admitted = [self._tracked[r] for r in plan.admit]
            if plan.key is None:
                continue
            try:
                self._step(plan.key, admitted, aborts)
            except Exception as e:  # never let one bad step kill the server: fail that group's requests
                log.exception("engine step failed")
                self._fail_group(plan.key, admitted, f"engine error: {type(e).__name__}: {e}")

    def _step(self, key: str, admitted: list[_Tracked], aborts: set[str]) -> None:
        self._apply_aborts(aborts, current=key)
        t0 = time.perf_counter()
        batch = self._batches.get(key)
        if batch is None:
            schedule = admitted[0].request.schedule
            batch = self.engine.new_batch(schedule, max_batch=self.max_num_seqs, max_len=self.max_model_len,
                                          initial_batch=min(4, self.max_num_seqs), initial_len=256)
            self._batches[key] = batch
        if any(not s.finished for s in batch.sequences):
            batch.step()
        new = []
        for t in admitted:
            r = t.request
            t.sequence = self.engine.new_sequence(r.prompt_ids, r.params, arrival=r.arrival)
            self._by_seq[t.sequence.id] = t
            new.append(t.sequence)
        batch.add(new)
        duration = time.perf_counter() - t0
        size = len(batch.sequences)
        self.steps += 1
        for seq in batch.sequences:
            tracked = self._by_seq.get(seq.id)
            if tracked is not None:
                self._emit(tracked)
        queue = self._reap(key, batch)
        if self.metrics:
            self.metrics.observe_step(StepStats(batch.schedule.policy, size, duration))
            self.metrics.observe_queue(queue)

    def _apply_aborts(self, aborts: set[str], *, current: str) -> None:
        """Mark aborted sequences in every batch; batches other than `current` release them now."""
        touched = set()
        for request_id in aborts:
            tracked = self._tracked.get(request_id)
            if tracked is None:
                continue
            if tracked.sequence is None:  # admitted in this very step: abort it on the next one
                with self._lock:
                    self._aborts.add(request_id)
                continue
            tracked.sequence.abort()
            touched.add(tracked.request.schedule.key)
        for key in touched - {current}:
            batch = self._batches.get(key)
            if batch is not None:
                queue = self._reap(key, batch)
                if self.metrics:
                    self.metrics.observe_queue(queue)

    def _reap(self, key: str, batch: Batch) -> QueueStats:
        """Remove finished sequences from `batch` (freeing their rows) and from the scheduler."""
        done = batch.filter()
        with self._lock:
            finished_ids = []
            for seq in done:
                tracked = self._by_seq.pop(seq.id, None)
                if tracked is None:
                    continue
                finished_ids.append(tracked.request.id)
                self._tracked.pop(tracked.request.id, None)
                self._record(tracked, aborted=seq.finish_reason == "abort")
            self.scheduler.finish(finished_ids)
            if not batch.sequences:
                self._batches.pop(key, None)
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
            result=seq.result(t.request.schedule.policy) if finished else None,
        )
        t.sent_tokens, t.sent_text = n, text_end
        if seq.finish_reason == "abort":
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

    def _queue_stats(self) -> QueueStats:
        # Slot-tokens held, against what max_num_seqs full-length sequences of the full model would hold.
        budget = self.max_num_seqs * self.max_model_len * self.engine.num_layers
        used = sum(s.length * b.schedule.num_slots for b in self._batches.values() for s in b.sequences)
        return QueueStats(self.scheduler.num_running, self.scheduler.num_waiting, min(1.0, used / budget))

    def _fail_group(self, key: str, admitted: list[_Tracked], message: str) -> None:
        batch = self._batches.pop(key, None)
        seqs = list(batch.sequences) if batch else []
        with self._lock:
            victims = [t for t in self._tracked.values()
                       if t in admitted or (t.sequence is not None and any(t.sequence is s for s in seqs))]
            for t in victims:
                self._tracked.pop(t.request.id, None)
                if t.sequence is not None:
                    self._by_seq.pop(t.sequence.id, None)
                    t.sequence.finish_reason = "error"
                self._record(t, aborted=False)
                try:
                    t.sink(Output(t.request.id, [], [], [], "", finished=True, error=message))
                except Exception:
                    pass
            self.scheduler.finish([t.request.id for t in victims])
