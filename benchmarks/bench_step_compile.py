"""Does compiling the *whole* decode step pay on the CPU? The padded step of `server.engine.graphs` (what a captured
step replays on CUDA: one layout's step over its static buffers) through torch.compile (Inductor's C++), against the
same step eagerly, on the embedded SmolLM2-135M in float32: ms per step (the forward alone, re-run on the same
buffers; eager, compiled, eager again, compiled again), the compile's seconds, and whether the logits agree.

    .venv/bin/python benchmarks/bench_step_compile.py --rows 1 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.engine.generate import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.model.loader import load_model  # noqa: E402


def ms(fn: Callable[[], object], repeats: int = 15) -> float:
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = Engine.from_loaded(load_model("smollm2-135m", device=torch.device("cpu")))
    engine = Engine(base.model, base.tokenizer, eos_ids=base.eos_ids, attention="gathered", graphs=True)
    policy = engine.compile("full")
    batch = engine.new_batch(max_len=256, num_blocks=a.rows * 16 * policy.num_slots + 1)
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    batch.add([engine.new_sequence(list(range(10 + i, 40 + i)), params, policy) for i in range(a.rows)])
    for _ in range(3):
        batch.step()  # the layout exists; its step is re-run below on the same buffers (a decode step is idempotent)
    step = batch.executor.graphs.latest()
    with torch.inference_mode():
        want = step().clone()
        eager = ms(step)
        t = time.perf_counter()
        compiled = torch.compile(step)
        got = compiled().clone()
        compile_s = time.perf_counter() - t
        first, again, second = ms(compiled), ms(step), ms(compiled)
    print(f"rows {a.rows}, {torch.get_num_threads()} threads: eager {eager:.2f} / {again:.2f} ms, compiled "
          f"{first:.2f} / {second:.2f} ms, compile {compile_s:.1f} s, same top-1 "
          f"{torch.equal(got.argmax(-1), want.argmax(-1))}, largest logit difference "
          f"{(got - want).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
