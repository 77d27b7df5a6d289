"""Reliability checks against a live Painters server, shared by tests/test_reliability.py (bounded sizes, in
`make test`) and `make reliability` (`python -m tests.reliability`: full sizes, one table).

Each check drives a real server over real sockets and returns a dataclass of what it saw: schemathesis fuzzing of
every OpenAPI operation, an overload burst, a mid-stream disconnect, hostile inputs, and a soak. `tiny_process`
starts the app on the tiny in-memory model in its own process under `server.app.serve` (the real SIGTERM drain and
engine-failure exit), so RSS, threads and open files are the server's alone."""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.serving import HOST, ROOT, Process, free_port, metric_value, wait_until

MODEL = "tiny"
STREAM_TIMEOUT = 60.0  # seconds: a request still unanswered by then counts as a hang


# -- the tiny server in its own process ---------------------------------------------------------------------------------


def _serve_main(argv: list[str]) -> int:
    """`python -m tests.reliability serve PORT [--step-delay S] [--die-after N]`: the tiny model under
    server.app.serve; settings come from PAINTERS_* variables."""
    import torch

    from server.app import create_app, serve
    from server.engine.generate import Engine
    from server.settings import Settings
    from tests.conftest import CharTokenizer, tiny_llama

    port = int(argv[0])
    opts = dict(zip(argv[1::2], argv[2::2]))
    delay = float(opts.get("--step-delay", 0))
    die_after = int(opts.get("--die-after", -1))
    model = wide_tiny if opts.get("--wide") == "1" else tiny_llama
    torch.set_num_threads(1)

    class EngineFault(BaseException):
        """Not an Exception: it escapes the loop's per-step handler, as a real fatal fault would."""

    class TestEngine(Engine):
        started = 0

        def start(self, *args: Any, **kwargs: Any):
            TestEngine.started += 1
            if TestEngine.started == die_after:
                raise EngineFault("injected engine fault")
            return super().start(*args, **kwargs)

        def new_batch(self, **kwargs: Any):
            batch = super().new_batch(**kwargs)
            if delay:  # every forward (decode and prefill) goes through launch
                launch = batch.launch
                batch.launch = lambda inp: (time.sleep(delay), launch(inp))[1]  # type: ignore[method-assign]
            return batch

    settings = Settings(model=MODEL)  # the rest from PAINTERS_* variables
    app = create_app(settings, engine_factory=lambda s: TestEngine.from_hf(model(), CharTokenizer()))
    return serve(app, host=HOST, port=port, log_level="warning")


@contextmanager
def tiny_process(tmp: Path, *, step_delay: float = 0.0, die_after: int = -1, env: dict[str, str] | None = None,
                 timeout: float = 120, wide: bool = False) -> Iterator[Process]:
    """The tiny-model server in a child process on a free port, yielded once /ready is 200; terminated after."""
    port = free_port()
    args = [sys.executable, "-m", "tests.reliability", "serve", str(port), "--step-delay", str(step_delay),
            "--die-after", str(die_after), "--wide", "1" if wide else "0"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "PAINTERS_MAX_MODEL_LEN": "128",
                **(env or {})}
    log = tmp / f"tiny-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                                start_new_session=True)
    p = Process(proc, f"http://{HOST}:{port}", log)
    try:
        wait_until(lambda: httpx.get(f"{p.url}/ready", timeout=2).status_code == 200, timeout=timeout,
                   what="the tiny server's /ready", interval=0.1, alive=p.death)
        yield p
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)


# -- helpers --------------------------------------------------------------------------------------------------------


def scrape(url: str, **headers: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10, headers=headers).text


def gauges(url: str) -> tuple[float, float, float]:
    """(running, waiting, KV usage) from /metrics."""
    text = scrape(url)
    return (metric_value(text, "painters:num_requests_running"), metric_value(text, "painters:num_requests_waiting"),
            metric_value(text, "painters:kv_slots_usage_perc"))


