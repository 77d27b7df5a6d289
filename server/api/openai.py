"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models and /v1/models/{model}. Each is an
adapter: its request becomes a `pipeline.Job`, and results or stream outputs become its response models."""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api import beam_search, pipeline, tool_parsers
from server.api.errors import APIError, error_body
from server.api.pipeline import Chat, Job, Running, painters_chunk, painters_info, slowest, sse, timing_headers
from server.api.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatResponseMessage, ChatTokenLogprob, ChatTopLogprob, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, ModelCard, ModelList, PromptLogprob, PromptLogprobs, PromptTokensDetails,
    UsageInfo,
)
from server.api.request_id import response_id
from server.api.state import AppState
from server.api.tools import ToolPlan, plan
from server.engine.request import GenerationResult
from server.engine.sampling_params import SamplingParams, StructuredOutput

if TYPE_CHECKING:
    from server.engine.served import ServedModel

router = APIRouter(tags=["openai"])
SSE = pipeline.sse_responses("JSON, or server-sent events when stream=true")


def get_state(request: Request) -> AppState:
    return request.app.state.painters


def _params(body: CompletionRequest | ChatCompletionRequest, *, logprobs: int | None, echo: bool) -> pipeline.ParamsFor:
    def params(max_tokens: int, index: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k),
            seed=None if body.seed is None else (body.seed + index) % 2**63, stop=body.stops,
            ignore_eos=body.ignore_eos, min_tokens=body.min_tokens, logprobs=logprobs, echo=echo,
            stop_token_ids=tuple(body.stop_token_ids or ()), presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty, min_p=body.min_p,
            logit_bias=tuple((int(t), v) for t, v in (body.logit_bias or {}).items()),
            allowed_token_ids=None if body.allowed_token_ids is None else tuple(body.allowed_token_ids),
            bad_words=tuple(body.bad_words or ()),
            include_stop_str_in_output=body.include_stop_str_in_output, skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens, prompt_logprobs=body.prompt_logprobs,
            structured=body.structured_output,
        )
    return params


async def _start(state: AppState, job: Job, body: CompletionRequest | ChatCompletionRequest) -> Running:
    """Submit `job`: its choices sampled, or with use_beam_search the n best beams (answered as choices)."""
    if body.use_beam_search:
        return await beam_search.start(state, job, length_penalty=body.length_penalty)
    return await pipeline.start(state, job)


def _constrained(params: pipeline.ParamsFor, structured: StructuredOutput | None) -> pipeline.ParamsFor:
    """`params` whose output follows `structured` (a named or required tool_choice's schema) when one is given."""
    if structured is None:
        return params
    return lambda max_tokens, index: dataclasses.replace(params(max_tokens, index), structured=structured)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """Every accepted prompt form -> one entry per prompt."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


class _Offsets:
    """Where each token starts in the text, in characters, counted over the tokens' bytes: a character split over
    tokens counts once (each piece alone reads U+FFFD, one character each). Kept across a stream's chunks, as the
    text runs on; the tokens' text, not a chunk's, which may hold back a tail its tokens carry."""

    def __init__(self) -> None:
        self.pos = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def of(self, served: ServedModel, ids: list[int]) -> list[int]:
        out = []
        for i in ids:
            out.append(self.pos)
            self.pos += len(self._decoder.decode(served.token_bytes(i)))
        return out


def _finite(x: float | None) -> float | None:
    return x if x is None or abs(x) != float("inf") else None


def _token_name(served: ServedModel, as_ids: bool) -> Callable[[int], str]:
    """How logprobs name a token: its text (`ServedModel.token_string`), or with vLLM's return_tokens_as_token_ids
    "token_id:<id>", which names tokens whose texts are alike (or not text at all) apart."""
    return (lambda i: f"token_id:{i}") if as_ids else served.token_string


def _completion_logprobs(served: ServedModel, ids: list[int], lps: list[float | None],
                         tops: list[dict[int, float] | None] | None, offsets: _Offsets, *, as_ids: bool
                         ) -> CompletionLogprobs:
    name = _token_name(served, as_ids)
    top = None
    if tops is not None:
        top = [None if d is None else {name(i): _finite(v) for i, v in d.items()} for d in tops]
    return CompletionLogprobs(tokens=[name(i) for i in ids], token_logprobs=[_finite(x) for x in lps],
                              top_logprobs=top, text_offset=offsets.of(served, ids))


def _prompt_logprobs(served: ServedModel, result: GenerationResult, k: int | None) -> PromptLogprobs | None:
    """vLLM's prompt_logprobs of a scored prompt: per token after the first, its own logprob and rank, then the k
    likeliest tokens ranked 1..k (one entry where the token is among them)."""
    if k is None or result.prompt_logprobs is None or result.prompt_ranks is None:
        return None
    tops = result.prompt_top_logprobs or [None] * len(result.prompt_token_ids)
    out: PromptLogprobs = [None]
    for token, value, rank, top in zip(result.prompt_token_ids[1:], result.prompt_logprobs[1:],
                                       result.prompt_ranks[1:], tops[1:], strict=True):
        entries = {token: PromptLogprob(logprob=_finite(value), rank=rank, decoded_token=served.token_string(token))}
        for r, (t, v) in enumerate(itertools.islice((top or {}).items(), k), 1):
            entries.setdefault(t, PromptLogprob(logprob=_finite(v), rank=r, decoded_token=served.token_string(t)))
        out.append(entries)
    return out


def _usage(run: Running, results: Mapping[int, GenerationResult], *, details: bool) -> UsageInfo:
    """The final usage: each prompt once however many choices (n) it has, and every choice's tokens (`results` by
    choice index). With `details` (enable_prompt_tokens_details, vLLM's), the prompt tokens the prefix cache held:
    per prompt, the fewest any of its choices found, what was cached before the request came (its later choices
    reuse its first's)."""
    prompt = sum(len(p.ids) for p in run.prompts)
    completion = sum(len(r.token_ids) for r in results.values())
    usage = UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    if details:
        cached: dict[int, int] = {}
        for i, r in results.items():
            found = r.cached_tokens or 0
            cached[i // run.n] = min(cached.get(i // run.n, found), found)
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=sum(cached.values()))
    return usage


def _usage_so_far(prompt_tokens: int, generated: int) -> UsageInfo:
    """vLLM's continuous usage: a choice's prompt and its tokens so far."""
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=get_state(request).model_cards())


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """OpenAI's model retrieve (`client.models.retrieve(name)`): a listed name's entry, or NAME@POLICY's; an unknown
    name is a 404 with code model_not_found. `:path`: a served name may hold '/' (a hub id), sent as %2F."""
    return get_state(request).model_card(model)


@router.post("/v1/completions", response_model=CompletionResponse, responses=SSE)
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = get_state(request)
    served, _ = state.require()
    if body.stream and body.echo:
        raise APIError(400, "echo is not supported with stream=true; use stream=false", param="echo")
    want_logprobs = body.logprobs is not None
    logprobs = body.logprobs
    rid, created, model = response_id("cmpl", request, body.request_id), int(time.time()), body.model or state.model_name
    job = Job("cmpl", body.model, body.policy, _prompts(body.prompt), n=body.n,
              max_tokens=16 if body.max_tokens is None else body.max_tokens,
              truncate_prompt_tokens=body.truncate_prompt_tokens, priority=body.priority, cache_salt=body.cache_salt,
              params=_params(body, logprobs=logprobs, echo=body.echo and want_logprobs))
    run = await _start(state, job, body)
    details = state.settings.enable_prompt_tokens_details
    if body.stream:
        include_usage, continuous = body.stream_options.usage() if body.stream_options else (False, False)
        return pipeline.event_source(state, _stream_completion(
            served, run, rid=rid, created=created, model=model, want_logprobs=want_logprobs,
            as_ids=body.return_tokens_as_token_ids, include_usage=include_usage, continuous=continuous,
            details=details), policy=run.schedule.policy)
    results = await pipeline.collect(run.streams, request)
    choices = []
    for index, result in enumerate(results):
        prompt = run.prompt_of(index)
        text = result.text
        lp = None
        if body.echo:
            text = (prompt.text if prompt.text is not None else served.decode(prompt.ids)) + text
        if want_logprobs:
            ids = list(result.token_ids)
            lps: list[float | None] = list(result.logprobs)
            tops: list[dict[int, float] | None] | None = list(result.top_logprobs) if result.top_logprobs else None
            if body.echo:
                ids = prompt.ids + ids
                lps = list(result.prompt_logprobs or [None] * len(prompt.ids)) + lps
                if logprobs:  # the prompt may be scored with more alternatives, for prompt_logprobs
                    tops = [None if d is None else dict(itertools.islice(d.items(), logprobs))
                            for d in result.prompt_top_logprobs or [None] * len(prompt.ids)] + (tops or [])
            lp = _completion_logprobs(served, ids, lps, tops if logprobs else None, _Offsets(),
                                      as_ids=body.return_tokens_as_token_ids)
        choices.append(CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=result.finish_reason,
                                        prompt_logprobs=_prompt_logprobs(served, result, body.prompt_logprobs)))
    out = CompletionResponse(id=rid, created=created, model=model, choices=choices,
                             usage=_usage(run, dict(enumerate(results)), details=details),
                             painters=painters_info(run.schedule, slowest(results)))
    return _json(out, timing_headers(run.schedule, results))


