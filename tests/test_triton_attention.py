"""The Triton decode-attention kernel over the block table gives what gathering each row's context gives. On the CPU
it runs in Triton's interpreter (tests/conftest.py switches it on), the same kernel source the GPU compiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.model import triton_attention
from server.model.paged_attention import gathered_attention
from server.model.triton_attention import paged_decode_attention

pytestmark = pytest.mark.skipif(not triton_attention.available(), reason="needs the triton package")


def _case(*, lengths: list[int], T: int = 1, kv: int = 2, heads: int = 6, hd: int = 32, block_size: int = 16,
          pool_blocks: int = 48, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Rows on shuffled blocks of one pool, their tables wider than they need (as the cache's); rows 0 and 1 share
    their first block (a shared prefix). q is a strided view, as the model makes it."""
    g = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    pool = torch.randn(pool_blocks, block_size, 2 * kv, hd, generator=g).to(dtype)
    nb = -(-max(lengths) // block_size) + 1
    tables = (torch.randperm(pool_blocks - 1, generator=g) + 1)[: rows * nb].view(rows, nb)
    if rows > 1:
        tables[1, 0] = tables[0, 0]
    lens = torch.tensor(lengths)
    positions = ((lens - T)[:, None] + torch.arange(T)[None, :]).clamp(min=0)
    q = torch.randn(rows, T, heads, hd, generator=g).to(dtype).transpose(1, 2)  # [P, H, T, hd], not contiguous
    return q, pool, tables, positions, lens


@pytest.mark.parametrize(("heads", "kv", "hd"), [(6, 2, 32), (4, 4, 16), (4, 1, 64), (3, 1, 24)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dot", [True, False])
def test_matches_gathered(heads: int, kv: int, hd: int, splits: int, dot: bool) -> None:
    """GQA, MHA, MQA and a head dim that is no power of two; a row of one token (a padding row's shape), rows
    spanning several tiles, and more splits than a short row fills (empty splits merge as nothing); through tl.dot
    and through summed products."""
    q, pool, tables, positions, lens = _case(lengths=[1, 37, 150, 16], kv=kv, heads=heads, hd=hd)
    want = gathered_attention(q, pool, tables, positions, lens)
    got = paged_decode_attention(q, pool, tables, positions, lens, splits=splits,
                                 tiling=triton_attention.Tiling(32 if splits == 3 else 64, 2, dot))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 40])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dot", [True, False])
def test_window_scale_and_several_queries(window: int, T: int, dot: bool) -> None:
    """A sliding window (down to one key), a score scale of the model's own, and several queries per row (each
    sees keys up to its own position)."""
    q, pool, tables, positions, lens = _case(lengths=[9, 70, 130], T=T, seed=1)
    want = gathered_attention(q, pool, tables, positions, lens, scale=0.3, window=window)
    got = paged_decode_attention(q, pool, tables, positions, lens, scale=0.3, window=window, splits=2,
                                 tiling=triton_attention.Tiling(dot=dot))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reads_keys_through_the_table() -> None:
    """Swapping two entries of a row's table changes its result (the kernel follows the table, not the pool's
    order), and keys past a row's length are never read (changing them changes nothing)."""
    q, pool, tables, positions, lens = _case(lengths=[40], seed=2)
    base = paged_decode_attention(q, pool, tables, positions, lens, splits=2)
    swapped = tables.clone()
    swapped[0, [0, 2]] = tables[0, [2, 0]]
    assert not torch.allclose(paged_decode_attention(q, pool, swapped, positions, lens, splits=2), base)
    stale = pool.clone()
    stale[tables[0, 2], 40 % 16 :] = 1e4  # positions 40.. of the row's third block: past its length
    stale[tables[0, 3]] = 1e4
    torch.testing.assert_close(paged_decode_attention(q, stale, tables, positions, lens, splits=2), base)


def test_splits_share_out_each_rows_own_keys() -> None:
    """Splits divide each row's visible keys, not the columns the table covers: a table covering many more blocks
    than the rows use (as a captured step's covers the whole table), with more splits than a short row has tiles,
    gives what gathering gives, windowed or not."""
    q, pool, tables, positions, lens = _case(lengths=[1, 37, 150], seed=3)
    want = gathered_attention(q, pool, tables, positions, lens)
    wide = torch.cat([tables, tables[:, :1].expand(-1, 20)], dim=1)  # 20 more columns, never visible
    got = paged_decode_attention(q, pool, wide, positions, lens, splits=8, tiling=triton_attention.Tiling(16))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for window in (1, 40):
        want = gathered_attention(q, pool, tables, positions, lens, window=window)
        got = paged_decode_attention(q, pool, wide, positions, lens, window=window, splits=8, tiling=triton_attention.Tiling(16))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dot", [True, False])
def test_bfloat16(dot: bool) -> None:
    q, pool, tables, positions, lens = _case(lengths=[33, 100], heads=8, hd=64, dtype=torch.bfloat16, seed=3)
    want = gathered_attention(q.float(), pool.float(), tables, positions, lens)
    got = paged_decode_attention(q, pool, tables, positions, lens, splits=2, tiling=triton_attention.Tiling(dot=dot))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_splits_fill_the_device_but_never_exceed_the_tiles() -> None:
    cpu = torch.device("cpu")
    assert triton_attention.num_splits(queries=1, kv_heads=8, keys=4096, device=cpu) == 1
    assert triton_attention.num_splits(queries=1, kv_heads=1, keys=10, device=cpu) == 1


def test_refuses_the_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, pool, tables, positions, lens = _case(lengths=[5])
    with pytest.raises(ValueError, match="runs on CUDA.*TRITON_INTERPRET=1.*attention='gathered'"):
        paged_decode_attention(q, pool, tables, positions, lens)




@pytest.mark.parametrize(("arch", "shared_kib"), [(90, 227), (80, 163)])
def test_builds_for_the_gpu(tmp_path: Path, arch: int, shared_kib: int) -> None:
    """The interpreter checks what the kernels compute, not that they compile: tl.dot's tile sides, layouts and shared
    memory are the GPU compiler's. benchmarks/kernel_build.py compiles the very launches the wrapper makes for the
    served models' shapes (bf16 at every tiling the engine may choose, float32 at the default) for sm_90 (H100,
    H200) and sm_80 (A100) to cubins, in a process where Triton compiles; each must fit the card's shared memory a
    block. So a kernel that would not build fails here, not on a lent GPU's clock."""
    out = tmp_path / "build.json"
    done = subprocess.run([sys.executable, "benchmarks/kernel_build.py", "--arch", str(arch), "--no-ptxas-log",
                           "--json", str(out)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    partial = {(r["shape"], r["dtype"], r["tiling"]) for r in rows if r["kernel"] == "_partial"}
    for shape, group in (("smollm2-135m", 3), ("llama-2-7b", 1), ("gemma-3-270m", 4)):
        tilings = {t.name for t in triton_attention.candidates(group)}
        assert {t for s, d, t in partial if (s, d) == (shape, "bfloat16")} == tilings, rows
        assert (shape, "float32", "64/4") in partial and (shape, "bfloat16", "32/4") in partial
    assert sum(r["kernel"] == "_merge" for r in rows) == 6
    assert all(r["cubin_bytes"] > 0 and r["shared"] <= shared_kib * 1024 for r in rows), rows


def test_the_engine_tiling_is_measured_on_cuda_only() -> None:
    """Off CUDA nothing is timed (the interpreter's times say nothing of a GPU's) and the kernel runs at the default
    tiling; the choice among timed tilings is the fastest, and it pays only by the margin over gathering."""
    cpu = torch.device("cpu")
    assert triton_attention.timings(heads=9, kv_heads=3, head_dim=64, dtype=torch.float32, device=cpu) is None
    assert triton_attention.tiling_for(heads=9, kv_heads=3, head_dim=64, dtype=torch.float32,
                                       device=cpu) == triton_attention.Tiling()
    a, b = triton_attention.candidates(1)[-2:]
    times = triton_attention.KernelTimes(gathered_ms=1.0, tilings_ms={a: 0.99, b: 0.5})
    assert times.best == b and times.pays()
    assert not triton_attention.KernelTimes(gathered_ms=1.0, tilings_ms={a: 0.98}).pays()
