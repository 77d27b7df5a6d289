"""Accuracy per layer policy over the HTTP API, scored the way lm-evaluation-harness scores, and its statistics.

lm-eval's three request types become /v1/completions calls: loglikelihood (echo=True, logprobs=1, max_tokens=0;
the continuation's tokens are the tail after len(tokenize(context)), its greedy flag compares each token's logprob
with the top-1), loglikelihood_rolling (token-id windows of the server's max length) and generate_until (greedy, with
stop strings). Items are scored concurrently (a semaphore of `concurrency`) so the server batches them; the choices
of one question go in one request as a list prompt. Results are keyed by the server's canonical policy name.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
from rich.progress import Progress, TaskID

from clients.client import AsyncPaintersClient, PaintersError, Policy
from clients.console import Column, TextTable, VerboseOpt, err, fail, progress_bar, quiet_http_logs
from clients.console import console as out
from clients.tasks import (
    Cloze,
    DataError,
    Document,
    Generation,
    MultipleChoice,
    Task,
    extract_final_number,
    extract_strict_answer,
    load_task,
    task_names,
)
from clients.types import CompletionLogprobs, CompletionResponse

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

FULL = "full"
GREEDY_TOLERANCE = 1e-6  # a token's logprob and the top-1 come from the same log-softmax row


class EvalError(RuntimeError):
    """The evaluation cannot run (server unreachable, a policy rejected); the message says how to fix it."""


# -- statistics ------------------------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's `mean_stderr`: sample standard deviation / sqrt(n); for 0/1 values sqrt(p(1-p)/(n-1))."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1) / n)


def ratio_estimate(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """mean(x) / mean(y) over the same items, and its standard error by the ratio's linearisation per item,
    u_i = (x_i - R y_i) / mean(y): paired, so what the items share cancels (delta method, as in survey sampling)."""
    assert len(x) == len(y)
    n = len(x)
    if n == 0:
        return None, None
    my = sum(y) / n
    if math.isclose(my, 0.0, abs_tol=1e-12):
        return None, None
    r = sum(x) / n / my
    u = [(a - r * b) / my for a, b in zip(x, y)]
    return r, mean_stderr(u)


def normalized_paired(scores: Sequence[float], full: Sequence[float], random: float
                      ) -> tuple[float | None, float | None]:
    """The normalised score of per-item `scores` against the full model's on the same items, with its paired
    standard error (the full model's own noise included)."""
    return ratio_estimate([s - random for s in scores], [f - random for f in full])


def normalized_difference(a: Sequence[float], b: Sequence[float], full: Sequence[float], random: float
                          ) -> tuple[float | None, float | None]:
    """Normalised score of a minus that of b, all three on the same items: (A - B) / (F - random), paired."""
    return ratio_estimate([x - y for x, y in zip(a, b)], [f - random for f in full])


def normalized_score(accuracy: float | None, full: float | None, random: float) -> float | None:
    """The paper's normalised score: 0 = random guessing, 1 = the full model. None where the full model does not
    beat chance: below it the scale inverts (a variant worse than the full model would score above 1)."""
    if accuracy is None or full is None or full - random <= 1e-12:
        return None
    return (accuracy - random) / (full - random)


def argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (numpy's tie rule, as lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def gold_probability(lls: Sequence[float], gold: int) -> float:
    """softmax(lls)[gold]: how much of the choices' probability the right one holds."""
    top = max(lls)
    weights = [math.exp(x - top) for x in lls]
    return weights[gold] / sum(weights)


def multiple_choice_hits(lls: Sequence[float], item: MultipleChoice) -> tuple[float, float]:
    """(acc, acc_norm) of one question: argmax of the loglikelihoods, and of them divided by each choice's length."""
    acc = float(argmax(lls) == item.gold)
    acc_norm = float(argmax([ll / max(n, 1) for ll, n in zip(lls, item.choice_lengths)]) == item.gold)
    return acc, acc_norm


def exp_or_inf(x: float) -> float:
    """exp for perplexities, which may be astronomically large for a broken policy."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


@dataclass(frozen=True)
class TaskResult:
    """One task under one policy. `accuracy` is None for perplexity-only tasks (wikitext)."""

    task: str
    policy: str
    n: int
    accuracy: float | None
    stderr: float | None
    random_baseline: float
    normalized: float | None = None  # filled once the full model's accuracy is known
    metrics: dict[str, float | None] = field(default_factory=dict)
    source: str = ""
    seconds: float = 0.0
    scores: tuple[float, ...] = field(default=(), repr=False)  # each item's accuracy (0/1), in item order
    # each item's probability of its gold answer: among the choices (softmax of their loglikelihoods), or of the
    # cloze continuation; a continuous score with far less variance than the 0/1 accuracy
    soft: tuple[float, ...] = field(default=(), repr=False)

    def to_json(self, *, with_scores: bool = False) -> dict[str, Any]:
        return {"task": self.task, "policy": self.policy, "n": self.n, "accuracy": self.accuracy,
                "stderr": self.stderr, "random_baseline": self.random_baseline, "normalized": self.normalized,
                **{k: _finite(v) for k, v in self.metrics.items()}, "data": self.source,
                "seconds": round(self.seconds, 3),
                **({"scores": list(self.scores), "soft": list(self.soft)} if with_scores else {})}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TaskResult:
        """The inverse of `to_json(with_scores=True)` (metrics are the keys it does not name)."""
        named = {"task", "policy", "n", "accuracy", "stderr", "random_baseline", "normalized", "data", "seconds",
                 "scores", "soft"}
        return cls(task=obj["task"], policy=obj["policy"], n=obj["n"], accuracy=obj["accuracy"],
                   stderr=obj["stderr"], random_baseline=obj["random_baseline"], normalized=obj["normalized"],
                   metrics={k: v for k, v in obj.items() if k not in named}, source=obj.get("data", ""),
                   seconds=obj.get("seconds", 0.0), scores=tuple(obj.get("scores", ())),
                   soft=tuple(obj.get("soft", ())))


@dataclass(frozen=True)
class EvalResult:
    """Every policy's results: canonical policy -> task -> TaskResult (policies and tasks in the order run)."""

    results: dict[str, dict[str, TaskResult]]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(t for per_task in self.results.values() for t in per_task))

    def to_json(self) -> dict[str, Any]:
        """One task: {policy: result}; several: {policy: {task: result}}."""
        if len(self.tasks) == 1:
            return {p: next(iter(r.values())).to_json() for p, r in self.results.items()}
        return {p: {t: r.to_json() for t, r in per_task.items()} for p, per_task in self.results.items()}

    def table(self, title: str | None = None) -> TextTable:
        t = TextTable([Column("task"), Column("policy", keep_whole=True), Column("n"),
                       *(Column(name, "right") for name in ("acc ± stderr", "acc_norm", "random", "normalised",
                                                            "other"))], title=title)
        for per_task in self.results.values():
            for r in per_task.values():
                pm = "-" if r.accuracy is None else f"{r.accuracy:.4f}" + (
                    f" ± {r.stderr:.4f}" if r.stderr is not None else "")
                norm = r.metrics.get("acc_norm")
                other = ", ".join(f"{k} {v:.3f}" for k, v in r.metrics.items()
                                  if v is not None and ("perplexity" in k or k in ("bits_per_byte", "acc_strict")))
                t.add_row(r.task, r.policy, str(r.n), pm, "-" if norm is None else f"{norm:.4f}",
                          f"{r.random_baseline:.3f}", "-" if r.normalized is None else f"{r.normalized:.3f}", other)
        return t


def with_normalized(results: dict[str, dict[str, TaskResult]]) -> dict[str, dict[str, TaskResult]]:
    """Fill `normalized` (and normalized_acc_norm) relative to the `full` policy's results, when it was run."""
    full = results.get(FULL, {})
    out: dict[str, dict[str, TaskResult]] = {}
    for policy, per_task in results.items():
        out[policy] = {}
        for task, r in per_task.items():
            ref = full.get(task)
            metrics = dict(r.metrics)
            if "acc_norm" in metrics and ref is not None:
                metrics["normalized_acc_norm"] = normalized_score(metrics["acc_norm"], ref.metrics.get("acc_norm"),
                                                                  r.random_baseline)
            out[policy][task] = replace(r, metrics=metrics, normalized=normalized_score(
                r.accuracy, ref.accuracy if ref else None, r.random_baseline))
    return out


# -- talking to the server -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loglikelihood:
    """log P(continuation | context), whether every continuation token was the argmax, and how many tokens."""

    logprob: float
    is_greedy: bool
    tokens: int


@dataclass(frozen=True)
class ServerInfo:
    max_len: int  # prompt tokens per request, at most
    prefix_id: int  # conditions the first token of a document (lm-eval: BOS, else EOS)


def continuation_loglikelihood(logprobs: CompletionLogprobs, start: int) -> Loglikelihood:
    """Sum the echoed prompt logprobs from token `start` on; greedy when each equals its position's top-1."""
    values = logprobs.token_logprobs
    start = min(max(start, 1), len(values) - 1)  # position 0 is unscored; keep at least one continuation token
    assert start >= 1, "a prompt of one token has no scored position"
    cont = values[start:]
    tops = (logprobs.top_logprobs or [None] * len(values))[start:]
    assert all(v is not None for v in cont)
    greedy = all(top is not None and v >= max(top.values()) - GREEDY_TOLERANCE  # type: ignore[operator]
                 for v, top in zip(cont, tops))
    return Loglikelihood(logprob=sum(cont), is_greedy=greedy, tokens=len(cont))  # type: ignore[arg-type]


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves the context's trailing whitespace to the continuation before tokenizing."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def rolling_windows(tokens: Sequence[int], *, prefix: int, max_len: int) -> list[tuple[list[int], int]]:
    """lm-eval's disjoint rolling windows (context_len 1): (sequence to echo, how many tail tokens it scores).

    Every token is scored exactly once; the first is conditioned on `prefix`, every later window on the tokens
    before it. Each sequence has at most `max_len` tokens (the scored ones plus their context)."""
    assert max_len >= 2
    span = max_len - 1  # scored tokens per window: one position always holds the context
    out = []
    for start in range(0, len(tokens), span):
        scored = list(tokens[start:start + span])
        context = [prefix] if start == 0 else list(tokens[max(0, start + len(scored) - max_len):start])
        out.append((context + scored, len(scored)))
    return out


def context_too_long(e: PaintersError) -> bool:
    code = (e.body or {}).get("error", {}).get("code") if isinstance(e.body, dict) else None
    return code == "context_length_exceeded" or e.status == 413


async def retrying(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, again after a 429 (queue full) with back-off, and up to five times after a dropped connection."""
    for attempt in range(8):
        try:
            return await call()
        except PaintersError as e:
            if e.status != 429 or attempt == 7:
                raise
            await asyncio.sleep(0.5 * 2 ** attempt)
        except (httpx.ReadError, httpx.RemoteProtocolError) as e:  # a keep-alive connection the server closed
            if attempt >= 5:
                raise
            log.warning("retrying after %s: %s", type(e).__name__, e)
            await asyncio.sleep(2.0 ** attempt)
    raise AssertionError("unreachable")


class Tokens:
    """POST /tokenize with caches: token ids do not depend on the policy, so every policy reuses them."""

    def __init__(self, client: AsyncPaintersClient) -> None:
        self.client = client
        self._counts: dict[str, int] = {}
        self._ids: dict[str, list[int]] = {}

    async def ids(self, text: str, *, cache: bool = False) -> list[int]:
        if text in self._ids:
            return self._ids[text]
        ids = await retrying(lambda: self.client.tokenize(text))
        self._counts[text] = len(ids)
        if cache:
            self._ids[text] = ids
        return ids

    async def count(self, text: str) -> int:
        if text not in self._counts:
            await self.ids(text)
        return self._counts[text]


@dataclass
class Spent:
    """What the server was asked to run through a session: requests and their prompt tokens (results taken from the
    result cache cost nothing; the server's prefix cache may skip part of these tokens)."""

    requests: int = 0
    prompt_tokens: int = 0


class Scorer:
    """lm-eval's request types for one policy: loglikelihood, rolling loglikelihood windows, generate_until."""

    def __init__(self, client: AsyncPaintersClient, policy: str, info: ServerInfo, tokens: Tokens,
                 spent: Spent | None = None) -> None:
        self.client, self.policy, self.info, self.tokens = client, policy, info, tokens
        self.spent = spent if spent is not None else Spent()

    async def _complete(self, prompt: Any, **options: Any) -> CompletionResponse:
        """POST /v1/completions, retried as `retrying` says."""
        response = await retrying(lambda: self.client.completions(prompt, policy=self.policy, **options))
        self.spent.requests += 1
        self.spent.prompt_tokens += response.usage.prompt_tokens if response.usage else 0
        return response

    async def loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[Loglikelihood]:
        """log P(continuation | context) of each pair, all in one request (the choices of one question)."""
        pairs = [move_trailing_space(c, x) for c, x in pairs]
        counts = [await self.tokens.count(c) if c else 0 for c, _ in pairs]
        if all(counts):
            try:
                response = await self._complete([c + x for c, x in pairs], echo=True, logprobs=1, max_tokens=0)
            except PaintersError as e:
                if not context_too_long(e):
                    raise
            else:
                scored = [(choice.logprobs, n) for choice, n in zip(response.choices, counts)]
                # By token ids instead: a continuation that merged into the context's last token, or a prompt
                # longer than a --max-length below the server's (lm-eval truncates from the left).
                if all(lp is not None and n < len(lp.token_logprobs) <= self.info.max_len for lp, n in scored):
                    return [continuation_loglikelihood(lp, n) for lp, n in scored]  # type: ignore[arg-type]
        return await self._loglikelihoods_by_ids(pairs, counts)

    async def _loglikelihoods_by_ids(self, pairs: Sequence[tuple[str, str]], counts: list[int]
                                     ) -> list[Loglikelihood]:
        """Token-id prompts, left-truncated to the server's length (lm-eval's truncation); an empty context becomes
        the prefix token."""
        prompts, starts = [], []
        for (context, continuation), n_context in zip(pairs, counts):
            whole = await self.tokens.ids(context + continuation)
            n_cont = max(1, len(whole) - n_context)
            seq = ([self.info.prefix_id] + whole if n_cont >= len(whole) else whole)[-self.info.max_len:]
            prompts.append(seq)
            starts.append(len(seq) - min(n_cont, len(seq) - 1))
        response = await self._complete(prompts, echo=True, logprobs=1, max_tokens=0)
        return [continuation_loglikelihood(choice.logprobs, s)  # type: ignore[arg-type]
                for choice, s in zip(response.choices, starts)]

    async def window(self, sequence: list[int], scored: int) -> float:
        """Sum of the logprobs of the last `scored` tokens of `sequence`."""
        response = await self._complete(sequence, echo=True, logprobs=0, max_tokens=0)
        lps = response.choices[0].logprobs
        assert lps is not None and len(lps.token_logprobs) == len(sequence)
        return continuation_loglikelihood(lps, len(sequence) - scored).logprob

    async def generate(self, item: Generation, *, max_tokens: int) -> tuple[str, bool]:
        """Greedy text until a stop string; (text, whether the prompt was left-truncated to fit)."""
        n = await self.tokens.count(item.prompt)
        budget = min(max_tokens, self.info.max_len - 1)
        prompt: str | list[int] = item.prompt
        truncated = n + budget > self.info.max_len
        if truncated:
            prompt = (await self.tokens.ids(item.prompt))[-(self.info.max_len - budget):]
        response = await self._complete(prompt, max_tokens=budget, temperature=0.0, stop=list(item.stop))
        return response.choices[0].text, truncated


async def _server_info(client: AsyncPaintersClient, *, max_length: int | None) -> ServerInfo:
    try:
        r = await client.http.get("/tokenizer_info")
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeouts
        raise EvalError(f"cannot reach the server at {client.http.base_url}: {type(e).__name__}: {e}") from None
    if r.status_code >= 400:
        raise EvalError(f"GET /tokenizer_info answered HTTP {r.status_code}: {r.text[:200]} (is the model loaded? "
                        f"GET /ready tells)")
    info = r.json()
    server_len = int(info.get("model_max_length") or 2048)
    prefix = info.get("bos_token_id")
    prefix = info.get("eos_token_id") if prefix is None else prefix
    if max_length is not None and max_length > server_len:
        raise EvalError(f"--max-length {max_length} exceeds the server's max_model_len {server_len}")
    return ServerInfo(max_len=max_length or server_len, prefix_id=0 if prefix is None else int(prefix))


async def resolve_policy(client: AsyncPaintersClient, policy: Policy) -> str:
    """The server's canonical name for `policy` (one 1-token prefill); EvalError if it rejects the policy."""
    try:
        response = await client.completions("Hello", policy=policy, max_tokens=0)
    except PaintersError as e:
        raise EvalError(f"policy {policy!r} was rejected by the server (HTTP {e.status}): {e.message}") from None
    return response.painters.policy if response.painters else policy


# -- running a task ----------------------------------------------------------------------------------------------


class _Bar:
    """A rich progress task, or nothing."""

    def __init__(self, progress: Progress | None, description: str, total: int | None) -> None:
        self.progress = progress
        self.id: TaskID | None = progress.add_task(description, total=total) if progress else None

    def advance(self) -> None:
        if self.progress is not None and self.id is not None:
            self.progress.advance(self.id)

    def total(self, total: int) -> None:
        if self.progress is not None and self.id is not None:
            self.progress.update(self.id, total=total)

    def remove(self) -> None:
        """Finished: off the display, so a long run shows what remains rather than a wall of done bars."""
        if self.progress is not None and self.id is not None:
            self.progress.remove_task(self.id)


async def _each(items: Sequence[T], fn: Callable[[T], Awaitable[R]], semaphore: asyncio.Semaphore, bar: _Bar
                ) -> list[R]:
    """fn over every item, at most the semaphore's count at once, results in item order."""

    async def one(item: T) -> R:
        async with semaphore:
            result = await fn(item)
        bar.advance()
        return result

    return list(await asyncio.gather(*(one(item) for item in items)))


async def run_task(scorer: Scorer, task: Task, *, semaphore: asyncio.Semaphore, bar: _Bar | None = None,
                   max_gen_tokens: int = 256) -> TaskResult:
    """Score every item of `task` under the scorer's policy and summarise."""
    bar = bar or _Bar(None, task.name, None)
    t0 = time.perf_counter()
    kind = task.spec.kind
    metrics: dict[str, float | None] = {}
    soft: list[float] = []
    if kind == "multiple_choice":
        mc: list[MultipleChoice] = task.items  # type: ignore[assignment]
        lls = await _each(mc, lambda item: scorer.loglikelihoods(item.pairs), semaphore, bar)
        hits = [multiple_choice_hits([x.logprob for x in ll], item) for ll, item in zip(lls, mc)]
        acc = [h[0] for h in hits]
        soft = [gold_probability([x.logprob for x in ll], item.gold) for ll, item in zip(lls, mc)]
        if task.spec.acc_norm:
            norm = [h[1] for h in hits]
            metrics.update(acc_norm=mean(norm), acc_norm_stderr=mean_stderr(norm))
    elif kind == "cloze":
        cloze: list[Cloze] = task.items  # type: ignore[assignment]
        scored = await _each(cloze, lambda item: scorer.loglikelihoods([(item.context, item.continuation)]),
                             semaphore, bar)
        acc = [float(s[0].is_greedy) for s in scored]
        soft = [math.exp(s[0].logprob) for s in scored]
        mean_ll = mean([s[0].logprob for s in scored])
        metrics["perplexity"] = exp_or_inf(-mean_ll) if mean_ll is not None else None
    elif kind == "generation":
        gens: list[Generation] = task.items  # type: ignore[assignment]
        outs = await _each(gens, lambda item: scorer.generate(item, max_tokens=max_gen_tokens), semaphore, bar)
        acc = [float(extract_final_number(text) == item.answer) for (text, _), item in zip(outs, gens)]
        strict = [float(extract_strict_answer(text) == item.answer) for (text, _), item in zip(outs, gens)]
        metrics.update(acc_strict=mean(strict), acc_strict_stderr=mean_stderr(strict),
                       truncated_prompts=float(sum(t for _, t in outs)))
    else:
        docs: list[Document] = task.items  # type: ignore[assignment]
        metrics.update(await _perplexity(scorer, docs, semaphore=semaphore, bar=bar))
        acc = []
    accuracy = mean(acc)
    return TaskResult(task=task.name, policy=scorer.policy, n=len(task.items), accuracy=accuracy,
                      stderr=mean_stderr(acc), random_baseline=task.random_baseline, metrics=metrics,
                      source=task.source, seconds=time.perf_counter() - t0, scores=tuple(acc), soft=tuple(soft))


async def _perplexity(scorer: Scorer, docs: list[Document], *, semaphore: asyncio.Semaphore, bar: _Bar
                      ) -> dict[str, float | None]:
    """Token, word and byte perplexity (and bits per byte) over every document's rolling windows."""
    ids = await _each(docs, lambda d: scorer.tokens.ids(d.text, cache=True), semaphore, _Bar(None, "", None))
    windows = [w for doc_ids in ids
               for w in rolling_windows(doc_ids, prefix=scorer.info.prefix_id, max_len=scorer.info.max_len)]
    bar.total(len(windows))
    sums = await _each(windows, lambda w: scorer.window(*w), semaphore, bar)
    total = sum(sums)
    tokens = sum(len(i) for i in ids)
    words = sum(d.words for d in docs)
    nbytes = sum(d.bytes for d in docs)
    return {"token_perplexity": exp_or_inf(-total / tokens), "word_perplexity": exp_or_inf(-total / words),
            "byte_perplexity": exp_or_inf(-total / nbytes), "bits_per_byte": -total / nbytes / math.log(2),
            "tokens": float(tokens), "words": float(words)}


# -- the result cache -------------------------------------------------------------------------------------------


def items_digest(task: Task) -> str:
    """The items themselves (dataclass reprs), so a changed file or --limit is a different key."""
    return hashlib.sha256(repr(task.items).encode()).hexdigest()[:16]


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


FINGERPRINT_TEXT = "The quick brown fox jumps over the lazy dog, 0123456789 times."


async def model_fingerprint(client: AsyncPaintersClient) -> str:
    """What the served model computes, not what it is called: the full model's log-probabilities of a fixed text,
    rounded to 2 decimals, hashed. A served name is the alias or directory name, so another checkpoint, or the same
    one in another dtype, under the same name would read the first one's cached results. Float noise between runs
    (1e-6) almost never crosses a rounding boundary; where it does, the cost is a cache miss."""
    r = await client.completions(FINGERPRINT_TEXT, policy="full", max_tokens=0, echo=True, logprobs=0,
                                 temperature=0)
    logprobs = r.choices[0].logprobs
    values = [] if logprobs is None else [None if v is None else round(v, 2) + 0.0 for v in logprobs.token_logprobs]
    return hashlib.sha256(json.dumps([logprobs.tokens if logprobs else [], values]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ResultCache:
    """One JSON file per (model, policy, task, items, scoring settings) under `root`; what it holds is final, so a
    long run (the study, the search) resumes where it stopped. `load`/`save` keep other results the same way."""

    root: Path
    context: dict[str, Any]  # model and scoring settings that change a result

    def path(self, policy: str, task: Task) -> Path:
        key = {**self.context, "policy": policy, "task": task.name, "items": items_digest(task)}
        safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", policy)[:60]
        return self.root / task.name / f"{safe}-{_digest(key)}.json"

    def get(self, policy: str, task: Task) -> TaskResult | None:
        obj = self._read(self.path(policy, task))
        return None if obj is None else TaskResult.from_json(obj)

    def put(self, result: TaskResult, task: Task) -> None:
        self._write(self.path(result.policy, task), result.to_json(with_scores=True))

    def load(self, folder: str, key: dict[str, Any]) -> Any:
        return self._read(self.root / folder / f"{_digest({**self.context, **key})}.json")

    def save(self, folder: str, key: dict[str, Any], value: Any) -> None:
        self._write(self.root / folder / f"{_digest({**self.context, **key})}.json", value)

    @staticmethod
    def _read(path: Path) -> Any:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            log.warning("ignoring unreadable cache file %s (%s)", path, e)
            return None

    @staticmethod
    def _write(path: Path, value: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value) + "\n")
        tmp.replace(path)  # atomic: an interrupted run leaves no half-written result


class EvalSession:
    """One client, the server's facts, one semaphore and the token caches, shared by every (policy, task) scored
    through it: `evaluate`, the study and the search all score this way."""

    def __init__(self, client: AsyncPaintersClient, info: ServerInfo, *, concurrency: int,
                 max_gen_tokens: int = 256, model_id: str = "", cache: ResultCache | None = None) -> None:
        self.client, self.info, self.max_gen_tokens = client, info, max_gen_tokens
        self.model_id, self.cache = model_id, cache
        self.tokens = Tokens(client)
        self.spent = Spent()
        self.semaphore = asyncio.Semaphore(concurrency)

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, *, concurrency: int = 16, max_length: int | None = None,
                   max_gen_tokens: int = 256, model: str | None = None, api_key: str | None = None,
                   timeout: float = 600.0, cache_dir: Path | None = None) -> AsyncIterator[EvalSession]:
        """`cache_dir`: keep every (policy, task, items) result there and reuse what is already there."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        async with AsyncPaintersClient(url, model=model, api_key=api_key, timeout=timeout,
                                       max_connections=concurrency) as client:
            info = await _server_info(client, max_length=max_length)
            model_id = (await client.models())[0]["id"] if cache_dir is not None else ""
            cache = None if cache_dir is None else ResultCache(
                cache_dir, {"model": model_id, "computes": await model_fingerprint(client), "max_len": info.max_len,
                            "max_gen_tokens": max_gen_tokens})
            yield cls(client, info, concurrency=concurrency, max_gen_tokens=max_gen_tokens, model_id=model_id,
                      cache=cache)

    async def canonical(self, policy: Policy) -> str:
        return await resolve_policy(self.client, policy)

    def scorer(self, policy: str) -> Scorer:
        return Scorer(self.client, policy, self.info, self.tokens, self.spent)

    def cached(self, policy: str, task: Task) -> TaskResult | None:
        return self.cache.get(policy, task) if self.cache is not None else None

    async def score(self, policy: str, task: Task, *, progress: Progress | None = None) -> TaskResult:
        """Every item of `task` under `policy` (best given in canonical form: results are keyed by it)."""
        hit = self.cached(policy, task)
        if hit is not None:
            return hit
        bar = _Bar(progress, f"{task.name} [{policy}]", len(task.items))
        try:
            result = await run_task(self.scorer(policy), task, semaphore=self.semaphore, bar=bar,
                                    max_gen_tokens=self.max_gen_tokens)
        finally:
            bar.remove()
        if self.cache is not None:
            self.cache.put(result, task)
        return result


async def evaluate(url: str, tasks: Sequence[Task], policies: Sequence[Policy], *, concurrency: int = 16,
                   max_length: int | None = None, max_gen_tokens: int = 256, model: str | None = None,
                   api_key: str | None = None, timeout: float = 600.0, progress: Progress | None = None
                   ) -> EvalResult:
    """Every task under every policy (policies one after another, items of a task concurrently)."""
    if not policies or not tasks:
        raise ValueError("give at least one policy and one task")
    async with EvalSession.open(url, concurrency=concurrency, max_length=max_length, max_gen_tokens=max_gen_tokens,
                                model=model, api_key=api_key, timeout=timeout) as session:
        canonical: dict[str, Policy] = {}
        for policy in policies:
            name = await session.canonical(policy)
            if name in canonical:
                log.warning("policy %r is the same as %r (%s); it runs once", policy, canonical[name], name)
                continue
            canonical[name] = policy
        results: dict[str, dict[str, TaskResult]] = {}
        for name in canonical:
            results[name] = {task.name: await session.score(name, task, progress=progress) for task in tasks}
    return EvalResult(with_normalized(results))


def load_tasks(names: Sequence[str], *, data: Path | None = None, data_dir: Path | None = None,
               limit: int | None = None, num_fewshot: int = 5) -> list[Task]:
    """Tasks by name; `data` (a file) only with a single task, a directory like `data_dir`."""
    if data is not None and data.is_file() and len(names) > 1:
        raise DataError(f"--data {data} is one file but {len(names)} tasks were asked for; give one task, or a "
                        f"directory laid out like ../shared/data (--data-dir)")
    return [load_task(n, path=data, data_dir=data_dir, limit=limit, num_fewshot=num_fewshot) for n in names]


# -- `painters eval` ---------------------------------------------------------------------------------------------

def eval_command(
    task: Annotated[str, typer.Option("--task", "--tasks", "-t", help="comma-separated: lambada_openai, hellaswag, "
                                      "arc_easy, arc_challenge, piqa, winogrande, boolq, gsm8k, wikitext")],
    url: Annotated[str, typer.Option(help="the server's base URL")] = "http://127.0.0.1:8000",
    policies: Annotated[list[str] | None, typer.Option(
        "--policies", "-p", help="comma-separated policies or preset names, e.g. full,skip:8-21 (repeatable)")] = None,
    data: Annotated[Path | None, typer.Option(
        help="the task's data file (JSONL, .jsonl.gz, .arrow, text) or a directory laid out like ../shared/data")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="directory laid out like ../shared/data (lambada_openai/lambada_test.jsonl, ...)")] = None,
    limit: Annotated[int | None, typer.Option(help="the first N items of each task", min=1)] = None,
    concurrency: Annotated[int, typer.Option(help="requests in flight", min=1)] = 16,
    num_fewshot: Annotated[int, typer.Option(help="GSM8K examples in the prompt", min=0)] = 5,
    max_length: Annotated[int | None, typer.Option(
        help="tokens per request: perplexity windows, left-truncation of long prompts (default: the server's "
             "max_model_len)")
    ] = None,
    max_gen_tokens: Annotated[int, typer.Option(help="GSM8K: new tokens at most", min=1)] = 256,
    model: Annotated[str | None, typer.Option("--model", "-m", help="model name in the request body")] = None,
    api_key: Annotated[str | None, typer.Option(help="sent as 'Authorization: Bearer KEY'")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object keyed by canonical policy")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Accuracy of each policy on benchmark tasks, over the HTTP API, scored like lm-evaluation-harness."""
    from clients.loadtest import split_policies

    quiet_http_logs(verbose=verbose)
    chosen = split_policies(policies or []) or [FULL]
    try:
        tasks = load_tasks(task_names(task), data=data, data_dir=data_dir, limit=limit, num_fewshot=num_fewshot)
        with progress_bar() as bars:
            result = asyncio.run(evaluate(url, tasks, chosen, concurrency=concurrency, max_length=max_length,
                                          max_gen_tokens=max_gen_tokens, model=model, api_key=api_key,
                                          progress=bars))
    except (DataError, EvalError, PaintersError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    except httpx.HTTPError as e:  # the server went away or timed out mid-run
        raise fail(f"{url}: {type(e).__name__}: {e}") from None
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    result.table(f"eval {url}: {', '.join(t.name for t in tasks)}" + (f", first {limit} items" if limit else "")
                 ).print(out)
    if FULL not in result.results:
        err.print("[dim]normalised scores need the full model: add 'full' to --policies[/]")
