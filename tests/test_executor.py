"""The executor against transformers: `full` equals the HF forward, every policy equals an independent reference
(tests/reference.py), and cached decoding, padded batches, rows leaving and joining, mixed-schedule batches and
stream groups equal recomputation. Small KV blocks (4 tokens) make every test cross block boundaries."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from server.engine.executor import Executor, Row
from server.model import triton_attention
from server.model.model import GroupMode, Transformer
from server.model.weights import transformer_from_hf
from server.policy.compiler import Schedule, compile_schedule
from tests.reference import ARCHS, NUM_LAYERS, VOCAB, reference_logits, tiny_model, tiny_multimodal_gemma

TOL = dict(rtol=1e-4, atol=1e-4)

# Spans are for the 8-layer models (default middle range 1-6).
POLICIES = [
    "full",
    "skip:2",
    "skip:2-4",
    "skip:1,3,5-6",
    "pairs",
    "pairs:1-5",  # odd length: (1,2), (3,4), 5
    "parallel",
    "parallel:2-5",
    "loop:x3",
    "loop:2-4x2",
    "reverse",
    "reverse:3-6",
    "shuffle",
    "shuffle:1-6:7",
    "repeat",
    "repeat:2-5",
    "schedule:0-2,3+4/mean,5+6/sum,7",
    "schedule:0,1+4/sum,2,3,5-7",  # non-consecutive group
    "schedule:0,1,1,2-7",  # a layer run twice
    "schedule:0-1,2+3+4/pairs,5-7",  # a three-member pairs group
    "schedule:0,5+2+2/sum,1,3-7",  # unsorted group naming a layer twice
    "schedule:0-2,3+5/pairs,4,6+7/mean",
]

@functools.cache
def transformer(name: str) -> Transformer:
    return transformer_from_hf(tiny_model(name), dtype=torch.float32, device="cpu")


def schedule(policy: str) -> Schedule:
    return compile_schedule(policy, NUM_LAYERS)


class Runner:
    """Sequence b of the test runs under policies[b]; `forward` appends T tokens to the sequences named."""

    def __init__(self, name: str, policies: list[str], *, max_len: int, mode: GroupMode) -> None:
        self.schedules = [schedule(p) for p in policies]
        blocks = sum(s.num_slots for s in self.schedules) * -(-max_len // 4)
        self.ex = Executor(transformer(name), num_blocks=blocks + 1, block_size=4, max_len=max_len, group_mode=mode)

    def forward(self, ids: Tensor, *, rows: slice | list[int], start: list[int], logits_at: Tensor | None = None,
                num_new: list[int] | None = None) -> Tensor:
        seqs = list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows
        B, T = ids.shape
        num_new = num_new or [T] * B
        batch = [Row(q, self.schedules[q], start[b], num_new[b]) for b, q in enumerate(seqs)]
        return self.ex.forward(ids, batch, logits_at=logits_at)


def executor(name: str, policy: str | list[str], *, max_batch: int = 1, max_len: int = 32,
             mode: GroupMode = "batched") -> Runner:
    policies = policy if isinstance(policy, list) else [policy] * max_batch
    return Runner(name, policies, max_len=max_len, mode=mode)


def tokens(B: int, T: int, seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def whole(ex: Runner, ids: Tensor) -> Tensor:
    """Logits [B, T, V] of one prefill of ids [B, T] into rows 0..B-1."""
    B = ids.shape[0]
    return ex.forward(ids, rows=slice(0, B), start=[0] * B)


# -- full == transformers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_full_matches_transformers(name: str) -> None:
    model = tiny_model(name)
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    got = whole(executor(name, "full", max_batch=2), ids)
    assert got.shape == (2, 12, VOCAB)
    assert_close(got, expected, **TOL)


@pytest.mark.parametrize("name", ARCHS)
def test_reference_full_matches_transformers(name: str) -> None:
    """The reference itself is right: its `full` is transformers' forward (so its masks and rotary are HF's)."""
    model = tiny_model(name)
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    assert_close(reference_logits(model, schedule("full"), ids), expected, **TOL)


def test_tiny_models_exercise_their_features() -> None:
    """Guards the fixtures: llama3 rope changes the frequencies, the window bites, biases and ties are present."""
    rope3, rope = (tiny_model(n).model.rotary_emb.inv_freq for n in ("llama_rope3", "llama"))
    assert not torch.allclose(rope3, rope)
    ids = tokens(1, 12, seed=1)
    with torch.no_grad():
        assert not torch.allclose(tiny_model("mistral")(ids).logits, tiny_model("mistral_window")(ids).logits, **TOL)
    bias = tiny_model("llama_bias").model.layers[0]
    assert bias.self_attn.o_proj.bias.abs().sum() > 0 and bias.mlp.down_proj.bias.abs().sum() > 0
    assert tiny_model("qwen2").model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    tied, untied = tiny_model("llama_tied"), tiny_model("llama")
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    q3 = transformer("qwen3").args
    assert q3.qk_norm and q3.head_dim * q3.n_heads != q3.dim and q3.n_kv_heads < q3.n_heads


def test_gemma_fixtures_exercise_their_features() -> None:
    """Guards the Gemma fixtures: windowed and global layers interleave, the window bites at the test lengths,
    windowed layers rotate with their own base, global ones with the configured scaling, and the query scale is not
    head_dim^-1/2."""
    a = transformer("gemma3").args
    assert a.sliding_layers == {0, 1, 3, 4, 6, 7} and a.sliding_window < 12
    assert a.post_norms and a.query_scale != a.head_dim**-0.5 and a.embed_scale == a.dim**0.5
    positions = torch.arange(12)[None]
    plain, scaled = transformer("gemma3").rope(positions, top=12), transformer("gemma3_rope").rope(positions, top=12)
    assert not torch.allclose(plain[True][0], plain[False][0])  # local base 10k, global 1M
    assert torch.equal(plain[True][0], scaled[True][0]) and not torch.allclose(plain[False][0], scaled[False][0])
    tied, untied = tiny_model("gemma3"), tiny_model("gemma3_rope")
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_full_matches_transformers_on_a_multimodal_gemma3() -> None:
    """A `gemma3` (image-text) model serves its language model: text logits equal transformers' own forward."""
    mm = tiny_multimodal_gemma()
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        expected = mm(input_ids=ids).logits
    model = transformer_from_hf(mm, dtype=torch.float32, device="cpu")
    full = schedule("full")
    ex = Executor(model, num_blocks=2 * full.num_slots * 3 + 1, block_size=4, max_len=12)
    assert_close(ex.forward(ids, [Row(b, full, 0, 12) for b in range(2)]), expected, **TOL)


