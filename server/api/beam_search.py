"""Beam search (vLLM's `use_beam_search`), served above the engine as vLLM v1 serves it (`BeamSearchOnlineMixin.
beam_search` in vllm/entrypoints, `get_beam_search_score` in vllm/beam_search.py).

Each step asks the engine for one token per live beam, with 2 x width logprobs (of the tokens the beam may take, when
the request limits them), as ordinary requests through the pipeline: under the request's layer policy, and the prefix
cache computes each beam's repeated prompt once. The best `width` continuations by cumulative logprob live on; one
that chooses an EOS ends its beam (unless `ignore_eos`); after `max_tokens` steps the ended and the live beams are
ranked by cumulative logprob / length ** length_penalty, the length counting the prompt (vLLM's). The `width` best
are the choices. The search is one task per API request; each returned beam is a `pipeline.Stream` whose single
output is its final result, so the routes answer (and stream: the final result only, as vLLM does) as for any
request, and aborting a beam's stream cancels the search and its in-flight steps. The search is an engine `Series`:
a drain that begins mid-search lets it run on, and at the drain's deadline it ends with its beams so far, the live
ones with finish_reason "abort" (vLLM's `_beam_search_step` on an aborted step).

A structured output limits each step to what the beam may take (vLLM's beam search honours it:
`_build_online_so_params`, `get_beam_allowed_token_ids` in vllm/entrypoints), scored by the model's logprobs over the
whole vocabulary. It is checked and compiled once, as any request's. Each live beam holds an xgrammar matcher of its
own at its place in the grammar, forked for each continuation it spawns (xgrammar's `fork`, where vLLM replays a
fresh grammar over each beam's tokens at every step); each step's request follows a fork of it, so the engine's
grammar mask limits its candidates. A guided_choice's beams follow its choices' own token sequences instead (vLLM's
`ChoiceTrie`: `server.api.choice_trie`), so that they are distinct choices. A structured beam ends "stop" on the EOS
it may take where its output is complete."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

from server.api import pipeline
from server.api.choice_trie import ChoiceTrie
from server.api.errors import GENERATION_FAILED, APIError
from server.api.pipeline import Job, Prompt, Running
from server.api.protocol import BEAM_WIDTH
from server.api.state import AppState
from server.engine.request import GenerationResult, Output, Timings
from server.engine.sampling_params import LOGPROBS, SamplingParams
from server.engine.scheduler import DrainingError
from server.metrics import RequestStats

if TYPE_CHECKING:
    from server.engine.grammar import Matcher
    from server.engine.loop import Series
    from server.engine.served import ServedModel

# Sampling fields that would change which tokens a beam may take, or what is scored: beam search ranks the model's
# own logprobs, and vLLM's passes none of these to its steps (it ignores them silently; here they are a 400).
# temperature, top_p, top_k, min_p and seed are accepted and change nothing: no step draws. allowed_token_ids and
# structured outputs are served: each step's candidates are the likeliest tokens the beam may take, scored by their
# logprobs over the whole vocabulary (vLLM's beam search restricts its steps so for structured outputs:
# `_build_online_so_params` gives each step the grammar's `allowed_token_ids`, and `_beam_search_step` keeps the
# allowed tokens among the returned logprobs, which are the raw ones).
_REFUSED = ("stop", "stop_token_ids", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "logit_bias", "bad_words", "echo", "prompt_logprobs")
_NEUTRAL = {f.name: f.default for f in fields(SamplingParams)}


@dataclass
class Beam:
    """One hypothesis: the tokens generated so far (prompt excluded; an EOS that ended it is the last)."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # each token's
    tops: list[dict[int, float]] = field(default_factory=list)  # each step's likeliest tokens, likeliest first
    cum_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" once it chose an EOS
    # a live beam's place in its structured output's grammar, its own (None without one, and once it ended)
    grammar: Matcher | None = field(default=None, repr=False)


def score(beam: Beam, *, prompt_len: int, eos_ids: frozenset[int], length_penalty: float) -> float:
    """vLLM's get_beam_search_score: cumulative logprob / length ** length_penalty, the length counting the prompt
    and not a final EOS."""
    length = prompt_len + len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in eos_ids else 0)
    return beam.cum_logprob / max(length, 1) ** length_penalty


