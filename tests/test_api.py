"""The HTTP API on a tiny random model through FastAPI's TestClient (the lifespan runs): OpenAI and TGI shapes,
streaming frames, policy selection, service endpoints and every error status in OpenAI's error shape."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.generate import Engine
from server.engine.loop import EngineLoop
from server.settings import Settings
from tests.conftest import CharTokenizer, bos_word_tokenizer, tiny_llama
from tests.serving import MAX_LEN, MODEL, metric_value, serving, settings, tiny_engine, wait_ready

TIMING_HEADERS = ("x-queue-time", "x-prefill-time", "x-decode-time", "x-time-to-first-token", "x-time-per-token",
                  "x-total-time")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
SKIP2 = "skip:2-3"  # canonical form of skip:2 on 6 layers


class ChatCharTokenizer(CharTokenizer):
    """CharTokenizer with a toy chat template, so chat endpoints can run on the tiny model."""

    chat_template = "<{role}>{content}"

    def apply_chat_template(self, messages: list[dict[str, str]], *, tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        text = "".join(self.chat_template.format(**m) for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class TemplatelessTokenizer(CharTokenizer):
    """Like a Hugging Face tokenizer without a chat template: apply_chat_template raises ValueError."""

    chat_template = None

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")


class GatedEngine(Engine):
    """An engine whose loop stops when it admits a sequence until `gate` is set: requests pile up deterministically."""

    def __init__(self, *args: Any, gate: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    def start(self, *args: Any, **kwargs: Any):
        assert self.gate.wait(timeout=60), "test gate never opened"
        return super().start(*args, **kwargs)


def gated(gate: threading.Event) -> Callable[[Settings], Engine]:
    return lambda s: GatedEngine.from_hf(tiny_llama(), CharTokenizer(), gate=gate)


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "presets.yaml"
    path.write_text("fast: skip:2\n")
    return path


@pytest.fixture(scope="module")
def client(presets: Path) -> Iterator[TestClient]:
    with serving(settings(policy_presets=presets)) as c:
        yield c


@pytest.fixture(scope="module")
def chat_client() -> Iterator[TestClient]:
    with serving(settings(), tiny_engine(ChatCharTokenizer())) as c:
        yield c


@pytest.fixture(scope="module")
def templateless_client() -> Iterator[TestClient]:
    with serving(settings(), tiny_engine(TemplatelessTokenizer())) as c:
        yield c


# -- helpers ---------------------------------------------------------------------------------------------------------


def complete(c: TestClient, path: str = "/v1/completions", **body: Any) -> httpx.Response:
    r = c.post(path, json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r


def text_of(c: TestClient, prompt: Any, **body: Any) -> str:
    return complete(c, prompt=prompt, **body).json()["choices"][0]["text"]


def wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# TGI's routes answer in TGI's shape and with its statuses (its router's InferError): OpenAI status -> TGI's
TGI = {400: (422, "validation"), 401: (401, "authentication"), 404: (404, "validation"), 413: (413, "validation"),
       429: (429, "overloaded"), 503: (503, "unavailable")}


def assert_error(r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None,
                 says: tuple[str, ...] = ()) -> dict[str, Any]:
    """An error in OpenAI's shape with this status, or, on TGI's routes, TGI's answer to it."""
    if r.request.url.path in ("/", "/generate", "/generate_stream"):
        return assert_tgi_error(r, *TGI[status], says=says)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if status in ERROR_TYPES:
        assert err["type"] == ERROR_TYPES[status], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    for fragment in says:
        assert fragment in err["message"], (fragment, err["message"])
    return err


def assert_tgi_error(r: httpx.Response, status: int, error_type: str, *, says: tuple[str, ...] = ()) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    assert isinstance(body["error"], str) and body["error"], body
    for fragment in says:
        assert fragment in body["error"], (fragment, body["error"])
    return body


def assert_serves(c: TestClient, **headers: str) -> None:
    """A normal request still succeeds."""
    r = c.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2, "temperature": 0},
               headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def sse_data(r: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order; any other non-blank line fails the test."""
    out = []
    for line in r.text.splitlines():
        if not line.strip() or line.startswith(":"):
            continue
        assert line.startswith("data: "), line
        out.append(line[len("data: "):])
    return out


def sse_json(r: httpx.Response) -> list[dict[str, Any]]:
    data = sse_data(r)
    assert data[-1] == "[DONE]", data[-3:]
    assert "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def stream(c: TestClient, path: str, body: dict[str, Any]) -> httpx.Response:
    r = c.post(path, json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r


def eos_prompt(c: TestClient) -> tuple[list[int], int]:
    """A one-token prompt whose greedy continuation reaches EOS, and how many tokens that takes (EOS included)."""
    prompts = [[k] for k in range(3, 128)]
    choices = complete(c, prompt=prompts, max_tokens=8).json()["choices"]
    hits = [prompts[ch["index"]] for ch in choices if ch["finish_reason"] == "stop"]
    assert hits, "no one-token prompt reaches EOS within 8 tokens on the tiny model"
    used = complete(c, prompt=hits[0], max_tokens=8).json()["usage"]["completion_tokens"]
    return hits[0], used


# -- /v1/completions ---------------------------------------------------------------------------------------------------


def test_completion_shape_usage_and_painters_object(client):
    r = complete(client, prompt="hello", max_tokens=5)
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str) and choice["text"]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    painters = body["painters"]
    assert painters["policy"] == "full" and painters["schedule"] == "schedule:0-5"
    t = painters["timings"]
    assert set(t) == {"queue_s", "prefill_s", "decode_s", "time_to_first_token_s", "time_per_output_token_s", "e2e_s"}
    assert all(v >= 0 for v in t.values())
    assert t["e2e_s"] >= t["decode_s"] and t["time_to_first_token_s"] >= t["prefill_s"]
    assert t["e2e_s"] == pytest.approx(t["time_to_first_token_s"] + t["decode_s"])  # arrival -> last token
    assert t["time_per_output_token_s"] == pytest.approx(t["decode_s"] / 4)


def test_every_prompt_form_gives_the_same_greedy_text(client):
    ids = CharTokenizer().encode("hello")
    as_text = text_of(client, "hello", max_tokens=6)
    assert text_of(client, ids, max_tokens=6) == as_text
    both = complete(client, prompt=["hello", "abc"], max_tokens=6).json()
    assert [ch["index"] for ch in both["choices"]] == [0, 1]
    assert both["choices"][0]["text"] == as_text
    assert both["choices"][1]["text"] == text_of(client, "abc", max_tokens=6)
    as_ids = complete(client, prompt=[ids, CharTokenizer().encode("abc")], max_tokens=6).json()
    assert [ch["text"] for ch in as_ids["choices"]] == [ch["text"] for ch in both["choices"]]
    assert both["usage"] == {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}


def test_n_choices_are_prompt_major(client):
    body = complete(client, prompt=["hello", "abc"], n=2, max_tokens=4).json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
    texts = [ch["text"] for ch in body["choices"]]
    assert texts[0] == texts[1] == text_of(client, "hello", max_tokens=4)  # greedy: both choices agree
    assert texts[2] == texts[3] == text_of(client, "abc", max_tokens=4)
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}


def test_logprobs_top_n(client):
    choice = complete(client, prompt="hello", max_tokens=6, logprobs=3).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert chosen <= 0
        assert 1 <= len(top) <= 3  # distinct ids may decode to the same text and share a key
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely token


def test_echo_with_max_tokens_zero_scores_the_prompt(client):
    body = complete(client, prompt="hello", max_tokens=0, echo=True, logprobs=1).json()
    choice = body["choices"][0]
    assert choice["text"] == "hello" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 5
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}


def test_echo_with_generation_prepends_the_prompt(client):
    plain = complete(client, prompt="hello", max_tokens=3, logprobs=0).json()["choices"][0]
    echoed = complete(client, prompt="hello", max_tokens=3, echo=True, logprobs=0).json()["choices"][0]
    assert echoed["text"] == "hello" + plain["text"]
    assert echoed["logprobs"]["token_logprobs"][5:] == pytest.approx(plain["logprobs"]["token_logprobs"])
    assert echoed["logprobs"]["token_logprobs"][0] is None


def test_echo_beside_prompt_logprobs_keeps_its_own_count_of_alternatives(client):
    """One scoring of the prompt serves both, with the larger count: the echo's logprobs still list `logprobs`
    alternatives, prompt_logprobs its own."""
    body = complete(client, prompt="hello", max_tokens=0, echo=True, logprobs=1, prompt_logprobs=3).json()
    choice = body["choices"][0]
    assert [len(d) for d in choice["logprobs"]["top_logprobs"][1:]] == [1] * 4
    assert [sum(e["rank"] <= 3 for e in d.values()) for d in choice["prompt_logprobs"][1:]] == [3] * 4
    alone = complete(client, prompt="hello", max_tokens=0, echo=True, logprobs=1).json()["choices"][0]
    assert choice["logprobs"] == alone["logprobs"] and "prompt_logprobs" not in alone


def test_stop_strings_cut_the_text(client):
    full = text_of(client, "hello", max_tokens=12)
    stop = full[4:6]
    cut = complete(client, prompt="hello", max_tokens=12, stop=stop).json()["choices"][0]
    assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"
    listed = complete(client, prompt="hello", max_tokens=12, stop=["\x00never", stop]).json()["choices"][0]
    assert listed["text"] == cut["text"] and listed["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return text_of(client, "hello", max_tokens=12, temperature=1.0, seed=seed)

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_seeded_choices_draw_with_their_own_seeds(client):
    """With n > 1 and a seed, choice i draws as a request seeded seed + i (modulo 2**63): the choices differ, and each
    one can be reproduced alone."""
    def texts(seed: int, n: int) -> list[str]:
        body = complete(client, prompt="hello", max_tokens=12, temperature=1.0, seed=seed, n=n).json()
        return [ch["text"] for ch in body["choices"]]

    drawn = texts(7, 3)
    assert drawn == [texts(7 + i, 1)[0] for i in range(3)] and len(set(drawn)) > 1
    assert texts(2**63 - 1, 2) == [texts(2**63 - 1, 1)[0], texts(0, 1)[0]]


def test_eos_ignore_eos_and_min_tokens(client):
    prompt, used = eos_prompt(client)
    stopped = complete(client, prompt=prompt, max_tokens=used + 4).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == used
    ignored = complete(client, prompt=prompt, max_tokens=used + 4, ignore_eos=True).json()
    assert ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["usage"]["completion_tokens"] == used + 4
    held = complete(client, prompt=prompt, max_tokens=used + 4, min_tokens=used + 2).json()
    assert held["usage"]["completion_tokens"] >= used + 2


def test_stop_token_ids_end_the_request_and_neutral_values_of_refused_fields_pass(client):
    """vLLM's stop_token_ids (documented, and silently dropped): the request ends at the first of them, which is
    kept; min_tokens holds it off. Refused fields at their neutral value are no refusal."""
    free = client.post("/generate", json={"inputs": "hello", "parameters": {
        "max_new_tokens": 8, "ignore_eos": True, "details": True}}).json()
    ids = [t["id"] for t in free["details"]["tokens"]]
    stop_at = ids[3]
    got = complete(client, prompt="hello", max_tokens=8, stop_token_ids=[stop_at], logprobs=0).json()
    assert got["choices"][0]["finish_reason"] == "stop" and got["usage"]["completion_tokens"] == ids.index(stop_at) + 1
    held = complete(client, prompt="hello", max_tokens=8, stop_token_ids=[stop_at],
                    min_tokens=ids.index(stop_at) + 1).json()
    assert held["usage"]["completion_tokens"] > ids.index(stop_at) + 1
    neutral = complete(client, prompt="hello", max_tokens=2, repetition_penalty=1.0, stop_token_ids=None)
    assert neutral.status_code == 200
    r = client.post("/generate", json={"inputs": "hello", "parameters": {
        "max_new_tokens": 2, "repetition_penalty": 1.0, "watermark": False, "best_of": 1, "truncate": None}})
    assert r.status_code == 200, r.text


def test_tgi_truncate_keeps_the_inputs_last_tokens(client):
    """TGI's `truncate` (it was refused): the answer is the one to the input's last k tokens, its prefill details list
    those k, and a size past the context or below 1 is TGI's 422 naming it."""
    long = "a long input that would not fit the context " * 4  # 176 tokens against max_model_len 128
    params = {"max_new_tokens": 3, "truncate": 10, "details": True, "decoder_input_details": True}
    cut = client.post("/generate", json={"inputs": long, "parameters": params}).json()
    tail = client.post("/generate", json={"inputs": long[-10:], "parameters": {**params, "truncate": None}}).json()
    assert cut["generated_text"] == tail["generated_text"]
    assert [t["id"] for t in cut["details"]["prefill"]] == [t["id"] for t in tail["details"]["prefill"]]
    assert len(cut["details"]["prefill"]) == 10
    for bad, says in ((MAX_LEN + 1, f"less than {MAX_LEN + 1}"), (0, "greater than or equal to 1")):
        r = client.post("/generate", json={"inputs": "hi", "parameters": {"truncate": bad}})
        assert_tgi_error(r, 422, "validation", says=(says,))


def test_tgi_typical_p_samples_and_repeats_with_its_seed(client):
    """TGI's typical_p (it was refused): alone it makes the request draw (TGI's has_warpers), a seed repeats the
    draw, and 1 asks for nothing (greedy, as without it)."""
    def generate(**params):
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 8, "ignore_eos": True, **params}}
        r = client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()["generated_text"]

    greedy = generate()
    drawn = {generate(typical_p=0.9, seed=s) for s in range(4)}
    assert generate(typical_p=0.9, seed=2) == generate(typical_p=0.9, seed=2)
    assert len(drawn) > 1 and generate(typical_p=1.0) == greedy


