"""The Triton decode-attention kernels built for a GPU this machine need not have: the very launches
`server.model.triton_attention` makes for the served models' shapes, compiled for a CUDA compute capability (sm_90:
H100, H200) down to a cubin by the ptxas that Triton's wheel brings, with what each costs the GPU: shared memory a
program, registers a thread and bytes spilled (ptxas -v). Triton's interpreter, which the CPU tests run the kernels
in, checks what they compute but not that they build; this does the rest without a GPU.

    python benchmarks/kernel_build.py                     # sm_90, every shape, bf16 at every candidate tiling
    python benchmarks/kernel_build.py --arch 80 --json out.json

Registers and spills are static facts of the code, not speed: which tiling is fastest is timed at load on the card
(`triton_attention.timings`). Must run with Triton compiling, not interpreting (TRITON_INTERPRET unset or 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.model import triton_attention  # noqa: E402

# (query heads, kv heads, head dim, sliding window) of the models the server runs on a GPU
SHAPES = {"smollm2-135m": (9, 3, 64, None), "llama-2-7b": (32, 32, 128, None), "gemma-3-270m": (4, 1, 256, 512)}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes a block may take (sm_XX)


def launches(shape: str, dtype: torch.dtype, tiling: triton_attention.Tiling) -> tuple[triton_attention.Launch, ...]:
    """The wrapper's launches for two rows (1 and 40 tokens) of `shape` on CPU tensors of `dtype`, eight splits (as on
    a GPU; the CPU would size one)."""
    heads, kv, hd, window = SHAPES[shape]
    pool = torch.zeros(8, 16, 2 * kv, hd, dtype=dtype)
    tables = torch.arange(1, 7).view(2, 3)
    lengths = torch.tensor([1, 40])
    q = torch.zeros(2, 1, heads, hd, dtype=dtype).transpose(1, 2)  # [P, H, T, hd], strided as the model makes it
    return triton_attention.launches(q, pool, tables, (lengths - 1)[:, None], lengths, scale=None, window=window,
                                     splits=8, tiling=tiling)[-1]


def build(run: triton_attention.Launch, *, arch: int, ptxas_log: bool) -> dict:
    """Compile one launch for sm_`arch` with the argument types Triton gives its own arguments -> what it costs."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, mangle_type

    names = list(inspect.signature(run.kernel).parameters)
    types = dict(zip(names, map(mangle_type, run.args)))
    signature = {n: "constexpr" if n in run.constexprs else types[n] for n in names}
    kernel = triton.compile(ASTSource(JITFunction(run.kernel), signature, run.constexprs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": run.num_warps})
    out = {"kernel": run.kernel.__name__, "cubin_bytes": len(kernel.asm["cubin"]), "shared": kernel.metadata.shared}
    if ptxas_log:
        out.update(_ptxas_figures(kernel.asm["ptx"], arch))
    return out


def _ptxas_figures(ptx: str, arch: int) -> dict:
    """Registers a thread and spilled bytes, from `ptxas -v` over the kernel's PTX (the ptxas Triton itself uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}",
                              f.name, "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs[1]) if regs else None,
            "spill_bytes": int(spills[1]) + int(spills[2]) if spills else None}


def run(*, arch: int, ptxas_log: bool) -> list[dict]:
    """Every shape: bf16 (served on CUDA) at every tiling the engine may choose, float32 (the CUDA tests') at the
    default."""
    rows = []
    for shape in SHAPES:
        heads, kv, _, _ = SHAPES[shape]
        for dtype, tilings in ((torch.bfloat16, triton_attention.candidates(heads // kv)),
                               (torch.float32, (triton_attention.Tiling(),))):
            for i, tiling in enumerate(tilings):
                for launch in launches(shape, dtype, tiling):
                    if launch.kernel.__name__ == "_merge" and i:  # the merge does not depend on the tiling
                        continue
                    rows.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."),
                                 "tiling": tiling.name,
                                 **build(launch, arch=arch, ptxas_log=ptxas_log)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100, H200; 80: A100)")
    ap.add_argument("--no-ptxas-log", action="store_true", help="skip registers and spills (one more ptxas run each)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"):
        sys.exit("kernel_build compiles for a GPU: unset TRITON_INTERPRET (Triton would interpret instead)")
    rows = run(arch=a.arch, ptxas_log=not a.no_ptxas_log)
    limit = SHARED_LIMIT.get(a.arch)
    print(f"Triton decode attention built for sm_{a.arch} (shared memory a block may take: "
          f"{limit // 1024 if limit else '?'} KiB)")
    print(f"{'shape':13s} {'dtype':8s} {'kernel':8s} {'tiling':>8s} {'shared KiB':>10s} {'registers':>9s} "
          f"{'spilled B':>9s}")
    for r in rows:
        print(f"{r['shape']:13s} {r['dtype']:8s} {r['kernel']:8s} {r['tiling']:>8s} {r['shared'] / 1024:>10.1f} "
              f"{r.get('registers') or '':>9} {'' if r.get('spill_bytes') is None else r['spill_bytes']:>9}")
    over = [r for r in rows if limit and r["shared"] > limit]
    if a.json:
        Path(a.json).write_text(json.dumps({"arch": a.arch, "triton": _triton_version(), "rows": rows}, indent=1))
    if over:
        sys.exit(f"{len(over)} launches need more shared memory than sm_{a.arch} has: {over}")


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
