"""The native endpoints, shaped like TGI's: POST /generate, POST /generate_stream (SSE) and TGI's POST / (either, by
`stream`), adapters over the shared pipeline; and GET /info, TGI's description of the server and its limits."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from server import __version__
from server.api import pipeline
from server.api.errors import APIError, tgi_error
from server.api.openai import get_state
from server.api.pipeline import Job, Running, painters_info, timing_headers
from server.api.protocol import (
    TGI_NEUTRAL, GenerateDetails, GenerateRequest, GenerateResponse, GenerateStreamEvent, StreamDetails, TGIInfo,
    TokenInfo,
)
from server.engine.request import GenerationResult
from server.engine.sampling_params import MAX_STOP_STRINGS, SamplingParams

if TYPE_CHECKING:
    from server.api.state import AppState
    from server.engine.served import ServedModel

router = APIRouter(tags=["native"])
info_router = APIRouter(tags=["native"])
EVENTS = pipeline.sse_responses("JSON, or server-sent events (one GenerateStreamEvent per token) when streaming")


def _params(body: GenerateRequest) -> pipeline.ParamsFor:
    p = body.parameters
    # TGI samples when asked to: do_sample, or a parameter that changes the distribution (its NextTokenChooser's
    # has_warpers: temperature not 1, top_k not 0, top_p or typical_p below 1); temperature 0 is greedy, as on the
    # OpenAI routes (TGI itself refuses it)
    sampling = p.temperature != 0 and (p.do_sample or p.temperature not in (None, 1.0) or (p.top_k or 0) != 0
                                       or (p.top_p or 1.0) < 1.0 or (p.typical_p or 1.0) < 1.0)

    def params(max_tokens: int, index: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=(1.0 if p.temperature is None else p.temperature) if sampling else 0.0,
            top_p=p.top_p or 1.0, top_k=p.top_k or 0, typical_p=p.typical_p or 1.0, seed=p.seed, stop=tuple(p.stop),
            ignore_eos=p.ignore_eos,
            logprobs=p.top_n_tokens or 0, echo=p.decoder_input_details,
            repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
            frequency_penalty=p.frequency_penalty or 0.0, frequency_of="sequence",
            structured=None if p.grammar is None else p.grammar.structured_output,
        )
    return params


def _job(state: AppState, body: GenerateRequest) -> Job:
    truncate = body.parameters.truncate
    if truncate is not None and truncate > state.max_model_len:  # TGI's words
        raise APIError(400, f"`truncate` must be strictly positive and less than {state.max_model_len + 1} (this "
                            f"server's max_model_len). Given: {truncate}", param="truncate")
    return Job("gen", body.model, body.parameters.policy, [body.inputs], max_tokens=body.parameters.max_new_tokens,
               truncate_prompt_tokens=body.parameters.truncate, params=_params(body))


def _token(served: ServedModel, token_id: int, logprob: float | None) -> TokenInfo:
    special = token_id in served.special_ids
    finite = logprob if logprob is None or abs(logprob) != float("inf") else None
    return TokenInfo(id=token_id, text=served.token_text(token_id),
                     logprob=finite, special=special)


def _finish_reason(served: ServedModel, result: GenerationResult) -> str:
    if result.finish_reason != "stop":
        return result.finish_reason
    return "eos_token" if result.token_ids and result.token_ids[-1] in served.eos_ids else "stop_sequence"


def _details(served: ServedModel, body: GenerateRequest, result: GenerationResult) -> GenerateDetails:
    return GenerateDetails(
        finish_reason=_finish_reason(served, result), generated_tokens=len(result.token_ids), seed=result.seed,
        tokens=[_token(served, i, lp) for i, lp in zip(result.token_ids, result.logprobs)],
        prefill=([_token(served, i, lp) for i, lp in zip(result.prompt_token_ids, result.prompt_logprobs)]
                 if result.prompt_logprobs is not None else []),
        top_tokens=[[_token(served, i, v) for i, v in top.items()] for top in result.top_logprobs]
        if result.top_logprobs else None,
    )


def _text(body: GenerateRequest, result: GenerationResult) -> str:
    return (body.inputs + result.text) if body.parameters.return_full_text else result.text


@router.post("/generate", response_model=GenerateResponse, responses=EVENTS)
async def generate(body: GenerateRequest, request: Request) -> Any:
    if body.stream:
        return await generate_stream(body, request)
    state = get_state(request)
    served, _ = state.require()
    run = await pipeline.start(state, _job(state, body))
    result = (await pipeline.collect(run.streams, request))[0]
    out = GenerateResponse(generated_text=_text(body, result), painters=painters_info(run.schedule, result),
                           details=_details(served, body, result) if body.parameters.details else None)
    return JSONResponse(out.model_dump(mode="json", exclude={"details"} if out.details is None else set()),
                        headers=timing_headers(run.schedule, [result]))


@router.post("/", response_model=GenerateResponse, responses=EVENTS)
async def compat_generate(body: GenerateRequest, request: Request) -> Any:
    """TGI's route at the root: /generate, or /generate_stream when `stream` is true. huggingface_hub's
    InferenceClient posts here when given the server's URL as its model."""
    return await generate(body, request)


