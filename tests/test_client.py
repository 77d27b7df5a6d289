"""The typed client (sync and async) against a real uvicorn server on loopback serving the tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from clients.client import AsyncPaintersClient, PaintersClient, PaintersError
from clients.types import CompletionResponse, GenerateResponse, StreamEvent
from tests.conftest import CharTokenizer
from tests.serving import serve_tiny

PROMPT = "hello world"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve_tiny() as u:
        yield u


@pytest.fixture
def client(url: str) -> Iterator[PaintersClient]:
    with PaintersClient(url) as c:
        yield c


GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


# -- sync -------------------------------------------------------------------------------------------------------


def test_completions(client: PaintersClient) -> None:
    r = client.completions(PROMPT, **GREEDY)
    assert isinstance(r, CompletionResponse)
    assert r.model == "tiny"
    assert len(r.choices[0].text) == 6  # CharTokenizer: one character per token
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 6 and r.usage.prompt_tokens == len(PROMPT)
    assert r.painters is not None and r.painters.policy == "full" and r.painters.timings is not None


def test_policy_reaches_the_server(client: PaintersClient, url: str) -> None:
    by_string = client.completions(PROMPT, policy="skip:2", **GREEDY)
    by_json = client.completions(PROMPT, policy={"kind": "skip", "count": 2}, **GREEDY)
    full = client.completions(PROMPT, **GREEDY)
    assert by_string.painters.policy == by_json.painters.policy == "skip:2-3"
    assert by_string.painters.schedule == "schedule:0-1,4-5"
    assert by_string.choices[0].text == by_json.choices[0].text
    assert by_string.choices[0].text != full.choices[0].text  # two layers fewer changes a random model's output
    with PaintersClient(url, model="tiny@pairs") as suffixed:  # the model-name suffix form
        assert suffixed.completions(PROMPT, **GREEDY).painters.policy == "pairs:1-4"


def test_stream_completions_matches_non_streaming(client: PaintersClient) -> None:
    whole = client.completions(PROMPT, policy="pairs", **GREEDY)
    chunks = list(client.stream_completions(PROMPT, policy="pairs", stream_options={"include_usage": True}, **GREEDY))
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == whole.choices[0].text
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["painters"]["policy"] == "pairs:1-4"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_generate_and_generate_stream(client: PaintersClient) -> None:
    r = client.generate(PROMPT, policy="pairs", max_new_tokens=5, details=True, ignore_eos=True)
    assert isinstance(r, GenerateResponse)
    assert r.details is not None and r.details.generated_tokens == 5 and len(r.details.tokens) == 5
    assert r.painters is not None and r.painters.policy == "pairs:1-4"
    events = list(client.generate_stream(PROMPT, policy="pairs", max_new_tokens=5, ignore_eos=True))
    assert all(isinstance(e, StreamEvent) for e in events) and len(events) == 5
    assert events[-1].generated_text == r.generated_text == "".join(e.token.text for e in events)
    assert events[-1].painters is not None and events[-1].painters.policy == "pairs:1-4"


def test_models_policies_and_ready(client: PaintersClient) -> None:
    models = client.models()
    assert models[0]["id"] == "tiny" and models[0]["max_model_len"] == 128
    info = client.policies()
    assert info["num_layers"] == 6 and info["default_policy"] == "full"
    assert client.ready()
    with PaintersClient("http://127.0.0.1:9", timeout=2) as nobody:
        assert not nobody.ready()


def test_tokenize_detokenize(client: PaintersClient) -> None:
    ids = client.tokenize("abc")
    assert ids == CharTokenizer().encode("abc")
    assert client.detokenize(ids) == CharTokenizer().decode(ids)


def test_errors_carry_status_and_message(client: PaintersClient) -> None:
    with pytest.raises(PaintersError) as e:
        client.completions(PROMPT, policy="bogus")
    assert e.value.status == 400 and "bogus" in e.value.message and "allowed forms" in e.value.message
    with pytest.raises(PaintersError) as e:
        list(client.stream_completions(PROMPT, policy="skip:9"))
    assert e.value.status == 400 and "skip:9" in e.value.message
    with pytest.raises(PaintersError) as e:
        client.completions(PROMPT, max_tokens=500)
    assert e.value.status == 400 and "maximum context length is 128" in e.value.message
    with PaintersClient(str(client.http.base_url), model="gpt-4") as wrong, pytest.raises(PaintersError) as e:
        wrong.completions(PROMPT)
    assert e.value.status == 404 and "tiny" in e.value.message
    with pytest.raises(PaintersError) as e:
        client.detokenize([5, 1000])
    assert e.value.status == 400 and "outside the vocabulary 0-127" in e.value.message


def test_tgi_routes_answer_errors_as_tgi_does(client: PaintersClient, url: str) -> None:
    """/generate and /generate_stream answer in TGI's shape and statuses, so TGI's own client (huggingface_hub's
    InferenceClient pointed at the route) raises its ValidationError, not a bare HTTP error; ours reads it too."""
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError

    for hf in (InferenceClient(model=url), InferenceClient(model=f"{url}/generate")):  # TGI's root route too
        out = hf.text_generation(PROMPT, max_new_tokens=4, details=True)
        assert out.details.generated_tokens == 4 and out.generated_text == client.generate(
            PROMPT, max_new_tokens=4).generated_text
        assert "".join(hf.text_generation(PROMPT, max_new_tokens=4, stream=True)) == out.generated_text
        for stream in (False, True):
            with pytest.raises(ValidationError, match="at most 128"):
                list(hf.text_generation("x" * 200, max_new_tokens=4, stream=stream)) if stream else \
                    hf.text_generation("x" * 200, max_new_tokens=4)
    r = httpx.post(f"{url}/generate", json={"inputs": "x", "parameters": {"policy": "skip:9"}})
    assert r.status_code == 422 and r.json() == {"error": r.json()["error"], "error_type": "validation"}
    assert "allowed forms" in r.json()["error"]
    with pytest.raises(PaintersError) as e:
        client.generate(PROMPT, policy="skip:9")
    assert e.value.status == 422 and "skip:9" in e.value.message


def test_a_failed_generation_on_tgi_routes_is_tgis_generation_error() -> None:
    """A request whose generation fails (here its first token cannot be detokenized) is TGI's 424 with error_type
    "generation", before the stream as after its start: huggingface_hub raises its GenerationError."""
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import GenerationError

    class Poisoned(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            if 62 in ids:  # the tiny model's first greedy token after PROMPT
                raise RuntimeError("poisoned token")
            return super().decode(ids, skip_special_tokens)

    with serve_tiny(tokenizer=Poisoned()) as url:
        r = httpx.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 424 and r.json()["error_type"] == "generation" and "poisoned" in r.json()["error"]
        hf = InferenceClient(model=f"{url}/generate")
        for stream in (False, True):
            with pytest.raises(GenerationError, match="poisoned token"):
                list(hf.text_generation(PROMPT, max_new_tokens=3, stream=True)) if stream else \
                    hf.text_generation(PROMPT, max_new_tokens=3)
        with PaintersClient(url) as c, pytest.raises(PaintersError, match="poisoned token"):
            list(c.generate_stream(PROMPT, max_new_tokens=3))
        r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})  # OpenAI shape
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"


def test_chat_errors_are_painters_errors(client: PaintersClient, url: str) -> None:
    with pytest.raises(PaintersError) as e:
        client.chat([])
    assert e.value.status == 400 and "messages" in e.value.message
    with pytest.raises(PaintersError) as e:
        list(client.stream_chat([{"role": "user", "content": "hi"}], policy="bogus"))
    assert e.value.status == 400 and "bogus" in e.value.message
    # The tiny CharTokenizer has no chat template: the server answers 500 and then closes the connection, so this
    # one gets a client (and a connection) of its own.
    with PaintersClient(url) as own, pytest.raises(PaintersError) as e:
        own.chat([{"role": "user", "content": "hi"}], max_tokens=3)
    assert e.value.status >= 400


# -- async ------------------------------------------------------------------------------------------------------


def test_async_client(url: str) -> None:
    async def main() -> None:
        async with AsyncPaintersClient(url) as c:
            assert await c.ready()
            r, skipped = await asyncio.gather(c.completions(PROMPT, **GREEDY),
                                              c.completions(PROMPT, policy="skip:2", **GREEDY))
            assert r.painters.policy == "full" and skipped.painters.policy == "skip:2-3"
            chunks = [ch async for ch in c.stream_completions(PROMPT, **GREEDY)]
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == r.choices[0].text
            assert chunks[-1]["painters"]["policy"] == "full"
            g = await c.generate(PROMPT, policy="pairs", max_new_tokens=4, ignore_eos=True)
            events = [e async for e in c.generate_stream(PROMPT, policy="pairs", max_new_tokens=4, ignore_eos=True)]
            assert events[-1].generated_text == g.generated_text and len(events) == 4
            assert (await c.models())[0]["id"] == "tiny"
            assert (await c.policies())["num_layers"] == 6
            assert await c.tokenize("abc") == CharTokenizer().encode("abc")
            with pytest.raises(PaintersError) as e:
                await c.completions(PROMPT, policy="bogus")
            assert e.value.status == 400 and "bogus" in e.value.message
            with pytest.raises(PaintersError) as e:
                [ch async for ch in c.stream_completions(PROMPT, policy="bogus")]
            assert e.value.status == 400
            with pytest.raises(PaintersError) as e:
                await c.chat([])
            assert e.value.status == 400

    asyncio.run(main())
