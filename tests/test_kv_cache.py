"""The paged KV cache on its own: blocks per (sequence, slot), writes and reads through the block table, the free
list, and prefix blocks that are found by their tokens, shared by reference count and evicted least recently used."""

from __future__ import annotations

import pytest
import torch

from server.engine.kv_cache import CacheFullError, PagedKVCache

KV, HD, BLOCK = 2, 4, 4
SLOTS = ((0, 0), (1, 0), (2, 0))


def cache(blocks: int = 32, max_len: int = 32) -> PagedKVCache:
    return PagedKVCache(num_blocks=blocks, block_size=BLOCK, max_len=max_len, n_kv_heads=KV, head_dim=HD,
                        dtype=torch.float32, device="cpu")


def test_a_sequence_holds_slots_times_length_in_blocks_and_frees_them():
    c = cache()
    c.reserve(1, SLOTS, 5)  # 2 blocks per slot
    assert c.used_blocks == 6
    c.reserve(1, SLOTS, 8)  # still 2
    assert c.used_blocks == 6
    c.reserve(2, SLOTS[:1], 1)
    assert c.used_blocks == 7
    c.free(1)
    assert c.used_blocks == 1
    c.free(2)
    assert c.used_blocks == 0


def test_writes_land_in_their_own_blocks_and_read_back_in_order():
    c = cache()
    c.reserve(1, SLOTS, 6)
    c.reserve(2, SLOTS, 3)
    rows = torch.tensor([c.table_row(1, (1, 0)), c.table_row(2, (1, 0))])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    k = torch.arange(2 * 6 * KV * HD, dtype=torch.float32).view(2 * 6, KV, HD)
    c.write(c.locate(rows, positions, valid).reshape(-1), torch.cat([k, -k], dim=1))
    keys, values = c.read(c.block_ids(rows, 2))  # [2, kv, 8, hd]
    assert torch.equal(keys[0, :, :6].transpose(0, 1), k[:6])
    assert torch.equal(values[0, :, :6].transpose(0, 1), -k[:6])
    assert torch.equal(keys[1, :, :3].transpose(0, 1), k[6:9])
    assert not keys[1, :, 3].any() and not values[1, :, 3].any(), "padding went to the scratch block, not row 2"
    other = c.read(c.block_ids(torch.tensor([c.table_row(1, (0, 0))]), 2))[0]
    assert not other.any(), "another slot of the same sequence is untouched"


def test_freed_blocks_are_reused_first():
    c = cache()
    c.reserve(1, SLOTS, 4)
    first = set(c._held[1][(0, 0)])
    c.free(1)
    c.reserve(2, SLOTS[:1], 4)
    assert set(c._held[2][(0, 0)]) <= first | set(range(1, 4))


def test_registered_prefix_blocks_are_found_shared_and_outlive_their_sequence():
    c = cache()
    prompt = list(range(100, 111))  # 2 full blocks + 3 tokens
    c.reserve(1, SLOTS, len(prompt))
    c.register(1, "full", SLOTS, prompt, 0, 2)
    held = c.used_blocks
    c.free(1)
    assert c.used_blocks == 0, "unheld registered blocks do not count as used"
    found = c.lookup("full", prompt[:8] + [7, 7, 7], 2)
    assert len(found) == 2
    assert c.lookup("skip:1-1", prompt, 2) == [], "another schedule never shares"
    assert len(c.lookup("full", prompt[:4] + [0] * 7, 2)) == 1, "the chain stops at the first different block"
    c.adopt(2, SLOTS, found)
    c.reserve(2, SLOTS, 12)
    assert c.used_blocks == held, "two adopted blocks per slot plus one new one"
    assert c._held[2][(1, 0)][:2] == [e.blocks[1] for e in found]


def test_eviction_takes_the_least_recently_used_unheld_prefix():
    c = cache(blocks=7)  # 6 usable: two prefixes of one block x 3 slots
    a, b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    for seq, prompt in ((1, a), (2, b)):
        c.reserve(seq, SLOTS, 4)
        c.register(seq, "full", SLOTS, prompt, 0, 1)
        c.free(seq)
    assert c.lookup("full", a, 1)  # a is now the most recently used
    c.reserve(3, SLOTS, 4)  # needs 3 blocks: evicts b
    assert c.lookup("full", b, 1) == [] and c.lookup("full", a, 1)


