"""Every figure of issue #14's GPU targets in one run, one table and one JSON (`docs/results/bench-gpu.json`).

For a GPU machine with torch, transformers and triton but no web stack: imports only the engine. Random weights of
the Llama-2-7B shape in bf16 (speed depends on shapes, not values). Each figure is measured in its own section with
its own time budget; a section that fails records its error and the others still run, and the JSON is rewritten after
every section, so a run cut short keeps what it measured.

    python benchmarks/bench_gpu.py                       # on the GPU machine (make bench-gpu runs it)
    python benchmarks/bench_gpu.py --smoke --out /tmp/x.json   # the same code path on the CPU, tiny shapes, seconds

Figures (peak bandwidth 4.8 TB/s, the H200's):
  full_bs1_bandwidth_fraction  weight bytes x tok/s / peak, `full`, batch 1
  skip8_speedup_over_ideal     (skip:8 tok/s / full tok/s) / ((L + h) / (L - 8 + h)), h = LM head in layers
  pairs_over_full              `pairs` tok/s / `full` tok/s, batch 1
  p8_mixed_over_full           12 rows (4 full + 4 skip:8 + 4 pairs) tok/s / 12 rows `full` tok/s
  bs64_bandwidth_fraction      64 rows `full` at ~512-token contexts: (weight + KV bytes per step) / step time / peak
  attn_4k_over_bound           decode attention, 16 rows x 4,096 tokens, in place: time / (KV bytes / peak)
and transformers' generate (static cache, compiled) at batch 1 and 64 beside ours.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_attention  # noqa: E402
from server.engine.bench import SHAPES, _IdTokenizer, _time_parts  # noqa: E402
from server.engine.generate import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402

log = logging.getLogger("bench_gpu")
PEAK_BYTES_S = 4.8e12
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
SECTIONS = ("batch1", "mixed", "bs64", "attention", "in_place", "transformers")
MIX = ["full"] * 4 + ["skip:8"] * 4 + ["pairs"] * 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_model(config: dict, *, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    return model.eval().requires_grad_(False)


def decode_tok_s(engine: Engine, policies: list[str], *, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """Aggregate decode tok/s of one batch (one prompt per policy) and its median decode step in seconds; prefill
    excluded (each row's decode time is its own, from the engine's timings)."""
    prompts = [[10 + (i + j) % 200 for j in range(prompt_len)] for i in range(len(policies))]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts, policy=policies, params=params)  # the same call: the same pool size (FlexAttention
    _sync(engine.model.device)                                 # compiles per pool size)
    results = engine.generate(prompts, policy=policies, params=params)
    _sync(engine.model.device)
    step = statistics.median(r.timings.decode_s / max(1, len(r.timings.per_token_s)) for r in results)
    return len(policies) / step, step


def hf_generate_tok_s(hf_model: Any, *, rows: int, prompt_len: int, new_tokens: int, compiled: bool) -> float:
    """transformers' own generate, static cache (compiled unless `compiled` is False), greedy: rows x new tokens /
    time of the whole call after a warm-up call (prefill included, as a user of generate sees it)."""
    ids = torch.tensor([[10 + (i + j) % 200 for j in range(prompt_len)] for i in range(rows)], device=hf_model.device)
    kwargs = dict(do_sample=False, pad_token_id=0, cache_implementation="static", disable_compile=not compiled)
    with torch.inference_mode():
        for n in (new_tokens, new_tokens):  # the first call compiles (same shapes as the timed one)
            _sync(hf_model.device)
            t = time.perf_counter()
            hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            _sync(hf_model.device)
    return rows * new_tokens / (time.perf_counter() - t)


class Run:
    """Sections, each timed and guarded; results and errors go to one dict written after every section."""

    def __init__(self, out: Path, base: dict) -> None:
        self.out, self.data = out, base

    def section(self, name: str, fn) -> None:  # noqa: ANN001
        t = time.perf_counter()
        try:
            self.data.update(fn())
        except Exception as e:  # noqa: BLE001 -- one failed figure must not lose the others
            log.error("section %s failed:\n%s", name, traceback.format_exc())
            self.data.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        self.data.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script runs end to end")
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/bench-gpu.json; --smoke needs one)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to leave out: {', '.join(SECTIONS)}")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.smoke and a.out is None:
        ap.error("--smoke needs --out: its CPU figures must not land in docs/results/bench-gpu.json")
    device = torch.device("cpu" if a.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; use --smoke to check the script on the CPU")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    shape, config = ("tiny", TINY) if a.smoke else ("llama-2-7b", SHAPES["llama-2-7b"])
    # sizes: (new tokens at batch 1, 64-row prompt length, 64-row new tokens, attention rows/context, hf tokens)
    n1, p64, n64, attn, hf_n = (4, 24, 4, (2, 64), 4) if a.smoke else (128, 480, 32, (16, 4096), 128)
    rows64 = 4 if a.smoke else 64
    out = Path(a.out or Path(__file__).resolve().parents[1] / "docs/results/bench-gpu.json")
    run = Run(out, {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "smoke": a.smoke,
        "peak_bytes_s": PEAK_BYTES_S,
    })
    hf = _hf_model(config, device=device, dtype=dtype)
    engine = Engine.from_hf(hf, _IdTokenizer(), device=device, dtype=dtype, name=shape)
    model = engine.model
    L = engine.num_layers
    weight_bytes = model.weight_bytes()
    layer_bytes = model.layers.nbytes() / L
    head_bytes = model.lm_head.numel() * model.lm_head.element_size()

    def batch1() -> dict:
        got = {}
        for policy in ("full", "skip:8", "pairs"):
            got[policy] = decode_tok_s(engine, [policy], prompt_len=24, new_tokens=n1)[0]
        layer_s, head_s = _time_parts(engine, list(range(10, 34)), n1, repeats=5 if a.smoke else 50)
        h = head_s / layer_s
        ideal = (L + h) / (L - 8 + h)
        return {"full_bs1_tok_s": got["full"], "skip8_bs1_tok_s": got["skip:8"], "pairs_bs1_tok_s": got["pairs"],
                "head_layers": h, "skip8_ideal": ideal,
                "full_bs1_bandwidth_fraction": weight_bytes * got["full"] / PEAK_BYTES_S,
                "skip8_speedup_over_ideal": got["skip:8"] / got["full"] / ideal,
                "pairs_over_full": got["pairs"] / got["full"],
                "skip8_bandwidth_fraction": ((L - 8) * layer_bytes + head_bytes) * got["skip:8"] / PEAK_BYTES_S}

    def mixed() -> dict:
        full = decode_tok_s(engine, ["full"] * 12, prompt_len=24, new_tokens=n1 // 2)[0]
        mix = decode_tok_s(engine, MIX, prompt_len=24, new_tokens=n1 // 2)[0]
        return {"full12_tok_s": full, "mixed12_tok_s": mix, "p8_mixed_over_full": mix / full}

    def bs64() -> dict:
        tok_s, step = decode_tok_s(engine, ["full"] * rows64, prompt_len=p64, new_tokens=n64)
        a_ = model.args
        context = p64 + n64 // 2  # the mean context over the timed decode
        kv_bytes = rows64 * context * L * 2 * a_.n_kv_heads * a_.head_dim * torch.finfo(dtype).bits // 8
        return {"bs64_rows": rows64, "bs64_context": context, "bs64_tok_s": tok_s, "bs64_step_ms": step * 1e3,
                "bs64_bandwidth_fraction": (weight_bytes + kv_bytes) / step / PEAK_BYTES_S}

    def attention() -> dict:
        r = bench_attention.run(device=device, shape="smollm2-135m" if a.smoke else "llama-2-7b", rows=(attn[0],),
                                contexts=(attn[1],), repeats=3 if a.smoke else 20)[0]
        bound_ms = r["kv_bytes"] / PEAK_BYTES_S * 1e3
        return {"attn_4k_in_place_ms": r["in_place_ms"], "attn_4k_gathered_ms": r["gathered_ms"],
                "attn_4k_bound_ms": bound_ms, "attn_4k_over_bound": r["in_place_ms"] / bound_ms,
                "attn_4k_gathered_over_bound": r["gathered_ms"] / bound_ms, "attn_4k_max_abs_err": r["max_abs_err"]}

    def in_place() -> dict:
        """The engine with decode attention reading the pool in place (server.engine.executor's attention='in_place')."""
        engine.attention = "in_place"
        try:
            full = decode_tok_s(engine, ["full"], prompt_len=24, new_tokens=n1)[0]
            many, step = decode_tok_s(engine, ["full"] * rows64, prompt_len=p64, new_tokens=n64)
            mix = decode_tok_s(engine, MIX, prompt_len=24, new_tokens=n1 // 2)[0]
        finally:
            engine.attention = "gathered"
        return {"in_place_full_bs1_tok_s": full, "in_place_bs64_tok_s": many, "in_place_bs64_step_ms": step * 1e3,
                "in_place_mixed12_tok_s": mix}

    def transformers_generate() -> dict:
        got = {}
        for rows, compiled in ((1, False), (1, not a.smoke), (rows64, not a.smoke)):  # the CPU smoke: eager only
            key = f"hf_static_{'compiled' if compiled else 'eager'}_bs{rows}_tok_s"
            got[key] = hf_generate_tok_s(hf, rows=rows, prompt_len=24, new_tokens=hf_n, compiled=compiled)
        return got

    skip = {x for x in a.skip.split(",") if x}
    if skip - set(SECTIONS):
        ap.error(f"unknown sections {sorted(skip - set(SECTIONS))}; there are {', '.join(SECTIONS)}")
    for name, fn in zip(SECTIONS, (batch1, mixed, bs64, attention, in_place, transformers_generate)):
        if name not in skip:
            run.section(name, fn)
    print_table(run.data)
    print(f"wrote {out}")
    return run.data


TARGETS = [  # (key, tok/s behind it, target text)
    ("full_bs1_bandwidth_fraction", "full_bs1_tok_s", ">= 0.70"),
    ("skip8_speedup_over_ideal", "skip8_bs1_tok_s", ">= 0.95"),
    ("pairs_over_full", "pairs_bs1_tok_s", "report"),
    ("p8_mixed_over_full", "mixed12_tok_s", ">= 0.95"),
    ("bs64_bandwidth_fraction", "bs64_tok_s", ">= 0.60"),
    ("attn_4k_over_bound", None, "<= 2"),
]


def print_table(d: dict) -> None:
    print(f"\nbench-gpu {d['date']} on {d['device']} ({d['shape']}, {d['dtype']}, torch {d['torch']})")
    print(f"{'figure':32s} {'value':>8s} {'tok/s':>9s}  target")
    for key, tok, target in TARGETS:
        v = d.get(key)
        print(f"{key:32s} {'-' if v is None else f'{v:8.3f}':>8s} "
              f"{'' if tok is None or tok not in d else f'{d[tok]:9.1f}':>9s}  {target}")
    for key in sorted(k for k in d if k.startswith("in_place_") and k.endswith("tok_s")):
        print(f"{key:32s} {'':>8s} {d[key]:9.1f}  engine, decode attention in place")
    for key in sorted(k for k in d if k.startswith("hf_")):
        print(f"{key:32s} {'':>8s} {d[key]:9.1f}  transformers, beside full_bs1 / bs64")
    for name, err in d.get("errors", {}).items():
        print(f"section {name} FAILED: {err}")
    print("seconds per section: " + ", ".join(f"{k} {v}" for k, v in d.get("section_s", {}).items()))


if __name__ == "__main__":
    main()
