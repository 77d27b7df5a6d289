"""Test support: tiny random-weight transformers models, and an independent reference run of a schedule.

The reference shares no code with `server.model`: it calls transformers' own decoder-layer submodules (norms,
attention, MLP, rotary embedding) on the whole sequence, without a cache, under an explicit additive causal mask,
and implements each combine rule straight from its definition. With L_i(h) = h + Δ_i(h) one whole decoder layer:

    one layer            h = L_i(h)
    group, mean          h + mean_i (L_i(h) - h)
    group, sum           h + Σ_i (L_i(h) - h)
    group, pairs         h' = h + Σ_i A_i(h), out = h' + Σ_i M_i(h')
                         with A_i(x) = self_attn_i(input_layernorm_i(x)), M_i(x) = mlp_i(post_attention_layernorm_i(x))
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from server.compiler import Schedule

VOCAB = 96
NUM_LAYERS = 8

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

LLAMA3_ROPE: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 10000.0,
}


def _configs() -> dict[str, PretrainedConfig]:
    return {
        "llama": LlamaConfig(**_COMMON),
        "llama_rope3": LlamaConfig(**_COMMON, rope_parameters=dict(LLAMA3_ROPE)),
        "llama_bias": LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True),
        "llama_tied": LlamaConfig(**_COMMON, tie_word_embeddings=True),
        "llama_mha": LlamaConfig(**{**_COMMON, "num_key_value_heads": 4}),
        "mistral": MistralConfig(**_COMMON, sliding_window=4096),
        "mistral_window": MistralConfig(**_COMMON, sliding_window=5),  # windowing actually bites at T > 5
        "qwen2": Qwen2Config(**_COMMON),  # q/k/v bias
        "qwen3": Qwen3Config(**_COMMON, head_dim=24),  # q/k norm; 4 * 24 != 64
        # Qwen's sliding window applies only to layers >= max_window_layers (config.layer_types).
        "qwen2_window": Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=4),
    }


ARCHS: tuple[str, ...] = tuple(_configs())


@functools.cache
def tiny_model(name: str, seed: int = 0) -> Any:
    """A float32 eval-mode HF causal LM with random weights large enough that every layer (and every bias and norm
    weight) moves the logits. Cached: tests must not modify it."""
    cfg = _configs()[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):  # RMSNorm gains (also q_norm / k_norm)
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and "embed_tokens" in pname:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / p.shape[1] ** 0.5)
    return model


def additive_mask(T: int, *, window: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """[1, 1, T, T] additive mask: 0 where query t may see key s (s <= t, t - s < window), else -inf-ish."""
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    return torch.zeros(T, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _layer_window(cfg: Any, i: int) -> int | None:
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return cfg.sliding_window if types[i] == "sliding_attention" else None
    return getattr(cfg, "sliding_window", None)


@torch.no_grad()
def reference_logits(hf_model: Any, schedule: Schedule, input_ids: Tensor) -> Tensor:
    """Logits [B, T, V] of `schedule` over whole sequences input_ids [B, T], recomputed from scratch."""
    inner, cfg = hf_model.model, hf_model.config
    assert schedule.num_layers == len(inner.layers)
    B, T = input_ids.shape
    h = inner.embed_tokens(input_ids)  # [B, T, d]
    positions = torch.arange(T)[None].expand(B, T)
    rope = inner.rotary_emb(h, positions)  # (cos, sin) [B, T, hd]
    masks = {i: additive_mask(T, window=_layer_window(cfg, i), dtype=h.dtype) for i in range(len(inner.layers))}

    def attn(i: int, x: Tensor) -> Tensor:  # A_i(x)
        layer = inner.layers[i]
        out, _ = layer.self_attn(layer.input_layernorm(x), position_embeddings=rope, attention_mask=masks[i])
        return out

    def mlp(i: int, x: Tensor) -> Tensor:  # M_i(x)
        layer = inner.layers[i]
        return layer.mlp(layer.post_attention_layernorm(x))

    def whole(i: int, x: Tensor) -> Tensor:  # L_i(x): transformers' own decoder layer
        return inner.layers[i](x, attention_mask=masks[i], position_embeddings=rope)

    for step in schedule.steps:
        if len(step.layers) == 1:
            h = whole(step.layers[0], h)
        elif step.combine == "pairs":
            h = h + sum(attn(i, h) for i in step.layers)
            h = h + sum(mlp(i, h) for i in step.layers)
        else:
            deltas = [whole(i, h) - h for i in step.layers]
            total = sum(deltas)
            h = h + (total / len(deltas) if step.combine == "mean" else total)
    return hf_model.lm_head(inner.norm(h))
