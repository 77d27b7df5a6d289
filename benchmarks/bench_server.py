"""Server benchmark (make bench-server): a real uvicorn server on loopback, the real SmolLM2, this CPU.

P4 = aggregate generated tok/s with 16 concurrent streaming clients / with 1 client (same policy, 64 new tokens
     each), printed beside the compute ceiling (2 x parameters FLOPs per token at the measured matmul rate).
P5 = HTTP end-to-end latency / in-process engine latency, one request of 64 tokens.
P8 = aggregate tok/s of 12 concurrent streaming requests (4 x full, 4 x skip:8, 4 x pairs) / that of 12 x full:
     mixed policies share one engine step, so the mix should run at least as fast as all-full (target >= 1.0), and
     no policy's TPOT under the mix may exceed the all-full run's.
Hostile schedule: the server's peak RSS (VmHWM) around one request whose explicit schedule runs 300 steps of 15
     layers, with max_tokens unset (refused: it can never fit the KV budget) and with max_tokens=16 (runs).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time"
NEW_TOKENS = 64
app = typer.Typer(add_completion=False)


@dataclass
class StreamStats:
    policy: str
    ttft_s: float
    tpot_s: float
    e2e_s: float
    tokens: int


@dataclass
class ServerBench:
    threads: int
    engine_latency_s: float
    http_latency_s: float
    single_tok_s: float
    concurrent_tok_s: float
    concurrency: int
    matmul_gflops: float
    params: int
    ceiling_tok_s: float
    P4: float
    P4_ceiling: float
    P5: float
    full12_tok_s: float = 0.0
    mixed_tok_s: float = 0.0
    P8: float = 0.0
    full12_tpot_p50_s: float = 0.0
    mixed: dict[str, dict[str, float]] = field(default_factory=dict)
    hostile: dict[str, float | int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matmul_gflops() -> float:
    """Sustained float32 GEMM rate at decode-batch shapes (16 rows against SmolLM2's MLP weights)."""
    import torch

    x, w = torch.randn(16, 576), torch.randn(576, 3072)
    for _ in range(20):
        x @ w
    n = 400
    t = time.perf_counter()
    for _ in range(n):
        x @ w
    return 2 * 16 * 576 * 3072 * n / (time.perf_counter() - t) / 1e9


def engine_latency(model: str, policy: str, repeats: int) -> tuple[float, int]:
    """In-process: one request of NEW_TOKENS through the same engine the server runs; median seconds."""
    from server.engine.generate import Engine
    from server.model.loader import load_model
    from server.engine.sampling import SamplingParams

    loaded = load_model(model)
    engine = Engine.from_loaded(loaded)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0)
    engine.generate([PROMPT], policy=policy, params=params)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.generate([PROMPT], policy=policy, params=params)
        times.append(time.perf_counter() - t)
    w = loaded.weights
    n_params = (w.layers.nbytes() + w.embed.numel() * w.embed.element_size()) // w.embed.element_size()
    return statistics.median(times), n_params


async def one_stream(client: httpx.AsyncClient, model: str, policy: str, tokens: int = NEW_TOKENS) -> StreamStats:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "policy": policy}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    ttft = stamps[0] - t0 if stamps else end - t0
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return StreamStats(policy, ttft, tpot, end - t0, tokens)


async def concurrent(url: str, model: str, policies: list[str]) -> tuple[float, list[StreamStats]]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t = time.perf_counter()
        stats = await asyncio.gather(*(one_stream(client, model, p) for p in policies))
        wall = time.perf_counter() - t
    return sum(s.tokens for s in stats) / wall, list(stats)


def http_latency(url: str, model: str, policy: str, repeats: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "policy": policy}
    times = []
    with httpx.Client(base_url=url, timeout=600) as c:
        c.post("/v1/completions", json=body).raise_for_status()
        for _ in range(repeats):
            t = time.perf_counter()
            c.post("/v1/completions", json=body).raise_for_status()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def hostile(url: str, model: str, pid: int) -> dict[str, float | int]:
    """The issue's hostile request: an explicit schedule of 300 steps, each the 15 even layers."""
    steps = [list(range(0, 30, 2))] * 300
    out: dict[str, float | int] = {}
    with httpx.Client(base_url=url, timeout=600) as c:
        out["rss_before_mb"], out["peak_before_mb"] = peak_rss_mb(pid)
        body = {"model": model, "prompt": PROMPT, "temperature": 0,
                "policy": {"kind": "schedule", "steps": steps}}
        r = c.post("/v1/completions", json=body)
        out["unbounded_status"] = r.status_code
        r = c.post("/v1/completions", json={**body, "max_tokens": 16})
        out["bounded_status"] = r.status_code
        out["rss_after_mb"], out["peak_after_mb"] = peak_rss_mb(pid)
    return out


