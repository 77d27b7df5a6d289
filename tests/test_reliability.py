"""Reliability and security on real sockets (bounded sizes; `make reliability` runs the full ones): fuzzing every
OpenAPI operation, body and policy limits, an overload burst, a mid-stream disconnect, poisoned sampling values beside
a long request, hostile inputs, API keys, the SIGTERM drain and engine death in a real uvicorn process, and a short
soak."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.engine.generate import Engine
from server.settings import Settings
from tests import reliability as rel
from tests.conftest import CharTokenizer, tiny_llama
from tests.serving import serve_tiny, serving, settings, wait_until

pytestmark = pytest.mark.slow
MODEL = "tiny"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve_tiny() as u:
        yield u


def assert_error(r: httpx.Response, status: int, code: str | None = None, *, says: tuple[str, ...] = ()) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS, err
    if code is not None:
        assert err["code"] == code, err
    for fragment in says:
        assert fragment in err["message"], (fragment, err["message"])
    return err


def completion(url: str, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "temperature": 0, **body}, timeout=60)


# -- fuzzing and hostile input --------------------------------------------------------------------------------------


def test_fuzz_every_operation_no_server_error_no_schema_violation_no_hang(url):
    result = rel.fuzz(url, examples=12)
    assert result.operations >= 13, result
    assert result.failed == 0, "\n".join(result.failures[:20])
    assert result.statuses.get(200, 0) > 20 and result.statuses.get(400, 0) > 20, result.statuses
    assert rel.wait_idle(url)


def test_every_endpoint_documents_its_answer(url):
    spec = httpx.get(f"{url}/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            ok = op["responses"]["200"]["content"]
            assert ok and all(c.get("schema") for c in ok.values()), (method, path, ok)
            if path in ("/", "/generate", "/generate_stream"):  # TGI's status and shape
                assert "TGIErrorResponse" in json.dumps(op["responses"]["422"]), (method, path)
            elif path == "/info":  # TGI's too; only a missing key refuses it
                assert "TGIErrorResponse" in json.dumps(op["responses"]["401"]), (method, path)
            elif path not in ("/health", "/ready", "/metrics", "/policies", "/v1/models", "/version"):
                assert "$ref" in json.dumps(op["responses"]["400"]), (method, path)  # the error shape
    schemas = spec["components"]["schemas"]
    assert {"CompletionResponse", "ChatCompletionResponse", "GenerateResponse", "ModelList", "TokenizeResponse",
            "ErrorResponse", "TGIErrorResponse", "ProbeResponse"} <= set(schemas)


def test_hostile_inputs_get_4xx_or_bounded_cost_and_the_server_stays_healthy(url):
    result = rel.hostile(url)
    assert result.server_errors == [], result.server_errors
    assert result.healthy_after
    assert result.slowest_s < 10, result
    s = result.statuses
    assert s["5 MB prompt"] == 413 and s["probe too many tokens"] == 413
    assert s["huge policy string"] == 400 and s["deeply nested list"] == 400 and s["lone surrogate suffix"] == 400
    assert s["deep policy JSON in a string"] == 400  # a RecursionError: it was a 500
    assert s["4 KB parallel group"] == 400  # 2,044 members run at once: ~30 GB at 480 tokens on SmolLM2's width
    assert s["300-step schedule"] in (200, 400) and s["4096-step schedule"] == 400
    # the newer fields: a mask that leaves no token is the request's own conflict (it was a 500); bounds are 400s
    assert s["bad_words forbid the one allowed token"] == 400
    assert s["bad_words at every bound"] == 400 and s["129 bad words"] == 400
    assert s["widest beam search, streamed, 20 logprobs"] == 200 and s["beam search and bad_words"] == 400
    assert s["bad_words beside penalties, streamed"] == 200


@pytest.mark.parametrize("body,code,says", [
    ({"prompt": "x", "policy": "schedule:" + ",".join(["0"] * 2100)}, "policy_too_long", ("4096", "max_policy_chars")),
    ({"prompt": "x", "model": "tiny@" + "skip:" + "1," * 2100 + "2"}, "policy_too_long", ("max_policy_chars",)),
    ({"prompt": "x", "policy": {"kind": "schedule", "steps": [0] * 1100}}, "schedule_too_long",
     ("1100 steps", "1024", "max_schedule_steps")),
    ({"prompt": "x", "n": 17}, None, ("[1, 16]",)),
    ({"prompt": "x", "logprobs": 21}, None, ("[0, 20]",)),
    ({"prompt": "x", "stop": ["s"] * 17}, None, ("at most 16",)),
    ({"prompt": "x", "max_tokens": 10**30}, "context_length_exceeded", ("128",)),
])
def test_limits_are_4xx_naming_the_limit(url, body, code, says):
    assert_error(completion(url, **body), 400, code, says=says)


def test_body_size_is_refused_before_the_body_is_read(url):
    limit = Settings().max_body_bytes
    big = json.dumps({"prompt": "x" * (limit + 10)}).encode()
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 413, "request_too_large", says=(str(limit), "max_body_bytes"))
    assert time.perf_counter() - t0 < 2

    def chunks() -> Iterator[bytes]:  # no Content-Length: the guard counts the bytes as they come
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 413, "request_too_large")
    assert completion(url, prompt="ok", max_tokens=2).status_code == 200


def test_a_body_that_never_arrives_is_a_408_and_its_connection_closed():
    """A client trickling its body held the connection (and a file descriptor) for ever: 20,200 of them used up the
    server's 20,000 descriptors, and every other client was refused until they left."""
    with serve_tiny(body_timeout_s=1) as u:
        t0 = time.perf_counter()
        answer, closed = rel.slow_body(u, wait_s=10)
        assert answer.startswith(b"HTTP/1.1 408") and closed, answer
        assert b"body_timeout_s" in answer and time.perf_counter() - t0 < 5
        assert completion(u, prompt="ok", max_tokens=2).status_code == 200


