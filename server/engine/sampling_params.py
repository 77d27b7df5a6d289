"""Sampling parameters and their allowed ranges, each bound stated once. No torch: the HTTP models import these."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

MIN_TEMPERATURE = 1e-5  # below this, temperature sampling is argmax (vLLM's _SAMPLING_EPS)
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters
MAX_LOGIT_BIAS = 300  # entries, as OpenAI's API
# bad_words: vLLM bounds their token sequences (VLLM_MAX_NUM_BAD_WORDS, 128: each word gives one or two) and, in its
# GPU runner, their tokens in all (VLLM_MAX_BAD_WORDS_TOTAL_TOKENS, 1,024); the words and their lengths are bounded
# here before any is encoded
MAX_BAD_WORDS = 128
MAX_BAD_WORD_LENGTH = 256  # characters
MAX_BAD_WORD_SEQUENCES = 128
MAX_BAD_WORD_TOKENS = 1024


class SamplingError(ValueError):
    """Sampling parameters out of range; the message names the allowed range."""


StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match (vLLM's StructuredOutputsParams, one kind): a JSON schema, any JSON object,
    a regular expression it fully matches, one of some strings, a grammar (EBNF in xgrammar's GBNF-like dialect,
    whose rule `root` is the whole output, or Lark, whose rule `start` is), or a structural tag (xgrammar's: text
    with structured parts, such as JSON between tags). `server.engine.grammar` compiles it."""

    kind: StructuredKind
    spec: str | tuple[str, ...] = ""  # json: the schema as JSON text; regex; grammar: EBNF or Lark; choice: strings;
    # structural_tag: xgrammar's structural tag as JSON text ({"type": "structural_tag", "format": ...}, or vLLM's
    # older {"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]})
    param: str = field(default="structured_outputs", compare=False)  # the request field it came from (messages)
    any_whitespace: bool = True  # json, json_object: False puts no whitespace but ", " and ": " between tokens

    def __post_init__(self) -> None:
        assert self.kind in get_args(StructuredKind), self.kind
        assert isinstance(self.spec, tuple) == (self.kind == "choice"), (self.kind, type(self.spec))
        assert self.any_whitespace or self.kind in ("json", "json_object"), self.kind


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
        return f"{'(' if self.lo_open else '['}{self.lo}, " + ("inf)" if self.hi == math.inf else f"{self.hi}]")

    def check(self, name: str, value: Any) -> Any:
        """`value` unchanged if allowed; else a SamplingError naming `name` and the range."""
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value not in self:
            kind = "an integer" if self.integer else "a finite number"
            raise SamplingError(f"{name} must be {kind} in {self}, got {value!r}")
        return value

    def json_schema(self) -> dict[str, int | float]:
        bounds = {"exclusiveMinimum" if self.lo_open else "minimum": self.lo, "maximum": self.hi}
        return {k: v for k, v in bounds.items() if v != math.inf}  # JSON has no inf


TEMPERATURE = Interval(0, 100)  # 0 (or below MIN_TEMPERATURE) = greedy
TOP_P = Interval(0, 1, lo_open=True)
TOP_K = Interval(0, 1_000_000, integer=True)  # 0 = off; above the vocabulary size = off
SEED = Interval(0, 2**63 - 1, integer=True)
LOGPROBS = Interval(0, 20, integer=True)
PENALTY = Interval(-2, 2)  # presence and frequency (OpenAI's; TGI's frequency_penalty too)
POSITIVE = Interval(0, math.inf, lo_open=True)  # repetition_penalty, vLLM's and TGI's (1 = off)
MIN_P = Interval(0, 1)  # 0 = off
TYPICAL_P = Interval(0, 1, lo_open=True)  # 1 = off
LOGIT_BIAS = Interval(-100, 100)


