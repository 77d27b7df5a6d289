"""The load generator behind `painters loadtest` and its statistics (like `vllm bench serve`, per policy).

Policies run one after another, each after its own warm-up, so their latencies are comparable. Every request
streams /v1/completions and is timed here, on the client: TTFT (first chunk with text), inter-token latencies
(gaps between text chunks), TPOT ((e2e - ttft) / (tokens - 1)) and end-to-end latency. Requests arrive at a fixed
concurrency (closed loop) or as a Poisson process (`request_rate`), optionally capped by `concurrency`, until a
request count or a duration is reached. A request that fails is counted, never fatal; a policy the server rejects
stops the run before anything is measured.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress, TaskID

from clients.client import AsyncPaintersClient, PaintersError, Policy
from clients.console import Column, TextTable

log = logging.getLogger(__name__)

BUILTIN_PROMPTS: tuple[str, ...] = (
    "Hello!",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List three uses for a paperclip.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Explain in simple terms why the sky is blue.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the main differences between a list and a tuple in Python?",
    "Write a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time",
    "Give me a recipe for pancakes, with quantities for four people.",
    "Q: If a train travels 120 km in 1.5 hours, what is its average speed?\nA:",
    "Describe the water cycle to a ten-year-old.",
    "Compose a polite email asking a colleague to review a pull request by Friday.",
    "The three laws of thermodynamics are",
    "SELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY 2 DESC; -- explain what this query does",
    "Write a limerick about a cat who learned to code.",
    ("What should I pack for a three-day hiking trip in the mountains? Think about weather, food, water, "
     "navigation and first aid, and explain each choice briefly."),
    "Continue the list: Mercury, Venus, Earth, Mars,",
    ("You are a helpful assistant. A user writes: 'My houseplant's leaves are turning yellow and dropping, even "
     "though I water it every day and it sits by a sunny window.' Suggest what might be wrong and how to fix it."),
)


class LoadtestError(RuntimeError):
    """The run cannot start (server unreachable, a policy or prompt rejected); the message says how to fix it."""


# -- statistics -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestResult:
    """One streamed request as the client saw it; times in seconds."""

    start_s: float  # when it was sent, since the policy's measurement began
    e2e_s: float
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()
    output_tokens: int = 0
    prompt_tokens: int = 0
    policy: str | None = None  # canonical, from the final chunk's `painters.policy`
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    assert sorted_values and 0 <= q <= 100
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of one latency in seconds; None where there were no samples."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        v = sorted(values)
        if not v:
            return cls()
        return cls(len(v), sum(v) / len(v), percentile(v, 50), percentile(v, 90), percentile(v, 99))

    def to_json(self, name: str) -> dict[str, float | None]:
        """Flat fields in milliseconds: mean_ttft_ms, p50_ttft_ms, …"""
        out = {}
        for stat in ("mean", "p50", "p90", "p99"):
            value = getattr(self, stat)
            out[f"{stat}_{name}_ms"] = None if value is None else value * 1e3
        return out


@dataclass(frozen=True)
class PolicyResult:
    """One policy's measured run (warm-up excluded)."""

    policy: str  # canonical, as the server names it
    requested: str  # as given (a string form, a preset name, or JSON)
    completed: int
    failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    errors: dict[str, int] = field(default_factory=dict)  # message -> count
    requests: tuple[RequestResult, ...] = field(default=(), repr=False)

    @classmethod
    def from_requests(cls, policy: str, requested: str, results: Sequence[RequestResult],
                      duration_s: float) -> PolicyResult:
        ok = [r for r in results if r.ok]
        return cls(
            policy=policy, requested=requested, completed=len(ok), failed=len(results) - len(ok),
            duration_s=duration_s, input_tokens=sum(r.prompt_tokens for r in ok),
            output_tokens=sum(r.output_tokens for r in ok),
            ttft=Distribution.of(r.ttft_s for r in ok if r.ttft_s is not None),
            tpot=Distribution.of(r.tpot_s for r in ok if r.tpot_s is not None),
            itl=Distribution.of(x for r in ok for x in r.itl_s),
            e2e=Distribution.of(r.e2e_s for r in ok),
            errors=dict(Counter(r.error for r in results if r.error is not None)),
            requests=tuple(results),
        )

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    def to_row(self) -> dict[str, Any]:
        """The flat fields (numbers, plus the two policy names); one CSV row."""
        row: dict[str, Any] = {
            "policy": self.policy, "requested": self.requested, "completed": self.completed, "failed": self.failed,
            "duration_s": self.duration_s, "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput, "total_input_tokens": self.input_tokens,
            "total_output_tokens": self.output_tokens,
        }
        for name in ("ttft", "tpot", "itl", "e2e"):
            row.update(getattr(self, name).to_json(name))
        return row

    def to_json(self) -> dict[str, Any]:
        return {**self.to_row(), "errors": self.errors}


