"""Our compact decoder for the Llama family (llama, mistral, qwen2, qwen3): model facts and the layer math.

Weights are stacked per kind across layers and stored as [in, out] so that `x @ W` streams them at full memory
bandwidth; adjacent layers applied together are a slice of each stack (a view, no copy) and run as one batched matmul
per kind. A layer is two units, attention and MLP, each applied to a batch of rows that may come from different
schedules (the planner decides which). The model holds no cache: attention gets a function from the executor that
writes the new keys and values and returns the cached ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from server.weights import LayerStack, ModelWeights

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
GroupMode = Literal["batched", "streams"]


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelArgs:
    """Model facts, read from the model's own config."""

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position: int
    qk_norm: bool
    sliding_window: int | None
    sliding_layers: frozenset[int]  # layers that attend only to the last `sliding_window` keys

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelArgs:
        arch = getattr(cfg, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r}; Painters runs {', '.join(SUPPORTED_ARCHITECTURES)} models"
            )
        n_heads = cfg.num_attention_heads
        window = getattr(cfg, "sliding_window", None)
        n_layers = cfg.num_hidden_layers
        sliding: frozenset[int] = frozenset()
        if arch == "mistral" and window:
            sliding = frozenset(range(n_layers))
        elif window and getattr(cfg, "use_sliding_window", False):
            # Qwen windows only some layers: those its config marks (transformers' layer_types).
            types = getattr(cfg, "layer_types", None)
            if types:
                sliding = frozenset(i for i, t in enumerate(types) if t == "sliding_attention")
            else:
                sliding = frozenset(range(getattr(cfg, "max_window_layers", 0), n_layers))
        if not sliding:
            window = None
        return cls(
            arch=arch,
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            intermediate_size=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            max_position=cfg.max_position_embeddings,
            qk_norm=arch == "qwen3",
            sliding_window=window,
            sliding_layers=sliding,
        )

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim


KVFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (new k, v [G, m, T, kv, hd]) -> keys, values [G*m, kv, S, hd]


