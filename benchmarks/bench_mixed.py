"""Mixed-policy batching in the engine, without HTTP (runs on a bare GPU machine too): aggregate decode tok/s of 12
sequences (4 x full, 4 x skip:8, 4 x pairs) decoded together in one batch, against 12 x full; and, for comparison,
the same mix run one policy group after another (what groups taking turns cost). Random weights: speed depends on
shapes, not trained values.

    python benchmarks/bench_mixed.py --device cuda --model llama-2-7b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.engine.bench import _IdTokenizer, random_model, warmed_batch  # noqa: E402
from server.engine.generate import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402

MIX = ["full"] * 4 + ["skip:8"] * 4 + ["pairs"] * 4


def tok_s(engine: Engine, policies: list[str], new_tokens: int, device: torch.device) -> float:
    prompts = [list(range(10 + i, 34 + i)) for i in range(len(policies))]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    batch = warmed_batch(engine, prompts, policies, new_tokens)  # on CUDA: every capture before the clock
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    results = engine.generate(prompts, policy=policies, params=params, batch=batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(len(r.token_ids) for r in results) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--group-mode", default="batched", choices=["batched", "streams"])
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    engine = Engine.from_hf(random_model(a.model, device=dev, dtype=dtype), _IdTokenizer(), device=dev, dtype=dtype,
                            group_mode=a.group_mode)
    full = tok_s(engine, ["full"] * 12, a.new_tokens, dev)
    mixed = tok_s(engine, MIX, a.new_tokens, dev)
    groups = [tok_s(engine, [p] * 4, a.new_tokens, dev) for p in ("full", "skip:8", "pairs")]
    turns = 12 / sum(4 / g for g in groups)  # the three groups one after another
    out = {"model": a.model, "device": str(dev), "dtype": str(dtype), "group_mode": a.group_mode,
           "full12_tok_s": full, "mixed_tok_s": mixed, "P8": mixed / full, "groups_in_turn_tok_s": turns,
           "mixed_vs_turns": mixed / turns}
    print(f"{a.model} on {dev} ({dtype}, {a.group_mode}): 12 x full {full:.1f} tok/s, mixed {mixed:.1f} tok/s, "
          f"P8 = {mixed / full:.2f}; groups in turn {turns:.1f} tok/s (mixed / turns = {mixed / turns:.2f})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
