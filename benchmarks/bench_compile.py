"""Does torch.compile of the decode step's layer math pay on the CPU? Decode ms per step and tok/s at 1 and 16 rows
(`full`, greedy) for three engines over the same weights: eager (the CPU default), the padded step of
`server.engine.graphs` run eagerly (what a captured step replays on CUDA; on the CPU nothing is captured), and that
padded step with its layer math fused by torch.compile (`Transformer.fused`, `Engine(fuse=True)`; Inductor's C++
here), with the fused engine's compile time (its first run minus a warm one).

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

KINDS = {"eager": dict(graphs=False), "padded": dict(graphs=True), "fused": dict(graphs=True, fuse=True)}


def decode_ms(engine: Engine, rows: int, new_tokens: int) -> float:
    """Median over rows of decode seconds per step (prefill excluded), in ms."""
    prompts = [list(range(10 + i, 40 + i)) for i in range(rows)]
    results = engine.generate(prompts, policy="full", params=SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    per_step = sorted(r.timings.decode_s / max(1, len(r.timings.per_token_s)) for r in results)
    return per_step[len(per_step) // 2] * 1e3


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
        base = Engine.from_hf(random_model(a.model, device=torch.device("cpu"), dtype=torch.float32), _IdTokenizer(),
                              device="cpu", dtype=torch.float32)
    else:
        from server.model.loader import load_model

        base = Engine.from_loaded(load_model(a.model, device=torch.device("cpu")), name=a.model)
    rows = [int(x) for x in a.rows.split(",")]
    ms: dict[str, dict[int, float]] = {k: {} for k in KINDS}
    compile_s: dict[int, float] = {}
    for kind, options in KINDS.items():
        engine = Engine(base.model, base.tokenizer, eos_ids=base.eos_ids, attention="gathered", **options)
        for r in rows:
            # the warm-up decodes as far as the timed run: the context crosses the same KV block boundaries
            t = time.perf_counter()
            decode_ms(engine, r, a.new_tokens)
            first = time.perf_counter() - t
            t = time.perf_counter()
            ms[kind][r] = decode_ms(engine, r, a.new_tokens)
            if kind == "fused":
                compile_s[r] = first - (time.perf_counter() - t)
    print(f"{a.model} on cpu ({torch.get_num_threads()} threads, float32), decode ms per step, {a.new_tokens} tokens")
    print(f"{'rows':>4} {'eager ms':>9} {'padded ms':>9} {'fused ms':>9} {'eager/fused':>11} {'padded/fused':>12} "
          f"{'fused tok/s':>11} {'compile s':>9}")
    for r in rows:
        e, p, f = ms["eager"][r], ms["padded"][r], ms["fused"][r]
        print(f"{r:>4} {e:>9.2f} {p:>9.2f} {f:>9.2f} {e / f:>11.2f} {p / f:>12.2f} {1e3 * r / f:>11.1f} "
              f"{compile_s[r]:>9.1f}")
    print(json.dumps({"model": a.model, "threads": torch.get_num_threads(), "ms": ms, "compile_s": compile_s}))


if __name__ == "__main__":
    main()
