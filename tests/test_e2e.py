"""End to end: a real uvicorn process serving the real SmolLM2-135M on a loopback port, driven over real HTTP by the
official `openai` client and by httpx (concurrent mixed-policy exactness, client disconnects)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.serving import Process, metric_value, painters_server, wait_until

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
PROMPT = "The capital of France is Paris. The capital of Italy is"
CANONICAL = {"full": "full", "skip:10": "skip:10-19", "pairs": "pairs:4-25"}
# structured outputs: SmolLM2 answers these asks with a small JSON object under the PERSON schema, greedy and at
# temperature 0.7 (seed 1)
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
ASKS = ["Describe a person as JSON with a name and an age.",
        "Give me a JSON object about a famous scientist: name and age."]
SAMPLED = {"temperature": 0.7, "seed": 1}


def _chat_prompt(text: str) -> str:
    """SmolLM2's chat template around one user message, as a completions prompt."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    with painters_server(Path(tmp_path_factory.mktemp("e2e"))) as p:
        yield p



def test_models_list(client):
    assert MODEL in {m.id for m in client.models.list().data}


def test_completion_with_policy_suffix(client):
    raw = client.completions.with_raw_response.create(model=f"{MODEL}@skip:10", prompt=PROMPT, max_tokens=8,
                                                      temperature=0)
    assert raw.headers["x-painters-policy"] == "skip:10-19"
    r = raw.parse()
    assert r.model == f"{MODEL}@skip:10" and r.choices[0].finish_reason in ("length", "stop")
    assert r.choices[0].text and r.usage.completion_tokens <= 8
    assert r.model_extra["painters"]["policy"] == "skip:10-19"


@pytest.mark.parametrize("policy,canonical", [("pairs", "pairs:4-25"), ({"kind": "skip", "count": 10}, "skip:10-19"),
                                              ("full", "full")])
def test_completion_with_policy_in_extra_body(client, policy, canonical):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"policy": policy})
    assert r.model_extra["painters"]["policy"] == canonical
    suffixed = client.completions.create(model=f"{MODEL}@{canonical}", prompt=PROMPT, max_tokens=6, temperature=0)
    assert suffixed.choices[0].text == r.choices[0].text


