"""Does torch.compile of the decode step pay on the CPU? Decode ms per step and tok/s at 1 and 16 rows (`full`,
greedy), eager against the layer units (`Transformer.attention`, `Transformer.mlp`) compiled with torch.compile, and
the compile time (the first compiled run minus a warm one). The executor's step itself stays Python (it reserves KV
blocks and picks a program per layout); what compiles is the math inside every layer application, where the per-op
overhead is.

    python benchmarks/bench_compile.py                            # the embedded SmolLM2-135M, float32
    python benchmarks/bench_compile.py --random-weights --new-tokens 8   # no weights needed (a quick check)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.engine.bench import _IdTokenizer, random_model  # noqa: E402
from server.engine.generate import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402


def decode_ms(engine: Engine, rows: int, new_tokens: int) -> float:
    """Median over rows of decode seconds per step (prefill excluded), in ms."""
    prompts = [list(range(10 + i, 40 + i)) for i in range(rows)]
    results = engine.generate(prompts, policy="full", params=SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    per_step = sorted(r.timings.decode_s / max(1, len(r.timings.per_token_s)) for r in results)
    return per_step[len(per_step) // 2] * 1e3


def compile_units(engine: Engine) -> None:
    """Replace the model's layer units by compiled ones (on this instance only)."""
    model = engine.model
    model.attention = torch.compile(model.attention, dynamic=None)
    model.mlp = torch.compile(model.mlp, dynamic=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rows", default="1,16")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.random_weights:
        engine = Engine.from_hf(random_model(a.model, device=torch.device("cpu"), dtype=torch.float32), _IdTokenizer(),
                                device="cpu", dtype=torch.float32)
    else:
        from server.model.loader import load_model

        engine = Engine.from_loaded(load_model(a.model, device=torch.device("cpu")), name=a.model)
    rows = [int(x) for x in a.rows.split(",")]
    eager = {}
    for r in rows:
        decode_ms(engine, r, a.new_tokens)
        eager[r] = decode_ms(engine, r, a.new_tokens)
    compile_units(engine)
    compiled, compile_s = {}, {}
    for r in rows:
        # the warm-up decodes as far as the timed run: the context crosses the same KV block boundaries (a longer
        # context once makes the compiled units' key length dynamic: one more compile)
        t = time.perf_counter()
        decode_ms(engine, r, a.new_tokens)
        first = time.perf_counter() - t
        t = time.perf_counter()
        compiled[r] = decode_ms(engine, r, a.new_tokens)
        compile_s[r] = first - (time.perf_counter() - t)
    print(f"{a.model} on cpu ({torch.get_num_threads()} threads, float32), decode ms per step, {a.new_tokens} tokens")
    print(f"{'rows':>4} {'eager ms':>9} {'compiled ms':>11} {'speed-up':>8} {'eager tok/s':>11} {'compiled tok/s':>14} "
          f"{'compile s':>9}")
    for r in rows:
        print(f"{r:>4} {eager[r]:>9.2f} {compiled[r]:>11.2f} {eager[r] / compiled[r]:>8.2f} {1e3 * r / eager[r]:>11.1f} "
              f"{1e3 * r / compiled[r]:>14.1f} {compile_s[r]:>9.1f}")
    print(json.dumps({"model": a.model, "threads": torch.get_num_threads(), "eager_ms": eager, "compiled_ms": compiled,
                      "compile_s": compile_s}))


if __name__ == "__main__":
    main()
