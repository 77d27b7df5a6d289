"""Decode attention that reads the paged KV pool in place: a Triton kernel over the block table (flash-decoding).

The pool is [block, position in block, 2 x kv heads (keys, then values), head dim] (see `kv_cache.py`). One program
takes one query (a row's token), one kv head with every query head that shares it (GQA), and one *split*: a run of
the row's logical key positions. It walks the split `BLOCK_N` keys at a time, finding each key's block through the
row's block-table row, so keys are read once, where they lie, and a 16-token block size costs nothing (the tile spans
blocks). Each split leaves its normalised output and its log-sum-exp; a second kernel merges the splits (as in
flash-decoding, and vLLM's and SGLang's Triton decode kernels). Splits exist so that a few long rows still fill the
GPU: their number comes from the blocks the caller covers (plain data), so a captured step launches the same grid
every replay, while each program finds its share of the keys from its row's own length: a captured step may cover
every block of the table (no context bucket in its key) and a short row still spreads over all its splits.

Masking is by logical key position s: a query at position p sees s <= p, s < the row's length and, given a window,
p - s < window; the visible range is computed once per program, so no mask tensor exists.

On the CPU the same kernels run in Triton's interpreter (numpy; slow, for tests only): the executor's "triton" mode
is for CUDA, and the CPU tests check it against the gathered reference through the very same code.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from server.model import measure

try:  # the GPU image ships Triton; on the CPU it is a test dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover -- the executor's "triton" mode then refuses with a clear error
    triton = tl = None

log = logging.getLogger(__name__)
BLOCK_N = 64  # keys per tile: four 16-token blocks
MIN_DOT = 16  # tl.dot's smallest tile side: the query heads of a kv head are padded to it


@dataclass(frozen=True)
class Tiling:
    """The partial kernel's tiling: keys per tile (`BLOCK_N`, a power of two >= 16) and warps per program; dot: the
    scores and the weighted values through tl.dot (tensor cores, the query heads of a kv head padded to 16 rows) or,
    for one or two heads a kv head (MHA: Llama-2-7B), as broadcast products summed (no padding; SGLang's and vLLM's
    kernel for MHA)."""

    block_n: int = BLOCK_N
    num_warps: int = 4
    dot: bool = True

    @property
    def name(self) -> str:
        """"keys/warps", "+sum" where the products are summed without tl.dot: "64/4", "64/8+sum"."""
        return f"{self.block_n}/{self.num_warps}{'' if self.dot else '+sum'}"


# Tilings timed at load on CUDA (`timings`); the fastest is used. Compiled for sm_90 in bf16 (ptxas -v,
# benchmarks/kernel_build.py), the default 64/4 takes all 255 registers and spills a few bytes on the Llama-2-7B and
# Gemma 3 shapes, while 32/4, 32/8 and 64/8 take 80-179 and spill nothing; 128-key tiles spill kilobytes. Without
# tl.dot, one head a kv head (Llama-2-7B) takes 128-188 registers and no shared memory; from four heads it spills.
# Which is fastest is the card's to say.
CANDIDATES = (Tiling(32, 4), Tiling(32, 8), Tiling(64, 4), Tiling(64, 8))
NO_DOT_CANDIDATES = (Tiling(32, 4, dot=False), Tiling(64, 4, dot=False), Tiling(64, 8, dot=False))


def candidates(group: int) -> tuple[Tiling, ...]:
    """The tilings worth timing for `group` query heads a kv head: without tl.dot only for one or two."""
    return CANDIDATES + (NO_DOT_CANDIDATES if group <= 2 else ())


def available() -> bool:
    """Whether Triton is installed."""
    return triton is not None


def _partial(Q, Pool, Blocks, Positions, Lengths, PartOut, PartLse,  # noqa: ANN001, N803 -- Triton kernel
             sq_p, sq_h, sq_t, sb_p, window, scale,
             T: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr,
             PAGE: tl.constexpr, S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (P x T, KV, S). Q [P, H, T, HD] strided; Blocks [P, >= covered blocks] strided rows; Positions [P, T]
    and Lengths [P] contiguous -> PartOut [P x T, S, H, HD] float32 (this split's normalised output) and
    PartLse [P x T, S, H] (its log-sum-exp; -inf when the split sees no key)."""
    pt = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    p = pt // T
    t = pt % T
    pos = tl.load(Positions + pt)
    length = tl.load(Lengths + p)
    # the keys this query sees, [first, last), shared out in whole tiles over the S splits: the split lengths come
    # from the row itself, so the grid need not follow the context (a captured step covers every block)
    first = tl.maximum(pos - window + 1, 0)
    last = tl.minimum(pos + 1, length)
    per = tl.cdiv(tl.cdiv(tl.maximum(last - first, 0), S), BLOCK_N) * BLOCK_N
    lo = first + split * per
    hi = tl.minimum(last, lo + per)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * G + g
    g_ok = g < G
    d_ok = d < HD
    q = tl.load(Q + p * sq_p + heads[:, None] * sq_h + t * sq_t + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if UPCAST:  # Triton's interpreter multiplies 16-bit floats wrongly in tl.dot (seen with 3.9): float32 there
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        block = tl.load(Blocks + p * sb_p + s // PAGE, mask=s_ok, other=0)
        token = block.to(tl.int64) * PAGE + s % PAGE  # [BLOCK_N] rows of the pool viewed as [tokens, 2 KV, HD]
        at = Pool + token[:, None] * (2 * KV * HD) + d[None, :]
        ok = s_ok[:, None] & d_ok[None, :]
        k = tl.load(at + kvh * HD, mask=ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(at + (KV + kvh) * HD, mask=ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if DOT:
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N] float32
        else:
            qk = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), 2) * scale
        qk = tl.where(s_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(w, 1)
        if DOT:
            acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * v[None, :, :].to(tl.float32), 1)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    at = (pt * S + split) * (KV * G) + heads
    tl.store(PartOut + at[:, None] * HD + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(PartLse + at, lse, mask=g_ok)


def _merge(PartOut, PartLse, Out,  # noqa: ANN001, N803 -- Triton kernel
           H: tl.constexpr, HD: tl.constexpr, S: tl.constexpr,
           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (P x T, H): the splits' outputs weighted by exp(lse) -> Out [P x T, H, HD] in the query's dtype."""
    pt = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = sp < S
    d_ok = d < HD
    lse = tl.load(PartLse + (pt * S + sp) * H + h, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    live = lse > float("-inf")
    w = tl.where(live, tl.exp(lse - tl.where(live, top, 0.0)), 0.0)
    o = tl.load(PartOut + ((pt * S + sp[:, None]) * H + h) * HD + d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + (pt * H + h) * HD + d, out.to(Out.dtype.element_ty), mask=d_ok)


@functools.cache
def _jit(kernel: Callable, interpret: bool):  # noqa: ANN202
    """`kernel` compiled for the GPU or, under TRITON_INTERPRET=1, run by Triton's interpreter (Triton picks one
    when it decorates, so the choice is part of the cache key)."""
    return triton.jit(kernel)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as data: what `paged_decode_attention` runs, and what a test compiles for a GPU it lacks."""

    kernel: Callable  # the undecorated kernel
    grid: tuple[int, ...]
    args: tuple  # its runtime arguments, in order
    constexprs: dict[str, object]
    num_warps: int


def runnable(device: torch.device) -> bool:
    """Whether the kernels run on `device`: compiled on CUDA, interpreted elsewhere under TRITON_INTERPRET=1."""
    return available() and (device.type == "cuda" or _interpreting())


def require(device: torch.device) -> None:
    """Raise, saying what to do, unless the kernels can run on `device`."""
    if not available():
        raise ValueError("attention='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and not _interpreting():
        raise ValueError("attention='triton' runs on CUDA; on the CPU only Triton's interpreter runs it (slowly, for "
                         "tests): set TRITON_INTERPRET=1 before the process starts, or use attention='gathered'")


def _interpreting() -> bool:
    # Triton reads the switch when `triton.language` is imported (its own helpers are decorated then), and
    # torch._dynamo imports it early: it must be in the environment before the process imports torch._dynamo.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


@functools.cache
def _target_programs(device: torch.device) -> int:
    """How many programs fill the device: a few per SM on CUDA; 1 on the CPU (the interpreter runs them in turn)."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(*, queries: int, kv_heads: int, keys: int, device: torch.device, block_n: int = BLOCK_N) -> int:
    """Splits per (query, kv head) so that the grid fills the device, each split at least one tile of keys.
    keys: the keys covered (the caller's blocks x block size), a bound on every row's length."""
    tiles = max(1, -(-keys // block_n))
    return max(1, min(tiles, -(-_target_programs(device) // (queries * kv_heads))))


def paged_decode_attention(q: Tensor, pool: Tensor, blocks: Tensor, positions: Tensor, lengths: Tensor, *,
                           scale: float | None = None, window: int | None = None, splits: int | None = None,
                           tiling: Tiling = Tiling()) -> Tensor:
    """q [P, H, T, hd] (last dim contiguous); pool [n blocks, block size, 2 kv, hd]; blocks [P, nb] each row's first
    nb block ids, covering every key it may see (rows contiguous); positions [P, T]; lengths [P] keys cached per row
    (a row's keys past it are stale) -> [P, H, T, hd]. A query at position p sees keys at s <= p, s < length and,
    given a window, p - s < window. splits: per (query, kv head); None sizes them to the device. tiling: the
    partial kernel's (the engine's is `tiling_for` the model's shape)."""
    require(q.device)
    *_, out, runs = launches(q, pool, blocks, positions, lengths, scale=scale, window=window, splits=splits,
                             tiling=tiling)
    for run in runs:
        _jit(run.kernel, _interpreting())[run.grid](*run.args, **run.constexprs, num_warps=run.num_warps)
    return out.transpose(1, 2)


def launches(q: Tensor, pool: Tensor, blocks: Tensor, positions: Tensor, lengths: Tensor, *, scale: float | None,
             window: int | None, splits: int | None, tiling: Tiling,
             ) -> tuple[Tensor, Tensor, Tensor, tuple[Launch, Launch]]:
    """`paged_decode_attention`'s two launches, their outputs allocated: (split outputs, split log-sum-exps, the
    output [P, T, H, hd], (partial, merge))."""
    P, H, T, hd = q.shape
    n_blocks, page, two_kv, hd_pool = pool.shape
    kv = two_kv // 2
    assert hd == hd_pool and H % kv == 0 and q.dtype == pool.dtype, (q.shape, pool.shape, q.dtype, pool.dtype)
    assert q.stride(-1) == 1 and blocks.stride(-1) == 1 and pool.is_contiguous()
    nb = blocks.shape[1]
    S = splits or num_splits(queries=P * T, kv_heads=kv, keys=nb * page, device=q.device, block_n=tiling.block_n)
    positions = positions.contiguous()
    lengths = lengths.contiguous()
    part_out = torch.empty(P * T, S, H, hd, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(P * T, S, H, dtype=torch.float32, device=q.device)
    out = torch.empty(P, T, H, hd, dtype=q.dtype, device=q.device)
    block_d = max(MIN_DOT, 1 << (hd - 1).bit_length())
    partial = Launch(
        _partial, (P * T, kv, S),
        (q, pool, blocks, positions, lengths, part_out, part_lse, q.stride(0), q.stride(1), q.stride(2),
         blocks.stride(0), window if window is not None else 2**31 - 1,
         scale if scale is not None else 1 / math.sqrt(hd)),
        dict(T=T, KV=kv, G=H // kv, HD=hd, PAGE=page, S=S,
             BLOCK_G=max(MIN_DOT if tiling.dot else 1, 1 << (H // kv - 1).bit_length()), BLOCK_D=block_d,
             BLOCK_N=tiling.block_n, DOT=tiling.dot, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
             UPCAST=_interpreting() and q.dtype != torch.float32),
        tiling.num_warps)
    merge = Launch(_merge, (P * T, H), (part_out, part_lse, out),
                   dict(H=H, HD=hd, S=S, BLOCK_S=max(2, 1 << (S - 1).bit_length()), BLOCK_D=block_d), 4)
    return part_out, part_lse, out, (partial, merge)


@dataclass(frozen=True)
class KernelTimes:
    """Decode attention timed once per shape at load on CUDA, in milliseconds: the gathered path (copy each row's
    context out of the pool, then SDPA) and the kernel at each candidate tiling that built."""

    gathered_ms: float
    tilings_ms: dict[Tiling, float]

    @property
    def best(self) -> Tiling:
        return min(self.tilings_ms, key=self.tilings_ms.__getitem__)

    def pays(self, margin: float = 0.03) -> bool:
        """Whether the kernel, at its best tiling, beats the gathered path by `margin` or more."""
        return self.tilings_ms[self.best] < (1 - margin) * self.gathered_ms


@functools.cache
def timings(*, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, rows: int = 16,
            context: int = 1024, repeats: int = 20) -> KernelTimes | None:
    """The gathered path and the kernel at every tiling of `candidates` for `rows` rows of `context` tokens on
    shuffled 16-token blocks, on this CUDA device. None off CUDA, or where no tiling builds or runs (logged): the
    gathered path is always there."""
    from server.model.paged_attention import gathered_attention

    if device.type != "cuda" or not runnable(device):
        return None
    page = 16
    nb = -(-context // page)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(rows * nb + 1, page, 2 * kv_heads, head_dim, generator=g).to(device, dtype)
    tables = (torch.randperm(rows * nb, generator=g) + 1).view(rows, nb).to(device)
    lengths = torch.full((rows,), context, device=device)
    positions = (lengths - 1)[:, None]
    q = torch.randn(rows, heads, 1, head_dim, generator=g).to(device, dtype)
    tilings_ms = {}
    for tiling in candidates(heads // kv_heads):
        try:
            tilings_ms[tiling] = measure.cuda_ms(
                lambda t=tiling: paged_decode_attention(q, pool, tables, positions, lengths, tiling=t), repeats=repeats)
        except Exception:  # noqa: BLE001 -- a tiling that does not build on this card (shared memory) is left out
            log.exception("the Triton decode-attention kernel at %s failed; that tiling is left out", tiling)
    if not tilings_ms:
        return None
    times = KernelTimes(measure.cuda_ms(lambda: gathered_attention(q, pool, tables, positions, lengths),
                                        repeats=repeats), tilings_ms)
    log.info("decode attention, %d rows x %d tokens: gathered %.3f ms, Triton kernel %s", rows, context,
             times.gathered_ms, ", ".join(f"{t.name} {ms:.3f} ms" for t, ms in tilings_ms.items()))
    return times


def tiling_for(*, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> Tiling:
    """The tiling the engine runs the kernel at for this shape: the fastest measured on CUDA, else the default."""
    times = timings(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device)
    return times.best if times else Tiling()