ROW_FIELDS: tuple[str, ...] = tuple(PolicyResult.from_requests("", "", [], 0.0).to_row())  # the CSV columns


@dataclass(frozen=True)
class LoadtestResult:
    """Every policy's result, keyed by canonical policy."""

    policies: dict[str, PolicyResult]

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {name: r.to_json() for name, r in self.policies.items()}

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            for r in self.policies.values():
                writer.writerow(r.to_row())

    def table(self, title: str | None = None) -> TextTable:
        """Metrics down, policies across (so several policies stay readable); latencies in ms."""
        rs = list(self.policies.values())
        t = TextTable([Column("metric"), *(Column(name, "right", keep_whole=True) for name in self.policies)],
                      title=title)
        if any(r.requested != r.policy for r in rs):
            t.add_row("as given", *(r.requested for r in rs))
        t.add_row("completed", *(str(r.completed) for r in rs))
        t.add_row("failed", *(str(r.failed) for r in rs))
        t.add_row("duration (s)", *(f"{r.duration_s:.2f}" for r in rs))
        t.add_row("requests/s", *(f"{r.request_throughput:.2f}" for r in rs))
        t.add_row("output tok/s", *(f"{r.output_throughput:.1f}" for r in rs), end_section=True)
        for label, name in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e")):
            for stat in ("mean", "p50", "p90", "p99"):
                values = [getattr(getattr(r, name), stat) for r in rs]
                t.add_row(f"{label} {stat} (ms)", *("-" if v is None else f"{v * 1e3:.1f}" for v in values),
                          end_section=stat == "p99")
        return t


# -- prompts and arrivals -------------------------------------------------------------------------------------


def load_prompts(path: Path) -> list[str]:
    """JSONL with a "prompt" field per line (when the first line is a JSON object), else one prompt per line."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} is empty; give JSONL lines like {{\"prompt\": \"...\"}} or plain text")
    try:
        jsonl = isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        jsonl = False
    if not jsonl:
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e}); the file is read as JSONL because line 1 is") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{path}:{n}: each JSONL line needs a string \"prompt\" field")
        prompts.append(obj["prompt"])
    return prompts


def split_policies(values: Iterable[str]) -> list[str]:
    """"full,skip:8" -> ["full", "skip:8"]. A piece that starts with a digit continues the previous policy (policy
    kinds and preset names start with a letter), and so does one inside an open JSON object:
    "skip:3,5,9-11,pairs" -> ["skip:3,5,9-11", "pairs"]; '{"kind": "skip", "count": 2},full' -> two policies."""
    out: list[str] = []
    for value in values:
        fresh = True  # the next piece starts a policy (not across two option values)
        for piece in value.split(","):
            if not fresh and (piece.lstrip()[:1].isdigit() or out[-1].count("{") > out[-1].count("}")):
                out[-1] += "," + piece
            elif piece.strip():
                out.append(piece)
                fresh = False
    return [p.strip() for p in out]


def arrival_gaps(request_rate: float | None, *, seed: int) -> Iterator[float]:
    """Seconds between consecutive requests: exponential gaps (a Poisson process); 0 for none or inf."""
    rng = random.Random(seed)
    while True:
        yield 0.0 if request_rate is None or math.isinf(request_rate) else rng.expovariate(request_rate)


def _label(policy: Policy) -> str:
    return policy if isinstance(policy, str) else json.dumps(policy, sort_keys=True)


# -- one request --------------------------------------------------------------------------------------------------


async def _one(client: AsyncPaintersClient, prompt: str, policy: Policy, options: dict[str, Any],
               t0: float) -> RequestResult:
    start = time.perf_counter()
    first: float | None = None
    last = start
    itl: list[float] = []
    chunks, usage, canonical, finished = 0, None, None, False
    try:
        async for chunk in client.stream_completions(prompt, policy=policy, **options):
            now = time.perf_counter()
            for choice in chunk.get("choices") or ():
                # every chunk with a choice brings a token, its text empty or not (held back as a possible stop
                # string or a partial character, or a special token), as vLLM's benchmark counts them
                chunks += 1
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
                finished = finished or choice.get("finish_reason") is not None
                if choice.get("finish_reason") == "abort":
                    raise RuntimeError("the server aborted the request (finish_reason 'abort')")
            usage = chunk.get("usage") or usage
            canonical = (chunk.get("painters") or {}).get("policy", canonical)
        if not finished:
            raise RuntimeError("the stream ended without a finish_reason")
    except Exception as e:  # noqa: BLE001 - one failed request is counted, never fatal to the run
        message = str(e) if isinstance(e, PaintersError) else f"{type(e).__name__}: {e}"
        return RequestResult(start - t0, time.perf_counter() - start, error=message[:300])
    end = time.perf_counter()
    return RequestResult(
        start_s=start - t0, e2e_s=end - start, ttft_s=None if first is None else first - start, itl_s=tuple(itl),
        output_tokens=usage["completion_tokens"] if usage else chunks,
        prompt_tokens=usage["prompt_tokens"] if usage else 0, policy=canonical,
    )


# -- a run --------------------------------------------------------------------------------------------------------


async def _probe(client: AsyncPaintersClient, policy: Policy, prompt: str) -> tuple[str, int]:
    """One 1-token request: the server validates the policy and names it, and counts the prompt's tokens."""
    try:
        response = await client.completions(prompt, policy=policy, max_tokens=1)
    except PaintersError as e:
        error = e.body.get("error") if isinstance(e.body, dict) else None
        if isinstance(error, dict) and error.get("param") == "policy":
            raise LoadtestError(f"policy {_label(policy)!r} was rejected by the server (HTTP {e.status}): "
                                f"{e.message}") from None
        raise LoadtestError(f"the check request for policy {_label(policy)!r} failed (HTTP {e.status}): "
                            f"{e.message}") from None
    except Exception as e:  # noqa: BLE001 - connection refused, timeouts, …
        raise LoadtestError(f"cannot reach the server at {client.http.base_url}: {type(e).__name__}: {e}") from None
    name = response.painters.policy if response.painters else _label(policy)
    return name, response.usage.prompt_tokens if response.usage else 0