class Transformer:
    """The frozen decoder: embeddings, stacked layers, final norm, LM head, rotary tables. It holds no cache: the
    executor passes every attention a function that writes the new keys and values and returns the cached ones."""

    def __init__(self, args: ModelArgs, weights: ModelWeights, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.args, self.dtype, self.device = args, dtype, torch.device(device)
        self.layers = weights.layers
        self.embed, self.lm_head, self.final_norm = weights.embed, weights.lm_head, weights.final_norm  # [V, d], [d, V]
        self.inv_freq, self.rope_scale = weights.inv_freq.float().to(self.device), float(weights.rope_scale)
        self._cos_sin = self._rope_table(1024)
        self._views: dict[tuple[int, ...], LayerStack] = {}

    @classmethod
    def from_hf(cls, hf_model: Any, *, dtype: torch.dtype, device: torch.device | str) -> Transformer:
        from server.weights import weights_from_hf_model

        args = ModelArgs.from_hf_config(hf_model.config)
        return cls(args, weights_from_hf_model(hf_model, dtype=dtype, device=device), dtype=dtype, device=device)

    def weight_bytes(self) -> int:
        return self.layers.nbytes() + self.lm_head.numel() * self.lm_head.element_size()

    def unit_bytes(self) -> tuple[int, int]:
        """Weight bytes of one layer's attention and of its MLP (what the planner trades off)."""
        w = self.layers
        attn = sum(t[0].numel() for t in (w.attn_norm, w.wqkv, w.wo) if t is not None)
        mlp = sum(t[0].numel() for t in (w.mlp_norm, w.w_gate_up, w.w_down) if t is not None)
        return attn, mlp

    def weights(self, layers: tuple[int, ...]) -> LayerStack:
        """Views of the stacked weights of adjacent `layers` (no copy; at most L^2 / 2 small view objects kept)."""
        got = self._views.get(layers)
        if got is None:
            lo, hi = layers[0], layers[-1]
            assert layers == tuple(range(lo, hi + 1)), f"fused layers must be adjacent: {layers}"
            got = self._views[layers] = replace(self.layers, **{
                f.name: None if (t := getattr(self.layers, f.name)) is None else t[lo : hi + 1]
                for f in fields(self.layers)})
        return got

    # -- per-call tables -----------------------------------------------------------------------------------------

    def _rope_table(self, n: int) -> tuple[Tensor, Tensor]:
        freqs = torch.arange(n, device=self.device, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)

    def rope(self, positions: Tensor) -> dict[bool, tuple[Tensor, Tensor]]:
        """positions [B, T] -> {sliding: (cos, sin) [B, T, hd]}: the rotary tables of global (False) and
        sliding-window (True) layers; the same tables for both unless the model gives windowed layers their own."""
        top = int(positions.max()) + 1
        if top > self._cos_sin[0].shape[0]:
            self._cos_sin = self._rope_table(max(top, 2 * self._cos_sin[0].shape[0]))
        tables = self._cos_sin[0][positions], self._cos_sin[1][positions]
        return {False: tables, True: tables}

    def masks(self, positions: Tensor, num_keys: int) -> tuple[Tensor, Tensor | None]:
        """Additive causal mask [B, 1, T, S] (0 = attend, -inf = not) and, when the model has windowed layers,
        theirs. Additive, in the model's dtype, so attention does not convert a boolean mask in every layer."""
        keys = torch.arange(num_keys, device=self.device)
        allowed = keys[None, None, :] <= positions[:, :, None]  # [B, T, S]
        window = self.args.sliding_window
        windowed = None
        if window is not None:
            windowed = _additive(allowed & (positions[:, :, None] - keys[None, None, :] < window), self.dtype)
        return _additive(allowed, self.dtype), windowed

    # -- the layer math ------------------------------------------------------------------------------------------

    def attention(self, x: Tensor, w: LayerStack, cos: Tensor, sin: Tensor, mask: Tensor, kv: KVFn) -> Tensor:
        """Attention deltas of G layers, each over its own input: x [G, m, T, d] -> [G, m, T, d].
        cos, sin [1 or G, m, T, hd]; mask [G*m, 1, T, S]; kv writes the new keys/values and returns the cached ones."""
        a = self.args
        G, m, T, _ = x.shape
        xn = _rms_norm(x, w.attn_norm, a.norm_eps)  # [G, m, T, d]
        qkv = torch.bmm(xn.reshape(G, m * T, a.dim), w.wqkv)  # [G, mT, q + 2kv]
        if w.bqkv is not None:
            qkv = qkv + w.bqkv[:, None, :]
        qkv = qkv.view(G, m, T, a.n_heads + 2 * a.n_kv_heads, a.head_dim)
        qk, v = qkv[..., : a.n_heads + a.n_kv_heads, :], qkv[..., a.n_heads + a.n_kv_heads :, :]
        if w.q_norm is not None:
            qk = torch.cat(
                [_rms_norm_heads(qk[..., : a.n_heads, :], w.q_norm, a.norm_eps),
                 _rms_norm_heads(qk[..., a.n_heads :, :], w.k_norm, a.norm_eps)], dim=-2,
            )
        # q and k are adjacent in the fused projection: rotate both at once. cos, sin: [1 or G, m, T, 1, hd]
        qk = qk * cos[:, :, :, None, :] + _rotate_half(qk) * sin[:, :, :, None, :]
        q, k = qk[..., : a.n_heads, :], qk[..., a.n_heads :, :]
        keys, values = kv(k, v)  # [G*m, kv, S, hd]
        o = F.scaled_dot_product_attention(
            q.reshape(G * m, T, a.n_heads, a.head_dim).transpose(1, 2), keys, values, attn_mask=mask,
            enable_gqa=a.n_heads != a.n_kv_heads,
        )  # [G*m, H, T, hd]
        o = torch.bmm(o.transpose(1, 2).reshape(G, m * T, a.q_size), w.wo)
        if w.bo is not None:
            o = o + w.bo[:, None, :]
        return o.view(G, m, T, a.dim)

    def mlp(self, x: Tensor, w: LayerStack) -> Tensor:
        """MLP deltas of G layers, each over its own input: x [G, m, T, d] -> [G, m, T, d]."""
        a = self.args
        G = w.w_gate_up.shape[0]
        xn = _rms_norm(x, w.mlp_norm, a.norm_eps).reshape(G, -1, a.dim)
        gate_up = torch.bmm(xn, w.w_gate_up)
        if w.b_gate_up is not None:
            gate_up = gate_up + w.b_gate_up[:, None, :]
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, w.w_down)
        if w.b_down is not None:
            out = out + w.b_down[:, None, :]
        return out.view(x.shape)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.embed[tokens]

    def logits(self, h: Tensor) -> Tensor:
        """h [..., d] -> float32 logits [..., V]."""
        return torch.matmul(F.rms_norm(h, (self.args.dim,), self.final_norm, self.args.norm_eps), self.lm_head).float()


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, T, S] bool -> [B, 1, T, S] additive mask."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))[:, None]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [B, T, d] or [G, B, T, d], weight [G, d] -> [G, B, T, d]."""
    if weight.shape[0] == 1:
        y = F.rms_norm(x, (x.shape[-1],), weight[0], eps)
        return y if y.dim() == 4 else y[None]
    y = F.rms_norm(x, (x.shape[-1],), None, eps)
    return y * weight[:, None, None, :]


def _rms_norm_heads(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [G, B, T, H, hd], weight [G, hd]."""
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight[:, None, None, None, :]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

