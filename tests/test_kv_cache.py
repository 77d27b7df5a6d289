"""The KV cache on its own (writes, returned prefixes, row moves), and its slot count under an executor."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from server.executor import Executor
from server.kv_cache import KVCache
from server.model import Transformer
from server.compiler import compile_schedule
from tests.reference import NUM_LAYERS, VOCAB, tiny_model

KV, HD, S, ROWS, LEN = 2, 4, 4, 3, 10


def cache() -> KVCache:
    return KVCache(
        num_slots=S, max_batch=ROWS, max_len=LEN, n_kv_heads=KV, head_dim=HD, dtype=torch.float32, device="cpu"
    )


def new_kv(G: int, B: int, T: int, seed: int) -> tuple[Tensor, Tensor]:
    """k, v [G, B, T, kv, hd] with distinct nonzero entries."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(G, B, T, KV, HD, generator=g) + 10, torch.randn(G, B, T, KV, HD, generator=g) - 10


def positions(start: list[int], T: int) -> Tensor:
    return torch.tensor(start)[:, None] + torch.arange(T)[None, :]


def test_single_row_update_writes_its_slots_row_and_positions() -> None:
    c = cache()
    k, v = new_kv(G=2, B=1, T=3, seed=0)
    keys, values = c.update(slice(1, 3), slice(2, 3), [4], positions([4], 3), k, v, kv_len=7)
    expected_k, expected_v = torch.zeros_like(c.k), torch.zeros_like(c.v)
    expected_k[1:3, 2, :, 4:7] = k[:, 0].transpose(1, 2)  # [G, kv, T, hd]
    expected_v[1:3, 2, :, 4:7] = v[:, 0].transpose(1, 2)
    torch.testing.assert_close(c.k, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(c.v, expected_v, rtol=0, atol=0)
    assert keys.shape == values.shape == (2, 1, KV, 7, HD)  # [G, B, kv, S, hd]
    torch.testing.assert_close(keys, c.k[1:3, 2:3, :, :7], rtol=0, atol=0)
    torch.testing.assert_close(values, c.v[1:3, 2:3, :, :7], rtol=0, atol=0)


def test_batched_update_writes_each_row_at_its_own_start() -> None:
    c = cache()
    start = [5, 1]
    k, v = new_kv(G=3, B=2, T=2, seed=1)
    keys, values = c.update(slice(0, 3), slice(1, 3), start, positions(start, 2), k, v, kv_len=7)
    expected_k, expected_v = torch.zeros_like(c.k), torch.zeros_like(c.v)
    for b, p in enumerate(start):
        expected_k[0:3, 1 + b, :, p : p + 2] = k[:, b].transpose(1, 2)
        expected_v[0:3, 1 + b, :, p : p + 2] = v[:, b].transpose(1, 2)
    torch.testing.assert_close(c.k, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(c.v, expected_v, rtol=0, atol=0)
    assert keys.shape == values.shape == (3, 2, KV, 7, HD)
    torch.testing.assert_close(keys, expected_k[0:3, 1:3, :, :7], rtol=0, atol=0)
    torch.testing.assert_close(values, expected_v[0:3, 1:3, :, :7], rtol=0, atol=0)


def test_update_appends_after_earlier_tokens() -> None:
    c = cache()
    k1, v1 = new_kv(G=1, B=2, T=3, seed=2)
    c.update(slice(2, 3), slice(0, 2), [0, 0], positions([0, 0], 3), k1, v1, kv_len=3)
    k2, v2 = new_kv(G=1, B=2, T=1, seed=3)
    keys, values = c.update(slice(2, 3), slice(0, 2), [3, 2], positions([3, 2], 1), k2, v2, kv_len=4)
    # Row 0 keeps its three tokens and appends at 3; row 1 (two real tokens, one padding) overwrites position 2.
    torch.testing.assert_close(keys[0, 0, :, :3], k1[0, 0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(keys[0, 0, :, 3], k2[0, 0, 0], rtol=0, atol=0)
    torch.testing.assert_close(keys[0, 1, :, :2], k1[0, 1, :2].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(values[0, 1, :, 2], v2[0, 1, 0], rtol=0, atol=0)
    assert (c.k[:2] == 0).all() and (c.k[3:] == 0).all()  # other slots untouched


def test_update_past_max_len_is_refused() -> None:
    c = cache()
    k, v = new_kv(G=1, B=1, T=2, seed=4)
    with pytest.raises(AssertionError, match="exceeds"):
        c.update(slice(0, 1), slice(0, 1), [LEN - 1], positions([LEN - 1], 2), k, v, kv_len=LEN + 1)


def test_move_row_copies_every_slot() -> None:
    c = cache()
    k, v = new_kv(G=S, B=ROWS, T=LEN, seed=5)
    c.update(slice(0, S), slice(0, ROWS), [0] * ROWS, positions([0] * ROWS, LEN), k, v, kv_len=LEN)
    before_k, before_v = c.k.clone(), c.v.clone()
    c.move_row(2, 0)
    torch.testing.assert_close(c.k[:, 0], before_k[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(c.v[:, 0], before_v[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(c.k[:, 1:], before_k[:, 1:], rtol=0, atol=0)  # source and others unchanged
    torch.testing.assert_close(c.v[:, 1:], before_v[:, 1:], rtol=0, atol=0)
    c.move_row(1, 1)
    torch.testing.assert_close(c.k[:, 1], before_k[:, 1], rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["full", "skip:3", "repeat", "loop:2-4x3", "schedule:0,1,1,2+3/sum,3-7"])
def test_executor_writes_one_slot_per_scheduled_attention(policy: str) -> None:
    """Slots equal the schedule's layer runs: a skipped layer gets none, a layer run twice gets two (with
    different keys, as it reads different inputs)."""
    sched = compile_schedule(policy, NUM_LAYERS)
    ex = Executor(Transformer(tiny_model("llama"), dtype=torch.float32, device="cpu"), sched, max_batch=1, max_len=8)
    assert ex.cache.num_slots == sched.num_slots
    T = 5
    ex.forward(torch.arange(T)[None] % VOCAB, rows=slice(0, 1), start=[0])
    written = ex.cache.k[:, 0, :, :T].flatten(1)  # [slots, kv * T * hd]
    assert (written != 0).any(dim=1).all(), "every slot is written"
    assert (ex.cache.k[:, 0, :, T:] == 0).all(), "nothing past the tokens"
    assert len({tuple(row.tolist()) for row in written}) == sched.num_slots, "each run has its own keys"


def test_grow_keeps_contents_and_accepts_longer_sequences() -> None:
    c = cache()
    k, v = new_kv(G=S, B=ROWS, T=LEN, seed=6)
    c.update(slice(0, S), slice(0, ROWS), [0] * ROWS, positions([0] * ROWS, LEN), k, v, kv_len=LEN)
    before_k, before_v = c.k.clone(), c.v.clone()
    c.grow(max_batch=ROWS + 2, max_len=2 * LEN)
    assert c.k.shape == c.v.shape == (S, ROWS + 2, KV, 2 * LEN, HD) and (c.max_batch, c.max_len) == (ROWS + 2, 2 * LEN)
    torch.testing.assert_close(c.k[:, :ROWS, :, :LEN], before_k, rtol=0, atol=0)
    torch.testing.assert_close(c.v[:, :ROWS, :, :LEN], before_v, rtol=0, atol=0)
    k2, v2 = new_kv(G=1, B=1, T=LEN, seed=7)
    keys, _ = c.update(slice(0, 1), slice(0, 1), [LEN], positions([LEN], LEN), k2, v2, kv_len=2 * LEN)
    torch.testing.assert_close(keys[0, 0, :, :LEN], before_k[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(keys[0, 0, :, LEN:], k2[0, 0].transpose(0, 1), rtol=0, atol=0)