async def _measure(client: AsyncPaintersClient, policy: Policy, prompts: Sequence[str], *, options: dict[str, Any],
                   requests: int | None, duration: float | None, concurrency: int | None,
                   request_rate: float | None, seed: int,
                   on_done: Callable[[RequestResult], None]) -> tuple[list[RequestResult], float]:
    """Issue requests until `requests` or `duration`; returns the results and the wall time until all finished."""
    order = list(prompts)
    random.Random(seed).shuffle(order)  # the same prompt order and arrival times for every policy
    gaps = arrival_gaps(request_rate, seed=seed)
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    # At a finite rate, arrivals keep their seeded schedule and a request waits for a slot in its own task (as in
    # vLLM's benchmark): waiting in the issuing loop, or sleeping each gap from the loop's last turn, pushed every
    # later arrival back (200/s issued 156/s). Without one, the loop itself waits for a slot (a closed loop).
    paced = request_rate is not None and not math.isinf(request_rate)

    async def run(prompt: str) -> RequestResult:
        if slots and paced:
            await slots.acquire()
        try:
            result = await _one(client, prompt, policy, options, t0)
        finally:
            if slots:
                slots.release()
        on_done(result)
        return result

    tasks: list[asyncio.Task[RequestResult]] = []
    t0 = time.perf_counter()
    due = 0.0  # when the next request is due, in seconds after t0
    for i, prompt in enumerate(itertools.cycle(order)):
        if requests is not None and i >= requests:
            break
        if i:
            due += next(gaps)
            wait = due - (time.perf_counter() - t0)
            if duration is not None:
                wait = min(wait, duration - (time.perf_counter() - t0))
            if wait > 0:
                await asyncio.sleep(wait)
        if slots and not paced:
            await slots.acquire()
        if duration is not None and time.perf_counter() - t0 >= duration:
            if slots and not paced:
                slots.release()
            break
        tasks.append(asyncio.create_task(run(prompt)))
        await asyncio.sleep(0)  # let the request go out before the next arrival is timed
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - t0


async def list_presets(url: str, *, api_key: str | None = None) -> list[str]:
    """The server's default policy, then its preset names, from GET /v1/models."""
    async with AsyncPaintersClient(url, api_key=api_key) as client:
        try:
            models = await client.models()
        except Exception as e:  # noqa: BLE001
            raise LoadtestError(f"cannot list the presets at {url}/v1/models: {e}") from None
    base = next((m for m in models if m.get("parent") is None), None)
    presets = [m["id"].partition("@")[2] for m in models if m.get("parent") is not None and "@" in m["id"]]
    return ([base["policy"]] if base and base.get("policy") else []) + presets


