"""Test support: tiny random-weight transformers models, and an independent reference run of a schedule.

The reference shares no code with `server.model.model`: it calls transformers' own decoder-layer submodules (norms,
attention, MLP, rotary embedding) on the whole sequence, without a cache, under an explicit additive causal mask,
and implements each combine rule straight from its definition. With L_i(h) = h + Δ_i(h) one whole decoder layer:

    one layer            h = L_i(h)
    group, mean          h + mean_i (L_i(h) - h)
    group, sum           h + Σ_i (L_i(h) - h)
    group, pairs         h' = h + Σ_i A_i(h), out = h' + Σ_i M_i(h')
                         with A_i(x) = self_attn_i(input_layernorm_i(x)), M_i(x) = mlp_i(post_attention_layernorm_i(x))
                         (Gemma 3: A_i(x) = post_attention_layernorm_i(self_attn_i(input_layernorm_i(x))),
                          M_i(x) = post_feedforward_layernorm_i(mlp_i(pre_feedforward_layernorm_i(x))))

Every layer keeps its identity wherever the schedule puts it: its own mask (windowed or not) and its own rotary table
(Gemma 3's sliding-window layers have their own base).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from server.policy.compiler import Schedule

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

# Gemma 3: windowed layers with global ones every third layer (2, 5), a window shorter than the test sequences, a
# head_dim that is not d / heads, a query scale that is not head_dim^-1/2, and local and global RoPE bases apart.
_GEMMA: dict[str, Any] = dict(
    _COMMON, head_dim=24, sliding_window=5, sliding_window_pattern=3, query_pre_attn_scalar=40,
)
GEMMA_ROPE: dict[str, Any] = {  # Gemma 3 4B and up: linear scaling on the global layers only
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
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
        "gemma3": Gemma3TextConfig(**_GEMMA),  # tied embeddings, like every Gemma 3
        "gemma3_rope": Gemma3TextConfig(**_GEMMA, rope_parameters=GEMMA_ROPE, tie_word_embeddings=False),
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
    gain = 0.0 if cfg.model_type == "gemma3_text" else 1.0  # Gemma's RMSNorm scales by (1 + w)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):  # RMSNorm gains (also q_norm / k_norm)
                p.copy_(gain + 0.3 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and "embed_tokens" in pname:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / p.shape[1] ** 0.5)
    return model


@functools.cache
def tiny_multimodal_gemma(seed: int = 0) -> Any:
    """A `gemma3` (image-text) model whose language model is tiny_model("gemma3")'s, with a one-layer vision tower:
    what a multimodal Gemma 3 checkpoint looks like (Painters serves its text part). Cached: tests must not modify
    it."""
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=_configs()["gemma3"].to_dict(), vision_config=vision.to_dict(),
                       mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                       image_token_index=VOCAB - 1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
    text = tiny_model("gemma3", seed)
    with torch.no_grad():
        model.model.language_model.load_state_dict(text.model.state_dict())
    return model


def additive_mask(T: int, *, window: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """[1, 1, T, T] additive mask: 0 where query t may see key s (s <= t, t - s < window), else -inf-ish."""
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    return torch.zeros(T, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _rotary(rotary_emb: Any, h: Tensor, positions: Tensor, cfg: Any, i: int) -> tuple[Tensor, Tensor]:
    """Layer i's (cos, sin): Gemma 3's rotary embedding computes one table per layer type."""
    if cfg.model_type == "gemma3_text":
        return rotary_emb(h, positions, cfg.layer_types[i])
    return rotary_emb(h, positions)


def _layer_window(cfg: Any, i: int) -> int | None:
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return cfg.sliding_window if types[i] == "sliding_attention" else None
    return getattr(cfg, "sliding_window", None)


@torch.no_grad()
def reference_logits(hf_model: Any, schedule: Schedule, input_ids: Tensor) -> Tensor:
    """Logits [B, T, V] of `schedule` over whole sequences input_ids [B, T], recomputed from scratch."""
    return hf_model.lm_head(reference_hidden(hf_model, schedule, input_ids))


@torch.no_grad()
def reference_hidden(hf_model: Any, schedule: Schedule, input_ids: Tensor) -> Tensor:
    """The final hidden states [B, T, d] of `schedule` (after the model's final norm: what its LM head reads) over
    whole sequences input_ids [B, T], recomputed from scratch with transformers' own modules."""
    inner, cfg = hf_model.model, hf_model.config
    assert schedule.num_layers == len(inner.layers)
    B, T = input_ids.shape
    h = inner.embed_tokens(input_ids)  # [B, T, d] (Gemma's embedding module scales by sqrt(d) itself)
    positions = torch.arange(T)[None].expand(B, T)
    rope = {i: _rotary(inner.rotary_emb, h, positions, cfg, i) for i in range(len(inner.layers))}  # [B, T, hd] each
    masks = {i: additive_mask(T, window=_layer_window(cfg, i), dtype=h.dtype) for i in range(len(inner.layers))}
    gemma = cfg.model_type == "gemma3_text"

    def attn(i: int, x: Tensor) -> Tensor:  # A_i(x)
        layer = inner.layers[i]
        out, _ = layer.self_attn(layer.input_layernorm(x), position_embeddings=rope[i], attention_mask=masks[i])
        return layer.post_attention_layernorm(out) if gemma else out

    def mlp(i: int, x: Tensor) -> Tensor:  # M_i(x)
        layer = inner.layers[i]
        if gemma:
            return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        return layer.mlp(layer.post_attention_layernorm(x))

    def whole(i: int, x: Tensor) -> Tensor:  # L_i(x): transformers' own decoder layer
        return inner.layers[i](x, attention_mask=masks[i], position_embeddings=rope[i])

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
    return inner.norm(h)
