"""Generation: one batch of requests under any mix of schedules, stepped as schedule -> execute -> update, and the
offline `Engine.generate`.

A step is data between three calls: `Batch.decode_input` / `prefill_input` say what runs (`StepInput`: rows, new
tokens, sampling parameters as tensors); `Batch.launch` queues the tensor work (the forward and batched sampling) and
starts its results' one copy to the host (`Launched`; `execute` waits for it: a `ModelOutput`); `Batch.update`
appends tokens, checks stops and detokenizes. `Batch.add` (prefill, first token) -> `Batch.decode` (one token for
every row) -> `Batch.filter` (finished requests leave and free their KV blocks) drive them; the server's engine loop
drives the same calls. A row whose sampling or stop check fails ends alone with `finish_reason="error"`; its
neighbours go on.

Overlapped decoding (on by default on CUDA): `decode` queues step N before it reads step N-1's results, so the
device runs N while the host turns N-1 into tokens, stops and text, as SGLang's overlap scheduler and vLLM's async
scheduling do. Step N's input tokens are step N-1's sampled tokens, still on the device. A row that step N-1 ends by
its length is known on the host and left out of N; a row that N-1 ends otherwise (a stop token or string, an
error) decodes one token too many in N, which is dropped: the same tokens as decoding step by step. Prefills
overlap the same way: `add` queues a prefill without reading it, the next `decode` queues its rows' first decode
step on the first tokens still on the device and only then reads the prefill, so the device never waits for the
host between a prefill and the step after it. An echo prefill (prompt scoring) is read at once. A step with a
structured row (a grammar constrains its output) does not overlap: that row's mask of allowed tokens needs its
latest token accepted by its matcher, on the host, so `decode` reads what is in flight before it queues the step.

Speculative decoding (`server.engine.speculative`): with a `Speculation`, `decode` reads what is in flight, asks
the proposer for each row's drafts, and where any row has some runs one verifying forward over every row instead of
the decode step (`_verify`): a row computes its last token and its drafts, its sampler chooses at each position, and
it keeps one to k + 1 tokens, the ones decoding one at a time would have chosen (up to rounding: see
`server.engine.speculative`). A step where a row may draft does not overlap.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from server.policy.compiler import Schedule, compile_schedule
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.executor import AttentionMode, Executor, Row, resolve_attention
from server.engine.grammar import Grammars, bitmask
from server.engine.kv_manager import KVManager, Reused
from server.model.model import GroupMode, Transformer, default_dtype
from server.policy.policy import Policy, as_policy
from server.engine.probe import ProbeStats
from server.engine.probe import Reducer as ProbeReducer
from server.engine.probe import chunks as probe_chunks
from server.engine.request import GenerationResult, Request, Timings
from server.engine.sampling import (PromptCache, SamplingBatch, SamplingParams, alternatives, make_generator,
                                    rewind, sample_batch)
from server.engine.served import encode, encode_word
from server.engine.speculative import Speculation, accepted, propose_ngram, room, runs_within
from server.engine.transfer import to_device

NO_TOKEN_ALLOWED = "no_token_allowed"  # a row's own masks left it nothing to choose (`_why_failed`)

__all__ = ["Batch", "Engine", "GenerationResult", "Launched", "ModelOutput", "Request", "StepInput", "Timings"]

_ids = itertools.count()
# Prompt scoring (echo) reads every prompt position's logits: it computes them from the final hidden states, as many
# positions at a time as keep their float32 logits within this (341 at SmolLM2's vocabulary, 64 at Gemma 3's). All
# at once, one 2,000-token echo prompt added ~900 MB of peak memory on SmolLM2 (`benchmarks/bench_prefill_memory.py`).
SCORE_LOGITS_BYTES = 64 * 2**20
# A verifying step computes the logits of every row's last token and drafts at once, and samples from them: its
# drafts are capped so that those float32 logits stay within this (341 positions at SmolLM2's vocabulary, 64 at
# Gemma 3's: 16 rows may then verify 3 drafts each there). A decode step computes one position per row.
VERIFY_LOGITS_BYTES = 64 * 2**20
# Chunked prefill's default budget, prompt tokens per step: on the CPU a 512-token piece of SmolLM2 takes ~2.5 s
# (a whole 2,000-token prompt stalled every running stream for ~9.5 s); on CUDA prefill is cheap, and pieces cost
# launches, so only prompts past 8,192 tokens are cut (vLLM's and SGLang's order of magnitude there).
PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}


def prefill_budget(setting: int | None, device: torch.device) -> int | None:
    """The chunked-prefill budget a server runs with: `setting` (0: off, whole prompts), or the device's default."""
    if setting is None:
        return PREFILL_TOKENS.get(device.type, PREFILL_TOKENS["cuda"])
    return setting or None


@dataclass(frozen=True)
class StepInput:
    """What one forward runs: a row per request, its new tokens (right-padded), where its logits are read, and its
    sampling parameters. Every shape is fixed here, on the host, so `execute` needs no host sync."""

    requests: tuple[Request, ...]
    rows: tuple[Row, ...]
    tokens: Tensor  # [B, T] on the device
    logits_at: Tensor  # [B] index in T of the logits each row samples from
    sampling: SamplingBatch
    echo: bool = False  # keep every position's logits (prompt scoring)


@dataclass
class ModelOutput:
    """What `execute` returns, on the host (one copy per step): per row its token, its logprob, its top alternatives,
    and whether it failed (row -> message)."""

    token_ids: list[int]
    logprobs: list[float]  # empty when no row asked for logprobs
    top: list[dict[int, float]]  # the num_top most likely tokens -> logprob (empty when none asked)
    errors: dict[int, str]
    hidden: Tensor | None = None  # [B, T, d] final hidden states of echo prefills (their prompt logits come from it)
    stuck: frozenset[int] = frozenset()  # failed rows whose every token was -inf or NaN (no token to choose)


@dataclass
class Launched:
    """A step whose tensor work is queued on the device: its sampled tokens stay there (the next step's input for the
    rows that go on) while its results travel to the host. `result()` waits for them; on the CPU the work is done by
    the time this exists."""

    inp: StepInput
    tokens: Tensor  # [B] each row's sampled token, on the device
    fetch: Callable[[], ModelOutput] = field(repr=False)
    hidden: Tensor | None = None  # [B, T, d] final hidden states of echo prefills

    def result(self) -> ModelOutput:
        out = self.fetch()
        out.hidden = self.hidden
        return out


@dataclass(eq=False)
class Piecewise:
    """A prompt computed a piece per `add` (chunked prefill): its KV holds its prompt up to `at`."""

    request: Request
    began: float  # when its prefill began (its prefill time runs from there)
    # what the prefix cache gave it, looked up when it is first computed (not while it waits: an older prompt it
    # shares blocks with may register them meanwhile); its blocks are registered from reused.start
    reused: Reused | None = None
    at: int = 0


