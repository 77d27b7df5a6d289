"""Generation: sequences, one batch of sequences under any mix of schedules, and the offline `Engine.generate`.

The ladder is `Batch.add` (prefill, first token) -> `Batch.step` (one token for every row, whatever its schedule)
-> `Batch.filter` (finished sequences leave and free their KV blocks). The server's engine loop drives the same calls.
A row whose sampling or stop check fails ends alone with `finish_reason="error"`; its neighbours go on.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from server.compiler import Schedule, compile_schedule
from server.detokenizer import IncrementalDetokenizer
from server.executor import Executor, Row
from server.model import GroupMode, Transformer, default_dtype
from server.policy import Policy, as_policy
from server.probe import ProbeStats
from server.probe import reduce as reduce_probe
from server.sampling import SamplingParams, make_generator, sample_isolated

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
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    policy: str
    timings: Timings
    error: str | None = None  # what failed, for finish_reason "error"


@dataclass
class Sequence:
    """One request's state while it is decoded."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    schedule: Schedule
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
    error: str | None = None
    detokenizer: IncrementalDetokenizer | None = None  # made on the first token, by the batch that owns the tokenizer

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

    def fail(self, message: str) -> None:
        if not self.finished:
            self.finish_reason, self.error = "error", message

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
        )


@dataclass(frozen=True)
class Reused:
    """What a prompt took from the prefix cache: its KV up to `start` (computing resumes there) and, for an echo
    request, the prompt logprobs and top alternatives of tokens 0 .. start (the first is None)."""

    start: int
    logprobs: list[float | None] | None = None
    tops: list[dict[int, float] | None] | None = None