def test_truncate_prompt_tokens_lets_a_prompt_longer_than_the_context_in(client):
    """The prompt is cut before its length is checked, as in vLLM: a prompt past max_model_len is answered from its
    last k tokens, which usage counts."""
    long = "ab" * MAX_LEN
    assert_error(client.post("/v1/completions", json={"prompt": long, "max_tokens": 1}), 400,
                 code="context_length_exceeded")
    body = complete(client, prompt=long, max_tokens=3, truncate_prompt_tokens=10).json()
    assert body["usage"]["prompt_tokens"] == 10
    assert body["choices"][0]["text"] == text_of(client, CharTokenizer().encode(long)[-10:], max_tokens=3)


def test_logit_bias_and_allowed_token_ids_are_served(client, chat_client):
    """CharTokenizer writes token i >= 3 as chr(97 + (i - 3) % 26): token 10 is "h", 11 "i". A +100 bias makes every
    greedy token that one; allowed_token_ids restrict every token, drawn or greedy, on both OpenAI routes."""
    biased = complete(client, prompt="hello", max_tokens=4, ignore_eos=True, logit_bias={"10": 100}).json()
    assert biased["choices"][0]["text"] == "hhhh"
    for c, path, prompt in ((client, "/v1/completions", {"prompt": "hello"}),
                            (chat_client, "/v1/chat/completions", {"messages": CHAT})):
        body = complete(c, path, **prompt, max_tokens=8, ignore_eos=True, temperature=1.0, seed=3, n=2,
                        allowed_token_ids=[10, 11], min_p=0.0, presence_penalty=0.5).json()
        texts = [ch["text"] if "text" in ch else ch["message"]["content"] for ch in body["choices"]]
        assert all(len(t) == 8 and set(t) <= {"h", "i"} for t in texts), texts


def test_penalties_are_served_and_each_choice_counts_its_own_output(client):
    """n choices draw with seed, seed + 1, ...: with penalties on, each is still the answer of its own seed alone,
    so no choice counts another's tokens."""
    def texts(seed: int, n: int) -> list[str]:
        body = complete(client, prompt="hello", max_tokens=12, ignore_eos=True, temperature=1.0, seed=seed, n=n,
                        frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.5, min_p=0.05).json()
        return [ch["text"] for ch in body["choices"]]

    assert texts(11, 3) == [texts(11 + i, 1)[0] for i in range(3)]
    plain = complete(client, prompt="abababab", max_tokens=12, ignore_eos=True).json()["choices"][0]["text"]
    fresh = complete(client, prompt="abababab", max_tokens=12, ignore_eos=True, frequency_penalty=2,
                     presence_penalty=2).json()["choices"][0]["text"]
    assert fresh != plain and max(map(fresh.count, fresh)) < max(map(plain.count, plain)), (plain, fresh)


def test_tgi_penalties_are_the_engines_own(client):
    """/generate's repetition_penalty and frequency_penalty (TGI's: the share of prompt and output that is the
    token) give what the engine gives for the same prompt ids, and change the answer."""
    from server.engine.sampling import SamplingParams

    def generate(**parameters: Any) -> tuple[list[int], list[int]]:
        body = client.post("/generate", json={"inputs": "abcabc", "parameters": {
            "max_new_tokens": 10, "ignore_eos": True, "details": True, "decoder_input_details": True,
            **parameters}}).json()["details"]
        return [t["id"] for t in body["prefill"]], [t["id"] for t in body["tokens"]]

    prompt, plain = generate()
    _, penalized = generate(repetition_penalty=3.0, frequency_penalty=2.0)
    want = Engine.from_hf(tiny_llama(), CharTokenizer()).generate([prompt], params=SamplingParams(
        max_tokens=10, ignore_eos=True, repetition_penalty=3.0, frequency_penalty=2.0, frequency_of="sequence"))[0]
    assert penalized == want.token_ids and penalized != plain


def test_finish_reason_length(client):
    body = complete(client, prompt="hello", max_tokens=3, ignore_eos=True).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3


# -- streaming -------------------------------------------------------------------------------------------------------


def test_stream_completion_frames(client):
    expected = text_of(client, "hello", max_tokens=8)
    r = stream(client, "/v1/completions", {"prompt": "hello", "max_tokens": 8, "stream": True,
                                           "stream_options": {"include_usage": True}})
    assert r.headers["x-painters-policy"] == "full"
    chunks = sse_json(r)
    *content, usage = chunks
    for chunk in content:
        assert chunk["object"] == "text_completion" and chunk["model"] == MODEL and chunk["id"] == chunks[0]["id"]
        assert chunk["usage"] is None
        [choice] = chunk["choices"]
        assert set(choice) >= {"index", "text", "logprobs", "finish_reason"} and choice["index"] == 0
    assert [c["choices"][0]["finish_reason"] for c in content[:-1]] == [None] * (len(content) - 1)
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert content[-1]["painters"]["policy"] == "full"
    assert "".join(c["choices"][0]["text"] for c in content) == expected
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}


def test_streamed_chunks_carry_the_server_timings_so_far(client):
    chunks = sse_json(stream(client, "/v1/completions", {"prompt": "hello", "max_tokens": 6, "ignore_eos": True,
                                                         "stream": True}))
    timings = [c["painters"]["timings"] for c in chunks]
    assert all(c["painters"]["policy"] == "full" for c in chunks)
    assert all(t["time_to_first_token_s"] > 0 for t in timings)
    decode = [t["decode_s"] for t in timings]
    assert decode == sorted(decode) and decode[-1] > 0  # the figures so far grow to the final ones
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_without_usage_and_with_logprobs_and_n(client):
    expected = text_of(client, "abc", max_tokens=5)
    chunks = sse_json(stream(client, "/v1/completions", {"prompt": "abc", "max_tokens": 5, "n": 2, "logprobs": 2,
                                                         "stream": True}))
    assert all(c["choices"] and "usage" not in c for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(ch["text"] for ch in mine) == expected
        assert mine[-1]["finish_reason"] == "length"
        tokens = [t for ch in mine for t in ch["logprobs"]["tokens"]]
        assert "".join(tokens) == expected
        offsets = [o for ch in mine for o in ch["logprobs"]["text_offset"]]
        assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_streamed_usage_equals_non_streamed_usage_with_n(client):
    body = {"prompt": "hello", "max_tokens": 3, "n": 2}
    plain = complete(client, **body).json()["usage"]
    streamed = sse_json(stream(client, "/v1/completions", {**body, "stream": True,
                                                           "stream_options": {"include_usage": True}}))[-1]["usage"]
    assert streamed == plain


def test_continuous_usage_counts_each_choices_tokens_so_far(client):
    """vLLM's stream_options.continuous_usage_stats: with include_usage every chunk carries its choice's usage so
    far, and the closing usage chunk is the request's, as without it. Alone it adds nothing (vLLM reads it only with
    include_usage)."""
    body = {"prompt": "hello", "max_tokens": 5, "n": 2, "ignore_eos": True, "logprobs": 0, "stream": True}
    chunks = sse_json(stream(client, "/v1/completions", {**body, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}}))
    *content, last = chunks
    for index in (0, 1):
        seen = 0
        for c in content:
            if c["choices"][0]["index"] == index:
                seen += len(c["choices"][0]["logprobs"]["tokens"])
                assert c["usage"] == {"prompt_tokens": 5, "completion_tokens": seen, "total_tokens": 5 + seen}
        assert seen == 5
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 5, "completion_tokens": 10,
                                                       "total_tokens": 15}
    alone = sse_json(stream(client, "/v1/completions", {**body, "stream_options": {"continuous_usage_stats": True}}))
    assert alone and all("usage" not in c for c in alone)


