"""The decoder's weights: per-kind stacks across layers, read straight from a safetensors checkpoint.

`load_checkpoint` allocates every stack once in the target dtype and device, then streams the checkpoint one tensor
at a time into its place (q/k/v into column ranges of the fused projection, gate/up into halves), so loading holds
the final weights plus one tensor. `weights_from_hf_model` copies them out of an in-memory transformers model (tests).
Gemma's RMSNorm weights w act as (1 + w): the 1 is added once here, in float32, so the model's norms are plain.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from server.model.model import LayerStack, ModelArgs, ModelWeights, Transformer, text_config

__all__ = ["CheckpointError", "LayerStack", "ModelWeights", "load_checkpoint", "transformer_from_hf",
           "weights_from_hf_model"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    pass


# -- from a checkpoint --------------------------------------------------------------------------------------------


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: `model.safetensors`, or the shards its index lists."""
    from safetensors import safe_open

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if index.exists():
        return {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    raise CheckpointError(
        f"{directory} has neither model.safetensors nor model.safetensors.index.json"
        + (f" (it has {', '.join(found)})" if found else "")
        + "; Painters reads safetensors checkpoints: re-save the model with save_pretrained(safe_serialization=True)"
    )


def load_checkpoint(
    directory: str | Path, config: Any, *, dtype: torch.dtype, device: torch.device | str
) -> ModelWeights:
    """Stream a safetensors checkpoint (transformers' naming) into freshly allocated stacks of `dtype` on `device`."""

    directory, device = Path(directory), torch.device(device)
    a = ModelArgs.from_hf_config(config)
    config = text_config(config)
    files = checkpoint_files(directory)
    prefix = _decoder_prefix(files, directory)
    head_name = next((n for n in _HEAD_NAMES if n in files), None)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or head_name is None

    def empty(*shape: int) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    slots = _layer_slots(a)
    # Optional stacks exist when layer 0 has their tensors (qwen2 biases, llama's attention_bias / mlp_bias);
    # q/k norms are required where the architecture has them.
    wanted = {field for field, _ in slots.values()} - set(_OPTIONAL)
    wanted |= {field for suffix, (field, _) in slots.items() if f"{prefix}layers.0.{suffix}" in files}
    if a.qk_norm:
        wanted |= {"q_norm", "k_norm"}
    if a.post_norms:
        wanted |= {"post_attn_norm", "post_mlp_norm"}
    stacks = {field: empty(a.n_layers, *shape) for field, shape in _stack_shapes(a).items() if field in wanted}
    # Tied: one storage laid out [d, V] (the LM head's matmul streams it contiguously; an embedding lookup reads d
    # strided values per token, which costs nothing next to it).
    final_norm = empty(a.dim)
    lm_head = empty(a.dim, a.vocab_size)
    embed = lm_head.T if tied else empty(a.vocab_size, a.dim)

    # checkpoint name -> the view it fills, shaped like the checkpoint tensor (a matrix [out, in] lands transposed)
    places: dict[str, Tensor] = {f"{prefix}embed_tokens.weight": embed, f"{prefix}norm.weight": final_norm}
    norms = {f"{prefix}norm.weight"}  # names whose weights act as (norm_offset + w)
    if not tied:
        places[head_name] = lm_head.T
    for i in range(a.n_layers):
        for suffix, (field, cols) in slots.items():
            if field in stacks:
                dst = stacks[field][i][..., cols]
                places[f"{prefix}layers.{i}.{suffix}"] = dst.T if dst.dim() == 2 else dst
                if field in _NORMS:
                    norms.add(f"{prefix}layers.{i}.{suffix}")
    missing = sorted(places.keys() - files.keys())
    if missing:
        raise CheckpointError(
            f"{directory} lacks {len(missing)} tensor(s) a {a.arch} model with this config.json needs, e.g. "
            f"{', '.join(missing[:3])}; is the checkpoint complete and in transformers' {a.arch} naming?"
        )
    with torch.no_grad():
        for name, dst in places.items():
            src = _read(files[name], name)
            if src.shape != dst.shape:
                raise CheckpointError(
                    f"{name} in {files[name].name} has shape {list(src.shape)}, but config.json implies "
                    f"{list(dst.shape)}; the checkpoint and its config.json disagree"
                )
            if a.norm_offset and name in norms:
                src = src.float() + a.norm_offset  # as transformers computes (1 + w): in float32
            dst.copy_(src.to(device))  # per tensor: a bf16 checkpoint stays bf16, a float32 one converts here
    log.info("loaded %d tensors from %s (%d ignored)", len(places), directory, len(files) - len(places))
    (inv_freq, rope_scale), local = rotary_parameters(config)
    return ModelWeights(
        layers=LayerStack(**stacks),
        embed=embed,
        lm_head=lm_head,
        final_norm=final_norm,
        inv_freq=inv_freq.to(device),
        rope_scale=rope_scale,
        local_inv_freq=None if local is None else local[0].to(device),
        local_rope_scale=1.0 if local is None else local[1],
    )


_OPTIONAL = tuple(f.name for f in fields(LayerStack) if f.default is None)
_NORMS = frozenset({"attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"})
# Where the decoder lives in a checkpoint: causal LMs, then a multimodal Gemma 3's language model (transformers 5's
# naming, then the older one).
_DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")


def _decoder_prefix(files: dict[str, Path], directory: Path) -> str:
    for prefix in _DECODER_PREFIXES:
        if f"{prefix}embed_tokens.weight" in files:
            return prefix
    raise CheckpointError(
        f"{directory} has no decoder embeddings (looked for "
        f"{', '.join(p + 'embed_tokens.weight' for p in _DECODER_PREFIXES)}); "
        "is it a language model saved by transformers?"
    )


def _stack_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    q, kv, ff, d = a.q_size, a.kv_size, a.intermediate_size, a.dim
    return {
        "attn_norm": (d,), "wqkv": (d, q + 2 * kv), "wo": (q, d), "mlp_norm": (d,), "w_gate_up": (d, 2 * ff),
        "w_down": (ff, d), "bqkv": (q + 2 * kv,), "bo": (d,), "b_gate_up": (2 * ff,), "b_down": (d,),
        "q_norm": (a.head_dim,), "k_norm": (a.head_dim,), "post_attn_norm": (d,), "post_mlp_norm": (d,),
    }


def _layer_slots(a: ModelArgs) -> dict[str, tuple[str, slice]]:
    """Checkpoint name under `model.layers.{i}.` -> (LayerStack field, its range on the stack's last dim)."""
    q, kv, ff = a.q_size, a.kv_size, a.intermediate_size
    every = slice(None)
    slots = {
        "input_layernorm.weight": ("attn_norm", every),
        "self_attn.o_proj.weight": ("wo", every),
        "self_attn.o_proj.bias": ("bo", every),
        "mlp.down_proj.weight": ("w_down", every),
        "mlp.down_proj.bias": ("b_down", every),
        "self_attn.q_norm.weight": ("q_norm", every),
        "self_attn.k_norm.weight": ("k_norm", every),
    }
    if a.post_norms:  # Gemma: post_attention_layernorm norms the attention's output, pre_feedforward the MLP's input
        slots["post_attention_layernorm.weight"] = ("post_attn_norm", every)
        slots["pre_feedforward_layernorm.weight"] = ("mlp_norm", every)
        slots["post_feedforward_layernorm.weight"] = ("post_mlp_norm", every)
    else:  # Llama: post_attention_layernorm is the MLP's input norm
        slots["post_attention_layernorm.weight"] = ("mlp_norm", every)
    for proj, cols in (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, q + 2 * kv))):
        slots[f"self_attn.{proj}_proj.weight"] = ("wqkv", cols)
        slots[f"self_attn.{proj}_proj.bias"] = ("bqkv", cols)
    for proj, cols in (("gate", slice(0, ff)), ("up", slice(ff, 2 * ff))):
        slots[f"mlp.{proj}_proj.weight"] = ("w_gate_up", cols)
        slots[f"mlp.{proj}_proj.bias"] = ("b_gate_up", cols)
    return slots