# -- every policy == reference -------------------------------------------------------------------------------------


@functools.cache
def reference(name: str, policy: str, seed: int = 2, T: int = 12) -> Tensor:
    return reference_logits(tiny_model(name), schedule(policy), tokens(1, T, seed))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["llama", "qwen3", "llama_bias", "mistral_window", "gemma3", "gemma3_rope"])
def test_policy_matches_reference(name: str, policy: str) -> None:
    if policy != "full":  # the weights make every policy observable
        assert not torch.allclose(reference(name, policy), reference(name, "full"), rtol=1e-2, atol=1e-2)
    got = whole(executor(name, policy), tokens(1, 12, seed=2))
    assert_close(got, reference(name, policy), **TOL)


# -- cached decoding == recomputation ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_incremental_decoding_matches_recompute(name: str, policy: str) -> None:
    ids = tokens(1, 11, seed=3)
    expected = whole(executor(name, policy), ids)  # [1, T, V]
    ex = executor(name, policy)
    prefix = 4
    got = [ex.forward(ids[:, :prefix], rows=slice(0, 1), start=[0])]
    for t in range(prefix, ids.shape[1]):
        got.append(ex.forward(ids[:, t : t + 1], rows=slice(0, 1), start=[t]))
    assert_close(torch.cat(got, dim=1), expected, **TOL)