def test_full_policy_answers_rome(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert "Rome" in r.choices[0].text


def test_streaming_completion(client):
    plain = client.completions.create(model=f"{MODEL}@pairs", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=f"{MODEL}@pairs", prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in content) == plain.choices[0].text
    assert content[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_completion_with_the_real_template(client, http):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    counted = http.post("/tokenize", json={"messages": messages}).json()["count"]
    assert r.usage.prompt_tokens == counted
    assert "<|im_start|>assistant" in http.post("/detokenize", json={
        "tokens": http.post("/tokenize", json={"messages": messages}).json()["tokens"]}).json()["prompt"]
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                   stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content
    assert streamed[-1].choices[0].finish_reason == choice.finish_reason


def test_openai_client_reads_our_errors(client):
    with pytest.raises(openai.BadRequestError, match="0-29"):
        client.completions.create(model=f"{MODEL}@skip:40", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_concurrent_mixed_policies_equal_one_at_a_time(http):
    prompts = [PROMPT, "Once upon a time", "def fibonacci(n):", "The three primary colours are"]
    jobs = [(policy, prompt) for policy, prompt in zip(["full", "skip:10", "pairs", "full", "skip:10", "pairs",
                                                        "pairs", "full"], prompts * 2)]

    def run(job: tuple[str, str]) -> tuple[str, list[str]]:
        policy, prompt = job
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                               "ignore_eos": True, "policy": policy, "logprobs": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["painters"]["policy"] == CANONICAL[policy]
        return body["choices"][0]["text"], body["choices"][0]["logprobs"]["tokens"]

    _alone_then_together(http, run, jobs)


def _alone_then_together(http: httpx.Client, run: Callable[[Any], Any], jobs: list[Any]) -> list[Any]:
    """Each job's answer alone, then all at once: the same answers, and some engine step ran several sequences."""
    alone = [run(j) for j in jobs]
    before = _batched_steps(_metrics(http))
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone
    assert _batched_steps(_metrics(http)) > before, "no engine step ran more than one sequence: nothing was batched"
    return alone


def _batched_steps(text: str) -> float:
    """Engine steps so far that decoded more than one sequence (batch_size histogram: all minus the le=1 bucket)."""
    return (metric_value(text, "painters:batch_size_count", model=MODEL)
            - metric_value(text, "painters:batch_size_bucket", model=MODEL, le="1.0"))


def _metrics(http: httpx.Client) -> str:
    return http.get("/metrics").text


def _abort_count(http: httpx.Client) -> float:
    return metric_value(_metrics(http), "painters:request_success_total", model=MODEL, finished_reason="abort")


def _wait_aborted(http: httpx.Client, before: float) -> None:
    def aborted_and_idle() -> bool:
        text = _metrics(http)
        return (metric_value(text, "painters:num_requests_running", model=MODEL) == 0
                and metric_value(text, "painters:request_success_total", model=MODEL, finished_reason="abort")
                == before + 1)

    wait_until(aborted_and_idle, timeout=60, what="the abandoned request is aborted", interval=0.2)


def _abandon_plain_request(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=httpx.Timeout(120, read=1.5))


def _log_size(server: Process) -> int:
    return server.log.stat().st_size


def _log_since(server: Process, offset: int) -> str:
    with open(server.log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_client_disconnect_aborts_the_stream(server, http):
    before, log_at = _abort_count(http), _log_size(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
            if len(events) == 2:
                break
    assert all(e["choices"][0]["finish_reason"] is None for e in events)
    _wait_aborted(http, before)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert "Traceback" not in _log_since(server, log_at)


def test_client_that_gives_up_on_a_plain_request_aborts_it(http):
    before = _abort_count(http)
    errors = metric_value(_metrics(http), "painters:request_errors_total", model=MODEL)
    _abandon_plain_request(http)
    _wait_aborted(http, before)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    # Counted once, as an abort: the 499 answered to nobody is not also an error (two series on the Errors panel).
    assert metric_value(_metrics(http), "painters:request_errors_total", model=MODEL) == errors


def test_a_plain_request_given_up_is_not_logged_as_an_error(server, http):
    before, log_at = _abort_count(http), _log_size(server)
    _abandon_plain_request(http)
    _wait_aborted(http, before)
    logged = _log_since(server, log_at)
    assert "Exception in ASGI application" not in logged and "Traceback" not in logged, logged[-2000:]


def test_overlapped_decoding_serves_the_same_completions(tmp_path, http):
    """A second server with `--overlap-decode` (the CUDA default, here on the CPU): concurrent mixed-policy
    completions with stop strings, streams and structured outputs (whose steps do not overlap) equal the stepwise
    server's, and the startup log says which it runs."""
    jobs = [("full", PROMPT, {}), ("skip:10", "Once upon a time", {"stop": ["hath"]}),
            ("pairs", "def fibonacci(n):", {"max_tokens": 5}), ("full", "The three primary colours are", {}),
            ("skip:10", PROMPT, {"stream": True}), ("pairs", "Once upon a time", {"stream": True, "stop": [" way"]}),
            ("full", _chat_prompt(ASKS[0]), {"max_tokens": 60, "guided_json": PERSON}),
            ("full", PROMPT, {"stream": True, "guided_choice": ["Rome", "Milan"], **SAMPLED})]

    def run(client: httpx.Client, job: tuple[str, str, dict]) -> tuple[str, str | None]:
        policy, prompt, extra = job
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "policy": policy, **extra}
        if not extra.get("stream"):
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            return choice["text"], choice["finish_reason"]
        text, reason = "", None
        with client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    reason = choice["finish_reason"] or reason
        return text, reason

    want = [run(http, j) for j in jobs]
    with painters_server(tmp_path, extra=("--overlap-decode",)) as p, httpx.Client(base_url=p.url, timeout=120) as c:
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda j: run(c, j), jobs))
        assert "overlapped decode on" in p.log.read_text()
    assert got == want
    assert [reason for _, reason in want] == ["length", "stop", "length", "length", "length", "stop", "stop", "stop"]
    jsonschema.validate(json.loads(want[6][0]), PERSON)
    assert want[7][0] in ("Rome", "Milan")


# -- vLLM's output shaping -------------------------------------------------------------------------------------------
# SmolLM2 answers "Hi" with "Hello! How can I assist you today?", then <|im_end|> (its EOS); past it (ignore_eos) come
# "\n<|im_start|>user\n...": special tokens inside the text.
HI = [{"role": "user", "content": "Hi"}]


def _completion(client: openai.OpenAI, **body) -> tuple[str, str, list[str]]:
    """(text, finish_reason, concatenated deltas of the same request streamed)."""
    body = {"model": MODEL, "temperature": 0, **body}
    whole = client.completions.create(**body).choices[0]
    deltas = [c.choices[0].text for c in client.completions.create(**body, stream=True) if c.choices]
    return whole.text, whole.finish_reason, "".join(deltas)


def _chat(client: openai.OpenAI, **body) -> tuple[str, str, str]:
    body = {"model": MODEL, "temperature": 0, "messages": HI, **body}
    whole = client.chat.completions.create(**body).choices[0]
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
              if c.choices]
    return whole.message.content, whole.finish_reason, "".join(deltas)


@pytest.mark.parametrize("stop,cut", [("answer", "answer"), ("ans", "ans"), ("\n\n", "\n\n")])
def test_include_stop_str_in_output_keeps_the_stop_string_streamed_or_not(client, stop, cut):
    """vLLM cuts the text after the stop string instead of before it, also where the stop string ends inside a
    token (" answer" for "ans"); the streamed deltas add up to the same text (nothing held back is lost or doubled)."""
    free, _, _ = _completion(client, prompt="The capital of France is", max_tokens=12, extra_body={"ignore_eos": True})
    assert stop in free, free  # " Paris.\n\nThe answer is: ..."
    before = free[: free.index(stop)]
    plain = _completion(client, prompt="The capital of France is", max_tokens=12, stop=[stop])
    kept = _completion(client, prompt="The capital of France is", max_tokens=12, stop=[stop],
                       extra_body={"include_stop_str_in_output": True})
    assert plain == (before, "stop", before)
    assert kept == (before + cut, "stop", before + cut)


def test_include_stop_str_in_output_keeps_the_eos_text_only_when_it_is_shown(client):
    """A stop token ends the request with its text left out, as vLLM does; include_stop_str_in_output keeps it, which
    shows for a special token only with skip_special_tokens=false."""
    shown = {"skip_special_tokens": False}
    answer, reason, _ = _chat(client, max_tokens=30)
    assert reason == "stop" and answer == "Hello! How can I assist you today?"
    assert _chat(client, max_tokens=30, extra_body=shown) == (answer, "stop", answer)
    kept = answer + "<|im_end|>"
    both = {**shown, "include_stop_str_in_output": True}
    assert _chat(client, max_tokens=30, extra_body=both) == (kept, "stop", kept)
    assert _chat(client, max_tokens=30, extra_body={"include_stop_str_in_output": True}) == (answer, "stop", answer)


@pytest.mark.parametrize("spaces", [True, False])
def test_skip_special_tokens_false_shows_them_streamed_or_not(client, http, spaces):
    """Past the EOS, the text holds <|im_end|><|im_start|> side by side. Kept, the text is the one-shot decode of the
    tokens, streamed or not; skipped, the same text without them. (SmolLM2's tokenizer is a fast one, which writes no
    spaces around special tokens: spaces_between_special_tokens changes nothing here, as in transformers and vLLM.)"""
    body = {"messages": [{"role": "user", "content": "What is 2+2? Answer with a number only."}], "max_tokens": 16,
            "logprobs": True}
    shown = {"ignore_eos": True, "skip_special_tokens": False, "spaces_between_special_tokens": spaces,
             "return_tokens_as_token_ids": True}
    text, reason, streamed = _chat(client, **body, extra_body=shown)
    r = client.chat.completions.create(model=MODEL, temperature=0, **body, extra_body=shown)
    ids = [int(t.token.removeprefix("token_id:")) for t in r.choices[0].logprobs.content]
    assert reason == "length" and streamed == text
    assert text == http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "4<|im_end|>\n<|im_end|><|im_start|>" in text, text
    skipped, _, streamed = _chat(client, **body, extra_body={"ignore_eos": True,
                                                             "spaces_between_special_tokens": spaces})
    assert skipped == streamed == text.replace("<|im_end|>", "").replace("<|im_start|>", "")


def test_tokenize_returns_the_vocabularys_token_strings(http):
    """vLLM's return_token_strs: each token as SmolLM2's byte-level BPE spells it ('Ġ' for a space), not its text."""
    r = http.post("/tokenize", json={"prompt": " the capital of France", "return_token_strs": True}).json()
    strs = r["token_strs"]
    assert len(strs) == r["count"] == len(r["tokens"]) and strs[0] == "\u0120the"
    assert "".join(strs).replace("\u0120", " ") == " the capital of France"


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, http):
    """vLLM's left truncation: the answer is the one to the prompt's last k tokens, usage counts k, and an echo
    echoes what was kept."""
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    k = 6
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": k})
    tail = client.completions.create(model=MODEL, prompt=ids[-k:], max_tokens=6, temperature=0, echo=True)
    kept = http.post("/detokenize", json={"tokens": ids[-k:]}).json()["prompt"]
    assert cut.usage.prompt_tokens == k and cut.choices[0].text == tail.choices[0].text
    assert cut.choices[0].text.startswith(kept) and not cut.choices[0].text.startswith(PROMPT)
    longer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                       extra_body={"truncate_prompt_tokens": len(ids) + 5})
    assert longer.usage.prompt_tokens == len(ids)
    chat = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 4})
    assert chat.usage.prompt_tokens == 4
    with pytest.raises(openai.BadRequestError, match=r"truncate_prompt_tokens.*greater than or equal to 1"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"truncate_prompt_tokens": 0})


