"""Host time per decode step outside the forward: everything the engine loop does between two decode forwards
(scheduling, sampling, stop checks, detokenization, emitting, metrics), at 1 and 16 rows, on the real SmolLM2.

It times the gaps between consecutive `Executor.forward` calls of steady decode steps (every row running, nobody
admitted), so it measures the same thing whatever the loop's internals are called. Wall time ("wall") counts waits
for a busy CPU too; the engine thread's CPU time ("cpu", `time.thread_time`) does not, so it is the figure to compare
on a shared machine:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_step.py
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
from server.engine.loop import EngineLoop  # noqa: E402
from server.engine.executor import Executor  # noqa: E402
from server.engine.generate import Engine  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from server.engine.request import Request  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402

PROMPT = "The history of the Roman Empire is a long story of conquest, politics and culture. In this essay"
KINDS = {  # what each row asks: an OpenAI request without `logprobs`; one with logprobs=0 (or any TGI request); one
    # that samples and asks for two alternatives
    "greedy": dict(temperature=0.0, logprobs=None),
    "greedy+lp": dict(temperature=0.0, logprobs=0),
    "sampled": dict(temperature=0.8, top_p=0.9, top_k=50, logprobs=2),
}


def gaps(engine: Engine, rows: int, kind: str, new_tokens: int) -> tuple[list[float], list[float]]:
    """Wall and engine-thread CPU seconds between the end of one decode forward and the start of the next, over the
    steady part of the run."""
    spans: list[tuple[float, float, float, float, int]] = []
    real = Executor.forward

    def timed(self, tokens, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = real(self, tokens, *args, **kwargs)
        spans.append((t0, time.perf_counter(), c0, time.thread_time(), tokens.shape[1]))
        return out

    Executor.forward = timed
    loop = EngineLoop(engine, max_num_seqs=rows, max_model_len=512, queue_capacity=64, kv_budget_tokens=rows * 512 * 30)
    done = threading.Event()
    left = [rows]

    def sink(out) -> None:
        if out.finished:
            left[0] -= 1
            if not left[0]:
                done.set()

    try:
        loop.start()
        prompt = engine.encode(PROMPT)
        schedule = engine.compile("full")
        for i in range(rows):
            params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, seed=i, **KINDS[kind])
            loop.submit(Request(f"r{i}", prompt, params, schedule), sink)
        assert done.wait(600), "the run did not finish"
    finally:
        loop.stop()
        Executor.forward = real
    decode = [s[:4] for s in spans if s[4] == 1]  # single-token forwards: decode steps
    steady = decode[len(decode) // 4 : -2]  # past warm-up, before the last rows finish
    pairs = list(zip(steady, steady[1:]))
    return [nxt[0] - prev[1] for prev, nxt in pairs], [nxt[2] - prev[3] for prev, nxt in pairs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_model(args.model)
    engine = Engine.from_loaded(loaded)
    print(f"host ms per decode step outside the forward ({args.model}, {torch.get_num_threads()} threads)")
    print(f"{'rows':>5} {'sampling':>9} {'wall p50':>9} {'wall p90':>9} {'cpu p50':>9} {'cpu mean':>9}")
    for rows in (1, 16):
        for kind in KINDS:
            wall, cpu = (sorted(x * 1e3 for x in xs) for xs in gaps(engine, rows, kind, args.new_tokens))
            print(f"{rows:>5} {kind:>9} {statistics.median(wall):9.3f} {wall[int(0.9 * (len(wall) - 1))]:9.3f} "
                  f"{statistics.median(cpu):9.3f} {statistics.fmean(cpu):9.3f}")


if __name__ == "__main__":
    main()