def bad_word_ids(words: tuple[str, ...], encode: Callable[[str], Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """vLLM's bad_words as token sequences (`SamplingParams.update_from_tokenizer`): each word, stripped of leading
    spaces, encoded alone (the word at the start of a text) and after a space (inside one); the second form is kept
    only where it is another token sequence of the same length. encode: text -> ids without special tokens."""
    out: list[tuple[int, ...]] = []
    for word in words:
        alone = tuple(encode(word.lstrip()))
        if not alone:
            raise SamplingError(f"bad_words: {word!r} encodes to no token; send words with some text")
        out.append(alone)
        spaced = tuple(encode(" " + word.lstrip()))
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
    if len(out) > MAX_BAD_WORD_SEQUENCES:
        raise SamplingError(f"bad_words encode to {len(out)} token sequences (a word to one, or two where it also "
                            f"has a form after a space); at most {MAX_BAD_WORD_SEQUENCES} are allowed: send fewer "
                            "words")
    if sum(map(len, out)) > MAX_BAD_WORD_TOKENS:
        raise SamplingError(f"bad_words encode to {sum(map(len, out))} tokens in all; at most {MAX_BAD_WORD_TOKENS} "
                            "are allowed: send fewer or shorter words")
    return tuple(out)


def check_bad_words(words: tuple[str, ...] | list[str]) -> None:
    _check_strings(words, field="bad_words", each="each of bad_words", most=MAX_BAD_WORDS, noun="words",
                   longest=MAX_BAD_WORD_LENGTH)


def check_stop(stop: tuple[str, ...] | list[str]) -> None:
    _check_strings(stop, field="stop", each="each stop string", most=MAX_STOP_STRINGS, noun="strings",
                   longest=MAX_STOP_LENGTH)


def _check_strings(values: tuple[str, ...] | list[str], *, field: str, each: str, most: int, noun: str,
                   longest: int) -> None:
    """At most `most` strings of 1 to `longest` characters, or a SamplingError naming `field` and the bounds."""
    if len(values) > most:
        raise SamplingError(f"{field} must hold at most {most} {noun}, got {len(values)}")
    for v in values:
        if not isinstance(v, str) or not 0 < len(v) <= longest:
            got = f"{len(v)} characters" if isinstance(v, str) else type(v).__name__
            raise SamplingError(f"{each} must be a string of 1-{longest} characters, got {got}")


@dataclass(frozen=True)
class SamplingParams:
    """One request's (one choice's) sampling. The logit processors run as vLLM's do: allowed_token_ids, bad_words,
    logit_bias and min_tokens' mask on the raw logits, then the penalties, then temperature, then min_p, top-k and
    top-p."""

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
    # subtracted from the logit of each token the output holds so far: presence once, frequency per occurrence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # "output": frequency_penalty x the token's count in the output (OpenAI's, vLLM's); "sequence": x its share of
    # prompt and output together, count / length (TGI's)
    frequency_of: Literal["output", "sequence"] = "output"
    # a token seen in prompt or output has its logit divided by this when positive, multiplied when not (CTRL's)
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # drawing rows drop tokens less likely than min_p x the most likely one (after temperature)
    # typical decoding (TGI's typical_p, transformers' TypicalLogitsWarper), after top-k and top-p: a drawing row keeps
    # the tokens whose surprise is closest to the entropy until they hold this much of the mass; 1 = off
    typical_p: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit); a token given twice: the last
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be chosen
    # the top `logprobs` alternatives are the likeliest of the tokens the row may choose, those of allowed_token_ids
    # and of its structured output's grammar (each with its logprob over the whole vocabulary, as any), not of every
    # token: a beam search's candidates (vLLM's raw top logprobs hold any token)
    top_from_allowed: bool = False
    # vLLM's: words the output may not complete (a word's last token is masked where the output ends with the
    # tokens before it; a one-token word's token always); bad_words_ids: their token sequences (`bad_word_ids`),
    # None until they are encoded (the server does it at admission, `Engine.start` otherwise)
    bad_words: tuple[str, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    structured: StructuredOutput | None = None  # the output must match it (the request ends when it is complete)

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
        PENALTY.check("presence_penalty", self.presence_penalty)
        PENALTY.check("frequency_penalty", self.frequency_penalty)
        POSITIVE.check("repetition_penalty", self.repetition_penalty)
        MIN_P.check("min_p", self.min_p)
        TYPICAL_P.check("typical_p", self.typical_p)
        if self.frequency_of not in ("output", "sequence"):
            raise SamplingError(f"frequency_of must be 'output' or 'sequence', got {self.frequency_of!r}")
        # a presence penalty counts the output only: counting the prompt (TGI's frequency) would make it another rule
        assert self.frequency_of == "output" or self.presence_penalty == 0, "presence_penalty with a sequence frequency"
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingError(f"logit_bias must hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            _check_token("logit_bias", token)
            LOGIT_BIAS.check("logit_bias", bias)
        object.__setattr__(self, "logit_bias", tuple(dict(self.logit_bias).items()))
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise SamplingError("allowed_token_ids must hold at least one token id (or be left out)")
            for token in self.allowed_token_ids:
                _check_token("allowed_token_ids", token)
        assert not self.top_from_allowed or self.allowed_token_ids is not None or self.structured is not None, \
            "top_from_allowed without a list or a grammar"
        check_bad_words(self.bad_words)
        object.__setattr__(self, "bad_words", tuple(dict.fromkeys(self.bad_words)))  # vLLM drops repeats
        if self.bad_words_ids is not None:
            assert all(word and all(isinstance(t, int) for t in word) for word in self.bad_words_ids), "bad_words_ids"

    def with_bad_words_ids(self, encode: Callable[[str], Sequence[int]]) -> SamplingParams:
        """These parameters with bad_words encoded by `encode` (text -> ids without special tokens); raises a
        SamplingError naming the bound they pass."""
        if self.bad_words_ids is not None or not self.bad_words:
            return self
        return dataclasses.replace(self, bad_words_ids=bad_word_ids(self.bad_words, encode))

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

    @property
    def penalized(self) -> bool:
        """Whether some penalty is on (each row that is not costs the step nothing)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def reads_prompt(self) -> bool:
        """Whether the penalties read the prompt's tokens (repetition's seen tokens, TGI's frequency counts)."""
        return self.repetition_penalty != 1 or (self.frequency_of == "sequence" and self.frequency_penalty != 0)

    def stop_ids(self, eos_ids: frozenset[int]) -> frozenset[int]:
        """The tokens that end this request, given the model's EOS tokens."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else eos_ids)

    def check_model(self, vocab_size: int, eos_ids: frozenset[int]) -> None:
        """What can only be checked once the model is known: the token ids this names exist in its vocabulary, and
        allowed_token_ids leave a token to choose while min_tokens holds the stop tokens off."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]),
                          ("allowed_token_ids", self.allowed_token_ids or ()),
                          ("bad_words", [t for word in self.bad_words_ids or () for t in word])):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise SamplingError(f"{name}: token ids {bad[:5]} are outside the vocabulary 0-{vocab_size - 1}")
        stops = self.stop_ids(eos_ids)
        if self.min_tokens and self.allowed_token_ids is not None and set(self.allowed_token_ids) <= stops:
            raise SamplingError(f"allowed_token_ids holds only stop tokens, which min_tokens ({self.min_tokens}) "
                                "forbids until then: allow another token, or send min_tokens 0")


def _check_token(name: str, token: Any) -> None:
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise SamplingError(f"{name} takes token ids, integers >= 0 (below the vocabulary size), got {token!r}")
