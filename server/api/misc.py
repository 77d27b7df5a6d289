"""Operational and tokenizer endpoints: health, readiness, metrics, version, policies, tokenize/detokenize,
tokenizer_info."""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server import __version__
from server.api import pipeline
from server.api.errors import APIError
from server.api.openai import get_state
from server.api.pipeline import Chat
from server.api.protocol import (
    DetokenizeRequest, DetokenizeResponse, HealthStatus, PoliciesInfo, ReadyStatus, TokenizeRequest,
    TokenizeResponse, TokenizerInfo, VersionInfo,
)

router = APIRouter(tags=["service"])
metrics_router = APIRouter(tags=["service"])
tokenizer_router = APIRouter(tags=["tokenizer"])
UNAVAILABLE = {503: {"model": ReadyStatus, "description": "not ready: loading, draining or failed"}}


@router.get("/health", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def health(request: Request) -> JSONResponse:
    """The process is alive (the model may still be loading); 503 once the engine thread has died, so a liveness
    probe restarts the process."""
    failure = get_state(request).engine_failure
    if failure is not None:
        return JSONResponse({"status": f"engine failed: {failure}"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", response_model=ReadyStatus, responses=UNAVAILABLE)
async def ready(request: Request) -> JSONResponse:
    """200 while the server takes requests: not while loading, draining for shutdown, or failed."""
    state = get_state(request)
    if not state.ready:
        if state.engine_failure is not None:
            detail = f"failed: {state.engine_failure}"
        elif state.load_error:
            detail = f"failed: {state.load_error}"
        else:
            detail = "draining" if state.draining else "loading"
        return JSONResponse({"status": detail}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "model": state.model_name})


@metrics_router.get("/metrics", response_class=Response,
                    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                     "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    # on a worker thread: with 32 policy labels a scrape is ~7,300 lines (0.17 s here), and scrapes in a loop held
    # back every other client's request on the event loop (a small completion 0.4 -> 1-2 s)
    body, content_type = await asyncio.to_thread(get_state(request).metrics.render)
    return Response(body, media_type=content_type)


@router.get("/version", response_model=VersionInfo)
async def version() -> VersionInfo:
    """vLLM's /version: the server's package version."""
    return VersionInfo(version=__version__)


@router.get("/policies", response_model=PoliciesInfo)
async def policies(request: Request) -> PoliciesInfo:
    return get_state(request).policies_info()


def _check_model(request: Request, model: str | None) -> None:
    if model is not None:
        get_state(request).resolve_policy(model, None)


@tokenizer_router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = get_state(request)
    served, _ = state.require()
    _check_model(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of 'prompt' (text) or 'messages' (chat)", param="prompt")
    if body.messages is not None:
        try:
            messages = [m.for_template() for m in body.messages]
        except ValueError as e:
            raise APIError(400, f"cannot apply this model's chat template ({e})", param="messages") from None
        chat = Chat(messages, body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs,
                    tools=[t.model_dump() for t in body.tools] if body.tools else None)
        [prompt] = await pipeline.tokenize(state, chat)
        ids = prompt.ids
    else:
        text, special = pipeline.unicode_text(body.prompt, param="prompt"), body.add_special_tokens
        ids = list(await asyncio.to_thread(served.tokenize, text, add_special_tokens=special))
    strs = await asyncio.to_thread(served.pieces, ids) if body.return_token_strs else None
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len, token_strs=strs)


@tokenizer_router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    served, _ = state.require()
    _check_model(request, body.model)
    vocab = state.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary 0-{vocab - 1}", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(served.decode, body.tokens))


@tokenizer_router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(request: Request) -> TokenizerInfo:
    state = get_state(request)
    served, _ = state.require()
    return TokenizerInfo(**dataclasses.asdict(served.tokenizer_facts()), model_max_length=state.max_model_len,
                         vocab_size=state.vocab_size)
