"""What priority scheduling buys urgent requests behind a backlog, on the real SmolLM2 (`--scheduling-policy`).

A burst fills the queue: `--batch` requests of a low priority (10), served `--rows` at a time; once the first rows
run, `--urgent` requests of priority 0 arrive. Under first come, first served they wait for the whole backlog before
them; under "priority" they are admitted as the next rows free (a running request is never preempted). It prints each class's queue time
(arrival to admission) and end-to-end time, p50 and max, under both policies, and the urgent class's ratio of
priority to fcfs. Same engine, same requests, one run after the other:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_priority.py
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
from server.engine.request import Request  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.model.loader import load_model  # noqa: E402

PROMPT = "The history of the Roman Empire is a long story of conquest, politics and culture. In this essay"


def run(engine: Engine, policy: str, *, batch: int, urgent: int, rows: int,
        new_tokens: int) -> dict[str, list[tuple[float, float, float]]]:
    """Serve the burst under `policy`; per class, each request's (queue seconds, end-to-end seconds, when it was
    admitted: time.perf_counter())."""
    prompt = engine.encode(PROMPT)
    classes = ["batch"] * batch + ["urgent"] * urgent
    requests = [Request(f"{c}{i}", prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0),
                        engine.compile("full"), priority=(10 if c == "batch" else 0) if policy == "priority" else 0)
                for i, c in enumerate(classes)]
    loop = EngineLoop(engine, max_num_seqs=rows, max_model_len=512, queue_capacity=len(requests),
                      kv_budget_tokens=rows * 512 * 30, scheduling_policy=policy)
    ended: dict[str, float] = {}
    done = threading.Event()

    def sink(out) -> None:
        if out.finished:
            ended[out.request_id] = time.perf_counter()
            if len(ended) == len(requests):
                done.set()

    try:
        loop.start()
        loop.submit_all([(r, sink) for r in requests[:batch]])
        while loop.num_running < min(rows, batch):  # the backlog is being served when the urgent ones come
            time.sleep(0.01)
        for r in requests[batch:]:
            r.arrival = time.perf_counter()
        loop.submit_all([(r, sink) for r in requests[batch:]])
        assert done.wait(1200), "the run did not finish"
    finally:
        loop.stop()
    out: dict[str, list[tuple[float, float, float]]] = {"batch": [], "urgent": []}
    for r, c in zip(requests, classes):
        out[c].append((r.timings.queue_s, ended[r.id] - r.arrival, r.scheduled))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=24, help="low-priority requests, queued first")
    parser.add_argument("--urgent", type=int, default=4, help="priority-0 requests, queued after them")
    parser.add_argument("--rows", type=int, default=4, help="max_num_seqs")
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    engine = Engine.from_loaded(load_model(args.model))
    print(f"{args.batch} batch requests (priority 10), then, once {args.rows} rows run, {args.urgent} urgent ones "
          f"(priority 0); {args.new_tokens} tokens each ({args.model}, {torch.get_num_threads()} threads); seconds")
    print(f"{'policy':>9} {'class':>7} {'queue p50':>10} {'queue max':>10} {'e2e p50':>9} {'e2e max':>9}")
    urgent_e2e = {}
    for policy in ("fcfs", "priority"):
        got = run(engine, policy, batch=args.batch, urgent=args.urgent, rows=args.rows, new_tokens=args.new_tokens)
        for c, times in got.items():
            queue, e2e = [t[0] for t in times], [t[1] for t in times]
            print(f"{policy:>9} {c:>7} {statistics.median(queue):10.2f} {max(queue):10.2f} "
                  f"{statistics.median(e2e):9.2f} {max(e2e):9.2f}")
        urgent_e2e[policy] = statistics.median(t[1] for t in got["urgent"])
    print(f"urgent e2e p50, priority / fcfs: {urgent_e2e['priority'] / urgent_e2e['fcfs']:.2f}")


if __name__ == "__main__":
    main()
