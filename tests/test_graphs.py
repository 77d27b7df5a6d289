"""The captured decode step's padded path (server.engine.graphs), on the CPU: rows grouped by schedule and padded to
buckets, padding rows on the scratch block, the context bucketed. Capture itself needs CUDA (tests/test_gpu.py); here
the same padded step runs eagerly and must give what the unpadded step gives."""

from __future__ import annotations

import pytest
import torch

from server.engine.executor import Row
from server.engine.generate import Engine
from server.engine.graphs import bucket, group_buckets
from server.engine.sampling import SamplingParams
from server.model import triton_attention
from tests.conftest import CharTokenizer, tiny_llama
from tests.reference import tiny_model

POLICIES = ["full", "skip:2", "pairs", "full", "skip:2", "parallel:1-4", "full"]
PROMPTS = [[5 + (i * 7 + j) % 90 for j in range(3 + 4 * i)] for i in range(len(POLICIES))]  # 3..27 tokens


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 63, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 64, 64, 72]


def test_group_buckets():
    """Every group pads to the largest one's bucket while the step stays within the bound, else each to its own."""
    assert group_buckets([3, 1, 2]) == [4, 4, 4]
    assert group_buckets([9, 1]) == [16, 16]
    assert group_buckets([20, 1, 3], shared_up_to=72) == [24, 24, 24]
    assert group_buckets([20, 1, 3], shared_up_to=64) == [24, 1, 4]  # 3 x 24 > 64: each its own
    assert group_buckets([3, 1, 2], shared_up_to=0) == [4, 1, 2]
    assert group_buckets([5], shared_up_to=0) == group_buckets([5]) == [8]


def _generate(hf, *, graphs, attention="gathered", fuse=False, **params):
    eng = Engine.from_hf(hf, CharTokenizer(), device="cpu", graphs=graphs, attention=attention, fuse=fuse)
    got = eng.generate(PROMPTS, policy=POLICIES, params=SamplingParams(ignore_eos=True, logprobs=2, **params))
    return got, eng


@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_padded_decode_equals_unpadded(model):
    """Mixed policies, rows of different lengths crossing context buckets (3 to 27 + 30 tokens: 1 to 4 blocks)."""
    hf = tiny_llama() if model == "llama" else tiny_model("gemma3")
    want, _ = _generate(hf, graphs=False, max_tokens=30)
    got, eng = _generate(hf, graphs=True, max_tokens=30)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=1e-4, atol=1e-4)


def test_a_dropped_batch_frees_its_kv_pool_at_once(tiny_engine):
    """The decode steps held their executor, which holds them: a cycle that kept a dropped batch's KV pool (and on
    CUDA its graphs) alive until the cyclic collector ran. Collection off, the pool goes with the batch."""
    import gc
    import weakref

    eng = Engine(tiny_engine.model, tiny_engine.tokenizer, eos_ids=tiny_engine.eos_ids, config=tiny_engine.config,
                 graphs=True)
    batch = eng.new_batch(max_len=32, num_blocks=100)
    eng.generate([[5, 6, 7], [8, 9]], params=SamplingParams(max_tokens=5, ignore_eos=True), batch=batch)
    assert batch.executor.graphs is not None and batch.executor.graphs.layouts > 0
    pool = weakref.ref(batch.executor.cache.pool)
    gc.disable()
    try:
        del batch
        assert pool() is None, "the pool outlived its batch"
    finally:
        gc.enable()


def test_rotary_tables_a_graph_may_read_outlive_their_growth(tiny_engine):
    """A captured graph reads the rotary tables where they lay at its capture; a later, longer batch on the same model
    grows them. The old ones must stay allocated (on CUDA a graph would read freed memory), with the same values."""
    import gc
    import weakref

    model = tiny_engine.model
    cos = model._tables[False][0]
    before, held = cos.clone(), weakref.ref(cos)
    del cos
    size = model._tables[False][0].shape[0]
    model.rope(torch.zeros(1, 1, dtype=torch.long), top=4 * size)
    gc.collect()
    assert model._tables[False][0].shape[0] >= 4 * size and held() is not None
    torch.testing.assert_close(held(), before)
    torch.testing.assert_close(model._tables[False][0][:size], before)