def test_stream_honours_stop_strings(client):
    full = text_of(client, "hello", max_tokens=12)
    stop = full[4:6]
    chunks = sse_json(stream(client, "/v1/completions", {"prompt": "hello", "max_tokens": 12, "stop": [stop],
                                                         "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[: full.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# -- chat ------------------------------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_chat_without_a_chat_template_is_a_clear_400(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
    assert_error(r, 400, param="messages", says=("chat template", "/v1/completions"))
    assert_serves(client)


def test_chat_with_an_hf_tokenizer_lacking_a_template_is_a_clear_400(templateless_client):
    r = templateless_client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
    assert_error(r, 400, param="messages", says=("chat template",))
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    r = templateless_client.post("/v1/chat/completions", json={"model": MODEL, "messages": image})
    assert_error(r, 400, param="messages", says=("text content",))
    assert_serves(templateless_client)


def test_tokenize_messages_without_a_chat_template_is_a_clear_400(templateless_client):
    r = templateless_client.post("/tokenize", json={"messages": CHAT})
    assert_error(r, 400, says=("chat template",))


def test_tokenize_messages_with_an_image_part_is_a_clear_400(chat_client):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(chat_client.post("/tokenize", json={"messages": image}), 400, says=("text content",))


def test_chat_completion_shape(chat_client):
    r = complete(chat_client, "/v1/chat/completions", messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=2)
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert len(content) == 5 and "".join(t["token"] for t in content) == choice["message"]["content"]
    for t in content:
        assert t["bytes"] == list(t["token"].encode()) and 1 <= len(t["top_logprobs"]) <= 2
        assert t["logprob"] == pytest.approx(max(a["logprob"] for a in t["top_logprobs"]), abs=1e-5)
    templated = ChatCharTokenizer().apply_chat_template(CHAT)
    n = len(templated)
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 5, "total_tokens": n + 5}
    # The chat prompt is exactly the templated text: the same greedy continuation as a plain completion of it.
    assert choice["message"]["content"] == text_of(chat_client, templated, max_tokens=5)
    assert r.headers["x-painters-policy"] == "full"


def test_chat_max_completion_tokens_and_n(chat_client):
    body = complete(chat_client, "/v1/chat/completions", messages=CHAT, max_completion_tokens=3, n=2).json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 6


def test_chat_continuous_usage_counts_from_the_role_chunk(chat_client):
    chunks = sse_json(stream(chat_client, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 6, "ignore_eos": True, "logprobs": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    *content, last = chunks
    prompt = last["usage"]["prompt_tokens"]
    assert prompt > 0 and content[0]["usage"] == {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
    seen = 0
    for c in content[1:]:
        logprobs = c["choices"][0]["logprobs"]
        seen += len(logprobs["content"]) if logprobs else 0
        assert c["usage"] == {"prompt_tokens": prompt, "completion_tokens": seen, "total_tokens": prompt + seen}
    assert seen == 6 and last["usage"]["completion_tokens"] == 6


def test_chat_stream_frames(chat_client):
    expected = complete(chat_client, "/v1/chat/completions", messages=CHAT,
                        max_tokens=6).json()["choices"][0]["message"]["content"]
    chunks = sse_json(stream(chat_client, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}))
    *content, usage = chunks
    assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for chunk in content:
        assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == expected
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6


def test_tokenize_messages_uses_the_template(chat_client):
    body = chat_client.post("/tokenize", json={"messages": CHAT}).json()
    assert body["tokens"] == CharTokenizer().encode(ChatCharTokenizer().apply_chat_template(CHAT))


# -- native (TGI-shaped) -----------------------------------------------------------------------------------------------


def test_generate_details(client):
    expected = text_of(client, "hello", max_tokens=4)
    r = client.post("/generate", json={"inputs": "hello", "parameters": {
        "max_new_tokens": 4, "details": True, "decoder_input_details": True, "top_n_tokens": 2}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generated_text"] == expected
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 4
    assert [t["text"] for t in details["tokens"]] == list(expected)
    for t in details["tokens"]:
        assert set(t) == {"id", "text", "logprob", "special"} and 0 <= t["id"] < 128 and t["logprob"] <= 0
    assert [t["id"] for t in details["prefill"]] == CharTokenizer().encode("hello")
    assert details["prefill"][0]["logprob"] is None
    assert len(details["top_tokens"]) == 4 and all(len(top) == 2 for top in details["top_tokens"])
    assert [top[0]["id"] for top in details["top_tokens"]] == [t["id"] for t in details["tokens"]]
    assert body["painters"]["policy"] == "full"
    assert all(h in r.headers for h in TIMING_HEADERS)


def test_generate_reports_the_seed_it_drew_with(client):
    """As TGI: a sampling request's details carry its seed, the one chosen for it when it sent none, and that seed
    draws the same text again; a greedy request's seed is null."""
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 8, "do_sample": True, "details": True}}
    drawn = [client.post("/generate", json=body).json() for _ in range(2)]
    seeds = [d["details"]["seed"] for d in drawn]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds) and seeds[0] != seeds[1]
    for d, seed in zip(drawn, seeds):
        again = client.post("/generate", json={**body, "parameters": {**body["parameters"], "seed": seed}}).json()
        assert again["generated_text"] == d["generated_text"] and again["details"]["seed"] == seed
    r = client.post("/generate_stream", json=body)
    assert isinstance([json.loads(d) for d in sse_data(r)][-1]["details"]["seed"], int)
    greedy = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2, "details": True,
                                                                              "seed": 4}}).json()
    assert greedy["details"]["seed"] is None


def test_generate_full_text_stop_sequence_and_eos(client):
    full = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 12}}).json()
    text = full["generated_text"]
    r = client.post("/generate", json={"inputs": "hello", "parameters": {
        "max_new_tokens": 12, "stop": [text[4:6]], "return_full_text": True, "details": True}}).json()
    assert r["generated_text"] == "hello" + text[: text.find(text[4:6])]
    assert r["details"]["finish_reason"] == "stop_sequence"
    prompt, used = eos_prompt(client)
    eos = client.post("/generate", json={"inputs": chr(prompt[0] - 3),  # encodes to `prompt`
                                         "parameters": {"max_new_tokens": used + 3, "details": True}}).json()
    assert eos["details"]["finish_reason"] == "eos_token" and eos["details"]["tokens"][-1]["id"] == 2
    assert eos["details"]["tokens"][-1]["special"] is True


def test_generate_stream_events(client):
    expected = text_of(client, "hello", max_tokens=5)
    for path, extra in (("/generate_stream", {}), ("/generate", {"stream": True})):
        r = client.post(path, json={"inputs": "hello", "parameters": {"max_new_tokens": 5}, **extra})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(d) for d in sse_data(r)]
        assert [e["index"] for e in events] == list(range(5))
        assert "".join(e["token"]["text"] for e in events) == expected
        assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
        assert events[-1]["generated_text"] == expected
        assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 5, "seed": None}
        assert events[-1]["painters"]["policy"] == "full"


# -- policy selection --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", [
    {"policy": "skip:2"},
    {"policy": {"kind": "skip", "count": 2}},
    {"policy": "skip:2-3"},
    {"model": "tiny@skip:2"},
    {"model": "tiny@fast"},  # preset
    {"model": "tiny@full", "policy": "fast"},  # the body field wins over the suffix
])
def test_policy_selection(client, how):
    reference = complete(client, prompt="hello", max_tokens=6, policy="skip:2").json()["choices"][0]["text"]
    r = complete(client, **{"prompt": "hello", "max_tokens": 6, **how})
    body = r.json()
    assert body["painters"]["policy"] == SKIP2 and body["painters"]["schedule"] == "schedule:0-1,4-5"
    assert r.headers["x-painters-policy"] == SKIP2
    assert body["choices"][0]["text"] == reference
    assert body["model"] == how.get("model", MODEL)  # the name the client used is echoed back


def test_default_policy_and_timing_headers(client):
    r = complete(client, prompt="hello", max_tokens=4)
    assert r.json()["painters"]["policy"] == "full" and r.headers["x-painters-policy"] == "full"
    values = {h: float(r.headers[h]) for h in TIMING_HEADERS}
    assert all(v >= 0 for v in values.values())
    assert values["x-total-time"] >= values["x-decode-time"]
    assert values["x-total-time"] >= values["x-prefill-time"]
    assert r.headers["x-prompt-tokens"] == "5" and r.headers["x-generated-tokens"] == "4"


def test_suffix_overrides_the_default_and_policies_change_the_output(client):
    texts = {p: complete(client, prompt="hello world", max_tokens=10, model=f"tiny@{p}").json() for p in
             ("full", "skip:2", "pairs", "loop:1-4x2")}
    assert [t["painters"]["policy"] for t in texts.values()] == ["full", SKIP2, "pairs:1-4", "loop:1-4x2"]
    assert len({t["choices"][0]["text"] for t in texts.values()}) > 1


def test_native_policy_parameter(client):
    r = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3, "policy": "pairs"}})
    assert r.json()["painters"]["policy"] == "pairs:1-4" and r.headers["x-painters-policy"] == "pairs:1-4"
    r = client.post("/generate", json={"inputs": "hello", "model": "tiny@fast", "parameters": {"max_new_tokens": 3}})
    assert r.json()["painters"]["policy"] == SKIP2


def test_concurrent_mixed_policies_equal_sequential(client):
    jobs = [(p, prompt) for p in ("full", "skip:2", "pairs", "loop:1-4x2") for prompt in ("hello", "a longer prompt")]

    def run(job: tuple[str, str]) -> str:
        return text_of(client, job[1], max_tokens=8, policy=job[0], ignore_eos=True)

    sequential = [run(j) for j in jobs]
    before = batched_steps(client)
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(run, jobs))
    assert concurrent == sequential
    assert batched_steps(client) > before, "no engine step ran more than one sequence: nothing was batched"


def batched_steps(c: TestClient) -> float:
    """Engine steps so far that decoded more than one sequence (batch_size histogram: all minus the le=1 bucket)."""
    text = c.get("/metrics").text
    return (metric_value(text, "painters:batch_size_count", model=MODEL)
            - metric_value(text, "painters:batch_size_bucket", model=MODEL, le="1.0"))


# -- service and tokenizer endpoints -------------------------------------------------------------------------------


def test_models_lists_base_model_and_presets(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {MODEL, "tiny@fast"}
    assert by_id[MODEL]["object"] == "model" and by_id[MODEL]["policy"] == "full"
    assert by_id[MODEL]["max_model_len"] == MAX_LEN
    assert by_id["tiny@fast"]["policy"] == SKIP2 and by_id["tiny@fast"]["root"] == MODEL


def test_policies(client):
    body = client.get("/policies").json()
    assert body["num_layers"] == 6 and body["layer_range"] == "0-5" and body["default_policy"] == "full"
    assert body["presets"] == {"fast": SKIP2}
    assert {k["kind"] for k in body["kinds"]} >= {"full", "skip", "pairs", "parallel", "loop", "schedule"}
    # the examples (the playground's suggestions) fit this model's 6 layers: they were written for 30
    assert len(body["examples"]) == 11
    for example in body["examples"]:
        r = client.post("/v1/schedule", json={"model": MODEL, "policy": example})
        assert r.status_code == 200, (example, r.text)


def test_tokenize_detokenize_and_tokenizer_info(client):
    r = client.post("/tokenize", json={"prompt": "abc"}).json()
    assert r == {"tokens": CharTokenizer().encode("abc"), "count": 3, "max_model_len": MAX_LEN}
    # vLLM's return_token_strs; a tokenizer without vocabulary strings gives each token's text
    r = client.post("/tokenize", json={"prompt": "abc", "return_token_strs": True}).json()
    assert r["token_strs"] == [CharTokenizer().decode([t]) for t in r["tokens"]] and r["count"] == 3
    assert client.post("/tokenize", json={"prompt": "abc", "model": "tiny@skip:2"}).status_code == 200
    assert client.post("/detokenize", json={"tokens": [3, 4, 5]}).json() == {"prompt": "abc"}
    info = client.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "CharTokenizer" and info["vocab_size"] == 128
    assert info["eos_token_id"] == 2 and info["bos_token_id"] == 1 and info["model_max_length"] == MAX_LEN
    assert info["chat_template"] is None


def test_chat_can_continue_the_final_assistant_message():
    """vLLM's continue_final_message: the prompt ends inside the last (assistant) message, so the model continues it.
    The fields were dropped: the prompt closed that message and opened a new one."""
    tok = bos_word_tokenizer()
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello world"}]
    continued = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=False,
                                        continue_final_message=True)["input_ids"]
    opened = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert continued != opened and tok.decode(continued).endswith("hello world")
    with serving(settings(), tiny_engine(tok)) as c:
        body = {"model": MODEL, "messages": chat, "max_tokens": 1, "temperature": 0}
        assert chat_usage(c, body) == len(opened)
        assert chat_usage(c, {**body, "add_generation_prompt": False, "continue_final_message": True}) == len(continued)
        assert_error(c.post("/v1/chat/completions", json={**body, "continue_final_message": True}), 400,
                     param="continue_final_message", says=("add_generation_prompt=false",))


