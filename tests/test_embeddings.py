"""POST /v1/embeddings end to end: a real uvicorn process serving the real SmolLM2-135M, driven by the official `openai`
client (`client.embeddings.create`) and plain HTTP; each vector checked against transformers' own computation on the
same checkpoint, under `full` and under a policy that skips layers."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from server.policy.compiler import compile_schedule
from server.policy.policy import as_policy
from tests.conftest import bos_word_tokenizer
from tests.reference import reference_hidden
from tests.serving import Process, metric_value, painters_server, serving, settings, tiny_engine

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
TEXTS = ["The capital of France is Paris.", "Layers as painters", "A much longer sentence about the middle layers of a "
         "transformer, which share a representation space and can often be skipped or run in parallel."]
HIDDEN = 576  # SmolLM2-135M's hidden size (its config's hidden_size)
TOL = 2e-5  # per coordinate of a unit vector (coordinates ~0.04): float32 rounding, not a different computation


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    with painters_server(Path(tmp_path_factory.mktemp("embeddings"))) as p:
        yield p


def _reference(hf, tokenizer, text: str, policy: str) -> np.ndarray:
    """transformers' final-normed hidden state of the text's last token under `policy`, L2-normalized."""
    ids = torch.tensor([tokenizer.encode(text)])
    h = reference_hidden(hf, compile_schedule(as_policy(policy), hf.config.num_hidden_layers), ids)[0, -1]
    return torch.nn.functional.normalize(h, dim=-1).numpy()


def _floats(client: openai.OpenAI, **body) -> list[np.ndarray]:
    r = client.embeddings.create(encoding_format="float", **body)
    assert [d.index for d in r.data] == list(range(len(r.data)))
    return [np.asarray(d.embedding) for d in r.data]


def test_full_equals_transformers_last_token_normed(client, smollm2, smollm2_hf):
    ids = torch.tensor([smollm2.tokenizer.encode(TEXTS[0])])
    out = smollm2_hf(ids, output_hidden_states=True)
    last = out.hidden_states[-1][0, -1]
    # transformers' last hidden state is after the final norm: the LM head reads it as it is
    torch.testing.assert_close(smollm2_hf.lm_head(last), out.logits[0, -1], rtol=1e-5, atol=1e-4)
    want = torch.nn.functional.normalize(last, dim=-1).numpy()
    r = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert r.object == "list" and r.model == MODEL and len(r.data) == 1 and r.data[0].object == "embedding"
    got = np.asarray(r.data[0].embedding)
    assert got.shape == (HIDDEN,) and abs(np.linalg.norm(got) - 1) < 1e-5
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert r.usage.prompt_tokens == r.usage.total_tokens == ids.shape[1]
    np.testing.assert_allclose(got, _reference(smollm2_hf, smollm2.tokenizer, TEXTS[0], "full"), atol=TOL, rtol=0)


@pytest.mark.parametrize("how", ["suffix", "body"])
def test_a_skip_policy_equals_a_reference_that_skips_those_layers(client, smollm2, smollm2_hf, how):
    kwargs = {"model": f"{MODEL}@skip:10"} if how == "suffix" else {"model": MODEL, "extra_body": {"policy": "skip:10"}}
    [got] = _floats(client, input=TEXTS[2], **kwargs)
    np.testing.assert_allclose(got, _reference(smollm2_hf, smollm2.tokenizer, TEXTS[2], "skip:10"), atol=TOL, rtol=0)
    [full] = _floats(client, model=MODEL, input=TEXTS[2])
    assert np.abs(got - full).max() > 1e-2, "skipping ten layers changed nothing"


def test_a_batch_equals_each_input_alone_in_order(client, smollm2):
    ids = smollm2.tokenizer.encode(TEXTS[1])
    # short, long, middle: rows run longest first (and padded to their chunk's longest), answers in input order
    inputs = [TEXTS[1], TEXTS[2], TEXTS[0]]
    batch = _floats(client, model=f"{MODEL}@pairs", input=inputs)
    alone = [_floats(client, model=f"{MODEL}@pairs", input=t)[0] for t in inputs]
    for b, a in zip(batch, alone, strict=True):
        np.testing.assert_allclose(b, a, atol=TOL, rtol=0)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2
    # token ids: one list, and a list of lists, are the same inputs as their text
    np.testing.assert_allclose(_floats(client, model=f"{MODEL}@pairs", input=ids)[0], alone[0], atol=TOL, rtol=0)
    by_ids = _floats(client, model=f"{MODEL}@pairs", input=[ids, smollm2.tokenizer.encode(TEXTS[2])])
    np.testing.assert_allclose(by_ids[0], alone[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(by_ids[1], alone[1], atol=TOL, rtol=0)


def test_base64_is_the_same_float32_little_endian(client, http):
    floats = _floats(client, model=MODEL, input=TEXTS)
    raw = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS, "encoding_format": "base64"}).json()
    for d, want in zip(raw["data"], floats, strict=True):
        got = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(got, np.asarray(want, dtype=np.float32))
    # the client's default asks for base64 and decodes it itself
    default = client.embeddings.create(model=MODEL, input=TEXTS)
    for d, want in zip(default.data, floats, strict=True):
        np.testing.assert_array_equal(np.asarray(d.embedding, dtype=np.float32), want.astype(np.float32))


def test_dimensions_user_and_truncation(client, smollm2):
    [plain] = _floats(client, model=MODEL, input=TEXTS[2])
    [same] = _floats(client, model=MODEL, input=TEXTS[2], dimensions=HIDDEN, user="someone")
    np.testing.assert_array_equal(same, plain)
    ids = smollm2.tokenizer.encode(TEXTS[2])
    r = client.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float",
                                 extra_body={"truncate_prompt_tokens": 5})
    assert r.usage.prompt_tokens == 5
    [tail] = _floats(client, model=MODEL, input=ids[-5:])
    np.testing.assert_allclose(np.asarray(r.data[0].embedding), tail, atol=TOL, rtol=0)
    whole = client.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float",
                                     extra_body={"truncate_prompt_tokens": -1})
    np.testing.assert_allclose(np.asarray(whole.data[0].embedding), plain, atol=TOL, rtol=0)


@pytest.mark.parametrize("body,status,says", [
    ({"input": ""}, 400, "non-empty"),
    ({"input": []}, 400, "non-empty"),
    ({"input": ["a", ""]}, 400, "non-empty"),
    ({"input": [[1, 2], []]}, 400, "non-empty"),
    ({"input": "hello " * 2100}, 400, "at most 2048"),
    ({"input": ["a"] * 65}, 400, "at most 64"),
    ({"input": [49152]}, 400, "0-49151"),
    ({"input": "hi", "dimensions": 100}, 400, "576"),
    ({"input": "hi", "encoding_format": "float16"}, 400, "base64"),
    ({"input": "hi", "policy": "skip:99"}, 400, "0-29"),
    ({"input": "hi", "model": f"{MODEL}@nonsense"}, 400, "skip"),
    ({"input": "hi", "truncate_prompt_tokens": 0}, 400, "-1"),
])
def test_bad_inputs_are_400s_naming_what_is_allowed(http, body, status, says):
    r = http.post("/v1/embeddings", json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"], r.text


def test_counted_in_metrics_by_policy_and_nothing_left_in_the_cache(client, http):
    def counts() -> tuple[float, float]:
        text = http.get("/metrics").text
        return (metric_value(text, "painters:request_success_total", policy="skip:3-5", finished_reason="stop"),
                metric_value(text, "painters:prompt_tokens_total", policy="skip:3-5"))

    before = counts()
    r = client.embeddings.create(model=f"{MODEL}@skip:3-5", input=TEXTS[:2], encoding_format="float")
    after = counts()
    assert after[0] - before[0] == 1 and after[1] - before[1] == r.usage.prompt_tokens
    text = http.get("/metrics").text
    assert metric_value(text, "painters:kv_slots_usage_perc") == 0
    assert metric_value(text, "painters:num_requests_running") == 0


def test_a_batch_beyond_the_kv_budget_is_a_400_naming_the_inputs():
    """A batch of inputs that could never fit the KV budget at once (each in blocks of its own) is refused before it
    runs, naming input and how many tokens the policy's budget holds, not max_tokens (which these requests have not);
    a batch that fits runs. The probe's prompts are refused alike."""
    with serving(settings(kv_budget_tokens=6 * 64)) as c:  # the tiny model's 6 slots x 64 tokens
        r = c.post("/v1/embeddings", json={"model": "tiny", "input": ["a" * 40] * 3})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "input" and error["code"] == "kv_budget_exceeded", error
        assert "max_tokens" not in error["message"] and "3 prompts" in error["message"], error
        assert "at most 64 tokens" in error["message"] and "fewer or shorter input" in error["message"], error
        assert c.post("/v1/embeddings", json={"model": "tiny", "input": ["a" * 20] * 2}).status_code == 200
        r = c.post("/v1/probe", json={"model": "tiny", "prompts": ["a" * 40] * 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompts", r.text
        assert "max_tokens" not in r.json()["error"]["message"], r.text


def test_the_answer_names_the_model_as_asked_as_completions_do():
    """model "tiny@skip:2" is answered as "tiny@skip:2", as /v1/completions, chat and responses answer it (vLLM
    echoes the request's model); no model, the served one."""
    with serving(settings()) as c:
        for model in ("tiny@skip:2", "tiny"):
            body = {"model": model, "input": "hello"}
            assert c.post("/v1/embeddings", json=body).json()["model"] == model
            assert c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1}).json()[
                "model"] == model
        assert c.post("/v1/embeddings", json={"input": "hello"}).json()["model"] == "tiny"


