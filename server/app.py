"""The FastAPI application: `create_app()` assembles the routers; the model loads once, in the lifespan, on a
background thread, so /health answers at once and /ready turns 200 when the engine runs."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request

from server.api import errors, misc, native, openai, probe
from server.api.errors import APIError
from server.api.state import AppState
from server.engine_loop import EngineLoop
from server.generate import Engine
from server.kv_cache import default_budget_tokens
from server.metrics import Metrics
from server.policy import as_policy
from server.settings import Settings, get_settings, load_presets

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


def load_engine(settings: Settings) -> Engine:
    """The default factory: load settings.model onto settings.device."""
    import torch

    from server.loader import load_model

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    loaded = load_model(settings.model, device=device, dtype=dtype)
    return Engine.from_loaded(loaded, group_mode=settings.group_mode, name=settings.model)


def served_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    name = settings.model.rstrip("/")
    return Path(name).stem if ("/" in name and Path(name).exists()) or name.endswith(".gguf") else name


def _start(state: AppState, factory: EngineFactory, raw_presets: dict) -> None:
    try:
        if state.settings.threads:
            import torch

            torch.set_num_threads(state.settings.threads)
        engine = factory(state.settings)
        presets = {}
        for name, policy in raw_presets.items():
            presets[name] = engine.compile(as_policy(policy)).policy  # invalid presets fail the start, loudly
        engine.compile(as_policy(state.settings.default_policy))
        s = state.settings
        max_len = min(s.max_model_len, engine.max_model_len)
        budget = s.kv_budget_tokens or default_budget_tokens(
            bytes_per_slot_token=engine.kv_bytes_per_slot_token(), device=engine.model.device,
            demand=s.max_num_seqs * max_len * engine.num_layers)
        loop = EngineLoop(engine, max_num_seqs=s.max_num_seqs, max_model_len=max_len, queue_capacity=s.queue_capacity,
                          kv_budget_tokens=budget, kv_block_size=s.kv_block_size, metrics=state.metrics)
        log.info("KV budget: %d slot-tokens (%.0f MB)", budget, budget * engine.kv_bytes_per_slot_token() / 2**20)
        loop.start()
        state.presets, state.engine, state.loop = presets, engine, loop
        log.info("model %s ready (%d layers)", state.model_name, engine.num_layers)
    except Exception as e:  # keep serving /health and /ready with the reason
        log.exception("model failed to load")
        state.load_error = f"{type(e).__name__}: {e}"


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory = load_engine) -> FastAPI:
    settings = settings or get_settings()
    raw_presets = load_presets(settings.policy_presets)
    name = served_name(settings)
    state = AppState(settings=settings, model_name=name,
                     metrics=Metrics(model=name, max_policies=settings.max_policy_labels))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=_start, args=(state, engine_factory, raw_presets), name="painters-load",
                                  daemon=True)
        loader.start()
        yield
        loader.join(timeout=60)
        if state.loop is not None:
            state.loop.stop()

    async def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")

    app = FastAPI(title="Painters", version="0.1.0", lifespan=lifespan,
                  description="Per-request layer-execution policies for frozen LLMs (OpenAI-compatible).")
    app.state.painters = state
    app.state.metrics = state.metrics
    errors.install(app)
    secured = [Depends(check_api_key)]
    app.include_router(openai.router, dependencies=secured)
    app.include_router(native.router, dependencies=secured)
    app.include_router(probe.router, dependencies=secured)
    app.include_router(misc.tokenizer_router, dependencies=secured)
    app.include_router(misc.router)
    return app
