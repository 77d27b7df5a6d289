"""POST /v1/probe: how alike are the hidden states a policy's steps see (layer similarity, block influence, angular
distance). The statistics are reduced on the engine thread; probes go through the shared pipeline (tokenized off the
event loop, queued and counted against the KV budget like any request) with their own size limits."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api import pipeline
from server.api.openai import get_state
from server.api.protocol import ProbeRequest, ProbeResponse

router = APIRouter(tags=["science"])


@router.post("/v1/probe", response_model=ProbeResponse)
async def probe(body: ProbeRequest, request: Request) -> ProbeResponse:
    state = get_state(request)
    schedule, prompts = await pipeline.prepare_prompt_only(state, body.prompts, model=body.model, policy=body.policy,
                                                           param="prompts")
    engine_request = pipeline.prompt_only_request("probe", [p.ids for p in prompts], schedule)
    stats = await pipeline.collect_probe(pipeline.submit_all(state, [engine_request], param="prompts")[0], request)
    return ProbeResponse(model=state.model_name, policy=stats.policy, schedule=stats.schedule, steps=stats.steps,
                         num_sequences=stats.num_sequences, num_tokens=stats.num_tokens,
                         similarity=stats.similarity, block_influence=stats.block_influence,
                         angular_distance=stats.angular_distance)