@router.post("/generate_stream", response_class=EventSourceResponse, responses=EVENTS)
async def generate_stream(body: GenerateRequest, request: Request) -> EventSourceResponse:
    state = get_state(request)
    served, _ = state.require()
    run = await pipeline.start(state, _job(state, body))
    return pipeline.event_source(state, _events(served, body, run), policy=run.schedule.policy)


async def _events(served: ServedModel, body: GenerateRequest, run: Running) -> AsyncIterator[dict[str, str]]:
    index = 0

    def final(r: GenerationResult) -> dict[str, Any]:
        return dict(generated_text=_text(body, r), painters=painters_info(run.schedule, r),
                    details=StreamDetails(finish_reason=_finish_reason(served, r), generated_tokens=len(r.token_ids),
                                          seed=r.seed))

    try:
        async for _, out in pipeline.merged(run.streams):
            for n, (token_id, lp) in enumerate(zip(out.token_ids, out.logprobs)):
                last = out.finished and n == len(out.token_ids) - 1
                event = GenerateStreamEvent(
                    index=index, token=_token(served, token_id, lp),
                    top_tokens=[_token(served, i, v) for i, v in out.top_logprobs[n].items()]
                    if out.top_logprobs else None,
                    **(final(out.result) if last and out.result is not None else {}))
                index += 1
                yield _event(event)
            if out.finished and not out.token_ids and out.result is not None:
                yield _event(GenerateStreamEvent(index=index, token=None, **final(out.result)))
    except APIError as e:
        yield {"data": json.dumps(tgi_error(e.status, e.message, code=e.code)[1])}


def _event(event: GenerateStreamEvent) -> dict[str, str]:
    """TGI's frames: generated_text and details are null until the last; top_tokens and painters appear only when
    they have a value."""
    exclude = {k for k in ("top_tokens", "painters") if getattr(event, k) is None}
    return {"data": event.model_dump_json(exclude=exclude)}


@info_router.get("/info", response_model=TGIInfo)
async def info(request: Request) -> TGIInfo:
    """TGI's /info (its router's `get_model_info`; huggingface_hub's `InferenceClient.get_endpoint_info()` reads it),
    each limit the one this server enforces."""
    state = get_state(request)
    s = state.settings
    return TGIInfo(
        model_id=state.model_name, model_sha=None, model_pipeline_tag="text-generation",
        # running sequences (max_num_seqs) and waiting ones (queue_capacity, `AppState.check_admitting`'s 429)
        max_concurrent_requests=s.max_num_seqs + s.queue_capacity,
        max_best_of=TGI_NEUTRAL["best_of"], max_stop_sequences=MAX_STOP_STRINGS,
        # `AppState.check_length`: a prompt of up to max_model_len tokens, and with max_new_tokens no more in all
        max_input_tokens=state.max_model_len, max_total_tokens=state.max_model_len,
        validation_workers=_worker_threads(),
        max_client_batch_size=s.queue_capacity,  # `pipeline._check_sequences`: prompts x n, a 400 beyond
        router="painters", version=__version__, sha=None, docker_label=None,
    )


def _worker_threads() -> int:
    """The threads requests are tokenized and checked on: asyncio.to_thread's, the event loop's default executor,
    a ThreadPoolExecutor of its default size (Python's rule)."""
    cpus = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    return min(32, cpus + 4)