def test_return_tokens_as_token_ids_names_every_token_by_its_id(client, http):
    """Completions (echo included) and chat, streamed and not: every token and alternative is "token_id:<id>", the
    ids are the tokens the text decodes from, the logprobs those of the plain request."""
    as_ids = {"return_tokens_as_token_ids": True}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    plain = client.completions.create(**body).choices[0].logprobs
    named = client.completions.create(**body, extra_body=as_ids).choices[0]
    ids = [int(t.removeprefix("token_id:")) for t in named.logprobs.tokens]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == named.text
    # the same logprobs (to rounding: a request repeated reads its prompt's KV from the prefix cache)
    assert named.logprobs.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-4)
    for got, want in zip(named.logprobs.top_logprobs, plain.top_logprobs, strict=True):
        assert sorted(got.values()) == pytest.approx(sorted(want.values()), abs=1e-4)
    assert all(k.startswith("token_id:") for d in named.logprobs.top_logprobs for k in d)
    streamed = [t for c in client.completions.create(**body, stream=True, extra_body=as_ids) if c.choices
                for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert streamed == named.logprobs.tokens
    echoed = client.completions.create(**body, echo=True, extra_body=as_ids).choices[0].logprobs.tokens
    prompt_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert echoed == [f"token_id:{i}" for i in prompt_ids] + named.logprobs.tokens

    chat = {"model": MODEL, "messages": HI, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    plain_chat = client.chat.completions.create(**chat).choices[0].logprobs.content
    named_chat = client.chat.completions.create(**chat, extra_body=as_ids).choices[0].logprobs.content
    assert [t.bytes for t in named_chat] == [t.bytes for t in plain_chat]
    assert [t.logprob for t in named_chat] == pytest.approx([t.logprob for t in plain_chat], abs=1e-4)
    assert all(t.token.startswith("token_id:") and all(a.token.startswith("token_id:") for a in t.top_logprobs)
               for t in named_chat)
    streamed_chat = [t.token for c in client.chat.completions.create(**chat, stream=True, extra_body=as_ids)
                     if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed_chat == [t.token for t in named_chat]


def _assert_prompt_logprobs(got: list, ids: list[int], k: int) -> None:
    """vLLM's shape: null, then per token a dict led by the token itself (its logprob and rank), then the k likeliest
    ranked 1..k; the token among them is listed once."""
    assert got[0] is None and len(got) == len(ids)
    for token, entries in zip(ids[1:], got[1:]):
        own = entries[str(token)]
        assert next(iter(entries)) == str(token) and own["rank"] >= 1
        ranked = [e for t, e in entries.items() if t != str(token)]
        assert len(entries) == k + (own["rank"] > k)
        assert [e["rank"] for e in ranked] == [r for r in range(1, k + 1) if r != own["rank"]]
        assert all(e["decoded_token"] for e in ranked)
        if k:  # the likeliest listed is the token itself exactly when it ranks first
            assert (own["rank"] == 1) == (own["logprob"] == max(e["logprob"] for e in entries.values()))


def test_prompt_logprobs_score_the_prompt_as_vllm_answers(http):
    """Completions (each choice) and chat (the response): the prompt tokens' logprobs equal an echo's, with their
    ranks and k alternatives; the generated tokens are the plain request's."""
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    assert "prompt_logprobs" not in plain
    got = http.post("/v1/completions", json={**body, "n": 2, "prompt_logprobs": 3}).json()
    echo = http.post("/v1/completions", json={**body, "max_tokens": 0, "echo": True, "logprobs": 3}).json()
    echoed = echo["choices"][0]["logprobs"]
    for choice in got["choices"]:
        assert choice["text"] == plain["text"]
        _assert_prompt_logprobs(choice["prompt_logprobs"], ids, 3)
        own = [e[str(t)]["logprob"] for t, e in zip(ids[1:], choice["prompt_logprobs"][1:])]
        assert own == pytest.approx(echoed["token_logprobs"][1:], abs=1e-4)
        top3 = [{x["decoded_token"] for x in e.values() if x["rank"] <= 3} for e in choice["prompt_logprobs"][1:]]
        assert top3 == [set(d) for d in echoed["top_logprobs"][1:]]
    only = http.post("/v1/completions", json={**body, "prompt_logprobs": 0}).json()["choices"][0]["prompt_logprobs"]
    _assert_prompt_logprobs(only, ids, 0)

    messages = {"model": MODEL, "messages": HI, "max_tokens": 2, "temperature": 0}
    chat_ids = http.post("/tokenize", json={"messages": HI}).json()["tokens"]
    chat = http.post("/v1/chat/completions", json={**messages, "prompt_logprobs": 2}).json()
    _assert_prompt_logprobs(chat["prompt_logprobs"], chat_ids, 2)
    assert chat["usage"]["prompt_tokens"] == len(chat_ids)
    assert "prompt_logprobs" not in http.post("/v1/chat/completions", json=messages).json()



# -- structured outputs ----------------------------------------------------------------------------------------------


def _structured(http: httpx.Client, path: str, body: dict) -> tuple[list[str], list[str], list[str]]:
    """(texts, finish reasons, the same request's streamed deltas joined per choice)."""
    r = http.post(path, json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    chat = path.endswith("chat/completions")
    choices = r.json()["choices"]
    texts = [c["message"]["content"] if chat else c["text"] for c in choices]
    streamed = [""] * len(choices)
    with http.stream("POST", path, json={"model": MODEL, "temperature": 0, **body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    streamed[c["index"]] += (c["delta"].get("content") or "") if chat else c["text"]
    return texts, [c["finish_reason"] for c in choices], streamed


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_json_schema_answers_are_valid_against_it_streamed_or_not(http, sampling):
    """OpenAI's response_format json_schema on chat, vLLM's guided_json (as JSON text) on completions."""
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for ask in ASKS:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": ask}],
                                                     "response_format": schema_format}),
                           ("/v1/completions", {"prompt": _chat_prompt(ask), "guided_json": json.dumps(PERSON)})):
            texts, reasons, streamed = _structured(http, path, {**body, "max_tokens": 60, **sampling})
            assert reasons == ["stop"], (texts, reasons)  # the grammar's end: the model chose the EOS there
            jsonschema.validate(json.loads(texts[0]), PERSON)
            assert streamed == texts


def test_tgi_grammar_constrains_generate_as_tgi_does(http, server):
    """TGI's `grammar` on /generate (a JSON schema, as an object or its text; a regular expression), streamed and
    not, as TGI's own client sends it; one that does not compile is TGI's 422."""
    from huggingface_hub import InferenceClient

    def generate(grammar: dict[str, Any], stream: bool = False) -> str:
        body = {"inputs": _chat_prompt(ASKS[0]), "parameters": {"max_new_tokens": 60, "grammar": grammar}}
        if not stream:
            r = http.post("/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()["generated_text"]
        with http.stream("POST", "/generate_stream", json=body) as s:
            events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
        return events[-1]["generated_text"]

    for value in (PERSON, json.dumps(PERSON)):
        text = generate({"type": "json", "value": value})
        jsonschema.validate(json.loads(text), PERSON)
        assert generate({"type": "json", "value": value}, stream=True) == text
    assert re.fullmatch(r"[A-Z][a-z]+ is [0-9]{2}\.", generate({"type": "regex", "value": r"[A-Z][a-z]+ is [0-9]{2}\."}))
    hf = InferenceClient(model=f"{server.url}/generate")
    answer = hf.text_generation(_chat_prompt(ASKS[1]), max_new_tokens=60, grammar={"type": "json", "value": PERSON})
    jsonschema.validate(json.loads(answer), PERSON)
    r = http.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "("}}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    assert "regular expression does not compile" in r.json()["error"], r.text


def test_json_object_answers_are_json_objects(http):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": ASKS[1]}],
                                                 "response_format": {"type": "json_object"}}),
                       ("/v1/completions", {"prompt": _chat_prompt(ASKS[0]), "structured_outputs": {
                           "json_object": True}})):
        texts, reasons, _ = _structured(http, path, {**body, "max_tokens": 60})
        assert reasons == ["stop"] and isinstance(json.loads(texts[0]), dict), texts


