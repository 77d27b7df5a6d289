"""The discovery routes clients call before anything else: TGI's GET /info (through huggingface_hub), vLLM's GET
/version, OpenAI's GET /v1/models/{model} (through the `openai` client). A real uvicorn process serves the real
SmolLM2-135M with limits other than the defaults, and every limit /info reports is checked against what the server
does at and one past it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from server import __version__
from tests.serving import Process, metric_value, painters_server, serving, settings, wait_until

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
MAX_LEN, QUEUE, SEQS = 256, 2, 1  # max_model_len, queue_capacity, max_num_seqs: not the defaults
# TGI 3's Info (router/src/lib.rs): every field, and no other
TGI_INFO = {"model_id", "model_sha", "model_pipeline_tag", "max_concurrent_requests", "max_best_of",
            "max_stop_sequences", "max_input_tokens", "max_total_tokens", "validation_workers", "max_client_batch_size",
            "router", "version", "sha", "docker_label"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    tmp = Path(tmp_path_factory.mktemp("discovery"))
    (tmp / "presets.yaml").write_text("fast: skip:10\n")
    env = {"PAINTERS_MAX_MODEL_LEN": str(MAX_LEN), "PAINTERS_QUEUE_CAPACITY": str(QUEUE),
           "PAINTERS_MAX_NUM_SEQS": str(SEQS)}
    with painters_server(tmp, extra=("--policy-presets", str(tmp / "presets.yaml")), env=env) as p:
        yield p


@pytest.fixture(scope="module")
def info(server: Process) -> dict[str, Any]:
    # huggingface_hub 2.4 asks for the provider by name: its default (None) is refused before any request
    return InferenceClient(server.url, provider="hf-inference").get_endpoint_info()


def text_of(http: httpx.Client, n: int) -> str:
    """A prompt of exactly `n` tokens, as the server counts them."""
    text = "hello" + " hello" * (n - 1)
    assert http.post("/tokenize", json={"prompt": text}).json()["count"] == n
    return text


def generate(http: httpx.Client, inputs: str, **parameters: Any) -> httpx.Response:
    return http.post("/generate", json={"inputs": inputs, "parameters": parameters})


def assert_tgi_refusal(r: httpx.Response, *says: str) -> None:
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    for s in says:
        assert s in r.json()["error"], (s, r.json())


def test_info_through_huggingface_hub(info):
    assert set(info) == TGI_INFO
    assert info == info | {
        "model_id": MODEL, "model_sha": None, "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": SEQS + QUEUE, "max_best_of": 1, "max_stop_sequences": 16,
        "max_input_tokens": MAX_LEN, "max_total_tokens": MAX_LEN, "max_client_batch_size": QUEUE,
        "router": "painters", "version": version("painters"), "sha": None, "docker_label": None}
    # the requests' checks run on asyncio.to_thread's pool, a ThreadPoolExecutor of its default size
    assert info["validation_workers"] == ThreadPoolExecutor()._max_workers


def test_info_token_limits_are_the_enforced_ones(info, http):
    """TGI's meaning: a prompt of at most max_input_tokens, and with max_new_tokens at most max_total_tokens."""
    most = info["max_input_tokens"]
    assert generate(http, text_of(http, most), max_new_tokens=0).status_code == 200
    assert_tgi_refusal(generate(http, text_of(http, most + 1), max_new_tokens=0), f"at most {most}")
    total = info["max_total_tokens"]
    r = generate(http, text_of(http, total - 1), max_new_tokens=1, details=True, ignore_eos=True)
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 1
    assert_tgi_refusal(generate(http, text_of(http, total - 1), max_new_tokens=2), f"{total} tokens")


def test_info_stop_and_best_of_limits_are_the_enforced_ones(info, http):
    most = info["max_stop_sequences"]
    stops = [f"stop{i}" for i in range(most + 1)]
    assert generate(http, "Hi", max_new_tokens=1, stop=stops[:most]).status_code == 200
    assert_tgi_refusal(generate(http, "Hi", max_new_tokens=1, stop=stops), f"at most {most}")
    best = info["max_best_of"]
    assert generate(http, "Hi", max_new_tokens=1, best_of=best).status_code == 200
    assert_tgi_refusal(generate(http, "Hi", max_new_tokens=1, best_of=best + 1), "best_of")


def test_info_client_batch_size_is_the_enforced_one(info, client):
    most = info["max_client_batch_size"]
    r = client.completions.create(model=MODEL, prompt=["Hi"] * most, max_tokens=1)
    assert len(r.choices) == most
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["Hi"] * (most + 1), max_tokens=1)
    assert e.value.code == "too_many_sequences" and f"at most {most}" in e.value.message


