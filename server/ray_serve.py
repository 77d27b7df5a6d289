"""Painters as a Ray Serve application: the FastAPI app of `server.app.create_app`, one engine per replica, behind
Ray's HTTP proxy (`painters serve --replicas N [--address RAY_ADDRESS]`).

Only this module (and `server.ray_router`, which Ray loads into its proxy) imports Ray; plain `painters serve` never
does. A replica is the same app as a single server (settings, presets, API keys, limits), with three differences:
the model loads before Ray counts the replica as started; a dead engine fails Ray's health check, so Ray replaces
the replica; and its metrics carry a `replica` label and are served on a port of its own, listed for Prometheus'
HTTP service discovery at GET /metrics/targets.

Shutdown: Ray Serve drains a replica by waiting for its requests, then kills it, cutting streams still running; it
tells the replica nothing first. So `run` (`painters serve --replicas` on SIGTERM) tells every replica through the
`ShutdownSignal` actor, and each drains as a single server does (503 for new requests, `finish_reason: "abort"` at
`drain_timeout_s`) before Ray's own timeout, which is longer by the handlers' grace. An application that `build`
deploys (KubeRay) gets no such signal: Ray's drain is all it has.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.state import HANDLER_GRACE_S
from server.app import create_app, served_name
from server.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "painters"
NAMESPACE = "painters"
TARGETS_ACTOR = "painters-metrics-targets"
SHUTDOWN_ACTOR = "painters-shutdown"
TARGET_TTL_S = 30.0  # a replica re-registers with every routing-stats report (every few seconds)
ROUTERS = {"affinity": "server.ray_router.ScheduleAffinityRouter",
           "default": "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter"}
Routing = Literal["affinity", "default"]


@dataclass(frozen=True)
class RayOptions:
    replicas: int
    address: str | None = None  # None: start a local Ray instance
    num_cpus: int | None = None  # the local instance's CPUs (default: all)
    object_store_bytes: int = 256 * 2**20  # the local instance's object store: requests and answers are small
    routing: Routing = "affinity"
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0


@ray.remote(num_cpus=0)
class MetricsTargets:
    """Where each replica serves its metrics: replica id -> (host:port, last report time)."""

    def __init__(self) -> None:
        self.targets: dict[str, tuple[str, float]] = {}

    def put(self, replica: str, address: str) -> None:
        self.targets[replica] = (address, time.time())

    def remove(self, replica: str) -> None:
        self.targets.pop(replica, None)

    def live(self) -> dict[str, str]:
        now = time.time()
        return {r: a for r, (a, seen) in self.targets.items() if now - seen < TARGET_TTL_S}


@ray.remote(num_cpus=0)
class ShutdownSignal:
    """Tells the replicas that the application is shutting down, and by when their drain must end (wall clock):
    each replica waits on `wait` from the start."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.deadline = 0.0

    async def wait(self) -> float:
        await self.event.wait()
        return self.deadline

    async def begin(self, deadline: float) -> None:
        self.deadline = deadline
        self.event.set()

    async def reset(self) -> None:
        """For a new deployment on a cluster whose signal has fired (the actor is detached)."""
        self.event = asyncio.Event()


def _shutdown_signal() -> Any:
    return ShutdownSignal.options(name=SHUTDOWN_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                                  lifetime="detached").remote()


def _targets() -> Any:
    return MetricsTargets.options(name=TARGETS_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                                  lifetime="detached").remote()


def _node_host() -> str:
    """The address other nodes (and Prometheus) reach this replica at: loopback on a one-machine Ray instance."""
    ip = ray.util.get_node_ip_address()
    return "127.0.0.1" if ip.startswith("127.") or os.environ.get("PAINTERS_RAY_LOCAL") else ip