@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs"])
def test_a_choice_answer_is_exactly_one_of_the_choices(http, field):
    choices = ["Rome", "Milan", "Naples", "Turin"]
    spec = {"guided_choice": choices} if field == "guided_choice" else {"structured_outputs": {"choice": choices}}
    for sampling in ({}, SAMPLED):
        texts, reasons, streamed = _structured(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 20,
                                                                         **spec, **sampling})
        assert texts[0] in choices and reasons == ["stop"] and streamed == texts, texts
        texts, _, _ = _structured(http, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Which is the capital of Italy?"}], "max_tokens": 20, **spec,
            **sampling})
        assert texts[0] in choices, texts


@pytest.mark.parametrize("field", ["guided_regex", "structured_outputs"])
def test_a_regex_answer_fully_matches_it(http, field):
    regex = r" [A-Z][a-z]+ \(\d{4}\)\."
    spec = {"guided_regex": regex} if field == "guided_regex" else {"structured_outputs": {"regex": regex}}
    for sampling in ({}, SAMPLED):
        texts, reasons, streamed = _structured(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 30,
                                                                         **spec, **sampling})
        assert re.fullmatch(regex, texts[0]) and reasons == ["stop"] and streamed == texts, texts


def test_a_grammar_answer_is_one_of_its_sentences(http):
    grammar = 'root ::= " " city " is in " country "."\ncity ::= "Rome" | "Milan"\ncountry ::= "Italy" | "France"'
    texts, reasons, _ = _structured(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 30,
                                                              "guided_grammar": grammar})
    assert re.fullmatch(r" (Rome|Milan) is in (Italy|France)\.", texts[0]) and reasons == ["stop"], texts


