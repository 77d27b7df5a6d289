"""Issue #14's server figures: the real server (`benchmarks/serve_shape.py`: create_app under uvicorn, random weights
of a model shape) in a child process, loaded over HTTP by N streaming clients per policy.

For each policy (full, skip:8, pairs): 1 streaming client, then N at once, each streaming `--new-tokens` tokens
(ignore_eos, greedy) from a token-id prompt of `--prompt-len` ids below the shape's vocabulary. Then the P8 mix: N
clients cycling full, skip:8, pairs, all at once; then the same mix churning (`churn xN`: each client asks 1/4 to
4/4 of the tokens and starts at a seeded random moment within half the mix's wall time, so rows join and leave all
through the run, as in service). Per run: aggregate tok/s (all clients' tokens / wall time from the first request
to the last token, prefill included), TPOT p50 and TTFT p50 over the clients.

P4 = aggregate tok/s with N clients / with 1 client, same policy (issue #14 asks >= 5 on a GPU).
P8 = aggregate tok/s of the mix / of N x full.
Captured steps: the server's `painters:decode_graphs` counters read from /metrics before and after each timed run
give the captures, replays and hit rate of that run alone (rows joining and leaving as clients start and finish),
and the graphs kept and the device memory they pin after it; empty where the server captures nothing (the CPU).

Each run is first done once untimed (warm-up: CUDA graphs are captured per batch layout on first sight). The whole
benchmark stops itself within `--budget-s` seconds, server start included, and writes what it has measured so far to
`--json` after every run.

    python benchmarks/bench_gpu_http.py --shape smollm2-135m --device cpu --clients 4 --new-tokens 8 --json /tmp/h.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path += [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

from bench_server import StreamStats, free_port, pct  # noqa: E402

POLICIES = ("full", "skip:8", "pairs")
_clients = itertools.count(0, 1000)  # each load's clients get prompts no earlier load sent


@dataclass
class Run:
    """One load run: `clients` streams at once, each a policy of `policies` (cycled)."""

    label: str
    clients: int
    tok_s: float
    wall_s: float
    tokens: int
    ttft_p50_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    per_policy: dict[str, dict[str, float]] = field(default_factory=dict)  # mixed runs: TPOT/TTFT p50 per policy
    graphs: dict[str, float] = field(default_factory=dict)  # captured steps in the timed run (`timed_graphs`)


@dataclass
class Report:
    shape: str
    clients: int
    new_tokens: int
    prompt_len: int
    server: dict[str, Any] = field(default_factory=dict)  # what serve_shape built, and its start-up seconds
    runs: dict[str, Run] = field(default_factory=dict)
    P4: dict[str, float] = field(default_factory=dict)
    P8: float | None = None
    complete: bool = False
    stopped: str | None = None  # why it stopped early (budget, an error)

    def save(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(self), indent=1))


def prompt_ids(n: int, vocab: int, client: int) -> list[int]:
    """A distinct token-id prompt per client and run (no prefix for the server to reuse), every id inside the model's
    vocabulary (the tokenizer's may be larger)."""
    return [(1009 * client + 31 * i + client * i) % (vocab - 10) + 10 for i in range(n)]


async def one_stream(client: httpx.AsyncClient, *, model: str, prompt: list[int], policy: str,
                     tokens: int) -> StreamStats:
    """One streamed completion; a stamp per chunk that carries a choice (one per engine step, text or not), the
    token count from the final usage frame."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "policy": policy}
    t0 = time.perf_counter()
    stamps: list[float] = []
    got = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("choices"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                got = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if got != tokens:
        raise RuntimeError(f"asked {tokens} tokens, got {got} (policy {policy})")
    ttft = stamps[0] - t0 if stamps else end - t0
    tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 and len(stamps) > 1 else 0.0
    return StreamStats(policy, ttft, tpot, end - t0, got)


async def load(url: str, *, model: str, policies: list[str], tokens: int | list[int], prompt_len: int, vocab: int,
               first_client: int, delays: list[float] | None = None) -> tuple[float, list[StreamStats]]:
    """All `policies` (one client each, numbered from `first_client`), each asking `tokens` (one count for all, or
    one per client) and starting after its delay in seconds (none: all at once); (wall seconds, their stats)."""
    counts = tokens if isinstance(tokens, list) else [tokens] * len(policies)
    waits = delays or [0.0] * len(policies)
    limits = httpx.Limits(max_connections=len(policies) + 8, max_keepalive_connections=len(policies) + 8)

    async def client_(client: httpx.AsyncClient, i: int, policy: str) -> StreamStats:
        await asyncio.sleep(waits[i])
        return await one_stream(client, model=model, prompt=prompt_ids(prompt_len, vocab, first_client + i),
                                policy=policy, tokens=counts[i])

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=30), limits=limits) as client:
        t = time.perf_counter()
        stats = await asyncio.gather(*(client_(client, i, p) for i, p in enumerate(policies)))
        return time.perf_counter() - t, list(stats)


async def graph_stats(url: str) -> dict[str, float]:
    """The server's captured-step counters from its /metrics (`decode_graph_counters`)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.get("/metrics")
    r.raise_for_status()
    return decode_graph_counters(r.text)


def decode_graph_counters(exposition: str) -> dict[str, float]:
    """`painters:decode_graphs` by stat out of a Prometheus exposition; {} where the server captures no steps."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels["stat"]: sample.value for family in text_string_to_metric_families(exposition)
            if family.name == "painters:decode_graphs" for sample in family.samples}


def timed_graphs(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the counters say of the steps between two reads: captures, replays, evictions, failures and seconds
    capturing there, the hit rate (replays / decode steps) there; graphs kept, MB they own and MB pinned after."""
    if not after:
        return {}
    got = {k: after[k] - before.get(k, 0.0) for k in ("captures", "replays", "evictions", "failures", "capture_s")
           if k in after}
    steps = got.get("captures", 0.0) + got.get("replays", 0.0)
    got["hit_rate"] = got.get("replays", 0.0) / steps if steps else 0.0
    got["graphs"] = after.get("graphs", 0.0)
    got["pinned_mb"] = round(after.get("pinned_bytes", 0.0) / 2**20, 1)
    if "kept_bytes" in after:
        got["kept_mb"] = round(after["kept_bytes"] / 2**20, 1)
    return got


def summarize(label: str, wall: float, stats: list[StreamStats]) -> Run:
    tokens = sum(s.tokens for s in stats)
    run = Run(label=label, clients=len(stats), tok_s=tokens / wall, wall_s=wall, tokens=tokens,
              ttft_p50_s=statistics.median(s.ttft_s for s in stats),
              tpot_p50_s=statistics.median(s.tpot_s for s in stats), tpot_p99_s=pct([s.tpot_s for s in stats], 0.99))
    if len({s.policy for s in stats}) > 1:
        for p in dict.fromkeys(s.policy for s in stats):
            rows = [s for s in stats if s.policy == p]
            run.per_policy[p] = {"clients": len(rows), "tpot_p50_s": statistics.median(s.tpot_s for s in rows),
                                 "ttft_p50_s": statistics.median(s.ttft_s for s in rows)}
    return run


def start_server(args: argparse.Namespace, port: int, info: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_shape.py"), "--shape", args.shape, "--tokenizer",
           str(args.tokenizer), "--port", str(port), "--host", "127.0.0.1", "--max-num-seqs", str(args.clients),
           "--max-model-len", str(args.prompt_len + args.new_tokens + 16), "--info-json", str(info),
           "--log-level", "warning"]
    for flag in ("device", "dtype", "threads"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.no_cuda_graphs:
        cmd.append("--no-cuda-graphs")
    if args.attention:
        cmd += ["--attention", args.attention]
    if args.fuse_decode:
        cmd.append("--fuse-decode")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {tail(log)}")
        try:
            r = httpx.get(f"{url}/ready", timeout=2)
            if r.status_code == 200:
                return
            if r.json().get("status", "").startswith("failed"):
                raise RuntimeError(f"server failed to load: {r.json()['status']}")
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"budget: server not ready in time; its log ends:\n{tail(log)}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: the server drains (nothing is running by now) and exits
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def plan(clients: int, policies: list[str]) -> list[tuple[str, list[str]]]:
    """The runs in order: per policy 1 client then N; then the mix, all at once and then churning (`churn`)."""
    runs = []
    for p in policies:
        runs += [(f"{p} x1", [p]), (f"{p} x{clients}", [p] * clients)]
    if len(policies) > 1:
        mix = [policies[i % len(policies)] for i in range(clients)]
        runs += [(f"mix x{clients}", mix), (f"churn x{clients}", mix)]
    return runs


def churn(clients: int, new_tokens: int, spread_s: float) -> tuple[list[int], list[float]]:
    """A churning mix: client i asks 1/4 to 4/4 of `new_tokens` (by i mod 4) and starts at a seeded random moment
    within `spread_s`, so rows join and leave the batch all through the run (what captured steps meet in service)."""
    rng = random.Random(clients)
    return ([max(2, new_tokens * (1 + i % 4) // 4) for i in range(clients)],
            sorted(rng.uniform(0, spread_s) for _ in range(clients)))


def bench(args: argparse.Namespace) -> Report:
    t_start = time.monotonic()
    deadline = t_start + args.budget_s - 10  # leaves time to stop the server and write
    report = Report(shape=args.shape, clients=args.clients, new_tokens=args.new_tokens, prompt_len=args.prompt_len)
    port = args.port or free_port()
    info_path = Path(tempfile.gettempdir()) / f"serve-{args.shape}-{port}.info.json"
    log = args.server_log or Path(tempfile.gettempdir()) / f"serve-{args.shape}-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    info_path.unlink(missing_ok=True)
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port, info_path, log)
    try:
        wait_ready(proc, url, log, deadline)
        report.server = {**json.loads(info_path.read_text()), "ready_s": round(time.monotonic() - t_start, 2)}
        report.save(args.json)
        vocab = report.server["vocab_size"]
        for label, policies in plan(args.clients, args.policies):
            left = deadline - time.monotonic()
            if left <= 0:
                report.stopped = f"budget: stopped before {label}"
                break
            try:
                mix = report.runs.get(f"mix x{args.clients}")  # churn spreads its starts over half the mix's run
                run = asyncio.run(asyncio.wait_for(
                    measure(url, args, policies, vocab, label, spread_s=mix.wall_s / 2 if mix else 1.0),
                    timeout=left))
            except (TimeoutError, asyncio.TimeoutError):
                report.stopped = f"budget: {label} did not finish"
                break
            report.runs[label] = run
            print(f"  {label:>16}: {run.tok_s:8.1f} tok/s  TPOT p50 {run.tpot_p50_s * 1e3:6.1f} ms  "
                  f"TTFT p50 {run.ttft_p50_s * 1e3:7.1f} ms", flush=True)
            ratios(report, args)
            report.save(args.json)
        else:
            report.complete = True
    except Exception as e:  # an HTTP error or a dead server: keep what was measured
        report.stopped = f"{type(e).__name__}: {e}"
        if proc.poll() is not None:
            report.stopped += f"\n{tail(log)}"
    finally:
        stop_server(proc)
        report.save(args.json)
    return report


async def measure(url: str, args: argparse.Namespace, policies: list[str], vocab: int, label: str,
                  spread_s: float = 0.0) -> Run:
    """One run (after an untimed one of the same shape): a `churn` run spreads its clients' starts over `spread_s`
    seconds and their lengths over 1/4 to 4/4 of --new-tokens."""
    kw = dict(model=args.shape, policies=policies, tokens=args.new_tokens, prompt_len=args.prompt_len, vocab=vocab)
    if label.startswith("churn"):
        kw["tokens"], kw["delays"] = churn(len(policies), args.new_tokens, spread_s)
    if not args.no_warmup:
        await load(url, **kw, first_client=next(_clients))
    before = await graph_stats(url)
    wall, stats = await load(url, **kw, first_client=next(_clients))
    run = summarize(label, wall, stats)
    run.graphs = timed_graphs(before, await graph_stats(url))
    return run


def ratios(report: Report, args: argparse.Namespace) -> None:
    n = args.clients
    for p in args.policies:
        one, many = report.runs.get(f"{p} x1"), report.runs.get(f"{p} x{n}")
        if one and many:
            report.P4[p] = many.tok_s / one.tok_s
    mix, full = report.runs.get(f"mix x{n}"), report.runs.get(f"full x{n}")
    if mix and full:
        report.P8 = mix.tok_s / full.tok_s


def render(report: Report) -> Any:
    from rich.table import Table

    s = report.server
    t = Table(title=f"Painters over HTTP: {report.shape} (random weights) on {s.get('gpu') or s.get('device')}, "
                    f"{s.get('dtype')}, {report.new_tokens} new tokens, prompts of {report.prompt_len} ids")
    for col in ("run", "clients", "tok/s", "TPOT p50", "TPOT p99", "TTFT p50", "P4", "captures / hit rate / MB"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for label, run in report.runs.items():
        policy = label.split(" x")[0]
        p4 = report.P4.get(policy) if label.endswith(f"x{report.clients}") else None
        g = run.graphs
        t.add_row(label, str(run.clients), f"{run.tok_s:.1f}", f"{run.tpot_p50_s * 1e3:.1f} ms",
                  f"{run.tpot_p99_s * 1e3:.1f} ms", f"{run.ttft_p50_s * 1e3:.1f} ms",
                  f"{p4:.2f}" if p4 else ("" if policy != "mix" or report.P8 is None else f"P8 {report.P8:.2f}"),
                  f"{g['captures']:.0f} / {g['hit_rate']:.3f} / {g['pinned_mb']:.0f}" if g else "")
        for p, row in run.per_policy.items():
            t.add_row(f"  in mix: {p}", str(int(row["clients"])), "", f"{row['tpot_p50_s'] * 1e3:.1f} ms", "",
                      f"{row['ttft_p50_s'] * 1e3:.1f} ms", "", "")
    t.caption = (f"P4 = tok/s with {report.clients} clients / 1 client (target >= 5)  |  P8 = mix / all-full  |  "
                 f"captures / hit rate: in the timed run; MB: device memory the graphs pin  |  "
                 f"attention {s.get('attention')}, fused layer math {s.get('fuse_decode')}, "
                 f"overlapped decode {s.get('overlap_decode')}  |  "
                 f"server ready in {s.get('ready_s')} s (model built in {s.get('init_s')} s)"
                 + ("" if report.complete else f"  |  INCOMPLETE: {report.stopped}"))
    return t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", help="smollm2-135m, llama-2-7b (serve_shape.py's shapes)")
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".gpu" / "tokenizer")
    p.add_argument("--device", default=None, help="default: cuda when present")
    p.add_argument("--dtype", default=None, help="auto, bfloat16, float16, float32")
    p.add_argument("--threads", type=int, default=None, help="the server's torch CPU threads")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--policies", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=list(POLICIES), help="comma-separated; the mix cycles them")
    p.add_argument("--budget-s", type=float, default=150, help="stop within this many seconds, start-up included")
    p.add_argument("--no-warmup", action="store_true", help="time each run's first pass")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--attention", choices=["auto", "gathered", "in_place", "triton"], default=None,
                   help="the server's decode attention (default: its own, auto)")
    p.add_argument("--fuse-decode", action="store_true", help="the server's captured steps run fused layer math")
    p.add_argument("--port", type=int, default=0, help="default: a free one")
    p.add_argument("--json", type=Path, default=None, help="write the report here (after every run)")
    p.add_argument("--server-log", type=Path, default=None, help="the server's output (default: a file in /tmp)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.new_tokens < 2 or args.prompt_len < 1:
        p.error("--clients >= 1, --new-tokens >= 2, --prompt-len >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    # `timeout` sends SIGTERM: unwind through bench()'s finally, which stops the server and writes the report
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = bench(args)
    Console(width=140).print(render(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
