"""The paged KV cache: one pool of fixed-size blocks shared by every sequence and every slot.

A sequence holds blocks only for the slots its schedule runs (a `skip:10` row pays nothing for the skipped layers, a
`loop:x3` row pays for three occurrences) and only as far as it has grown: its memory is slots x length, rounded up
to the block size. Each (sequence, slot) pair owns one row of the block table, listing its blocks in order.
Pool layout [block, position in block, 2 x kv heads (keys, then values), head dim], so one write stores both and one
gather reads both; block 0 is scratch (padding writes land there) and is never handed out. Freed blocks go on a
stack and are reused first, so resident memory follows peak use.

Prefix reuse (automatic prefix caching, as in vLLM): a full block of a prompt is found by the hash of its tokens and
everything before it, per schedule (a schedule key and a block chain name the same keys and values only under the
same schedule) and per cache salt (`Request.prefix_key`: a tenant's salted prompts share no block with others'). A
registered block outlives its sequence while no one needs the memory: blocks held by no sequence
are evicted least recently used when the pool runs out of free ones. A sequence that finds its prompt's first blocks
adopts them (reference-counted, read only: a sequence writes only past its prompt's full blocks), and each entry
can carry an opaque payload (the prompt logprobs of its tokens, and of the token after it).
A prompt's last, partly filled block is registered too, and the block after the shared full ones is matched token by
token among the entries that follow the same chain (as SGLang's radix cache shares any prefix, not only whole
blocks): a sequence whose prompt agrees with such a block for m tokens takes a private copy of it (copy on write)
and computes from there, so a context shared by several continuations is computed once to the token.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from server.engine.transfer import to_device
from server.policy.compiler import Slot


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


@dataclass
class CachedBlock:
    """A registered prompt block: one physical block per slot of its schedule, in `Schedule.slots` order."""

    tokens: tuple[int, ...]  # the block's tokens (checked on lookup, as a second guard to the chain's digest)
    blocks: tuple[int, ...]
    chain: int  # hash of its tokens and everything before it
    parent: int  # the chain hash of the block before it (0 for a prompt's first)
    scores: Any = None  # payload for the block's own tokens (set by whoever computed them)
    next: dict[int, Any] = field(default_factory=dict)  # token after the block -> its payload


def chain_hashes(tokens: list[int], block_size: int, count: int) -> list[int]:
    """Hash of each of the first `count` blocks and everything before it (the last may be partly filled)."""
    out, h = [], 0
    for j in range(count):
        h = next_chain(h, tokens[j * block_size : (j + 1) * block_size])
        out.append(h)
    return out


def next_chain(parent: int, block: list[int]) -> int:
    """The chain hash of `block` after the chain `parent`: a 128-bit BLAKE2b digest. Python's hash of a tuple of ints
    is unsalted and works modulo 2**61 - 1, so chains whose parents differed by a multiple of it collided for every
    later block, and a lookup compares only a block's own tokens: someone could search offline for such a pair of
    prompts and read or poison another's cached KV (vLLM's CVE-2025-25183 is the same class of bug)."""
    data = parent.to_bytes(24, "little") + array("q", block).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zeroed pool. On the CPU through calloc (numpy), whose untouched pages cost no memory: resident memory grows
    with the blocks in use (handed out low first), not with the budget."""
    if device.type == "cpu" and dtype in (torch.float32, torch.float16, torch.float64):
        import numpy as np

        return torch.from_numpy(np.zeros(shape, dtype=str(dtype).removeprefix("torch.")))
    return torch.zeros(shape, dtype=dtype, device=device)


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
        self.pool = _zeros((num_blocks, block_size, 2 * n_kv_heads, head_dim), dtype, torch.device(device))
        # one table row per (sequence, slot) that can hold a block, and one more that only ever names the scratch
        # block: padding rows of a captured decode step read and write through it
        self.tables = torch.zeros(num_blocks + 1, self.max_blocks, dtype=torch.long, device=device)
        self.pad_row = num_blocks
        self._free_blocks = list(range(num_blocks - 1, 0, -1))  # a stack: low blocks first
        self._free_rows = list(range(num_blocks - 1, -1, -1))
        self._rows: dict[int, dict[Slot, int]] = {}  # sequence -> slot -> table row
        self._blocks: dict[int, int] = {}  # sequence -> blocks held per slot
        self._held: dict[int, dict[Slot, list[int]]] = {}  # sequence -> slot -> its blocks in order
        self._refs = [0] * num_blocks  # sequences holding each block
        self._in_use = 0  # blocks with a reference
        self._cached = 0  # registered blocks without a reference
        self._prefix: OrderedDict[tuple[str, int], CachedBlock] = OrderedDict()  # least recently used first
        self._registered: dict[int, tuple[str, int]] = {}  # block -> its prefix entry
        self._children: dict[tuple[str, int], set[int]] = {}  # (schedule, chain hash) -> chains of the next blocks

    @property
    def num_blocks(self) -> int:
        """Blocks that can be handed out (the scratch block excluded)."""
        return self.pool.shape[0] - 1

    @property
    def used_blocks(self) -> int:
        """Blocks held by sequences (registered prefix blocks that no one holds are free to evict: not counted)."""
        return self._in_use

    @property
    def cached_blocks(self) -> int:
        """Registered prefix blocks that no sequence holds (kept for reuse, evictable)."""
        return self._cached

    def bytes_per_block(self) -> int:
        return self.pool[0].numel() * self.pool.element_size()

    def reserve(self, seq: int, slots: tuple[Slot, ...], length: int) -> None:
        """Make every slot of `seq` hold at least `length` tokens' worth of blocks."""
        need = -(-length // self.block_size)
        have = self._blocks.get(seq, 0)
        if need <= have:
            return
        assert need <= self.max_blocks, f"{length} tokens exceed the cache's {self.max_blocks * self.block_size}"
        if self._available() < len(slots) * (need - have):
            raise CacheFullError(f"sequence {seq} needs {len(slots) * (need - have)} more KV blocks; "
                                 f"{self._available()} free")
        rows = self._table_rows(seq, slots)
        table_rows, cols, blocks = [], [], []
        for s in slots:
            for col in range(have, need):
                block = self._take()
                self._hold(seq, s, block)
                table_rows.append(rows[s])
                cols.append(col)
                blocks.append(block)
        self._set_tables(table_rows, cols, blocks)
        self._blocks[seq] = need

    def free(self, seq: int) -> None:
        """`seq` left: blocks no one else holds return to the pool (registered ones stay findable until evicted)."""
        for blocks in self._held.pop(seq, {}).values():
            for b in reversed(blocks):
                self._unref(b)
        self._free_rows.extend(self._rows.pop(seq, {}).values())
        self._blocks.pop(seq, None)

    def truncate(self, seq: int | str, length: int) -> None:
        """Keep only the blocks `seq`'s first `length` tokens use, in every slot (a rollback); the rest return to
        the pool. Positions past `length` in the last kept block are stale and get overwritten."""
        keep = -(-length // self.block_size)
        if self._blocks.get(seq, 0) <= keep:
            return
        for blocks in self._held[seq].values():
            for b in reversed(blocks[keep:]):
                self._unref(b)
            del blocks[keep:]
        self._blocks[seq] = keep

    def trim(self, limit: int) -> None:
        """Evict least recently used prefix entries that no sequence holds until at most `limit` blocks are kept
        for reuse alone."""
        while self._cached > limit and self._evict():
            pass

    # -- prefix reuse ----------------------------------------------------------------------------------------------

    def lookup(self, key: str, tokens: list[int], count: int) -> list[CachedBlock]:
        """The registered blocks that continue the first `count` full blocks of `tokens` under schedule `key`,
        longest run from the start (marked recently used)."""
        found = []
        for j, h in enumerate(chain_hashes(tokens, self.block_size, count)):
            entry = self._prefix.get((key, h))
            if entry is None or entry.tokens != tuple(tokens[j * self.block_size : (j + 1) * self.block_size]):
                break
            found.append(entry)
        self._touch(key, found)
        return found

    def lookup_partial(self, key: str, parent: int, tokens: list[int]) -> tuple[CachedBlock, int] | None:
        """Among the registered blocks that follow chain `parent` under `key`, the one that agrees longest with
        `tokens` (the next block's worth of a prompt) and for how many tokens; None when none agrees on one."""
        best, agree = None, 0
        for h in self._children.get((key, parent), ()):
            entry = self._prefix[(key, h)]
            m = 0
            for a, b in zip(entry.tokens, tokens):
                if a != b:
                    break
                m += 1
            if m > agree:
                best, agree = entry, m
        if best is None:
            return None
        self._prefix.move_to_end((key, best.chain))
        return best, agree

    def copy(self, seq: int, slots: tuple[Slot, ...], entry: CachedBlock) -> bool:
        """`seq` takes private copies of `entry`'s blocks as its next block (copy on write: it will overwrite the
        part that differs). False, and nothing changed, when the pool cannot spare the blocks without evicting
        `entry` itself."""
        col = self._blocks.get(seq, 0)
        assert col < self.max_blocks
        pinned = [b for b in entry.blocks if self._refs[b] == 0]
        self._in_use += len(pinned)  # held for the copy, so eviction cannot take them
        try:
            if self._available() < len(slots):
                return False
            fresh = [self._take() for _ in slots]
        finally:
            self._in_use -= len(pinned)
        dev = self.pool.device
        self.pool[to_device(torch.tensor(fresh), dev)] = self.pool[to_device(torch.tensor(entry.blocks), dev)]
        rows = self._table_rows(seq, slots)
        for s, b in zip(slots, fresh):
            self._hold(seq, s, b)
        self._set_tables([rows[s] for s in slots], [col] * len(slots), fresh)
        self._blocks[seq] = col + 1
        return True

    def adopt(self, seq: int, slots: tuple[Slot, ...], entries: list[CachedBlock]) -> None:
        """A new sequence takes `entries` as its first blocks (before any of its own)."""
        assert self._blocks.get(seq, 0) == 0, "adopt before the sequence holds blocks"
        if not entries:
            return
        rows = self._table_rows(seq, slots)
        table_rows, cols, blocks = [], [], []
        for col, entry in enumerate(entries):
            for s, b in zip(slots, entry.blocks):
                self._hold(seq, s, b)
                table_rows.append(rows[s])
                cols.append(col)
                blocks.append(b)
        self._set_tables(table_rows, cols, blocks)
        self._blocks[seq] = len(entries)

    def register(self, seq: int, key: str, slots: tuple[Slot, ...], tokens: list[int], first: int, count: int,
                 ) -> list[CachedBlock]:
        """Make blocks first..count-1 of `seq`'s prompt findable (the last may be partly filled: only copies of it
        are ever shared); returns the entries of blocks 0..count-1 (existing ones are kept: another sequence
        registered the same tokens first)."""
        entries, parent = [], 0
        for j, h in enumerate(chain_hashes(tokens, self.block_size, count)):
            entry = self._prefix.get((key, h))
            if entry is None and j >= first:
                blocks = tuple(self._held[seq][s][j] for s in slots)
                entry = CachedBlock(tuple(tokens[j * self.block_size : (j + 1) * self.block_size]), blocks, h, parent)
                self._prefix[(key, h)] = entry
                self._children.setdefault((key, parent), set()).add(h)
                for b in blocks:
                    self._registered[b] = (key, h)
            if entry is None:
                break
            entries.append(entry)
            parent = h
        self._touch(key, entries)
        return entries

    def _touch(self, key: str, chain: list[CachedBlock]) -> None:
        """Mark a chain recently used, its first block most recently: eviction takes a chain's tail first, so what
        stays is always a usable prefix."""
        for entry in reversed(chain):
            self._prefix.move_to_end((key, entry.chain))

    # -- internals --------------------------------------------------------------------------------------------------

    def _table_rows(self, seq: int, slots: tuple[Slot, ...]) -> dict[Slot, int]:
        rows = self._rows.get(seq)
        if rows is None:
            rows = self._rows[seq] = {}
            self._held[seq] = {}
        for s in slots:
            if s not in rows:
                assert self._free_rows, "more (sequence, slot) pairs than blocks: admission should prevent it"
                rows[s] = self._free_rows.pop()
        return rows

    def _hold(self, seq: int, slot: Slot, block: int) -> None:
        self._held[seq].setdefault(slot, []).append(block)
        if self._refs[block] == 0:
            self._in_use += 1
            self._cached -= block in self._registered
        self._refs[block] += 1

    def _unref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._in_use -= 1
            if block in self._registered:
                self._cached += 1
            else:
                self._free_blocks.append(block)

    def _available(self) -> int:
        return self.num_blocks - self._in_use

    def _take(self) -> int:
        """A free block, evicting the least recently used unheld prefix entry when none is free."""
        while not self._free_blocks:
            assert self._evict(), "no free block and nothing to evict"
        return self._free_blocks.pop()

    def _evict(self) -> bool:
        """Drop the least recently used prefix entry that no sequence holds; False when there is none."""
        victim = next((k for k, e in self._prefix.items() if all(self._refs[b] == 0 for b in e.blocks)), None)
        if victim is None:
            return False
        entry = self._prefix.pop(victim)
        siblings = self._children[(victim[0], entry.parent)]
        siblings.discard(entry.chain)
        if not siblings:
            del self._children[(victim[0], entry.parent)]
        for b in entry.blocks:
            del self._registered[b]
            self._free_blocks.append(b)
        self._cached -= len(entry.blocks)
        return True

    def _set_tables(self, rows: list[int], cols: list[int], blocks: list[int]) -> None:
        """One asynchronous copy: a decode step queued while the last one runs (overlapped decoding) must not wait
        for the device, as `torch.tensor(..., device="cuda")` does."""
        host = torch.tensor([rows, cols, blocks], dtype=torch.long)
        rows_, cols_, blocks_ = to_device(host, self.tables.device)
        self.tables[rows_, cols_] = blocks_

    def table_row(self, seq: int, slot: Slot) -> int:
        return self._rows[seq][slot]

    def locate(self, rows: Tensor, positions: Tensor, valid: Tensor | None) -> Tensor:
        """rows [P] table rows, positions [P, T] -> flat pool indices [P, T] (block x block_size + offset) where
        their new keys and values go; positions that are padding (not valid) go to the scratch block."""
        blocks = self.tables[rows].gather(1, positions // self.block_size)
        if valid is not None:
            blocks = torch.where(valid, blocks, 0)
        return blocks * self.block_size + positions % self.block_size

    def block_ids(self, rows: Tensor, num_blocks: int) -> Tensor:
        """rows [P] table rows -> their first `num_blocks` block ids [P, num_blocks]."""
        return self.tables[rows, :num_blocks]

    def write(self, at: Tensor, kv: Tensor) -> None:
        """at [N] flat pool indices (from `locate`); kv [N, 2 kv, hd]: keys, then values (the pool's layout)."""
        self.pool.view(-1, *self.pool.shape[2:])[at] = kv

    def read(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """blocks [P, nb] -> keys, values [P, kv, nb x block, hd] (positions past a row's length are stale)."""
        P, nb = blocks.shape
        kv = self.pool[blocks].view(P, nb * self.block_size, *self.pool.shape[2:])  # [P, S, 2 kv, hd]
        return kv[:, :, : self.n_kv_heads].transpose(1, 2), kv[:, :, self.n_kv_heads :].transpose(1, 2)