def test_a_lark_grammar_answers_as_its_ebnf_twin(http):
    """vLLM's guided_grammar (and structured_outputs.grammar) take Lark too: the same grammar in Lark answers as in
    EBNF, greedy and sampled, streamed or not."""
    ebnf = 'root ::= " " city " is in " country "."\ncity ::= "Rome" | "Milan"\ncountry ::= "Italy" | "France"'
    lark = 'start: " " city " is in " country "."\n// the cities\ncity: "Rome" | "Milan"\ncountry: /Italy|France/'
    for sampling in ({}, {"temperature": 1.0, "seed": 3}):
        answers = [_structured(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 30, **sampling, **spec})
                   for spec in ({"guided_grammar": ebnf}, {"guided_grammar": lark},
                                {"structured_outputs": {"grammar": lark}})]
        assert answers[1] == answers[0] == answers[2], answers
        assert re.fullmatch(r" (Rome|Milan) is in (Italy|France)\.", answers[0][0][0]), answers


def test_json_without_whitespace_as_vllm_asks_for_it(http):
    """structured_outputs.disable_any_whitespace (alone or beside response_format) and the older
    guided_decoding_backend 'xgrammar:disable-any-whitespace': JSON valid against its schema with no whitespace
    outside strings but the separators ', ' and ': ', streamed or not."""
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": ASKS[0]}],
                                                 "response_format": schema_format,
                                                 "structured_outputs": {"disable_any_whitespace": True}}),
                       ("/v1/completions", {"prompt": _chat_prompt(ASKS[1]), "structured_outputs": {
                           "json": PERSON, "disable_any_whitespace": True}}),
                       ("/v1/completions", {"prompt": _chat_prompt(ASKS[0]), "guided_json": PERSON,
                                            "guided_decoding_backend": "xgrammar:disable-any-whitespace"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": ASKS[1]}],
                                                 "response_format": {"type": "json_object"},
                                                 "guided_decoding_backend": "xgrammar:disable-any-whitespace"})):
        for sampling in ({}, SAMPLED):
            texts, reasons, streamed = _structured(http, path, {**body, "max_tokens": 60, **sampling})
            value = json.loads(texts[0])
            assert reasons == ["stop"] and streamed == texts, (texts, reasons)
            assert texts[0] == json.dumps(value, ensure_ascii=False), texts  # Python's separators are xgrammar's
            if "json_object" not in json.dumps(body):
                jsonschema.validate(value, PERSON)