def engine_steps(url: str) -> float:
    """Engine steps so far that decoded or prefilled anything (one StepStats per policy present: one policy here)."""
    return metric_value(scrape(url), "painters:step_duration_seconds_count")


def wait_idle(url: str, timeout: float = 60) -> bool:
    try:
        wait_until(lambda: gauges(url) == (0.0, 0.0, 0.0), timeout=timeout, what="gauges back to 0", interval=0.05)
        return True
    except TimeoutError:
        return False


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- fuzzing --------------------------------------------------------------------------------------------------------


@dataclass
class FuzzResult:
    operations: int = 0
    cases: int = 0
    server_errors: int = 0
    schema_violations: int = 0
    hangs: int = 0
    statuses: dict[int, int] = field(default_factory=dict)  # answers by HTTP status
    failures: list[str] = field(default_factory=list)  # one line each (operation: what failed)

    @property
    def failed(self) -> int:
        return self.server_errors + self.schema_violations + self.hangs


def fuzz(url: str, *, examples: int) -> FuzzResult:
    """schemathesis against the live /openapi.json: every operation, `examples` schema-valid cases and `examples`
    schema-violating ones each. Checked: no 5xx, every response (status, content type, body, headers) conforms to
    the schema, none takes longer than STREAM_TIMEOUT."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis import checks as st_checks

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    result = FuzzResult()
    chosen = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
              st_checks.response_schema_conformance, st_checks.response_headers_conformance]
    for op in schema.get_all_operations():
        operation = op.ok()
        result.operations += 1
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(url, operation, mode, label, examples, chosen, result)
    return result


def _fuzz_operation(url: str, operation: Any, mode: Any, label: str, examples: int, chosen: list[Any],
                    result: FuzzResult) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    try:
        strategy = operation.as_strategy(mode)
    except Exception:  # noqa: BLE001 - nothing to violate (an operation without parameters or body)
        return

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=strategy)
    def run(case: Any) -> None:
        result.cases += 1
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and result.cases % 2:
            # Half the valid cases name this server's model and a real policy, so generation runs (not just a 404
            # for a random model name or a 400 for a random policy string).
            case.body.pop("model", None)
            for where in (case.body, case.body.get("parameters")):
                if isinstance(where, dict) and "policy" in where:
                    where["policy"] = SOAK_POLICIES[result.cases % len(SOAK_POLICIES)]
        try:
            response = case.call(base_url=url, timeout=STREAM_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - a timeout or a dropped connection: the server hung or died
            result.hangs += 1
            result.failures.append(f"{label}: no answer ({type(e).__name__})")
            return
        result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=chosen)
        except Exception as e:  # noqa: BLE001 - schemathesis raises one failure (or a group) per case
            text = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            if response.status_code >= 500:
                result.server_errors += 1
            else:
                result.schema_violations += 1
            result.failures.append(f"{label} ({mode.value}): HTTP {response.status_code}: "
                                   f"{' | '.join(text[:2])[:200]}")

    try:
        run()
    except Exception as e:  # noqa: BLE001 - hypothesis could not generate (e.g. an unsatisfiable negative schema)
        if "Unsatisfiable" not in type(e).__name__ and "unsatisfiable" not in str(e).lower():
            raise


# -- overload -------------------------------------------------------------------------------------------------------


@dataclass
class OverloadResult:
    sent: int
    completed: int
    refused: int
    other: list[str]
    refusal_p50_s: float
    refusal_p99_s: float
    retry_after_missing: int
    idle_after: bool


def overload(url: str, *, capacity: int, factor: int = 4, max_tokens: int = 32) -> OverloadResult:
    """A burst of factor x capacity requests at once: the excess must be refused with 429 + Retry-After (timed), the
    admitted ones complete, and the running/waiting gauges and KV use return to 0."""
    n = factor * capacity
    barrier = threading.Barrier(n)
    body = {"model": MODEL, "prompt": "overload", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}

    def one(_: int) -> tuple[int, float, str | None]:
        with httpx.Client(timeout=STREAM_TIMEOUT) as c:
            barrier.wait()
            t0 = time.perf_counter()
            r = c.post(f"{url}/v1/completions", json=body)
            return r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")

    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(one, range(n)))
    refusals = [dt for status, dt, _ in outcomes if status == 429]
    return OverloadResult(
        sent=n, completed=sum(1 for s, _, _ in outcomes if s == 200), refused=len(refusals),
        other=[str(s) for s, _, _ in outcomes if s not in (200, 429)],
        refusal_p50_s=pct(refusals, 0.5), refusal_p99_s=pct(refusals, 0.99),
        retry_after_missing=sum(1 for s, _, h in outcomes if s == 429 and not h), idle_after=wait_idle(url))


# -- disconnects ----------------------------------------------------------------------------------------------------


@dataclass
class DisconnectResult:
    events_read: int
    steps_to_free: float  # engine steps between the socket's close and the gauges back at 0
    seconds_to_free: float
    freed: bool


def wide_tiny() -> Any:
    """A wider tiny model (~10 ms decode steps on one thread), so an engine step is long next to the time a closed
    socket takes to reach the server, and "within one step" means something."""
    from tests.conftest import tiny_llama

    return tiny_llama(hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4)


def disconnect(url: str, *, max_tokens: int = 100) -> DisconnectResult:
    """Open a real socket, start a streamed completion, read a few events, close the socket; count the engine steps
    until the running gauge and KV use are back at 0."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "disconnect me", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True, "temperature": 0})
    sock = socket.create_connection((host, int(port)), timeout=STREAM_TIMEOUT)
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    seen = b""
    while seen.count(b"data:") < 3:
        chunk = sock.recv(4096)
        if not chunk:
            break
        seen += chunk
    sock.close()
    t0 = time.perf_counter()
    before = engine_steps(url)
    freed = wait_idle(url, timeout=30)
    return DisconnectResult(events_read=seen.count(b"data:"), steps_to_free=engine_steps(url) - before,
                            seconds_to_free=time.perf_counter() - t0, freed=freed)


