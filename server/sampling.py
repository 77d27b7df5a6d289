"""Sampling parameters, their allowed ranges, and next-token choice: greedy, temperature, top-k, top-p, per-request
seeded generators. Every value `SamplingParams` accepts samples without inf or NaN reaching the draw."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

MIN_TEMPERATURE = 1e-5  # below this, temperature sampling is argmax (vLLM's _SAMPLING_EPS)
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters


class SamplingError(ValueError):
    """Sampling parameters out of range; the message names the allowed range."""


@dataclass(frozen=True)
class Interval:
    """The allowed values of one parameter: [lo, hi], or (lo, hi] when lo_open. The HTTP models import these, so each
    bound is stated once."""

    lo: int | float
    hi: int | float
    lo_open: bool = False
    integer: bool = False

    def __contains__(self, x: int | float) -> bool:
        above = self.lo < x if self.lo_open else self.lo <= x
        return math.isfinite(x) and above and x <= self.hi

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}]"

    def check(self, name: str, value: Any) -> Any:
        """`value` unchanged if allowed; else a SamplingError naming `name` and the range."""
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value not in self:
            kind = "an integer" if self.integer else "a finite number"
            raise SamplingError(f"{name} must be {kind} in {self}, got {value!r}")
        return value

    def json_schema(self) -> dict[str, int | float]:
        return {"exclusiveMinimum" if self.lo_open else "minimum": self.lo, "maximum": self.hi}


TEMPERATURE = Interval(0, 100)  # 0 (or below MIN_TEMPERATURE) = greedy
TOP_P = Interval(0, 1, lo_open=True)
TOP_K = Interval(0, 1_000_000, integer=True)  # 0 = off; above the vocabulary size = off
SEED = Interval(0, 2**63 - 1, integer=True)
LOGPROBS = Interval(0, 20, integer=True)


def check_stop(stop: tuple[str, ...] | list[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise SamplingError(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_LENGTH:
            got = f"{len(s)} characters" if isinstance(s, str) else type(s).__name__
            raise SamplingError(f"each stop string must be a string of 1-{MAX_STOP_LENGTH} characters, got {got}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # the server bounds it by the context length
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int = 0  # top-n alternatives returned per token
    echo: bool = False  # also score the prompt (prompt-token logprobs)

    def __post_init__(self) -> None:
        for name, value in (("max_tokens", self.max_tokens), ("min_tokens", self.min_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SamplingError(f"{name} must be an integer >= 0, got {value!r}")
        TEMPERATURE.check("temperature", self.temperature)
        TOP_P.check("top_p", self.top_p)
        TOP_K.check("top_k", self.top_k)
        LOGPROBS.check("logprobs", self.logprobs)
        if self.seed is not None:
            SEED.check("seed", self.seed)
        check_stop(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Tensor:
    """logits [B, V] -> next tokens [B]. Each row uses its own parameters and generator, so a sequence draws the same
    tokens whether it runs alone or in a batch. Raises the first row's error if any row cannot be sampled."""
    tokens, errors = sample_isolated(logits, params, generators)
    if errors:
        raise errors[min(errors)]
    return tokens


def sample_isolated(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]
                    ) -> tuple[Tensor, dict[int, Exception]]:
    """logits [B, V] -> (next tokens [B], {row: the error that row raised}). A failed row's token is arbitrary and the
    other rows are unaffected, so one bad sequence can be finished with its error while the batch goes on.

    All greedy rows are one argmax. NaN logits are never chosen; a row whose logits are all -inf or NaN fails."""
    assert logits.dim() == 2 and logits.shape[0] == len(params) == len(generators), (logits.shape, len(params))
    logits = logits.float().masked_fill(logits.isnan(), float("-inf"))
    tokens = logits.argmax(dim=-1)
    alive = (logits > float("-inf")).any(dim=-1).tolist()
    errors: dict[int, Exception] = {}
    for b, (p, g) in enumerate(zip(params, generators)):
        if not alive[b]:
            errors[b] = ValueError(f"row {b} has no token with a finite logit (all are -inf or NaN)")
        elif not p.greedy:
            try:
                tokens[b] = _sample_row(logits[b], p, g)
            except Exception as e:  # isolation is the point: whatever failed, only this row is lost
                errors[b] = e
    return tokens, errors


def _sample_row(logits: Tensor, p: SamplingParams, g: torch.Generator) -> Tensor:
    """logits [V] float32, no NaN, some > -inf -> a token id (0-d). Shifting the maximum to 0 before dividing keeps
    every scaled logit in [-inf, 0], so softmax never sees inf - inf; +inf logits become 0 and share the draw."""
    x = torch.nan_to_num(logits - logits.max(), nan=0.0, neginf=float("-inf")) / p.temperature
    if 0 < p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # the most likely token always stays, however small top_p rounds in float32
        x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
    return torch.multinomial(x.softmax(-1), 1, generator=g)[0]
