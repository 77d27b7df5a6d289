"""Decode attention (one query per row) over the paged KV pool: reading it in place (FlexAttention over the block
table, and on CUDA our Triton kernel over it) against gathering each row's context and running SDPA (the engine's
default), per call, at 1 and 16 rows and 128-4,096-token contexts. On CUDA also time / (KV bytes / the card's peak
bandwidth, `benchmarks/peaks.py`), the issue's `attn_4k_over_bound` at 4,096 tokens x 16 rows, and `--sweep` times
the Triton kernel's tilings there.
Random pools: speed depends on shapes, not values.

    python benchmarks/bench_attention.py                      # CPU, SmolLM2's heads (9 q, 3 kv, 64 wide), float32
    python benchmarks/bench_attention.py --device cuda --shape llama-2-7b   # bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peaks import peak_bytes_s  # noqa: E402
from server.model import triton_attention  # noqa: E402
from server.model.paged_attention import gathered_attention, paged_attention, paged_layout  # noqa: E402

HEADS = {"smollm2-135m": (9, 3, 64), "llama-2-7b": (32, 32, 128)}  # (query heads, kv heads, head dim)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeats


def case(pool: torch.Tensor, *, rows: int, context: int, heads: int, repeats: int = 10,
         sweep: bool = False) -> dict:
    """Every path over `pool` (one pool for every case, as in the server: FlexAttention compiles per pool size),
    `rows` rows of `context` tokens each on shuffled blocks (as after churn). The Triton kernel runs where it
    compiles (CUDA) or is interpreted (TRITON_INTERPRET=1: its times are then the interpreter's, not the kernel's).
    sweep: also time the Triton kernel at every tiling of `TILINGS` (`triton_tilings`: {Tiling.name: ms}); its
    `triton_ms` is at the tiling the engine chooses at load (`triton_tiling`)."""
    device, dtype = pool.device, pool.dtype
    n_blocks, block_size, two_kv, hd = pool.shape
    nb = -(-context // block_size)
    width = (n_blocks - 1) // rows  # every row's table as wide (the cache's tables have one width)
    g = torch.Generator().manual_seed(context + rows)
    tables = (torch.randperm(n_blocks - 1, generator=g)[: rows * width] + 1).view(rows, width).to(device)
    lengths = torch.full((rows,), context, device=device)
    positions = (lengths - 1)[:, None]
    q = torch.randn(rows, heads, 1, hd, generator=g).to(device, dtype)
    block_col = torch.zeros(n_blocks, dtype=torch.int32, device=device)

    def in_place() -> torch.Tensor:
        layout = paged_layout(tables, positions, lengths, block_size=block_size, block_col=block_col)
        return paged_attention(q, pool, layout, slice(0, rows))

    def gathered() -> torch.Tensor:
        return gathered_attention(q, pool, tables[:, :nb], positions, lengths)

    t = time.perf_counter()
    got = in_place()
    _sync(device)
    first_s = time.perf_counter() - t
    err = (got.float() - gathered().float()).abs().max().item()
    kv_bytes = rows * nb * pool[0].numel() * pool.element_size()  # what the rows' attention must read
    out = {"rows": rows, "context": context, "first_call_s": first_s, "max_abs_err": err,
           "in_place_ms": _time(in_place, device, repeats) * 1e3, "gathered_ms": _time(gathered, device, repeats) * 1e3,
           "kv_bytes": kv_bytes}
    out["gathered_over_in_place"] = out["gathered_ms"] / out["in_place_ms"]
    if triton_attention.runnable(device):
        lengths_, positions_ = lengths, positions
        chosen = triton_attention.tiling_for(heads=heads, kv_heads=two_kv // 2, head_dim=hd, dtype=dtype,
                                             device=device)  # what the engine runs the kernel at

        def kernel(tiling: triton_attention.Tiling = chosen) -> torch.Tensor:
            return triton_attention.paged_decode_attention(q, pool, tables[:, :nb], positions_, lengths_, tiling=tiling)

        out["triton_max_abs_err"] = (kernel().float() - gathered().float()).abs().max().item()
        out["triton_ms"] = _time(kernel, device, repeats) * 1e3
        out["triton_tiling"] = chosen.name
        out["gathered_over_triton"] = out["gathered_ms"] / out["triton_ms"]
        if sweep:
            out["triton_tilings"] = {t.name: _time(lambda t=t: kernel(t), device, repeats) * 1e3
                                     for t in TILINGS}
    if device.type == "cuda":
        bound_ms = kv_bytes / peak_bytes_s(torch.cuda.get_device_name(device))[0] * 1e3
        for path in ("in_place", "gathered", "triton"):
            if f"{path}_ms" in out:
                out[f"{path}_over_bound"] = out[f"{path}_ms"] / bound_ms
    return out


TILINGS = ([triton_attention.Tiling(n, w) for n in (32, 64, 128) for w in (2, 4, 8)]
           + [triton_attention.Tiling(n, w, dot=False) for n in (32, 64) for w in (2, 4, 8)])  # 128 keys spill here


def run(*, device: torch.device, shape: str, rows: tuple[int, ...] = (1, 16),
        contexts: tuple[int, ...] = (128, 512, 2048, 4096), repeats: int = 10, sweep: bool = False) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, kv, hd = HEADS[shape]
    block_size = 16
    blocks = max(rows) * -(-max(contexts) // block_size) + 1
    pool = torch.randn(blocks, block_size, 2 * kv, hd, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return [case(pool, rows=r, context=c, heads=H, repeats=repeats, sweep=sweep) for r in rows for c in contexts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, choices=sorted(HEADS), help="heads of this model (default: smollm2 on "
                    "CPU, llama-2-7b on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--contexts", default="128,512,2048,4096")
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--sweep", action="store_true", help="also time every tiling of the Triton kernel")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shape = a.shape or ("llama-2-7b" if device.type == "cuda" else "smollm2-135m")
    results = run(device=device, shape=shape, rows=tuple(int(x) for x in a.rows.split(",")),
                  contexts=tuple(int(x) for x in a.contexts.split(",")), repeats=a.repeats, sweep=a.sweep)
    print(f"decode attention, {shape} heads, {device} ({torch.get_num_threads()} threads), ms per call")
    print(f"{'rows':>4} {'context':>7} {'in place':>9} {'gathered':>9} {'gath/inpl':>9} {'1st call s':>10} {'max err':>8}"
          f" {'triton':>8} {'gath/trit':>9}" + ("  in place / bound  triton / bound" if device.type == "cuda" else ""))
    for r in results:
        print(f"{r['rows']:>4} {r['context']:>7} {r['in_place_ms']:>9.3f} {r['gathered_ms']:>9.3f} "
              f"{r['gathered_over_in_place']:>9.2f} {r['first_call_s']:>10.2f} {r['max_abs_err']:>8.1e} "
              f"{r.get('triton_ms', float('nan')):>8.3f} {r.get('gathered_over_triton', float('nan')):>9.2f}"
              + (f"  {r['in_place_over_bound']:>17.2f}  {r.get('triton_over_bound', float('nan')):>14.2f}"
                 if "in_place_over_bound" in r else ""))
        for tiling, ms in r.get("triton_tilings", {}).items():
            print(f"      triton tiling {tiling}: {ms:.3f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(device), "shape": shape, "results": results}, indent=1))


if __name__ == "__main__":
    main()