def _json(model: Any, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), headers=headers)


async def _stream_completion(served: ServedModel, run: Running, *, rid: str, created: int, model: str,
                             want_logprobs: bool, as_ids: bool, include_usage: bool, continuous: bool,
                             details: bool) -> AsyncIterator[dict[str, str]]:
    results: dict[int, GenerationResult] = {}  # by choice index
    offsets = [_Offsets() for _ in run.streams]
    generated = [0] * len(run.streams)  # tokens each choice has streamed
    try:
        async for i, out in pipeline.merged(run.streams):
            generated[i] += len(out.token_ids)
            lp = None
            if want_logprobs:
                tops: list[dict[int, float] | None] | None = list(out.top_logprobs) if out.top_logprobs else None
                lp = _completion_logprobs(served, out.token_ids, list(out.logprobs), tops, offsets[i], as_ids=as_ids)
            final = out.result if out.finished else None
            chunk = CompletionResponse(id=rid, created=created, model=model, choices=[CompletionChoice(
                index=i, text=out.text, logprobs=lp, finish_reason=final.finish_reason if final else None)])
            if final is not None:
                results[i] = final
            chunk.painters = painters_chunk(run.schedule, out)
            if continuous:
                chunk.usage = _usage_so_far(len(run.prompt_of(i).ids), generated[i])
            yield _chunk(chunk, include_usage)
    except APIError as e:
        yield {"data": _error_json(e)}
    if include_usage:  # each prompt once, however many choices (n) it has
        yield _chunk(CompletionResponse(id=rid, created=created, model=model, choices=[],
                                        usage=_usage(run, results, details=details)), True)
    yield sse("[DONE]")