class Batch:
    """The running requests, each under its own schedule, decoded together. The executor owns the KV pool; the KV
    manager decides what it holds."""

    def __init__(self, model: Transformer, tokenizer: Any, *, max_len: int, num_blocks: int, block_size: int = 16,
                 group_mode: GroupMode = "batched", prefix_caching: bool = False,
                 prefix_blocks: int | None = None, attention: AttentionMode = "auto",
                 graphs: bool | None = None, fuse: bool = False, overlap: bool | None = None,
                 prefill_tokens: int | None = None, speculation: Speculation | None = None) -> None:
        """overlap: `decode` queues each step before it reads the previous one's results (see the module's
        docstring); None turns it on where the device runs asynchronously (CUDA). On the CPU it runs the same
        way, and gains nothing: there the tensor work is done before `launch` returns. prefill_tokens: prompt tokens
        one `add` computes at most (chunked prefill, see `add`); None: whole prompts. speculation: how rows draft
        tokens that a step verifies (`server.engine.speculative`; a step with drafts does not overlap)."""
        assert prefill_tokens is None or prefill_tokens >= 1, prefill_tokens
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
        self.executor = Executor(model, num_blocks=num_blocks, block_size=block_size, max_len=max_len,
                                 group_mode=group_mode, attention=attention, graphs=graphs, fuse=fuse)
        self.kv = KVManager(num_blocks=num_blocks - 1, block_size=block_size, cache=self.executor.cache,
                            prefix_caching=prefix_caching, prefix_blocks=prefix_blocks)
        self.sequences: list[Request] = []
        self.overlap = model.device.type == "cuda" if overlap is None else overlap
        self._in_flight: Launched | None = None  # the decode step queued and not yet read (overlap only)
        self._prefills: list[tuple[Launched, float]] = []  # prefills queued and not yet read, with when `add` began
        self.prefill_tokens = prefill_tokens
        self.pieces: list[Piecewise] = []  # prompts being prefilled a piece per `add`, oldest first
        self.prompts = PromptCache(model.device)  # the penalties' prompts on the device, of requests in the batch
        self.speculation = speculation
        self._draft_schedule = (None if speculation is None or speculation.draft is None
                                else compile_schedule(speculation.draft, model.args.n_layers))
        self._verified: dict[str, tuple[int, int, int]] = {}  # policy -> rows, drafts, kept since `take_verified`

    @property
    def busy(self) -> bool:
        """Whether a request is here: decoding, or its prompt being prefilled a piece at a time."""
        return bool(self.sequences or self.pieces)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache (not recomputed)."""
        return self.kv.reused_tokens

    # -- schedule: what runs ------------------------------------------------------------------------------------------

    def decode_input(self, in_flight: Sequence[Launched] = ()) -> StepInput | None:
        """Every unfinished row decodes its last token. A row of a step `in_flight` (queued, its results not read
        yet: the last decode step, prefills) decodes the token that step sampled for it, still on the device, one
        position further on; a row that token ends by length (max_tokens or max_len) is left out."""
        flying = {s.id: (f, b) for f, launched in enumerate(in_flight) for b, s in enumerate(launched.inp.requests)}
        live = tuple(s for s in self.sequences if not s.finished and (s.id not in flying or self._goes_on(s)))
        if not live:
            return None
        assert not any(_constrained(s) and s.id in flying for s in live), "a structured row's token in flight"
        dev = self.model.device
        rows = tuple(Row(s.id, s.schedule, s.length - 1 + (s.id in flying), 1) for s in live)
        src = [flying.get(s.id) for s in live]
        if len(in_flight) == 1 and src == [(0, b) for b in range(len(in_flight[0].inp.requests))]:
            tokens = in_flight[0].tokens[:, None]  # steady state: no copy
        else:
            tokens = to_device(torch.tensor([s.output_ids[-1] if at is None else 0 for s, at in zip(live, src)],
                                            dtype=torch.long)[:, None], dev)
            for f, launched in enumerate(in_flight):
                moved = [(i, at[1]) for i, at in enumerate(src) if at is not None and at[0] == f]
                if moved:
                    to, of = to_device(torch.tensor(moved, dtype=torch.long).T, dev)
                    tokens[to, 0] = launched.tokens[of]
        return StepInput(live, rows, tokens, torch.zeros(len(live), dtype=torch.long, device=dev),
                         self._sampling(live, [len(s.output_ids) + (s.id in flying) for s in live], tokens))

    def _goes_on(self, s: Request) -> bool:
        """Whether `s` may decode past the token in flight for it: that token does not end it by length (as
        `_check_stop` would: max_tokens reached, or max_len)."""
        return len(s.output_ids) + 1 < s.params.max_tokens and s.length + 1 < self.max_len

    def prefill_input(self, new: list[Request], starts: list[int]) -> StepInput:
        """New requests compute their prompts from `starts` (what the prefix cache did not hold), right-padded."""
        width = max(len(s.prompt_ids) - p for s, p in zip(new, starts))
        tokens = torch.zeros(len(new), width, dtype=torch.long)
        for b, (s, p) in enumerate(zip(new, starts)):
            tokens[b, : len(s.prompt_ids) - p] = torch.tensor(s.prompt_ids[p:])
        dev = self.model.device
        last = to_device(torch.tensor([len(s.prompt_ids) - p - 1 for s, p in zip(new, starts)]), dev)
        rows = tuple(Row(s.id, s.schedule, p, len(s.prompt_ids) - p) for s, p in zip(new, starts))
        scored = any(s.params.prompt_alternatives is not None for s in new)
        return StepInput(tuple(new), rows, to_device(tokens, dev), last,
                         self._sampling(new, [0] * len(new)), echo=scored)

    def _sampling(self, seqs: tuple[Request, ...] | list[Request], made: list[int],
                  inputs: Tensor | None = None, histories: Sequence[Sequence[int]] | None = None) -> SamplingBatch:
        """Each row's sampling parameters; a row that has `made` tokens (counting one in flight) fewer than its
        min_tokens may not choose a stop token (vLLM's semantics: the EOS and stop_token_ids are masked, so the
        request goes on with another token; stop strings only match after min_tokens, see `_check_stop`).
        inputs [B, 1]: a decode step's input tokens, each row's latest output token, on the device (overlapped,
        maybe still in flight): what a penalized row counts last and a bad word's match ends on; its earlier ones
        come from the host, and its prompt from the device (copied once: `PromptCache`). histories: each row's
        output tokens before the one it chooses, where they are not its request's (a verifying step's rows follow
        drafts). A structured row's allowed tokens come from its matcher, which has accepted every token it made
        (they are on the host)."""
        vocab = self.model.args.vocab_size
        structured = [b for b, s in enumerate(seqs) if _constrained(s)]
        grammar = None
        if structured:  # only then: a batch without a structured row does no grammar work
            grammar = (structured, bitmask([seqs[b].grammar for b in structured], vocab))
        banned = [(b, t) for b, (s, n) in enumerate(zip(seqs, made)) if n < s.params.min_tokens
                  for t in sorted(s.stop_ids) if 0 <= t < vocab]
        outputs = prompts = recent = None
        if any(s.params.penalized or s.params.bad_words_ids for s in seqs):  # only then: no row pays for a history
            known = [n - (inputs is not None) for n in made]  # it does not use
            made_ids = histories or [s.output_ids for s in seqs]
            outputs = [h[:k] if s.params.penalized or s.params.bad_words_ids else ()
                       for s, h, k in zip(seqs, made_ids, known)]
            prompts = [self.prompts.get(s.id, s.prompt_ids) if s.params.reads_prompt else None for s in seqs]
            recent = None if inputs is None else inputs[:, 0]
        return SamplingBatch.of([s.params for s in seqs], [s.generator for s in seqs], self.model.device, banned,
                                outputs=outputs, prompts=prompts, recent=recent, grammar=grammar)

    # -- execute: tensor work, one host copy ----------------------------------------------------------------------

    def launch(self, inp: StepInput) -> Launched:
        """Queue the forward and batched sampling; the results start their one copy to the host."""
        hidden = None
        if inp.echo:  # every position's hidden state, for prompt scoring (`_score_prompt`)
            hidden = self.executor.forward(inp.tokens, list(inp.rows), hidden=True)
            logits = self.model.logits(hidden[torch.arange(len(inp.rows), device=hidden.device), inp.logits_at])
        else:
            logits = self.executor.forward(inp.tokens, list(inp.rows), logits_at=inp.logits_at)
        tokens, fetch = self.sample(logits, inp.sampling)
        return Launched(inp, tokens, fetch, hidden)

    def execute(self, inp: StepInput) -> ModelOutput:
        """The forward and batched sampling; the results reach the host in one copy."""
        return self.launch(inp).result()

    @staticmethod
    def sample(logits: Tensor, sampling: SamplingBatch) -> tuple[Tensor, Callable[[], ModelOutput]]:
        """logits [B, V] -> each row's token on the device [B], and a call that returns every row's token, logprob
        and top alternatives on the host, brought there in one copy (waiting for it)."""
        # one fused pass (CPU logsumexp is ~3x slower), only when some row wants a logprob
        logprobs = torch.log_softmax(logits.float(), dim=-1) if sampling.logprobs else None
        tokens, alive, errors = sample_batch(logits, sampling)
        k = sampling.num_top
        top = torch.topk(alternatives(logprobs, sampling), k) if k and logprobs is not None else None
        to_host = _to_host(tokens, alive, logprobs, top)
        failed = {b: f"sampling failed: {type(e).__name__}: {e}" for b, e in errors.items()}

        def fetch() -> ModelOutput:
            host = to_host()
            stuck = frozenset(b for b, ok in enumerate(host.alive) if not ok and b not in failed)
            for b in stuck:
                failed[b] = (f"sampling failed: ValueError: row {b} has no token with a finite logit (all are -inf "
                             "or NaN)")
            top = ([dict(zip(i, v)) for i, v in zip(host.top_ids, host.top_logprobs)] if k
                   else [{} for _ in host.alive])
            return ModelOutput(token_ids=host.token_ids, logprobs=host.logprobs, top=top, errors=failed, stuck=stuck)

        return tokens, fetch

    # -- update: tokens, stops, text ------------------------------------------------------------------------------

    def update(self, seqs: tuple[Request, ...] | list[Request], out: ModelOutput, *,
               prefill_from: float | None = None) -> None:
        """Take a step's results: a prefill's (begun at `prefill_from`: the first tokens) or a decode step's. Each
        token is timed when it reaches the host (`Timings`)."""
        now = time.perf_counter()
        for b, s in enumerate(seqs):
            if prefill_from is not None:
                s.timings.queue_s = (s.scheduled or prefill_from) - s.arrival
                s.timings.prefill_s = now - prefill_from
                s.timings.ttft_s = now - s.arrival
                s.timings.first_token(now)
                if s.params.max_tokens == 0:
                    s.set_finished("length")
            if s.finished:
                continue
            self._take(s, out, b, now=None if prefill_from is not None else now)

    def _take(self, s: Request, out: ModelOutput, b: int, *, now: float | None) -> None:
        """Give `s` the token of `out`'s row b (timed at `now`; None: a first token, timed by the prefill), or end
        it with that row's error; then check its stops."""
        if b in out.errors:
            s.set_finished("error", *_why_failed(s, out.errors[b], stuck=b in out.stuck))
            return
        try:
            if now is not None:
                s.timings.add_token(now)
            token = out.token_ids[b]
            s.output_ids.append(token)
            if s.params.logprobs is not None:
                s.logprobs.append(out.logprobs[b])
            if s.params.logprobs:
                s.top_logprobs.append(dict(itertools.islice(out.top[b].items(), s.params.logprobs)))
            self._check_stop(s, token)
        except Exception as e:  # this row alone fails
            s.set_finished("error", f"{type(e).__name__}: {e}")

    def _check_stop(self, s: Request, token: int) -> None:
        n = len(s.output_ids)
        # a structured row ends where its grammar does: on a stop token, which the grammar allows only at its end;
        # with ignore_eos it decodes on, unconstrained, as in vLLM (whose mask past a grammar's end allows all)
        ended = s.grammar is not None and _grammar_ends(s, token) and not s.params.ignore_eos
        eos = ended or (token in s.stop_ids and n > s.params.min_tokens)
        previous = len(s.text)
        if s.detokenizer is None:
            s.detokenizer = _detokenizer(self.tokenizer, s.params)
        if eos:  # the stop token's text is the request's only with include_stop_str_in_output, as in vLLM
            if s.params.include_stop_str_in_output:
                s.text += s.detokenizer.add(token)
            s.set_finished("stop")
            s.text += s.detokenizer.flush()
            return
        s.text += s.detokenizer.add(token)  # O(1) per token: only the new tail is decoded
        if n == s.params.min_tokens:
            s.stop_from = len(s.text)
        if n > s.params.min_tokens and _cut_at_stop(s, previous):
            return
        if n >= s.params.max_tokens or s.length >= self.max_len:
            previous = len(s.text)
            s.text += s.detokenizer.flush()  # text held back for an incomplete character may complete a stop string
            if not (n > s.params.min_tokens and _cut_at_stop(s, previous)):
                s.set_finished("length")

    # -- the ladder -------------------------------------------------------------------------------------------------

    def add(self, new: list[Request]) -> list[Request]:
        """Prefill `new` (right-padded together, their own forward call) and choose each one's first token
        (overlapped, queued here and read by the next `decode`: see the module's docstring). Returns the requests
        that joined the decoding rows (their first token chosen, or queued).
        With prefix reuse, a prompt whose start is cached under its schedule computes from where the cache ends;
        new requests that share a first block with an earlier one in this call wait for it (a second, cheaper
        call).
        With `prefill_tokens` (chunked prefill, as vLLM's and SGLang's), one call computes at most that many prompt
        tokens, so the rows decoding meanwhile wait for at most that much work between two tokens: prompts begun
        in earlier calls go on first, oldest first, then the new ones; a prompt that what is left of the budget
        cannot finish is computed a piece per call (`pieces`; call `add([])` to go on) and decodes from the call
        that finishes it; the prompts after it wait, and look the prefix cache up when their turn comes (so one
        that starts alike finds it whole). A scored prompt (echo) is computed whole, counted against the
        budget."""
        if not new and not self.pieces:
            return []
        t0 = time.perf_counter()
        for s in new:
            s.scheduled = t0
        joined = len(self.sequences)
        budget = self._go_on(self.prefill_tokens)
        waves: list[list[Request]] = [new]
        if self.kv.prefix_caching:
            firsts: set[tuple[str, tuple[int, ...]]] = set()
            waves = [[], []]
            for s in new:
                first = (s.prefix_key, tuple(s.prompt_ids[: self.kv.block_size]))
                shares = len(s.prompt_ids) > self.kv.block_size and first in firsts
                waves[1 if shares else 0].append(s)
                firsts.add(first)
        for wave in waves:
            # scored prompts apart: their prefill is read at once (see the module's docstring), the others' overlap
            scored = [s.params.prompt_alternatives is not None for s in wave]
            for group in ([s for s, x in zip(wave, scored) if not x], [s for s, x in zip(wave, scored) if x]):
                if group:
                    budget = self._prefill(group, t0, budget)
        return self.sequences[joined:]

    def _go_on(self, budget: int | None) -> int | None:
        """The prompts begun piecewise in earlier calls, oldest first, within `budget`: each it can finish is
        finished (and chooses its first token); the first it cannot gets the rest of it. Returns what is left."""
        while self.pieces and (budget is None or budget > 0):
            p = self.pieces[0]
            if p.reused is None:
                p.reused = self.kv.reuse(p.request)
                p.at = p.reused.start
            left = len(p.request.prompt_ids) - p.at
            if budget is not None and left > budget:
                self._compute_pieces([(p, budget)])
                return 0
            self.pieces.pop(0)
            self._prefill_whole([p.request], [Reused(p.at)], p.began, registered_from=[p.reused.start])
            budget = None if budget is None else budget - left
        return budget

    def _prefill(self, new: list[Request], t0: float, budget: int | None) -> int | None:
        """Prefill `new` from what the prefix cache holds of each, within `budget` (see `add`): whole where it
        allows, else begun piecewise, or left waiting for the next call once it is spent. Returns what is left of
        the budget."""
        whole: list[Request] = []
        reused: list[Reused] = []
        for s in new:
            scored = s.params.prompt_alternatives is not None
            if budget == 0 and not scored:
                self.pieces.append(Piecewise(s, t0))
                continue
            r = self.kv.reuse(s)
            need = len(s.prompt_ids) - r.start
            if budget is None or need <= budget or scored:
                whole.append(s)
                reused.append(r)
                budget = None if budget is None else max(0, budget - need)
                continue
            piece = Piecewise(s, t0, r, r.start)
            self.pieces.append(piece)
            self._compute_pieces([(piece, budget)])
            budget = 0
        if whole:
            self._prefill_whole(whole, reused, t0)
        return budget

    def _compute_pieces(self, pieces: list[tuple[Piecewise, int]]) -> None:
        """For each (prompt begun piecewise, n): its next n prompt tokens into the KV cache; nothing is sampled."""
        rows = tuple(Row(p.request.id, p.request.schedule, p.at, n) for p, n in pieces)
        tokens = torch.zeros(len(rows), max(n for _, n in pieces), dtype=torch.long)
        for b, (p, n) in enumerate(pieces):
            assert p.at + n < len(p.request.prompt_ids), "a piece leaves the prompt's last token to its final call"
            tokens[b, :n] = torch.tensor(p.request.prompt_ids[p.at : p.at + n])
            p.at += n
        dev = self.model.device
        self.executor.forward(to_device(tokens, dev), list(rows),
                              logits_at=to_device(torch.tensor([n - 1 for _, n in pieces]), dev))


    def _prefill_whole(self, new: list[Request], reused: list[Reused], t0: float, *,
                       registered_from: list[int] | None = None) -> None:
        """Compute `new`'s prompts from `reused` (what the cache holds of each) to their end and choose their first
        tokens; their prompt blocks become findable from `registered_from` (default: where computing began)."""
        starts = [r.start for r in reused]
        registered = registered_from or starts
        inp = self.prefill_input(new, starts)
        if self.overlap and not inp.echo:  # read by the next `decode`, after it queues the rows' first step
            self._prefills.append((self.launch(inp), t0))
            for s, p in zip(new, registered):
                self.kv.register(s, p)
            self.sequences.extend(new)
            return
        out = self.execute(inp)
        if out.hidden is not None:
            for b, (s, p, r) in enumerate(zip(new, starts, reused)):
                if s.params.prompt_alternatives is not None:
                    _score_prompt(s, out.hidden[b, : len(s.prompt_ids) - p], r, self.model)
        for s, p in zip(new, registered):
            self.kv.register(s, p)
        self.sequences.extend(new)
        self.update(new, out, prefill_from=t0)

    def decode(self) -> tuple[Request, ...]:
        """Decode one token for every unfinished row (finished rows leave at `filter`); returns the requests whose
        token this call read. Overlapped, it queues the next step before it reads the one in flight, so each row's
        token arrives one call later and the last call only reads (see the module's docstring). Prefills that
        `add` queued are read here too, after this step is queued."""
        in_flight, self._in_flight = self._in_flight, None
        prefills, self._prefills = self._prefills, []
        live = [s for s in self.sequences if not s.finished]
        # a row that may draft needs its latest token on the host, as a structured row's mask does (see the
        # module's docstring); a token in flight may leave it one less room
        drafting = bool(self._rooms(live, ahead=int(in_flight is not None or bool(prefills))))
        overlap = self.overlap and not drafting and not any(_constrained(s) for s in live)
        read: tuple[Request, ...] = ()
        if not overlap:
            read, in_flight, prefills = self._read(in_flight, prefills), None, []
            drafts = self._propose() if drafting else {}
            if drafts:
                return read + self._verify(drafts)
        inp = self.decode_input([*([] if in_flight is None else [in_flight]), *(p for p, _ in prefills)])
        launched = None if inp is None else self.launch(inp)
        if overlap:
            self._in_flight, launched = launched, in_flight
        return read + self._read(launched, prefills)

    def _rooms(self, live: list[Request], *, ahead: int = 0) -> list[tuple[Request, int]]:
        """The rows of `live` that may draft this step, each with how many tokens at most (`room`): none while more
        rows decode than the speculation allows; none for a structured row (its matcher would have to follow each
        draft) or a row the draft's schedule cannot run on; and few enough that the verifying step's logits stay
        within VERIFY_LOGITS_BYTES. ahead: tokens a row may have in flight beyond those on the host."""
        spec = self.speculation
        if spec is None or (spec.up_to_rows is not None and len(live) > spec.up_to_rows):
            return []
        cap = (VERIFY_LOGITS_BYTES // (4 * self.model.args.vocab_size) - len(live)) // max(1, len(live))
        draft = self._draft_schedule
        rows = []
        for s in live:
            if _constrained(s) or (draft is not None and not runs_within(draft, s.schedule)):
                continue
            k = min(cap, room(num_tokens=spec.num_tokens, made=len(s.output_ids) + ahead,
                              max_tokens=s.params.max_tokens, length=s.length + ahead, max_len=self.max_len))
            if k > 0:
                rows.append((s, k))
        return rows

    def _propose(self) -> dict[str, list[int]]:
        """The drafts of the rows that have any this step (see `server.engine.speculative`), within `_rooms`."""
        spec = self.speculation
        assert spec is not None
        rows = self._rooms([s for s in self.sequences if not s.finished])
        if spec.method == "ngram":
            drafts = {s.id: propose_ngram(s.prompt_ids + s.output_ids, k=k, lookup_min=spec.lookup_min,
                                          lookup_max=spec.lookup_max) for s, k in rows}
        else:
            drafts = self._draft(rows)
        return {i: d for i, d in drafts.items() if d}

    def _draft(self, rows: list[tuple[Request, int]]) -> dict[str, list[int]]:
        """layer_skip: each row's next k tokens, chosen greedily under the draft schedule, a forward per token. The
        draft writes its slots' KV at the drafted positions, which the verifying forward rewrites."""
        draft = self._draft_schedule
        if not rows or draft is None:
            return {}
        dev = self.model.device
        for s, k in rows:  # the verifying forward writes every slot there: its blocks before the draft's forwards
            self.executor.cache.reserve(s.id, s.schedule.slots, s.length + k)
        last = to_device(torch.tensor([s.output_ids[-1] for s, _ in rows]), dev)  # [B] each row's input token
        made = torch.zeros(len(rows), max(k for _, k in rows), dtype=torch.long, device=dev)  # [B, K]
        for j in range(made.shape[1]):
            on = [b for b, (_, k) in enumerate(rows) if k > j]
            at = None if len(on) == len(rows) else to_device(torch.tensor(on), dev)
            logits = self.executor.forward((last if at is None else last[at])[:, None],
                                           [Row(rows[b][0].id, draft, rows[b][0].length - 1 + j, 1) for b in on],
                                           logits_at=torch.zeros(len(on), dtype=torch.long, device=dev),
                                           transient=True)
            chosen = logits.argmax(-1)
            if at is None:
                last, made[:, j] = chosen, chosen
            else:
                last, made[at, j] = last.index_copy(0, at, chosen), chosen
        host = made.tolist()  # the one wait
        return {s.id: host[b][:k] for b, (s, k) in enumerate(rows)}

    def _verify(self, drafts: dict[str, list[int]]) -> tuple[Request, ...]:
        """One forward over every unfinished row: a row computes its last token and its drafts (none for some),
        its sampler chooses a token at each of those positions as decoding would (the processors see the drafts
        before it as made; a drawing row draws in order from its generator), and the row keeps the drafts up to
        the first its sampler did not choose, then its own token there. Its generator is left where its kept
        tokens' draws leave it, so a seeded row draws what it would without drafts."""
        live = tuple(s for s in self.sequences if not s.finished)
        ds = [drafts.get(s.id, []) for s in live]
        rows = [Row(s.id, s.schedule, s.length - 1, 1 + len(d)) for s, d in zip(live, ds)]
        T = max(r.num_new for r in rows)
        tokens = torch.zeros(len(live), T, dtype=torch.long)
        for b, (s, d) in enumerate(zip(live, ds)):
            tokens[b, : 1 + len(d)] = torch.tensor([s.output_ids[-1], *d])
        dev = self.model.device
        hidden = self.executor.forward(to_device(tokens, dev), rows, hidden=True)  # [B, T, d]
        at = to_device(torch.tensor([b * T + j for b, d in enumerate(ds) for j in range(len(d) + 1)]), dev)
        logits = self.model.logits(hidden.reshape(-1, hidden.shape[-1])[at])  # [N, V]: the positions that sample
        positions = [(s, d, j) for s, d in zip(live, ds) for j in range(len(d) + 1)]
        states: dict[str, Any] = {}  # a drawing row's generator before its draws (or why it could not be read)
        for s, d in zip(live, ds):
            if d and not s.params.greedy:
                try:
                    states[s.id] = s.generator.get_state()
                except Exception as e:  # noqa: BLE001 -- this row alone fails, as a draw of it would
                    states[s.id] = e
        sampling = self._sampling([s for s, _, _ in positions], [len(s.output_ids) + j for s, _, j in positions],
                                  histories=[s.output_ids + d[:j] for s, d, j in positions])
        out = self.sample(logits, sampling)[1]()
        now = time.perf_counter()
        v = 0
        for s, d in zip(live, ds):
            keep = accepted(d, out.token_ids[v : v + len(d) + 1]) + 1
            had = len(s.output_ids)
            for j in range(keep):
                self._take(s, out, v + j, now=now)
                if s.finished:
                    break
            if d:  # the drafts it output: not those past a token that ended it
                kept = min(keep - 1, len(s.output_ids) - had)
                s.speculated.drafts += 1
                s.speculated.draft_tokens += len(d)
                s.speculated.accepted_tokens += kept
                rows, drafted, kept_before = self._verified.get(s.schedule.policy, (0, 0, 0))
                self._verified[s.schedule.policy] = (rows + 1, drafted + len(d), kept_before + kept)
            if s.id in states and keep < len(d) + 1 and not s.finished:
                self._rewind(s, states[s.id], keep)
            v += len(d) + 1
        return live

    def take_verified(self) -> dict[str, tuple[int, int, int]]:
        """Per policy, the rows that verified drafts since the last call, the tokens they drafted and kept (the
        engine loop counts them each step)."""
        verified, self._verified = self._verified, {}
        return verified

    def _rewind(self, s: Request, state: Any, draws: int) -> None:
        """Leave `s`'s generator where its kept tokens' draws leave it; a generator that fails ends `s` alone."""
        try:
            if isinstance(state, Exception):
                raise state
            rewind(s.generator, state, draws, self.model.device)
        except Exception as e:  # noqa: BLE001 -- isolation, as sample_batch's: only this row is lost
            s.set_finished("error", f"sampling failed: {type(e).__name__}: {e}")

    def settle(self) -> tuple[Request, ...]:
        """Read the steps in flight, if any: afterwards the host holds every token sampled so far (what a
        rollback needs). Returns the requests whose token it read."""
        launched, self._in_flight = self._in_flight, None
        prefills, self._prefills = self._prefills, []
        return self._read(launched, prefills)

    def rollback(self, request: Request, n: int) -> None:
        """Forget `request`'s last n tokens (a verifier rejected them), after the step in flight is read: their KV
        and outputs (`KVManager.rollback`), the text they added (decoded again from the tokens kept), an end that the
        last of them brought (a stop, a length: a request ends on its last token), and their entries in the
        per-token times. Their time stays in decode_s: it was spent. Tokens already streamed cannot be taken back."""
        self.settle()
        assert len(request.output_ids) - n >= request.sent_tokens, "rolling back tokens already streamed"
        self.kv.rollback(request, n)
        if not n:
            return
        if request.grammar is not None:
            request.grammar.rollback(n)
        tm = request.timings
        k = min(n, len(tm.per_token_s))
        del tm.per_token_s[len(tm.per_token_s) - k:]
        tm.decode_tokens -= k
        if request.finish_reason in ("stop", "length"):
            request.finish_reason = None
        request.detokenizer, request.text, request.stop_from = _detokenizer(self.tokenizer, request.params), "", 0
        for i, token in enumerate(request.output_ids, 1):
            request.text += request.detokenizer.add(token)
            if i == request.params.min_tokens:
                request.stop_from = len(request.text)

    def _read(self, launched: Launched | None, prefills: list[tuple[Launched, float]]) -> tuple[Request, ...]:
        """Read the prefills, then the decode step; returns the requests that got a token (a row that finished
        while its step was in flight gets none: its token is dropped)."""
        read: list[Request] = []
        for prefill, t0 in prefills:
            read += _given_a_token(prefill.inp.requests,
                                   lambda: self.update(prefill.inp.requests, prefill.result(), prefill_from=t0))
        if launched is None:
            return tuple(read)
        read += _given_a_token(launched.inp.requests, lambda: self.update(launched.inp.requests, launched.result()))
        return tuple(read)

    def step(self) -> None:
        """Go on with prompts begun piecewise (`add`), then decode one token for every unfinished row (`decode`)."""
        self.add([])
        self.decode()

    def filter(self) -> list[Request]:
        """Remove finished requests and free their KV blocks; returns the removed. (A step in flight may still
        write a removed row's KV: the device runs it before any later step that could reuse those blocks.)"""
        done = [s for s in self.sequences if s.finished]
        if done:
            self.sequences = [s for s in self.sequences if not s.finished]
            for s in done:
                self.kv.free(s.id)
                self.prompts.drop(s.id)
        if self._in_flight is not None and all(s.finished for s in self._in_flight.inp.requests):
            self._in_flight = None  # nothing left to read from it
        self._prefills = [(p, t0) for p, t0 in self._prefills if not all(s.finished for s in p.inp.requests)]
        for p in [p for p in self.pieces if p.request.finished]:  # ended while its prompt was being prefilled
            self.pieces.remove(p)
            self.kv.free(p.request.id)
            done.append(p.request)
        return done

    def remove(self, request_id: str) -> None:
        """A request left (ended by its owner): it leaves the batch; its KV is freed by whoever ended it."""
        self.sequences = [s for s in self.sequences if s.id != request_id]
        self.pieces = [p for p in self.pieces if p.request.id != request_id]
        self.prompts.drop(request_id)

    def probe(self, prompts: list[list[int]], schedule: Schedule) -> ProbeStats:
        """One forward pass of `prompts` under `schedule`, no sampling; returns the layer statistics of
        `server.engine.probe` (reduced here, on the thread that owns the tensors)."""
        reducer = ProbeReducer()
        for _, tokens, lengths, forward in self._prompt_chunks(prompts, "probe"):
            states: list[Tensor] = [tokens] * (len(schedule.steps) + 1)

            def capture(step: int, rows: Tensor, h: Tensor, states: list[Tensor] = states) -> None:
                states[step] = h  # already a copy (gathered by row)

            forward(schedule, logits_at=torch.tensor(lengths, device=self.model.device) - 1, capture=capture)
            reducer.add(states, lengths)
        return reducer.result(schedule)

    def embed(self, prompts: list[list[int]], schedule: Schedule) -> list[list[float]]:
        """One forward pass of `prompts` under `schedule`, no sampling; each prompt's embedding: its last token's
        final hidden state after the final norm, L2-normalized (vLLM's default pooling of a causal LM: LAST, with
        normalize=True; `vllm/model_executor/layers/pooler.py`, `models/adapters.py` `as_embedding_model`). Only
        plain lists leave this thread."""
        out: list[list[float]] = [[] for _ in prompts]
        dev = self.model.device
        for chunk, _, lengths, forward in self._prompt_chunks(prompts, "embed"):
            h = forward(schedule, hidden=True)  # [n, T, d], before the final norm
            last = h[torch.arange(len(chunk), device=dev), torch.tensor(lengths, device=dev) - 1]  # [n, d]
            pooled = torch.nn.functional.normalize(self.model.final_normed(last).float(), dim=-1)
            for b, row in zip(chunk, pooled.cpu().tolist()):
                out[b] = row
        return out

    def _prompt_chunks(self, prompts: list[list[int]], prefix: str
                       ) -> Iterator[tuple[list[int], Tensor, list[int], Callable[..., Tensor]]]:
        """Prompt-only work (probes, embeddings) in chunks of similar length (`probe_chunks`): for each, the indices
        of its prompts, their tokens padded [n, T] (on the host), their lengths, and a forward over them under a
        schedule (`Executor.forward`'s keywords) that frees the chunk's KV blocks once it has run."""
        for chunk in probe_chunks([len(p) for p in prompts]):
            ids = [f"{prefix}-{next(_ids)}" for _ in chunk]
            lengths = [len(prompts[b]) for b in chunk]
            tokens = torch.zeros(len(chunk), max(lengths), dtype=torch.long)
            for row, b in enumerate(chunk):
                tokens[row, : lengths[row]] = torch.tensor(prompts[b])

            def forward(schedule: Schedule, *, ids: list[str] = ids, lengths: list[int] = lengths,
                        tokens: Tensor = tokens, **options: Any) -> Tensor:
                try:
                    return self.executor.forward(tokens.to(self.model.device),
                                                 [Row(q, schedule, 0, n) for q, n in zip(ids, lengths)], **options)
                finally:
                    for q in ids:
                        self.kv.free(q)

            yield chunk, tokens, lengths, forward

    def warm_up(self, schedule: Schedule) -> None:
        """Capture (and, fused, compile) the decode steps of `schedule`, and of a speculative draft's, before any
        request runs (`Executor.warm_up`)."""
        self.executor.warm_up(schedule)
        if self._draft_schedule is not None:
            self.executor.warm_up(self._draft_schedule, transient=True)

    def kv_usage(self) -> float:
        """Share of the KV pool's blocks in use."""
        return self.kv.usage()


def _detokenizer(tokenizer: Any, params: SamplingParams) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens,
                                  spaces_between_special_tokens=params.spaces_between_special_tokens)


