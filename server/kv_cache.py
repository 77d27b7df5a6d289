"""The paged KV cache: one pool of fixed-size blocks shared by every sequence and every slot.

A sequence holds blocks only for the slots its schedule runs (a `skip:10` row pays nothing for the skipped layers, a
`loop:x3` row pays for three occurrences) and only as far as it has grown: its memory is slots x length, rounded up
to the block size. Each (sequence, slot) pair owns one row of the block table, listing its blocks in order.
Pool layout [block, position in block, 2 x kv heads (keys, then values), head dim], so one write stores both and one
gather reads both; block 0 is scratch (padding writes land there) and is never handed out. Freed blocks go on a
stack and are reused first, so resident memory follows peak use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from server.compiler import Slot


def default_budget_tokens(*, bytes_per_slot_token: int, demand: int, device: torch.device,
                          fraction: float = 0.25) -> int:
    """KV budget in slot-tokens when none is set: what `demand` (max_num_seqs x max_model_len x layers) asks for,
    capped by `fraction` of the memory free on the device now (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _mem_available()
    return max(1, min(demand, int(free * fraction) // bytes_per_slot_token))


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class CacheFullError(RuntimeError):
    """More blocks asked for than the pool has free; admission control should have prevented it."""


class PagedKVCache:
    def __init__(
        self, *, num_blocks: int, block_size: int, max_len: int, n_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        assert num_blocks >= 2, "the pool needs the scratch block and at least one more"
        self.block_size = block_size
        self.max_blocks = -(-max_len // block_size)  # per (sequence, slot)
        self.n_kv_heads = n_kv_heads
        self.pool = torch.zeros(num_blocks, block_size, 2 * n_kv_heads, head_dim, dtype=dtype, device=device)
        self.tables = torch.zeros(num_blocks, self.max_blocks, dtype=torch.long, device=device)
        self._free_blocks = list(range(num_blocks - 1, 0, -1))  # a stack: low blocks first
        self._free_rows = list(range(num_blocks - 1, -1, -1))
        self._rows: dict[int, dict[Slot, int]] = {}  # sequence -> slot -> table row
        self._blocks: dict[int, int] = {}  # sequence -> blocks held per slot
        self._held: dict[int, list[int]] = {}  # sequence -> every block it holds

    @property
    def num_blocks(self) -> int:
        """Blocks that can be handed out (the scratch block excluded)."""
        return self.pool.shape[0] - 1

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    def blocks_for(self, num_slots: int, length: int) -> int:
        """Blocks a sequence of `length` tokens needs under a schedule of `num_slots` slots."""
        return num_slots * -(-length // self.block_size)

    def bytes_per_block(self) -> int:
        return self.pool[0].numel() * self.pool.element_size()

    def reserve(self, seq: int, slots: tuple[Slot, ...], length: int) -> None:
        """Make every slot of `seq` hold at least `length` tokens' worth of blocks."""
        need = -(-length // self.block_size)
        have = self._blocks.get(seq, 0)
        if need <= have:
            return
        assert need <= self.max_blocks, f"{length} tokens exceed the cache's {self.max_blocks * self.block_size}"
        rows = self._rows.get(seq)
        if rows is None:
            rows = self._rows[seq] = {}
            self._held[seq] = []
        new_rows = [s for s in slots if s not in rows]
        if len(self._free_blocks) < len(slots) * (need - have) or len(self._free_rows) < len(new_rows):
            raise CacheFullError(f"sequence {seq} needs {len(slots) * (need - have)} more KV blocks; "
                                 f"{len(self._free_blocks)} free")
        for s in new_rows:
            rows[s] = self._free_rows.pop()
        table_rows, blocks = [], []
        for s in slots:
            for _ in range(have, need):
                block = self._free_blocks.pop()
                table_rows.append(rows[s])
                blocks.append(block)
        self._held[seq].extend(blocks)
        cols = [have + (i % (need - have)) for i in range(len(blocks))]
        dev = self.tables.device
        self.tables[torch.tensor(table_rows, device=dev), torch.tensor(cols, device=dev)] = torch.tensor(blocks, device=dev)
        self._blocks[seq] = need

    def free(self, seq: int) -> None:
        """Return every block and table row of `seq` to the pool."""
        self._free_blocks.extend(reversed(self._held.pop(seq, [])))
        self._free_rows.extend(self._rows.pop(seq, {}).values())
        self._blocks.pop(seq, None)

    def table_row(self, seq: int, slot: Slot) -> int:
        return self._rows[seq][slot]

    def locate(self, rows: Tensor, positions: Tensor, valid: Tensor | None) -> Tensor:
        """rows [P] table rows, positions [P, T] -> flat pool indices [P, T] (block x block_size + offset) where
        their new keys and values go; positions that are padding (not valid) go to the scratch block."""
        blocks = self.tables[rows].gather(1, positions // self.block_size)
        if valid is not None:
            blocks = torch.where(valid, blocks, 0)
        return blocks * self.block_size + positions % self.block_size

    def blocks(self, rows: Tensor, num_blocks: int) -> Tensor:
        """rows [P] table rows -> their first `num_blocks` block ids [P, num_blocks]."""
        return self.tables[rows, :num_blocks]

    def write(self, at: Tensor, k: Tensor, v: Tensor) -> None:
        """at [N] flat pool indices (from `locate`); k, v [N, kv, hd]."""
        self.pool.view(-1, *self.pool.shape[2:])[at] = torch.cat([k, v], dim=1)

    def read(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """blocks [P, nb] -> keys, values [P, kv, nb x block, hd] (positions past a row's length are stale)."""
        P, nb = blocks.shape
        kv = self.pool[blocks].view(P, nb * self.block_size, *self.pool.shape[2:])  # [P, S, 2 kv, hd]
        return kv[:, :, : self.n_kv_heads].transpose(1, 2), kv[:, :, self.n_kv_heads :].transpose(1, 2)
