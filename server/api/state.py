"""What handlers share: the loaded engine, presets, and turning a request into engine requests and back.

A request's policy comes from (1) its `policy` field, (2) a model-name suffix `model@policy` or `model@preset`,
(3) the server's default; all three are validated the same way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from server.api.errors import APIError
from server.engine_loop import EngineLoop, EngineRequest, KVBudgetError, Output, QueueFullError
from server.generate import Engine, GenerationResult
from server.metrics import Metrics
from server.probe import ProbeStats
from server.policy import KINDS, SYNTAX, PolicyError, allowed_forms, as_policy
from server.sampling import SamplingParams
from server.compiler import Schedule, default_span
from server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    model_name: str
    metrics: Metrics
    presets: dict[str, str] = field(default_factory=dict)  # name -> canonical policy
    engine: Engine | None = None
    loop: EngineLoop | None = None
    load_error: str | None = None
    _allowed: set[str] | None = field(default=None, repr=False)

    @property
    def max_model_len(self) -> int:
        """What the server enforces: the setting, capped by the model's own position limit."""
        if self.engine is None:
            return self.settings.max_model_len
        return min(self.settings.max_model_len, self.engine.max_model_len)

    @property
    def ready(self) -> bool:
        return self.loop is not None and self.loop.alive

    def require(self) -> tuple[Engine, EngineLoop]:
        if self.engine is None or self.loop is None:
            detail = f"model failed to load: {self.load_error}" if self.load_error else "model is still loading"
            raise APIError(503, f"{detail}; retry when GET /ready answers 200", headers={"Retry-After": "5"})
        return self.engine, self.loop

    # -- policies ----------------------------------------------------------------------------------------------

    def policy_help(self, message: str = "") -> str:
        """What a user may send, for error messages (without repeating what `message` already says)."""
        n = self.engine.num_layers if self.engine else None
        parts = [] if "allowed forms" in message else [f"allowed forms: {allowed_forms()}"]
        parts.append(f"this model's layers are 0-{n - 1}" if n else "layer range known once loaded")
        if self.presets:
            parts.append(f"presets: {', '.join(self.presets)}")
        return "; ".join(parts)

    def resolve_policy(self, model: str | None, policy: str | dict | None) -> Schedule:
        """Model name (maybe with @suffix) and body policy -> compiled schedule; 404/400 on what is wrong."""
        engine, _ = self.require()
        suffix = None
        if model:
            base, at, suffix_text = model.partition("@")
            suffix = suffix_text if at else None
            if base != self.model_name:
                raise APIError(404, f"model {base!r} not found; this server serves {self.model_name!r} "
                                    f"(optionally {self.model_name}@POLICY or @PRESET)", param="model",
                               code="model_not_found")
            if at and not suffix_text:
                raise APIError(400, f"empty policy after '@' in model {model!r}; {self.policy_help()}", param="model")
        chosen: Any = policy if policy is not None else suffix
        if chosen is None:
            chosen = self.settings.default_policy
        if isinstance(chosen, str) and chosen in self.presets:
            chosen = self.presets[chosen]
        try:
            schedule = engine.compile(as_policy(chosen))
        except PolicyError as e:
            raise APIError(400, f"invalid policy {chosen!r}: {e}; {self.policy_help(str(e))}", param="policy",
                           code="invalid_policy") from None
        if self.settings.allowed_policies is not None:
            canonical = self.allowed_canonical()
            if schedule.policy not in canonical:
                raise APIError(400, f"policy {schedule.policy!r} is not allowed on this server; allowed: "
                                    f"{', '.join(sorted(canonical))}", param="policy", code="policy_not_allowed")
        return schedule

    def allowed_canonical(self) -> set[str]:
        """The allowed policies in canonical form, compiled once (not on every request)."""
        if self._allowed is None:
            engine, _ = self.require()
            self._allowed = {engine.compile(as_policy(self.presets.get(p, p))).policy
                             for p in self.settings.allowed_policies or ()}
        return self._allowed

    def policies_info(self) -> dict[str, Any]:
        n = self.engine.num_layers if self.engine else None
        return {
            "kinds": [{"kind": k, "syntax": SYNTAX[k]} for k in KINDS],
            "num_layers": n,
            "layer_range": f"0-{n - 1}" if n else None,
            "default_range": "{}-{}".format(*default_span(n)) if n else None,
            "default_policy": self.settings.default_policy,
            "presets": self.presets,
            "allowed_policies": self.settings.allowed_policies,
            "examples": ["full", "skip:10", "skip:12-17", "pairs", "pairs:4-25", "parallel:8-22", "loop:8-22x3",
                         "reverse:8-22", "shuffle:8-22:7", "repeat:8-22", "schedule:0-9,10+11/pairs,12-29"],
        }

    # -- prompts -----------------------------------------------------------------------------------------------

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        limit = self.max_model_len
        if prompt_len > limit:
            raise APIError(413, f"prompt has {prompt_len} tokens but this server allows at most {limit} "
                                f"(max_model_len); shorten the prompt", param="prompt", code="context_length_exceeded")
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but {prompt_len} prompt "
                                f"tokens + {max_tokens} max_tokens = {prompt_len + max_tokens}; lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")

    def default_max_tokens(self, prompt_len: int) -> int:
        return max(0, self.max_model_len - prompt_len)


