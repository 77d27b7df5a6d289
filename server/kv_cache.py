"""The KV cache: preallocated, one slot per attention a schedule runs, one row per sequence in the batch.

Layout [slot, row, kv_head, position, head_dim]. Rows are kept dense (0..B-1): a finished sequence's row is
refilled by moving the last row into it, so a decode step always works on the prefix `rows = 0..B-1`. The cache
starts at the size asked for and `grow`s (doubling, copying what it holds) when a batch needs more rows or positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        *,
        num_slots: int,
        max_batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_slots, max_batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_len = max_batch, max_len

    @property
    def num_slots(self) -> int:
        return self.k.shape[0]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(
        self, slots: slice, rows: slice, start: list[int], positions: Tensor, k: Tensor, v: Tensor, *, kv_len: int
    ) -> tuple[Tensor, Tensor]:
        """Write new keys/values and return the first `kv_len` positions of these slots and rows.

        start: tokens already cached per row; positions: [B, T]; k, v: [G, B, T, kv, hd];
        returns keys, values [G, B, kv, S, hd].
        """
        assert kv_len <= self.max_len, f"sequence of {kv_len} tokens exceeds the cache's {self.max_len}"
        B, T = positions.shape
        ck, cv = self.k[slots, rows], self.v[slots, rows]  # views [G, B, kv, L, hd]
        if B == 1:
            p = start[0]
            ck[:, 0, :, p : p + T] = k[:, 0].transpose(1, 2)
            cv[:, 0, :, p : p + T] = v[:, 0].transpose(1, 2)
        else:
            b = torch.arange(B, device=positions.device)[:, None]
            # Advanced indices (b, positions) split by a slice put their dims first: [B, T, G, kv, hd].
            ck[:, b, :, positions] = k.permute(1, 2, 0, 3, 4)
            cv[:, b, :, positions] = v.permute(1, 2, 0, 3, 4)
        return ck[:, :, :, :kv_len], cv[:, :, :, :kv_len]

    def grow(self, *, max_batch: int, max_len: int) -> None:
        """Reallocate to at least max_batch rows and max_len positions, keeping the contents."""
        if max_batch <= self.max_batch and max_len <= self.max_len:
            return
        S, B, H, L, D = self.k.shape
        rows, length = max(B, max_batch), max(L, max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(S, rows, H, length, D)
            new[:, :B, :, :L] = old
            setattr(self, name, new)
        self.max_batch, self.max_len = rows, length

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src over row dst (all slots): keeps rows dense when a sequence leaves."""
        if src != dst:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]