@pytest.mark.parametrize("stream", [False, True])
def test_a_structured_output_no_token_can_write_is_a_400_naming_it(stream):
    """The word tokenizer has no token that writes "{" or a digit: JSON, a required tool call or a digits regex cannot
    start. That was a 500 "sampling failed" (the grammar left every logit -inf); it is the request's own: a 400
    no_token_allowed (an error frame when streamed), and the server answers the next request."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    asks = [("/v1/completions", {"prompt": "hello world", "response_format": {"type": "json_object"}}),
            ("/v1/completions", {"prompt": "hello world", "structured_outputs": {"regex": "[0-9]+"}}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                                      "tool_choice": "required"})]
    with serving(settings(), tiny_engine(bos_word_tokenizer())) as c:
        for path, ask in asks:
            r = c.post(path, json={"model": MODEL, "max_tokens": 4, "stream": stream, **ask})
            if stream:
                assert r.status_code == 200, r.text
                frames = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
                assert "error" not in frames[0] or len(frames) == 1, frames  # chat's role chunk may come first
                err = frames[-1]["error"]
            else:
                assert r.status_code == 400, (path, r.text)
                err = r.json()["error"]
            assert err["code"] == "no_token_allowed", err
            assert "the structured output allows no token of this model's vocabulary" in err["message"], err
        assert complete(c, prompt="hello world", max_tokens=2).status_code == 200


def test_tokenize_messages_can_continue_the_final_assistant_message():
    """/tokenize of messages counts what chat runs: with vLLM's continue_final_message too (it was ignored, and the
    ids closed the final message)."""
    tok = bos_word_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"  # closes each
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello world"}]
    continued = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=False,
                                        continue_final_message=True)["input_ids"]
    closed = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=False)["input_ids"]
    assert closed == [*continued, tok.eos_token_id]
    with serving(settings(), tiny_engine(tok)) as c:
        body = {"messages": chat, "add_generation_prompt": False, "continue_final_message": True}
        assert c.post("/tokenize", json=body).json()["tokens"] == continued
        assert_error(c.post("/tokenize", json={"messages": chat, "continue_final_message": True}), 400,
                     param="continue_final_message", says=("add_generation_prompt=false",))


def chat_usage(c: TestClient, body: dict[str, Any]) -> int:
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def test_prompt_ids_are_the_tokenizers_with_its_default_special_tokens():
    """A tokenizer that adds <bos> by default (Gemma's): completions, /generate and /tokenize run the ids the tokenizer
    gives; chat and /tokenize of messages run its template's ids, whose <bos> is not added twice."""
    tok = bos_word_tokenizer()
    want = tok("hello world").input_ids
    chat = [{"role": "user", "content": "hi there"}]
    chat_ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert want[0] == tok.bos_token_id and chat_ids.count(tok.bos_token_id) == 1
    with serving(settings(), tiny_engine(tok)) as c:
        assert c.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"] == want
        no_special = c.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
        assert no_special["tokens"] == want[1:]
        assert complete(c, prompt="hello world", max_tokens=1).json()["usage"]["prompt_tokens"] == len(want)
        r = c.post("/generate", json={"inputs": "hello world", "parameters": {
            "max_new_tokens": 1, "decoder_input_details": True, "details": True}})
        assert [t["id"] for t in r.json()["details"]["prefill"]] == want
        assert c.post("/tokenize", json={"messages": chat}).json()["tokens"] == chat_ids
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": chat, "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(chat_ids)


def test_health_ready_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "model": MODEL}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/generate", "/generate_stream", "/tokenize",
            "/detokenize", "/tokenizer_info", "/policies", "/health", "/ready", "/metrics"} <= set(paths)


