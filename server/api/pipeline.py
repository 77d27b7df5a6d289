"""The one request pipeline every endpoint that runs the model shares: resolve the policy -> tokenize (on a worker
thread, never on the event loop) -> check the limits -> submit -> collect or stream. Routers are thin adapters: from
their API shape to a `Job`, and from results or `Output`s back to their response models."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import Request
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from server.api.errors import CLIENT_CLOSED, GENERATION_FAILED, APIError
from server.api.protocol import PaintersInfo, PolicyField, Timings
from server.api.state import AppState
from server.policy.compiler import Schedule
from server.engine.grammar import Grammar, GrammarBusy, GrammarError, GrammarUnavailable, Matcher
from server.engine.probe import ProbeStats
from server.engine.request import GenerationResult, Output
from server.engine.request import Timings as EngineTimings
from server.engine.request import Request as EngineRequest  # fastapi.Request is the HTTP one
from server.engine.sampling_params import SamplingParams, StructuredOutput
from server.engine.scheduler import DrainingError, KVBudgetError, PriorityError, QueueFullError
from server.engine.served import TemplateKwargsError

if TYPE_CHECKING:
    from server.engine.loop import EngineLoop, Series
    from server.engine.served import ServedModel

log = logging.getLogger(__name__)

# (max_tokens, choice index) -> that choice's sampling parameters
ParamsFor = Callable[[int, int], SamplingParams]


def sse_responses(description: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a 200 that may be server-sent events: each event's `data` is a JSON frame (or "[DONE]")."""
    event = {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": "one JSON frame; OpenAI streams end with [DONE]"},
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}
    return {200: {"content": {"text/event-stream": {"schema": event}}, "description": description}}


@dataclass(frozen=True)
class Chat:
    """A prompt given as chat messages, rendered by the model's chat template."""

    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] | None = None  # vLLM's chat_template_kwargs
    tools: list[dict[str, Any]] | None = None  # the request's tools, which the template may describe to the model


@dataclass(frozen=True)
class Prompt:
    text: str | None  # as sent, when sent as text
    ids: list[int]


@dataclass(frozen=True)
class Job:
    """One API request in engine terms: n choices for each prompt, all under one policy."""

    prefix: str  # request-id prefix: cmpl, chatcmpl, gen
    model: str | None
    policy: PolicyField
    prompts: list[str | list[int]] | Chat
    params: ParamsFor
    max_tokens: int | None = None  # None: whatever the context leaves after the prompt
    n: int = 1
    truncate_prompt_tokens: int | None = None  # keep only each prompt's last k tokens (vLLM's left truncation)
    priority: int = 0  # lower first where the server schedules by priority (vLLM's)
    cache_salt: str | None = None  # its prompts share cached KV only with requests of the same salt (vLLM's)