def _why_failed(s: Request, error: str, *, stuck: bool) -> tuple[str, str | None]:
    """A row's sampling error and its code, said as its cause where that is the request's own (code
    NO_TOKEN_ALLOWED: a client error, not the server's): a structured output whose grammar is complete allows only a
    stop token, which min_tokens forbids; or (`stuck`: every token was -inf) the masks it asked for together forbid
    every token (bad_words over what its grammar or allowed_token_ids allow; vLLM samples from the all -inf row), or
    its grammar alone does (it needs text that no token of the vocabulary writes)."""
    if s.grammar is not None and len(s.output_ids) < s.params.min_tokens:
        return (f"the structured output was complete after {len(s.output_ids)} tokens, before min_tokens "
                f"({s.params.min_tokens}), which forbids ending it there: lower min_tokens", NO_TOKEN_ALLOWED)
    p = s.params
    masks = [name for name, used in (("the structured output", _constrained(s)),
                                     ("allowed_token_ids", p.allowed_token_ids is not None),
                                     ("bad_words", bool(p.bad_words_ids))) if used]
    if stuck and len(masks) > 1:
        return (f"no token was left to choose after {len(s.output_ids)} output tokens: {' and '.join(masks)} "
                "together forbid every token there; send bad_words (or allowed_token_ids) that leave it a way on",
                NO_TOKEN_ALLOWED)
    if stuck and masks == ["the structured output"]:  # the grammar needs text no token of this vocabulary writes
        return (f"no token was left to choose after {len(s.output_ids)} output tokens: the structured output allows "
                "no token of this model's vocabulary there (its grammar needs text that no token writes); send a "
                "structured output this model's tokens can write", NO_TOKEN_ALLOWED)
    return error, None