class Batch:
    """The running sequences, each under its own schedule, decoded together. The executor owns their KV cache."""

    def __init__(self, model: Transformer, tokenizer: Any, *, max_len: int, num_blocks: int, block_size: int = 16,
                 group_mode: GroupMode = "batched", prefix_caching: bool = False) -> None:
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
        self.prefix_caching = prefix_caching
        self.reused_tokens = 0  # prompt tokens whose KV came from the prefix cache (not recomputed)
        self.executor = Executor(model, num_blocks=num_blocks, block_size=block_size, max_len=max_len,
                                 group_mode=group_mode)
        self.sequences: list[Sequence] = []

    def add(self, new: list[Sequence]) -> None:
        """Prefill `new` (right-padded together, their own forward call) and choose each one's first token.
        With prefix reuse, a prompt whose start is cached under its schedule computes from where the cache ends
        (`_reuse`); new sequences that share a first block with an earlier one in this call wait for it (a second,
        cheaper call)."""
        if not new:
            return
        t0 = time.perf_counter()
        for s in new:
            s.scheduled = t0
        waves: list[list[Sequence]] = [new]
        if self.prefix_caching:
            firsts: set[tuple[str, tuple[int, ...]]] = set()
            waves = [[], []]
            for s in new:
                first = (s.schedule.key, tuple(s.prompt_ids[: self.executor.cache.block_size]))
                shares = len(s.prompt_ids) > self.executor.cache.block_size and first in firsts
                waves[1 if shares else 0].append(s)
                firsts.add(first)
        for wave in waves:
            if wave:
                self._prefill(wave, t0)

    def _prefill(self, new: list[Sequence], t0: float) -> None:
        reused = [self._reuse(s) for s in new]
        starts = [r.start for r in reused]
        self.reused_tokens += sum(starts)
        width = max(len(s.prompt_ids) - p for s, p in zip(new, starts))
        tokens = torch.zeros(len(new), width, dtype=torch.long)
        for b, (s, p) in enumerate(zip(new, starts)):
            tokens[b, : len(s.prompt_ids) - p] = torch.tensor(s.prompt_ids[p:])
        tokens = tokens.to(self.model.device)
        last = torch.tensor([len(s.prompt_ids) - p - 1 for s, p in zip(new, starts)], device=self.model.device)
        echo = any(s.params.echo for s in new)
        rows = [Row(s.id, s.schedule, p, len(s.prompt_ids) - p) for s, p in zip(new, starts)]
        logits = self.executor.forward(tokens, rows, logits_at=None if echo else last)
        if echo:
            for b, (s, p, r) in enumerate(zip(new, starts, reused)):
                if s.params.echo:
                    _score_prompt(s, logits[b, : len(s.prompt_ids) - p], r)
            logits = logits[torch.arange(len(new), device=logits.device), last]
        if self.prefix_caching:
            for s, p in zip(new, starts):
                self._register(s, p)
        self.sequences.extend(new)
        self._append(new, logits, t0, prefill=True)

    def _reuse(self, s: Sequence) -> Reused:
        """Take what the prefix cache holds of `s`'s prompt: the cached full blocks it starts with (adopted), then a
        copy of the registered block that agrees longest with its next tokens. A prompt keeps at least its last
        token to compute. An echo request reuses only tokens whose prompt logprobs (with at least as many
        alternatives as it asks for) are cached, up to and including the first token it computes from."""
        if not self.prefix_caching:
            return Reused(0)
        cache, size, ids = self.executor.cache, self.executor.cache.block_size, s.prompt_ids
        key, n = s.schedule.key, s.params.logprobs if s.params.echo else None
        entries = cache.lookup(key, ids, (len(ids) - 1) // size)
        if n is not None:
            entries = list(itertools.takewhile(lambda e: e.scores is not None and e.scores[0] >= n, entries))
        j = len(entries)
        partial = cache.lookup_partial(key, entries[-1].chain if entries else 0, ids[j * size : (j + 1) * size])
        # tokens of the partial block to take: echo needs the logprob of the token it starts at, which the cache
        # holds only where that token agrees too
        take = 0
        if partial is not None and (n is None or (partial[0].scores is not None and partial[0].scores[0] >= n)):
            take = min(partial[1] - (n is not None), len(ids) - 1 - j * size)
        start = 0
        if take >= 1:
            cache.adopt(s.id, s.schedule.slots, entries)
            if cache.copy(s.id, s.schedule.slots, partial[0]):
                start = j * size + take
            else:  # the pool is too tight to copy: reuse whole blocks only
                cache.free(s.id)
                take = 0
        boundary = None
        if not take:
            while n is not None and entries:  # the first token after the blocks: its logprob is cached with them
                boundary = entries[-1].next.get(ids[len(entries) * size])
                if boundary is not None and boundary[0] >= n:
                    break
                entries, boundary = entries[:-1], None
            cache.adopt(s.id, s.schedule.slots, entries)
            start = len(entries) * size
        if n is None:
            return Reused(start)
        logprobs, tops = [], []
        for e in entries:  # payloads: (alternatives kept, logprobs, top dicts)
            logprobs += e.scores[1]
            tops += e.scores[2]
        if take:  # tokens j*size .. start, all agreeing with the copied block's
            logprobs += partial[0].scores[1][: take + 1]
            tops += partial[0].scores[2][: take + 1]
        elif entries:
            logprobs.append(boundary[1])
            tops.append(boundary[2])
        else:
            logprobs.append(None)
            tops.append(None)
        return Reused(start, logprobs, [None if t is None else dict(list(t.items())[:n]) for t in tops])

    def _register(self, s: Sequence, start: int) -> None:
        """Make `s`'s prompt blocks findable (the last one even if partly filled), with their prompt logprobs when
        it has them."""
        cache, size = self.executor.cache, self.executor.cache.block_size
        L = len(s.prompt_ids)
        entries = cache.register(s.id, s.schedule.key, s.schedule.slots, s.prompt_ids, start // size, -(-L // size))
        if not s.params.echo or s.prompt_logprobs is None:
            return
        n = s.params.logprobs
        tops = s.prompt_top_logprobs or [None] * L
        for j, e in enumerate(entries):
            if e.scores is None or e.scores[0] < n:
                part = slice(j * size, (j + 1) * size)
                e.scores = (n, s.prompt_logprobs[part], tops[part])
            after = (j + 1) * size
            known = e.next.get(s.prompt_ids[after]) if after < L else None
            if after < L and (known is None or known[0] < n):
                e.next[s.prompt_ids[after]] = (n, s.prompt_logprobs[after], tops[after])

    def step(self) -> None:
        """Decode one token for every unfinished row (finished rows leave at `filter`)."""
        live = [s for s in self.sequences if not s.finished]
        if not live:
            return
        t0 = time.perf_counter()
        tokens = torch.tensor([s.output_ids[-1] for s in live], device=self.model.device)[:, None]
        rows = [Row(s.id, s.schedule, s.length - 1, 1) for s in live]
        logits = self.executor.forward(tokens, rows, logits_at=torch.zeros(len(live), dtype=torch.long,
                                                                         device=self.model.device))
        self._append(live, logits, t0, prefill=False)

    def filter(self) -> list[Sequence]:
        """Remove finished sequences and free their KV blocks; returns the removed."""
        done = [s for s in self.sequences if s.finished]
        if done:
            self.sequences = [s for s in self.sequences if not s.finished]
            for s in done:
                self.executor.release(s.id)
        return done

    def probe(self, prompts: list[list[int]], schedule: Schedule) -> ProbeStats:
        """One forward pass of `prompts` under `schedule`, no sampling; returns the layer statistics of
        `server.probe` (reduced here, on the thread that owns the tensors). Their KV blocks are freed at once."""
        ids = [next(_ids) for _ in prompts]
        lengths = [len(p) for p in prompts]
        tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.tensor(p)
        states: list[Tensor] = [tokens] * (len(schedule.steps) + 1)

        def capture(step: int, rows: Tensor, h: Tensor) -> None:
            states[step] = h  # already a copy (gathered by row)

        try:
            self.executor.forward(tokens.to(self.model.device), [Row(q, schedule, 0, n) for q, n in zip(ids, lengths)],
                                  logits_at=torch.tensor(lengths, device=self.model.device) - 1, capture=capture)
        finally:
            for q in ids:
                self.executor.release(q)
        return reduce_probe(schedule, states, lengths)

    def kv_usage(self) -> float:
        """Share of the KV pool's blocks in use."""
        cache = self.executor.cache
        return cache.used_blocks / cache.num_blocks

    def _append(self, seqs: list[Sequence], logits: Tensor, t0: float, *, prefill: bool) -> None:
        for s in seqs:
            if prefill and s.params.max_tokens == 0:
                s.finish_reason = "length"
        active = [b for b, s in enumerate(seqs) if not s.finished]
        if active:
            rows = logits[active]
            logprobs = torch.log_softmax(rows, dim=-1)
            next_list, failed = _sample_rows(rows, [seqs[b] for b in active])
            chosen = logprobs.gather(-1, torch.tensor(next_list, device=rows.device)[:, None])[:, 0].tolist()
            top_n = max(seqs[b].params.logprobs for b in active)
            top = torch.topk(logprobs, top_n) if top_n else None
        now = time.perf_counter()
        elapsed = now - t0
        for s in seqs:
            if prefill:
                s.timings.queue_s = (s.scheduled or t0) - s.arrival
                s.timings.prefill_s = elapsed
                s.timings.ttft_s = now - s.arrival
        for i, b in enumerate(active):
            s = seqs[b]
            if i in failed:
                s.fail(failed[i])
                continue
            try:
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
            except Exception as e:  # this row alone fails
                s.fail(f"{type(e).__name__}: {e}")

    def _check_stop(self, s: Sequence, token: int) -> None:
        n = len(s.output_ids)
        eos = token in s.stop_ids and n > s.params.min_tokens
        previous = len(s.text)
        if s.detokenizer is None:
            s.detokenizer = IncrementalDetokenizer(self.tokenizer)
        s.text += s.detokenizer.add(token)  # O(1) per token: only the new tail is decoded
        if n == s.params.min_tokens:
            s.stop_from = len(s.text)
        if eos:
            s.finish_reason = "stop"
            s.text += s.detokenizer.flush()
            return
        if s.params.stop and n > s.params.min_tokens:
            longest = max(len(stop) for stop in s.params.stop)
            start = max(s.stop_from, previous - longest + 1)  # a new match ends in the new text
            hits = [i for i in (s.text.find(stop, start) for stop in s.params.stop) if i >= 0]
            if hits:
                s.text = s.text[: min(hits)]
                s.finish_reason = "stop"
                return
        if n >= s.params.max_tokens or s.length >= self.max_len:
            s.finish_reason = "length"
            s.text += s.detokenizer.flush()


def _sample_rows(logits: Tensor, seqs: list[Sequence]) -> tuple[list[int], dict[int, str]]:
    """Next token per row, each with its own parameters and generator; a row whose sampling fails is reported in the
    second value (row -> message) and does not affect the others."""
    tokens, errors = sample_isolated(logits, [s.params for s in seqs], [s.generator for s in seqs])
    return tokens.tolist(), {b: f"sampling failed: {type(e).__name__}: {e}" for b, e in errors.items()}


def _score_prompt(s: Sequence, logits: Tensor, reused: Reused) -> None:
    """logits [T', V] over the prompt from position p = reused.start on -> logprob of each prompt token given its
    prefix (None for the first). Tokens up to p come from the cache (`reused`)."""
    n = s.params.logprobs
    values: list[float | None] = list(reused.logprobs) if reused.logprobs else [None]
    tops: list[dict[int, float] | None] = list(reused.tops) if reused.tops else [None]
    p = len(values) - 1
    assert p == reused.start
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    ids = torch.tensor(s.prompt_ids[p + 1 :], device=logits.device)
    values += logprobs.gather(-1, ids[:, None])[:, 0].tolist() if len(ids) else []
    s.prompt_logprobs = values
    if n:
        top = torch.topk(logprobs, n)
        tops += [dict(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]
        s.prompt_top_logprobs = tops


class Engine:
    """A loaded frozen model with its tokenizer: compiles policies and generates under any mix of them."""

    def __init__(
        self, model: Transformer, tokenizer: Any, *, eos_ids: frozenset[int] = frozenset(), config: Any = None,
        group_mode: GroupMode = "batched", name: str = "model", block_size: int = 16,
    ) -> None:
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, config, name
        self.eos_ids, self.group_mode, self.block_size = eos_ids, group_mode, block_size

    @classmethod
    def from_hf(
        cls, hf_model: Any, tokenizer: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Engine:
        """From an in-memory transformers model (tests, parity checks): its weights are copied into our stacks."""
        model = Transformer.from_hf(hf_model, dtype=dtype or default_dtype(device), device=device)
        return cls(model, tokenizer, eos_ids=_eos_ids(hf_model, tokenizer), config=hf_model.config, **kwargs)

    @classmethod
    def from_loaded(cls, loaded: Any, **kwargs: Any) -> Engine:
        """From `server.loader.load_model`'s result (weights already on their device, in their dtype)."""
        from server.model import ModelArgs

        w = loaded.weights
        model = Transformer(ModelArgs.from_hf_config(loaded.config), w, dtype=w.embed.dtype, device=w.embed.device)
        return cls(model, loaded.tokenizer, eos_ids=loaded.eos_token_ids, config=loaded.config,
                   name=kwargs.pop("name", loaded.name), **kwargs)

    @property
    def num_layers(self) -> int:
        return self.model.args.n_layers

    @property
    def max_model_len(self) -> int:
        return self.model.args.max_position

    def compile(self, policy: Policy | str | dict | None) -> Schedule:
        return compile_schedule(as_policy(policy), self.num_layers)

    def encode(self, prompt: str | list[int], *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt: text gets the special tokens its tokenizer adds by default (Gemma's <bos>; none for
        SmolLM2), as vLLM's completions do; a rendered chat template already holds them (add_special_tokens=False).
        Token ids pass through as they are."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            return list(ids) or [self._fallback_bos()]
        return list(prompt)

    def kv_bytes_per_slot_token(self) -> int:
        a = self.model.args
        return 2 * a.n_kv_heads * a.head_dim * torch.empty((), dtype=self.model.dtype).element_size()

    def new_sequence(self, prompt: str | list[int], params: SamplingParams, schedule: Schedule, *,
                     arrival: float | None = None) -> Sequence:
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        seq = Sequence(
            prompt_ids=self.encode(prompt), params=params, generator=make_generator(params.seed, self.model.device),
            stop_ids=stop, schedule=schedule,
        )
        if arrival is not None:
            seq.arrival = arrival
        return seq

    def new_batch(self, *, max_len: int, num_blocks: int, block_size: int | None = None,
                  prefix_caching: bool = False) -> Batch:
        return Batch(self.model, self.tokenizer, max_len=max_len, num_blocks=num_blocks,
                     block_size=block_size or self.block_size, group_mode=self.group_mode,
                     prefix_caching=prefix_caching)

    def generate(
        self, prompts: list[str | list[int]] | str, *,
        policy: Policy | str | dict | None | list[Policy | str | dict | None] = None,
        params: SamplingParams | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt, all decoded together in one batch. `policy` is one policy for all prompts or
        a list with one per prompt (any mix)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params or SamplingParams()
        policies = policy if isinstance(policy, list) else [policy] * len(prompts)
        assert len(policies) == len(prompts), "one policy per prompt"
        seqs = [self.new_sequence(p, params, self.compile(pol)) for p, pol in zip(prompts, policies)]
        max_len = max(len(s.prompt_ids) for s in seqs) + max(params.max_tokens, 1)
        blocks = sum(-(-max_len // self.block_size) * s.schedule.num_slots for s in seqs)
        batch = self.new_batch(max_len=max_len, num_blocks=blocks + 1)
        batch.add(seqs)
        batch.filter()
        while batch.sequences:
            batch.step()
            batch.filter()
        return [s.result() for s in seqs]

    def probe(self, prompts: list[str | list[int]], *, policy: Policy | str | dict | None = None) -> ProbeStats:
        """Layer statistics of one forward pass of `prompts` under `policy` (see `server.probe`)."""
        schedule = self.compile(policy)
        ids = [self.encode(p) for p in prompts]
        blocks = sum(-(-len(p) // self.block_size) for p in ids) * schedule.num_slots
        batch = self.new_batch(max_len=max(len(p) for p in ids), num_blocks=blocks + 1)
        return batch.probe(ids, schedule)

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
