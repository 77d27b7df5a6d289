"""The decoder's weights: per-kind stacks across layers, read straight from a safetensors checkpoint.

`load_checkpoint` allocates every stack once in the target dtype and device, then streams the checkpoint one tensor
at a time into its place (q/k/v into column ranges of the fused projection, gate/up into halves), so loading holds
the final weights plus one tensor. `weights_from_hf_model` copies them out of an in-memory transformers model (tests).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # server.model imports this module: import it back only where used
    from server.model import ModelArgs

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    pass


@dataclass
class LayerStack:
    """Per-kind weights of a run of layers, stacked on dim 0 (matrices as [in, out]); biases and q/k norms optional."""

    attn_norm: Tensor  # [L, d]
    wqkv: Tensor  # [L, d, q + 2 kv]
    wo: Tensor  # [L, q, d]
    mlp_norm: Tensor  # [L, d]
    w_gate_up: Tensor  # [L, d, 2 ff]
    w_down: Tensor  # [L, ff, d]
    bqkv: Tensor | None = None  # [L, q + 2 kv]
    bo: Tensor | None = None  # [L, d]
    b_gate_up: Tensor | None = None  # [L, 2 ff]
    b_down: Tensor | None = None  # [L, d]
    q_norm: Tensor | None = None  # [L, hd]
    k_norm: Tensor | None = None  # [L, hd]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in fields(self) if (t := getattr(self, f.name)) is not None)


@dataclass
class ModelWeights:
    """Everything the decoder reads: the layer stacks, embeddings, final norm, LM head and rotary frequencies."""

    layers: LayerStack
    embed: Tensor  # [V, d]; lm_head.T (a view) when the embeddings are tied
    lm_head: Tensor  # [d, V], contiguous
    final_norm: Tensor  # [d]
    inv_freq: Tensor  # [hd / 2] float32
    rope_scale: float  # transformers' attention_scaling: multiplies cos and sin

    def nbytes(self) -> int:
        """Bytes held, counting a storage shared by several tensors (a tied LM head) once."""
        tensors = [getattr(self.layers, f.name) for f in fields(self.layers)]
        tensors += [self.embed, self.lm_head, self.final_norm, self.inv_freq]
        storages = {
            (t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors if t is not None
        }
        return sum(storages.values())


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
    """Stream a safetensors checkpoint (Llama naming) into freshly allocated stacks of `dtype` on `device`."""
    from server.model import ModelArgs

    directory, device = Path(directory), torch.device(device)
    a = ModelArgs.from_hf_config(config)
    files = checkpoint_files(directory)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in files

    def empty(*shape: int) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    slots = _layer_slots(a)
    # Optional stacks exist when layer 0 has their tensors (qwen2 biases, llama's attention_bias / mlp_bias);
    # q/k norms are required where the architecture has them.
    wanted = {field for field, _ in slots.values()} - set(_OPTIONAL)
    wanted |= {field for suffix, (field, _) in slots.items() if f"model.layers.0.{suffix}" in files}
    if a.qk_norm:
        wanted |= {"q_norm", "k_norm"}
    stacks = {field: empty(a.n_layers, *shape) for field, shape in _stack_shapes(a).items() if field in wanted}
    # Tied: one storage laid out [d, V] (the LM head's matmul streams it contiguously; an embedding lookup reads d
    # strided values per token, which costs nothing next to it).
    final_norm = empty(a.dim)
    lm_head = empty(a.dim, a.vocab_size)
    embed = lm_head.T if tied else empty(a.vocab_size, a.dim)

    # checkpoint name -> the view it fills, shaped like the checkpoint tensor (a matrix [out, in] lands transposed)
    places: dict[str, Tensor] = {"model.embed_tokens.weight": embed, "model.norm.weight": final_norm}
    if not tied:
        places["lm_head.weight"] = lm_head.T
    for i in range(a.n_layers):
        for suffix, (field, cols) in slots.items():
            if field in stacks:
                dst = stacks[field][i][..., cols]
                places[f"model.layers.{i}.{suffix}"] = dst.T if dst.dim() == 2 else dst
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
            dst.copy_(src.to(device))  # per tensor: a bf16 checkpoint stays bf16, a float32 one converts here
    log.info("loaded %d tensors from %s (%d ignored)", len(places), directory, len(files) - len(places))
    inv_freq, rope_scale = rope_parameters(config)
    return ModelWeights(
        layers=LayerStack(**stacks),
        embed=embed,
        lm_head=lm_head,
        final_norm=final_norm,
        inv_freq=inv_freq.to(device),
        rope_scale=rope_scale,
    )


_OPTIONAL = tuple(f.name for f in fields(LayerStack) if f.default is None)


def _stack_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    q, kv, ff, d = a.q_size, a.kv_size, a.intermediate_size, a.dim
    return {
        "attn_norm": (d,), "wqkv": (d, q + 2 * kv), "wo": (q, d), "mlp_norm": (d,), "w_gate_up": (d, 2 * ff),
        "w_down": (ff, d), "bqkv": (q + 2 * kv,), "bo": (d,), "b_gate_up": (2 * ff,), "b_down": (d,),
        "q_norm": (a.head_dim,), "k_norm": (a.head_dim,),
    }


def _layer_slots(a: ModelArgs) -> dict[str, tuple[str, slice]]:
    """Checkpoint name under `model.layers.{i}.` -> (LayerStack field, its range on the stack's last dim)."""
    q, kv, ff = a.q_size, a.kv_size, a.intermediate_size
    every = slice(None)
    slots = {
        "input_layernorm.weight": ("attn_norm", every),
        "post_attention_layernorm.weight": ("mlp_norm", every),
        "self_attn.o_proj.weight": ("wo", every),
        "self_attn.o_proj.bias": ("bo", every),
        "mlp.down_proj.weight": ("w_down", every),
        "mlp.down_proj.bias": ("b_down", every),
        "self_attn.q_norm.weight": ("q_norm", every),
        "self_attn.k_norm.weight": ("k_norm", every),
    }
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


def rope_parameters(config: Any) -> tuple[Tensor, float]:
    """(inv_freq [hd / 2] float32, attention scaling) exactly as transformers' rotary embedding computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind == "default":  # what every supported architecture's compute_default_rope_parameters does
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if kind not in ROPE_INIT_FUNCTIONS:
        raise CheckpointError(
            f"rope_type {kind!r} is not one transformers knows; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config)
    return inv_freq.float(), float(scale)


# -- from an in-memory transformers model (tests) ----------------------------------------------------------------


def weights_from_hf_model(hf_model: Any, *, dtype: torch.dtype, device: torch.device | str) -> ModelWeights:
    """Copy the weights of a transformers Llama-family model into stacks of `dtype` on `device`."""
    device = torch.device(device)
    inner = hf_model.model
    with torch.no_grad():
        tied = hf_model.lm_head.weight is inner.embed_tokens.weight
        head = hf_model.lm_head.weight.detach().to(device, dtype).T.contiguous()  # [d, V]
        embed = head.T if tied else inner.embed_tokens.weight.detach().to(device, dtype).contiguous()  # [V, d]
        return ModelWeights(
            layers=_stack_layers(inner.layers, dtype, device),
            embed=embed,
            lm_head=head,
            final_norm=inner.norm.weight.detach().to(device, dtype),
            inv_freq=inner.rotary_emb.inv_freq.detach().float().to(device),
            rope_scale=float(inner.rotary_emb.attention_scaling),
        )


def _stack_layers(hf_layers: Any, dtype: torch.dtype, device: torch.device) -> LayerStack:
    def stack(get: Any) -> Tensor | None:
        parts = [get(layer) for layer in hf_layers]
        if parts[0] is None:
            return None
        return torch.stack([p.detach().to(dtype) for p in parts]).to(device).contiguous()

    def bias(module: Any) -> Tensor | None:
        return getattr(module, "bias", None)

    def qkv_bias(layer: Any) -> Tensor | None:
        a = layer.self_attn
        if bias(a.q_proj) is None:
            return None
        return torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])

    def norm_weight(layer: Any, name: str) -> Tensor | None:
        module = getattr(layer.self_attn, name, None)
        return None if module is None else module.weight

    return LayerStack(
        attn_norm=stack(lambda l: l.input_layernorm.weight),
        wqkv=stack(
            lambda l: torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight]).T
        ),
        wo=stack(lambda l: l.self_attn.o_proj.weight.T),
        mlp_norm=stack(lambda l: l.post_attention_layernorm.weight),
        w_gate_up=stack(lambda l: torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]).T),
        w_down=stack(lambda l: l.mlp.down_proj.weight.T),
        bqkv=stack(qkv_bias),
        bo=stack(lambda l: bias(l.self_attn.o_proj)),
        b_gate_up=stack(
            lambda l: None if bias(l.mlp.gate_proj) is None else torch.cat([l.mlp.gate_proj.bias, l.mlp.up_proj.bias])
        ),
        b_down=stack(lambda l: bias(l.mlp.down_proj)),
        q_norm=stack(lambda l: norm_weight(l, "q_norm")),
        k_norm=stack(lambda l: norm_weight(l, "k_norm")),
    )  # type: ignore[arg-type]