def test_openapi_describes_the_newer_fields(client):
    """Tool calling, bad_words, beam search and structured outputs' additions, as a client generated from
    /openapi.json sees them: each field present where it is taken, typed, and described (what it does, or where it
    is refused)."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    fields = {"ChatCompletionRequest": ("tools", "tool_choice", "parallel_tool_calls", "bad_words", "use_beam_search",
                                        "length_penalty", "response_format", "structured_outputs",
                                        "guided_decoding_backend"),
              "CompletionRequest": ("tools", "tool_choice", "bad_words", "use_beam_search", "length_penalty",
                                    "response_format", "guided_decoding_backend"),
              "TokenizeRequest": ("tools",)}
    for model, names in fields.items():
        properties = schemas[model]["properties"]
        for name in names:
            assert properties.get(name, {}).get("description"), (model, name, properties.get(name))
        assert "structural_tag" in properties.get("response_format", {}).get("description", "structural_tag")
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == ["text", "json_object", "json_schema",
                                                                       "structural_tag"]
    assert "$ref" in str(schemas["ChatCompletionRequest"]["properties"]["tools"])  # typed, not "any"


def test_metrics_count_requests_by_policy_and_errors(client):
    def scrape() -> str:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text

    labels = {"model": MODEL, "policy": SKIP2, "finished_reason": "length"}
    before = scrape()
    complete(client, prompt="hello", max_tokens=3, policy="skip:2")
    client.post("/v1/completions", json={"prompt": "x", "policy": "bogus"})
    after = scrape()
    assert metric_value(after, "painters:request_success_total", **labels) == \
        metric_value(before, "painters:request_success_total", **labels) + 1
    assert metric_value(after, "painters:generation_tokens_total", model=MODEL, policy=SKIP2) == \
        metric_value(before, "painters:generation_tokens_total", model=MODEL, policy=SKIP2) + 3
    assert metric_value(after, "painters:request_errors_total", status="400") == \
        metric_value(before, "painters:request_errors_total", status="400") + 1
    assert metric_value(after, "painters:time_to_first_token_seconds_count", policy=SKIP2) >= 1
    assert "painters:num_requests_running" in after and "painters:kv_slots_usage_perc" in after


# -- errors ----------------------------------------------------------------------------------------------------------

ALLOWED = ("allowed forms", "0-5")
ERRORS = [
    # (id, path, body: dict or raw str, status, code, param, message fragments)
    ("bad-policy", "/v1/completions", {"prompt": "x", "policy": "bogus"}, 400, "invalid_policy", "policy", ALLOWED),
    ("policy-out-of-range", "/v1/completions", {"prompt": "x", "policy": "skip:2-9"}, 400, "invalid_policy",
     "policy", ALLOWED),
    ("too-many-skipped", "/v1/completions", {"prompt": "x", "policy": "skip:9"}, 400, "invalid_policy", "policy",
     ALLOWED),
    ("bad-policy-object", "/v1/completions", {"prompt": "x", "policy": {"kind": "nope"}}, 400, "invalid_policy",
     "policy", ("full",)),
    ("bad-policy-suffix", "/v1/completions", {"prompt": "x", "model": "tiny@bogus"}, 400, "invalid_policy", "policy",
     ALLOWED),
    ("empty-suffix", "/v1/completions", {"prompt": "x", "model": "tiny@"}, 400, None, "model", ALLOWED),
    ("bad-native-policy", "/generate", {"inputs": "x", "parameters": {"policy": "skip:2-9"}}, 400, "invalid_policy",
     "policy", ALLOWED),
    ("bad-json", "/v1/completions", '{"prompt": "x",', 400, None, None, ()),
    ("no-body", "/v1/completions", "", 400, None, None, ()),
    ("max-tokens-type", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, None, "max_tokens", ()),
    ("prompt-type", "/v1/completions", {"prompt": 5}, 400, None, None, ("prompt",)),
    ("policy-type", "/v1/completions", {"prompt": "x", "policy": 5}, 400, None, None, ("policy",)),
    ("n-zero", "/v1/completions", {"prompt": "x", "n": 0}, 400, None, "n", ()),
    ("negative-temperature", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, None, "temperature", ()),
    ("temperature-type", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, None, "temperature", ()),
    ("top-p-zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, None, "top_p", ()),
    ("logprobs-21", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, None, "logprobs", ()),
    # the sampling fields served: a bad value names what is allowed
    ("presence-penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, None, "presence_penalty",
     ("[-2, 2]",)),
    ("frequency-penalty", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                   "frequency_penalty": -3}, 400, None, "frequency_penalty",
     ("[-2, 2]",)),
    ("repetition-penalty", "/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, None,
     "repetition_penalty", ("(0, inf)",)),
    ("min-p", "/v1/completions", {"prompt": "x", "min_p": 1.5}, 400, None, "min_p", ("[0, 1]",)),
    ("logit-bias-value", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, None, None,
     ("logit_bias", "[-100, 100]")),
    ("logit-bias-key", "/v1/completions", {"prompt": "x", "logit_bias": {"five": 1}}, 400, None, "logit_bias",
     ("token ids", "'five'")),
    ("logit-bias-negative-key", "/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}, 400, None, "logit_bias",
     ("token ids",)),
    ("logit-bias-out-of-vocab", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 1, "128": 1}}, 400,
     "invalid_sampling_parameters", None, ("logit_bias", "[128]", "0-127")),
    ("logit-bias-too-many", "/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400,
     None, "logit_bias", ("at most 300",)),
    ("allowed-token-ids-empty", "/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400, None,
     "allowed_token_ids", ("at least 1",)),
    ("allowed-token-ids-negative", "/v1/completions", {"prompt": "x", "allowed_token_ids": [5, -1]}, 400, None, None,
     ("allowed_token_ids", "greater than or equal to 0")),
    ("allowed-token-ids-out-of-vocab", "/v1/completions", {"prompt": "x", "allowed_token_ids": [5, 500]}, 400,
     "invalid_sampling_parameters", None, ("allowed_token_ids", "[500]", "0-127")),
    ("allowed-token-ids-only-eos", "/v1/completions", {"prompt": "x", "allowed_token_ids": [2], "min_tokens": 3}, 400,
     "invalid_sampling_parameters", None, ("only stop tokens", "min_tokens (3)")),
    ("tgi-repetition-penalty", "/generate", {"inputs": "x", "parameters": {"repetition_penalty": 0}}, 400, None,
     None, ("repetition_penalty", "(0, inf)")),
    ("tgi-frequency-penalty", "/generate", {"inputs": "x", "parameters": {"frequency_penalty": 2.5}}, 400, None,
     None, ("frequency_penalty", "[-2, 2]")),
    # what the server cannot do is refused by name, never silently ignored
    ("best-of", "/v1/completions", {"prompt": "x", "best_of": 3}, 400, None, "best_of", ("n",)),
    ("suffix", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400, None, "suffix", ("fill-in-the-middle",)),
    ("vllm-length-penalty", "/v1/completions", {"prompt": "x", "length_penalty": 0.5}, 400, None,
     "length_penalty", ("only applies with use_beam_search",)),
    ("vllm-truncate-zero", "/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0}, 400, None,
     "truncate_prompt_tokens", ("greater than or equal to 1",)),
    ("vllm-truncate-type", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "truncate_prompt_tokens": "all"}, 400, None,
     "truncate_prompt_tokens", ()),
    ("vllm-truncate-past-context", "/v1/completions", {"prompt": "x", "truncate_prompt_tokens": MAX_LEN + 1}, 400,
     None, "truncate_prompt_tokens", (f"[1, {MAX_LEN}]",)),
    ("vllm-skip-special-tokens-type", "/v1/completions", {"prompt": "x", "skip_special_tokens": "maybe"}, 400, None,
     "skip_special_tokens", ()),
    # structured outputs: what is wrong with the request itself, before any compiling (tests/test_e2e.py compiles)
    ("structured-two-kinds", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                      "guided_json": {"type": "object"}, "guided_regex": "a+"}, 400,
     None, None, ("at most one structured output", "guided_json and guided_regex")),
    ("structured-two-fields", "/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"},
                                                  "structured_outputs": {"choice": ["a"]}}, 400, None, None,
     ("response_format and structured_outputs.choice",)),
    ("structured-two-in-one", "/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "grammar": "b"}},
     400, None, None, ("structured_outputs.regex and structured_outputs.grammar",)),
    ("structured-unknown-option", "/v1/completions", {"prompt": "x", "structured_outputs": {"whitespace_pattern": " "}},
     400, None, "structured_outputs", ("whitespace_pattern is not supported", "json, regex, choice, grammar",
                                       "disable_any_whitespace")),
    ("structural-tag-not-json", "/v1/completions", {"prompt": "x", "structured_outputs": {"structural_tag": "{'a'"}},
     400, None, None, ("structured_outputs.structural_tag must be JSON text",)),
    ("guided-backend-other", "/v1/completions", {"prompt": "x", "guided_decoding_backend": "outlines"}, 400, None,
     "guided_decoding_backend", ("one structured-output backend is xgrammar", "'xgrammar:disable-any-whitespace'")),
    ("guided-backend-option", "/v1/completions", {"prompt": "x", "guided_decoding_backend": "xgrammar:no-whitespace"},
     400, None, "guided_decoding_backend", ("unknown option no-whitespace", "disable-any-whitespace, no-fallback")),
    ("guided-json-not-json", "/v1/completions", {"prompt": "x", "guided_json": "{'type': 'object'}"}, 400, None,
     "guided_json", ("must be JSON text",)),
    ("json-schema-without-schema", "/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema"}},
     400, None, "response_format", ("needs json_schema",)),
    ("response-format-structural-tag", "/v1/completions", {"prompt": "x",
                                                           "response_format": {"type": "structural_tag"}}, 400, None,
     "response_format", ("'structural_tag' needs format", "structures", "triggers")),
    ("response-format-unknown", "/v1/completions", {"prompt": "x", "response_format": {"type": "xml"}}, 400, None,
     "response_format.type", ("json_object", "json_schema", "structural_tag")),
    # the tiny model's tokenizer is no Hugging Face one: xgrammar cannot read it, and the request is refused
    ("structured-without-a-readable-tokenizer", "/v1/completions", {"prompt": "x", "guided_json": {"type": "object"}},
     400, "structured_outputs_unavailable", "guided_json", ("xgrammar cannot read its tokenizer",)),
    ("vllm-beam-search-width", "/v1/completions", {"prompt": "x", "use_beam_search": True, "n": 11}, 400, None, "n",
     ("up to 10",)),
    ("vllm-prompt-logprobs-streamed", "/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400,
     None, "prompt_logprobs", ("stream=true",)),
    ("vllm-prompt-logprobs-21", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                         "prompt_logprobs": 21}, 400, None, "prompt_logprobs",
     ("[0, 20]",)),
    # vLLM's bad_words: a list of words, each of 1-256 characters, at most 128, encoding to some token, to at most
    # 128 token sequences and 1,024 tokens in all (the tiny server's tokenizer: a token per byte)
    ("bad-words-type", "/v1/completions", {"prompt": "x", "bad_words": "x"}, 400, None, "bad_words", ()),
    ("bad-words-empty-word", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                      "bad_words": ["a", ""]}, 400, None, "bad_words",
     ("1-256 characters",)),
    ("bad-words-long-word", "/v1/completions", {"prompt": "x", "bad_words": ["w" * 257]}, 400, None, "bad_words",
     ("1-256 characters",)),
    ("bad-words-129", "/v1/completions", {"prompt": "x", "bad_words": [f"w{i}" for i in range(129)]}, 400, None,
     "bad_words", ("at most 128",)),
    ("bad-words-blank", "/v1/completions", {"prompt": "x", "bad_words": ["   "]}, 400, "invalid_sampling_parameters",
     None, ("encodes to no token",)),
    ("bad-words-1025-tokens", "/v1/completions", {"prompt": "x", "bad_words": [c * 205 for c in "abcde"]}, 400,
     "invalid_sampling_parameters", None, ("1025 tokens in all", "at most 1024")),
    ("chat-echo", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, 400, None,
     "echo", ("/v1/completions takes echo",)),
    ("stop-token-ids-negative", "/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, None, None,
     ("stop_token_ids",)),
    ("tgi-grammar-type", "/generate", {"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": "<a/>"}}},
     400, None, None, ("grammar.type", "'json' or 'regex'")),
    ("tgi-grammar-regex-value", "/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": {}}}},
     400, None, None, ("regular expression, a string",)),
    ("tgi-grammar-json-text", "/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": "[1"}}},
     400, None, None, ("JSON schema",)),
    ("tgi-truncate", "/generate", {"inputs": "x", "parameters": {"truncate": MAX_LEN + 1}}, 400, None, None,
     ("`truncate` must be strictly positive",)),
    ("tgi-typical-p", "/generate", {"inputs": "x", "parameters": {"typical_p": 1.5}}, 400, None, None,
     ("typical_p", "less than or equal to 1")),
    ("tgi-watermark", "/generate", {"inputs": "x", "parameters": {"watermark": True}}, 400, None, None,
     ("watermark is not supported",)),
    ("functions", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                           "functions": [{"name": "f"}]}, 400, None, "functions",
     ("function_call 'none'",)),
    ("json-mode-without-a-readable-tokenizer", "/v1/completions", {"prompt": "x",
                                                                   "response_format": {"type": "json_object"}}, 400,
     "structured_outputs_unavailable", "response_format", ("structured outputs are not available",)),
    ("json-schema-empty-is-still-a-schema", "/v1/completions", {"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "any", "schema": {}}}}, 400, "structured_outputs_unavailable",
     "response_format", ()),
    ("tools-on-completions", "/v1/completions", {"prompt": "x", "tool_choice": "required",
                                                 "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     None, "tools", ("/v1/chat/completions",)),
    ("tools-auto-without-a-parser", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, None, "tool_choice", ("--tool-call-parser", '"required"')),
    ("top-logprobs-alone", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "top_logprobs": 2}, 400, None, "top_logprobs", ("logprobs=true",)),
    ("stream-options-unstreamed", "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     None, "stream_options", ("stream=true",)),
    ("min-over-max", "/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, None, "min_tokens",
     ("max_tokens (2)",)),
    ("min-over-max-completion", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                         "min_tokens": 3, "max_completion_tokens": 2}, 400, None,
     "max_completion_tokens", ("min_tokens (3)",)),
    ("out-of-vocab", "/v1/completions", {"prompt": [5, 500]}, 400, None, "prompt", ("500", "0-127")),
    ("negative-id", "/v1/completions", {"prompt": [[5], [-1]]}, 400, None, "prompt", ("-1",)),
    ("empty-prompt-list", "/v1/completions", {"prompt": []}, 400, None, "prompt", ("empty",)),
    ("empty-id-prompt", "/v1/completions", {"prompt": [[]]}, 400, None, "prompt", ("empty",)),
    ("stream-echo", "/v1/completions", {"prompt": "x", "stream": True, "echo": True}, 400, None, "echo", ()),
    ("unknown-model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found", "model",
     ("tiny",)),
    ("unknown-model-suffix", "/v1/completions", {"prompt": "x", "model": "gpt-4@skip:2"}, 404, "model_not_found",
     "model", ()),
    ("unknown-model-native", "/generate", {"inputs": "x", "model": "nope"}, 404, "model_not_found", "model", ()),
    ("unknown-model-tokenize", "/tokenize", {"prompt": "x", "model": "nope"}, 404, "model_not_found", "model", ()),
    # 400 as OpenAI and vLLM answer it, so that SDKs raise their BadRequestError (413 is for a body too large)
    ("prompt-too-long", "/v1/completions", {"prompt": "x" * 200}, 400, "context_length_exceeded", "prompt",
     ("200", "128")),
    ("prompt-too-long-native", "/generate", {"inputs": "x" * 200}, 400, "context_length_exceeded", "prompt", ()),
    ("prompt-plus-max-tokens", "/v1/completions", {"prompt": "x" * 100, "max_tokens": 50}, 400,
     "context_length_exceeded", "max_tokens", ("128", "150", "(max_model_len)")),
    ("native-max-new-tokens", "/generate", {"inputs": "x" * 100, "parameters": {"max_new_tokens": 50}}, 400,
     "context_length_exceeded", "max_tokens", ()),
    ("empty-inputs", "/generate", {"inputs": ""}, 400, None, "inputs", ()),
    ("chat-no-messages", "/v1/chat/completions", {"messages": []}, 400, None, "messages", ()),
    ("chat-bad-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None, None,
     ("role",)),
    ("tokenize-neither", "/tokenize", {}, 400, None, "prompt", ("prompt",)),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [1, 999]}, 400, None, "tokens", ("999",)),
]


@pytest.mark.parametrize("path,body,status,code,param,says", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_are_openai_shaped_and_harmless(client, path, body, status, code, param, says):
    if isinstance(body, str):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert_error(r, status, code=code, param=param, says=says)
    assert_serves(client)


def test_validation_messages_drop_pydantics_prefix(client):
    r = client.post("/v1/completions", json={"prompt": "x", "min_p": 2})
    assert assert_error(r, 400)["message"] == "invalid request: min_p: min_p must be a finite number in [0, 1], got 2.0"


def test_explicit_nulls_mean_the_defaults(chat_client):
    """OpenAI's optional fields are nullable, and clients send null for what they leave unset: each null gets the
    answer that leaving the field out gets (they were refused: "temperature: Input should be a valid number")."""
    nulls = dict.fromkeys(["top_p", "top_k", "n", "stream", "min_tokens", "ignore_eos", "seed", "stop",
                           "presence_penalty", "frequency_penalty", "logit_bias", "best_of", "response_format",
                           "tools", "tool_choice", "stream_options", "user", "policy", "include_stop_str_in_output",
                           "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
                           "return_tokens_as_token_ids", "prompt_logprobs"])
    chat = {"messages": CHAT, "max_tokens": 4}
    want = complete(chat_client, "/v1/chat/completions", **chat).json()["choices"]
    got = complete(chat_client, "/v1/chat/completions", **chat, **nulls, logprobs=None, top_logprobs=None,
                   max_completion_tokens=None).json()["choices"]
    assert got == want
    cmpl = {"prompt": "abc", "max_tokens": 4}
    want = complete(chat_client, **cmpl).json()["choices"]
    assert complete(chat_client, **cmpl, **nulls, logprobs=None, echo=None, suffix=None).json()["choices"] == want
    r = chat_client.post("/v1/chat/completions", json={**chat, "temperature": None})  # the default: sampled at 1.0
    assert r.status_code == 200, r.text
    r = chat_client.post("/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 4, "temperature": None,
                                                                            "do_sample": None, "stop": None}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value,says", [
    ("chat_template", "{{ messages[0]['content'] }}", ()),
    ("add_special_tokens", True, ("send false",)),
    ("documents", [{"title": "t", "text": "x"}], ()),
])
def test_vllms_prompt_changing_chat_extensions_are_refused(chat_client, field, value, says):
    """A request's own template, special tokens on top of the template's, documents: each would change the prompt,
    and each was ignored, the model's template rendering the messages as if never sent."""
    r = chat_client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1, field: value})
    assert_error(r, 400, param=field, says=("not supported", *says))