def _chunk(chunk: CompletionResponse | ChatCompletionChunk, include_usage: bool) -> dict[str, str]:
    """With include_usage every chunk carries "usage": null; without it, no usage key at all (OpenAI's frames)."""
    exclude = {"painters"} if chunk.painters is None else set()
    if not include_usage:
        exclude.add("usage")
    return {"data": chunk.model_dump_json(exclude=exclude)}


def _error_json(e: APIError) -> str:
    return json.dumps(error_body(e.status, e.message, param=e.param, code=e.code))


async def start_chat(state: AppState, body: ChatCompletionRequest) -> tuple[Running, ToolPlan]:
    """Render, plan and submit a chat request: its running choices, and how their text reads as tool calls. Shared by
    /v1/chat/completions and /v1/responses (server/api/responses.py), whose conversation is a chat."""
    try:
        messages = [m.for_template() for m in body.messages]
    except ValueError as e:
        raise APIError(400, f"{e}; send text content", param="messages") from None
    try:  # named and required choices constrain the output, through the structured-output path (vLLM's)
        tool_plan = plan(body.tools, body.tool_choice, parser=state.settings.tool_call_parser,
                         parallel=body.parallel_tool_calls)
        structured = tool_plan.structured  # (a request that also asks for another structured output was a 400)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice") from None
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    chat = Chat(messages, body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs,
                tools=[t.model_dump() for t in body.tools] if body.tools else None)
    job = Job("chatcmpl", body.model, body.policy, chat, n=body.n, max_tokens=limit,
              truncate_prompt_tokens=body.truncate_prompt_tokens, priority=body.priority, cache_salt=body.cache_salt,
              params=_constrained(_params(body, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                          echo=False), structured))
    return await _start(state, job, body), tool_plan


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=SSE)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = get_state(request)
    served, _ = state.require()
    rid = response_id("chatcmpl", request, body.request_id)
    run, tool_plan = await start_chat(state, body)
    created, model = int(time.time()), body.model or state.model_name
    details = state.settings.enable_prompt_tokens_details
    if body.stream:
        include_usage, continuous = body.stream_options.usage() if body.stream_options else (False, False)
        return pipeline.event_source(state, _stream_chat(
            served, run, rid=rid, created=created, model=model, logprobs=body.logprobs,
            as_ids=body.return_tokens_as_token_ids, include_usage=include_usage, continuous=continuous,
            tool_plan=tool_plan, details=details), policy=run.schedule.policy)
    results = await pipeline.collect(run.streams, request)
    as_ids = body.return_tokens_as_token_ids
    choices = []
    for i, r in enumerate(results):
        parsed = tool_parsers.parse(tool_plan, r.text)
        choices.append(ChatChoice(
            index=i, message=ChatResponseMessage(content=parsed.content, tool_calls=parsed.calls or None),
            logprobs=chat_logprobs(served, r.token_ids, r.logprobs, r.top_logprobs, as_ids=as_ids) if body.logprobs
            else None,
            finish_reason=tool_parsers.finish_reason(tool_plan, r.finish_reason,
                                                     called=bool(parsed.calls) and parsed.complete),
        ))
    out = ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                 usage=_usage(run, dict(enumerate(results)), details=details),
                                 painters=painters_info(run.schedule, slowest(results)),
                                 prompt_logprobs=_prompt_logprobs(served, results[0], body.prompt_logprobs))
    return _json(out, timing_headers(run.schedule, results))