def test_a_long_prompt_is_tokenized_off_the_event_loop():
    """While a slow tokenizer works on one prompt, /health still answers at once."""
    started = threading.Event()

    class SlowTokenizer(CharTokenizer):
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            if text.startswith("slow"):
                started.set()
                time.sleep(2)
            return super().encode(text, add_special_tokens)

    with serving(settings(), lambda s: Engine.from_hf(tiny_llama(), SlowTokenizer())) as c:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(c.post, "/v1/completions", json={"model": MODEL, "prompt": "slow", "max_tokens": 1})
            assert started.wait(10)
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            assert time.perf_counter() - t0 < 1.0
            assert slow.result(timeout=30).status_code == 200


def test_metrics_render_off_the_event_loop(monkeypatch):
    """A scrape renders every series (thousands of lines with many policy labels): while one renders, /health still
    answers at once."""
    from server.metrics import Metrics

    started = threading.Event()
    render = Metrics.render

    def slow(self):
        started.set()
        time.sleep(2)
        return render(self)

    monkeypatch.setattr(Metrics, "render", slow)
    with serving(settings()) as c:
        with ThreadPoolExecutor(1) as pool:
            scrape = pool.submit(c.get, "/metrics")
            assert started.wait(10)
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            assert time.perf_counter() - t0 < 1.0
            assert scrape.result(timeout=30).status_code == 200


# -- overload, disconnects, poisoned sampling -----------------------------------------------------------------------


def test_overload_burst_excess_is_refused_fast_and_admitted_ones_complete():
    with serve_tiny(queue_capacity=4, max_num_seqs=2) as u:
        result = rel.overload(u, capacity=4, max_tokens=48)
    assert result.other == [] and result.retry_after_missing == 0, result
    assert result.refused >= 1 and result.completed >= 4 and result.completed + result.refused == 16, result
    assert result.refusal_p99_s < 1.0, result
    assert result.idle_after, "running/waiting gauges or KV use did not return to 0"


def test_a_closed_socket_frees_its_rows_and_kv_within_one_engine_step():
    with serve_tiny(model_factory=rel.wide_tiny) as u:
        results = [rel.disconnect(u) for _ in range(3)]
    for r in results:
        assert r.events_read >= 3 and r.freed, r
        assert r.steps_to_free <= 1, results


