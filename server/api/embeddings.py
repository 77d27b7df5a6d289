"""POST /v1/embeddings: OpenAI's embeddings API on the loaded causal LM, under the request's layer policy. Each input's
vector is computed on the engine thread (`Batch.embed`: last token, final norm, L2-normalized, as vLLM pools a causal
LM by default); this adapter bounds the request, submits it through the shared prompt-only pipeline and encodes the
plain lists it gets back."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from server.api import pipeline
from server.api.errors import APIError
from server.api.openai import _prompts, get_state
from server.api.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage

router = APIRouter(tags=["openai"])


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    state = get_state(request)
    served, _ = state.require()
    if body.dimensions is not None and body.dimensions != served.hidden_size:
        # vLLM: 'Model "..." does not support matryoshka representation, changing output dimensions will lead to
        # poor results.' (vllm/pooling_params.py, for a model whose config has no is_matryoshka)
        raise APIError(400, f"dimensions {body.dimensions}: model {state.model_name!r} does not support matryoshka "
                            "representation, changing output dimensions will lead to poor results; leave dimensions "
                            f"out or send its hidden size, {served.hidden_size}", param="dimensions")
    # vLLM's truncate_prompt_tokens: -1 keeps as much as the context holds, k keeps each input's last k tokens
    truncate, limit = body.truncate_prompt_tokens, state.max_model_len
    if truncate is not None and not (truncate == -1 or 1 <= truncate <= limit):
        raise APIError(400, f"truncate_prompt_tokens must be -1 (the context length) or an integer in [1, {limit}] "
                            f"(this server's max_model_len), got {truncate}", param="truncate_prompt_tokens")
    truncate = limit if truncate == -1 else truncate
    pipeline.check_priority(state, body.priority)
    schedule, prompts = await pipeline.prepare_prompt_only(
        state, _prompts(body.input), model=body.model, policy=body.policy, param="input",
        truncate_prompt_tokens=truncate, add_special_tokens=body.add_special_tokens)
    engine_request = pipeline.prompt_only_request("embd", [p.ids for p in prompts], schedule, embed=True,
                                                  priority=body.priority)
    vectors = await pipeline.collect_embeddings(pipeline.submit_all(state, [engine_request], param="input")[0], request)
    tokens = sum(len(p.ids) for p in prompts)
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=_encode(v) if body.encoding_format == "base64" else v)
              for i, v in enumerate(vectors)],
        model=body.model or state.model_name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def _encode(vector: list[float]) -> str:
    """OpenAI's (and vLLM's) base64 form: the vector's float32 bytes, little-endian, base64-encoded."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
