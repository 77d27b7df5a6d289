"""The native endpoints, shaped like TGI's: POST /generate and POST /generate_stream (SSE)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from server.api.errors import APIError, error_body
from server.api.openai import get_state
from server.api.protocol import GenerateRequest
from server.api.state import RequestStream, collect, engine_request, new_request_id, painters_info, submit_all, timing_headers
from server.generate import Engine, GenerationResult
from server.sampling import SamplingParams
from server.compiler import Schedule

router = APIRouter(tags=["native"])


def _params(body: GenerateRequest, max_tokens: int) -> SamplingParams:
    p = body.parameters
    sampling = p.do_sample or (p.temperature is not None and p.temperature > 0 and p.temperature != 1.0) \
        or p.top_k is not None or p.top_p is not None
    return SamplingParams(
        max_tokens=max_tokens, temperature=(p.temperature if p.temperature else 1.0) if sampling else 0.0,
        top_p=p.top_p or 1.0, top_k=p.top_k or 0, seed=p.seed, stop=tuple(p.stop), ignore_eos=p.ignore_eos,
        logprobs=p.top_n_tokens or 0, echo=p.decoder_input_details,
    )


def _token(engine: Engine, token_id: int, logprob: float | None) -> dict[str, Any]:
    special = token_id in engine.eos_ids or token_id in getattr(engine.tokenizer, "all_special_ids", ())
    return {"id": token_id, "text": engine.tokenizer.decode([token_id], skip_special_tokens=False),
            "logprob": logprob, "special": special}


def _finish_reason(engine: Engine, result: GenerationResult) -> str:
    if result.finish_reason != "stop":
        return result.finish_reason
    return "eos_token" if result.token_ids and result.token_ids[-1] in engine.eos_ids else "stop_sequence"


def _details(engine: Engine, body: GenerateRequest, result: GenerationResult) -> dict[str, Any]:
    details: dict[str, Any] = {"finish_reason": _finish_reason(engine, result),
                               "generated_tokens": len(result.token_ids), "seed": body.parameters.seed}
    details["tokens"] = [_token(engine, i, lp) for i, lp in zip(result.token_ids, result.logprobs)]
    details["prefill"] = ([_token(engine, i, lp) for i, lp in zip(result.prompt_token_ids, result.prompt_logprobs)]
                          if result.prompt_logprobs is not None else [])
    if result.top_logprobs:
        details["top_tokens"] = [[_token(engine, i, v) for i, v in top.items()] for top in result.top_logprobs]
    return details


def _prepare(request: Request, body: GenerateRequest) -> tuple[Any, Engine, Schedule, list[int], SamplingParams]:
    state = get_state(request)
    engine, _ = state.require()
    schedule = state.resolve_policy(body.model, body.parameters.policy)
    ids = engine.encode(body.inputs)
    max_tokens = body.parameters.max_new_tokens
    if max_tokens is None:
        max_tokens = state.default_max_tokens(len(ids))
    state.check_length(len(ids), max_tokens)
    return state, engine, schedule, ids, _params(body, max_tokens)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> Any:
    if body.stream:
        return await generate_stream(body, request)
    state, engine, schedule, ids, params = _prepare(request, body)
    streams = submit_all(state, [engine_request(new_request_id("gen"), ids, params, schedule)])
    result = (await collect(streams, request))[0]
    text = (body.inputs + result.text) if body.parameters.return_full_text else result.text
    out: dict[str, Any] = {"generated_text": text, "painters": painters_info(schedule, result)}
    if body.parameters.details:
        out["details"] = _details(engine, body, result)
    return JSONResponse(out, headers=timing_headers(schedule, [result]))


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request) -> Any:
    state, engine, schedule, ids, params = _prepare(request, body)
    streams = submit_all(state, [engine_request(new_request_id("gen"), ids, params, schedule)])
    return EventSourceResponse(_events(engine, body, schedule, streams[0]), ping=15,
                               headers={"x-painters-policy": schedule.policy})


async def _events(engine: Engine, body: GenerateRequest, schedule: Schedule, stream: RequestStream
                  ) -> AsyncIterator[dict[str, str]]:
    index = 0
    try:
        async for out in stream:
            for n, (token_id, lp) in enumerate(zip(out.token_ids, out.logprobs)):
                last = out.finished and n == len(out.token_ids) - 1
                event: dict[str, Any] = {"index": index, "token": _token(engine, token_id, lp), "generated_text": None,
                                         "details": None}
                if out.top_logprobs:
                    event["top_tokens"] = [_token(engine, i, v) for i, v in out.top_logprobs[n].items()]
                if last and out.result is not None:
                    r = out.result
                    event["generated_text"] = (body.inputs + r.text) if body.parameters.return_full_text else r.text
                    event["details"] = {"finish_reason": _finish_reason(engine, r),
                                        "generated_tokens": len(r.token_ids), "seed": body.parameters.seed}
                    event["painters"] = painters_info(schedule, r)
                index += 1
                yield {"data": json.dumps(event)}
            if out.finished and not out.token_ids and out.result is not None:
                r = out.result
                yield {"data": json.dumps({"index": index, "token": None, "generated_text": r.text,
                                           "details": {"finish_reason": _finish_reason(engine, r),
                                                       "generated_tokens": len(r.token_ids),
                                                       "seed": body.parameters.seed},
                                           "painters": painters_info(schedule, r)})}
    except APIError as e:
        yield {"data": json.dumps(error_body(e.status, e.message))}
    finally:
        stream.abort()