def test_held_prefix_blocks_are_never_evicted():
    c = cache(blocks=7)
    c.reserve(1, SLOTS, 4)
    c.register(1, "full", SLOTS, [1, 2, 3, 4, 5], 0, 1)
    c.reserve(2, SLOTS, 4)  # the other three
    with pytest.raises(CacheFullError):
        c.reserve(3, SLOTS, 4)


def test_a_partly_agreeing_block_is_found_token_by_token_and_copied_not_shared():
    c = cache()
    prompt = list(range(100, 110))  # 2 full blocks + a partial one of 2 tokens
    c.reserve(1, SLOTS, len(prompt))
    entries = c.register(1, "full", SLOTS, prompt, 0, 3)
    assert len(entries) == 3 and entries[2].tokens == (108, 109), "the partial last block is registered too"
    rows = torch.tensor([c.table_row(1, s) for s in SLOTS])
    k = torch.randn(3 * 10, KV, HD)
    c.write(c.locate(rows, torch.arange(10).expand(3, 10), None).reshape(-1), torch.cat([k, -k], dim=1))
    assert c.lookup("full", prompt, 2) == entries[:2]
    # a prompt agreeing with block 1 for 3 tokens, then differing
    other = prompt[:7] + [0, 0, 0]
    assert c.lookup("full", other, 2) == entries[:1]
    found, agree = c.lookup_partial("full", entries[0].chain, other[4:8])
    assert found is entries[1] and agree == 3
    assert c.lookup_partial("full", entries[0].chain, [0, 0, 0, 0]) is None
    assert c.lookup_partial("skip:1-1", entries[0].chain, other[4:8]) is None, "another schedule never shares"
    c.adopt(2, SLOTS, entries[:1])
    assert c.copy(2, SLOTS, found)
    copies = [c._held[2][s][1] for s in SLOTS]
    assert not set(copies) & set(found.blocks), "private copies, not the shared blocks"
    assert all(c._refs[b] == 1 for b in found.blocks), "the source is held by its own sequence only"
    mine = c.read(c.block_ids(torch.tensor([c.table_row(2, s) for s in SLOTS]), 2))
    theirs = c.read(c.block_ids(rows, 2))
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])


def test_evicting_a_block_forgets_it_as_a_partial_match():
    c = cache(blocks=7)  # 6 usable: two one-block prefixes x 3 slots
    a, b = [1, 2, 3], [1, 2, 9]
    for seq, prompt in ((1, a), (2, b)):
        c.reserve(seq, SLOTS, 3)
        c.register(seq, "full", SLOTS, prompt, 0, 1)
        c.free(seq)
    assert c.lookup_partial("full", 0, [1, 2, 3, 4])[1] == 3  # a: now the most recently used
    c.reserve(3, SLOTS, 4)  # evicts b
    found, agree = c.lookup_partial("full", 0, [1, 2, 9, 9])
    assert found.tokens == (1, 2, 3) and agree == 2
    c.reserve(4, SLOTS, 4)  # evicts a
    assert c.lookup_partial("full", 0, [1, 2, 3, 4]) is None and c._children == {}


def test_a_copy_never_evicts_its_own_source():
    c = cache(blocks=4)  # 3 usable: one one-block prefix x 3 slots
    c.reserve(1, SLOTS, 3)
    (entry,) = c.register(1, "full", SLOTS, [1, 2, 3], 0, 1)
    c.free(1)
    assert not c.copy(2, SLOTS, entry), "the only free blocks are the source's"
    assert c.lookup_partial("full", 0, [1, 2, 5])[0] is entry and c.used_blocks == 0


def test_chains_whose_parents_differ_by_pythons_hash_modulus_do_not_collide():
    """Python's hash of ints works modulo 2**61 - 1: chains keyed by it collided for every later block once two
    prompts' chains differed by that modulus, and a lookup checks only a block's own tokens (a prompt could then
    adopt KV computed after another prompt). The chain is a 128-bit digest of the parent and the block."""
    from server.engine.kv_cache import chain_hashes, next_chain

    h = next_chain(0, [5, 6, 7, 8])
    assert next_chain(h, [9, 10]) != next_chain(h + (2**61 - 1), [9, 10])
    assert chain_hashes([5, 6, 7, 8, 9, 10], 4, 2) == [h, next_chain(h, [9, 10])]
    assert h.bit_length() > 64
