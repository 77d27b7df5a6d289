"""Sampling parameters and next-token choice: greedy, temperature, top-k, top-p, per-request seeded generators."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class SamplingError(ValueError):
    """Sampling parameters out of range; the message names the allowed range."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
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
        checks = [
            (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (0 <= self.logprobs <= 20, f"logprobs must be between 0 and 20, got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Tensor:
    """logits [B, V] float32 -> next tokens [B]. Each row uses its own parameters and generator, so a sequence
    draws the same tokens whether it runs alone or in a batch."""
    tokens = logits.argmax(dim=-1)
    for b, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[b] = _sample_row(logits[b], p, g)
    return tokens


def _sample_row(logits: Tensor, p: SamplingParams, g: torch.Generator) -> Tensor:
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=g)[0]