@dataclass
class Search:
    """One prompt's beam search as plain data: `advance` takes a step's logprobs, `best` ranks the beams."""

    prompt_len: int
    max_tokens: int
    width: int
    eos_ids: frozenset[int]
    length_penalty: float = 1.0
    ignore_eos: bool = False
    structured: bool = False  # its beams follow a structured output: an EOS they take ends them, ignore_eos or not
    choices: ChoiceTrie | None = None  # a guided_choice's token sequences, which its beams' steps are limited to
    live: list[Beam] = field(default_factory=lambda: [Beam()])
    ended: list[Beam] = field(default_factory=list)
    steps: int = 0
    generated: int = 0  # tokens the engine generated for it: one per live beam per step
    aborted: bool = False  # cut short by the drain's deadline (`abort`)

    @property
    def done(self) -> bool:
        return not self.live or self.steps >= self.max_tokens

    def advance(self, tops: list[dict[int, float]]) -> None:
        """tops[i]: live beam i's next-token logprobs (at least its 2 x width likeliest, of the tokens it may take:
        -inf for one it may not). The likeliest EOS among a beam's 2 x width likeliest ends a copy of it, once: a
        model with several EOS tokens (SmolLM2's <|endoftext|> and <|im_end|>) would otherwise end the same text
        twice, as a grammar that allows them all where it is complete would at every beam (vLLM knows one EOS). A
        structured beam ends there whether or not ignore_eos (vLLM's beam whose grammar terminated is completed). Of
        the other continuations, the `width` likeliest live on, each with its own fork of its beam's grammar."""
        assert len(tops) == len(self.live) and not self.done
        self.generated += len(tops)
        candidates: list[tuple[float, int, float, Beam, dict[int, float]]] = []  # (cum, token, its logprob, ...)
        for beam, top in zip(self.live, tops, strict=True):
            top = {token: logprob for token, logprob in top.items() if logprob > -math.inf}  # fewer allowed tokens
            likeliest = sorted(top.items(), key=lambda kv: -kv[1])[:2 * self.width]
            ends = not self.ignore_eos or self.structured
            ended = False
            for token, logprob in likeliest:
                cum = beam.cum_logprob + logprob
                if token in self.eos_ids and ends:
                    if not ended:
                        self.ended.append(_extend(beam, token, logprob, cum, top, finish_reason="stop"))
                    ended = True
                else:
                    candidates.append((cum, token, logprob, beam, top))
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep the beams' order
        self.live = [_extend(beam, token, logprob, cum, top, grammar=_follow(beam.grammar, token))
                     for cum, token, logprob, beam, top in candidates[:self.width]]
        self.steps += 1

    def params(self, beam: Beam, step: SamplingParams) -> SamplingParams:
        """A live beam's step: `step`, limited to the tokens that continue or end its choice under a guided_choice."""
        if self.choices is None:
            return step
        allowed = self.choices.allowed(beam.tokens)
        assert allowed, beam.tokens  # it took only tokens the tree allowed
        return replace(step, allowed_token_ids=allowed, top_from_allowed=True)

    def abort(self) -> None:
        """End the live beams as they are, with finish_reason "abort" (the drain's deadline passed)."""
        self.ended += [replace(beam, finish_reason="abort") for beam in self.live]
        self.live, self.aborted = [], True

    def best(self) -> list[Beam]:
        """The `width` best of the ended and live beams, best first."""
        return sorted(self.ended + self.live, reverse=True, key=lambda b: score(
            b, prompt_len=self.prompt_len, eos_ids=self.eos_ids, length_penalty=self.length_penalty))[:self.width]


def _extend(beam: Beam, token: int, logprob: float, cum: float, top: dict[int, float], *,
            finish_reason: str | None = None, grammar: Matcher | None = None) -> Beam:
    return Beam(beam.tokens + [token], beam.logprobs + [logprob], beam.tops + [top], cum, finish_reason, grammar)


def _follow(grammar: Matcher | None, token: int) -> Matcher | None:
    """A fork of a beam's grammar advanced by `token`, the place of a continuation that takes it."""
    if grammar is None:
        return None
    fork = grammar.fork()
    accepted = fork.accept(token)
    assert accepted, f"a candidate its grammar does not allow: {token}"  # candidates come from the grammar's mask
    return fork


# -- serving --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """What the request asks of the returned beams, beyond the search."""

    logprobs: int | None  # alternatives per token to return (None: no logprobs)
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    structured: str | None  # the field of the structured output the beams follow, if any