@dataclass
class UnreadResult:
    read: int  # bytes the client got when it finally read
    done: bool  # the stream's "[DONE]" was among them: the server held every frame for the client
    closed: bool  # the server had closed the connection


def unread_stream(url: str, *, wait_s: float) -> UnreadResult:
    """Start a large streamed completion (16 choices with top-20 logprobs) on a socket with a tiny receive buffer,
    read nothing for `wait_s`, then read what is there until the server closes it or 3 s pass without data."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "x", "n": 16, "max_tokens": 200, "logprobs": 20, "ignore_eos": True,
                       "stream": True})
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        time.sleep(wait_s)
        sock.settimeout(3)
        seen, closed = b"", False
        try:
            while chunk := sock.recv(1 << 20):
                seen += chunk
            closed = True
        except (TimeoutError, ConnectionResetError) as e:
            closed = isinstance(e, ConnectionResetError)
    return UnreadResult(len(seen), b"[DONE]" in seen, closed)


def slow_body(url: str, *, wait_s: float) -> tuple[bytes, bool]:
    """Send a completion's headers and the first bytes of its 1,000-byte body, then nothing: (what the server answered
    within `wait_s`, whether it closed the connection)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.connect((host, int(port)))
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     'Content-Length: 1000\r\n\r\n{"prompt": "'.encode())
        sock.settimeout(wait_s)
        seen = b""
        try:
            while chunk := sock.recv(65536):
                seen += chunk
            return seen, True
        except TimeoutError:
            return seen, False


# -- hostile inputs -------------------------------------------------------------------------------------------------