@dataclass
class Running:
    """A submitted job: streams are prompt-major (prompt p, choice i -> streams[p * n + i])."""

    schedule: Schedule
    prompts: list[Prompt]
    streams: list[Stream]
    n: int

    def prompt_of(self, index: int) -> Prompt:
        return self.prompts[index // self.n]


@dataclass(frozen=True)
class Prepared:
    """A job resolved, tokenized and checked against the context, before anything is submitted."""

    schedule: Schedule
    prompts: list[Prompt]
    max_tokens: list[int]  # per prompt
    priority: int = 0  # the job's, for each engine request it becomes
    cache_salt: str | None = None


async def prepare(state: AppState, job: Job) -> Prepared:
    """Resolve `job`'s policy, tokenize its prompts and check their lengths; every refusal is an APIError naming what
    was wrong."""
    state.check_admitting()
    _check_sequences(state, job.n * (1 if isinstance(job.prompts, Chat) else len(job.prompts)))
    check_priority(state, job.priority)
    schedule = state.resolve_policy(job.model, job.policy)
    prompts = await tokenize(state, job.prompts)
    if job.truncate_prompt_tokens is not None:
        prompts = [_keep_last(p, job.truncate_prompt_tokens, state.max_model_len) for p in prompts]
    limits = []
    for prompt in prompts:
        max_tokens = state.default_max_tokens(len(prompt.ids), schedule) if job.max_tokens is None else job.max_tokens
        state.check_length(len(prompt.ids), max_tokens)
        limits.append(max_tokens)
    return Prepared(schedule, prompts, limits, job.priority, job.cache_salt)


def check_priority(state: AppState, priority: int) -> None:
    """A 400 naming priority where the scheduler does not order by it (checked before any work is done)."""
    _, loop = state.require()
    try:
        loop.check_priority(priority)
    except PriorityError as e:
        raise APIError(400, str(e), param="priority") from None


async def prepare_prompt_only(state: AppState, prompts: list[str | list[int]], *, model: str | None,
                              policy: PolicyField, param: str, truncate_prompt_tokens: int | None = None,
                              add_special_tokens: bool = True) -> tuple[Schedule, list[Prompt]]:
    """Resolve, tokenize and bound the prompts of one forward pass (a probe, an embedding request): at most
    probe_max_prompts prompts (a 400) and probe_max_tokens tokens over all of them (a 413), each within the context;
    every refusal an APIError naming what is allowed."""
    s = state.settings
    if len(prompts) > s.probe_max_prompts:
        raise APIError(400, f"{len(prompts)} prompts; one request takes at most {s.probe_max_prompts} "
                            "(probe_max_prompts)", param=param, code="too_many_prompts")
    state.check_admitting()
    schedule = state.resolve_policy(model, policy)
    tokenized = await tokenize(state, prompts, add_special_tokens=add_special_tokens, param=param)
    if truncate_prompt_tokens is not None:
        tokenized = [_keep_last(p, truncate_prompt_tokens, state.max_model_len) for p in tokenized]
    for p in tokenized:
        state.check_length(len(p.ids), 0)
    total = sum(len(p.ids) for p in tokenized)
    if total > s.probe_max_tokens:
        raise APIError(413, f"the prompts have {total} tokens; one request takes at most {s.probe_max_tokens} "
                            "(probe_max_tokens)", param=param, code="prompts_too_large")
    return schedule, tokenized


async def start(state: AppState, job: Job) -> Running:
    """Prepare and submit `job`; every refusal is an APIError naming what was wrong. A structured output is compiled
    here, before anything is queued, and each request (each choice) gets its own matcher."""
    ready = await prepare(state, job)
    schedule, prompts = ready.schedule, ready.prompts
    served, _ = state.require()
    requests = []
    grammars: dict[StructuredOutput, Grammar] = {}
    for prompt, max_tokens in zip(prompts, ready.max_tokens, strict=True):
        params = served.with_bad_words_ids([job.params(max_tokens, i) for i in range(job.n)])  # or a SamplingError
        for p in params:
            p.check_model(served.vocab_size, served.eos_ids)  # a SamplingError: a 400 naming what was wrong
            if p.structured is not None and p.structured not in grammars:
                grammars[p.structured] = await compile_grammar(served, p.structured)
        requests += [engine_request(new_request_id(job.prefix), prompt.ids, p, schedule,
                                    grammar=None if p.structured is None else grammars[p.structured],
                                    priority=ready.priority, cache_salt=ready.cache_salt)
                     for p in params]
    return Running(schedule, prompts, submit_all(state, requests), job.n)


async def compile_grammar(served: ServedModel, spec: StructuredOutput) -> Grammar:
    """`spec` compiled on a worker thread (a large schema takes a while, within the grammars' compile_timeout); a 400
    naming what failed when it does not compile (in time), or when this server cannot serve structured outputs; a
    503 to retry when every compile slot stayed busy."""
    try:
        return await asyncio.to_thread(served.compile_grammar, spec)
    except GrammarError as e:
        raise APIError(400, str(e), param=spec.param, code="invalid_structured_output") from None
    except GrammarUnavailable as e:
        raise APIError(400, f"{spec.param}: {e}", param=spec.param, code="structured_outputs_unavailable") from None
    except GrammarBusy as e:
        raise APIError(503, f"{spec.param}: {e}", param=spec.param, code="structured_outputs_busy",
                       headers={"Retry-After": "1"}) from None


async def tokenize(state: AppState, prompts: list[str | list[int]] | Chat, *,
                   add_special_tokens: bool = True, param: str = "prompt") -> list[Prompt]:
    """Texts, token-id lists or chat messages -> prompts, encoded on a worker thread (a long text takes seconds).
    add_special_tokens: texts get the special tokens their tokenizer adds by default (chat messages never do);
    param: the field a refusal names (a chat's is messages)."""
    served, _ = state.require()
    vocab = state.vocab_size
    return await asyncio.to_thread(_tokenize, served, prompts, vocab, add_special_tokens, param)


def unicode_text(text: str, *, param: str) -> str:
    """`text`, refused with a 400 when it holds a lone surrogate: JSON's "\\ud800" escapes decode to one, and no
    tokenizer can encode it (it was a 500 with the codec's message)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} holds a lone UTF-16 surrogate at character {e.start}, which is not Unicode "
                            "text; send valid text", param=param) from None
    return text


def _tokenize(served: ServedModel, prompts: list[str | list[int]] | Chat, vocab: int,
              add_special_tokens: bool = True, param: str = "prompt") -> list[Prompt]:
    if isinstance(prompts, Chat):
        text = render_chat(served, prompts)  # the template writes the special tokens (a BOS) itself, as in vLLM
        text = unicode_text(text, param="messages")
        return [Prompt(text, _in_vocab(served.encode(text, add_special_tokens=False), vocab, "messages"))]
    out = []
    for item in prompts:
        if isinstance(item, str):
            ids = served.encode(unicode_text(item, param=param), add_special_tokens=add_special_tokens)
            out.append(Prompt(item, _in_vocab(ids, vocab, param)))
            continue
        if not item:
            raise APIError(400, "a token-id prompt must not be empty", param=param)
        bad = [t for t in item if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary 0-{vocab - 1}", param=param)
        out.append(Prompt(None, list(item)))
    return out


def _keep_last(prompt: Prompt, k: int, limit: int) -> Prompt:
    """The prompt's last k tokens (vLLM's truncate_prompt_tokens); a cut prompt has no text of its own any more."""
    if not 1 <= k <= limit:
        raise APIError(400, f"truncate_prompt_tokens must be an integer in [1, {limit}] (this server's max_model_len), "
                            f"got {k}; send a smaller size or leave it out", param="truncate_prompt_tokens")
    return prompt if len(prompt.ids) <= k else Prompt(None, prompt.ids[-k:])


def _in_vocab(ids: list[int], vocab: int, param: str) -> list[int]:
    """Text the tokenizer turned into ids the model has no embedding for (a tokenizer larger than the model's
    vocabulary) is refused, not looked up out of bounds."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"the text encodes to token ids {bad[:5]} outside the model's vocabulary 0-{vocab - 1} "
                            "(this server's tokenizer is larger than its model); send token ids below "
                            f"{vocab}", param=param)
    return ids


