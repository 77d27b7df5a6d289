"""One server against two Ray Serve replicas (same cores: 2 threads against 2 x 1), and Ray's default routing against
schedule affinity: start-up time, aggregate tok/s and TPOT of a three-policy mix at 16 concurrent clients (three
`painters loadtest` processes at once, one per policy), and `painters eval` of HellaSwag's wall time.

    python benchmarks/bench_ray.py --data /work/shared/data/hellaswag --limit 20 --out docs/results/ray-serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"
POLICIES = ("full", "skip:4", "pairs:10-20")
CLIENTS = (5, 5, 6)  # 16 concurrent clients over the three policies
PAINTERS = [sys.executable, "-m", "server.cli"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    url = f"http://{HOST}:{port}"
    t0 = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*PAINTERS, "serve", "--device", "cpu", "--host", HOST, "--port", str(port),
                             "--log-level", "warning", *args], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    while True:
        assert proc.poll() is None, f"server exited; see {log}"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < 600, "server not ready in 600 s"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def loadtest(url: str, *, requests: int, max_tokens: int) -> dict:
    """The three policies at once, one loadtest process each; aggregate tok/s over the longest one's wall time."""
    t0 = time.monotonic()
    procs = [subprocess.Popen([*PAINTERS, "loadtest", "--url", url, "-p", policy, "--concurrency", str(n),
                               "--requests", str(requests), "--max-tokens", str(max_tokens), "--warmup", "1",
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for policy, n in zip(POLICIES, CLIENTS)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.monotonic() - t0
    per_policy = {k: v for out in outs for k, v in out.items()}
    return {"wall_s": wall, "tokens": len(POLICIES) * requests * max_tokens, "per_policy": per_policy}


def evaluate(url: str, *, data: str, limit: int) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([*PAINTERS, "eval", "-t", "hellaswag", "--url", url, "--data", data, "--limit", str(limit),
                          "-p", ",".join(POLICIES), "--concurrency", "16", "--json"],
                         capture_output=True, text=True, check=True)
    return {"wall_s": time.monotonic() - t0, "scores": json.loads(out.stdout.strip().splitlines()[-1])}


def render(results: dict) -> str:
    """A markdown table of `results` (what main writes), with ratios against the first setup."""
    rows = ["| setup | start-up s | aggregate tok/s (16 clients) | TPOT ms full / skip / pairs (mean) | "
            "HellaSwag eval wall s |", "| --- | --- | --- | --- | --- |"]
    base = None
    for name, r in results.items():
        lt = r["loadtest"]
        rate = lt["tokens"] / lt["wall_s"]
        base = base or (rate, r["eval"]["wall_s"])
        tpot = " / ".join(f"{p['mean_tpot_ms']:.0f}" for p in lt["per_policy"].values())
        rows.append(f"| {name} | {r['startup_s']:.1f} | {rate:.2f} ({rate / base[0]:.2f}x) | {tpot} | "
                    f"{r['eval']['wall_s']:.1f} ({r['eval']['wall_s'] / base[1]:.2f}x) |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", type=Path, help="print the table of an earlier --out file and exit")
    ap.add_argument("--data")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--requests", type=int, default=10, help="measured requests per policy")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", help="comma-separated setup numbers to run (0-3), e.g. to rerun one")
    ap.add_argument("--logs", type=Path, default=Path("/tmp"))
    a = ap.parse_args()
    if a.render:
        print(render(json.loads(a.render.read_text())))
        return
    assert a.data and a.out, "--data and --out are required"
    setups = {"one server, 2 threads": ["--threads", "2"],
              "one server, 1 thread": ["--threads", "1"],
              "2 replicas x 1 thread, Ray default routing": ["--replicas", "2", "--ray-cpus", "2", "--threads", "1",
                                                           "--routing", "default"],
              "2 replicas x 1 thread, schedule affinity": ["--replicas", "2", "--ray-cpus", "2", "--threads", "1",
                                                         "--routing", "affinity"]}
    results = json.loads(a.out.read_text()) if a.only and a.out.exists() else {}
    for i, (name, args) in enumerate(setups.items()):
        if a.only and str(i) not in a.only.split(","):
            continue
        proc, url, startup = start(args, a.logs / f"bench_ray_{i}.log")
        try:
            results[name] = {"startup_s": startup,
                             "loadtest": loadtest(url, requests=a.requests, max_tokens=a.max_tokens),
                             "eval": evaluate(url, data=a.data, limit=a.limit)}
        finally:
            stop(proc)
        r = results[name]
        print(f"{name}: start {startup:.1f} s, {r['loadtest']['tokens'] / r['loadtest']['wall_s']:.1f} tok/s "
              f"aggregate, eval {r['eval']['wall_s']:.1f} s", flush=True)
        a.out.write_text(json.dumps(results, indent=1))
    print(render(results))


if __name__ == "__main__":
    main()
