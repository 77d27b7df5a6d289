"""Sampling parameters and their allowed ranges, each bound stated once. No torch: the HTTP models import these."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
    # the logprob of each chosen token and its top-n alternatives; None: no logprobs at all, not even the chosen
    # token's (vLLM's None; OpenAI requests without `logprobs` skip a pass over the vocabulary every step)
    logprobs: int | None = 0
    echo: bool = False  # also score the prompt (prompt-token logprobs), with `logprobs` alternatives
    prompt_logprobs: int | None = None  # vLLM's: score the prompt with this many alternatives (None: not asked)
    # vLLM's output shaping: a stop string (or stop token) that ends the request stays in its text; special tokens'
    # text left out of the output; spaces around added tokens (a slow tokenizer's option; fast ones write none)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        for name, value in (("max_tokens", self.max_tokens), ("min_tokens", self.min_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SamplingError(f"{name} must be an integer >= 0, got {value!r}")
        TEMPERATURE.check("temperature", self.temperature)
        TOP_P.check("top_p", self.top_p)
        TOP_K.check("top_k", self.top_k)
        if self.logprobs is not None:
            LOGPROBS.check("logprobs", self.logprobs)
        if self.prompt_logprobs is not None:
            LOGPROBS.check("prompt_logprobs", self.prompt_logprobs)
        if self.seed is not None:
            SEED.check("seed", self.seed)
        check_stop(self.stop)

    @property
    def prompt_alternatives(self) -> int | None:
        """How many alternatives each prompt token is scored with (echo's `logprobs`, prompt_logprobs, the larger
        when both are asked); None: the prompt is not scored."""
        if not self.echo and self.prompt_logprobs is None:
            return None
        return max((self.logprobs or 0) if self.echo else 0, self.prompt_logprobs or 0)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1