def test_padded_decode_samples_the_same():
    """Seeded sampling draws from the real rows' logits only: padding rows change nothing."""
    hf = tiny_llama()
    want, _ = _generate(hf, graphs=False, max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    got, _ = _generate(hf, graphs=True, max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.parametrize(("attention", "model"), [("in_place", "llama"), ("triton", "llama"), ("triton", "gemma3")])
def test_padded_decode_attention_in_place(attention, model):
    """Padded steps whose attention reads the pool where it lies (FlexAttention, or the Triton kernel in Triton's
    interpreter), covering every block of the table: padding rows read only the scratch block. Gemma 3's
    `parallel:1-4` groups windowed and global layers: the kernel runs once per layer of the group, each its own
    window."""
    if attention == "triton" and not triton_attention.available():
        pytest.skip("needs the triton package")
    hf = tiny_llama() if model == "llama" else tiny_model("gemma3")
    want, _ = _generate(hf, graphs=False, max_tokens=6)
    got, _ = _generate(hf, graphs=True, attention=attention, max_tokens=6)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_fused_decode_equals_unfused(model):
    """The padded step with its layer math through torch.compile (Inductor's C++ here, Triton on CUDA): the same
    tokens and logprobs as the eager step, over mixed policies (groups of two layers, shared and own inputs; Gemma's
    q/k norms, post-norms and windowed layers), and the compiled functions really ran."""
    from torch._dynamo.utils import counters

    hf = tiny_llama() if model == "llama" else tiny_model("gemma3")
    want, _ = _generate(hf, graphs=False, max_tokens=12)
    before = counters["frames"]["ok"]
    got, eng = _generate(hf, graphs=True, fuse=True, max_tokens=12)
    assert counters["frames"]["ok"] > before  # Dynamo compiled frames for this engine's steps
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=1e-4, atol=1e-4)


def test_fusing_is_refused_without_captured_steps():
    with pytest.raises(ValueError, match="fuse needs captured decode steps"):
        Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=False, fuse=True)