def _read(path: Path, name: str) -> Tensor:
    from safetensors import safe_open

    # Opened per tensor: a file kept mapped keeps every page read so far resident, a second copy of the weights.
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)


Rotary = tuple[Tensor, float]  # (inv_freq [hd / 2] float32, attention scaling)


def rotary_parameters(config: Any) -> tuple[Rotary, Rotary | None]:
    """The rotary parameters of global layers, and of sliding-window layers when the config gives them their own
    (Gemma 3: rope_parameters keyed by layer type, the global ones with any rope scaling)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        local = rope_parameters(config, "sliding_attention") if "sliding_attention" in params else None
        return rope_parameters(config, "full_attention"), local
    return rope_parameters(config), None


def rope_parameters(config: Any, layer_type: str | None = None) -> Rotary:
    """(inv_freq [hd / 2] float32, attention scaling) exactly as transformers' rotary embedding computes them, for
    one layer type when the config keys its rope parameters by type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    kind = params.get("rope_type", "default")
    if kind == "default":  # what every supported architecture's compute_default_rope_parameters does
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if kind not in ROPE_INIT_FUNCTIONS:
        raise CheckpointError(
            f"rope_type {kind!r} is not one transformers knows; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    original = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings",
                                                                         None)
    if kind == "longrope" and original and original < config.max_position_embeddings:
        # transformers switches every position to the long factors once a sequence passes the original length: no
        # fixed table computes that
        raise CheckpointError(
            f"rope_type 'longrope' with original_max_position_embeddings {original} < max_position_embeddings "
            f"{config.max_position_embeddings} changes its frequencies with the sequence's length; Painters' "
            "rotary tables are fixed, so this checkpoint is not supported"
        )
    inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config, **({} if layer_type is None else {"layer_type": layer_type}))
    return inv_freq.float(), float(scale)