class JinjaChatTokenizer(CharTokenizer):
    """A chat template in Jinja, rendered as transformers renders it: keyword arguments become its variables."""

    chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                     "{% if enable_thinking is defined and not enable_thinking %}/nothink{% endif %}"
                     "{% if tools %}/tools{% endif %}")

    def apply_chat_template(self, messages: list[dict[str, str]], *, tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        import jinja2

        return jinja2.Template(self.chat_template).render(messages=messages, **kwargs)


def test_chat_template_kwargs_reach_the_template_that_reads_them():
    """vLLM's chat_template_kwargs: a variable the template reads changes the prompt, one it does not read is
    ignored (clients send enable_thinking to every server), and one that would set what the request sets (tools) is
    a 400 naming the field."""
    with serving(settings(), tiny_engine(JinjaChatTokenizer())) as c:
        def tokens(**kwargs: Any) -> httpx.Response:
            return c.post("/tokenize", json={"messages": CHAT, **kwargs})

        plain = tokens().json()["tokens"]
        assert tokens(chat_template_kwargs={"unread": 1}).json()["tokens"] == plain
        assert tokens(chat_template_kwargs={"enable_thinking": False}).json()["tokens"] == \
            plain + CharTokenizer().encode("/nothink", add_special_tokens=False)
        assert_error(tokens(chat_template_kwargs={"tools": [{"type": "function"}]}), 400,
                     param="chat_template_kwargs", says=("may not set tools",))
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1,
                                                 "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(plain) + len("/nothink"), r.text


def test_what_asks_for_nothing_unsupported_is_served(chat_client):
    """tools with tool_choice 'none', response_format text (whatever json_schema it carries), best_of = n, vLLM's
    extensions at the values that ask for nothing (empty structured outputs too, as vLLM reads them): answered, not
    refused (the tiny model's tokenizer serves no structured output: one asked for would be a 400)."""
    neutral = {"skip_special_tokens": True, "use_beam_search": False, "bad_words": [], "guided_json": None,
               "include_stop_str_in_output": False, "length_penalty": 1.0, "echo": False, "chat_template": None,
               "chat_template_kwargs": {}, "add_special_tokens": False, "documents": None}
    for extra in ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
                  {"response_format": {"type": "text"}}, {"best_of": 2, "n": 2}, {"min_p": 0.0}, neutral,
                  {"response_format": {"type": "text", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
                  {"guided_choice": [], "guided_regex": "", "structured_outputs": {}},
                  {"structured_outputs": {"disable_any_whitespace": True, "disable_fallback": True},
                   "guided_decoding_backend": "auto:disable-any-whitespace,no-fallback"}):
        r = complete(chat_client, "/v1/chat/completions", messages=CHAT, max_tokens=2, **extra)
        assert r.status_code == 200 and len(r.json()["choices"]) == extra.get("n", 1), r.text


def test_text_parts_of_a_message_are_joined_by_newlines(chat_client):
    """As vLLM joins them: ["hello", "world"] reads "hello\nworld", not "helloworld"."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]
    joined = [{"role": "user", "content": "hello\nworld"}]
    got, want = (chat_client.post("/tokenize", json={"messages": m}).json()["tokens"] for m in (parts, joined))
    assert got == want


def test_native_temperature_zero_is_greedy(client):
    """TGI samples when any sampling parameter is set; temperature 0 beside top_k read as "unset" and sampled at 1.0
    (a different text per seed). It is greedy, as on the OpenAI routes."""
    greedy = client.post("/generate", json={"inputs": "abcabc", "parameters": {"max_new_tokens": 6}}).json()
    for seed in (1, 2, 3):
        r = client.post("/generate", json={"inputs": "abcabc", "parameters": {
            "max_new_tokens": 6, "temperature": 0, "top_k": 50, "do_sample": True, "seed": seed}})
        assert r.json()["generated_text"] == greedy["generated_text"]


def test_a_chat_without_max_tokens_fits_the_kv_budget():
    """max_tokens left out is the rest of the context, but KV is reserved up front: with a budget under one
    full-length sequence, every chat without max_tokens was refused ("lower max_tokens", which it never sent).
    It is now capped at what the budget holds under the request's policy."""
    with serving(settings(kv_budget_tokens=384), tiny_engine(ChatCharTokenizer())) as c:
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        slots = 6  # full on 6 layers: one KV slot per layer
        assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 384 // slots
        assert body["choices"][0]["finish_reason"] == "length"


def test_streamed_text_offsets_count_the_tokens_held_back(client):
    """A stop string that may still match holds text back from a chunk whose tokens carry it: offsets advanced by the
    chunk's text came out [0, 0, 1, 2, 3]. They follow the tokens, as without streaming."""
    body = {"prompt": "abcabc", "max_tokens": 8, "temperature": 0, "stop": ["bb", "eb"], "logprobs": 0}
    plain = complete(client, **body).json()["choices"][0]["logprobs"]["text_offset"]
    chunks = sse_json(stream(client, "/v1/completions", {**body, "stream": True}))
    streamed = [o for c in chunks for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert streamed == plain == list(range(len(plain)))


def test_the_servers_own_policies_keep_their_metric_labels_whatever_clients_send(presets):
    """Policy labels beyond the cap fold into `other`, first come first kept: a client sending enough distinct
    policies first used to fold the default and the presets into `other` until a restart. They are reserved."""
    with serving(settings(policy_presets=presets, max_policy_labels=1)) as c:
        for policy in ("pairs", "loop:1-4x2", "full", "tiny@fast"):
            model = policy if policy.startswith("tiny@") else MODEL
            body = {"prompt": "ab", "max_tokens": 1, "temperature": 0}
            body.update({"model": model} if model != MODEL else {"policy": policy})
            assert c.post("/v1/completions", json=body).status_code == 200
        text = c.get("/metrics").text
        for label, n in (("pairs:1-4", 1), ("other", 1), ("full", 1), (SKIP2, 1)):  # pairs came first; loop folded
            assert metric_value(text, "painters:request_success_total", policy=label) == n, label


def test_unknown_route_and_method_are_error_shaped(client):
    assert_error(client.get("/v1/nothing"), 404)
    r = client.get("/v1/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_bad_json_names_no_parameter(client):
    r = client.post("/v1/completions", content='{"prompt": "x",', headers={"content-type": "application/json"})
    err = assert_error(r, 400)
    assert err["param"] is None and "JSON" in err["message"]


def test_error_code_is_a_string_or_null(client):
    r = client.post("/v1/completions", json={"prompt": [500]})
    code = assert_error(r, 400)["code"]
    assert code is None or isinstance(code, str)


@pytest.mark.parametrize("neutral", [{"top_p": 1.0}, {"top_k": 0}, {"temperature": 1.0}, {"top_p": 1.0, "top_k": 0}])
def test_native_neutral_sampling_parameters_stay_greedy(client, neutral):
    """As TGI's has_warpers: without do_sample, only a parameter that changes the distribution turns sampling on.
    top_p 1 or top_k 0 (no filter) sampled at temperature 1, a different text per request, while temperature 1 did
    not."""
    body = {"inputs": "abcabc", "parameters": {"max_new_tokens": 6, "ignore_eos": True, "details": True}}
    greedy = client.post("/generate", json=body).json()
    for seed in (1, 2, 3):
        r = client.post("/generate", json={**body, "parameters": {**body["parameters"], **neutral, "seed": seed}})
        assert r.status_code == 200, r.text
        assert r.json()["details"]["seed"] is None  # a greedy request draws with no seed
        assert r.json()["generated_text"] == greedy["generated_text"]
    sampled = client.post("/generate", json={**body, "parameters": {**body["parameters"], **neutral, "seed": 1,
                                                                     "do_sample": True}}).json()
    assert sampled["details"]["seed"] == 1


def test_native_top_p_that_rounds_to_zero_keeps_the_most_likely_token(client):
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 4, "ignore_eos": True}}
    greedy = client.post("/generate", json=body)
    assert greedy.status_code == 200, greedy.text
    body["parameters"] |= {"do_sample": True, "top_p": 5e-324, "seed": 3}  # float32 rounds it to 0
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"] == greedy.json()["generated_text"]


@pytest.mark.parametrize("path,body,param,says", [
    ("/generate", '{"inputs": "x", "parameters": {"temperature": NaN}}', "parameters.temperature", "[0, 100]"),
    ("/generate", '{"inputs": "x", "parameters": {"top_p": Infinity}}', "parameters.top_p", "(0, 1]"),
    ("/generate", {"inputs": "x", "parameters": {"top_k": 10**7}}, "parameters.top_k", "[0, 1000000]"),
    ("/generate", {"inputs": "x", "parameters": {"seed": 2**63}}, "parameters.seed", "[0, 9223372036854775807]"),
    ("/generate", {"inputs": "x", "parameters": {"stop": ["s"] * 17}}, "parameters.stop", "at most 16"),
    ("/v1/completions", {"prompt": "x", "temperature": 1e300}, "temperature", "[0, 100]"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k", "[-1, 1000000]"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed", "[0, 9223372036854775807]"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, "stop", "1-256"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n", "[1, 16]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}, "top_logprobs",
     "[0, 20]"),
])
def test_out_of_range_sampling_values_are_400s_naming_the_range(client, path, body, param, says):
    if isinstance(body, str):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert_error(r, 400, param=param, says=(says,))
    assert_serves(client)


# -- settings-driven statuses ----------------------------------------------------------------------------------------


def test_a_mounted_app_answers_each_route_in_its_shape():
    """Behind a proxy that mounts the app under a prefix (uvicorn's --root-path: the prefix is in both `root_path`
    and `path`), TGI's routes still answer in TGI's shape, and the probes stay open without a key."""
    app = create_app(settings(api_key="k"), engine_factory=tiny_engine())
    with TestClient(app, root_path="/api", raise_server_exceptions=False) as c:
        wait_ready(c)
        assert_tgi_error(c.post("/api/generate", json={"inputs": "hi"}), 401, "authentication")
        key = {"Authorization": "Bearer k"}
        r = c.post("/api/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": -1}}, headers=key)
        assert_tgi_error(r, 422, "validation", says=("max_new_tokens",))
        assert_tgi_error(c.post("/api", json={"inputs": "hi"}), 401, "authentication")
        assert set(c.post("/api/v1/completions", json={"model": MODEL, "prompt": "hi"}).json()) == {"error"}
        assert c.get("/api/health").status_code == 200 and c.get("/api/ready").status_code == 200


def test_api_key():
    with serving(settings(api_key="k")) as c:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        r = c.post("/v1/completions", json=body)
        assert_error(r, 401, code="invalid_api_key", says=("Authorization: Bearer",))
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.post("/generate", json={"inputs": "hi"}, headers={"Authorization": "Bearer kk"}), 401)
        assert_error(c.post("/tokenize", json={"prompt": "hi"}), 401)
        assert_error(c.get("/v1/models"), 401)
        assert_serves(c, Authorization="Bearer k")
        assert c.post("/v1/completions", json=body, headers={"x-api-key": "k"}).status_code == 200
        for open_path in ("/health", "/ready", "/metrics", "/version"):
            assert c.get(open_path).status_code == 200, open_path