def test_a_stream_whose_client_reads_nothing_is_dropped_and_frees_its_frames():
    """The engine generates whether or not the client reads; the frames a client never took were held, however long
    it kept the connection open (36 MB for 16 choices of 2,047 tokens with top-20 logprobs)."""
    with serve_tiny(max_model_len=256, stream_send_timeout_s=1) as u:
        result = rel.unread_stream(u, wait_s=6)
        assert result.closed and not result.done, result
        assert rel.wait_idle(u)
        assert completion(u, prompt="ok", max_tokens=2).status_code == 200


def test_poisoned_sampling_values_beside_a_long_request_leave_it_unharmed(url):
    long_body = {"prompt": "a long request", "max_tokens": 80, "ignore_eos": True}
    alone = completion(url, **long_body).json()["choices"][0]["text"]
    poisoned = [
        ("/generate", {"inputs": "x", "parameters": {"do_sample": True, "top_p": 5e-324, "max_new_tokens": 8}}),
        ("/generate", {"inputs": "x", "parameters": {"temperature": 1e-300, "max_new_tokens": 8}}),
        ("/generate", {"inputs": "x", "parameters": {"temperature": 100, "top_k": 1_000_000, "max_new_tokens": 8}}),
        ("/v1/completions", {"prompt": "x", "temperature": 100, "top_p": 1e-45, "max_tokens": 8}),
        ("/v1/completions", {"prompt": "x", "temperature": 5e-324, "top_k": 1, "max_tokens": 8}),
        ("/v1/completions", {"prompt": "x", "temperature": 1, "seed": 2**63 - 1, "n": 4, "max_tokens": 8}),
        ("/v1/completions", {"prompt": "x", "temperature": 1e-5, "logprobs": 20, "echo": True, "max_tokens": 8}),
        ("/v1/completions", {"prompt": "x", "temperature": 100, "min_p": 1, "repetition_penalty": 5e-324,
                             "frequency_penalty": -2, "presence_penalty": 2, "n": 2, "max_tokens": 8}),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 100, "6": -100}, "allowed_token_ids": [6, 7],
                             "min_tokens": 4, "max_tokens": 8}),
        ("/generate", {"inputs": "x", "parameters": {"repetition_penalty": 1e308, "frequency_penalty": -2,
                                                     "max_new_tokens": 8}}),
        ("/v1/completions", {"prompt": "x", "top_p": 5e-324, "temperature": 1e300}),  # refused: out of range
    ]
    out: dict[str, httpx.Response] = {}
    with ThreadPoolExecutor(2) as pool:
        long_run = pool.submit(completion, url, **long_body)
        for path, body in poisoned:
            r = httpx.post(f"{url}{path}", json=body, timeout=60)
            assert r.status_code in (200, 400), r.text
            out[json.dumps(body)] = r
        beside = long_run.result(timeout=120)
    assert beside.status_code == 200 and beside.json()["choices"][0]["text"] == alone
    assert beside.json()["choices"][0]["finish_reason"] == "length"
    assert sum(r.status_code == 200 for r in out.values()) == len(poisoned) - 1


# -- API keys -------------------------------------------------------------------------------------------------------