def chat_logprobs(served: ServedModel, ids: list[int], lps: list[float], tops: list[dict[int, float]] | None, *,
                  as_ids: bool) -> ChatLogprobs:
    name = _token_name(served, as_ids)  # `bytes` stay the token's own, as vLLM's do
    content = []
    for n, (i, lp) in enumerate(zip(ids, lps)):
        alternatives = []
        if tops:
            for j, v in tops[n].items():
                alternatives.append(ChatTopLogprob(token=name(j), logprob=_finite(v),
                                                   bytes=list(served.token_bytes(j))))
        content.append(ChatTokenLogprob(token=name(i), logprob=_finite(lp),
                                        bytes=list(served.token_bytes(i)), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


async def _stream_chat(served: ServedModel, run: Running, *, rid: str, created: int, model: str, logprobs: bool,
                       as_ids: bool, include_usage: bool, continuous: bool, tool_plan: ToolPlan, details: bool
                       ) -> AsyncIterator[dict[str, str]]:
    prompt = len(run.prompts[0].ids)
    generated = [0] * len(run.streams)  # tokens each choice has streamed

    def chunk(choices: list[ChatChunkChoice], **extra: Any) -> ChatCompletionChunk:
        if continuous and choices:
            extra["usage"] = _usage_so_far(prompt, generated[choices[0].index])
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, **extra)

    for i in range(len(run.streams)):
        yield _chunk(chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]), include_usage)
    results: dict[int, GenerationResult] = {}  # by choice index
    # with tools, each choice's text goes through a reader that turns it into content and tool-call pieces
    readers = [tool_parsers.stream_reader(tool_plan) for _ in run.streams] if tool_plan.mode != "none" else None
    try:
        async for i, out in pipeline.merged(run.streams):
            generated[i] += len(out.token_ids)
            lp = (chat_logprobs(served, out.token_ids, out.logprobs, out.top_logprobs or None, as_ids=as_ids)
                  if logprobs else None)
            final = out.result if out.finished else None
            reason = final.finish_reason if final else None
            if readers is None:
                delta = ChatDelta(content=out.text) if out.text or not out.finished else ChatDelta()
            else:
                piece = readers[i].feed(out.text, finished=out.finished)
                if piece.content is None and not piece.tool_calls and lp is None and final is None:
                    continue  # nothing to say yet (a call's name, or what may begin a call, is still coming)
                delta = ChatDelta(content=piece.content, tool_calls=piece.tool_calls or None)
                reason = tool_parsers.finish_reason(tool_plan, reason, called=readers[i].called and readers[i].complete)
            c = chunk([ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=reason)])
            if final is not None:
                results[i] = final
            c.painters = painters_chunk(run.schedule, out)
            yield _chunk(c, include_usage)
    except APIError as e:
        yield {"data": _error_json(e)}
    if include_usage:
        yield _chunk(chunk([], usage=_usage(run, results, details=details)), True)
    yield sse("[DONE]")
