"""Amazon SageMaker's serving contract, as vLLM serves it: `GET|POST /ping` says whether the container takes requests,
and `POST /invocations` answers a request of the OpenAI shape its body has (chat messages, a completion prompt or an
embedding input) exactly as that route would, streamed or not."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from server.api import embeddings, misc, openai
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ReadyStatus

router = APIRouter(tags=["sagemaker"])

# the field that says which route a body is for -> (its request model, the route); the first present wins
ROUTES = (("messages", ChatCompletionRequest, openai.chat_completions),
          ("prompt", CompletionRequest, openai.completions),
          ("input", EmbeddingRequest, embeddings.embeddings))


@router.get("/ping", response_model=ReadyStatus, responses=misc.UNAVAILABLE)
@router.post("/ping", response_model=ReadyStatus, responses=misc.UNAVAILABLE, include_in_schema=False)
async def ping(request: Request) -> JSONResponse:
    """SageMaker's health check: 200 once the model is loaded and the server takes requests (as /ready; SageMaker
    sends traffic only then), 503 while it loads, drains or has failed."""
    return await misc.ready(request)


@router.post("/invocations")
async def invocations(request: Request) -> Any:
    """A chat completion when the body has `messages`, a completion when it has `prompt`, embeddings when it has
    `input`: validated and answered by that route (its errors included)."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
    for key, model, route in ROUTES:
        if key in body:
            try:
                parsed = model.model_validate(body)
            except ValidationError as e:
                raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
            answer = await route(parsed, request)
            return JSONResponse(answer.model_dump(mode="json")) if isinstance(answer, BaseModel) else answer
    raise APIError(400, "cannot tell which API this body is for: send 'messages' (a chat completion), 'prompt' (a "
                        "completion) or 'input' (embeddings)")