def test_warm_up_makes_the_first_layouts_and_frees_its_blocks():
    """Warm-up decodes placeholder rows (one, then two) under a schedule: their layouts exist before any request, the
    pool is as it was, and a request of that schedule then finds its layout (no new one); a pool too small for two
    rows warms up one."""
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    batch = eng.new_batch(max_len=32, num_blocks=50)
    graphs, cache = batch.executor.graphs, batch.executor.cache
    batch.warm_up(eng.compile("full"))
    assert graphs.stats()["graphs"] == 2 and cache.used_blocks == 0
    got = eng.generate([[5, 6, 7]], params=SamplingParams(max_tokens=4, ignore_eos=True), batch=batch)[0]
    assert len(got.token_ids) == 4 and graphs.stats()["graphs"] == 2  # 1 row, contexts inside one block
    assert got.token_ids == eng.generate([[5, 6, 7]], params=SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids

    small = eng.new_batch(max_len=32, num_blocks=eng.compile("full").num_slots + 2)  # one row's worth
    small.warm_up(eng.compile("full"))
    assert small.executor.graphs.stats()["graphs"] == 1 and small.executor.cache.used_blocks == 0


def test_warm_up_without_captured_steps_does_nothing():
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu")  # the CPU default: no captured steps
    batch = eng.new_batch(max_len=32, num_blocks=50)
    batch.warm_up(eng.compile("full"))
    assert batch.executor.graphs is None and batch.executor.cache.used_blocks == 0


def test_rows_joining_and_leaving_keep_the_layout():
    """A layout is (schedules, each group's bucket, context bucket): a row joining or leaving inside its group's bucket
    reuses the layout (on CUDA: replays the same graph), and a group crossing a bucket adds one."""
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    batch = eng.new_batch(max_len=64, num_blocks=200)
    graphs = batch.executor.graphs
    params = SamplingParams(max_tokens=40, ignore_eos=True)

    def add(policy: str) -> None:
        batch.add([eng.new_sequence([5, 6, 7], params, eng.compile(policy))])

    add("full")
    add("skip:2")
    batch.step()
    assert graphs.stats()["graphs"] == 1  # full x 1, skip:2 x 1
    add("full")
    batch.step()
    assert graphs.stats()["graphs"] == 2  # full crossed 1 -> 2
    add("full")
    batch.step()
    assert graphs.stats()["graphs"] == 3  # full 3 rows: bucket 4
    add("full")
    batch.step()
    batch.remove(batch.sequences[0].id)
    batch.step()
    batch.step()
    assert graphs.stats()["graphs"] == 3  # 4 and then 3 full rows: both bucket 4, the same layout


def test_kept_layouts_stay_within_their_byte_bound():
    """Layouts are dropped least recently used first while the bytes they own (static inputs and the output logits
    [Bp, V] float32 a graph keeps) pass the bound; the newest stays even alone above it, and counting is the same on
    the CPU as on CUDA."""
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    batch = eng.new_batch(max_len=64, num_blocks=300)
    graphs = batch.executor.graphs
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    batch.add([eng.new_sequence([5, 6, 7], params, eng.compile("full"))])
    batch.step()
    one = graphs.stats()["kept_bytes"]  # a 1-row layout
    assert one > eng.vocab_size * 4
    graphs.max_bytes = int(2.5 * one)
    batch.add([eng.new_sequence([5, 6, 8], params, eng.compile("full"))])
    batch.step()  # a 2-row layout: ~3x one together, so the 1-row layout goes
    assert graphs.stats()["graphs"] == 1 and graphs.stats()["evictions"] == 1
    batch.add([eng.new_sequence([5, 6, 9], params, eng.compile("full"))])
    batch.step()  # 3 rows pad to 4: that layout alone passes the bound, and stays
    stats = graphs.stats()
    assert stats["graphs"] == 1 and stats["evictions"] == 2 and stats["kept_bytes"] > graphs.max_bytes


@pytest.mark.parametrize(("shared_up_to", "layouts"), [(64, 1), (0, 2)])
def test_rows_moving_between_groups_keep_a_shared_layout(shared_up_to, layouts):
    """With one shared bucket, the split of rows between schedules is data: 2 full + 1 skip:2, then 1 full + 2
    skip:2 run one layout (each group padded to 2), and the step's layout hit rate counts the second step's reuse;
    with a bucket per group they are two layouts. (That padded steps decode what unpadded ones do, shared buckets
    included, is `test_padded_decode_equals_unpadded`'s: its 4 groups of 1 to 3 rows all pad to 4.)"""
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    batch = eng.new_batch(max_len=64, num_blocks=200)
    graphs = batch.executor.graphs
    graphs.shared_up_to = shared_up_to
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    seqs = [eng.new_sequence([5, 6, 7 + i], params, eng.compile(p)) for i, p in enumerate(["full", "full", "skip:2"])]
    batch.add(seqs)
    batch.step()
    batch.remove(seqs[0].id)
    batch.add([eng.new_sequence([5, 6, 9], params, eng.compile("skip:2"))])
    batch.step()
    batch.step()
    stats = graphs.stats()
    assert stats["graphs"] == layouts
    assert stats["layout_hit_rate"] == pytest.approx((3 - layouts) / 3)


def test_a_schedule_whose_rows_left_keeps_its_group_where_it_reads_no_more_weights(monkeypatch):
    """full + skip:2, then the skip:2 row leaves: skip:2 reads a subset of full's layers, so the step keeps an empty
    skip:2 group and its layout, and a skip:2 row coming back finds it; the full row decodes what it decodes
    unpadded. pairs beside full re-reads attentions: its group is not kept. A kept group goes after KEEP_STEPS
    decode steps without rows."""
    from server.engine import graphs as graphs_module

    monkeypatch.setattr(graphs_module, "KEEP_STEPS", 4)
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    full, skip, pairs = (eng.compile(p) for p in ("full", "skip:2", "pairs:1-4"))
    long, short = SamplingParams(max_tokens=12, ignore_eos=True), SamplingParams(max_tokens=2, ignore_eos=True)

    def run(other, *, comes_back: bool) -> tuple[list[int], list[int]]:
        batch = eng.new_batch(max_len=64, num_blocks=200)
        graphs = batch.executor.graphs
        a = eng.new_sequence([5, 6, 7], long, full)
        batch.add([a, eng.new_sequence([9, 10], short, other)])
        layouts = []
        for i in range(11):  # the prefill's token and 11 more: a finishes at the last step
            batch.step()
            batch.filter()
            if comes_back and i == 2:
                batch.add([eng.new_sequence([11, 12], short, other)])
            layouts.append(graphs.stats()["graphs"])
        return a.output_ids, layouts

    want = eng.generate([[5, 6, 7]], params=long)[0].token_ids
    ex = eng.new_batch(max_len=64, num_blocks=200).executor
    assert ex.units_read((full, skip)) == ex.units_read((full,)) < ex.units_read((full, pairs))
    tokens, layouts = run(skip, comes_back=True)
    # one layout while skip:2 rows come and go; a new one once its group has gone 4 steps without rows
    assert tokens == want and layouts == [1] * 8 + [2] * 3, layouts
    tokens, layouts = run(pairs, comes_back=False)
    assert tokens == want and layouts == [1] + [2] * 10, layouts  # pairs left: full alone at once


def test_remembered_schedules_stay_bounded(monkeypatch):
    """Schedules that stopped arriving are forgotten (so a stream of distinct schedules cannot grow the state)."""
    from server.engine import graphs as graphs_module

    monkeypatch.setattr(graphs_module, "KEEP_STEPS", 4)
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    batch = eng.new_batch(max_len=64, num_blocks=400)
    graphs = batch.executor.graphs
    for i in range(12):
        batch.add([eng.new_sequence([5, 6], SamplingParams(max_tokens=2, ignore_eos=True),
                                    eng.compile(f"skip:{1 + i % 4}-{1 + i % 4}"))])
        batch.step()
        batch.filter()
    assert len(graphs._last_seen) <= 4 + 1 and len(graphs._free) <= 4 * 16


def test_kept_groups_are_bounded_in_number_and_in_padded_rows(monkeypatch):
    """Policies are user input: a stream of distinct skip:k beside a full row made every one of them an empty group
    kept for KEEP_STEPS (28 groups, 112 padded rows for 6 real ones). At most MAX_KEPT are kept, the most recent, and
    never so many that the step leaves one shared bucket; the full row decodes what it decodes alone."""
    from server.engine import graphs as graphs_module

    monkeypatch.setattr(graphs_module, "MAX_KEPT", 2)
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    long = SamplingParams(max_tokens=16, ignore_eos=True)
    batch = eng.new_batch(max_len=64, num_blocks=400)
    graphs = batch.executor.graphs
    a = eng.new_sequence([5, 6, 7], long, eng.compile("full"))
    batch.add([a])
    widths = []
    for i in range(15):
        if i % 2 == 0:
            batch.add([eng.new_sequence([9, 10], SamplingParams(max_tokens=2, ignore_eos=True),
                                        eng.compile(f"skip:{1 + i // 2 % 4}-{1 + i // 2 % 4}"))])
        batch.step()
        batch.filter()
        widths.append(max(len(schedules) for schedules, _, _ in graphs._steps))
    assert a.output_ids == eng.generate([[5, 6, 7]], params=long)[0].token_ids
    assert max(widths) == 1 + 1 + 2, widths  # full, the skip row present, two kept

    assert len(graphs._last_seen) == 5  # full and four skip schedules: recent, each free beside full
    graphs.shared_up_to = 2  # room for the present group and one kept
    layout = graphs.layout([Row("x", eng.compile("full"), 0, 1)])
    assert len(layout.schedules) == 2 and sum(layout.counts) == 2


def test_a_layout_outlives_the_cached_plan_it_was_built_with():
    """Plans are cached least recently used first: the same schedules planned afresh are a new object. Keyed by the
    plan's id, the layout was built (and on CUDA captured) again; keyed by its schedules, it is found."""
    from server.policy import planner

    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    batch = eng.new_batch(max_len=64, num_blocks=200)
    graphs = batch.executor.graphs
    batch.add([eng.new_sequence([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True), eng.compile("full"))])
    batch.step()
    planner._plan.cache_clear()
    batch.step()
    assert graphs.stats()["graphs"] == 1 and graphs.layouts == 1 and graphs.reuses == 1


def test_graph_stats_reach_prometheus():
    from server.metrics import Metrics, QueueStats

    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu", graphs=True)
    batch = eng.new_batch(max_len=32, num_blocks=50)
    eng.generate([[5, 6, 7]], params=SamplingParams(max_tokens=3, ignore_eos=True), batch=batch)
    stats = batch.executor.graphs.stats()
    assert stats["graphs"] == 1 and stats["captures"] == 0  # the CPU runs the padded step eagerly: no capture
    m = Metrics(model="tiny")
    m.observe_queue(QueueStats(0, 0, 0.0, decode_graphs=stats))
    text = m.render()[0].decode()
    assert 'painters:decode_graphs{model="tiny",stat="graphs"} 1.0' in text
    assert 'stat="pinned_bytes"' in text and 'stat="hit_rate"' in text