@pytest.mark.parametrize("policy", ["full", "pairs", "loop:x3", "schedule:0,1,1,2-7", "schedule:0,1+4/sum,2,3,5-7"])
def test_chunked_prefill_and_equal_length_batch_decode(policy: str) -> None:
    """Two equal-length rows (the B > 1 cache path with an unmasked decode), prefilled in chunks of 3 tokens."""
    ids = tokens(2, 11, seed=4)
    expected = whole(executor("llama", policy, max_batch=2), ids)
    ex = executor("llama", policy, max_batch=2)
    got, t = [], 0
    for n in (3, 3, 1, 1, 3):
        got.append(ex.forward(ids[:, t : t + n], rows=slice(0, 2), start=[t, t]))
        t += n
    assert_close(torch.cat(got, dim=1), expected, **TOL)


@pytest.mark.parametrize("policy", ["full", "parallel", "shuffle:1-6:7"])
def test_decoding_past_the_sliding_window(policy: str) -> None:
    ids = tokens(1, 12, seed=5)  # window 5
    expected = reference_logits(tiny_model("mistral_window"), schedule(policy), ids)
    ex = executor("mistral_window", policy)
    got = [ex.forward(ids[:, :2], rows=slice(0, 1), start=[0])]
    got += [ex.forward(ids[:, t : t + 1], rows=slice(0, 1), start=[t]) for t in range(2, 12)]
    assert_close(torch.cat(got, dim=1), expected, **TOL)


def test_rotary_tables_past_their_initial_size() -> None:
    """Positions past 1024 (where the rotary table grows) match transformers' llama3-scaled rotary embedding."""
    positions = torch.tensor([[1030, 1031, 1032], [5, 6, 7]])
    ours = transformer("llama_rope3").rope(positions, top=1033)[False]
    cos, sin = tiny_model("llama_rope3").model.rotary_emb(torch.zeros(1), positions)  # [B, T, hd]
    assert_close(ours[0], cos, **TOL)
    assert_close(ours[1], sin, **TOL)


def test_reused_blocks_ignore_the_previous_sequence() -> None:
    """Blocks freed by a longer sequence give the fresh result for a shorter new one (stale keys unseen)."""
    ex = executor("llama", "pairs", max_batch=2)
    whole(ex, tokens(1, 20, seed=6))
    ex.ex.release(0)
    ids = tokens(1, 6, seed=7)
    got = [ex.forward(ids[:, :4], rows=slice(1, 2), start=[0])]
    got += [ex.forward(ids[:, t : t + 1], rows=slice(1, 2), start=[t]) for t in (4, 5)]
    assert_close(torch.cat(got, dim=1), whole(executor("llama", "pairs"), ids), **TOL)


# -- padded batches == each sequence alone --------------------------------------------------------------------------


def greedy_alone(name: str, policy: str, prompt: Tensor, steps: int) -> tuple[list[int], Tensor]:
    """Greedy tokens and the logits [steps + 1, V] that chose them (plus the last), one sequence in a fresh cache."""
    ex = executor(name, policy)
    n = prompt.numel()
    logits = [ex.forward(prompt[None], rows=slice(0, 1), start=[0], logits_at=torch.tensor([n - 1]))[0]]
    out: list[int] = []
    for _ in range(steps):
        out.append(int(logits[-1].argmax()))
        logits.append(ex.forward(torch.tensor([[out[-1]]]), rows=slice(0, 1), start=[n])[0, 0])
        n += 1
    return out, torch.stack(logits)


def padded(prompts: list[Tensor], seed: int) -> Tensor:
    """Right-pad with random tokens (not a constant), so padding that leaked would show."""
    ids = tokens(len(prompts), max(p.numel() for p in prompts), seed)
    for b, p in enumerate(prompts):
        ids[b, : p.numel()] = p
    return ids


