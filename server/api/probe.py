"""POST /v1/probe: how alike are the hidden states a policy's steps see (layer similarity, block influence, angular
distance). The statistics are reduced on the engine thread; probes go through the shared pipeline (tokenized off the
event loop, queued and counted against the KV budget like any request) with their own size limits."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api import pipeline
from server.api.errors import APIError
from server.api.openai import get_state
from server.api.protocol import ProbeRequest, ProbeResponse
from server.engine.sampling_params import SamplingParams

router = APIRouter(tags=["science"])


@router.post("/v1/probe", response_model=ProbeResponse)
async def probe(body: ProbeRequest, request: Request) -> ProbeResponse:
    state = get_state(request)
    s = state.settings
    if len(body.prompts) > s.probe_max_prompts:
        raise APIError(400, f"{len(body.prompts)} prompts; a probe takes at most {s.probe_max_prompts} "
                            "(probe_max_prompts)", param="prompts", code="too_many_prompts")
    state.check_admitting()
    schedule = state.resolve_policy(body.model, body.policy)
    prompts = await pipeline.tokenize(state, body.prompts)
    for p in prompts:
        state.check_length(len(p.ids), 0)
    total = sum(len(p.ids) for p in prompts)
    if total > s.probe_max_tokens:
        raise APIError(413, f"the prompts have {total} tokens; a probe takes at most {s.probe_max_tokens} "
                            "(probe_max_tokens)", param="prompts", code="probe_too_large")
    ids = [p.ids for p in prompts]
    engine_request = pipeline.engine_request(pipeline.new_request_id("probe"), ids[0], SamplingParams(max_tokens=0),
                                             schedule)
    engine_request.probe_prompts = ids
    stats = await pipeline.collect_probe(pipeline.submit_all(state, [engine_request])[0], request)
    return ProbeResponse(model=state.model_name, policy=stats.policy, schedule=stats.schedule, steps=stats.steps,
                         num_sequences=stats.num_sequences, num_tokens=stats.num_tokens,
                         similarity=stats.similarity, block_influence=stats.block_influence,
                         angular_distance=stats.angular_distance)