@pytest.mark.parametrize("keys", [dict(api_key=" , "), dict(api_key="")], ids=["commas", "blank"])
def test_a_key_setting_without_a_key_refuses_to_start(keys, tmp_path):
    """A blank secret used to leave the server open without a word; it is an error at start, naming the setting."""

    with pytest.raises(ValueError, match="api_key holds no API key"):
        create_app(settings(**keys), engine_factory=tiny_engine())
    comments = tmp_path / "keys.txt"
    comments.write_text("# prod keys go here\n\n")
    with pytest.raises(ValueError, match="keys.txt holds no API key"):
        create_app(settings(api_key_file=comments), engine_factory=tiny_engine())


@pytest.mark.parametrize("bad,says", [(dict(served_model_name="my@model"), "without '@'"),
                                      (dict(served_model_name=""), "non-empty"),
                                      (dict(threads=0), "greater than or equal to 1"),
                                      (dict(threads=-2), "greater than or equal to 1")])
def test_settings_that_could_never_serve_are_refused_by_name(bad, says, monkeypatch):
    """A served name with '@' was listed by /v1/models and then not found by any request (the '@' starts a policy
    suffix); threads=-2 never became ready, threads=0 was ignored. Each is a settings error naming it, from the
    environment as from arguments."""
    from pydantic import ValidationError

    (name, value), = bad.items()
    with pytest.raises(ValidationError, match=says) as e:
        settings(**bad)
    assert name in str(e.value)
    monkeypatch.setenv(f"PAINTERS_{name.upper()}", str(value))
    with pytest.raises(ValidationError, match=says):
        Settings()


def test_a_lone_surrogate_in_a_prompt_is_a_400_naming_it(chat_client):
    """JSON's "\\ud800" escape decodes to a lone surrogate, which no tokenizer can encode: it was a 500 with the
    codec's message."""
    for path, body, param, says in (("/v1/completions", {"prompt": "a\ud800", "max_tokens": 1}, "prompt", "surrogate"),
                                    ("/tokenize", {"prompt": "a\ud800"}, "prompt", "surrogate"),
                                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]},
                                     "messages", "surrogate"),
                                    ("/generate", {"inputs": "a\udfff"}, "inputs", "unicode")):  # pydantic's own
        sent = chat_client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert_error(sent, 400, param=param, says=(says,))  # (json.dumps escapes the surrogate, as a client would)
    assert_serves(chat_client)


def test_a_list_of_many_bad_items_is_one_short_error(chat_client):
    """Each bad item of a list was an error of its own: 400,000 floats as a prompt came back as an 85 MB message,
    built in 17 s on the event loop. Validation stops at the first bad item and names it."""
    many = 20_000
    for path, body, says in (
            ("/v1/completions", {"prompt": [0.5] * many}, "prompt.list[int].0"),
            ("/v1/completions", {"prompt": [[0.5]] * many}, "prompt.list[list[int]].0.0"),
            ("/v1/completions", {"prompt": "x", "stop": [1] * many}, "stop.list[str].0"),
            ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): "x" for i in range(many)}}, "logit_bias"),
            ("/v1/chat/completions", {"messages": [{"role": "x"}] * many}, "messages.0.role"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": [1] * many}]}, "messages.0.content"),
            ("/generate", {"inputs": "x", "parameters": {"stop": [1] * many}}, "parameters.stop.0"),
            ("/tokenize", {"messages": [{"role": "x"}] * many}, "messages.0.role"),
            ("/detokenize", {"tokens": ["a"] * many}, "tokens.0"),
            ("/v1/probe", {"prompts": [0.5] * many}, "prompts.0")):
        r = chat_client.post(path, json=body)
        assert_error(r, 400, says=(says,))
        assert len(r.content) < 2000, (path, len(r.content))
    assert_serves(chat_client)


def test_allowed_policies(presets):
    with serving(settings(allowed_policies=["full", "fast"], policy_presets=presets)) as c:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        err = assert_error(c.post("/v1/completions", json={**body, "policy": "pairs"}), 400,
                           code="policy_not_allowed", param="policy", says=("full", SKIP2))
        assert "pairs:1-4" in err["message"]
        assert_error(c.post("/v1/completions", json={**body, "model": "tiny@skip:1"}), 400, code="policy_not_allowed")
        for ok in ({}, {"policy": "fast"}, {"policy": "skip:2"}, {"model": "tiny@skip:2-3"}, {"policy": "full"}):
            assert c.post("/v1/completions", json={**body, **ok}).status_code == 200, ok
        assert c.get("/policies").json()["allowed_policies"] == ["full", "fast"]


@pytest.mark.parametrize("allowed,says", [(["full", "skip:99"], "cannot skip 99 of 6 layers"),
                                          (["skip:2"], "default_policy 'full' is not among allowed_policies")])
def test_allowed_policies_that_cannot_serve_fail_the_start(allowed, says):
    """An entry that does not compile, or a list without the default policy, fails the load with its reason: the
    server reported ready, then refused every request (naming no policy among them) with a 400 blaming the client."""
    with serving(settings(allowed_policies=allowed), ready=False) as c:
        wait_for(lambda: c.app.state.painters.load_error is not None)
        r = c.get("/ready")
        assert r.status_code == 503 and says in r.json()["status"], r.json()


@contextmanager
def one_running_one_waiting(c: TestClient, gate: threading.Event, body: dict) -> Iterator[EngineLoop]:
    """`body` twice: one admitted and held at `gate` (max_num_seqs 1), one waiting behind it. On leaving, the gate
    opens and both must be answered."""
    loop = c.app.state.painters.loop
    with ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(c.post, "/v1/completions", json=body)
            wait_for(lambda: loop.num_running == 1)
            waiting = pool.submit(c.post, "/v1/completions", json=body)
            wait_for(lambda: loop.num_waiting == 1)
            yield loop
        finally:
            gate.set()  # before the pool waits for the held requests
        assert running.result(timeout=60).status_code == 200
        assert waiting.result(timeout=60).status_code == 200


def test_queue_full_is_429_with_retry_after():
    gate = threading.Event()
    with serving(settings(queue_capacity=1, max_num_seqs=1), gated(gate)) as c:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0}
        with one_running_one_waiting(c, gate, body), ThreadPoolExecutor(6) as pool:  # the one waiting place taken
            rejected = list(pool.map(lambda _: c.post("/v1/completions", json=body), range(6)))
            for r in rejected:
                assert_error(r, 429, code="queue_full", says=("retry",))
                assert r.headers["retry-after"] == "1"
            assert_error(c.post("/generate", json={"inputs": "hi"}), 429)
        assert_serves(c)
        assert metric_value(c.get("/metrics").text, "painters:request_errors_total", status="429") == 7


def test_a_request_the_queue_cannot_take_whole_is_refused_whole():
    """n = 2 with one waiting place left: a 429 and nothing queued. Its first choice used to be queued, then aborted
    when the second found the queue full, and counted as a request ended by 'abort' beside the 429."""
    gate = threading.Event()
    with serving(settings(queue_capacity=2, max_num_seqs=1), gated(gate)) as c:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0}
        with one_running_one_waiting(c, gate, body) as loop:  # one of the two waiting places taken
            r = c.post("/v1/completions", json={**body, "n": 2})
            assert_error(r, 429, code="queue_full", says=("1 requests already waiting", "brings 2"))
            assert loop.num_waiting == 1
        text = c.get("/metrics").text
        assert metric_value(text, "painters:request_success_total", finished_reason="abort") == 0
        assert metric_value(text, "painters:request_success_total") == 2


def test_priority_scheduling_admits_a_later_urgent_request_first():
    """vLLM's --scheduling-policy priority: behind a running request, one of priority 5 waits, then one of -1 comes.
    The later, urgent one is admitted first, so it waited less than the earlier one (first come, first served, the
    earlier one would have); every answer is served."""
    gate = threading.Event()
    with serving(settings(scheduling_policy="priority", max_num_seqs=1), gated(gate)) as c:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0}
        loop = c.app.state.painters.loop
        with ThreadPoolExecutor(3) as pool:
            try:
                running = pool.submit(c.post, "/v1/completions", json=body)
                wait_for(lambda: loop.num_running == 1)
                late = pool.submit(c.post, "/v1/completions", json={**body, "priority": 5})
                wait_for(lambda: loop.num_waiting == 1)
                urgent = pool.submit(c.post, "/v1/completions", json={**body, "priority": -1})
                wait_for(lambda: loop.num_waiting == 2)
            finally:
                gate.set()
            answers = [f.result(timeout=60) for f in (running, late, urgent)]
        assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
        queued = [r.json()["painters"]["timings"]["queue_s"] for r in answers[1:]]
        assert queued[0] > queued[1], f"the priority-5 request waited {queued[0]:.4f} s, the urgent one {queued[1]:.4f}"


def test_a_priority_under_first_come_first_served_is_a_400_naming_the_policy(chat_client):
    """As vLLM: any priority but 0 is refused where the server does not schedule by it (and 0 is served)."""
    for route, extra in (("/v1/completions", {"prompt": "hi"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                         ("/v1/embeddings", {"input": "hi"}),
                         ("/v1/responses", {"input": "hi"})):
        body = {"model": MODEL, "max_tokens": 2, **extra}
        assert_error(chat_client.post(route, json={**body, "priority": 2}), 400, param="priority",
                     says=("priority 2", "--scheduling-policy priority"))
        r = chat_client.post(route, json={**body, "priority": 0})
        assert r.status_code == 200, (route, r.text)


def test_a_cache_salt_must_be_a_non_empty_string(client):
    for salt in ("", 7, ["a"]):
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "cache_salt": salt})
        assert r.status_code == 400, r.text
        assert "cache_salt" in r.text
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "cache_salt": "t1"})
    assert r.status_code == 200, r.text


def test_a_cache_salt_keeps_a_prompt_from_others_cached_blocks(client):
    """The same long prompt under another salt (or none) computes again; under its own salt it reuses its blocks
    (the engine's reused-token count, which HTTP cannot see otherwise)."""
    batch = client.app.state.painters.loop.batch
    prompt = "a context that every request in this test shares, long enough for several blocks"  # 80 tokens
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    reused = []
    for salt in (None, "tenant-a", "tenant-b", "tenant-a"):
        before = batch.reused_tokens
        extra = {} if salt is None else {"cache_salt": salt}
        assert client.post("/v1/completions", json={**body, **extra}).status_code == 200
        reused.append(batch.reused_tokens - before)
    assert reused[1] == reused[2] == 0 and reused[3] >= 64, reused


