"""Generation: sequences, a batch decoded together under one schedule, and the offline `Engine.generate`.

The ladder is `Batch.add` (prefill, first token) -> `Batch.step` (one token for every row) -> `Batch.filter`
(finished sequences leave, rows stay dense). The server's engine loop drives the same three calls.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from server.executor import Executor
from server.model import GroupMode, Transformer, default_dtype
from server.policy import Policy, as_policy
from server.sampling import SamplingParams, make_generator, sample
from server.compiler import Schedule, compile_schedule

_ids = itertools.count()


@dataclass
class Timings:
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0  # arrival -> first token
    per_token_s: list[float] = field(default_factory=list)  # decode step time of each token after the first

    @property
    def tpot_s(self) -> float:
        return sum(self.per_token_s) / len(self.per_token_s) if self.per_token_s else 0.0

    @property
    def total_s(self) -> float:
        return self.queue_s + self.prefill_s + self.decode_s


@dataclass
class GenerationResult:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None
    prompt_logprobs: list[float | None] | None  # with echo: logprob of each prompt token (None for the first)
    prompt_top_logprobs: list[dict[int, float] | None] | None
    finish_reason: str  # "stop" | "length" | "abort"
    policy: str
    timings: Timings


@dataclass
class Sequence:
    """One request's state while it is decoded."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    arrival: float = field(default_factory=time.perf_counter)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    text: str = ""
    finish_reason: str | None = None
    timings: Timings = field(default_factory=Timings)
    scheduled: float | None = None  # when it entered a batch
    stop_from: int = 0  # stop strings match only text from here on (text after min_tokens)

    @property
    def length(self) -> int:
        """Tokens in the cache after the next forward appends the last sampled token."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def abort(self) -> None:
        if not self.finished:
            self.finish_reason = "abort"

    def result(self, policy: str) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            prompt_token_ids=self.prompt_ids,
            token_ids=self.output_ids,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs if self.params.logprobs else None,
            prompt_logprobs=self.prompt_logprobs,
            prompt_top_logprobs=self.prompt_top_logprobs,
            finish_reason=self.finish_reason or "abort",
            policy=policy,
            timings=self.timings,
        )


class Batch:
    """Sequences decoded together under one schedule. Row b of the executor's cache belongs to sequences[b]."""

    def __init__(
        self, model: Transformer, schedule: Schedule, tokenizer: Any, *, max_batch: int, max_len: int,
        group_mode: GroupMode = "batched", initial_batch: int | None = None, initial_len: int | None = None,
    ) -> None:
        self.model, self.schedule, self.tokenizer = model, schedule, tokenizer
        self.executor = Executor(model, schedule, max_batch=max_batch, max_len=max_len, group_mode=group_mode,
                                 initial_batch=initial_batch, initial_len=initial_len)
        self.sequences: list[Sequence] = []

    @property
    def free_rows(self) -> int:
        return self.executor.max_batch - len(self.sequences)

    def add(self, new: list[Sequence]) -> None:
        """Prefill `new` (right-padded together) into the next free rows and choose each one's first token."""
        if not new:
            return
        assert len(new) <= self.free_rows
        need = max(len(s.prompt_ids) + s.params.max_tokens for s in new)
        self.executor.reserve(rows=len(self.sequences) + len(new), length=min(need, self.executor.max_len))
        t0 = time.perf_counter()
        first = len(self.sequences)
        width = max(len(s.prompt_ids) for s in new)
        tokens = torch.zeros(len(new), width, dtype=torch.long)
        for b, s in enumerate(new):
            tokens[b, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
            s.scheduled = t0
        tokens = tokens.to(self.model.device)
        last = torch.tensor([len(s.prompt_ids) - 1 for s in new], device=self.model.device)
        echo = any(s.params.echo for s in new)
        logits = self.executor.forward(
            tokens, rows=slice(first, first + len(new)), start=[0] * len(new), logits_at=None if echo else last
        )
        if echo:
            for b, s in enumerate(new):
                if s.params.echo:
                    _score_prompt(s, logits[b, : len(s.prompt_ids)])
            logits = logits[torch.arange(len(new), device=logits.device), last]
        self.sequences.extend(new)
        self._append(new, logits, t0, prefill=True)

    def step(self) -> None:
        """Decode one token for every unfinished row (finished rows ride along until `filter`)."""
        if not any(not s.finished for s in self.sequences):
            return
        t0 = time.perf_counter()
        last = [s.output_ids[-1] if s.output_ids else s.prompt_ids[-1] for s in self.sequences]
        tokens = torch.tensor(last, device=self.model.device)[:, None]
        start = [s.length - 1 for s in self.sequences]
        logits = self.executor.forward(
            tokens, rows=slice(0, len(self.sequences)), start=start,
            logits_at=torch.zeros(len(last), dtype=torch.long, device=self.model.device),
        )
        self._append(self.sequences, logits, t0, prefill=False)

    def filter(self) -> list[Sequence]:
        """Remove finished sequences, moving the last rows into the freed ones; returns the removed."""
        done = []
        b = 0
        while b < len(self.sequences):
            if self.sequences[b].finished:
                done.append(self.sequences[b])
                last = len(self.sequences) - 1
                self.executor.move_row(last, b)
                self.sequences[b] = self.sequences[last]
                self.sequences.pop()
            else:
                b += 1
        return done

    def _append(self, seqs: list[Sequence], logits: Tensor, t0: float, *, prefill: bool) -> None:
        active = [b for b, s in enumerate(seqs) if not s.finished and s.params.max_tokens > 0]
        for s in seqs:
            if prefill and s.params.max_tokens == 0:
                s.finish_reason = "length"
        if active:
            rows = logits[active]
            logprobs = torch.log_softmax(rows, dim=-1)
            next_tokens = sample(rows, [seqs[b].params for b in active], [seqs[b].generator for b in active])
            chosen = logprobs.gather(-1, next_tokens[:, None])[:, 0].tolist()
            top_n = max(seqs[b].params.logprobs for b in active)
            top = torch.topk(logprobs, top_n) if top_n else None
            next_list = next_tokens.tolist()
        now = time.perf_counter()
        elapsed = now - t0
        for s in seqs:
            if prefill:
                s.timings.queue_s = (s.scheduled or t0) - s.arrival
                s.timings.prefill_s = elapsed
                s.timings.ttft_s = now - s.arrival
        for i, b in enumerate(active):
            s = seqs[b]
            if not prefill:
                s.timings.decode_s += elapsed
                s.timings.per_token_s.append(elapsed)
            token = next_list[i]
            s.output_ids.append(token)
            s.logprobs.append(chosen[i])
            if s.params.logprobs and top is not None:
                n = s.params.logprobs
                s.top_logprobs.append(dict(zip(top.indices[i, :n].tolist(), top.values[i, :n].tolist())))
            self._check_stop(s, token)

    def _check_stop(self, s: Sequence, token: int) -> None:
        n = len(s.output_ids)
        eos = token in s.stop_ids and n > s.params.min_tokens
        previous = len(s.text)
        s.text = self.tokenizer.decode(s.output_ids, skip_special_tokens=True)
        if n == s.params.min_tokens:
            s.stop_from = len(s.text)
        if eos:
            s.finish_reason = "stop"
            return
        if s.params.stop and n > s.params.min_tokens:
            longest = max(len(stop) for stop in s.params.stop)
            start = max(s.stop_from, previous - longest + 1)  # a new match ends in the new text
            hits = [i for i in (s.text.find(stop, start) for stop in s.params.stop) if i >= 0]
            if hits:
                s.text = s.text[: min(hits)]
                s.finish_reason = "stop"
                return
        if n >= s.params.max_tokens or s.length >= self.executor.max_len:
            s.finish_reason = "length"


def _score_prompt(s: Sequence, logits: Tensor) -> None:
    """logits [T, V] over the prompt -> logprob of each prompt token given its prefix (None for the first)."""
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    ids = torch.tensor(s.prompt_ids[1:], device=logits.device)
    scores = logprobs.gather(-1, ids[:, None])[:, 0].tolist() if len(ids) else []
    s.prompt_logprobs = [None, *scores]
    n = s.params.logprobs
    if n:
        top = torch.topk(logprobs, n)
        s.prompt_top_logprobs = [None] + [
            dict(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)
        ]


class Engine:
    """A loaded frozen model with its tokenizer: compiles policies and generates under any of them."""

    def __init__(
        self, hf_model: Any, tokenizer: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        group_mode: GroupMode = "batched", name: str = "model",
    ) -> None:
        device = torch.device(device)
        self.name = name
        self.model = Transformer(hf_model, dtype=dtype or default_dtype(device), device=device)
        self.tokenizer = tokenizer
        self.group_mode: GroupMode = group_mode
        self.config = hf_model.config
        self.eos_ids = _eos_ids(hf_model, tokenizer)

    @property
    def num_layers(self) -> int:
        return self.model.args.n_layers

    @property
    def max_model_len(self) -> int:
        return self.model.args.max_position

    def compile(self, policy: Policy | str | dict | None) -> Schedule:
        return compile_schedule(as_policy(policy), self.num_layers)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=False)) or [self._fallback_bos()]
        return list(prompt)

    def new_sequence(self, prompt: str | list[int], params: SamplingParams, *, arrival: float | None = None) -> Sequence:
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        seq = Sequence(
            prompt_ids=self.encode(prompt), params=params, generator=make_generator(params.seed, self.model.device),
            stop_ids=stop,
        )
        if arrival is not None:
            seq.arrival = arrival
        return seq

    def new_batch(
        self, schedule: Schedule, *, max_batch: int, max_len: int, initial_batch: int | None = None,
        initial_len: int | None = None,
    ) -> Batch:
        return Batch(self.model, schedule, self.tokenizer, max_batch=max_batch, max_len=max_len,
                     group_mode=self.group_mode, initial_batch=initial_batch, initial_len=initial_len)

    def generate(
        self, prompts: list[str | list[int]] | str, *, policy: Policy | str | dict | None = None,
        params: SamplingParams | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt under one policy, all decoded together in one batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params or SamplingParams()
        schedule = self.compile(policy)
        seqs = [self.new_sequence(p, params) for p in prompts]
        max_len = max(len(s.prompt_ids) for s in seqs) + max(params.max_tokens, 1)
        batch = self.new_batch(schedule, max_batch=len(seqs), max_len=max_len)
        batch.add(seqs)
        batch.filter()
        while batch.sequences:
            batch.step()
            batch.filter()
        return [s.result(schedule.policy) for s in seqs]

    def _fallback_bos(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else 0


def _eos_ids(hf_model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(hf_model.generation_config, "eos_token_id", None), hf_model.config.eos_token_id,
                   getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(source)
    return frozenset(ids)
