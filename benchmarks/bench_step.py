"""Host time per decode step outside the forward: everything the engine loop does between two decode forwards
(scheduling, sampling, stop checks, detokenization, emitting, metrics), at 1 and 16 rows, on the real SmolLM2.

It times the gaps between consecutive `Executor.forward` calls of steady decode steps (every row running, nobody
admitted), so it measures the same thing whatever the loop's internals are called. Wall time ("wall") counts waits
for a busy CPU too; the engine thread's CPU time ("cpu", `time.thread_time`) does not, so it is the figure to compare
on a shared machine:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_step.py

A second table times admission under churn (`--admit`): 16 rows decode while 8- to 12-token requests keep arriving.
Each gap runs from the read of a prefill's results to the start of the next forward (the decode step the new rows
join), or is 0 where that step was queued before the read. On a GPU the device idles through that gap: the read
waited for the device to finish the prefill, and nothing is queued behind it until the host has turned the first
tokens into text, emitted them and built the next step. Measured with the engine decoding step by step and
overlapped (as on CUDA, where the prefill is read after the next step is queued).
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
from server.engine.generate import Engine, Launched  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from server.engine.request import Request  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402

PROMPT = "The history of the Roman Empire is a long story of conquest, politics and culture. In this essay"
KINDS = {  # what each row asks: an OpenAI request without `logprobs`; one with logprobs=0 (or any TGI request); one
    # that samples and asks for two alternatives
    "greedy": dict(temperature=0.0, logprobs=None),
    "greedy+lp": dict(temperature=0.0, logprobs=0),
    "sampled": dict(temperature=0.8, top_p=0.9, top_k=50, logprobs=2),
    # the logit processors besides: penalties (counts over prompt and output each step), a bias, min_p
    "processed": dict(temperature=0.8, top_p=0.9, top_k=50, logprobs=2, presence_penalty=0.5, frequency_penalty=0.5,
                      repetition_penalty=1.2, min_p=0.05, logit_bias=((13, -5.0),)),
}


def gaps(engine: Engine, rows: int, kind: str, new_tokens: int) -> tuple[list[float], list[float]]:
    """Wall and engine-thread CPU seconds between the end of one decode forward and the start of the next, over the
    steady part of the run."""
    prompt = engine.encode(PROMPT)
    requests = [Request(f"r{i}", prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True, seed=i, **KINDS[kind]),
                        engine.compile("full")) for i in range(rows)]
    spans = _forwards(engine, requests, rows=rows)
    decode = [s for s in spans if s[4] == 1]  # single-token forwards: decode steps
    steady = decode[len(decode) // 4 : -2]  # past warm-up, before the last rows finish
    pairs = list(zip(steady, steady[1:]))
    return [nxt[0] - prev[1] for prev, nxt in pairs], [nxt[2] - prev[3] for prev, nxt in pairs]


def admission_gaps(engine: Engine, rows: int, requests: int, new_tokens: int) -> tuple[list[float], list[float]]:
    """Wall and engine-thread CPU seconds from the read of each prefill's results to the start of the next forward
    (the decode step its rows join), 0 where that step was queued before the read; with `rows` running and
    `requests` greedy requests of `new_tokens` to `new_tokens` + 4 tokens queued (each ending request admits the
    next)."""
    queued = [Request(f"r{i}", engine.encode(f"{i}. {PROMPT}"),  # distinct, so the prefix cache computes them all
                      SamplingParams(max_tokens=new_tokens + i % 5, ignore_eos=True),  # staggered ends
                      engine.compile("full")) for i in range(requests)]
    reads: list[tuple[float, float, float, float, int]] = []  # as `_forwards`' spans, for each prefill's read
    real = Launched.result

    def timed(self):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = real(self)
        if self.inp.tokens.shape[1] > 1:
            reads.append((t0, time.perf_counter(), c0, time.thread_time(), self.inp.tokens.shape[1]))
        return out

    Launched.result = timed
    try:
        spans = _forwards(engine, queued, rows=rows)
    finally:
        Launched.result = real
    prefills = [s for s in spans if s[4] > 1]
    assert len(prefills) == len(reads)
    wall, cpu = [], []
    for prefill, read in list(zip(prefills, reads))[rows // 4 :]:  # past the first waves
        nxt = next((s for s in spans if s[0] >= prefill[1]), None)  # the forward queued after the prefill's
        if nxt is not None:
            wall.append(max(0.0, nxt[0] - read[1]))
            cpu.append(max(0.0, nxt[2] - read[3]))
    return wall, cpu


def _forwards(engine: Engine, requests: list[Request], *, rows: int) -> list[tuple[float, float, float, float, int]]:
    """Serve `requests` through the engine loop (at most `rows` at once); every `Executor.forward` as (wall start,
    wall end, thread CPU start, thread CPU end, tokens per row)."""
    spans: list[tuple[float, float, float, float, int]] = []
    real = Executor.forward

    def timed(self, tokens, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = real(self, tokens, *args, **kwargs)
        spans.append((t0, time.perf_counter(), c0, time.thread_time(), tokens.shape[1]))
        return out

    Executor.forward = timed
    loop = EngineLoop(engine, max_num_seqs=rows, max_model_len=512, queue_capacity=len(requests),
                      kv_budget_tokens=rows * 512 * 30)
    done = threading.Event()
    left = [len(requests)]

    def sink(out) -> None:
        if out.finished:
            left[0] -= 1
            if not left[0]:
                done.set()

    try:
        loop.start()
        for r in requests:
            loop.submit(r, sink)
        assert done.wait(600), "the run did not finish"
    finally:
        loop.stop()
        Executor.forward = real
    return spans


def _row(label: str, wall: list[float], cpu: list[float]) -> str:
    wall, cpu = sorted(x * 1e3 for x in wall), sorted(x * 1e3 for x in cpu)
    return (f"{label} {statistics.median(wall):9.3f} {wall[int(0.9 * (len(wall) - 1))]:9.3f} "
            f"{statistics.median(cpu):9.3f} {statistics.fmean(cpu):9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--admit", action="store_true", help="time admission under churn instead")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_model(args.model)
    threads = torch.get_num_threads()
    if args.admit:
        print(f"host ms from a prefill's read to the next forward ({args.model}, {threads} threads; "
              "16 rows, 8- to 12-token requests arriving)")
        print(f"{'decoding':>10} {'wall p50':>9} {'wall p90':>9} {'cpu p50':>9} {'cpu mean':>9}")
        for overlap in (False, True):
            engine = Engine.from_loaded(loaded, overlap=overlap)
            wall, cpu = admission_gaps(engine, 16, 160, 8)
            print(_row(f"{'overlapped' if overlap else 'stepwise':>10}", wall, cpu))
        return
    engine = Engine.from_loaded(loaded)
    print(f"host ms per decode step outside the forward ({args.model}, {threads} threads)")
    print(f"{'rows':>5} {'sampling':>9} {'wall p50':>9} {'wall p90':>9} {'cpu p50':>9} {'cpu mean':>9}")
    for rows in (1, 16):
        for kind in KINDS:
            print(_row(f"{rows:>5} {kind:>9}", *gaps(engine, rows, kind, args.new_tokens)))


if __name__ == "__main__":
    main()
