"""One request's whole state, from submission to its end, in one object with one id (vLLM v1's `Request`).

The scheduler owns every `Request` (waiting, then running) and ends it through one function whatever the reason, so
"nothing left behind" is one check. What a step streams to a client (`Output`) and what a finished request returns
(`GenerationResult`) are plain data too. No torch here: the HTTP layer imports these types.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from server.policy.compiler import Schedule
from server.engine.sampling_params import SamplingParams
from server.engine.speculative import SpeculationStats

if TYPE_CHECKING:
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.grammar import Matcher
    from server.engine.probe import ProbeStats


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class Timings:
    """A request's times, as its client sees them (vLLM's definitions): a token's time is the wall time since the
    request's previous token reached the host, whatever the engine did meanwhile (another request's prefill, the
    host's work between steps), so decode_s runs from the first token to the last and TPOT is the mean inter-token
    latency."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # first token -> last token
    ttft_s: float = 0.0  # arrival -> first token
    per_token_s: list[float] = field(default_factory=list)  # inter-token latency of each token after the first
    decode_tokens: int = 0  # tokens timed in decode_s (len(per_token_s); a snapshot keeps only this count)
    last_at: float = 0.0  # time.perf_counter() when the latest token reached the host

    @property
    def tpot_s(self) -> float:
        return self.decode_s / self.decode_tokens if self.decode_tokens else 0.0

    @property
    def total_s(self) -> float:
        """Arrival -> the latest token."""
        return self.ttft_s + self.decode_s

    def first_token(self, now: float) -> None:
        self.last_at = now

    def add_token(self, now: float) -> None:
        """A decoded token reached the host at `now` (time.perf_counter())."""
        elapsed = now - self.last_at
        self.last_at = now
        self.decode_s += elapsed
        self.decode_tokens += 1
        self.per_token_s.append(elapsed)

    def snapshot(self) -> "Timings":
        """The figures so far, in an object the engine thread no longer writes to (streamed outputs carry one per
        step, so it copies no per-token list: O(1), not O(tokens))."""
        return Timings(self.queue_s, self.prefill_s, self.decode_s, self.ttft_s, [], self.decode_tokens)


@dataclass
class GenerationResult:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None
    prompt_logprobs: list[float | None] | None  # a scored prompt: logprob of each prompt token (None for the first)
    prompt_top_logprobs: list[dict[int, float] | None] | None
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    policy: str
    timings: Timings
    error: str | None = None  # what failed, for finish_reason "error"
    seed: int | None = None  # what a drawing request drew with, its own or the one chosen for it (None if greedy)
    prompt_ranks: list[int | None] | None = None  # a scored prompt: each token's rank among its position's (1: top)
    cached_tokens: int | None = None  # `Request.cached_tokens`
    speculated: SpeculationStats = field(default_factory=SpeculationStats)  # `Request.speculated`


@dataclass
class Output:
    """What one step produced for one request: new tokens and text; the final result once finished."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    text: str  # new text since the previous output
    finished: bool = False
    result: GenerationResult | None = None
    error: str | None = None
    error_code: str | None = None  # the request's own failure (`Request.error_code`): a 400, not a 500
    probe: ProbeStats | None = None
    embeddings: list[list[float]] | None = None  # an embedding request's answer: one vector per prompt
    timings: Timings | None = None  # the request's timings so far, on every output before the last


Sink = Callable[[Output], None]


@dataclass
class Request:
    """A request: what was asked (fields up to `embed`), then what has happened to it so far."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    schedule: Schedule
    arrival: float = field(default_factory=time.perf_counter)
    # observed in the metrics as a request of its own; a beam search's one-token steps are not (the search is, once)
    counted: bool = True
    priority: int = 0  # lower first, where the scheduler orders by priority (vLLM's)
    cache_salt: str | None = None  # its prompt shares cached KV only with requests of the same salt (vLLM's)
    probe_prompts: list[list[int]] | None = None  # a probe: one forward pass of these, statistics instead of tokens
    embed: bool = False  # with probe_prompts: their embeddings instead of statistics (POST /v1/embeddings)
    sink: Sink | None = None  # receives its `Output`s (the engine loop's requests)
    status: Status = Status.WAITING
    stop_ids: frozenset[int] = frozenset()
    generator: Any = None  # its torch.Generator, made when it starts running
    grammar: Matcher | None = None  # a structured output's matcher: where its tokens so far leave it in the grammar
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    prompt_ranks: list[int | None] | None = None
    # prompt tokens whose KV came from the prefix cache; None: never looked up (prefix caching off, not yet prefilled)
    cached_tokens: int | None = None
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None  # set where the error is the request's own (its parameters conflict): a 400
    timings: Timings = field(default_factory=Timings)
    scheduled: float | None = None  # when it entered the batch
    stop_from: int = 0  # stop strings match only text from here on (text after min_tokens)
    detokenizer: IncrementalDetokenizer | None = None  # made on the first token
    sent_tokens: int = 0  # tokens already streamed to the sink
    sent_text: int = 0  # characters of `text` already streamed
    speculated: SpeculationStats = field(default_factory=SpeculationStats)  # drafts verified, tokens kept

    @property
    def length(self) -> int:
        """Tokens in the cache after the next forward appends the last sampled token."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @cached_property
    def prefix_key(self) -> str:
        """What its prompt blocks are cached under: its schedule's key, and its salt's digest when it has one (a
        schedule key holds no '#'; the digest keeps a long salt out of every cache entry)."""
        if self.cache_salt is None:
            return self.schedule.key
        return f"{self.schedule.key}#{hashlib.blake2b(self.cache_salt.encode(), digest_size=16).hexdigest()}"

    def kv_length(self) -> int:
        """Tokens per slot its whole life may need: prompt + max_tokens, or every probe prompt (each in its own
        blocks: see `KVManager.reservation`). A request with max_tokens 0 never decodes: its prompt is all."""
        if self.probe_prompts is not None:
            return sum(len(p) for p in self.probe_prompts)
        return len(self.prompt_ids) + self.params.max_tokens

    def set_finished(self, reason: str, error: str | None = None, code: str | None = None) -> None:
        """Mark why it ended (the first reason wins); `code`: a failure that is the request's own. Only the end
        function (`Scheduler.finish`) and the step's update call this: a request is ended in one place."""
        assert reason in FINISH_REASONS, reason
        if self.finish_reason is None:
            self.finish_reason, self.error, self.error_code = reason, error, code

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            prompt_token_ids=self.prompt_ids,
            token_ids=self.output_ids,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs if self.params.logprobs else None,
            prompt_logprobs=self.prompt_logprobs,
            prompt_top_logprobs=self.prompt_top_logprobs,
            finish_reason=self.finish_reason or "abort",
            policy=self.schedule.policy,
            timings=self.timings,
            error=self.error,
            seed=self.seed,
            prompt_ranks=self.prompt_ranks,
            cached_tokens=self.cached_tokens,
            speculated=self.speculated,
        )

    @property
    def seed(self) -> int | None:
        """The seed this request draws with (resending it with this seed draws the same tokens); None if greedy."""
        if self.params.greedy:
            return None
        if self.params.seed is not None or self.generator is None:
            return self.params.seed
        return int(self.generator.initial_seed())