def test_info_concurrent_requests_is_the_enforced_one(info, http, server):
    """max_concurrent_requests requests are taken at once (one decoding, the rest waiting), one more is a 429."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as streams:
        opened = []
        try:
            for i in range(info["max_concurrent_requests"]):
                r = streams.send(streams.build_request("POST", "/v1/completions", json=body), stream=True)
                assert r.status_code == 200, r.read()
                opened.append(r)
                if i == 0:  # the first decodes: its first token came (the rest are queued behind it)
                    assert next(r.iter_lines()).startswith("data:")
            r = http.post("/v1/completions", json=body | {"stream": False, "max_tokens": 1})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "queue_full"
        finally:
            for r in opened:
                r.close()
    wait_until(lambda: _idle(http), timeout=60, what="the aborted requests ended")


def _idle(http: httpx.Client) -> bool:
    text = http.get("/metrics").text
    return (metric_value(text, "painters:num_requests_running") == 0
            and metric_value(text, "painters:num_requests_waiting") == 0)


def test_version(http):
    assert http.get("/version").json() == {"version": __version__}
    assert __version__ == version("painters") == http.get("/openapi.json").json()["info"]["version"]


def test_retrieve_is_the_listed_entry(client):
    listed = client.models.list().data
    assert {m.id for m in listed} == {MODEL, f"{MODEL}@fast"}
    for m in listed:
        assert client.models.retrieve(m.id).model_dump() == m.model_dump()
    base = client.models.retrieve(MODEL).model_dump()
    # vLLM's fields: root is what --model loaded, parent the base of a derived name
    assert base | {"max_model_len": MAX_LEN, "root": MODEL, "parent": None, "policy": "full"} == base
    assert base["permission"][0]["object"] == "model_permission" and base["permission"][0]["allow_sampling"]
    fast = client.models.retrieve(f"{MODEL}@fast").model_dump()
    assert fast["policy"] == "skip:10-19" and fast["parent"] == MODEL and fast["root"] == MODEL


def test_retrieve_a_policy_suffix(client):
    """MODEL@POLICY is served though not listed: its card says the policy it runs, in canonical form."""
    card = client.models.retrieve(f"{MODEL}@pairs").model_dump()
    assert card["id"] == f"{MODEL}@pairs" and card["policy"] == "pairs:4-25" and card["parent"] == MODEL


@pytest.mark.parametrize("name,says", [("gpt-4o", ""), (f"{MODEL}@bogus", "invalid policy 'bogus'"),
                                       (f"{MODEL}x", ""), ("org/name", "")])
def test_retrieve_unknown_is_openais_404(client, name, says):
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve(name)
    error = e.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"  # OpenAI's type for its 404s (as for its 400s)
    assert f"model {name!r} not found" in error["message"] and says in error["message"]
    assert f"'{MODEL}', '{MODEL}@fast'" in error["message"]  # the served names


def test_discovery_leaves_request_metrics_alone(http, client):
    """Discovery calls are not requests of any policy: no per-policy series moves, and no policy label appears (a
    retrieve of MODEL@POLICY compiles the policy, and must not count it)."""
    wait_until(lambda: _idle(http), timeout=60, what="idle server")
    before = _policy_series(http)
    http.get("/info")
    http.get("/version")
    client.models.list()
    client.models.retrieve(MODEL)
    client.models.retrieve(f"{MODEL}@skip:3")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    after = _policy_series(http)
    assert after == before
    assert not any("skip:3" in line for line in after)


def _policy_series(http: httpx.Client) -> list[str]:
    return sorted(line for line in http.get("/metrics").text.splitlines()
                  if "policy=" in line and not line.startswith("#") and "_created" not in line)


def test_discovery_routes_keyed_documented_and_shaped():
    """With keys, /info and /v1/models/{model} want one as /v1/models does; /info refuses in TGI's shape (its route),
    the other in OpenAI's. /version is open, as vLLM leaves it (it says nothing of the model). OpenAPI lists all three."""
    with serving(settings(api_key="k")) as c:
        r = c.get("/info")
        assert r.status_code == 401 and r.json()["error_type"] == "authentication"
        r = c.get("/v1/models/tiny")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/version").json() == {"version": __version__}
        key = {"Authorization": "Bearer k"}
        assert c.get("/info", headers=key).json()["model_id"] == "tiny"
        assert c.get("/version", headers=key).json() == {"version": __version__}
        assert c.get("/v1/models/tiny", headers=key).json() == c.get("/v1/models", headers=key).json()["data"][0]
        paths = c.get("/openapi.json", headers=key).json()["paths"]
        assert {"/info", "/version", "/v1/models/{model}"} <= set(paths)
        assert json.dumps(paths["/info"]).count("TGIInfo") == 1