async def start(state: AppState, job: Job, *, length_penalty: float) -> Running:
    """Check and prepare `job` as a beam search of width job.n, submit its first step (so that a refusal, 429 or 503
    comes before any answer), and run the rest in a task. The returned job's streams are its beams, prompt-major."""
    params = job.params(1, 0)
    _check(params, width=job.n)
    ready = await pipeline.prepare(state, job)
    served, loop = state.require()
    params.check_model(served.vocab_size, served.eos_ids)  # allowed_token_ids within the vocabulary, or a 400
    longest = loop.longest(ready.schedule)
    for prompt, max_tokens in zip(ready.prompts, ready.max_tokens, strict=True):
        if max_tokens < 1:
            raise APIError(400, "use_beam_search needs max_tokens >= 1", param="max_tokens")
        if len(prompt.ids) + max_tokens > longest:  # the last step's request must fit, as a whole request would
            raise APIError(400, f"prompt ({len(prompt.ids)} tokens) + max_tokens ({max_tokens}) is more than the "
                                f"{longest} tokens the KV budget holds for a request under policy "
                                f"{ready.schedule.policy}; lower max_tokens or choose a policy that runs fewer "
                                "layers", param="max_tokens", code="kv_budget_exceeded")
    # checked and compiled as any request's structured output (its deadline and slots; a 400 where it does not
    # compile); a guided_choice's beams follow its token sequences instead (vLLM's ChoiceTrie): distinct choices
    spec = params.structured
    grammar = None if spec is None else await pipeline.compile_grammar(served, spec)
    choices = None
    if spec is not None and spec.kind == "choice":
        choices, grammar = ChoiceTrie.build(spec.spec, lambda text: served.tokenize(text, add_special_tokens=False),
                                            stop_ids=served.eos_ids), None
    searches = [Search(len(p.ids), m, job.n, served.eos_ids, length_penalty, params.ignore_eos,
                       structured=spec is not None, choices=choices,
                       live=[Beam(grammar=None if grammar is None else grammar.matcher())])
                for p, m in zip(ready.prompts, ready.max_tokens, strict=True)]
    # one token, with the 2 x width likeliest (or as many as the answer returns, if more) of those it may take, and
    # their logprobs
    allowed = params.allowed_token_ids
    step = SamplingParams(max_tokens=1, temperature=0.0, logprobs=max(2 * job.n, params.logprobs or 0), ignore_eos=True,
                          allowed_token_ids=allowed, structured=None if grammar is None else spec,
                          top_from_allowed=allowed is not None or grammar is not None)
    began = time.perf_counter()
    try:  # from here on a drain counts the search as running, between its steps too
        series = loop.open_series()
    except DrainingError:
        raise state.draining_error() from None
    try:
        first = _submit(state, job.prefix, ready, searches, step, series)
    except BaseException:
        loop.close_series(series)
        raise
    shape = _Shape(params.logprobs, params.include_stop_str_in_output, params.skip_special_tokens,
                   None if spec is None else spec.param)
    task = asyncio.ensure_future(_run(state, job.prefix, ready, searches, step, first, shape, began, series))

    def ended(t: asyncio.Future[list[list[GenerationResult]]]) -> None:
        # however the search ended; a task cancelled before its first step never ran `_run`, so its first step
        # ends here too
        loop.close_series(series)
        if t.cancelled():
            for s in first:
                s.abort()
        else:
            t.exception()  # read by the beams; never "never retrieved"
    task.add_done_callback(ended)
    beams: list[pipeline.Stream] = [BeamStream(task, p, i) for p in range(len(searches)) for i in range(job.n)]
    return Running(ready.schedule, ready.prompts, beams, job.n)


def _check(params: SamplingParams, *, width: int) -> None:
    if width > BEAM_WIDTH:
        raise APIError(400, f"use_beam_search takes n (the beam width) up to {BEAM_WIDTH}: each step asks for 2 x n "
                            f"logprobs, and at most {int(LOGPROBS.hi)} are served (as vLLM's max_logprobs); got "
                            f"n={width}", param="n")
    for name in _REFUSED:
        if getattr(params, name) != _NEUTRAL[name]:
            raise APIError(400, f"{name} is not supported with use_beam_search (beam search ranks the model's own "
                                "logprobs); leave it out, or send use_beam_search false", param=name)
    allowed = params.allowed_token_ids
    if allowed is not None and len(set(allowed)) < width:
        raise APIError(400, f"use_beam_search with allowed_token_ids needs at least n ({width}) distinct token ids, "
                            f"got {len(set(allowed))}: each step keeps the n likeliest continuations, and fewer ids leave "
                            "fewer beams; allow more tokens or lower n", param="allowed_token_ids")
    spec = params.structured
    if spec is not None and spec.kind == "choice":
        if len(set(spec.spec)) < width:
            raise APIError(400, f"use_beam_search with {spec.param} needs at least n ({width}) distinct choices, "
                                f"got {len(set(spec.spec))}: each beam is one of them; send more choices or lower n",
                           param=spec.param)
        if allowed is not None:
            raise APIError(400, f"use_beam_search with {spec.param} takes no allowed_token_ids: its beams take the "
                                "choices' own tokens; leave allowed_token_ids out", param="allowed_token_ids")