# -- from an in-memory transformers model (tests) ----------------------------------------------------------------


def weights_from_hf_model(hf_model: Any, *, dtype: torch.dtype, device: torch.device | str) -> ModelWeights:
    """Copy the weights of a transformers Llama-family or Gemma 3 model into stacks of `dtype` on `device`."""

    device = torch.device(device)
    a = ModelArgs.from_hf_config(hf_model.config)
    inner = getattr(hf_model.model, "language_model", hf_model.model)  # a multimodal Gemma 3's decoder
    rotary = inner.rotary_emb
    with torch.no_grad():
        tied = hf_model.lm_head.weight is inner.embed_tokens.weight
        head = hf_model.lm_head.weight.detach().to(device, dtype).T.contiguous()  # [d, V]
        embed = head.T if tied else inner.embed_tokens.weight.detach().to(device, dtype).contiguous()  # [V, d]
        if hasattr(rotary, "inv_freq"):
            glob, local = (rotary.inv_freq, rotary.attention_scaling), None
        else:  # per layer type (Gemma 3)
            glob = rotary.full_attention_inv_freq, rotary.full_attention_attention_scaling
            local = rotary.sliding_attention_inv_freq, rotary.sliding_attention_attention_scaling
        return ModelWeights(
            layers=_stack_layers(inner.layers, a, dtype, device),
            embed=embed,
            lm_head=head,
            final_norm=_norm(inner.norm.weight, a).to(device, dtype),
            inv_freq=glob[0].detach().float().to(device),
            rope_scale=float(glob[1]),
            local_inv_freq=None if local is None else local[0].detach().float().to(device),
            local_rope_scale=1.0 if local is None else float(local[1]),
        )


def _norm(weight: Tensor, a: ModelArgs) -> Tensor:
    """An RMSNorm weight as the model applies it: offset folded in, in float32 (as transformers computes it)."""
    return weight.detach().float() + a.norm_offset if a.norm_offset else weight.detach()


def _stack_layers(hf_layers: Any, a: ModelArgs, dtype: torch.dtype, device: torch.device) -> LayerStack:
    def stack(get: Any) -> Tensor | None:
        parts = [get(layer) for layer in hf_layers]
        if parts[0] is None:
            return None
        return torch.stack([p.detach().to(dtype) for p in parts]).to(device).contiguous()

    def bias(module: Any) -> Tensor | None:
        return getattr(module, "bias", None)

    def qkv_bias(layer: Any) -> Tensor | None:
        attn = layer.self_attn
        if bias(attn.q_proj) is None:
            return None
        return torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])

    def norm(module: Any) -> Tensor | None:
        return None if module is None else _norm(module.weight, a)

    post = a.post_norms  # Gemma: post_attention_layernorm norms the attention's output; pre_feedforward the MLP's input
    return LayerStack(
        attn_norm=stack(lambda l: norm(l.input_layernorm)),
        wqkv=stack(
            lambda l: torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight]).T
        ),
        wo=stack(lambda l: l.self_attn.o_proj.weight.T),
        mlp_norm=stack(lambda l: norm(l.pre_feedforward_layernorm if post else l.post_attention_layernorm)),
        w_gate_up=stack(lambda l: torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]).T),
        w_down=stack(lambda l: l.mlp.down_proj.weight.T),
        bqkv=stack(qkv_bias),
        bo=stack(lambda l: bias(l.self_attn.o_proj)),
        b_gate_up=stack(
            lambda l: None if bias(l.mlp.gate_proj) is None else torch.cat([l.mlp.gate_proj.bias, l.mlp.up_proj.bias])
        ),
        b_down=stack(lambda l: bias(l.mlp.down_proj)),
        q_norm=stack(lambda l: norm(getattr(l.self_attn, "q_norm", None))),
        k_norm=stack(lambda l: norm(getattr(l.self_attn, "k_norm", None))),
        post_attn_norm=stack(lambda l: norm(l.post_attention_layernorm) if post else None),
        post_mlp_norm=stack(lambda l: norm(l.post_feedforward_layernorm) if post else None),
    )  # type: ignore[arg-type]


def transformer_from_hf(hf_model: Any, *, dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """Our model from an in-memory transformers model (tests, parity checks): its weights copied into our stacks."""
    args = ModelArgs.from_hf_config(hf_model.config)
    return Transformer(args, weights_from_hf_model(hf_model, dtype=dtype, device=device), dtype=dtype, device=device)