def test_a_clients_request_id_names_its_answer_and_comes_back_in_a_header(client, chat_client):
    """vLLM's: the X-Request-Id header (else the body's request_id) names the answer, streamed or not; the header is
    echoed on any response, a refusal's too; without one, ids are the server's own."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    r = client.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-7"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-trace-7" and r.headers["x-request-id"] == "trace-7"
    r = client.post("/v1/completions", json={**body, "request_id": "from-body"})
    assert r.json()["id"] == "cmpl-from-body" and "x-request-id" not in r.headers
    r = client.post("/v1/completions", json={**body, "request_id": "from-body"}, headers={"X-Request-Id": "hdr"})
    assert r.json()["id"] == "cmpl-hdr", "the header wins, as in vLLM"
    with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                       headers={"X-Request-Id": "s1"}) as r:
        assert r.headers["x-request-id"] == "s1"
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and {c["id"] for c in chunks} == {"cmpl-s1"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert chat_client.post("/v1/chat/completions", json=chat,
                            headers={"X-Request-Id": "c1"}).json()["id"] == "chatcmpl-c1"
    fresh = {client.post("/v1/completions", json=body).json()["id"] for _ in range(2)}
    assert len(fresh) == 2 and all(i.startswith("cmpl-") for i in fresh)
    refused = client.post("/v1/completions", json={**body, "max_tokens": -1}, headers={"X-Request-Id": "bad-1"})
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "bad-1"
    missing = client.get("/v1/nothing-here", headers={"X-Request-Id": "nf"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "nf"
    assert_error(client.post("/v1/completions", json=body, headers={"X-Request-Id": "x" * 257}), 400,
                 param="X-Request-Id", says=("257 characters", "at most 256"))
    assert_error(client.post("/v1/completions", json={**body, "request_id": "y" * 300}), 400, param="request_id")


def test_prompt_tokens_details_count_the_prompt_tokens_the_prefix_cache_held():
    """vLLM's --enable-prompt-tokens-details: the final usage says how many prompt tokens were cached, streamed or
    not; a prompt's n choices count it once, what was cached before the request came. The Responses API always says
    it (input_tokens_details), and /metrics counts them (painters:prefix_cache_hits / _queries)."""
    with serving(settings(enable_prompt_tokens_details=True)) as c:
        prompt = "a context that every request in this test shares, long enough for several blocks"  # 80 tokens
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
        first = c.post("/v1/completions", json=body).json()["usage"]
        assert first["prompt_tokens"] == 80 and first["prompt_tokens_details"] == {"cached_tokens": 0}
        again = c.post("/v1/completions", json={**body, "n": 2}).json()["usage"]
        assert again["prompt_tokens"] == 80 and again["prompt_tokens_details"] == {"cached_tokens": 79}  # all but the last
        with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as r:
            frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert frames[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 79}
        assert all("prompt_tokens_details" not in (f.get("usage") or {}) for f in frames[:-1])
        other = c.post("/v1/completions", json={**body, "prompt": "something else entirely"}).json()["usage"]
        assert other["prompt_tokens_details"] == {"cached_tokens": 0}
        text = c.get("/metrics").text
        assert metric_value(text, "painters:prefix_cache_hits_total") == 79 * 3  # n = 2 counts both choices
        assert metric_value(text, "painters:prefix_cache_queries_total") == 80 * 4 + len("something else entirely")
    with serving(settings()) as c:  # off by default, as vLLM's: no details at all
        usage = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).json()["usage"]
        assert "prompt_tokens_details" not in usage


def test_sagemaker_invocations_answer_as_the_route_the_body_is_for(chat_client):
    """vLLM's SageMaker routes: /invocations answers chat, completion and embedding bodies as their own routes do
    (the same greedy text, a stream, the route's own 400s); /ping is /ready."""
    c = chat_client
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    direct, via = c.post("/v1/chat/completions", json=chat).json(), c.post("/invocations", json=chat)
    assert via.status_code == 200 and via.json()["object"] == "chat.completion"
    assert via.json()["choices"][0]["message"] == direct["choices"][0]["message"]
    completion = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0}
    via = c.post("/invocations", json=completion).json()
    assert via["object"] == "text_completion"
    assert via["choices"][0]["text"] == c.post("/v1/completions", json=completion).json()["choices"][0]["text"]
    with c.stream("POST", "/invocations", json={**completion, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    embedded = c.post("/invocations", json={"model": MODEL, "input": ["a", "b"]}).json()
    assert embedded["object"] == "list" and len(embedded["data"]) == 2
    assert_error(c.post("/invocations", json={**chat, "temperature": -1}), 400, param="temperature")
    assert_error(c.post("/invocations", json={**completion, "policy": "skip:99"}), 400, param="policy")
    assert_error(c.post("/invocations", json={"model": MODEL}), 400, says=("'messages'", "'prompt'", "'input'"))
    assert_error(c.post("/invocations", json=[1, 2]), 400, says=("JSON object",))
    assert_error(c.post("/invocations", content=b"{nope", headers={"content-type": "application/json"}), 400,
                 code="invalid_json")
    for method in (c.get, c.post):
        r = method("/ping")
        assert r.status_code == 200 and r.json()["status"] == "ready"


def test_ping_is_open_and_invocations_want_the_key():
    with serving(settings(api_key="k1")) as c:
        assert c.get("/ping").status_code == 200
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert_error(c.post("/invocations", json=body), 401)
        assert c.post("/invocations", json=body, headers={"Authorization": "Bearer k1"}).status_code == 200


def test_a_request_larger_than_the_queue_is_a_400_not_a_429():
    """Retrying could never help, so it must not say 'retry later'."""
    gate = threading.Event()
    with serving(settings(queue_capacity=2, max_num_seqs=1), gated(gate)) as c:
        loop = c.app.state.painters.loop
        try:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 4})
            assert_error(r, 400, code="too_many_sequences", says=("3 sequences", "at most 2"))
            assert loop.num_waiting == 0
        finally:
            gate.set()
        wait_for(lambda: loop.num_running == 0 and loop.num_waiting == 0)
        assert_serves(c)


def test_503_while_loading_then_ready():
    release = threading.Event()

    def slow(s: Settings) -> Engine:
        assert release.wait(timeout=60)
        return Engine.from_hf(tiny_llama(), CharTokenizer())

    with serving(settings(), slow, ready=False) as c:
        try:
            r = c.get("/ready")
            assert r.status_code == 503 and r.json() == {"status": "loading"} and r.headers["retry-after"] == "5"
            assert c.get("/health").json() == {"status": "ok"}
            for path, body in (("/v1/completions", {"model": MODEL, "prompt": "hi"}), ("/generate", {"inputs": "hi"}),
                               ("/tokenize", {"prompt": "hi"})):
                r = c.post(path, json=body)
                assert_error(r, 503, says=("loading", "/ready"))
                assert r.headers["retry-after"] == "5"
            assert_error(c.get("/tokenizer_info"), 503)
        finally:
            release.set()
        wait_ready(c)
        assert_serves(c)


def test_failed_load_is_reported_by_ready():
    def broken(s: Settings) -> Engine:
        raise RuntimeError("weights not found")

    with serving(settings(), broken, ready=False) as c:
        wait_for(lambda: c.app.state.painters.load_error is not None)
        r = c.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "failed: RuntimeError: weights not found"}
        assert_error(c.post("/v1/completions", json={"prompt": "hi"}), 503, says=("weights not found",))
        assert c.get("/health").status_code == 200


def test_a_request_that_could_never_fit_the_kv_budget_is_a_400_naming_it():
    """The KV budget is in slot-tokens: a policy that runs many layers pays for each; what could never fit is refused
    with the limit and what would fit, the rest waits its turn, and the server stays healthy."""
    with serving(settings(kv_budget_tokens=512, kv_block_size=4)) as c:
        hostile = {"kind": "schedule", "steps": [[0, 2, 4]] * 40}  # 120 slots
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 8, "policy": hostile})
        assert_error(r, 400, code="kv_budget_exceeded", says=("120 KV slots", "512 slot-tokens", "at most 4"))
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 100})
        assert_error(r, 400, code="kv_budget_exceeded", says=("6 KV slots", "at most 84", "(kv_budget_tokens)"))
        # at the limit exactly: a request that never decodes (max_tokens 0, prompt scoring) needs its prompt alone
        # (it was counted as prompt + 1 and refused, "x 85 tokens", against the limit of 84 its message named)
        score = {"model": MODEL, "prompt": "x" * 84, "max_tokens": 0, "echo": True, "logprobs": 0}
        r = c.post("/v1/completions", json=score)
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 84, r.text
        assert_error(c.post("/v1/completions", json={**score, "max_tokens": 1}), 400, code="kv_budget_exceeded",
                     says=("x 85 tokens", "at most 84"))
        # A request that fits runs, even when several of them together do not fit at once (they wait).
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda _: text_of(c, "hello", max_tokens=16, policy="full"), range(4)))
        assert len(set(texts)) == 1
        loop = c.app.state.painters.loop
        wait_for(lambda: loop.num_running == 0 and loop.num_waiting == 0)
        assert loop.batch.kv_usage() == 0.0
        assert_serves(c)


def test_kv_usage_gauge_reports_real_use_while_running():
    """The gauge is set at the end of each engine step. The engine thread is held between two steps of a running
    request: a scrape then reads the blocks it holds (above 0, and exactly the batch's own figure); once it has
    ended, 0. (A second thread scraping while the request ran was a race: on a loaded CPU its first scrape could
    land after all 48 tokens, and a scrape between the request's end and the end of its step, which reports it,
    still read the step before's value.)"""
    with serving(settings(kv_budget_tokens=1024, kv_block_size=4), tiny_engine()) as c:
        loop = c.app.state.painters.loop
        between_steps, resume = threading.Event(), threading.Event()
        decode, calls = loop.batch.decode, itertools.count()

        def held() -> Any:  # the engine thread: waits once, in the request's second step (the first one has ended)
            if loop.batch.sequences and next(calls) == 1:
                between_steps.set()
                assert resume.wait(60), "the test never let the engine go on"
            return decode()

        loop.batch.decode = held
        gauge = lambda: metric_value(c.get("/metrics").text, "painters:kv_slots_usage_perc", model=MODEL)  # noqa: E731
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(text_of, c, "hello there", max_tokens=48, policy="full")
            try:
                assert between_steps.wait(60), "the request never reached its second step"
                held_blocks, scraped = loop.batch.kv_usage(), gauge()
            finally:
                resume.set()
            assert answer.result()
        assert 0 < held_blocks and scraped == held_blocks, "usage while a request held KV blocks"
        wait_for(lambda: loop.num_running == 0 and gauge() == 0.0)  # the end of the request's last step reports it
        assert loop.batch.kv_usage() == 0.0


def test_the_http_layer_imports_no_torch():
    """server/api touches no tensors: importing every router and helper loads neither torch nor the engine."""
    import subprocess
    import sys

    code = ("import pkgutil, importlib, sys, server.api as api\n"
            "for m in pkgutil.iter_modules(api.__path__): importlib.import_module(f'server.api.{m.name}')\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m in ('server.engine.generate', 'server.engine.loop')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_http_layer_holds_the_served_model_not_the_engine(client):
    """The routers see `ServedModel` (plain facts, text <-> ids, compile) and the loop: no engine, no tensors."""
    import dataclasses

    from server.engine.served import ServedModel

    state = client.app.state.painters
    served, loop = state.require()
    assert isinstance(served, ServedModel) and not hasattr(state, "engine")
    engine = loop.engine
    assert (served.num_layers, served.vocab_size, served.max_model_len, served.eos_ids) == (
        engine.num_layers, engine.vocab_size, engine.max_model_len, engine.eos_ids)
    for f in dataclasses.fields(served):
        if f.name not in ("tokenizer", "grammars"):
            assert isinstance(getattr(served, f.name), (int, str, frozenset)), f.name
    assert served.grammars is engine.grammars  # structured outputs compile for the tokenizer: host objects, no tensors
    for policy in ("full", "skip:2", "pairs:1-4", {"kind": "skip", "count": 1}):
        assert served.compile(policy) == engine.compile(policy)
    for prompt in ("hello world", "", [3, 4, 5]):
        assert served.encode(prompt) == engine.encode(prompt)
    assert served.encode("") != [] and served.tokenize("") == []  # a prompt is never empty; /tokenize shows what is
    ids = served.encode("hello world")
    assert served.decode(ids) == engine.tokenizer.decode(ids)
    assert [served.token_text(i) for i in ids] == [engine.tokenizer.decode([i]) for i in ids]
