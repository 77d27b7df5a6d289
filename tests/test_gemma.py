"""The real embedded Gemma 3 270M: model facts from its config, `full` logits equal transformers' Gemma3ForCausalLM
(also past the 512-token sliding window), greedy text equals transformers generate, and policies mix in one batch."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from server.engine.executor import Executor, Row
from server.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is Paris. The capital of Italy is"


def full_logits(engine, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
    schedule = engine.compile("full")
    T = ids.shape[1]
    ex = Executor(engine.model, num_blocks=schedule.num_slots * (T // 16 + 1) + 1, max_len=T)
    at = torch.tensor([T - 1]) if last_only else None
    return ex.forward(ids, [Row(0, schedule, 0, T)], logits_at=at)


def test_the_alias_loads_gemma_3_as_its_config_says(gemma3, gemma3_engine):
    a = gemma3_engine.model.args
    assert gemma3.config.model_type == "gemma3_text" and a.n_layers == 18 and a.dim == 640 and a.head_dim == 256
    assert set(range(18)) - a.sliding_layers == {5, 11, 17} and a.sliding_window == 512
    assert a.post_norms and a.act == "gelu_pytorch_tanh" and a.query_scale == 256**-0.5
    w = gemma3.weights
    assert w.lm_head.data_ptr() == w.embed.data_ptr()  # tied: one copy of the 262k-token embedding
    assert w.local_inv_freq is not None and not torch.equal(w.local_inv_freq, w.inv_freq)  # bases 10k and 1M
    assert gemma3.eos_token_ids == {1, 106}  # <eos> and <end_of_turn>, as llama.cpp and its generation_config.json
    ids = gemma3_engine.encode(PROMPT)
    assert ids == gemma3.tokenizer(PROMPT).input_ids and ids[0] == gemma3.tokenizer.bos_token_id == 2


def test_full_logits_equal_transformers(gemma3, gemma3_hf, gemma3_engine):
    ids = gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gemma3_hf(ids).logits
    assert_close(full_logits(gemma3_engine, ids), ref, rtol=1e-3, atol=1e-3)


def test_full_logits_equal_transformers_past_the_sliding_window(gemma3, gemma3_hf, gemma3_engine):
    """600 tokens: the windowed layers see only the last 512, the global ones all."""
    text = " ".join(f"Item {i} is {'red' if i % 3 else 'blue'}." for i in range(120))
    ids = gemma3.tokenizer(text, return_tensors="pt").input_ids[:, :600]
    assert ids.shape[1] == 600
    with torch.no_grad():
        ref = gemma3_hf(ids, logits_to_keep=1).logits[:, -1]
    assert_close(full_logits(gemma3_engine, ids, last_only=True), ref, rtol=1e-3, atol=1e-3)


def test_greedy_generation_equals_transformers_generate(gemma3, gemma3_hf, gemma3_engine):
    ids = gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gemma3_hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ours = gemma3_engine.generate([PROMPT], params=SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert ours.prompt_token_ids == ids[0].tolist()
    assert ours.token_ids == ref[0, ids.shape[1]:].tolist()
    assert "Rome" in ours.text


def test_mixed_policies_in_one_batch_equal_each_alone(gemma3_engine):
    policies = ["full", "skip:4", "pairs", "parallel:6-11", "reverse", "shuffle:3-14:7", "repeat:4-13"]
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=1)
    together = gemma3_engine.generate([PROMPT] * len(policies), policy=policies, params=params)
    for policy, got in zip(policies, together):
        alone = gemma3_engine.generate([PROMPT], policy=policy, params=params)[0]
        assert got.policy == gemma3_engine.compile(policy).policy
        assert got.token_ids == alone.token_ids, policy
        assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), rtol=1e-3, atol=1e-3)