def test_structural_tags_as_vllm_takes_them(http):
    """response_format type structural_tag (xgrammar's format: here one tag, JSON between its begin and end) on chat,
    and structured_outputs.structural_tag (its JSON text, vLLM's older structures and triggers) on completions: the
    JSON between the tags is valid against its schema."""
    tag = {"type": "tag", "begin": "<person>", "content": {"type": "json_schema", "json_schema": PERSON},
           "end": "</person>"}
    for sampling in ({}, SAMPLED):
        texts, reasons, streamed = _structured(http, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": ASKS[0]}], "max_tokens": 60, **sampling,
            "response_format": {"type": "structural_tag", "format": tag}})
        inside = re.fullmatch(r"<person>(.*)</person>", texts[0], re.DOTALL)
        assert inside and reasons == ["stop"] and streamed == texts, (texts, reasons)
        jsonschema.validate(json.loads(inside.group(1)), PERSON)
    older = {"type": "structural_tag", "triggers": ["<person"],
             "structures": [{"begin": "<person>", "schema": PERSON, "end": "</person>"}]}
    # free text, but a trigger starts a structure whose JSON must follow (tests/test_grammar.py checks which texts)
    texts, reasons, _ = _structured(http, "/v1/completions", {
        "prompt": _chat_prompt(ASKS[1]), "max_tokens": 60,
        "structured_outputs": {"structural_tag": json.dumps(older)}})
    assert reasons[0] in ("stop", "length") and texts[0], (texts, reasons)
    for part in re.findall(r"<person>(.*?)</person>", texts[0], re.DOTALL):
        jsonschema.validate(json.loads(part), PERSON)


