"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from server.api.errors import APIError, error_body
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.state import (
    AppState, RequestStream, collect, engine_request, new_request_id, painters_info, submit_all, timing_headers,
)
from server.engine_loop import Output
from server.generate import Engine, GenerationResult
from server.sampling import SamplingParams
from server.compiler import Schedule

router = APIRouter(tags=["openai"])


def get_state(request: Request) -> AppState:
    return request.app.state.painters


def _params(body: Any, *, max_tokens: int, logprobs: int, echo: bool, index: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k),
        seed=None if body.seed is None else body.seed + index, stop=body.stops, ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens, logprobs=logprobs, echo=echo,
    )


def _prompts(engine: Engine, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[str | None, list[int]]]:
    """Every accepted prompt form -> (text if given as text, token ids)."""
    vocab = engine.model.args.vocab_size
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, engine.encode(item)))
        else:
            if not item:
                raise APIError(400, "a token-id prompt must not be empty", param="prompt")
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary 0-{vocab - 1}", param="prompt")
            out.append((None, list(item)))
    return out


def _token_text(engine: Engine, ids: list[int]) -> list[str]:
    return [engine.tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _completion_logprobs(engine: Engine, ids: list[int], lps: list[float | None],
                         tops: list[dict[int, float] | None] | None, offset: int) -> dict[str, Any]:
    tokens = _token_text(engine, ids)
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top = None
    if tops is not None:
        top = [None if d is None else {engine.tokenizer.decode([i], skip_special_tokens=False): v for i, v in d.items()}
               for d in tops]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def _usage(prompt_lens: list[int], results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(prompt_lens)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = get_state(request)
    created = int(time.time())
    data = [{"id": state.model_name, "object": "model", "created": created, "owned_by": "painters",
             "max_model_len": state.max_model_len, "policy": state.settings.default_policy}]
    data += [{"id": f"{state.model_name}@{name}", "object": "model", "created": created, "owned_by": "painters",
              "root": state.model_name, "parent": state.model_name, "policy": policy}
             for name, policy in state.presets.items()]
    return {"object": "list", "data": data}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = get_state(request)
    engine, _ = state.require()
    schedule = state.resolve_policy(body.model, body.policy)
    prompts = _prompts(engine, body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if body.stream and body.echo:
        raise APIError(400, "echo is not supported with stream=true; use stream=false", param="echo")
    for _, ids in prompts:
        state.check_length(len(ids), max_tokens)
    logprobs = body.logprobs or 0
    want_logprobs = body.logprobs is not None
    requests = []
    for p, (_, ids) in enumerate(prompts):
        for i in range(body.n):
            params = _params(body, max_tokens=max_tokens, logprobs=logprobs, echo=body.echo and want_logprobs, index=i)
            requests.append(engine_request(new_request_id("cmpl"), ids, params, schedule))
    rid = new_request_id("cmpl")
    created = int(time.time())
    model = body.model or state.model_name
    streams = submit_all(state, requests)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(
            _stream_completion(engine, schedule, streams, rid=rid, created=created, model=model,
                               want_logprobs=want_logprobs, include_usage=include_usage,
                               prompt_lens=[len(ids) for _, ids in prompts]),
            headers={"x-painters-policy": schedule.policy}, ping=15)
    results = await collect(streams, request)
    choices = []
    for index, result in enumerate(results):
        prompt_text, prompt_ids = prompts[index // body.n]
        text = result.text
        lp = None
        if body.echo:
            prompt_text = prompt_text if prompt_text is not None else engine.tokenizer.decode(prompt_ids)
            text = prompt_text + text
        if want_logprobs:
            ids, lps = list(result.token_ids), list(result.logprobs)
            tops: list[dict[int, float] | None] | None = list(result.top_logprobs) if result.top_logprobs else None
            if body.echo:
                ids = prompt_ids + ids
                lps = list(result.prompt_logprobs or [None] * len(prompt_ids)) + lps
                if logprobs:
                    tops = list(result.prompt_top_logprobs or [None] * len(prompt_ids)) + (tops or [])
            lp = _completion_logprobs(engine, ids, lps, tops if logprobs else None, 0)
        choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": result.finish_reason})
    body_out = {
        "id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
        "usage": _usage([len(ids) for _, ids in prompts], results),
        "painters": painters_info(schedule, max(results, key=lambda r: r.timings.total_s)),
    }
    return JSONResponse(body_out, headers=timing_headers(schedule, results))


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Output]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    queue: asyncio.Queue[tuple[int, Output | BaseException]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
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


def _sse(obj: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(obj)}


async def _stream_completion(engine: Engine, schedule: Schedule, streams: list[RequestStream], *, rid: str,
                             created: int, model: str, want_logprobs: bool, include_usage: bool,
                             prompt_lens: list[int]) -> AsyncIterator[dict[str, str]]:
    results: list[GenerationResult] = []
    offsets = [0] * len(streams)
    try:
        async for i, out in _merged(streams):
            lp = None
            if want_logprobs:
                tops = out.top_logprobs if out.top_logprobs else None
                lp = _completion_logprobs(engine, out.token_ids, list(out.logprobs), tops, offsets[i])
            offsets[i] += len(out.text)
            choice = {"index": i, "text": out.text, "logprobs": lp,
                      "finish_reason": out.result.finish_reason if out.finished and out.result else None}
            chunk: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                                     "choices": [choice]}
            if out.finished and out.result:
                results.append(out.result)
                chunk["painters"] = painters_info(schedule, out.result)
            if include_usage:
                chunk["usage"] = None
            yield _sse(chunk)
    except APIError as e:
        yield _sse(error_body(e.status, e.message))
    if include_usage:
        usage = _usage(prompt_lens, results)  # each prompt once, however many choices (n) it has
        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                    "usage": usage})
    yield {"data": "[DONE]"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = get_state(request)
    engine, _ = state.require()
    schedule = state.resolve_policy(body.model, body.policy)
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - no template, bad roles, template errors: all the client's to fix
        raise APIError(400, f"cannot apply this model's chat template ({type(e).__name__}: {e}); "
                            "use /v1/completions with a plain prompt", param="messages") from None
    ids = engine.encode(text)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = state.default_max_tokens(len(ids)) if limit is None else limit
    state.check_length(len(ids), max_tokens)
    top = body.top_logprobs or 0
    requests = [engine_request(new_request_id("chatcmpl"), ids,
                               _params(body, max_tokens=max_tokens, logprobs=top, echo=False, index=i), schedule)
                for i in range(body.n)]
    rid, created, model = new_request_id("chatcmpl"), int(time.time()), body.model or state.model_name
    streams = submit_all(state, requests)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(
            _stream_chat(engine, schedule, streams, rid=rid, created=created, model=model, logprobs=body.logprobs,
                         include_usage=include_usage),
            headers={"x-painters-policy": schedule.policy}, ping=15)
    results = await collect(streams, request)
    choices = [{
        "index": i, "message": {"role": "assistant", "content": r.text},
        "logprobs": _chat_logprobs(engine, r.token_ids, r.logprobs, r.top_logprobs) if body.logprobs else None,
        "finish_reason": r.finish_reason,
    } for i, r in enumerate(results)]
    out = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
           "usage": _usage([len(ids)], results),
           "painters": painters_info(schedule, max(results, key=lambda r: r.timings.total_s))}
    return JSONResponse(out, headers=timing_headers(schedule, results))


def _chat_logprobs(engine: Engine, ids: list[int], lps: list[float], tops: list[dict[int, float]] | None
                   ) -> dict[str, Any]:
    content = []
    for n, (i, lp) in enumerate(zip(ids, lps)):
        token = engine.tokenizer.decode([i], skip_special_tokens=False)
        alternatives = []
        if tops:
            for j, v in tops[n].items():
                t = engine.tokenizer.decode([j], skip_special_tokens=False)
                alternatives.append({"token": t, "logprob": v, "bytes": list(t.encode())})
        content.append({"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": alternatives})
    return {"content": content}


async def _stream_chat(engine: Engine, schedule: Schedule, streams: list[RequestStream], *, rid: str, created: int,
                       model: str, logprobs: bool, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    extra = {"usage": None} if include_usage else {}
    for i in range(len(streams)):
        yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], **extra})
    results: list[GenerationResult] = []
    try:
        async for i, out in _merged(streams):
            lp = _chat_logprobs(engine, out.token_ids, out.logprobs, out.top_logprobs or None) if logprobs else None
            delta = {"content": out.text} if out.text or not out.finished else {}
            chunk: dict[str, Any] = {**base, "choices": [{
                "index": i, "delta": delta, "logprobs": lp,
                "finish_reason": out.result.finish_reason if out.finished and out.result else None}], **extra}
            if out.finished and out.result:
                results.append(out.result)
                chunk["painters"] = painters_info(schedule, out.result)
            yield _sse(chunk)
    except APIError as e:
        yield _sse(error_body(e.status, e.message))
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage([len(streams[0].request.prompt_ids)], results)})
    yield {"data": "[DONE]"}