def render_chat(served: ServedModel, chat: Chat) -> str:
    try:
        return served.render_chat(chat.messages, add_generation_prompt=chat.add_generation_prompt,
                                  continue_final_message=chat.continue_final_message,
                                  template_kwargs=chat.template_kwargs, tools=chat.tools)
    except TemplateKwargsError as e:
        raise APIError(400, str(e), param="chat_template_kwargs") from None
    except Exception as e:  # noqa: BLE001 - no template, bad roles, template errors: all the client's to fix
        raise APIError(400, f"cannot apply this model's chat template ({type(e).__name__}: {e}); "
                            "use /v1/completions with a plain prompt", param="messages") from None


# -- streams ------------------------------------------------------------------------------------------------------------


class Stream(Protocol):
    """One choice of a running job, read from the event loop: its outputs as they come (the last one finished, with
    its result), and a way to stop it. An engine request's `RequestStream`, or a returned beam of a beam search."""

    def abort(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[Output]: ...


class RequestStream:
    """One engine request seen from the event loop: outputs arrive on an asyncio queue."""

    def __init__(self, loop: EngineLoop, request: EngineRequest) -> None:
        self.engine_loop, self.request = loop, request
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        event_loop = asyncio.get_running_loop()
        self.sink = lambda out: event_loop.call_soon_threadsafe(self.queue.put_nowait, out)
        self.done = False

    def abort(self) -> None:
        if not self.done:
            self.engine_loop.abort(self.request.id)
            self.done = True

    async def __aiter__(self) -> AsyncIterator[Output]:
        while not self.done:
            out = await self.queue.get()
            if out.error:
                self.done = True
                if out.error_code is not None:  # the request's own parameters left it nothing to generate
                    raise APIError(400, out.error, code=out.error_code)
                raise APIError(500, out.error, code=GENERATION_FAILED)
            if out.finished:
                self.done = True
            yield out


def submit_all(state: AppState, requests: list[EngineRequest], *, series: Series | None = None,
               param: str = "max_tokens") -> list[RequestStream]:
    """Queue every request or none: 429 when the queue cannot take them all, 503 while draining (unless they are
    an open `series`' requests, which the drain lets run on until its deadline cuts the series). A request that
    could never fit the KV budget is a 400 naming `param`: max_tokens, or a prompt-only request's prompts."""
    _, loop = state.require()
    _check_sequences(state, len(requests))
    for r in requests:  # a request that could never fit the KV budget is refused whole, before any is queued
        try:
            loop.check(r)
        except PriorityError as e:
            raise APIError(400, str(e), param="priority") from None
        except KVBudgetError as e:
            lower = "lower max_tokens" if r.probe_prompts is None else f"send fewer or shorter {param}"
            raise APIError(400, f"{e}; {lower} or choose a policy that runs fewer layers", param=param,
                           code="kv_budget_exceeded") from None
    streams = [RequestStream(loop, r) for r in requests]
    try:
        loop.submit_all([(s.request, s.sink) for s in streams], series=series)
    except DrainingError:
        raise state.draining_error() from None
    except QueueFullError as e:
        raise state.busy_error(str(e)) from None
    return streams


class EventSource(EventSourceResponse):
    """A streamed answer, pinged every 15 s. A client that takes no data for `send_timeout` seconds is dropped and its
    requests aborted: the engine runs on whether or not it reads, and the frames it left unread were held until it
    did, for as long as it kept the connection open."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:  # its stream is closed, which aborted its requests
            log.warning("dropped a streamed answer whose client took no data for %.0f s", self.send_timeout)


def event_source(state: AppState, events: AsyncIterator[dict[str, str]], *, policy: str) -> EventSource:
    return EventSource(events, ping=15, send_timeout=state.settings.stream_send_timeout_s,
                       headers={"x-painters-policy": policy})


def _check_sequences(state: AppState, count: int) -> None:
    """Retrying could never help a request larger than the queue: a 400, not a 429."""
    capacity = state.settings.queue_capacity
    if count > capacity:
        raise APIError(400, f"this request asks for {count} sequences (prompts x n) but the server queues at most "
                            f"{capacity} at once; split it", param="prompt", code="too_many_sequences")


async def collect(streams: list[Stream], request: Request) -> list[GenerationResult]:
    """Wait for every stream's final result; abort them all if the client disconnects."""
    results = [out.result for out in await _finals(streams, request)]
    if any(r is None for r in results):
        raise APIError(500, "request ended without a result")
    return results  # type: ignore[return-value]


async def collect_probe(stream: RequestStream, request: Request) -> ProbeStats:
    """Wait for a probe's statistics; abort it if the client disconnects."""
    out = await _prompt_only(stream, request, answered=lambda o: o.probe is not None, what="probe")
    assert out.probe is not None
    return out.probe


async def collect_embeddings(stream: RequestStream, request: Request) -> list[list[float]]:
    """Wait for an embedding request's vectors (one per prompt, in order); abort it if the client disconnects."""
    out = await _prompt_only(stream, request, answered=lambda o: o.embeddings is not None, what="embedding")
    assert out.embeddings is not None
    return out.embeddings


async def _prompt_only(stream: RequestStream, request: Request, *, answered: Callable[[Output], bool],
                       what: str) -> Output:
    """The one final output of a prompt-only request (a probe, an embedding request)."""
    [out] = await _finals([stream], request)
    if not answered(out):
        if out.error is None:  # ended before it ran: the drain deadline passed while it waited
            raise AppState.draining_error()
        raise APIError(500, f"{what} failed: {out.error}")
    return out


def prompt_only_request(prefix: str, prompts: list[list[int]], schedule: Schedule, *,
                        embed: bool = False, priority: int = 0) -> EngineRequest:
    """One engine request that runs `prompts` through one forward pass (a probe's statistics, or with `embed` their
    embeddings): nothing is sampled, and its KV is reserved for every prompt and freed in the same step."""
    r = engine_request(new_request_id(prefix), prompts[0], SamplingParams(max_tokens=0), schedule, priority=priority)
    r.probe_prompts, r.embed = prompts, embed
    return r


async def _finals(streams: list[Stream], request: Request) -> list[Output]:
    tasks = [asyncio.ensure_future(_final(s)) for s in streams]
    try:
        while True:
            _, pending = await asyncio.wait(tasks, timeout=0.25, return_when=asyncio.ALL_COMPLETED)
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():  # nobody to answer: free the work, answer the void quietly
                raise APIError(CLIENT_CLOSED, "client closed the request")
    except BaseException:
        for s in streams:
            s.abort()
        for t in tasks:
            t.cancel()
        raise


async def _final(stream: Stream) -> Output:
    async for out in stream:
        if out.finished:
            return out
    raise APIError(500, "request ended without a result")


async def merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Output]]:
    """Outputs of several streams as they come, tagged with the stream's index; closing it aborts them all (the
    client went away), which frees their rows and KV at the next engine step."""
    queue: asyncio.Queue[tuple[int, Output | BaseException]] = asyncio.Queue()

    async def pump(i: int, s: Stream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining -= 1
            yield i, item
    finally:
        for s in streams:
            s.abort()
        for t in tasks:
            t.cancel()


# -- answers ------------------------------------------------------------------------------------------------------------


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def engine_request(rid: str, prompt_ids: list[int], params: SamplingParams, schedule: Schedule, *,
                   grammar: Grammar | Matcher | None = None, counted: bool = True, priority: int = 0,
                   cache_salt: str | None = None) -> EngineRequest:
    """A request to submit; with `grammar` (its structured output compiled), a matcher of its own (or the matcher
    given, at its place: a beam search step's, whose output follows the beam's tokens). counted: whether the
    metrics observe it as a request (`EngineRequest.counted`); priority and cache_salt: `EngineRequest`'s."""
    matcher = grammar.matcher() if isinstance(grammar, Grammar) else grammar
    return EngineRequest(id=rid, prompt_ids=prompt_ids, params=params, schedule=schedule, arrival=time.perf_counter(),
                         grammar=matcher, counted=counted, priority=priority, cache_salt=cache_salt)


def timings(result: GenerationResult) -> Timings:
    return timings_of(result.timings)


def timings_of(t: EngineTimings) -> Timings:
    return Timings(queue_s=t.queue_s, prefill_s=t.prefill_s, decode_s=t.decode_s, time_to_first_token_s=t.ttft_s,
                   time_per_output_token_s=t.tpot_s, e2e_s=t.total_s)


def timing_headers(schedule: Schedule, results: list[GenerationResult]) -> dict[str, str]:
    """TGI-style x-* headers (seconds; the slowest choice when there are several)."""
    headers = {"x-painters-policy": schedule.policy}
    if results:
        fields = [timings(r).model_dump() for r in results]
        worst = {k: max(f[k] for f in fields) for k in fields[0]}
        headers.update({
            "x-queue-time": f"{worst['queue_s']:.6f}", "x-prefill-time": f"{worst['prefill_s']:.6f}",
            "x-decode-time": f"{worst['decode_s']:.6f}", "x-time-to-first-token": f"{worst['time_to_first_token_s']:.6f}",
            "x-time-per-token": f"{worst['time_per_output_token_s']:.6f}", "x-total-time": f"{worst['e2e_s']:.6f}",
            "x-prompt-tokens": str(sum(len(r.prompt_token_ids) for r in results)),
            "x-generated-tokens": str(sum(len(r.token_ids) for r in results)),
        })
    return headers


def painters_info(schedule: Schedule, result: GenerationResult | None) -> PaintersInfo:
    return PaintersInfo(policy=schedule.policy, schedule=schedule.key,
                        timings=timings(result) if result is not None else None)


def painters_chunk(schedule: Schedule, out: Output) -> PaintersInfo | None:
    """The `painters` object of a streamed chunk: the final figures on the last one, the figures so far before it."""
    if out.result is not None:
        return painters_info(schedule, out.result)
    if out.timings is not None:
        return PaintersInfo(policy=schedule.policy, schedule=schedule.key, timings=timings_of(out.timings))
    return None


def slowest(results: list[GenerationResult]) -> GenerationResult:
    return max(results, key=lambda r: r.timings.total_s)


def sse(model: Any) -> dict[str, str]:
    """One server-sent event carrying a response model (or the final "[DONE]")."""
    return {"data": model if isinstance(model, str) else model.model_dump_json()}