def hostile_inputs() -> list[tuple[str, str, str | dict[str, Any]]]:
    """(name, path, JSON body or raw text) of inputs a hostile client sends."""
    deep = 50_000
    return [
        ("300-step schedule", "/v1/completions",
         {"prompt": "x", "max_tokens": 4, "policy": {"kind": "schedule", "steps": [[0, 2, 4]] * 300}}),
        ("300-step schedule string", "/v1/completions",
         {"prompt": "x", "max_tokens": 4, "policy": "schedule:" + ",".join(["0+2+4"] * 300)}),
        ("4096-step schedule", "/v1/completions", {"prompt": "x", "max_tokens": 1, "policy": "schedule:0-4095"}),
        ("huge policy string", "/v1/completions", {"prompt": "x", "policy": "schedule:" + "0," * 100_000 + "0"}),
        ("deeply nested list", "/v1/completions", '{"prompt": "x", "policy": ' + "[" * deep + "]" * deep + "}"),
        ("deeply nested object", "/generate", '{"inputs": "x", "parameters": ' + '{"a":' * deep + "1" + "}" * deep
         + "}"),
        ("nested policy object", "/v1/completions", {"prompt": "x", "policy": {"kind": "schedule", "steps": [
            {"layers": [[[[0]]]]}]}}),
        ("huge max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**40}),
        ("huge skip count", "/v1/completions", {"prompt": "x", "policy": {"kind": "skip", "count": 10**40}}),
        ("huge loop count", "/v1/completions", {"prompt": "x", "policy": "loop:0-5x" + "9" * 400}),
        ("huge shuffle seed", "/v1/completions", {"prompt": "x", "max_tokens": 2, "policy": "shuffle:1-4:" + "7" * 1000}),
        ("huge token id", "/v1/completions", '{"prompt": [' + "9" * 5000 + "]}"),
        ("huge seed", "/v1/completions", {"prompt": "x", "seed": 10**30}),
        ("max_tokens as float overflow", "/v1/completions", '{"prompt": "x", "max_tokens": 1e400}'),
        ("unicode digits in policy", "/v1/completions", {"prompt": "x", "policy": "skip:\uff11\uff10"}),
        ("unicode kind", "/v1/completions", {"prompt": "x", "policy": "sk\u0131p:2"}),
        ("NUL in policy", "/v1/completions", {"prompt": "x", "policy": "full\u0000"}),
        ("lone surrogate suffix", "/v1/completions", '{"prompt": "x", "model": "tiny@\\ud800"}'),
        ("RTL and emoji policy", "/v1/completions", {"prompt": "x", "policy": "\u202eskip:2\U0001f600"}),
        ("policy object as string", "/v1/completions", {"prompt": "x", "policy": '{"kind": "loop", "times": 1e9}'}),
        ("deep policy JSON in a string", "/v1/completions",
         {"prompt": "x", "policy": '{"kind":' + "[" * 1000 + "]" * 1000 + "}"}),
        ("4 KB parallel group", "/v1/completions",
         {"prompt": "x" * 64, "max_tokens": 1, "policy": "schedule:" + "+".join(["0"] * 2044)}),
        ("5 MB prompt", "/v1/completions", {"prompt": "x" * 5_000_000}),
        ("many prompts", "/v1/completions", {"prompt": ["x"] * 10_000, "max_tokens": 1}),
        ("n x prompts", "/v1/completions", {"prompt": ["x"] * 64, "n": 16, "max_tokens": 1}),
        ("many stop strings", "/v1/completions", {"prompt": "x", "stop": ["a"] * 10_000}),
        ("top_p 5e-324", "/generate", {"inputs": "x", "parameters": {"do_sample": True, "top_p": 5e-324}}),
        ("temperature 1e-300", "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 1e-300}),
        ("probe too many tokens", "/v1/probe", {"prompts": ["x" * 100] * 64}),
        ("embeddings of too many tokens", "/v1/embeddings", {"input": ["x" * 100] * 64}),
        ("many embedding inputs", "/v1/embeddings", {"input": ["x"] * 10_000}),
        ("embeddings of many bad ids", "/v1/embeddings", {"input": [[0.5] * 20_000]}),
        ("detokenize a million ids", "/detokenize", {"tokens": [5] * 400_000}),
        # the newer fields, each at its bounds (tiny's CharTokenizer: "a" is token 100; no chat template, no xgrammar)
        ("bad_words forbid the one allowed token", "/v1/completions",
         {"prompt": "x", "max_tokens": 2, "allowed_token_ids": [100], "bad_words": ["a"]}),
        ("bad_words at every bound", "/v1/completions",
         {"prompt": "x", "max_tokens": 2, "bad_words": [f"{i:03d}" + "a" * 253 for i in range(128)]}),
        ("129 bad words", "/v1/completions", {"prompt": "x", "bad_words": [str(i) for i in range(129)]}),
        ("bad_words beside penalties, streamed", "/v1/completions",
         {"prompt": "x" * 100, "max_tokens": 8, "bad_words": [chr(33 + i) for i in range(90)],
          "repetition_penalty": 2.0, "frequency_penalty": 2.0, "stream": True}),
        ("widest beam search, streamed, 20 logprobs", "/v1/completions",
         {"prompt": "x", "max_tokens": 8, "n": 10, "use_beam_search": True, "logprobs": 20, "stream": True,
          "length_penalty": -10, "ignore_eos": True}),
        ("beam search over many prompts", "/v1/completions",
         {"prompt": ["x"] * 64, "max_tokens": 2, "n": 10, "use_beam_search": True}),
        ("beam search and bad_words", "/v1/completions",
         {"prompt": "x", "max_tokens": 2, "n": 2, "use_beam_search": True, "bad_words": ["a"]}),
        ("128 tools of deep schemas, required", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required", "tools": _tools(128)}),
        ("128 tools on /tokenize", "/tokenize", {"messages": [{"role": "user", "content": "x"}], "tools": _tools(128)}),
        ("10000 structural tags", "/v1/completions",
         {"prompt": "x", "max_tokens": 2, "response_format": {"type": "structural_tag", "triggers": ["<a"],
                                                              "structures": [{"begin": "<a>", "schema": {},
                                                                              "end": "</a>"}] * 10_000}}),
        ("10000-rule Lark grammar", "/v1/completions",
         {"prompt": "x", "max_tokens": 2, "guided_grammar": "\n".join(
             ["start: r0"] + [f"r{i}: \"a\" r{i + 1} | \"b\"" for i in range(10_000)] + ['r10000: "c"'])}),
    ]


def _tools(count: int) -> list[dict[str, Any]]:
    """`count` function tools, each with a schema nested 20 objects deep."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return [{"type": "function", "function": {"name": f"f{i}", "parameters": schema}} for i in range(count)]


@dataclass
class HostileResult:
    tried: int
    statuses: dict[str, int]
    server_errors: list[str]
    slowest_s: float
    healthy_after: bool


def hostile(url: str) -> HostileResult:
    statuses, errors, slowest = {}, [], 0.0
    with httpx.Client(timeout=STREAM_TIMEOUT) as c:
        for name, path, body in hostile_inputs():
            t0 = time.perf_counter()
            if isinstance(body, str):
                r = c.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(f"{url}{path}", json=body)
            slowest = max(slowest, time.perf_counter() - t0)
            statuses[name] = r.status_code
            if r.status_code >= 500:
                errors.append(f"{name}: {r.status_code} {r.text[:200]}")
        ok = c.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
        healthy = ok.status_code == 200 and c.get(f"{url}/health").status_code == 200
    return HostileResult(len(statuses), statuses, errors, slowest, healthy and wait_idle(url))


# -- soak -----------------------------------------------------------------------------------------------------------

# The tiny model has 6 layers; the most expensive valid policies run every layer many times.
SOAK_POLICIES = ["full", "skip:2", "pairs", "parallel", "reverse", "shuffle:1-4:3", "repeat", "loop:x3",
                 "loop:0-5x8", "schedule:0-5,0-5,0-5,0-5", "schedule:" + ",".join(["0+1+2+3+4+5"] * 20)]


# asyncio's default executor (tokenization) adds a worker whenever all of its workers are busy at once, up to
# cpu + 4; such a coincidence can first happen in the second half. A leak per request or per disconnect grows past it.
LATE_POOL_WORKERS = 2


@dataclass
class SoakResult:
    requests: int
    ok: int
    intended_4xx: int
    disconnects: int
    failures: list[str]
    rss_mb: list[tuple[int, float]]  # (requests done, server RSS in MB)
    prefix_blocks: list[tuple[float, float]]  # (painters:prefix_cache_blocks, its limit) at each RSS sample
    idle_after: bool  # running, waiting and KV gauges back to 0
    # (most seen in the first half, at the end): worker pools fill lazily up to their bound in the first half; a
    # leak (a thread or a socket per request or per disconnect) keeps growing after it
    threads: tuple[int, int]
    fds: tuple[int, int]
    wall_s: float

    @property
    def leaked(self) -> bool:
        """Threads or open files grew after the first half by more than a late pool worker explains."""
        return self.threads[1] > self.threads[0] + LATE_POOL_WORKERS or self.fds[1] > self.fds[0]

    @property
    def rss_drift(self) -> float:
        """End RSS relative to RSS after warm-up (the first fifth of the requests)."""
        warm = [mb for done, mb in self.rss_mb if done >= self.requests // 5]
        return warm[-1] / warm[0] - 1 if len(warm) > 1 else 0.0

    @property
    def last_quarter_growth(self) -> float:
        """RSS growth over the last quarter of the requests (flat: near 0)."""
        late = [mb for done, mb in self.rss_mb if done >= self.requests * 3 // 4]
        return late[-1] / late[0] - 1 if len(late) > 1 else 0.0

    @property
    def prefix_within_bound(self) -> bool:
        return all(blocks <= limit for blocks, limit in self.prefix_blocks)


def soak(url: str, pid: int, *, requests: int, concurrency: int = 8, seed: int = 0,
         progress: Callable[[int], None] | None = None) -> SoakResult:
    """`requests` requests at `concurrency`: random policies, lengths, streaming on and off, some disconnects.
    Intended 4xx: KV budget and queue refusals. Samples the server's RSS, threads and open files as it goes."""
    import psutil

    server = psutil.Process(pid)
    rng = random.Random(seed)
    plans = [(rng.choice(SOAK_POLICIES), rng.randint(1, 40), rng.randint(1, 48), rng.random() < 0.5,
              rng.random() < 0.05, rng.choice(["/v1/completions", "n=2", "/generate"]))
             for _ in range(requests)]
    lock = threading.Lock()
    ok = intended = disconnects = done = 0
    failures: list[str] = []
    rss: list[tuple[int, float]] = []
    prefix: list[tuple[float, float]] = []
    half: list[tuple[int, int]] = []  # (threads, open files) sampled in the first half
    every = max(1, requests // 20)

    def sample() -> None:
        rss.append((done, server.memory_info().rss / 2**20))
        text = scrape(url)
        prefix.append((metric_value(text, "painters:prefix_cache_blocks"),
                       metric_value(text, "painters:prefix_cache_blocks_limit")))
        if done <= requests // 2:
            half.append((server.num_threads(), server.num_fds()))

    def one(plan: tuple[str, int, int, bool, bool, str]) -> None:
        nonlocal ok, intended, disconnects, done
        policy, prompt_len, max_tokens, streaming, drop, path = plan
        # a shared start and a distinct tail: the prefix cache both hits and keeps filling
        prompt = ("soak " * 20)[:prompt_len] + " " + " ".join(f"w{(prompt_len * 7919 + max_tokens * i) % 997}"
                                                               for i in range(prompt_len % 5))
        if path == "/generate":
            body: dict[str, Any] = {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "policy": policy}}
            path = "/generate_stream" if streaming else path
        elif path == "n=2":  # two sampled choices (the tiny tokenizer has no chat template: fuzzing covers chat)
            path = "/v1/completions"
            body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "policy": policy,
                    "stream": streaming, "n": 2, "temperature": 0.7, "seed": max_tokens}
        else:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "policy": policy,
                    "stream": streaming, "logprobs": 2 if not streaming else None}
        outcome = "ok"
        try:
            with httpx.Client(timeout=STREAM_TIMEOUT) as c:
                if streaming or drop:
                    with c.stream("POST", f"{url}{path}", json={**body, "stream": True} if "prompt" in body
                                  else body) as r:
                        if r.status_code != 200:
                            r.read()
                            outcome = _classify(r.status_code, r.text)
                        else:
                            for n, line in enumerate(r.iter_lines()):
                                if drop and n >= 2:
                                    outcome = "disconnect"
                                    break
                                if '"error"' in line:
                                    outcome = f"stream error: {line[:200]}"
                else:
                    r = c.post(f"{url}{path}", json=body)
                    outcome = "ok" if r.status_code == 200 else _classify(r.status_code, r.text)
        except httpx.HTTPError as e:
            outcome = f"{type(e).__name__}: {e}"
        with lock:
            done += 1
            if outcome == "ok":
                ok += 1
            elif outcome == "intended":
                intended += 1
            elif outcome == "disconnect":
                disconnects += 1
            else:
                failures.append(f"{policy} {path}: {outcome}")
            if done % every == 0:
                sample()
                if progress:
                    progress(done)

    t0 = time.perf_counter()
    sample()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, plans))
    idle = wait_idle(url)
    time.sleep(0.5)
    sample()
    return SoakResult(requests, ok, intended, disconnects, failures, rss, prefix, idle,
                      (max(t for t, _ in half), server.num_threads()), (max(f for _, f in half), server.num_fds()),
                      time.perf_counter() - t0)