def _submit(state: AppState, prefix: str, ready: pipeline.Prepared, searches: list[Search], step: SamplingParams,
            series: Series) -> list[pipeline.RequestStream]:
    """One step: a one-token request for each live beam of each unfinished search, in that order; a structured
    beam's follows a fork of its grammar (the engine advances it by the token it draws: the beam's stays put)."""
    requests = [pipeline.engine_request(pipeline.new_request_id(f"{prefix}-beam"), prompt.ids + beam.tokens,
                                        search.params(beam, step), ready.schedule,
                                        grammar=None if beam.grammar is None else beam.grammar.fork(), counted=False,
                                        priority=ready.priority, cache_salt=ready.cache_salt)
                for prompt, search in zip(ready.prompts, searches, strict=True) if not search.done
                for beam in search.live]
    return pipeline.submit_all(state, requests, series=series)


async def _run(state: AppState, prefix: str, ready: pipeline.Prepared, searches: list[Search], step: SamplingParams,
               streams: list[pipeline.RequestStream], shape: _Shape, began: float,
               series: Series) -> list[list[GenerationResult]]:
    """The search from its first step on (already submitted: `streams`): the searches' best beams as results, per
    prompt. Timed as a request whose tokens are the steps: the first step's queue and prefill, then one token per
    step. Each prompt's search is observed in the metrics as one request (`_observe`), its steps as none. The
    series closes when the task ends, however it ends (`start`'s done callback)."""
    timings: list[Timings] = []
    try:
        results = await _search(state, prefix, ready, searches, step, streams, shape, began, timings, series)
    except BaseException as e:
        _observe(state, ready, searches, timings, began, "abort" if isinstance(e, asyncio.CancelledError) else "error")
        raise
    _observe(state, ready, searches, timings, began, None)
    return results


def _observe(state: AppState, ready: pipeline.Prepared, searches: list[Search], timings: list[Timings],
             began: float, reason: str | None) -> None:
    """Each prompt's search as one request in the metrics, as a client sees it: its prompt once, the tokens the
    engine generated for it, the first step's queue and prefill, one inter-token time per step, and the best beam's
    finish reason (or `reason`: abort, error). vLLM counts every step of every beam as a request of its own (its
    beam search calls generate per beam per step), as these steps were: a width-3 search of 10 tokens after a 5-token
    prompt was 28 one-token requests and 275 prompt tokens in its policy's request, token and latency series."""
    now = time.perf_counter()
    for prompt, search, t in itertools.zip_longest(ready.prompts, searches, timings):
        t = t or Timings(queue_s=now - began)
        best = reason or ("abort" if search.aborted else search.best()[0].finish_reason or "length")
        state.metrics.observe_request(RequestStats(
            policy=ready.schedule.policy, finished_reason=best, prompt_tokens=len(prompt.ids),
            generation_tokens=search.generated, queue_s=t.queue_s, prefill_s=t.prefill_s, decode_s=t.decode_s,
            ttft_s=t.ttft_s, e2e_s=now - began, per_token_s=tuple(t.per_token_s)))


