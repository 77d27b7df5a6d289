"""What chunked prefill buys the requests already decoding when a long prompt arrives, on the real SmolLM2.

Eight streams decode; once each has its first tokens, a request with a long prompt (`--prompt-tokens`) arrives. With
whole prompts every stream waits for all of that prefill between two of its tokens; with a budget of k prompt tokens
per step (`--chunked-prefill-size`, `Batch.add`) it waits for at most a k-token piece. For each budget it prints the
streams' inter-token gaps while the long prompt is prefilled (p50 and max), the long request's time to first token,
and the whole run's wall time. Same engine, budgets one after the other:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_chunked_prefill.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.engine.generate import Engine  # noqa: E402
from server.engine.loop import EngineLoop  # noqa: E402
from server.engine.request import Output, Request  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.model.loader import load_model  # noqa: E402

STREAM = "The history of the Roman Empire is a long story of conquest, politics and culture. In this essay"
LONG = ("Rome began as a small settlement on the Tiber and grew, over centuries of war and diplomacy, into an empire "
        "that ruled the Mediterranean world. ")


def run(engine: Engine, budget: int | None, *, streams: int, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Serve the streams and the long request with `budget` prompt tokens per step; the figures of one run."""
    long_ids = (engine.encode(LONG) * (prompt_tokens // 20 + 1))[:prompt_tokens]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    rows = [Request(f"s{i}", engine.encode(STREAM), params, engine.compile("full")) for i in range(streams)]
    long = Request("long", long_ids, SamplingParams(max_tokens=4, ignore_eos=True), engine.compile("full"))
    loop = EngineLoop(engine, max_num_seqs=streams + 1, max_model_len=prompt_tokens + 64,
                      queue_capacity=streams + 1, kv_budget_tokens=(streams + 1) * (prompt_tokens + 64) * 30,
                      prefill_tokens=budget)
    arrivals: dict[str, list[float]] = {r.id: [] for r in [*rows, long]}
    done = threading.Event()
    finished: set[str] = set()

    def sink(out: Output) -> None:
        if out.token_ids:
            arrivals[out.request_id].append(time.perf_counter())
        if out.finished:
            finished.add(out.request_id)
            if len(finished) == streams + 1:
                done.set()

    began = time.perf_counter()
    try:
        loop.start()
        loop.submit_all([(r, sink) for r in rows])
        while min(len(arrivals[r.id]) for r in rows) < 3:  # every stream decoding
            time.sleep(0.005)
        long.arrival = submitted = time.perf_counter()
        loop.submit(long, sink)
        assert done.wait(1800), "the run did not finish"
    finally:
        loop.stop()
    first = arrivals["long"][0]
    gaps = [b - a for r in rows for a, b in zip(arrivals[r.id], arrivals[r.id][1:]) if b > submitted and a < first]
    return {"gap_p50": statistics.median(gaps), "gap_max": max(gaps), "ttft": first - submitted,
            "wall": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1800)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--budgets", default="0,1024,512,256", help="prompt tokens per step; 0: whole prompts")
    args = parser.parse_args()
    engine = Engine.from_loaded(load_model(args.model))
    print(f"{args.streams} streams decoding, then a {args.prompt_tokens}-token prompt ({args.model}, "
          f"{torch.get_num_threads()} threads); seconds")
    print(f"{'budget':>7} {'gap p50':>8} {'gap max':>8} {'long TTFT':>10} {'wall':>7}")
    for budget in (int(b) for b in args.budgets.split(",")):
        r = run(engine, budget or None, streams=args.streams, prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens)
        print(f"{budget or 'whole':>7} {r['gap_p50']:8.3f} {r['gap_max']:8.3f} {r['ttft']:10.2f} {r['wall']:7.2f}")


if __name__ == "__main__":
    main()