def _check(*, concurrency: int | None, request_rate: float | None, requests: int | None, duration: float | None,
           max_tokens: int, warmup: int, policies: Sequence[Policy], prompts: Sequence[str]) -> None:
    if concurrency is None and request_rate is None:
        raise ValueError("give concurrency (requests in flight), request_rate (requests/s) or both")
    if requests is None and duration is None:
        raise ValueError("give requests (a count), duration (seconds) or both")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf: all at once), got {request_rate}")
    if (requests is not None and requests < 1) or (duration is not None and not duration > 0):
        raise ValueError(f"requests must be >= 1 and duration > 0, got {requests} and {duration}")
    if max_tokens < 1 or warmup < 0:
        raise ValueError(f"max_tokens must be >= 1 and warmup >= 0, got {max_tokens} and {warmup}")
    if not policies or not prompts:
        raise ValueError("give at least one policy and one prompt")


async def _resolve(client: AsyncPaintersClient, policies: Sequence[Policy], prompts: Sequence[str], *,
                   max_tokens: int) -> dict[str, Policy]:
    """Check every policy (and the longest prompt's length) before anything runs; canonical name -> policy."""
    try:
        models = await client.models()
        max_model_len = next((m.get("max_model_len") for m in models if m.get("parent") is None), None)
    except PaintersError:
        max_model_len = None  # no /v1/models (or no max_model_len in it): the length check is skipped
    except Exception as e:  # noqa: BLE001
        raise LoadtestError(f"cannot reach the server at {client.http.base_url}: {type(e).__name__}: {e}") from None
    longest = max(prompts, key=len)
    canonical: dict[str, Policy] = {}
    prompt_tokens = 0
    for policy in policies:
        name, prompt_tokens = await _probe(client, policy, longest)
        if name in canonical:
            log.warning("policy %r is %s, like %r; it runs once", _label(policy), name, _label(canonical[name]))
            continue
        canonical[name] = policy
    if max_model_len is not None and prompt_tokens + max_tokens > max_model_len:
        raise LoadtestError(f"the longest prompt has {prompt_tokens} tokens; with max_tokens {max_tokens} that "
                            f"exceeds the server's max_model_len {max_model_len}; lower --max-tokens or shorten "
                            f"the prompts")
    return canonical


async def run_loadtest(
    url: str,
    policies: Sequence[Policy],
    *,
    concurrency: int | None = None,
    request_rate: float | None = None,
    requests: int | None = None,
    duration: float | None = None,
    prompts: Sequence[str] = BUILTIN_PROMPTS,
    max_tokens: int = 128,
    warmup: int = 1,
    model: str | None = None,
    api_key: str | None = None,
    ignore_eos: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    timeout: float = 600.0,
    progress: Progress | None = None,
) -> dict[str, PolicyResult]:
    """Load-test each policy in turn; results keyed by the server's canonical policy name, in the order given.

    Arrivals: `concurrency` requests in flight (closed loop), or Poisson at `request_rate` per second (inf: all at
    once), capped by `concurrency` when both are given. Issuing stops after `requests` requests or `duration`
    seconds, whichever comes first; requests in flight then finish and count. Every policy is first checked by one
    1-token request (not counted); a rejected one raises LoadtestError before anything is measured. Policies that
    resolve to the same canonical policy run once. `progress` (rich) gets one task per policy.
    """
    _check(concurrency=concurrency, request_rate=request_rate, requests=requests, duration=duration,
           max_tokens=max_tokens, warmup=warmup, policies=policies, prompts=prompts)
    options = {"max_tokens": max_tokens, "temperature": temperature, "ignore_eos": ignore_eos,
               "stream_options": {"include_usage": True}}
    connections = max(concurrency or requests or 1024, warmup, 1)
    results: dict[str, PolicyResult] = {}
    async with AsyncPaintersClient(url, model=model, api_key=api_key, timeout=timeout,
                                   max_connections=connections) as client:
        for name, policy in (await _resolve(client, policies, prompts, max_tokens=max_tokens)).items():
            task = progress.add_task(f"{name} warm-up", total=warmup or None) if progress is not None else None

            def done(_: RequestResult, task: TaskID | None = task) -> None:
                if progress is not None and task is not None:
                    progress.advance(task)

            if warmup:
                await _measure(client, policy, prompts, options=options, requests=warmup, duration=None,
                               concurrency=min(concurrency or warmup, warmup), request_rate=None, seed=seed + 1,
                               on_done=done)
            if progress is not None and task is not None:
                progress.reset(task, total=requests, description=name)
            measured, wall = await _measure(client, policy, prompts, options=options, requests=requests,
                                            duration=duration, concurrency=concurrency, request_rate=request_rate,
                                            seed=seed, on_done=done)
            results[name] = PolicyResult.from_requests(name, _label(policy), measured, wall)
            if progress is not None and task is not None:
                progress.update(task, total=len(measured), completed=len(measured))
    return results