def _constrained(s: Request) -> bool:
    """Whether a row's grammar still constrains its next token (it has one, and has not reached its end)."""
    return s.grammar is not None and not s.grammar.terminated


def _grammar_ends(s: Request, token: int) -> bool:
    """Advance `s`'s matcher by its new token; whether that ended the grammar (it accepted a stop token there)."""
    assert s.grammar is not None
    before = s.grammar.terminated
    if not s.grammar.accept(token):  # the mask allowed only what it accepts: a bug, this row's alone
        raise ValueError(f"the structured output's grammar does not accept token {token} here")
    return not before and s.grammar.terminated


def _cut_at_stop(s: Request, previous: int) -> bool:
    """If one of `s`'s stop strings ends in its text after `previous` (and starts at or after `stop_from`), cut the
    text where the first match starts (after it, with include_stop_str_in_output) and finish `s` with "stop"; whether
    it did."""
    if not s.params.stop:
        return False
    longest = max(len(stop) for stop in s.params.stop)
    start = max(s.stop_from, previous - longest + 1)  # a new match ends in the new text
    hits = [(i, len(stop)) for stop in s.params.stop if (i := s.text.find(stop, start)) >= 0]
    if not hits:
        return False
    at, length = min(hits)  # the first match; of two there, the shorter, which the text held first
    s.text = s.text[: at + length if s.params.include_stop_str_in_output else at]
    s.set_finished("stop")
    return True


