"""The FastAPI application: `create_app()` assembles the routers behind the guard (API key, drain, body size); the
model loads once, in the lifespan, on a background thread, so /health answers at once and /ready turns 200 when the
engine runs. `serve()` runs it under uvicorn with Painters' shutdown: SIGTERM drains, and a dead engine exits the
process non-zero."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from server import __version__
from server.api import embeddings, errors, misc, native, openai, playground, probe, responses, sagemaker
from server.api.guard import ALWAYS_OPEN, Guard
from server.api.protocol import ErrorResponse, TGIErrorResponse
from server.api.request_id import EchoRequestId
from server.api.responses_background import BackgroundTasks
from server.api.responses_store import ResponseStore
from server.api.state import AppState
from server.engine.loop import EngineLoop
from server.engine.generate import Engine, prefill_budget
from server.engine.kv_cache import default_budget_tokens
from server.engine.served import ServedModel
from server.metrics import Metrics
from server.policy.policy import as_policy
from server.engine.speculative import Speculation, runs_within
from server.settings import Settings, SpeculativeConfig, api_keys, get_settings, load_presets

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


def load_engine(settings: Settings) -> Engine:
    """The default factory: load settings.model onto settings.device."""
    import torch

    from server.model.loader import load_model

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    loaded = load_model(settings.model, device=device, dtype=dtype)
    return Engine.from_loaded(loaded, group_mode=settings.group_mode, name=settings.model,
                              graphs=None if settings.cuda_graphs else False, attention=settings.attention,
                              fuse=settings.fuse_decode, overlap=settings.overlap_decode)


def speculation(config: SpeculativeConfig | None, engine: Engine, *, default: str,
                presets: dict[str, str] | None = None) -> Speculation | None:
    """The engine's terms for `speculative_config` (its draft policy may name a preset); an invalid draft policy
    fails the start, loudly."""
    if config is None:
        return None
    named = config.draft_policy
    draft = None if named is None else engine.compile(as_policy((presets or {}).get(named, named)))
    if draft is not None and not runs_within(draft, engine.compile(as_policy(default))):
        log.warning("draft_policy %s does not run within the default policy %s (it runs a layer that policy "
                    "skips, or no fewer): requests under it will not draft", draft.policy, default)
    return Speculation(config.method, config.num_speculative_tokens, lookup_max=config.prompt_lookup_max,
                       lookup_min=config.prompt_lookup_min, draft=None if draft is None else draft.policy,
                       up_to_rows=config.disable_by_batch_size)


def served_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    name = settings.model.rstrip("/")
    return Path(name).stem if ("/" in name and Path(name).exists()) or name.endswith(".gguf") else name


def _start(state: AppState, factory: EngineFactory, raw_presets: dict) -> None:
    try:
        import torch

        if state.settings.threads:
            torch.set_num_threads(state.settings.threads)
        if (state.settings.device or "").startswith("cuda:"):  # load-time timings (CUDA events, Triton) run on
            torch.cuda.set_device(state.settings.device)  # the current device, not the tensors' one
        engine = factory(state.settings)
        engine.use_device()
        engine.grammars.warm()  # xgrammar imported and its compiler built beside the rest of the start, not in the way
        presets = {}
        for name, policy in raw_presets.items():
            presets[name] = engine.compile(as_policy(policy)).policy  # invalid presets fail the start, loudly
        allowed = None if state.settings.allowed_policies is None else frozenset(  # an invalid entry fails the start
            engine.compile(as_policy(presets.get(p, p))).policy for p in state.settings.allowed_policies)
        default = engine.compile(as_policy(state.settings.default_policy)).policy
        if allowed is not None and default not in allowed:  # else every request naming no policy would be refused
            raise ValueError(f"default_policy {default!r} is not among allowed_policies "
                             f"({', '.join(state.settings.allowed_policies or ())})")
        state.metrics.reserve([default, *presets.values()])  # their series survive any client's policy spree
        s = state.settings
        max_len = min(s.max_model_len, engine.max_model_len)
        budget = s.kv_budget_tokens or default_budget_tokens(
            bytes_per_slot_token=engine.kv_bytes_per_slot_token(), device=engine.model.device,
            demand=s.max_num_seqs * max_len * engine.num_layers)
        loop = EngineLoop(engine, max_num_seqs=s.max_num_seqs, max_model_len=max_len, queue_capacity=s.queue_capacity,
                          kv_budget_tokens=budget, kv_block_size=s.kv_block_size,
                          prefix_caching=s.enable_prefix_caching, prefix_cache_blocks=s.prefix_cache_blocks,
                          metrics=state.metrics, scheduling_policy=s.scheduling_policy,
                          prefill_tokens=prefill_budget(s.chunked_prefill_size, engine.model.device),
                          speculation=speculation(s.speculative_config, engine, default=default, presets=presets))
        log.info("KV budget: %d slot-tokens (%.0f MB)", budget, budget * engine.kv_bytes_per_slot_token() / 2**20)
        loop.warm_up(engine.compile(as_policy(s.default_policy)))  # before /ready: captures and compiles
        loop.start()
        state.presets, state.allowed, state.served, state.loop = presets, allowed, ServedModel.of(engine), loop
        log.info("model %s ready (%d layers; decode attention %s, captured steps %s, overlapped decode %s, "
                 "speculative decoding %s)", state.model_name, engine.num_layers, engine.decode_attention,
                 "on" if loop.batch.executor.graphs is not None else "off", "on" if loop.batch.overlap else "off",
                 loop.batch.speculation or "off")
    except Exception as e:  # keep serving /health and /ready with the reason
        log.exception("model failed to load")
        state.load_error = f"{type(e).__name__}: {e}"


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory = load_engine,
               load_in_background: bool = True, replica: str | None = None) -> FastAPI:
    """`load_in_background=False` (a Ray Serve replica) loads the model inside the lifespan's startup and fails it if
    the load fails, so Ray counts the replica as started only once it serves. `replica` labels its metrics."""
    settings = settings or get_settings()
    raw_presets = load_presets(settings.policy_presets)
    name = served_name(settings)
    state = AppState(settings=settings, model_name=name,
                     metrics=Metrics(model=name, max_policies=settings.max_policy_labels, replica=replica),
                     responses=ResponseStore(max_responses=settings.responses_store_max,
                                             max_bytes=settings.responses_store_max_bytes)
                     if settings.responses_store else None,
                     background=BackgroundTasks(limit=settings.responses_background_max))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=_start, args=(state, engine_factory, raw_presets), name="painters-load",
                                  daemon=True)
        loader.start()
        if not load_in_background:
            await asyncio.to_thread(loader.join)
            if state.load_error:
                raise RuntimeError(f"model failed to load: {state.load_error}")
        yield
        assert state.background is not None
        await state.background.close()  # before the engine stops: their requests are aborted, not left behind
        loader.join(timeout=60)
        if state.loop is not None:
            state.loop.stop()

    keys = api_keys(settings)
    app = FastAPI(title="Painters", version=__version__, lifespan=lifespan,
                  description="Per-request layer-execution policies for frozen LLMs (OpenAI-compatible).")
    app.state.painters = state
    app.state.metrics = state.metrics
    errors.install(app)
    refusals: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": why} for status, why in (
            (400, "invalid request: the message names the parameter and what is allowed"),
            (401, "missing or wrong API key"), (404, "unknown model"), (413, "body, probe or embedding input too large"),
            (429, "queue full; retry after Retry-After seconds"), (500, "internal error"),
            (503, "loading, shutting down, or the engine failed"))}
    for router in (openai.router, responses.router, embeddings.router, probe.router, misc.tokenizer_router,
                   sagemaker.router):
        app.include_router(router, responses=refusals)
    app.include_router(native.router, responses={
        status: {"model": TGIErrorResponse, "description": why} for status, why in (
            (401, "missing or wrong API key"), (404, "unknown model"), (413, "body too large"),
            (422, "invalid request (TGI's status): the message names the parameter and what is allowed"),
            (424, "the generation failed"), (429, "queue full; retry after Retry-After seconds"),
            (500, "internal error"), (503, "loading, shutting down, or the engine failed"))})
    app.include_router(native.info_router, responses={401: {"model": TGIErrorResponse,
                                                            "description": "missing or wrong API key"}})
    app.include_router(misc.metrics_router, responses={401: refusals[401]})
    app.include_router(misc.router)
    # /metrics/targets: where Ray Serve replicas serve their metrics (server/ray_serve.py), open or keyed as /metrics.
    open_paths = ALWAYS_OPEN if settings.metrics_require_key else ALWAYS_OPEN | {"/metrics", "/metrics/targets"}
    open_paths |= playground.install(app, refusals)
    app.add_middleware(Guard, state=state, keys=keys, open_paths=open_paths)
    app.add_middleware(EchoRequestId)  # outside the guard: its refusals carry the id back too
    if keys:
        log.info("API keys required (%d accepted) on every endpoint but %s", len(keys), ", ".join(sorted(open_paths)))
        _document_bearer(app, open_paths)
    return app


def _document_bearer(app: FastAPI, open_paths: frozenset[str]) -> None:
    """Say in /openapi.json that every operation but `open_paths` wants `Authorization: Bearer` (the guard checks)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in spec["paths"].items():
                for op in ops.values():
                    op["security"] = [] if path in open_paths else [{"bearer": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class Server(uvicorn.Server):
    """uvicorn with a drain. The first SIGTERM (or SIGINT) turns /ready to 503 and refuses new requests with 503;
    running requests finish until `drain_timeout_s`, the rest end with finish_reason "abort", then the server exits
    (status 0). A second signal exits at once, killed by it (status 128 + its number). If the engine thread dies, the
    server exits with status 3."""

    ENGINE_FAILED = 3

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self.should_exit:  # a second signal: now, without uvicorn's own graceful wait
            self.force_exit = True  # (which waited for every running request); killed by it, as usual (128+N)
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        threading.Thread(target=self._drain, name="painters-drain", daemon=True).start()

    def _drain(self) -> None:
        self.state.drain(self.state.settings.drain_timeout_s)
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        failure = self.state.engine_failure
        if failure is not None and not self.should_exit:
            log.critical("engine failed (%s): exiting with status %d so the process is restarted", failure,
                         self.ENGINE_FAILED)
            self.exit_code = self.ENGINE_FAILED
            return True
        return await super().on_tick(counter)


def serve(app: FastAPI, *, host: str, port: int, log_level: str = "info") -> int:
    """Run `app` until SIGTERM has drained it (0) or its engine failed (3); returns the exit status."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = Server(config, app.state.painters)
    server.run()
    return server.exit_code
