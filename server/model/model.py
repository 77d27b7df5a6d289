"""Our compact decoder for the Llama family (llama, mistral, qwen2, qwen3) and Gemma 3: model facts and the layer math.

Weights are stacked per kind across layers and stored as [in, out] so that `x @ W` streams them at full memory
bandwidth; adjacent layers applied together are a slice of each stack (a view, no copy) and run as one batched matmul
per kind. A layer is two units, attention and MLP, each applied to a batch of rows that may come from different
schedules (the planner decides which). The model holds no cache: attention gets a function from the executor that
writes the new keys and values and attends over the cached ones.

Gemma 3 differs in facts, not in structure: its units end in their own norms (attention's output and the MLP's output
are normed before the residual add, so each unit's delta includes its post-norm), its RMSNorm scales by (1 + w) (the 1
is folded into the stored weights at load), its MLP gates with tanh-GELU, its embeddings are scaled by sqrt(d), its
attention scales scores by query_pre_attn_scalar^-1/2, and its sliding-window layers have their own RoPE base.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
_GEMMA = ("gemma3_text", "gemma3")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}
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
    act: str = "silu"  # the MLP's gate activation, a key of ACTIVATIONS
    post_norms: bool = False  # Gemma: each unit's output is normed before the residual add (part of its delta)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w); Gemma's 1 is folded into the stored weights at load
    embed_scale: float = 1.0  # embeddings are multiplied by it (Gemma: sqrt(d))
    query_scale: float | None = None  # attention's score scale; None: 1 / sqrt(head_dim)

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelArgs:
        arch = getattr(cfg, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r}; Painters runs {', '.join(SUPPORTED_ARCHITECTURES)} models"
            )
        cfg = text_config(cfg)
        n_heads = cfg.num_attention_heads
        window = getattr(cfg, "sliding_window", None)
        n_layers = cfg.num_hidden_layers
        sliding: frozenset[int] = frozenset()
        gemma = arch in _GEMMA
        if gemma:
            _check_gemma(cfg)
            sliding = frozenset(i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention")
        elif arch == "mistral" and window:
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
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or "silu"
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported MLP activation {act!r}; Painters runs {', '.join(ACTIVATIONS)}")
        return cls(
            arch=cfg.model_type,
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            intermediate_size=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            max_position=cfg.max_position_embeddings,
            qk_norm=arch == "qwen3" or gemma,
            sliding_window=window,
            sliding_layers=sliding,
            act=act,
            post_norms=gemma,
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=cfg.hidden_size**0.5 if gemma else 1.0,
            query_scale=cfg.query_pre_attn_scalar**-0.5 if gemma else None,
        )

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim


def text_config(cfg: Any) -> Any:
    """The decoder's config: a multimodal Gemma 3 checkpoint's text_config, any other config itself."""
    return cfg.text_config if getattr(cfg, "model_type", None) == "gemma3" else cfg


def _check_gemma(cfg: Any) -> None:
    """What our Gemma 3 math leaves out, refused rather than run inexactly (no Gemma 3 release sets these)."""
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, name, None) is not None:
            raise UnsupportedModelError(f"{name}={getattr(cfg, name)} is not supported; Gemma 3 models set it to null")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedModelError("use_bidirectional_attention (an embedding model) is not supported: Painters "
                                    "serves causal language models")


# (queries [G*m, H, T, hd], new keys and values [G, m, T, 2 kv, hd] (keys, then values, as the cache holds them)) ->
# outputs [G*m, H, T, hd]: writes the new keys and values to the cache and attends over the cached ones (the
# executor's: it owns the cache)
AttendFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class LayerStack:
    """Per-kind weights of a run of layers, stacked on dim 0 (matrices as [in, out]); biases, q/k norms and post-norms
    optional."""

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
    post_attn_norm: Tensor | None = None  # [L, d] Gemma: norms the attention's output (part of A_i)
    post_mlp_norm: Tensor | None = None  # [L, d] Gemma: norms the MLP's output (part of M_i)

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
    local_inv_freq: Tensor | None = None  # sliding-window layers' own frequencies (Gemma 3); None: inv_freq
    local_rope_scale: float = 1.0

    def nbytes(self) -> int:
        """Bytes held, counting a storage shared by several tensors (a tied LM head) once."""
        tensors = [getattr(self.layers, f.name) for f in fields(self.layers)]
        tensors += [self.embed, self.lm_head, self.final_norm, self.inv_freq, self.local_inv_freq]
        storages = {
            (t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors if t is not None
        }
        return sum(storages.values())


class Transformer:
    """The frozen decoder: embeddings, stacked layers, final norm, LM head, rotary tables. It holds no cache: the
    executor passes every attention a function that writes the new keys and values and attends over the cached ones."""

    def __init__(self, args: ModelArgs, weights: ModelWeights, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.args, self.dtype, self.device = args, dtype, torch.device(device)
        self.layers = weights.layers
        self.embed, self.lm_head, self.final_norm = weights.embed, weights.lm_head, weights.final_norm  # [V, d], [d, V]
        # as transformers scales embeddings: by sqrt(d) rounded to the weights' dtype
        self._embed_scale = None if args.embed_scale == 1.0 else torch.tensor(args.embed_scale).to(self.device, dtype)
        # rotary frequencies (inv_freq [hd / 2], attention scaling) of global (False) and windowed (True) layers
        glob = (weights.inv_freq.float().to(self.device), float(weights.rope_scale))
        local = glob if weights.local_inv_freq is None else (
            weights.local_inv_freq.float().to(self.device), float(weights.local_rope_scale))
        self._freqs = {False: glob, True: local}
        self._tables = self._rope_tables(1024)
        # tables outgrown, kept: a captured graph reads the tables it was captured with where they lie, and freeing
        # them under a live graph (another batch's, captured before a longer one grew them) would let it read freed
        # memory; growth doubles, so all of them together are at most the size of the current ones
        self._outgrown: list[dict[bool, tuple[Tensor, Tensor]]] = []
        self._views: dict[tuple[int, ...], LayerStack] = {}
        self._plain_mm = self.device.type == "cuda" and _plain_mm_pays(self.layers.w_gate_up[:1])
        self._fused_fns: dict[str, Callable[..., Tensor]] = {}  # compiled layer math (`fused`), made on first use

    def weight_bytes(self) -> int:
        return self.layers.nbytes() + self.lm_head.numel() * self.lm_head.element_size()

    def unit_bytes(self) -> tuple[int, int]:
        """Weight bytes of one layer's attention and of its MLP (what the planner trades off)."""
        w = self.layers
        attn = sum(t[0].numel() for t in (w.attn_norm, w.wqkv, w.wo, w.post_attn_norm) if t is not None)
        mlp = sum(t[0].numel() for t in (w.mlp_norm, w.w_gate_up, w.w_down, w.post_mlp_norm) if t is not None)
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

    def _rope_tables(self, n: int) -> dict[bool, tuple[Tensor, Tensor]]:
        """(cos, sin) [n, hd] per layer kind; one shared table when windowed layers have no frequencies of their own."""
        glob = self._rope_table(n, *self._freqs[False])
        shared = self._freqs[True] is self._freqs[False]
        return {False: glob, True: glob if shared else self._rope_table(n, *self._freqs[True])}

    def _rope_table(self, n: int, inv_freq: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        freqs = torch.arange(n, device=self.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)

    def rope(self, positions: Tensor, *, top: int) -> dict[bool, tuple[Tensor, Tensor]]:
        """positions [B, T] -> {sliding: (cos, sin) [B, T, hd]}: the rotary tables of global (False) and
        sliding-window (True) layers; the same tables for both unless the model gives windowed layers their own
        (Gemma 3: rope_local_base_freq). top: a bound on the positions + 1, from the caller's plain data (reading
        it off `positions` would be a host sync)."""
        if top > self._tables[False][0].shape[0]:
            self._outgrown.append(self._tables)
            self._tables = self._rope_tables(max(top, 2 * self._tables[False][0].shape[0]))
        (cos, sin), local = self._tables[False], self._tables[True]
        glob = cos[positions], sin[positions]
        return {False: glob, True: glob if local is self._tables[False] else (local[0][positions], local[1][positions])}

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

    def _matmul(self, x: Tensor, w: Tensor) -> Tensor:
        """x [G, n, k] @ w [G, k, o] -> [G, n, o]: one batched matmul, or for one layer and a few rows (a
        matrix-vector regime) a plain one where that measured faster on this device (`_plain_mm_pays`)."""
        if self._plain_mm and x.shape[0] == 1 and x.shape[1] <= PLAIN_MM_ROWS:
            return torch.mm(x[0], w[0])[None]
        return torch.bmm(x, w)

    def sdpa(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """q [P, H, T, hd], keys and values [P, kv, S, hd], mask [P, 1, T, S] additive -> [P, H, T, hd]."""
        a = self.args
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=a.query_scale,
                                              enable_gqa=a.n_heads != a.n_kv_heads)

    def attention(self, x: Tensor, w: LayerStack, cos: Tensor, sin: Tensor, attend: AttendFn,
                  keep: Tensor | None = None, *, fused: bool = False) -> Tensor:
        """Attention deltas of G layers, each over its own input: x [G, m, T, d] -> [G, m, T, d].
        cos, sin [1 or G, m, T, hd]; attend writes the new keys/values and attends over the cached ones.
        keep: the positions of m x T that are real tokens (None: all); the projections skip the padding, whose
        deltas are 0. fused: the math before and after `attend` runs through torch.compile (`fused`)."""
        if fused and keep is None:
            q, kv = self.fused("_attention_in")(x, w, cos, sin)
            return self.fused("_attention_out")(attend(q, kv), w)
        q, kv = self._attention_in(x, w, cos, sin, keep)
        return self._attention_out(attend(q, kv), w, keep)

    def _attention_in(self, x: Tensor, w: LayerStack, cos: Tensor, sin: Tensor,
                      keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [G, m, T, d] -> queries [G*m, H, T, hd], new keys and values [G, m, T, 2 kv, hd] in one tensor (one
        write into the cache; fused, the rotary kernel writes the keys into it): norm, projection, q/k norms,
        rotary."""
        a = self.args
        G, m, T, _ = x.shape
        xn = _rms_norm(x, w.attn_norm, a.norm_eps)  # [G, m, T, d]
        qkv = _unpadded(lambda t: self._matmul(t, w.wqkv), xn.reshape(G, m * T, a.dim), keep)  # [G, mT, q + 2kv]
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
        return q.reshape(G * m, T, a.n_heads, a.head_dim).transpose(1, 2), torch.cat([k, v], dim=-2)

    def _attention_out(self, o: Tensor, w: LayerStack, keep: Tensor | None = None) -> Tensor:
        """Attention outputs o [G*m, H, T, hd] -> deltas [G, m, T, d]: output projection and post-norm."""
        a = self.args
        G = w.wo.shape[0]
        T = o.shape[2]
        m = o.shape[0] // G
        o = _unpadded(lambda t: self._matmul(t, w.wo), o.transpose(1, 2).reshape(G, m * T, a.q_size), keep)
        if w.bo is not None:
            o = o + w.bo[:, None, :]
        o = o.view(G, m, T, a.dim)
        return o if w.post_attn_norm is None else _rms_norm(o, w.post_attn_norm, a.norm_eps)

    def mlp(self, x: Tensor, w: LayerStack, keep: Tensor | None = None, *, fused: bool = False) -> Tensor:
        """MLP deltas of G layers, each over its own input: x [G, m, T, d] -> [G, m, T, d]. keep, fused: as in
        `attention`."""
        if fused and keep is None:
            return self.fused("_mlp")(x, w)
        return self._mlp(x, w, keep)

    def _mlp(self, x: Tensor, w: LayerStack, keep: Tensor | None = None) -> Tensor:
        a = self.args
        G = w.w_gate_up.shape[0]
        xn = _rms_norm(x, w.mlp_norm, a.norm_eps).reshape(G, -1, a.dim)

        def mlp(t: Tensor) -> Tensor:
            gate_up = self._matmul(t, w.w_gate_up)
            if w.b_gate_up is not None:
                gate_up = gate_up + w.b_gate_up[:, None, :]
            gate, up = gate_up.chunk(2, dim=-1)
            out = self._matmul(ACTIVATIONS[a.act](gate) * up, w.w_down)
            return out if w.b_down is None else out + w.b_down[:, None, :]

        out = _unpadded(mlp, xn, keep).view(x.shape)
        return out if w.post_mlp_norm is None else _rms_norm(out, w.post_mlp_norm, a.norm_eps)

    def fused(self, name: str) -> Callable[..., Tensor]:
        """The layer math `name` (`_attention_in`, `_attention_out`, `_mlp`) through torch.compile: Inductor fuses
        the norms, rotary, biases and the gate's activation into a few kernels around the matmuls (eager decode runs
        ~20 kernels per layer). Worth it where the step is replayed from a CUDA graph: there Dynamo's guards run once,
        at capture; called eagerly, they cost more host time than fusion saves (docs/results/gpu-step.md). Compiled
        once per model and shape family (the rows dimension turns dynamic at its second size)."""
        got = self._fused_fns.get(name)
        if got is None:
            import torch._dynamo  # lazily: it imports triton and sympy (~150 MB), which unfused serving never needs

            config = torch._dynamo.config  # each unit's variants (groups of 1 or 2, shared or own inputs) compile apart
            config.recompile_limit = max(config.recompile_limit, 64)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
            got = self._fused_fns[name] = torch.compile(getattr(self, name))
        return got

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        h = self.embed[tokens]
        return h if self._embed_scale is None else h * self._embed_scale

    def final_normed(self, h: Tensor) -> Tensor:
        """h [..., d] -> the final norm of h [..., d]: what the LM head reads (and an embedding pools)."""
        return F.rms_norm(h, (self.args.dim,), self.final_norm, self.args.norm_eps)

    def logits(self, h: Tensor) -> Tensor:
        """h [..., d] -> float32 logits [..., V]."""
        return torch.matmul(self.final_normed(h), self.lm_head).float()


PLAIN_MM_ROWS = 8  # rows up to which one layer's matmul may go to torch.mm instead of torch.bmm


def _plain_mm_pays(w: Tensor, repeats: int = 30) -> bool:
    """Whether torch.mm beats torch.bmm by 3 % or more for one row through one layer's widest matrix w [1, k, o]
    on this CUDA device (cuBLAS picks different kernels for a batch of one; which is faster depends on the card and
    the library, so it is measured once, at load)."""
    from server.model.measure import faster

    x = torch.randn(1, 1, w.shape[1], device=w.device, dtype=w.dtype)
    return faster(lambda: torch.bmm(x, w), lambda: torch.mm(x[0], w[0]), repeats=repeats)[0]


def _unpadded(f: Callable[[Tensor], Tensor], x: Tensor, keep: Tensor | None) -> Tensor:
    """f applied to the kept positions of x [G, N, k] only -> [G, N, k'], zero at the others. A prefill pads its rows
    to the longest: without this, short prompts beside a long one pay for the padding in every matmul."""
    if keep is None:
        return f(x)
    y = f(x[:, keep])
    return y.new_zeros(x.shape[0], x.shape[1], y.shape[-1]).index_copy_(1, keep, y)


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