def test_ignore_eos_goes_on_past_a_structured_outputs_end_as_vllm_does(http):
    """With ignore_eos a structured request runs to max_tokens: the grammar's output, then free text."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "guided_choice": ["Rome"]}
    ended = http.post("/v1/completions", json=body).json()
    on = http.post("/v1/completions", json={**body, "ignore_eos": True}).json()
    assert (ended["choices"][0]["text"], ended["choices"][0]["finish_reason"]) == ("Rome", "stop"), ended
    assert on["choices"][0]["finish_reason"] == "length" and on["usage"]["completion_tokens"] == 10, on
    assert on["choices"][0]["text"].startswith("Rome") and len(on["choices"][0]["text"]) > 4, on


def test_each_of_n_choices_follows_the_schema_on_its_own(http):
    """n=2 sampled: each choice has its own matcher and draws as a request with its seed alone (seed + index)."""
    body = {"messages": [{"role": "user", "content": ASKS[0]}], "max_tokens": 60, "temperature": 1.0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    texts, reasons, streamed = _structured(http, "/v1/chat/completions", {**body, "n": 2, "seed": 4})
    alone = [_structured(http, "/v1/chat/completions", {**body, "seed": seed})[0][0] for seed in (4, 5)]
    assert texts == alone and streamed == texts and texts[0] != texts[1]
    for text, reason in zip(texts, reasons):
        if reason == "stop":  # sampled at 1.0, a choice may run to max_tokens; what it wrote still follows
            jsonschema.validate(json.loads(text), PERSON)
    assert "stop" in reasons


def test_structured_requests_beside_free_ones_leave_them_as_alone(http):
    """Free requests batched with structured ones (of each kind) answer as alone, and so do the structured."""
    jobs = [{"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True},
            {"prompt": _chat_prompt(ASKS[0]), "max_tokens": 60, "guided_json": PERSON},
            {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, **SAMPLED},
            {"prompt": PROMPT, "max_tokens": 20, "guided_choice": ["Rome", "Milan"], **SAMPLED},
            {"prompt": PROMPT, "max_tokens": 30, "guided_regex": r" [A-Z][a-z]+\."}]

    def run(body: dict) -> str:
        r = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = _alone_then_together(http, run, jobs)
    jsonschema.validate(json.loads(alone[1]), PERSON)


@pytest.mark.parametrize("body,param,says", [
    ({"guided_json": {"type": "foo"}}, "guided_json", ('the JSON schema does not compile: Unsupported type "foo"',)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                          "required": 3}}}},
     "response_format", ("the JSON schema does not compile",)),
    ({"guided_regex": "(ab"}, "guided_regex", ("the regular expression does not compile",
                                               "parenthesis is not closed")),
    ({"structured_outputs": {"grammar": 'root ::= "a" rest'}}, "structured_outputs.grammar",
     ('the EBNF grammar does not compile', 'Rule "rest" is not defined')),
    ({"guided_grammar": 'start: "a" rest'}, "guided_grammar",
     ("the Lark grammar does not compile", "line 1, column 12: unknown name 'rest'")),
    ({"structured_outputs": {"grammar": 'start: "unterminated'}}, "structured_outputs.grammar",
     ("the Lark grammar does not compile", "line 1, column 8: unterminated string literal")),
    ({"response_format": {"type": "structural_tag", "format": {"type": "bogus"}}}, "response_format",
     ("the structural tag does not compile", "Format type not recognized: bogus")),
])
def test_what_does_not_compile_is_a_400_naming_it(http, body, param, says):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_structured_output", err
    for fragment in says:
        assert fragment in err["message"], (fragment, err["message"])


@pytest.mark.parametrize("stream", [False, True])
def test_bad_words_that_leave_a_grammar_no_token_are_a_400_naming_them(http, stream):
    """guided_choice ["Rome"] allows " Rome" and its other spellings' first tokens; bad_words masks each ("Rome", as
    written and after a space, and "R", "Ro", "Rom"): no token is left. vLLM samples from the all -inf row; this was
    a 500 "sampling failed". A 400 (an error frame when streamed) naming the masks, and the server goes on."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "guided_choice": ["Rome"],
            "bad_words": ["Rome", "R", "Ro", "Rom"], "stream": stream}
    r = http.post("/v1/completions", json=body)
    if stream:
        assert r.status_code == 200
        [frame] = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        err = frame["error"]
    else:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
    assert err["code"] == "no_token_allowed", err
    assert "the structured output and bad_words together forbid every token" in err["message"], err
    ok = http.post("/v1/completions", json={**body, "bad_words": ["Rome"], "stream": False})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] != "", ok.text


