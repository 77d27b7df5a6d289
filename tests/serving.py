"""Test helpers for real processes on loopback: a Painters server (uvicorn) and a Prometheus server, each on a free
127.0.0.1 port, waited for with a deadline and always terminated; plus a tiny reader of the Prometheus text format."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.generate import Engine
from server.settings import Settings
from tests.conftest import CharTokenizer, tiny_llama

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2,
               alive: Callable[[], str | None] = lambda: None) -> None:
    """Poll `check` until it is true; fail with `what` after `timeout` s, or at once when `alive` reports a death."""
    deadline = time.monotonic() + timeout
    while True:
        dead = alive()
        if dead:
            raise RuntimeError(f"{what}: {dead}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class Process:
    """A child process bound to `url`, with its combined output in `log`."""

    proc: subprocess.Popen
    url: str
    log: Path

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def death(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"exited with {self.proc.returncode}; last output:\n{self.tail()}"


@contextmanager
def _spawn(args: list[str], *, url: str, log: Path, env: dict[str, str] | None = None) -> Iterator[Process]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
    p = Process(proc, url, log)
    try:
        yield p
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


@contextmanager
def painters_server(tmp: Path, *, model: str = "smollm2-135m", extra: tuple[str, ...] = (),
                    env: dict[str, str] | None = None, timeout: float = 180) -> Iterator[Process]:
    """`python -m server.cli serve` on a free loopback port, yielded once GET /ready answers 200."""
    port = free_port()
    args = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", HOST, "--port", str(port),
            "--device", "cpu", "--log-level", "warning", *extra]
    # One torch thread: on a small shared CPU, more threads than free cores make decoding several times slower.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PAINTERS_THREADS": "1", **(env or {})}
    with _spawn(args, url=f"http://{HOST}:{port}", log=tmp / "painters.log", env=full_env) as p:
        wait_until(lambda: httpx.get(f"{p.url}/ready", timeout=2).status_code == 200, timeout=timeout,
                   what="painters server /ready", interval=0.25, alive=p.death)
        yield p


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


@contextmanager
def prometheus_server(tmp: Path, *, targets: list[str] | None = None, discovery: dict[str, Any] | None = None,
                      interval: str = "1s", timeout: float = 60) -> Iterator[Process]:
    """A real Prometheus on a free loopback port scraping `targets` (host:port), or what `discovery` (a scrape
    config's service-discovery part, e.g. http_sd_configs) finds, as job "painters"."""
    binary = prometheus_binary()
    assert binary, "prometheus binary not found"
    port = free_port()
    config = tmp / "prometheus.yml"
    # JSON is valid YAML; no YAML writer needed.
    config.write_text(json.dumps({
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [{"job_name": "painters", "metrics_path": "/metrics",
                            **(discovery or {"static_configs": [{"targets": targets or []}]})}],
    }))
    data = tmp / "tsdb"
    data.mkdir(exist_ok=True)
    args = [binary, f"--config.file={config}", f"--storage.tsdb.path={data}", f"--web.listen-address={HOST}:{port}",
            "--storage.tsdb.retention.time=1h", "--log.level=warn"]
    with _spawn(args, url=f"http://{HOST}:{port}", log=tmp / "prometheus.log") as p:
        wait_until(lambda: httpx.get(f"{p.url}/-/ready", timeout=2).status_code == 200, timeout=timeout,
                   what="prometheus /-/ready", alive=p.death)
        yield p


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` in Prometheus text whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


@contextmanager
def serve_tiny(*, model_factory: Callable[[], object] | None = None, max_model_len: int = 128,
               tokenizer: object | None = None, **settings: object) -> Iterator[str]:
    """The Painters app on a tiny in-memory model (default: conftest's 6-layer `tiny_llama` and `CharTokenizer`),
    served by uvicorn in a thread on a port the OS chooses; yields its URL once GET /ready is 200. `settings` go to
    `Settings`."""
    import threading

    import torch
    import uvicorn

    from server.app import create_app
    from server.engine.generate import Engine
    from server.settings import Settings
    from tests.conftest import CharTokenizer, tiny_llama

    build = model_factory or tiny_llama
    app = create_app(Settings(model="tiny", max_model_len=max_model_len, **settings),
                     engine_factory=lambda s: Engine.from_hf(build(), tokenizer or CharTokenizer(), device="cpu"))
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-tiny", daemon=True)
    # Client, event loop and engine share this process: torch's intra-op threads would fight them for the cores
    # (10-80x slower decode on a busy 2-core machine); the tiny model needs no more than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        url = f"http://{HOST}:{server.servers[0].sockets[0].getsockname()[1]}"
        wait_until(lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200, timeout=60,
                   what="the tiny server's /ready", interval=0.05,
                   alive=lambda: None if thread.is_alive() else "the uvicorn thread died")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        torch.set_num_threads(threads)


# -- the tiny model served in-process (TestClient) ------------------------------------------------------------------

MODEL = "tiny"
MAX_LEN = 128


def tiny_engine(tokenizer: CharTokenizer | None = None) -> Callable[[Settings], Engine]:
    return lambda s: Engine.from_hf(tiny_llama(), tokenizer or CharTokenizer())


def settings(**overrides: Any) -> Settings:
    return Settings(**{"model": MODEL, "max_model_len": MAX_LEN, **overrides})


def wait_ready(c: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (r := c.get("/ready")).status_code != 200:
        assert time.monotonic() < deadline, f"/ready still {r.status_code}: {r.text}"
        time.sleep(0.02)


@contextmanager
def serving(s: Settings, factory: Callable[[Settings], Engine] | None = None, *, ready: bool = True
            ) -> Iterator[TestClient]:
    app = create_app(s, engine_factory=factory or tiny_engine())
    # raise_server_exceptions=False: an unhandled error must reach the test as the 500 a client would see.
    with TestClient(app, raise_server_exceptions=False) as c:
        if ready:
            wait_ready(c)
        yield c
