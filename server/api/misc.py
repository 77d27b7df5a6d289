"""Operational and tokenizer endpoints: health, readiness, metrics, policies, tokenize/detokenize, tokenizer_info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.errors import APIError
from server.api.openai import get_state
from server.api.protocol import DetokenizeRequest, TokenizeRequest

router = APIRouter(tags=["service"])
tokenizer_router = APIRouter(tags=["tokenizer"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Any:
    state = get_state(request)
    if not state.ready:
        detail = f"failed: {state.load_error}" if state.load_error else "loading"
        return JSONResponse({"status": detail}, status_code=503, headers={"Retry-After": "5"})
    return {"status": "ready", "model": state.model_name}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = get_state(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/policies")
async def policies(request: Request) -> dict[str, Any]:
    return get_state(request).policies_info()


def _check_model(request: Request, model: str | None) -> None:
    if model is not None:
        get_state(request).resolve_policy(model, None)


@tokenizer_router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    state = get_state(request)
    engine, _ = state.require()
    _check_model(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of 'prompt' (text) or 'messages' (chat)", param="prompt")
    if body.messages is not None:
        try:
            text = engine.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in body.messages], tokenize=False,
                add_generation_prompt=body.add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - no template, non-text parts: the client's to fix
            raise APIError(400, f"cannot apply this model's chat template ({type(e).__name__}: {e})",
                           param="messages") from None
        ids = list(engine.tokenizer.encode(text, add_special_tokens=False))
    else:
        ids = list(engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
    return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}


@tokenizer_router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    state = get_state(request)
    engine, _ = state.require()
    _check_model(request, body.model)
    vocab = engine.model.args.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary 0-{vocab - 1}", param="tokens")
    return {"prompt": engine.tokenizer.decode(body.tokens)}


@tokenizer_router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    state = get_state(request)
    engine, _ = state.require()
    tok = engine.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": getattr(tok, "eos_token", None), "eos_token_id": getattr(tok, "eos_token_id", None),
        "bos_token": getattr(tok, "bos_token", None), "bos_token_id": getattr(tok, "bos_token_id", None),
        "pad_token": getattr(tok, "pad_token", None), "pad_token_id": getattr(tok, "pad_token_id", None),
        "chat_template": getattr(tok, "chat_template", None),
        "model_max_length": state.max_model_len,
        "vocab_size": engine.model.args.vocab_size,
    }
