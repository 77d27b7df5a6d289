"""Our compact decoder for the Llama family (llama, mistral, qwen2, qwen3), with weights taken from a transformers model.

Weights are stacked per kind across layers and stored as [in, out] so that `x @ W` streams them at full memory
bandwidth; a parallel group of consecutive layers is a slice of each stack (a view, no copy) and runs as one batched
matmul per kind. The model holds no cache: every call gets the KV cache and the slots to use from the executor.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

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

    def select(self, layers: tuple[int, ...]) -> LayerStack:
        lo, hi = layers[0], layers[-1]
        if layers == tuple(range(lo, hi + 1)):
            pick = lambda t: t[lo : hi + 1]  # noqa: E731  (a view)
        else:
            index = torch.tensor(layers, device=self.wqkv.device)
            pick = lambda t: t.index_select(0, index)  # noqa: E731  (a copy; cached by the caller)
        return LayerStack(**{f.name: None if (t := getattr(self, f.name)) is None else pick(t) for f in fields(self)})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in fields(self) if (t := getattr(self, f.name)) is not None)


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


@dataclass
class StepContext:
    """What every layer of one forward call shares: rows, positions, rotary tables and the attention mask."""

    rows: slice  # cache rows of this batch
    start: list[int]  # tokens already cached per row
    positions: Tensor  # [B, T] absolute positions of the new tokens
    cos: Tensor  # [B, T, hd]
    sin: Tensor  # [B, T, hd]
    mask: Tensor | None  # [B, 1, T, S] True = attend; None when every query may see every key

    def mask_for(self, layers: tuple[int, ...]) -> Tensor | None:
        """[B, 1, T, S], or [G, B, 1, T, S] for a group that mixes windowed and full layers."""
        if self.window_mask is None:
            return self.mask
        kinds = [i in self.sliding_layers for i in layers]
        if all(kinds):
            return self.window_mask
        if not any(kinds):
            return self.mask
        full = self.mask if self.mask is not None else torch.ones_like(self.window_mask)
        return torch.stack([self.window_mask if k else full for k in kinds])
    kv_len: int  # S: keys attended (the longest row's length after this call)
    window_mask: Tensor | None = None  # the same for sliding-window layers, when the window cuts anything
    sliding_layers: frozenset[int] = frozenset()


class Transformer:
    """The frozen decoder: embeddings, stacked layers, final norm, LM head, rotary tables."""

    def __init__(self, hf_model: Any, *, dtype: torch.dtype, device: torch.device | str) -> None:
        device = torch.device(device)
        self.args = ModelArgs.from_hf_config(hf_model.config)
        self.dtype, self.device = dtype, device
        inner = hf_model.model
        with torch.no_grad():
            self.layers = _stack_layers(inner.layers, dtype, device)
            self.embed = inner.embed_tokens.weight.detach().to(device, dtype).contiguous()  # [V, d]
            self.lm_head = hf_model.lm_head.weight.detach().to(device, dtype).T.contiguous()  # [d, V]
            self.final_norm = inner.norm.weight.detach().to(device, dtype)
            rotary = inner.rotary_emb
            self.inv_freq = rotary.inv_freq.detach().float().to(device)
            self.rope_scale = float(rotary.attention_scaling)
        self._cos_sin = self._rope_table(1024)
        self._selected: OrderedDict[tuple[int, ...], LayerStack] = OrderedDict()
        self._streams: list[Any] = []

    # -- helpers -------------------------------------------------------------------------------------------------

    def _rope_table(self, n: int) -> tuple[Tensor, Tensor]:
        freqs = torch.arange(n, device=self.device, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)

    def weights(self, layers: tuple[int, ...]) -> LayerStack:
        """The stacked weights of `layers`: views for a consecutive run, else a cached gathered copy."""
        got = self._selected.get(layers)
        if got is None:
            got = self.layers.select(layers)
            self._selected[layers] = got
            if len(self._selected) > 256:
                self._selected.popitem(last=False)
        return got

    def weight_bytes(self) -> int:
        return self.layers.nbytes() + self.lm_head.numel() * self.lm_head.element_size()

    def context(self, *, rows: slice, start: list[int], num_new: int) -> StepContext:
        """Positions, rotary rows and mask for B rows that each append `num_new` tokens after `start[b]` tokens."""
        a = self.args
        kv_len = max(start) + num_new
        if kv_len > self._cos_sin[0].shape[0]:
            self._cos_sin = self._rope_table(max(kv_len, 2 * self._cos_sin[0].shape[0]))
        start_t = torch.tensor(start, device=self.device)
        positions = start_t[:, None] + torch.arange(num_new, device=self.device)[None, :]  # [B, T]
        cos, sin = self._cos_sin[0][positions], self._cos_sin[1][positions]
        windowed = a.sliding_window is not None and kv_len > a.sliding_window
        mask = window_mask = None
        if num_new > 1 or len(set(start)) > 1 or windowed:
            keys = torch.arange(kv_len, device=self.device)
            allowed = keys[None, None, :] <= positions[:, :, None]  # [B, T, S]
            mask = allowed[:, None]
            if windowed:
                window_mask = (allowed & (positions[:, :, None] - keys[None, None, :] < a.sliding_window))[:, None]
        return StepContext(rows, start, positions, cos, sin, mask, kv_len, window_mask, a.sliding_layers)

    # -- the layer math ------------------------------------------------------------------------------------------

    def attention(
        self, x: Tensor, w: LayerStack, ctx: StepContext, cache: Any, slots: slice, layers: tuple[int, ...]
    ) -> Tensor:
        """Attention deltas of G layers that all read x: [B, T, d] or [G, B, T, d] -> [G, B, T, d]."""
        a = self.args
        G = w.wqkv.shape[0]
        B, T = ctx.positions.shape
        xn = _rms_norm(x, w.attn_norm, a.norm_eps)  # [G, B, T, d]
        qkv = torch.bmm(xn.reshape(G, B * T, a.dim), w.wqkv)  # [G, BT, q + 2kv]
        if w.bqkv is not None:
            qkv = qkv + w.bqkv[:, None, :]
        qkv = qkv.view(G, B, T, a.n_heads + 2 * a.n_kv_heads, a.head_dim)
        qk, v = qkv[..., : a.n_heads + a.n_kv_heads, :], qkv[..., a.n_heads + a.n_kv_heads :, :]
        if w.q_norm is not None:
            qk = torch.cat(
                [_rms_norm_heads(qk[..., : a.n_heads, :], w.q_norm, a.norm_eps),
                 _rms_norm_heads(qk[..., a.n_heads :, :], w.k_norm, a.norm_eps)], dim=-2,
            )
        # q and k are adjacent in the fused projection: rotate both at once. cos, sin: [1, B, T, 1, hd]
        cos, sin = ctx.cos[None, :, :, None, :], ctx.sin[None, :, :, None, :]
        qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk[..., : a.n_heads, :], qk[..., a.n_heads :, :]
        keys, values = cache.update(slots, ctx.rows, ctx.start, ctx.positions, k, v, kv_len=ctx.kv_len)
        mask = ctx.mask_for(layers)
        o = _attend(q.transpose(2, 3), keys, values, mask, gqa=a.n_heads != a.n_kv_heads)  # [G, B, H, T, hd]
        o = torch.bmm(o.transpose(2, 3).reshape(G, B * T, a.q_size), w.wo)
        if w.bo is not None:
            o = o + w.bo[:, None, :]
        return o.view(G, B, T, a.dim)

    def mlp(self, x: Tensor, w: LayerStack) -> Tensor:
        """MLP deltas of G layers: x [B, T, d] (shared) or [G, B, T, d] (one input each) -> [G, B, T, d]."""
        a = self.args
        G = w.w_gate_up.shape[0]
        shape = x.shape[-3:]
        xn = _rms_norm(x, w.mlp_norm, a.norm_eps).reshape(G, -1, a.dim)
        gate_up = torch.bmm(xn, w.w_gate_up)
        if w.b_gate_up is not None:
            gate_up = gate_up + w.b_gate_up[:, None, :]
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, w.w_down)
        if w.b_down is not None:
            out = out + w.b_down[:, None, :]
        return out.view(G, *shape)

    def run_step(self, h: Tensor, step: Any, ctx: StepContext, cache: Any, *, mode: GroupMode = "batched") -> Tensor:
        """One schedule step on h [B, T, d]: one layer, or a group combined by its rule."""
        slots = slice(step.slots[0], step.slots[-1] + 1)
        if mode == "streams" and len(step.layers) > 1:
            return self._run_step_streams(h, step, ctx, cache)
        w = self.weights(step.layers)
        attn = self.attention(h, w, ctx, cache, slots, step.layers)  # [G, B, T, d]
        if len(step.layers) == 1:
            h = h + attn[0]
            return h + self.mlp(h, w)[0]
        if step.combine == "pairs":
            h = h + attn.sum(0)
            return h + self.mlp(h, w).sum(0)
        delta = attn + self.mlp(h + attn, w)
        return h + (delta.mean(0) if step.combine == "mean" else delta.sum(0))

    def _run_step_streams(self, h: Tensor, step: Any, ctx: StepContext, cache: Any) -> Tensor:
        """The same group, one member per CUDA stream (in order on the CPU); members write disjoint cache slots."""
        members = [(self.weights((layer,)), slice(s, s + 1), layer) for layer, s in zip(step.layers, step.slots)]
        attn = self._on_streams(h, [lambda w=w, s=s, i=i: self.attention(h, w, ctx, cache, s, (i,))[0]
                                    for w, s, i in members])
        if step.combine == "pairs":
            h = h + sum(attn)
            mlp = self._on_streams(h, [lambda w=w: self.mlp(h, w)[0] for w, _, _ in members])
            return h + sum(mlp)
        mlp = self._on_streams(h, [lambda w=w, a=a: self.mlp(h + a, w)[0] for (w, _, _), a in zip(members, attn)])
        deltas = [a + m for a, m in zip(attn, mlp)]
        total = sum(deltas)
        return h + (total / len(deltas) if step.combine == "mean" else total)

    def _on_streams(self, h: Tensor, jobs: list[Any]) -> list[Tensor]:
        if h.device.type != "cuda":
            return [job() for job in jobs]
        while len(self._streams) < len(jobs):
            self._streams.append(torch.cuda.Stream(device=h.device))
        main = torch.cuda.current_stream(h.device)
        outs: list[Tensor] = []
        for job, stream in zip(jobs, self._streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(job())
        for out, stream in zip(outs, self._streams):
            main.wait_stream(stream)
            out.record_stream(main)
        return outs

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.embed[tokens]

    def logits(self, h: Tensor) -> Tensor:
        """h [..., d] -> float32 logits [..., V]."""
        return torch.matmul(F.rms_norm(h, (self.args.dim,), self.final_norm, self.args.norm_eps), self.lm_head).float()


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [B, T, d] or [G, B, T, d], weight [G, d] -> [G, B, T, d]."""
    if weight.shape[0] == 1:
        y = F.rms_norm(x, (x.shape[-1],), weight[0], eps)
        return y if y.dim() == 4 else y[None]
    y = F.rms_norm(x, (x.shape[-1],), None, eps)
    return y * weight[:, None, None, :]


def _attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, *, gqa: bool) -> Tensor:
    """q [G, B, H, T, hd], keys/values [G, B, kv, S, hd] -> [G, B, H, T, hd]. SDPA takes 4-D inputs far faster than
    5-D ones, so G and B are merged (a copy of the keys only for a parallel group)."""
    G, B = q.shape[:2]
    if mask is not None and G > 1:
        if mask.dim() == 4:  # shared by the group
            mask = mask.expand(G, *mask.shape)
        mask = mask.reshape(G * B, *mask.shape[2:])
    o = F.scaled_dot_product_attention(
        q.reshape(G * B, *q.shape[2:]), keys.reshape(G * B, *keys.shape[2:]), values.reshape(G * B, *values.shape[2:]),
        attn_mask=mask, enable_gqa=gqa,
    )
    return o.view(G, B, *o.shape[1:])


def _rms_norm_heads(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [G, B, T, H, hd], weight [G, hd]."""
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight[:, None, None, None, :]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

