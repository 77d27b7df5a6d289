"""POST /v1/probe: how alike are the hidden states a policy's steps see (layer similarity, block influence, angular
distance). The statistics are reduced on the engine thread; probes queue and count against the KV budget like any
request."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.errors import APIError
from server.api.openai import get_state
from server.api.protocol import ProbeRequest, ProbeResponse
from server.api.state import collect_probe, engine_request, new_request_id, submit_all
from server.sampling import SamplingParams

router = APIRouter(tags=["science"])


@router.post("/v1/probe", response_model=ProbeResponse)
async def probe(body: ProbeRequest, request: Request) -> ProbeResponse:
    state = get_state(request)
    engine, _ = state.require()
    s = state.settings
    if len(body.prompts) > s.probe_max_prompts:
        raise APIError(400, f"{len(body.prompts)} prompts; a probe takes at most {s.probe_max_prompts} "
                            "(probe_max_prompts)", param="prompts", code="too_many_prompts")
    schedule = state.resolve_policy(body.model, body.policy)
    ids = [engine.encode(p) for p in body.prompts]
    for p in ids:
        state.check_length(len(p), 0)
    total = sum(len(p) for p in ids)
    if total > s.probe_max_tokens:
        raise APIError(413, f"the prompts have {total} tokens; a probe takes at most {s.probe_max_tokens} "
                            "(probe_max_tokens)", param="prompts", code="probe_too_large")
    request_ = engine_request(new_request_id("probe"), ids[0], SamplingParams(max_tokens=0), schedule)
    request_.probe_prompts = ids
    stats = await collect_probe(submit_all(state, [request_])[0], request)
    return ProbeResponse(model=state.model_name, policy=stats.policy, schedule=stats.schedule, steps=stats.steps,
                         num_sequences=stats.num_sequences, num_tokens=stats.num_tokens,
                         similarity=stats.similarity, block_influence=stats.block_influence,
                         angular_distance=stats.angular_distance)