def test_api_keys_several_and_from_a_file_on_every_endpoint(tmp_path, caplog):
    keys = tmp_path / "keys.txt"
    keys.write_text("# ops team\nfile-key-1\n\nfile-key-2\n")
    with serving(settings(api_key="k1,k2", api_key_file=keys)) as c:
        paths = [("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}), ("GET", "/v1/models", None),
                 ("POST", "/generate", {"inputs": "hi"}), ("POST", "/tokenize", {"prompt": "hi"}),
                 ("GET", "/policies", None), ("GET", "/openapi.json", None), ("POST", "/v1/probe", {"prompts": ["a"]}),
                 ("GET", "/nowhere", None)]
        for method, path, body in paths:
            r = c.request(method, path, json=body, headers={"Authorization": "Bearer not-a-key"})
            if path == "/generate":  # TGI's shape on TGI's routes
                assert r.status_code == 401 and r.json()["error_type"] == "authentication", r.text
                assert "Authorization: Bearer" in r.json()["error"]
            else:
                err = assert_error(r, 401, "invalid_api_key", says=("Authorization: Bearer",))
                assert err["type"] == "authentication_error"
            assert "not-a-key" not in r.text and "k1" not in r.text
            assert r.headers["www-authenticate"] == "Bearer"
        for key in ("k1", "k2", "file-key-1", "file-key-2"):
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, (key, r.text)
        assert_error(c.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer # ops team"}),
                     401)
        for open_path in ("/health", "/ready", "/metrics"):
            assert c.get(open_path).status_code == 200, open_path
        spec = c.get("/openapi.json", headers={"Authorization": "Bearer k2"}).json()
        assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
        assert spec["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
        assert spec["paths"]["/health"]["get"]["security"] == []
        assert "k1" not in repr(c.app.state.painters.settings)
    assert not [rec for rec in caplog.records if "k1" in rec.getMessage() or "file-key" in rec.getMessage()]
    with serving(settings(api_key="k1", metrics_require_key=True)) as c:
        assert_error(c.get("/metrics"), 401)
        assert c.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200


# -- engine failure and shutdown ------------------------------------------------------------------------------------


class Fatal(BaseException):
    """Escapes the loop's per-step handler (it catches Exception), as a real fatal fault would."""


class DyingEngine(Engine):
    def start(self, *args, **kwargs):
        raise Fatal("injected")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_turns_health_503_and_fails_what_it_held():
    with serving(settings(), lambda s: DyingEngine.from_hf(tiny_llama(), CharTokenizer())) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code in (500, 503), r.text
        assert "engine" in r.json()["error"]["message"]
        wait_until(lambda: c.get("/health").status_code == 503, timeout=10, what="/health 503")
        assert "Fatal: injected" in c.get("/health").json()["status"]
        assert c.get("/ready").status_code == 503
        assert_error(c.post("/v1/completions", json={"prompt": "hi"}), 503, "engine_failed")


def test_a_dead_engine_exits_the_process_non_zero(tmp_path):
    with rel.tiny_process(tmp_path, die_after=1) as p:
        r = httpx.post(f"{p.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code >= 500
        assert p.proc.wait(timeout=30) == 3
    assert "engine thread died" in p.log.read_text()


def _stream(url: str, body: dict, into: dict, key: str) -> None:
    """A streamed completion; records its last finish_reason (or the HTTP status when refused)."""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "stream": True, **body},
                          timeout=60) as r:
            if r.status_code != 200:
                into[key] = r.status_code
                return
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    reason = json.loads(line[6:])["choices"][0]["finish_reason"]
                    if reason:
                        into[key] = reason
    except httpx.HTTPError as e:
        into[key] = type(e).__name__


def test_sigterm_drains_running_requests_then_aborts_the_rest(tmp_path):
    """20 ms per engine step; a 2 s drain: the short request finishes, the long ones end with 'abort'."""
    env = {"PAINTERS_DRAIN_TIMEOUT_S": "2"}
    with rel.tiny_process(tmp_path, step_delay=0.02, env=env) as p:
        got: dict[str, object] = {}
        clients = [threading.Thread(target=_stream, args=(p.url, {"prompt": "long", "max_tokens": 120,
                                                                  "ignore_eos": True}, got, f"long{i}"))
                   for i in range(2)]
        clients.append(threading.Thread(target=_stream, args=(p.url, {"prompt": "short", "max_tokens": 30,
                                                                       "ignore_eos": True}, got, "short")))
        for t in clients:
            t.start()
        wait_until(lambda: rel.gauges(p.url)[0] == 3, timeout=30, what="three running")
        p.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{p.url}/ready", timeout=2).status_code == 503, timeout=5, what="/ready 503")
        assert httpx.get(f"{p.url}/ready").json() == {"status": "draining"}
        r = httpx.post(f"{p.url}/v1/completions", json={"model": MODEL, "prompt": "new"}, timeout=10)
        assert_error(r, 503, "shutting_down")
        assert httpx.get(f"{p.url}/health").status_code == 200
        for t in clients:
            t.join(timeout=30)
        assert p.proc.wait(timeout=30) == 0
    assert got == {"short": "length", "long0": "abort", "long1": "abort"}, got
    assert "ended with finish_reason 'abort'" in p.log.read_text()


def test_a_probe_still_waiting_at_the_drain_deadline_gets_503(tmp_path):
    """One slot, held past a 1 s drain by a long request: the probe queued behind it ends at the deadline without
    running, and its client gets the drain's 503 (it was a 500, "probe ended without statistics")."""
    env = {"PAINTERS_DRAIN_TIMEOUT_S": "1", "PAINTERS_MAX_NUM_SEQS": "1"}
    with rel.tiny_process(tmp_path, step_delay=0.02, env=env) as p:
        got: dict[str, object] = {}
        long = threading.Thread(target=_stream, args=(p.url, {"prompt": "long", "max_tokens": 110,
                                                              "ignore_eos": True}, got, "long"))
        long.start()
        wait_until(lambda: rel.gauges(p.url)[0] == 1, timeout=30, what="the long request running")
        probe: dict[str, httpx.Response] = {}
        waiting = threading.Thread(target=lambda: probe.setdefault("r", httpx.post(
            f"{p.url}/v1/probe", json={"model": MODEL, "prompts": ["waits"]}, timeout=30)))
        waiting.start()
        wait_until(lambda: rel.gauges(p.url)[1] == 1, timeout=30, what="the probe waiting")
        p.proc.send_signal(signal.SIGTERM)
        for t in (long, waiting):
            t.join(timeout=30)
        assert p.proc.wait(timeout=30) == 0
    assert got == {"long": "abort"}
    assert_error(probe["r"], 503, "shutting_down")


def test_a_second_sigterm_exits_at_once(tmp_path):
    """During a 30 s drain a second SIGTERM ends the process now (0.2 s): uvicorn's own graceful shutdown used to
    wait up to 5 s more for the open connection of a non-streamed request (5.3 s)."""
    env = {"PAINTERS_DRAIN_TIMEOUT_S": "30"}
    with rel.tiny_process(tmp_path, step_delay=0.05, env=env) as p:
        got: dict[str, object] = {}

        def complete() -> None:  # not streamed: uvicorn's graceful wait held the process for such a response
            try:
                got["long"] = httpx.post(f"{p.url}/v1/completions", json={"model": MODEL, "prompt": "long",
                                         "max_tokens": 120, "ignore_eos": True}, timeout=30).status_code
            except httpx.HTTPError as e:
                got["long"] = type(e).__name__

        long = threading.Thread(target=complete)
        long.start()
        wait_until(lambda: rel.gauges(p.url)[0] == 1, timeout=30, what="one running")
        p.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{p.url}/ready", timeout=2).status_code == 503, timeout=5, what="/ready 503")
        p.proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        code = p.proc.wait(timeout=30)
        assert time.monotonic() - t < 3, "the second signal did not end the process at once"
        assert code == -signal.SIGTERM
        long.join(timeout=10)
    assert got.get("long") != 200, got  # cut, not answered: 120 tokens take 6 s at 50 ms a step


# -- soak (bounded; make reliability runs 1,000) --------------------------------------------------------------------


def test_short_soak_has_no_failures_and_no_thread_or_fd_growth(tmp_path):
    with rel.tiny_process(tmp_path) as p:
        result = rel.soak(p.url, p.proc.pid, requests=100, concurrency=8)
        assert rel.gauges(p.url) == (0.0, 0.0, 0.0)
    assert result.failures == [], result.failures[:10]
    assert result.ok > 60 and result.disconnects >= 1, result
    assert not result.leaked, result
    assert abs(result.rss_drift) < 0.10, result.rss_mb
    assert result.idle_after and result.prefix_within_bound, result.prefix_blocks
    assert max(limit for _, limit in result.prefix_blocks) > 0, "the prefix-cache bound is reported"
