"""The browser playground: the page at GET /playground (static files shipped in the package, no build step, no CDN),
and the two endpoints it reads besides the OpenAI ones: POST /v1/schedule (the layer strip of a policy, as the server
compiles it) and GET /v1/playground (model facts and the presets with their measured score and speed-up).

The page is public; the API endpoints it calls keep the server's API keys (the page asks for one and keeps it in the
tab). Imports no torch: handlers validate and answer from the compiled schedule."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from server.api.protocol import POLICY_DOC, PolicyField
from server.policy.layer_strip import CellKind, Strip, strip

if TYPE_CHECKING:
    from server.api.state import AppState

STATIC = Path(__file__).resolve().parent.parent / "static" / "playground"
PAGE = "/playground"
STATIC_PREFIX = "/playground/static"

router = APIRouter(tags=["playground"])


def install(app: FastAPI, responses: dict[int | str, dict[str, Any]]) -> frozenset[str]:
    """Add the page, its files and its endpoints to `app`; returns the paths open without an API key (the page and
    its files; the endpoints they call are not)."""
    app.include_router(router, responses=responses)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC), name="playground-static")
    files = {f"{STATIC_PREFIX}/{f.name}" for f in STATIC.iterdir() if f.is_file()}
    return frozenset({PAGE, f"{PAGE}/", *files})


# -- schemas -----------------------------------------------------------------------------------------------------


class ScheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model, optionally MODEL@POLICY or MODEL@PRESET")
    policy: PolicyField = Field(None, description=POLICY_DOC)


class StripCell(BaseModel):
    kind: CellKind = Field(description="'run' (one layer run), 'group' (layers run in parallel on one input) or "
                                  "'skipped' (layers never run, placed where they would have run)")
    layers: list[int]
    combine: str | None = Field(None, description="a group's rule: mean, sum or pairs")
    moved: bool = Field(False, description="a layer run out of its neighbours' order")


class StripBlock(BaseModel):
    cells: list[StripCell]
    times: int = Field(description="how many times these cells run back to back (a loop or a repeat when > 1)")


class ScheduleView(BaseModel):
    object: str = "schedule"
    policy: str = Field(description="canonical policy")
    schedule: str = Field(description="the schedule key, as in the `painters` object of every response")
    num_layers: int
    layer_runs: int = Field(description="decoder-layer evaluations per token (full: num_layers)")
    blocks: list[StripBlock] = Field(description="the strip in execution order")
    runs: list[int] = Field(description="per layer: how many times it runs (0 = skipped)")
    skipped: list[int]
    changed: list[int] = Field(description="layers treated differently from full: skipped, grouped, repeated, moved")

    @classmethod
    def of(cls, s: Strip) -> ScheduleView:
        blocks = [StripBlock(cells=[StripCell(kind=c.kind, layers=list(c.layers), combine=c.combine, moved=c.moved)
                                    for c in b.cells], times=b.times) for b in s.blocks]
        return cls(policy=s.policy, schedule=s.schedule, num_layers=s.num_layers, layer_runs=s.layer_runs,
                   blocks=blocks, runs=list(s.runs), skipped=list(s.skipped), changed=list(s.changed))


class PresetInfo(BaseModel):
    name: str
    policy: str = Field(description="canonical policy")
    score: float | None = Field(None, description="normalised score measured by `painters search` (1 = full)")
    speedup: float | None = Field(None, description="full's TPOT p50 over this preset's, measured by `painters search`")
    note: str | None = Field(None, description="the preset file's comment on it")


class PlaygroundInfo(BaseModel):
    model: str
    num_layers: int
    max_model_len: int
    default_policy: str
    presets: list[PresetInfo]
    examples: list[str]


# -- preset notes ---------------------------------------------------------------------------------------------------

_NOTE = re.compile(r"^#\s*([^\s:@]+):\s*(.*)$")
_SCORE = re.compile(r"\b(?:score|held-out mean)\s+(-?[0-9.]+)")  # the older and the current search's wording
_SPEEDUP = re.compile(r"\bspeed-up\s+([0-9.]+)x")


def preset_notes(text: str, names: set[str] | list[str]) -> dict[str, PresetInfo]:
    """`# NAME: ..., score 0.905, speed-up 1.24x (...)` comments of a preset file (as `painters search` writes
    them) -> the measured figures per preset name. Presets without such a comment are absent; policy left empty."""
    out: dict[str, PresetInfo] = {}
    for line in text.splitlines():
        m = _NOTE.match(line.strip())
        if not m or m.group(1) not in names:
            continue
        note = m.group(2).strip()
        score, speedup = _SCORE.search(note), _SPEEDUP.search(note)
        out[m.group(1)] = PresetInfo(name=m.group(1), policy="", note=note,
                                     score=_float(score.group(1)) if score else None,
                                     speedup=_float(speedup.group(1)) if speedup else None)
    return out


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# -- routes ----------------------------------------------------------------------------------------------------------


def _state(request: Request) -> AppState:
    return request.app.state.painters


@router.get(PAGE, include_in_schema=False)
@router.get(f"{PAGE}/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.post("/v1/schedule", response_model=ScheduleView)
async def schedule(body: ScheduleRequest, request: Request) -> ScheduleView:
    """What a policy runs, as the layer strip the playground draws: the same resolution and validation as a
    completion (model@suffix, presets, the 400 naming the allowed forms)."""
    compiled = _state(request).resolve_policy(body.model, body.policy)
    return ScheduleView.of(strip(compiled))


@router.get("/v1/playground", response_model=PlaygroundInfo)
async def playground_info(request: Request) -> PlaygroundInfo:
    state = _state(request)
    served, _ = state.require()
    path = state.settings.policy_presets
    text = Path(path).read_text() if path is not None and path.suffix != ".json" else ""
    notes = preset_notes(text, list(state.presets))
    presets = [notes[name].model_copy(update={"policy": policy}) if name in notes
               else PresetInfo(name=name, policy=policy) for name, policy in state.presets.items()]
    info = state.policies_info()
    return PlaygroundInfo(model=state.model_name, num_layers=served.num_layers, max_model_len=state.max_model_len,
                          default_policy=state.settings.default_policy, presets=presets, examples=info.examples)
