"""Layer probes: the statistics against a direct computation from transformers' own hidden states, policies that
change what is probed, and POST /v1/probe with its limits."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.generate import Engine
from server.engine.probe import chunks, reduce
from tests.conftest import CharTokenizer, tiny_llama
from tests.serving import MODEL, serving, settings

PROMPTS = [[5, 9, 17, 33, 4, 8, 60, 7], [20, 21, 22]]


def hf_states(hf, ids: list[int]) -> torch.Tensor:
    """[L + 1, T, d]: the input of every decoder layer and the last layer's output (before the final norm)."""
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in hf.model.layers]
    try:
        with torch.no_grad():
            h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([h[0][0]] + [o[0] for o in outs])


def assert_direct(stats, hf, prompts: list[list[int]]) -> None:
    """`stats` are the statistics of the module's docstring, computed directly from transformers' hidden states."""
    states = [hf_states(hf, p) for p in prompts]  # each [K, T, d]
    K, n = states[0].shape[0], len(prompts)
    assert stats.steps == [str(i) for i in range(K - 1)]
    assert stats.num_tokens == sum(map(len, prompts)) and stats.num_sequences == n

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()))

    sim = [[sum(cos(s[i], s[j]) for s in states) / n for j in range(K)] for i in range(K)]
    torch.testing.assert_close(torch.tensor(stats.similarity), torch.tensor(sim), rtol=1e-4, atol=1e-4)
    bi = [1 - torch.cat([torch.nn.functional.cosine_similarity(s[i], s[i + 1], dim=-1) for s in states]).mean().item()
          for i in range(K - 1)]
    torch.testing.assert_close(torch.tensor(stats.block_influence), torch.tensor(bi), rtol=1e-4, atol=1e-4)
    for k in range(1, (K - 1) // 2 + 1):
        ang = [sum(math.acos(max(-1.0, min(1.0, cos(s[i, -1], s[i + k, -1])))) / math.pi for s in states) / n
               for i in range(K - k)]
        torch.testing.assert_close(torch.tensor(stats.angular_distance[k - 1]), torch.tensor(ang), rtol=1e-3,
                                   atol=1e-4)


def test_full_statistics_equal_a_direct_computation_from_transformers():
    hf = tiny_llama()
    assert_direct(Engine.from_hf(hf, CharTokenizer()).probe(PROMPTS, policy="full"), hf, PROMPTS)


def test_a_probe_pads_chunks_of_similar_length_not_every_row_to_the_longest():
    """One long prompt beside many short ones: padded to the longest together, memory grew with rows x longest (64 x
    4,000 positions for 4,063 tokens). Chunks of similar length pad no more positions than the prompts hold, and the
    statistics are those of the direct computation."""
    assert chunks([4000] + [1] * 63) == [[0], list(range(1, 64))]
    assert chunks([3, 8, 3, 2]) == [[1, 0], [2, 3]]  # 2 x 8 = 16 padded fits 16 tokens; 3 x 8 would not
    prompts = [[7, 8, 9], [5, 9, 17, 33, 4, 8, 60, 7, 11, 12, 13, 14], [20, 21, 22], [40, 41]]
    hf = tiny_llama()
    engine = Engine.from_hf(hf, CharTokenizer())
    batch = engine.new_batch(max_len=64, num_blocks=64)
    padded = []
    forward = batch.executor.forward
    batch.executor.forward = lambda tokens, rows, **kw: padded.append(tokens.numel()) or forward(tokens, rows, **kw)
    stats = batch.probe(prompts, engine.compile("full"))
    assert padded == [12, 9]  # each chunk pads fewer positions than the 20 tokens; all together: 4 x 12 = 48
    assert batch.kv_usage() == 0.0
    assert_direct(stats, hf, prompts)


def test_the_angle_between_equal_states_is_zero():
    """A step that changes nothing: arccos of the cosine (0.99999994 for a third of 64 random float32 vectors) read
    an angular distance of 4e-5, the size of a real difference between nearly alike layers. The chord formula reads
    0."""
    torch.manual_seed(0)
    x = torch.randn(64, 5, 576) * 30
    states = [x, x.clone(), 2 * x, torch.randn(64, 5, 576)]
    stats = reduce(Engine.from_hf(tiny_llama(), CharTokenizer()).compile("schedule:0-2"), states, [5] * 64)
    assert len(stats.steps) == 3
    assert stats.angular_distance[0][:2] == [0.0, 0.0]  # x -> x, x -> 2x: the same direction
    assert 0.4 < stats.angular_distance[0][2] < 0.6  # random directions are about orthogonal
    assert stats.block_influence[:2] == pytest.approx([0.0, 0.0], abs=1e-7)


def test_a_policy_changes_the_steps_probed():
    engine = Engine.from_hf(tiny_llama(), CharTokenizer())
    stats = engine.probe(PROMPTS, policy="pairs")
    assert stats.steps == ["0", "1+2/pairs", "3+4/pairs", "5"] and stats.policy == "pairs:1-4"
    assert len(stats.similarity) == 5 and len(stats.block_influence) == 4
    full = engine.probe(PROMPTS, policy="full")
    assert stats.similarity[0][1] == pytest.approx(full.similarity[0][1], rel=1e-5), "step 0 is layer 0 in both"


def test_probe_endpoint_shape_limits_and_kv():
    with serving(settings(probe_max_prompts=3, probe_max_tokens=40)) as c:
        r = c.post("/v1/probe", json={"model": MODEL, "prompts": ["hello world", [5, 6, 7]], "policy": "skip:2"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "probe" and body["policy"] == "skip:2-3"
        assert body["steps"] == ["0", "1", "4", "5"] and len(body["similarity"]) == 5
        assert body["num_tokens"] == 14 and len(body["angular_distance"]) == 2
        assert all(abs(body["similarity"][i][i] - 1) < 1e-4 for i in range(5))
        r = c.post("/v1/probe", json={"prompts": ["a"] * 4})
        assert r.status_code == 400 and "at most 3" in r.json()["error"]["message"]
        r = c.post("/v1/probe", json={"prompts": ["x" * 50]})
        assert r.status_code == 413 and "at most 40" in r.json()["error"]["message"]
        r = c.post("/v1/probe", json={"prompts": ["hi"], "policy": "skip:99"})
        assert r.status_code == 400 and "0-5" in r.json()["error"]["message"]
        loop = c.app.state.painters.loop
        assert loop.num_running == 0 and loop.batch.kv_usage() == 0.0
        assert "/v1/probe" in c.get("/openapi.json").json()["paths"]
