"""Attention that reads the paged pool in place gives what gathering each row's context gives. Slow: FlexAttention
compiles on the CPU (tens of seconds per shape)."""

import pytest
import torch

from server.model.paged_attention import gathered_attention, paged_attention, paged_layout

pytestmark = pytest.mark.slow


def _case(*, rows: int, T: int, lengths: list[int], kv: int, heads: int, block_size: int = 16, hd: int = 32,
          pool_blocks: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(pool_blocks, block_size, 2 * kv, hd, generator=g)
    width = -(-max(lengths) // block_size) + 2  # wider than any row needs, as the cache's tables are
    # every row its own blocks in a random order; two rows share their first block (a shared prefix)
    perm = (torch.randperm(pool_blocks - 1, generator=g) + 1)[: rows * width].view(rows, width)
    if rows > 1:
        perm[1, 0] = perm[0, 0]
    lens = torch.tensor(lengths)
    positions = (lens - T)[:, None] + torch.arange(T)[None, :]
    q = torch.randn(rows, heads, T, hd, generator=g)
    return q, pool, perm, positions, lens


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("window", [None, 20])
def test_in_place_matches_gathered(T: int, window: int | None) -> None:
    q, pool, tables, positions, lens = _case(rows=4, T=T, lengths=[37, 70, 16, 5 + T], kv=2, heads=6)
    nb = -(-int(lens.max()) // pool.shape[1])
    want = gathered_attention(q, pool, tables[:, :nb], positions, lens, window=window)
    layout = paged_layout(tables, positions, lens, block_size=pool.shape[1],
                          block_col=torch.zeros(pool.shape[0], dtype=torch.int32))
    got = paged_attention(q, pool, layout, slice(0, 4), window=window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a slice of the layout's rows (one layer application's) reads only those rows
    part = paged_attention(q[1:3], pool, layout, slice(1, 3), window=window)
    torch.testing.assert_close(part, want[1:3], atol=1e-5, rtol=1e-5)


def test_padded_queries_and_scale() -> None:
    """Rows with fewer new tokens than T (right padding past their length) agree on their real queries."""
    q, pool, tables, positions, lens = _case(rows=3, T=4, lengths=[33, 50, 20], kv=1, heads=4, seed=1)
    lens = lens - torch.tensor([0, 2, 3])  # rows 1 and 2 append only 2 and 1 of the 4 tokens
    nb = -(-int(lens.max()) // pool.shape[1]) + 1
    want = gathered_attention(q, pool, tables[:, :nb], positions, lens, scale=0.3)
    layout = paged_layout(tables, positions, lens, block_size=pool.shape[1],
                          block_col=torch.zeros(pool.shape[0], dtype=torch.int32))
    got = paged_attention(q, pool, layout, slice(0, 3), scale=0.3)
    real = positions < lens[:, None]  # [P, T]
    torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


def test_a_wrong_block_column_changes_the_result() -> None:
    """The mask reads logical positions through block_col: the test above would not catch a mask that ignores it
    unless a wrong column gives a different answer."""
    q, pool, tables, positions, lens = _case(rows=1, T=1, lengths=[40], kv=1, heads=2, seed=2)
    col = torch.zeros(pool.shape[0], dtype=torch.int32)
    layout = paged_layout(tables, positions, lens, block_size=pool.shape[1], block_col=col)
    good = paged_attention(q, pool, layout, slice(0, 1), window=8)
    col[tables[0, 2]] = 0  # the row's last block claims to be its first: outside the 8-token window
    bad = paged_attention(q, pool, layout, slice(0, 1), window=8)
    assert not torch.allclose(good, bad)


def test_a_pool_past_int32_offsets() -> None:
    """A pool of more than 2**31 elements (a server's pool easily is, on a GPU) is read in place where its element
    offsets pass int32: a row whose blocks lie at the pool's end gets what gathering gives. Only the blocks the rows
    use are written, so the pool costs their pages, not its 8.8 GB."""
    kv, hd, block_size, n_blocks = 2, 64, 16, 540_000
    pool = torch.empty(n_blocks, block_size, 2 * kv, hd)
    assert pool[-1].data_ptr() - pool.data_ptr() > 2**31 * pool.element_size()
    g = torch.Generator().manual_seed(3)
    tables = torch.tensor([[n_blocks - 1 - i for i in range(8)], [1 + i for i in range(8)]])
    for b in tables.flatten().tolist():
        pool[b] = torch.randn(block_size, 2 * kv, hd, generator=g)
    lens = torch.tensor([100, 100])
    positions = (lens - 1)[:, None]
    q = torch.randn(2, 4, 1, hd, generator=g)
    layout = paged_layout(tables, positions, lens, block_size=block_size,
                          block_col=torch.zeros(n_blocks, dtype=torch.int32))
    got = paged_attention(q, pool, layout, slice(0, 2))
    torch.testing.assert_close(got, gathered_attention(q, pool, tables[:, :7], positions, lens), atol=1e-5, rtol=1e-5)
