"""Attention over the paged KV pool: in place through FlexAttention, or by gathering each row's context (the reference).

The pool is [block, position in block, 2 x kv heads (keys, then values), head dim] (see `kv_cache.py`). In place,
the whole pool is one key tensor and one value tensor (strided views, no copy) and each row's block-table row becomes
the kv block list of a FlexAttention `BlockMask`, whose block size is the pool's: the kernel visits only the row's
blocks and reads them where they lie. A block sits at the same place in every sequence that holds it (a shared prefix
block is shared at its own index), so `block_col[b]`, the logical index of physical block b, turns a physical key
position into a logical one for the causal, length and sliding-window mask.

FlexAttention's CPU kernel sizes its kv block lists by the key length (every pool block), so a row's list is a strided
view of the gathered table rows followed by one shared tail of zeros: no per-row buffer as wide as the pool.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PagedLayout:
    """What every attention of one forward call needs to read the pool in place; built once per call (one gather of
    the table rows) and sliced per layer application."""

    indices: Tensor  # int32 [N x width + pool blocks]: N table rows of `width` block ids, then zeros
    width: int  # block ids per table row (the cache's max blocks per sequence)
    num_blocks: Tensor  # int32 [N] blocks each row reads (its length rounded up to blocks)
    positions: Tensor  # [N, T] position of each query
    lengths: Tensor  # [N] keys cached per row after this call's writes (start + new tokens)
    block_col: Tensor  # int32 [pool blocks] logical index of each block in the rows that hold it
    zeros: Tensor  # int32 [pool blocks]: the (empty) lists of mask-free blocks


def paged_layout(tables: Tensor, positions: Tensor, lengths: Tensor, *, block_size: int,
                 block_col: Tensor) -> PagedLayout:
    """tables [N, width] block-table rows, positions [N, T], lengths [N] (a row's keys past it are stale).
    block_col [pool blocks]: updated in place for the blocks these rows hold (a persistent buffer of the cache's)."""
    N, width = tables.shape
    pool_blocks = block_col.shape[0]
    num_blocks = (lengths + block_size - 1) // block_size  # [N]
    cols = torch.arange(width, device=tables.device)
    live = cols[None, :] < num_blocks[:, None]
    # stale entries past a row's length point at block 0 (scratch), whose column no one reads
    block_col[torch.where(live, tables, 0)] = cols.to(torch.int32).expand(N, width)
    indices = torch.zeros(N * width + pool_blocks, dtype=torch.int32, device=tables.device)
    indices[: N * width] = tables.reshape(-1)
    return PagedLayout(indices, width, num_blocks.to(torch.int32), positions, lengths, block_col,
                       torch.zeros(pool_blocks, dtype=torch.int32, device=tables.device))


def paged_attention(q: Tensor, pool: Tensor, layout: PagedLayout, rows: slice, *, scale: float | None = None,
                    window: int | None = None) -> Tensor:
    """q [P, H, T, hd] for layout rows `rows` (P of them) -> [P, H, T, hd], reading keys and values in place.
    A query at position p sees keys at positions s with s <= p, s < the row's length and, given a window,
    p - s < window."""
    from torch.nn.attention.flex_attention import BlockMask

    P, H, T, hd = q.shape
    n_blocks, block_size, two_kv, _ = pool.shape
    kv = two_kv // 2
    flat = pool.view(n_blocks * block_size, two_kv, hd)
    keys = flat[:, :kv].permute(1, 0, 2)[None]  # [1, kv, pool tokens, hd], a view
    values = flat[:, kv:].permute(1, 0, 2)[None]
    w = layout.width
    lists = layout.indices[rows.start * w :].as_strided((P, 1, 1, n_blocks), (w, w, w, 1))
    empty = layout.zeros.as_strided((P, 1, 1, n_blocks), (0, 0, 0, 1))
    positions, lengths, block_col = layout.positions[rows], layout.lengths[rows], layout.block_col
    # Everything static but the number of rows: torch 2.13's CPU kernel does not build once the query length, the
    # pool size or the heads are dynamic (and a server has one pool and one model).
    for t in (keys, values, layout.block_col):
        torch._dynamo.mark_static(t)
    for t, dims in ((q, (1, 2, 3)), (lists, (1, 2, 3)), (empty, (1, 2, 3)), (positions, (1,))):
        for d in dims:
            torch._dynamo.mark_static(t, d)

    # The window is data, not a constant of the mask: a compiled kernel was seen reused across closures that differ
    # only in a captured int (a global layer ran with a window layer's kernel).
    span = torch.full((), window if window is not None else 2**31 - 1, device=q.device)  # a fill: no host copy

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        s = block_col[kv_idx // block_size] * block_size + kv_idx % block_size  # logical key position
        p = positions[b, q_idx]
        return (s <= p) & (s < lengths[b]) & (p - s < span)

    q_block = 128 * -(-T // 128)  # one query block holds every query of a row
    mask = BlockMask.from_kv_blocks(
        layout.num_blocks[rows, None, None], lists, torch.zeros_like(layout.num_blocks[rows, None, None]), empty,
        BLOCK_SIZE=(q_block, block_size), mask_mod=mask_mod, seq_lengths=(T, n_blocks * block_size),
        compute_q_blocks=False,
    )
    return _flex(q.device.type)(q, keys, values, block_mask=mask, scale=scale, enable_gqa=H != kv)


@functools.cache
def _flex(device_type: str):  # noqa: ANN202
    """FlexAttention compiled (it has no fast eager kernel). On the CPU every shape compiles on its own: torch 2.13's
    CPU kernel fails to build (undeclared `cur_qSplitSize`/`cur_kvSplitSize` in the generated C++) once any size is
    dynamic, so a new number of rows recompiles too (past Dynamo's recompile limit it runs eagerly: slow, exact).
    On CUDA too (torch 2.11, seen on an H200): with a dynamic number of rows Inductor leaves its decode kernel for
    the general one, which needs kv blocks of at least its BLOCK_N and refuses the pool's 16-token blocks.
    Dynamo's recompile limits are raised: past them it would call flex_attention eagerly, whose result with these
    block masks is wrong (seen on torch 2.13's CPU: other tokens than the gathered reference's), not merely slow."""
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 1024)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)

    return torch.compile(flex_attention, dynamic=False)


def gathered_attention(q: Tensor, pool: Tensor, tables: Tensor, positions: Tensor, lengths: Tensor, *,
                       scale: float | None = None, window: int | None = None) -> Tensor:
    """The reference path: copy each row's first blocks out of the pool, mask, and run SDPA. q [P, H, T, hd],
    tables [P, nb] (the blocks that cover the longest row), positions [P, T], lengths [P] -> [P, H, T, hd]."""
    P, nb = tables.shape
    _, block_size, two_kv, hd = pool.shape
    kv = two_kv // 2
    ctx = pool[tables].view(P, nb * block_size, two_kv, hd)
    keys, values = ctx[:, :, :kv].transpose(1, 2), ctx[:, :, kv:].transpose(1, 2)
    s = torch.arange(nb * block_size, device=q.device)
    allowed = (s[None, None, :] <= positions[:, :, None]) & (s[None, None, :] < lengths[:, None, None])
    if window is not None:
        allowed &= positions[:, :, None] - s[None, None, :] < window
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None], scale=scale,
                                          enable_gqa=q.shape[1] != kv)