def _classify(status: int, text: str) -> str:
    if status == 429 or (status == 400 and "kv_budget_exceeded" in text):
        return "intended"
    return f"HTTP {status}: {text[:200]}"


# -- make reliability ----------------------------------------------------------------------------------------------


def _soak_main(requests: int) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, tiny_process(Path(tmp), wide=True) as p:
        s = soak(p.url, p.proc.pid, requests=requests,
                 progress=lambda n: print(f"{n} done", flush=True) if n % 200 == 0 else None)
    print(json.dumps({"requests": s.requests, "ok": s.ok, "intended_4xx": s.intended_4xx,
                      "disconnects": s.disconnects, "failures": s.failures[:10],
                      "rss_mb": [round(mb) for _, mb in s.rss_mb], "rss_drift": s.rss_drift,
                      "last_quarter_growth": s.last_quarter_growth, "prefix_blocks": s.prefix_blocks,
                      "idle_after": s.idle_after, "threads": s.threads, "fds": s.fds, "wall_s": s.wall_s}))
    bad = s.failures or s.leaked or s.last_quarter_growth > 0.02 or not s.prefix_within_bound or not s.idle_after
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "serve":
        return _serve_main(argv[1:])
    if argv and argv[0] == "soak":  # the soak alone: python -m tests.reliability soak [REQUESTS]
        return _soak_main(int(argv[1]) if len(argv) > 1 else 1000)
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from tests.serving import serve_tiny

    console = Console()
    examples = int(os.environ.get("FUZZ_EXAMPLES", "300"))
    soak_requests = int(os.environ.get("SOAK_REQUESTS", "1000"))
    rows: list[tuple[str, str]] = []
    console.print(f"[bold]fuzzing[/] every operation, {examples} cases each ...")
    with serve_tiny() as url:
        f = fuzz(url, examples=examples)
        rows.append(("fuzz: operations / cases", f"{f.operations} / {f.cases}"))
        rows.append(("fuzz: server errors / schema violations / hangs",
                     f"{f.server_errors} / {f.schema_violations} / {f.hangs}"))
        for line in f.failures[:10]:
            console.print("  " + line, markup=False)
        console.print("[bold]hostile inputs[/] ...")
        h = hostile(url)
        rows.append(("hostile inputs tried / 5xx / healthy after",
                     f"{h.tried} / {len(h.server_errors)} / {'yes' if h.healthy_after else 'NO'}"))
        rows.append(("hostile: slowest answer", f"{h.slowest_s * 1e3:.0f} ms"))
    with serve_tiny(queue_capacity=8, max_num_seqs=4) as url:
        console.print("[bold]overload[/] ...")
        o = overload(url, capacity=8)
        rows.append(("overload 4 x 8: completed / 429 / other", f"{o.completed} / {o.refused} / {len(o.other)}"))
        rows.append(("overload: refusal p50 / p99", f"{o.refusal_p50_s * 1e3:.1f} ms / {o.refusal_p99_s * 1e3:.1f} ms"))
        rows.append(("overload: gauges and KV back to 0", "yes" if o.idle_after else "NO"))
    with serve_tiny(model_factory=wide_tiny) as url:
        console.print("[bold]disconnects[/] ...")
        d = [disconnect(url) for _ in range(10)]
        rows.append(("disconnect: engine steps to free rows and KV (max of 10)",
                     f"{max(x.steps_to_free for x in d):.0f} ({max(x.seconds_to_free for x in d) * 1e3:.0f} ms)"))
    console.print(f"[bold]soak[/]: {soak_requests} requests at 8 concurrent (the wider tiny model) ...")
    with tempfile.TemporaryDirectory() as tmp, tiny_process(Path(tmp), wide=True) as p:
        s = soak(p.url, p.proc.pid, requests=soak_requests,
                 progress=lambda n: console.print(f"  {n} done", highlight=False) if n % 200 == 0 else None)
    rows.append(("soak: requests / ok / intended 4xx / disconnects / failures",
                 f"{s.requests} / {s.ok} / {s.intended_4xx} / {s.disconnects} / {len(s.failures)}"))
    rows.append(("soak: RSS drift after warm-up / over the last quarter",
                 f"{s.rss_drift * 100:+.1f} % / {s.last_quarter_growth * 100:+.1f} %"))
    rows.append(("soak: prefix-cache blocks max / limit",
                 f"{max(b for b, _ in s.prefix_blocks):.0f} / {max(lim for _, lim in s.prefix_blocks):.0f}"))
    rows.append(("soak: gauges back to 0", "yes" if s.idle_after else "NO"))
    rows.append(("soak: RSS over time (MB)", " ".join(f"{mb:.0f}" for _, mb in s.rss_mb)))
    rows.append(("soak: threads / open files (first half max -> end)", f"{s.threads[0]} -> {s.threads[1]} / "
                 f"{s.fds[0]} -> {s.fds[1]}"))
    rows.append(("soak: wall time", f"{s.wall_s:.0f} s"))
    for line in s.failures[:10]:
        console.print("  " + line, markup=False)
    table = Table(title="make reliability")
    table.add_column("check")
    table.add_column("result")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    bad = f.failed or h.server_errors or not h.healthy_after or o.other or not o.idle_after or s.failures \
        or abs(s.rss_drift) > 0.10 or s.leaked or s.last_quarter_growth > 0.02 or not s.prefix_within_bound \
        or not s.idle_after \
        or not all(x.freed for x in d)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