class RequestStream:
    """One engine request seen from the event loop: outputs arrive on an asyncio queue."""

    def __init__(self, loop: EngineLoop, request: EngineRequest) -> None:
        self.engine_loop, self.request = loop, request
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        event_loop = asyncio.get_running_loop()
        self._sink = lambda out: event_loop.call_soon_threadsafe(self.queue.put_nowait, out)
        self.done = False

    def submit(self) -> None:
        self.engine_loop.submit(self.request, self._sink)

    def abort(self) -> None:
        if not self.done:
            self.engine_loop.abort(self.request.id)
            self.done = True

    async def __aiter__(self) -> AsyncIterator[Output]:
        while not self.done:
            out = await self.queue.get()
            if out.error:
                self.done = True
                raise APIError(500, out.error)
            if out.finished:
                self.done = True
            yield out


def submit_all(state: AppState, requests: list[EngineRequest]) -> list[RequestStream]:
    """Queue every request or none: on a full queue the ones already queued are aborted and 429 is raised."""
    _, loop = state.require()
    capacity = state.settings.queue_capacity
    if len(requests) > capacity:
        raise APIError(400, f"this request asks for {len(requests)} sequences (prompts x n) but the server queues at "
                            f"most {capacity} at once; split it", param="prompt", code="too_many_sequences")
    for r in requests:  # a request that could never fit the KV budget is refused whole, before any is queued
        try:
            loop.check(r)
        except KVBudgetError as e:
            raise APIError(400, f"{e}; lower max_tokens or choose a policy that runs fewer layers", param="max_tokens",
                           code="kv_budget_exceeded") from None
    streams = [RequestStream(loop, r) for r in requests]
    for i, s in enumerate(streams):
        try:
            s.submit()
        except QueueFullError as e:
            for earlier in streams[:i]:
                earlier.abort()
            raise APIError(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"},
                           code="queue_full") from None
    return streams


async def collect(streams: list[RequestStream], request: Request) -> list[GenerationResult]:
    """Wait for every stream's final result; abort them all if the client disconnects."""

    async def one(s: RequestStream) -> GenerationResult:
        async for out in s:
            if out.finished:
                assert out.result is not None
                return out.result
        raise APIError(500, "request ended without a result")

    tasks = [asyncio.ensure_future(one(s)) for s in streams]
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=0.25, return_when=asyncio.ALL_COMPLETED)
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():  # nobody to answer: free the work, answer the void quietly
                raise APIError(499, "client closed the request")
    except BaseException:
        for s in streams:
            s.abort()
        for t in tasks:
            t.cancel()
        raise


async def collect_probe(stream: RequestStream, request: Request) -> ProbeStats:
    """Wait for a probe's statistics; abort it if the client disconnects."""
    task = asyncio.ensure_future(_first_final(stream))
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=0.25)
            if done:
                out = task.result()
                if out.probe is None:
                    raise APIError(500, "probe ended without statistics")
                return out.probe
            if await request.is_disconnected():
                raise APIError(499, "client closed the request")
    except BaseException:
        stream.abort()
        task.cancel()
        raise


async def _first_final(stream: RequestStream) -> Output:
    async for out in stream:
        if out.finished:
            return out
    raise APIError(500, "request ended without a result")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def engine_request(rid: str, prompt_ids: list[int], params: SamplingParams, schedule: Schedule) -> EngineRequest:
    return EngineRequest(id=rid, prompt_ids=prompt_ids, params=params, schedule=schedule, arrival=time.perf_counter())


def timing_fields(result: GenerationResult) -> dict[str, float]:
    t = result.timings
    e2e = t.queue_s + t.prefill_s + t.decode_s
    return dict(queue_s=t.queue_s, prefill_s=t.prefill_s, decode_s=t.decode_s, time_to_first_token_s=t.ttft_s,
                time_per_output_token_s=t.tpot_s, e2e_s=e2e)


def timing_headers(schedule: Schedule, results: list[GenerationResult]) -> dict[str, str]:
    """TGI-style x-* headers (seconds; the slowest choice when there are several)."""
    headers = {"x-painters-policy": schedule.policy}
    if results:
        fields = [timing_fields(r) for r in results]
        worst = {k: max(f[k] for f in fields) for k in fields[0]}
        headers.update({
            "x-queue-time": f"{worst['queue_s']:.6f}", "x-prefill-time": f"{worst['prefill_s']:.6f}",
            "x-decode-time": f"{worst['decode_s']:.6f}", "x-time-to-first-token": f"{worst['time_to_first_token_s']:.6f}",
            "x-time-per-token": f"{worst['time_per_output_token_s']:.6f}", "x-total-time": f"{worst['e2e_s']:.6f}",
            "x-prompt-tokens": str(sum(len(r.prompt_token_ids) for r in results)),
            "x-generated-tokens": str(sum(len(r.token_ids) for r in results)),
        })
    return headers


def painters_info(schedule: Schedule, result: GenerationResult | None) -> dict[str, Any]:
    return {"policy": schedule.policy, "schedule": schedule.key,
            "timings": timing_fields(result) if result is not None else None}