@pytest.mark.parametrize("bad", [[-1], [[5], [10**6]], ["ok", "\ud800"]], ids=["id", "ids", "surrogate"])
def test_a_bad_input_is_a_400_naming_input(bad):
    """Token ids outside the vocabulary, or text that is not Unicode, are refused naming the embeddings' own field,
    input (not completions' prompt)."""
    with serving(settings()) as c:
        r = c.post("/v1/embeddings", content=json.dumps({"model": "tiny", "input": bad}),  # escapes a surrogate
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text


def test_add_special_tokens_decides_whether_a_text_gets_its_tokenizers_bos():
    """On a tokenizer that adds <bos> by default (as Gemma's): a text is embedded with it unless
    add_special_tokens is false."""
    with serving(settings(), tiny_engine(bos_word_tokenizer())) as c:
        def embed(**body) -> tuple[list[float], int]:
            r = c.post("/v1/embeddings", json={"model": "tiny", "encoding_format": "float", **body})
            assert r.status_code == 200, r.text
            return r.json()["data"][0]["embedding"], r.json()["usage"]["prompt_tokens"]

        with_bos, without = embed(input="hello world"), embed(input="hello world", add_special_tokens=False)
        assert with_bos == embed(input=[1, 3, 4]) and with_bos[1] == 3
        assert without == embed(input=[3, 4]) and without[1] == 2
        assert with_bos[0] != without[0]


@pytest.mark.parametrize("policy", ["full", "skip:6"])
def test_gemma_embeddings_equal_transformers(gemma3, gemma3_hf, gemma3_engine, policy):
    """Gemma 3's final norm (its weight offset by one) and scaled embeddings pool as transformers' do, in one batch."""
    got = gemma3_engine.embed(TEXTS, policy=policy)
    for text, vector in zip(TEXTS, got, strict=True):
        np.testing.assert_allclose(np.asarray(vector), _reference(gemma3_hf, gemma3.tokenizer, text, policy),
                                   atol=TOL, rtol=0)