class ReplicaHeader:
    """Names the replica (and its process) that answered, in `x-painters-replica` and `x-painters-replica-pid`."""

    def __init__(self, app: ASGIApp, *, replica: str) -> None:
        self.app = app
        self.headers = [(b"x-painters-replica", replica.encode()),
                        (b"x-painters-replica-pid", str(os.getpid()).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)
        await self.app(scope, receive, named if scope["type"] == "http" else send)


class PaintersReplica:
    """One replica: the app of `create_app` with its own engine (wrapped by `serve.ingress` in `deployment`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.replica = serve.get_replica_context().replica_tag
        self.targets = _targets()
        self.metrics_address: str | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings, load_in_background=False, replica=self.replica)
        state = app.state.painters
        host = _node_host()
        self.metrics_address = f"{host}:{state.metrics.serve_http(host=host)}"
        self.targets.put.remote(self.replica, self.metrics_address)
        self.state = state
        threading.Thread(target=self._drain_when_told, args=(_shutdown_signal(),), name="painters-ray-drain",
                         daemon=True).start()
        app.add_middleware(ReplicaHeader, replica=self.replica)

        @app.get("/metrics/targets", tags=["service"])
        async def metrics_targets() -> list[dict[str, Any]]:
            """Every live replica's metrics address, in Prometheus' HTTP service-discovery format."""
            live = await self.targets.live.remote()
            return [{"targets": [address], "labels": {"replica": replica}} for replica, address in sorted(live.items())]

        return app

    def _drain_when_told(self, shutdown: Any) -> None:
        try:
            deadline = ray.get(shutdown.wait.remote())
        except ray.exceptions.RayError:  # Ray itself is going away: its own drain is all there is
            return
        self.state.drain(max(0.0, deadline - time.time()))

    def check_health(self) -> None:
        """Ray calls this every few seconds; raising makes Ray replace the replica (a plain server exits with 3)."""
        failure = self.state.engine_failure
        if failure is not None:
            raise RuntimeError(f"engine failed: {failure}")

    def record_routing_stats(self) -> dict[str, Any]:
        """What the request router sees of this replica (and a heartbeat for the metrics target)."""
        if self.metrics_address:
            self.targets.put.remote(self.replica, self.metrics_address)
        loop = self.state.loop
        return {"running": loop.num_running if loop else 0, "waiting": loop.num_waiting if loop else 0}

    def __del__(self) -> None:
        try:
            self.targets.remove.remote(self.replica)
        except Exception:  # Ray is shutting down too
            pass


def deployment(settings: Settings, options: RayOptions) -> serve.Application:
    """The bound Ray Serve application: `options.replicas` copies of the app, routed by `options.routing`."""
    router = RequestRouterConfig(request_router_class=ROUTERS[options.routing],
                                 request_routing_stats_period_s=2.0, request_routing_stats_timeout_s=5.0)
    cls = serve.deployment(
        serve.ingress()(PaintersReplica),
        name="Painters",
        num_replicas=options.replicas,
        # A replica decodes up to max_num_seqs at once and queues up to queue_capacity (then answers 429 itself).
        max_ongoing_requests=settings.max_num_seqs + settings.queue_capacity,
        # past the replicas' own drain (`run`), so that Ray cuts nothing they would still end
        graceful_shutdown_timeout_s=settings.drain_timeout_s + HANDLER_GRACE_S + 5,
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        request_router_config=router,
    )
    return cls.bind(settings)


def build(args: dict[str, str]) -> serve.Application:
    """`import_path: server.ray_serve:build` for `serve run` and KubeRay's serveConfigV2: Settings from PAINTERS_*
    variables, overridden by `args` (Settings fields), plus `replicas` and `routing`; serveConfigV2's
    `deployments:` section may override the deployment's options (num_replicas, ray_actor_options) as usual."""
    args = dict(args)
    routing = args.pop("routing", "affinity")
    if routing not in ROUTERS:
        raise ValueError(f"routing must be one of {', '.join(ROUTERS)}, got {routing!r}")
    settings = Settings(**{k: v for k, v in args.items() if k not in ("replicas", "gpus_per_replica")})
    options = RayOptions(replicas=int(args.get("replicas", 1)), routing=routing,  # type: ignore[arg-type]
                         gpus_per_replica=float(args.get("gpus_per_replica", 0)),
                         cpus_per_replica=float(settings.threads or 1))
    return deployment(settings, options)


def start(settings: Settings, options: RayOptions, *, stop: threading.Event | None = None) -> float:
    """Start (or join) Ray, deploy, and return the seconds until every replica had loaded its model, or until
    `stop` was set: SIGTERM and SIGINT set it from the moment Ray is up (`ray.init` installs handlers of its own,
    which would end the process without a drain)."""
    t0 = time.monotonic()
    if options.address:
        ray.init(address=options.address, namespace=NAMESPACE, log_to_driver=False)
    else:
        os.environ["PAINTERS_RAY_LOCAL"] = "1"
        ray.init(num_cpus=options.num_cpus, object_store_memory=options.object_store_bytes, namespace=NAMESPACE,
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PAINTERS_RAY_LOCAL": "1"}})
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.get(_shutdown_signal().reset.remote())
    serve.start(http_options={"host": settings.host, "port": settings.port}, proxy_location="HeadOnly")
    serve.run(deployment(settings, options), name=APP_NAME, route_prefix="/", blocking=False)
    _wait_running(timeout=600, stop=stop)
    return time.monotonic() - t0


def _wait_running(*, timeout: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"Ray Serve could not start Painters: {status.message}")
        stop.wait(0.5)
    if not stop.is_set():
        raise TimeoutError(f"Painters replicas did not start within {timeout:.0f} s")


def run(settings: Settings, options: RayOptions) -> int:
    """Serve until SIGTERM or SIGINT, then shut the application down (each replica drains for drain_timeout_s, as
    a single server does) and, for a local instance, Ray itself."""
    stop = threading.Event()
    try:
        took = start(settings, options, stop=stop)
        log.info("Painters on Ray Serve: %d replica(s) of %s at http://%s:%d (ready in %.1f s, routing %s)",
                 options.replicas, served_name(settings), settings.host, settings.port, took, options.routing)
        stop.wait()
        log.info("shutting down: replicas drain for up to %.0f s", settings.drain_timeout_s)
        ray.get(_shutdown_signal().begin.remote(time.time() + settings.drain_timeout_s))
        serve.delete(APP_NAME)
        if not options.address:
            serve.shutdown()
        return 0
    finally:
        ray.shutdown()

