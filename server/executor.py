"""The executor: runs one schedule over a batch of sequences and owns their KV cache.

Each forward call appends T tokens to B dense cache rows (different lengths allowed) and returns logits; the
model's layer math gets its cache slot from the schedule step it runs, so a skipped layer is never written and a
layer run twice writes two slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from server.kv_cache import KVCache
from server.model import GroupMode, Transformer
from server.compiler import Schedule


class Executor:
    def __init__(
        self,
        model: Transformer,
        schedule: Schedule,
        *,
        max_batch: int,
        max_len: int,
        group_mode: GroupMode = "batched",
        initial_batch: int | None = None,
        initial_len: int | None = None,
    ) -> None:
        """max_batch, max_len: the most the cache may hold; it is allocated at initial_batch x initial_len (default:
        the maximum) and grows on `reserve`."""
        a = model.args
        assert schedule.num_layers == a.n_layers, "schedule compiled for another model"
        self.model, self.schedule, self.group_mode = model, schedule, group_mode
        self.limit_batch, self.limit_len = max_batch, max_len
        self.cache = KVCache(
            num_slots=max(1, schedule.num_slots),
            max_batch=min(max_batch, initial_batch or max_batch),
            max_len=min(max_len, initial_len or max_len),
            n_kv_heads=a.n_kv_heads,
            head_dim=a.head_dim,
            dtype=model.dtype,
            device=model.device,
        )

    @property
    def max_batch(self) -> int:
        return self.limit_batch

    @property
    def max_len(self) -> int:
        return self.limit_len

    def reserve(self, *, rows: int, length: int) -> None:
        """Make room for `rows` sequences of up to `length` tokens (within the limits), growing by doubling."""
        assert rows <= self.limit_batch and length <= self.limit_len, (rows, length)
        c = self.cache
        if rows > c.max_batch or length > c.max_len:
            grow_rows = rows if rows <= c.max_batch else min(self.limit_batch, max(rows, 2 * c.max_batch))
            grow_len = length if length <= c.max_len else min(self.limit_len, max(length, 2 * c.max_len))
            c.grow(max_batch=grow_rows, max_len=grow_len)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, *, rows: slice, start: list[int], logits_at: Tensor | None = None) -> Tensor:
        """tokens [B, T] appended after start[b] cached tokens in cache rows `rows`.

        logits_at: [B] index in T whose logits to return ([B, V]); None returns all positions ([B, T, V]).
        Rows shorter than T are right-padded: their padding writes cache positions past their length, which no
        valid query attends to and the next real token overwrites.
        """
        B, T = tokens.shape
        assert rows.stop - rows.start == B == len(start)
        ctx = self.model.context(rows=rows, start=start, num_new=T)
        h = self.model.embed_tokens(tokens)  # [B, T, d]
        for step in self.schedule.steps:
            h = self.model.run_step(h, step, ctx, self.cache, mode=self.group_mode)
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at]  # [B, d]
        return self.model.logits(h)

    def move_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)