def _given_a_token(requests: Sequence[Request], update: Callable[[], None]) -> list[Request]:
    """Run `update` (a step's read); returns the requests it gave a token. Not the others: a row that finished while
    its step was in flight (its token is dropped), one that failed sampling, one scored with max_tokens=0."""
    before = {s.id: len(s.output_ids) for s in requests if not s.finished}
    update()
    return [s for s in requests if len(s.output_ids) > before.get(s.id, len(s.output_ids))]


@dataclass(frozen=True)
class _Host:
    token_ids: list[int]
    alive: list[bool]
    logprobs: list[float]  # of each row's token (empty: none asked)
    top_ids: list[list[int]]  # [B][k]
    top_logprobs: list[list[float]]


def _to_host(tokens: Tensor, alive: Tensor, logprobs: Tensor | None, top: Any) -> Callable[[], _Host]:
    """A step's results as Python lists, through a call that waits for them. On a GPU they travel in one
    device-to-host copy of one packed tensor into pinned memory, queued now (no sync: the host may queue more work
    before it calls). On the CPU no copy at all (numpy views of the tensors, and numpy picks each row's logprob: the
    same values, a tenth of torch's per-op cost right after a forward)."""
    B = tokens.shape[0]
    if tokens.device.type == "cpu":
        t = tokens.numpy()
        host = _Host(t.tolist(), alive.numpy().tolist(),
                     [] if logprobs is None else logprobs.numpy()[np.arange(B), t].tolist(),
                     [] if top is None else top.indices.tolist(), [] if top is None else top.values.tolist())
        return lambda: host
    chosen = tokens[:, None]
    parts = [chosen, alive[:, None]]  # cat promotes all to one dtype (float64 once logprobs join)
    if logprobs is not None:
        parts.append(logprobs.gather(-1, chosen).double())
    k = 0 if top is None else top.indices.shape[1]
    if k:
        parts += [top.indices.double(), top.values.double()]
    packed = torch.cat(parts, dim=1)  # [B, 2 + (1 + 2k when logprobs)]
    copy = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    copy.copy_(packed, non_blocking=True)  # the one copy
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tokens.device))

    def wait() -> _Host:
        done.synchronize()
        return _Host(copy[:, 0].long().tolist(), copy[:, 1].bool().tolist(),
                     [] if logprobs is None else copy[:, 2].tolist(),
                     copy[:, 3 : 3 + k].long().tolist() if k else [], copy[:, 3 + k :].tolist() if k else [])

    return wait