def start_server(port: int, model: str, max_num_seqs: int, *, prefix_caching: bool = False) -> subprocess.Popen:
    # No prefix cache by default: the in-process side of P5 computes its whole prompt, and P8's all-full run would
    # read from the cache what the mixed run's new policies compute (a review measured 41 against 101 ms TTFT, 12
    # against 50 prompt tokens computed)
    env = {**os.environ, "PAINTERS_MAX_NUM_SEQS": str(max_num_seqs),
           "PAINTERS_ENABLE_PREFIX_CACHING": "true" if prefix_caching else "false"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", str(port),
                             "--log-level", "warning"], env=env)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("server did not become ready in 180 s")


def pct(values: list[float], q: float) -> float:
    """numpy's percentile (linear between the two nearest): the median at q = 0.5 for any count (the nearest rank,
    rounded half to even, took the upper middle value of 4 and the lower of 6)."""
    return float(np.percentile(values, q * 100))


@app.command()
def main(model: str = "smollm2-135m", policy: str = "full", concurrency: int = 16, repeats: int = 3,
         as_json: bool = typer.Option(False, "--json")) -> None:
    import torch

    console = Console(stderr=as_json)
    console.print("[dim]in-process engine latency…[/]")
    engine_s, n_params = engine_latency(model, policy, repeats)
    gflops = matmul_gflops()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    console.print("[dim]starting server…[/]")
    proc = start_server(port, model, max_num_seqs=concurrency)
    try:
        http_s = http_latency(url, model, policy, repeats)
        single, _ = asyncio.run(concurrent(url, model, [policy]))
        many, _ = asyncio.run(concurrent(url, model, [policy] * concurrency))
        full12, full12_stats = asyncio.run(concurrent(url, model, ["full"] * 12))
        mixed_policies = ["full", "skip:8", "pairs"] * 4
        mixed, mixed_stats = asyncio.run(concurrent(url, model, mixed_policies))
        hostile_stats = hostile(url, model, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ceiling = gflops * 1e9 / (2 * n_params)
    result = ServerBench(
        threads=torch.get_num_threads(), engine_latency_s=engine_s, http_latency_s=http_s, single_tok_s=single,
        concurrent_tok_s=many, concurrency=concurrency, matmul_gflops=gflops, params=n_params,
        ceiling_tok_s=ceiling, P4=many / single, P4_ceiling=ceiling / single, P5=http_s / engine_s,
        full12_tok_s=full12, mixed_tok_s=mixed, P8=mixed / full12,
        full12_tpot_p50_s=pct([s.tpot_s for s in full12_stats], 0.5), hostile=hostile_stats,
    )
    for p in dict.fromkeys(mixed_policies):
        rows = [s for s in mixed_stats if s.policy == p]
        result.mixed[p] = {
            "ttft_p50_s": pct([s.ttft_s for s in rows], 0.5), "ttft_p99_s": pct([s.ttft_s for s in rows], 0.99),
            "tpot_p50_s": pct([s.tpot_s for s in rows], 0.5), "tpot_p99_s": pct([s.tpot_s for s in rows], 0.99),
            "clients": len(rows),
        }
    if as_json:
        print(json.dumps(asdict(result)))
        return
    t = Table(title=f"Painters server: {model}, {NEW_TOKENS} new tokens, {result.threads} threads")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("in-process engine, 1 request", f"{engine_s:.3f} s")
    t.add_row("HTTP end-to-end, 1 request", f"{http_s:.3f} s")
    t.add_row("P5 = HTTP / engine (target <= 1.05)", f"{result.P5:.3f}")
    t.add_row("1 streaming client", f"{single:.1f} tok/s")
    t.add_row(f"{concurrency} streaming clients", f"{many:.1f} tok/s")
    t.add_row(f"P4 = {concurrency} / 1 clients (target >= 5)", f"{result.P4:.2f}")
    t.add_row(f"compute ceiling ({gflops:.0f} GFLOP/s / 2x{n_params / 1e6:.0f}M params)",
              f"{ceiling:.0f} tok/s = {result.P4_ceiling:.1f}x one client")
    t.add_row("12 streaming clients, all full", f"{full12:.1f} tok/s (TPOT p50 {result.full12_tpot_p50_s * 1e3:.0f} ms)")
    t.add_row("12 streaming clients, 4 full + 4 skip:8 + 4 pairs", f"{mixed:.1f} tok/s")
    t.add_row("P8 = mixed / all-full (target >= 1.0)", f"{result.P8:.2f}")
    h = result.hostile
    t.add_row("hostile 300-step schedule, max_tokens unset", f"HTTP {h['unbounded_status']}")
    t.add_row("hostile 300-step schedule, max_tokens=16", f"HTTP {h['bounded_status']}")
    t.add_row("server peak RSS before / after the hostile requests",
              f"{h['peak_before_mb']:.0f} / {h['peak_after_mb']:.0f} MB")
    console.print(t)
    m = Table(title="mixed load: 3 policies x 4 streaming clients (all-full TPOT p50: "
                    f"{result.full12_tpot_p50_s * 1e3:.0f} ms)")
    for col in ("policy", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"):
        m.add_column(col, justify="right")
    for p, row in result.mixed.items():
        m.add_row(p, *(f"{row[k] * 1e3:.0f} ms" for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")))
    console.print(m)


if __name__ == "__main__":
    app()