def decode_batch(ex: Runner, logits: Tensor, lengths: list[int], steps: int,
                 seqs: list[int] | None = None) -> tuple[list[list[int]], list[Tensor]]:
    """Greedy decoding of sequences `seqs` (default 0..B-1) from their last logits [B, V]; returns tokens per row and
    logits per step."""
    B = len(lengths)
    lengths = list(lengths)
    out: list[list[int]] = [[] for _ in range(B)]
    history = [logits]
    for _ in range(steps):
        nxt = history[-1].argmax(-1)  # [B]
        for b in range(B):
            out[b].append(int(nxt[b]))
        history.append(ex.forward(nxt[:, None], rows=seqs or slice(0, B), start=lengths)[:, 0])
        lengths = [n + 1 for n in lengths]
    return out, history


BATCH_POLICIES = ["full", "skip:2-4", "pairs:1-5", "loop:x3", "repeat", "schedule:0,1+4/sum,2,3,5-7"]


@pytest.mark.parametrize("policy", BATCH_POLICIES)
@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral_window", "gemma3"])
def test_padded_batch_matches_each_sequence_alone(name: str, policy: str) -> None:
    prompts = [tokens(1, n, seed=10 + n)[0] for n in (7, 2, 5, 9)]
    lengths = [p.numel() for p in prompts]
    steps = 4
    ex = executor(name, policy, max_batch=4)
    first = ex.forward(
        padded(prompts, seed=8), rows=slice(0, 4), start=[0] * 4, logits_at=torch.tensor(lengths) - 1,
        num_new=lengths,
    )  # [B, V]
    batch_tokens, history = decode_batch(ex, first, lengths, steps)
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_logits = greedy_alone(name, policy, prompt, steps)
        assert batch_tokens[b] == alone_tokens, f"row {b} (length {lengths[b]}) decoded differently"
        assert_close(torch.stack([h[b] for h in history]), alone_logits, **TOL)


@pytest.mark.parametrize(("max_len", "cached", "new", "wide"), [(32, 28, 2, 8), (1100, 1000, 10, 40)],
                         ids=["past-the-block-table", "past-the-rotary-table"])
def test_a_row_near_its_end_beside_a_wider_one_prefills_exactly(max_len, cached, new, wide) -> None:
    """A prefill that continues a cached prefix near max_len, right-padded to a wider prompt beside it: its padding
    columns counted positions past the block table (an index error; on CUDA a device assert that ends the process),
    or past the rotary table. Each row's logits are those of prefilling it alone."""
    prefix, tail, other = tokens(1, cached, seed=1), tokens(1, new, seed=2), tokens(1, wide, seed=3)
    ex = executor("llama", "full", max_batch=2, max_len=max_len)
    ex.forward(prefix, rows=[0], start=[0])
    ids = torch.cat([torch.cat([tail, torch.zeros(1, wide - new, dtype=torch.long)], 1), other])
    got = ex.forward(ids, rows=[0, 1], start=[cached, 0], num_new=[new, wide], logits_at=torch.tensor([new, wide]) - 1)
    alone = executor("llama", "full", max_batch=2, max_len=max_len)
    alone.forward(prefix, rows=[0], start=[0])
    assert_close(got[0], alone.forward(tail, rows=[0], start=[cached])[0, -1], **TOL)
    assert_close(got[1], alone.forward(other, rows=[1], start=[0])[0, -1], **TOL)


@pytest.mark.parametrize("policy", ["full", "pairs", "schedule:0,1,1,2-7"])
def test_rows_leaving_keep_the_others_exact(policy: str) -> None:
    """Sequence 0 finishes and frees its blocks; the others, reordered in the batch, decode on as if alone."""
    prompts = [tokens(1, n, seed=20 + n)[0] for n in (4, 6, 3)]
    lengths = [p.numel() for p in prompts]
    ex = executor("llama", policy, max_batch=3)
    first = ex.forward(padded(prompts, seed=9), rows=slice(0, 3), start=[0] * 3, logits_at=torch.tensor(lengths) - 1)
    ex.ex.release(0)
    order = [2, 1]
    got, history = decode_batch(ex, first[order], [lengths[i] for i in order], steps=3, seqs=order)
    for row, seq in enumerate(order):
        alone_tokens, alone_logits = greedy_alone("llama", policy, prompts[seq], steps=3)
        assert got[row] == alone_tokens
        assert_close(torch.stack([h[row] for h in history]), alone_logits, **TOL)


