"""Layer probes: the statistics against a direct computation from transformers' own hidden states, policies that
change what is probed, and POST /v1/probe with its limits."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.generate import Engine
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


def test_full_statistics_equal_a_direct_computation_from_transformers():
    hf = tiny_llama()
    stats = Engine.from_hf(hf, CharTokenizer()).probe(PROMPTS, policy="full")
    states = [hf_states(hf, p) for p in PROMPTS]  # each [K, T, d]
    K = states[0].shape[0]
    assert stats.steps == [str(i) for i in range(K - 1)] and stats.num_tokens == 11 and stats.num_sequences == 2

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()))

    sim = [[sum(cos(s[i], s[j]) for s in states) / 2 for j in range(K)] for i in range(K)]
    torch.testing.assert_close(torch.tensor(stats.similarity), torch.tensor(sim), rtol=1e-4, atol=1e-4)
    bi = [1 - torch.cat([torch.nn.functional.cosine_similarity(s[i], s[i + 1], dim=-1) for s in states]).mean().item()
          for i in range(K - 1)]
    torch.testing.assert_close(torch.tensor(stats.block_influence), torch.tensor(bi), rtol=1e-4, atol=1e-4)
    for n in range(1, (K - 1) // 2 + 1):
        ang = [sum(math.acos(max(-1.0, min(1.0, cos(s[i, -1], s[i + n, -1])))) / math.pi for s in states) / 2
               for i in range(K - n)]
        torch.testing.assert_close(torch.tensor(stats.angular_distance[n - 1]), torch.tensor(ang), rtol=1e-3,
                                   atol=1e-4)


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