def test_two_structured_outputs_at_once_are_a_400(client):
    with pytest.raises(openai.BadRequestError, match="at most one structured output.*guided_regex and "
                                                     "guided_choice"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                  extra_body={"guided_choice": ["a"], "guided_regex": "a"})


# -- vLLM's bad_words --------------------------------------------------------------------------------------------------
# SmolLM2's greedy answer to PROMPT: " Rome. The capital of Spain is Madrid.\n\nThe answer is: ..." (" Rome" one
# token; " capital of Spain" three); to COLOSSEUM: " Colosseum, which was built ..." (" Col", "os", "seum").
COLOSSEUM = "The most famous ancient amphitheatre in Rome is the"


def test_bad_words_keep_their_words_out_of_the_answer(client, http):
    """As vLLM's clients send them (extra_body): a one-token word, a phrase (its last token masked only after the
    others) and a three-token word leave the greedy answer that held them, and nothing else is refused: "Rome"
    answers Florence, "capital of Spain" lets "capital of" through to another country, and "Colosseum" ends another
    way after " Colos". Several at once, beside plain requests, answer as each alone."""
    def answer(job: tuple[str, list[str]]) -> str:
        prompt, words = job
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                         extra_body={"bad_words": words} if words else None).choices[0].text

    plain, colosseum = answer((PROMPT, [])), answer((COLOSSEUM, []))
    assert plain.startswith(" Rome.") and "capital of Spain" in plain and colosseum.startswith(" Colosseum")
    jobs = [(PROMPT, ["Rome"]), (PROMPT, ["capital of Spain"]), (COLOSSEUM, ["Colosseum"]), (PROMPT, []),
            (PROMPT, ["Rome", " capital of Spain"])]
    rome, spain, colos, same, both = _alone_then_together(http, answer, jobs)
    assert "Rome" not in rome and rome.startswith(" Florence")
    assert "capital of Spain" not in spain and spain.startswith(" Rome. The capital of") and spain != plain
    assert "Colosseum" not in colos and colos.startswith(" Colos") and same == plain
    assert "Rome" not in both and "capital of Spain" not in both