def test_sequence_prefilled_into_a_later_row_joins_the_batch() -> None:
    """Continuous batching: row 1 is prefilled alone (rows=slice(1, 2)) while row 0 is mid-decode; then they decode
    together with different start positions."""
    policy = "parallel:2-5"
    a, b = tokens(1, 6, seed=30)[0], tokens(1, 3, seed=31)[0]
    ex = executor("llama", policy, max_batch=2)
    la = ex.forward(a[None, :5], rows=slice(0, 1), start=[0], logits_at=torch.tensor([4]))
    la = ex.forward(a[None, 5:], rows=slice(0, 1), start=[5], logits_at=torch.tensor([0]))
    lb = ex.forward(b[None], rows=slice(1, 2), start=[0], logits_at=torch.tensor([2]))
    got, history = decode_batch(ex, torch.cat([la, lb]), [6, 3], steps=3)
    for row, prompt in enumerate((a, b)):
        alone_tokens, alone_logits = greedy_alone("llama", policy, prompt, steps=3)
        assert got[row] == alone_tokens
        assert_close(torch.stack([h[row] for h in history]), alone_logits, **TOL)


# -- mixed-schedule batches == each sequence alone ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral_window", "gemma3", "gemma3_rope"])
def test_mixed_schedule_batch_matches_each_sequence_alone(name: str) -> None:
    """One batch, one row per policy, different prompt lengths: every row decodes exactly as it would alone."""
    policies = ["full", "skip:2-4", "pairs:1-5", "parallel", "loop:2-4x2", "reverse", "schedule:0,5+2+2/sum,1,3-7"]
    prompts = [tokens(1, 3 + (i * 5) % 9, seed=50 + i)[0] for i in range(len(policies))]
    lengths = [p.numel() for p in prompts]
    ex = executor(name, policies)
    first = ex.forward(padded(prompts, seed=11), rows=slice(0, len(policies)), start=[0] * len(policies),
                       logits_at=torch.tensor(lengths) - 1, num_new=lengths)
    got, history = decode_batch(ex, first, lengths, steps=4)
    for b, (policy, prompt) in enumerate(zip(policies, prompts)):
        alone_tokens, alone_logits = greedy_alone(name, policy, prompt, steps=4)
        assert got[b] == alone_tokens, policy
        assert_close(torch.stack([h[b] for h in history]), alone_logits, **TOL)


def test_shared_layers_run_once_for_every_row_that_needs_them() -> None:
    """The plan for full + skip rows applies each layer once over both (no per-schedule turns)."""
    ex = executor("llama", ["full", "skip:2-4"])
    plan = ex.ex.plan([Row(0, schedule("full"), 0, 1), Row(1, schedule("skip:2-4"), 0, 1)])
    assert all(plan.reads(k, i) == 1 for k in ("attn", "mlp") for i in range(NUM_LAYERS))


# -- stream groups == batched groups -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy", ["pairs", "pairs:1-5", "parallel", "loop:x3", "schedule:0,1+4/sum,2,3,5-7", "schedule:0,5+2+2/sum,1,3-7"]
)
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_streams_match_batched(name: str, policy: str) -> None:
    ids = tokens(2, 9, seed=40)
    results = {}
    for mode in ("batched", "streams"):
        ex = executor(name, policy, max_batch=2, mode=mode)
        prefill = ex.forward(ids[:, :6], rows=slice(0, 2), start=[0, 0])
        steps = [ex.forward(ids[:, t : t + 1], rows=slice(0, 2), start=[t, t]) for t in range(6, 9)]
        results[mode] = torch.cat([prefill, *steps], dim=1)
    assert_close(results["streams"], results["batched"], **TOL)
    assert_close(results["streams"], reference_logits(tiny_model(name), schedule(policy), ids), **TOL)