def _score_prompt(s: Request, hidden: Tensor, reused: Reused, model: Transformer) -> None:
    """hidden [T', d], the final hidden states over the prompt from position p = reused.start on -> logprob of each
    prompt token given its prefix (None for the first), its rank there (1 + how many tokens are likelier) and the n
    likeliest tokens. Tokens up to p come from the cache (`reused`). The logits are computed a few positions at a
    time, within SCORE_LOGITS_BYTES."""
    n = s.params.prompt_alternatives or 0
    values: list[float | None] = list(reused.logprobs) if reused.logprobs else [None]
    tops: list[dict[int, float] | None] = list(reused.tops) if reused.tops else [None]
    ranks: list[int | None] = list(reused.ranks) if reused.ranks else [None]
    p = len(values) - 1
    assert p == reused.start == len(ranks) - 1
    ids = torch.tensor(s.prompt_ids[p + 1 :], dtype=torch.long, device=hidden.device)  # position i predicts ids[i]
    step = max(1, SCORE_LOGITS_BYTES // (4 * model.args.vocab_size))
    for i in range(0, len(ids), step):
        chosen = ids[i : i + step]
        logprobs = torch.log_softmax(model.logits(hidden[i : i + len(chosen)]), dim=-1)
        value = logprobs.gather(-1, chosen[:, None])  # [t, 1]
        values += value[:, 0].tolist()
        ranks += ((logprobs > value).sum(-1) + 1).tolist()
        if n:
            top = torch.topk(logprobs, n)
            tops += [dict(zip(t.tolist(), v.tolist())) for t, v in zip(top.indices, top.values)]
    s.prompt_logprobs, s.prompt_ranks = values, ranks
    if n:
        s.prompt_top_logprobs = tops


class Engine:
    """A loaded frozen model with its tokenizer: compiles policies and generates under any mix of them."""

    def __init__(
        self, model: Transformer, tokenizer: Any, *, eos_ids: frozenset[int] = frozenset(), config: Any = None,
        group_mode: GroupMode = "batched", name: str = "model", block_size: int = 16,
        attention: AttentionMode = "auto", graphs: bool | None = None, fuse: bool = False,
        overlap: bool | None = None, speculation: Speculation | None = None,
    ) -> None:
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, config, name
        self.speculation = speculation  # how batches draft tokens to verify (server.engine.speculative); None: off
        self.eos_ids, self.group_mode, self.block_size = eos_ids, group_mode, block_size
        self.attention = attention  # how decode attention reads the KV pool, as asked (see server.engine.executor)
        self.graphs = graphs  # captured decode steps (server.engine.graphs); None: on CUDA, off on the CPU
        self.fuse = fuse  # captured steps run the layer math through torch.compile (Transformer.fused)
        self.overlap = overlap  # decode queues each step before reading the last (Batch); None: on CUDA
        # structured outputs: compiled for the tokenizer, allowing the model's whole vocabulary (padded past the
        # tokenizer's: those tokens are never allowed) and ending on its EOS tokens
        self.grammars = Grammars(tokenizer, vocab_size=model.args.vocab_size, stop_ids=eos_ids)
        if fuse and graphs is False:
            raise ValueError("fuse needs captured decode steps: leave graphs on (None) or True")

    @classmethod
    def from_hf(
        cls, hf_model: Any, tokenizer: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Engine:
        """From an in-memory transformers model (tests, parity checks): its weights are copied into our stacks."""
        from server.model.weights import transformer_from_hf

        model = transformer_from_hf(hf_model, dtype=dtype or default_dtype(device), device=device)
        return cls(model, tokenizer, eos_ids=_eos_ids(hf_model, tokenizer), config=hf_model.config, **kwargs)

    @classmethod
    def from_loaded(cls, loaded: Any, **kwargs: Any) -> Engine:
        """From `server.model.loader.load_model`'s result (weights already on their device, in their dtype)."""
        from server.model.model import ModelArgs

        w = loaded.weights
        model = Transformer(ModelArgs.from_hf_config(loaded.config), w, dtype=w.embed.dtype, device=w.embed.device)
        return cls(model, loaded.tokenizer, eos_ids=loaded.eos_token_ids, config=loaded.config,
                   name=kwargs.pop("name", loaded.name), **kwargs)

    @property
    def decode_attention(self) -> AttentionMode:
        """The decode-attention path this engine's batches take ("auto" resolved on this device)."""
        return resolve_attention(self.attention, self.model)

    @property
    def num_layers(self) -> int:
        return self.model.args.n_layers

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.model.args.dim

    @property
    def max_model_len(self) -> int:
        return self.model.args.max_position

    def use_device(self) -> None:
        """Make the model's GPU the calling thread's current CUDA device (a no-op off CUDA). Triton launches, CUDA
        events and graph capture follow the current device, not the tensors': with the model on cuda:1 and no
        device set, they ran on GPU 0 (the current device is per thread)."""
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)

    def compile(self, policy: Policy | str | dict | None) -> Schedule:
        return compile_schedule(as_policy(policy), self.num_layers)

    def encode(self, prompt: str | list[int], *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt (see `server.engine.served.encode`)."""
        return encode(self.tokenizer, prompt, add_special_tokens=add_special_tokens)

    def kv_bytes_per_slot_token(self) -> int:
        a = self.model.args
        return 2 * a.n_kv_heads * a.head_dim * torch.empty((), dtype=self.model.dtype).element_size()

    def new_sequence(self, prompt: str | list[int], params: SamplingParams, schedule: Schedule, *,
                     arrival: float | None = None, id: str | None = None) -> Request:
        """A request ready to run (offline use; the engine loop's requests come from HTTP and are `start`ed)."""
        request = Request(id or f"seq-{next(_ids)}", self.encode(prompt), params, schedule)
        if arrival is not None:
            request.arrival = arrival
        return self.start(request)

    def start(self, request: Request) -> Request:
        """Give a request what running needs: its stop tokens, its own seeded generator on the model's device, its
        bad words' tokens and a structured output's matcher unless it came with them (the server encodes and
        compiles at admission, off this thread)."""
        params = request.params = request.params.with_bad_words_ids(functools.partial(encode_word, self.tokenizer))
        request.stop_ids = params.stop_ids(self.eos_ids)
        request.generator = make_generator(params.seed, self.model.device)
        if params.structured is not None and request.grammar is None:
            request.grammar = self.grammars.matcher(params.structured)
        return request

    def new_batch(self, *, max_len: int, num_blocks: int, block_size: int | None = None,
                  prefix_caching: bool = False, prefix_blocks: int | None = None,
                  prefill_tokens: int | None = None, speculation: Speculation | None = None) -> Batch:
        return Batch(self.model, self.tokenizer, max_len=max_len, num_blocks=num_blocks,
                     block_size=block_size or self.block_size, group_mode=self.group_mode, attention=self.attention,
                     graphs=self.graphs, fuse=self.fuse, overlap=self.overlap,
                     prefix_caching=prefix_caching, prefix_blocks=prefix_blocks, prefill_tokens=prefill_tokens,
                     speculation=speculation or self.speculation)

    def generate(
        self, prompts: list[str | list[int]] | str, *,
        policy: Policy | str | dict | None | list[Policy | str | dict | None] = None,
        params: SamplingParams | None = None, batch: Batch | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt, all decoded together in one batch. `policy` is one policy for all prompts or
        a list with one per prompt (any mix). batch: an empty batch to run in (its KV pool must hold them all), so
        that calls share what it keeps (compiled programs, captured graphs); default a new one sized to fit."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params or SamplingParams()
        policies = policy if isinstance(policy, list) else [policy] * len(prompts)
        assert len(policies) == len(prompts), "one policy per prompt"
        seqs = [self.new_sequence(p, params, self.compile(pol)) for p, pol in zip(prompts, policies)]
        max_len = max(len(s.prompt_ids) for s in seqs) + max(params.max_tokens, 1)
        if batch is None:
            blocks = sum(-(-max_len // self.block_size) * s.schedule.num_slots for s in seqs)
            batch = self.new_batch(max_len=max_len, num_blocks=blocks + 1)
        assert not batch.sequences, "generate needs an empty batch"
        batch.add(seqs)
        batch.filter()
        while batch.busy:
            batch.step()
            batch.filter()
        return [s.result() for s in seqs]

    def probe(self, prompts: list[str | list[int]], *, policy: Policy | str | dict | None = None) -> ProbeStats:
        """Layer statistics of one forward pass of `prompts` under `policy` (see `server.engine.probe`)."""
        schedule = self.compile(policy)
        ids = [self.encode(p) for p in prompts]
        blocks = sum(-(-len(p) // self.block_size) for p in ids) * schedule.num_slots
        batch = self.new_batch(max_len=max(len(p) for p in ids), num_blocks=blocks + 1)
        return batch.probe(ids, schedule)

    def embed(self, prompts: list[str | list[int]], *, policy: Policy | str | dict | None = None
              ) -> list[list[float]]:
        """Each prompt's embedding under `policy` (`Batch.embed`)."""
        schedule = self.compile(policy)
        ids = [self.encode(p) for p in prompts]
        blocks = sum(-(-len(p) // self.block_size) for p in ids) * schedule.num_slots
        batch = self.new_batch(max_len=max(len(p) for p in ids), num_blocks=blocks + 1)
        return batch.embed(ids, schedule)


def _eos_ids(hf_model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(hf_model.generation_config, "eos_token_id", None), hf_model.config.eos_token_id,
                   getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(source)
    return frozenset(ids)