async def _search(state: AppState, prefix: str, ready: pipeline.Prepared, searches: list[Search], step: SamplingParams,
                  streams: list[pipeline.RequestStream], shape: _Shape, began: float, timings: list[Timings],
                  series: Series) -> list[list[GenerationResult]]:
    """`_run`'s search; `timings` (empty) gets each prompt's once its first step is in. At the drain's deadline
    (its step ended with "abort", or its series was cut before the next step) the unfinished searches end with
    their beams so far (`Search.abort`)."""
    served, _ = state.require()
    while True:
        results = await _step(streams)
        now = time.perf_counter()
        if results is None:  # the drain's deadline ended the step: it counts for nothing
            break
        if not timings:  # the first step is one request per prompt
            timings += [Timings(queue_s=r.timings.queue_s, prefill_s=r.timings.prefill_s, ttft_s=now - began)
                        for r in results]
            for t in timings:
                t.first_token(now)
        at = 0
        for search, t in zip(searches, timings, strict=True):
            if search.done:  # it had no request in this step
                continue
            n = len(search.live)
            search.advance([r.top_logprobs[0] for r in results[at:at + n]])  # type: ignore[index]
            at += n
            if search.steps > 1:
                t.add_token(now)
        if all(s.done for s in searches):
            break
        try:
            streams = _submit(state, prefix, ready, searches, step, series)
        except APIError:
            if not series.cut:  # a 429, a 400: the search fails; a 503 only once the drain's deadline cut it
                raise
            break
    now = time.perf_counter()
    timings += [Timings(queue_s=now - began) for _ in range(len(searches) - len(timings))]  # cut before a step
    answers = []
    for prompt, search, t in zip(ready.prompts, searches, timings, strict=True):
        if not search.done:
            search.abort()
        beams = search.best()
        if len(beams) < search.width and not search.aborted:  # a grammar whose outputs, as tokens, are fewer
            assert shape.structured is not None, (len(beams), search.width)
            raise APIError(400, f"the structured output ({shape.structured}) admits only {len(beams)} outputs "
                                f"(token sequences) here, fewer than n ({search.width}) beams; lower n",
                           param=shape.structured)
        # only a search cut before it had `width` beams has fewer: the rest answer as choices cut before their
        # first token do
        beams += [Beam(finish_reason="abort") for _ in range(search.width - len(beams))]
        answers.append([_result(served, prompt, beam, shape, policy=ready.schedule.policy, timings=t)
                        for beam in beams])
    return answers


async def _step(streams: list[pipeline.RequestStream]) -> list[GenerationResult] | None:
    """Each step request's result, or None when the drain's deadline ended the step (its requests ended with
    "abort"; a client's going away cancels this instead); all aborted if this is cancelled or one fails."""
    try:
        results = [out.result for s in streams async for out in s if out.finished]
    except BaseException:
        for s in streams:
            s.abort()
        raise
    if any(r is not None and r.finish_reason == "abort" for r in results):
        return None
    for r in results:
        if r is None or not r.top_logprobs:
            why = "it was aborted" if r is None or r.finish_reason == "abort" else r.error or r.finish_reason
            raise APIError(500, f"a beam search step ended without a token: {why}", code=GENERATION_FAILED)
    return results  # type: ignore[return-value]


def _result(served: ServedModel, prompt: Prompt, beam: Beam, shape: _Shape, *, policy: str,
            timings: Timings) -> GenerationResult:
    """A beam as a choice. An EOS that ended it is left out of its tokens, logprobs and usage unless
    include_stop_str_in_output (vLLM's beam search); its text is the tokens' (special tokens' text as
    skip_special_tokens says)."""
    n = len(beam.tokens)
    if beam.finish_reason == "stop" and not shape.include_stop_str_in_output:
        n -= 1
    tokens = beam.tokens[:n]
    tops = None
    if shape.logprobs:
        tops = [dict(itertools.islice(top.items(), shape.logprobs)) for top in beam.tops[:n]]
    return GenerationResult(
        text=served.decode(tokens, skip_special_tokens=shape.skip_special_tokens), prompt_token_ids=prompt.ids,
        token_ids=tokens, logprobs=beam.logprobs[:n], top_logprobs=tops, prompt_logprobs=None,
        prompt_top_logprobs=None, finish_reason=beam.finish_reason or "length", policy=policy, timings=timings)


class BeamStream:
    """One returned beam as a `pipeline.Stream`: a single, finished output once the search is over. Aborting it
    cancels the whole search (its beams are answered together, or not at all)."""

    def __init__(self, search: asyncio.Future[list[list[GenerationResult]]], prompt: int, index: int) -> None:
        self.search, self.prompt, self.index = search, prompt, index

    def abort(self) -> None:
        self.search.cancel()

    async def __aiter__(self) -> AsyncIterator[Output]:
        # shielded: one beam's reader going away must not cancel the search the others wait for (abort does)
        result = (await asyncio.shield(self.search))[self.prompt][self.index]
        yield Output(request_id=f"beam-{self.prompt}-{self.index}", token_ids=result.token_ids,
                     logprobs=result.logprobs, top_logprobs=result.top_logprobs or [], text=result.text,
                     finished=True, result=result)