@pytest.mark.parametrize("policy", ["parallel", "pairs:1-5", "schedule:0,5+2+2/sum,1,3-7", "loop:2-4x2"])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_a_wide_group_runs_a_few_members_at_a_time_exactly(name: str, policy: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Above `MAX_GROUP_TOKENS` (layer, position) pairs a fused group runs in chunks of members: 1 at a time in this
    prefill (2 rows x 6 tokens), at most 2 in its decode steps (2 rows); the logits are the reference's."""
    from server.engine import executor as executor_module

    monkeypatch.setattr(executor_module, "MAX_GROUP_TOKENS", 5)
    widest = []
    mlp = Transformer.mlp
    monkeypatch.setattr(Transformer, "mlp", lambda self, x, *a, **k: widest.append(x.shape[:3]) or mlp(self, x, *a, **k))
    ids = tokens(2, 9, seed=41)
    ex = executor(name, policy, max_batch=2)
    prefill = ex.forward(ids[:, :6], rows=slice(0, 2), start=[0, 0])
    assert max(g for g, _, _ in widest) == 1
    widest.clear()
    steps = [ex.forward(ids[:, t : t + 1], rows=slice(0, 2), start=[t, t]) for t in range(6, 9)]
    assert all(g == 1 or g * m * t <= 5 for g, m, t in widest)
    if policy == "parallel":  # 6 members over 2 rows: 3 calls of 2
        assert max(g for g, _, _ in widest) == 2
    assert_close(torch.cat([prefill, *steps], dim=1), reference_logits(tiny_model(name), schedule(policy), ids), **TOL)


# -- decode attention read in place == gathered ----------------------------------------------------------------------


def _decode_with(attention: str, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps with `attention` give the gathered path's logits: a mixed-schedule batch with ragged prompts,
    Gemma 3's windowed and global layers (a window of 5 that decoding passes; `pairs` fuses layers of both kinds),
    GQA, 4-token blocks. kernel: the executor's name of the function that mode calls, counted."""
    name = "gemma3"
    policies = ["full", "skip:2-4", "pairs:1-5"]
    prompts = [tokens(1, 3 + (i * 5) % 9, seed=70 + i)[0] for i in range(len(policies))]
    lengths = [p.numel() for p in prompts]
    import server.engine.executor

    calls = []
    real = getattr(server.engine.executor, kernel)
    monkeypatch.setattr(server.engine.executor, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for mode in ("gathered", attention):
        ex = executor(name, policies)
        ex.ex.attention = mode
        first = ex.forward(padded(prompts, seed=12), rows=slice(0, len(policies)), start=[0] * len(policies),
                           logits_at=torch.tensor(lengths) - 1, num_new=lengths)
        runs.append(decode_batch(ex, first, lengths, steps=6))
    (want_tokens, want), (got_tokens, got) = runs
    assert len(calls) >= 6 * 4  # decode steps' attention went through the kernel
    assert got_tokens == want_tokens
    assert_close(torch.stack(got), torch.stack(want), **TOL)


@pytest.mark.slow  # compiles FlexAttention on the CPU, once per number of rows: a minute or two
def test_in_place_attention_decodes_as_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    _decode_with("in_place", "paged_attention", monkeypatch)


@pytest.mark.skipif(not triton_attention.available(), reason="needs the triton package")
def test_triton_attention_decodes_as_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernel over the block table (in Triton's interpreter on the CPU)."""
    _decode_with("triton", "paged_decode_attention", monkeypatch)


def test_attention_modes_are_checked_when_the_executor_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    model = transformer_from_hf(tiny_model("llama"), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="attention must be one of auto, gathered, in_place, triton, got 'paged'"):
        Executor(model, num_blocks=8, max_len=32, attention="paged")  # type: ignore[arg-type]
    # "auto" is measured on CUDA only: the CPU gathers, even where Triton's interpreter could run the kernel
    assert Executor(model, num_blocks=8, max_len=32).attention == "gathered"
    if triton_attention.available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # as in a CPU server: the kernel cannot run here
        with pytest.raises(ValueError, match="attention='triton' runs on CUDA"):
            Executor(model, num_blocks=8, max_len=32, attention="triton")
