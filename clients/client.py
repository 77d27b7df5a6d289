"""A typed Painters client over httpx, sync (`PaintersClient`) and async (`AsyncPaintersClient`), with streaming.

Every call takes the layer policy as an argument (string form like "skip:10" or a JSON object); it travels in the
body's `policy` field. Both clients build the same requests (`_*_body` functions) and parse the same responses.
Each request also carries its policy and a digest of its prompt's start in headers (`route_headers`), which a
router that cannot read bodies (Painters on Ray Serve) routes by.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse

from clients.types import ChatResponse, CompletionResponse, GenerateResponse, ProbeResponse, StreamEvent

Policy = str | dict[str, Any] | None


class PaintersError(RuntimeError):
    """An error answer from the server (status and the server's message)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        error = body.get("error")  # OpenAI's shape, or TGI's on /generate: {"error": message, "error_type": ...}
        message = (error if isinstance(error, str) else error.get("message")) or str(body)
    except (ValueError, AttributeError):
        body, message = response.text, response.text
    raise PaintersError(response.status_code, message, body)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _completion_body(model: str | None, prompt: Any, policy: Policy, **options: Any) -> dict[str, Any]:
    return _drop_none({"model": model, "prompt": prompt, "policy": policy, **options})


def _chat_body(model: str | None, messages: list[dict[str, Any]], policy: Policy, **options: Any) -> dict[str, Any]:
    return _drop_none({"model": model, "messages": messages, "policy": policy, **options})


def _generate_body(model: str | None, inputs: str, policy: Policy, **parameters: Any) -> dict[str, Any]:
    return _drop_none({"model": model, "inputs": inputs, "parameters": _drop_none({"policy": policy, **parameters})})


PREFIX_CHARS = 256  # prompts sharing this many leading characters share a routing key
KEEPALIVE_EXPIRY = 2.0  # s an idle connection is kept; below uvicorn's keep-alive timeout (5 s)


def route_headers(body: dict[str, Any]) -> dict[str, str]:
    """`x-painters-policy` (as sent, JSON policies as JSON) and `x-painters-prefix` (digest of the prompt's first
    PREFIX_CHARS characters, or first message's) for `body`; the server ignores them."""
    policy = body.get("policy", body.get("parameters", {}).get("policy"))
    out = {} if policy is None else {"x-painters-policy": policy if isinstance(policy, str) else json.dumps(policy)}
    prompt = body.get("prompt", body.get("inputs", body.get("prompts", body.get("messages"))))
    while isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, dict, str)):
        prompt = prompt[0]
    if isinstance(prompt, dict):
        prompt = prompt.get("content")
    if prompt:
        head = prompt[:PREFIX_CHARS] if isinstance(prompt, str) else json.dumps(prompt[:PREFIX_CHARS // 4])
        out["x-painters-prefix"] = hashlib.blake2b(head.encode(), digest_size=8).hexdigest()
    return {k: v for k, v in out.items() if v.isascii()}


def _probe_body(model: str | None, prompts: list[str] | list[list[int]] | list[str | list[int]],
                policy: Policy) -> dict[str, Any]:
    return {"model": model, "prompts": prompts, "policy": policy}


def _sse_data(data: str) -> dict[str, Any] | None:
    if data == "[DONE]":
        return None
    obj = json.loads(data)
    if "error" in obj and "choices" not in obj:
        error = obj["error"]
        if isinstance(error, str):  # TGI's shape (/generate_stream)
            raise PaintersError(500, error, obj)
        code = error.get("code")
        raise PaintersError(code if isinstance(code, int) else 500, error.get("message", str(obj)), obj)
    return obj


class PaintersClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> PaintersClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        r = self.http.post(path, json=body, headers=route_headers(body))
        _raise_for(r)
        return r.json()

    def _get(self, path: str) -> Any:
        r = self.http.get(path)
        _raise_for(r)
        return r.json()

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with connect_sse(self.http, "POST", path, json=body, headers=route_headers(body)) as source:
            _raise_for_stream(source.response)
            for event in source.iter_sse():
                obj = _sse_data(event.data)
                if obj is None:
                    return
                yield obj

    def completions(self, prompt: str | list[str] | list[int] | list[list[int]], *, policy: Policy = None,
                    **options: Any) -> CompletionResponse:
        """POST /v1/completions; options: max_tokens, temperature, top_p, top_k, seed, stop, n, logprobs, echo, …"""
        return CompletionResponse.model_validate(
            self._post("/v1/completions", _completion_body(self.model, prompt, policy, **options)))

    def stream_completions(self, prompt: str | list[int], *, policy: Policy = None,
                           **options: Any) -> Iterator[dict[str, Any]]:
        yield from self._stream("/v1/completions",
                                _completion_body(self.model, prompt, policy, stream=True, **options))

    def chat(self, messages: list[dict[str, Any]], *, policy: Policy = None, **options: Any) -> ChatResponse:
        return ChatResponse.model_validate(
            self._post("/v1/chat/completions", _chat_body(self.model, messages, policy, **options)))

    def stream_chat(self, messages: list[dict[str, Any]], *, policy: Policy = None,
                    **options: Any) -> Iterator[dict[str, Any]]:
        yield from self._stream("/v1/chat/completions", _chat_body(self.model, messages, policy, stream=True, **options))

    def generate(self, inputs: str, *, policy: Policy = None, **parameters: Any) -> GenerateResponse:
        return GenerateResponse.model_validate(
            self._post("/generate", _generate_body(self.model, inputs, policy, **parameters)))

    def generate_stream(self, inputs: str, *, policy: Policy = None, **parameters: Any) -> Iterator[StreamEvent]:
        for obj in self._stream("/generate_stream", _generate_body(self.model, inputs, policy, **parameters)):
            yield StreamEvent.model_validate(obj)

    def probe(self, prompts: list[str] | list[list[int]] | list[str | list[int]], *,
              policy: Policy = None) -> ProbeResponse:
        """POST /v1/probe: one forward pass (no sampling, no KV kept) and how alike its steps' hidden states are."""
        return ProbeResponse.model_validate(self._post("/v1/probe", _probe_body(self.model, prompts, policy)))

    def models(self) -> list[dict[str, Any]]:
        return self._get("/v1/models")["data"]

    def policies(self) -> dict[str, Any]:
        return self._get("/policies")

    def tokenize(self, prompt: str) -> list[int]:
        return self._post("/tokenize", {"prompt": prompt})["tokens"]

    def detokenize(self, tokens: list[int]) -> str:
        return self._post("/detokenize", {"tokens": tokens})["prompt"]

    def ready(self) -> bool:
        try:
            return self.http.get("/ready").status_code == 200
        except httpx.HTTPError:
            return False


class AsyncPaintersClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 256) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        # Idle connections go before the server closes them: reusing one it is closing fails with httpx.ReadError.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                              keepalive_expiry=KEEPALIVE_EXPIRY)
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport,
                                      limits=limits)

    async def __aenter__(self) -> AsyncPaintersClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        r = await self.http.post(path, json=body, headers=route_headers(body))
        _raise_for(r)
        return r.json()

    async def _get(self, path: str) -> Any:
        r = await self.http.get(path)
        _raise_for(r)
        return r.json()

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with aconnect_sse(self.http, "POST", path, json=body, headers=route_headers(body)) as source:
            if source.response.status_code >= 400:
                await source.response.aread()
                _raise_for(source.response)
            async for event in source.aiter_sse():
                obj = _sse_data(event.data)
                if obj is None:
                    return
                yield obj

    async def completions(self, prompt: str | list[str] | list[int] | list[list[int]], *, policy: Policy = None,
                          **options: Any) -> CompletionResponse:
        return CompletionResponse.model_validate(
            await self._post("/v1/completions", _completion_body(self.model, prompt, policy, **options)))

    def stream_completions(self, prompt: str | list[int], *, policy: Policy = None,
                           **options: Any) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/v1/completions", _completion_body(self.model, prompt, policy, stream=True, **options))

    async def chat(self, messages: list[dict[str, Any]], *, policy: Policy = None, **options: Any) -> ChatResponse:
        return ChatResponse.model_validate(
            await self._post("/v1/chat/completions", _chat_body(self.model, messages, policy, **options)))

    def stream_chat(self, messages: list[dict[str, Any]], *, policy: Policy = None,
                    **options: Any) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/v1/chat/completions", _chat_body(self.model, messages, policy, stream=True, **options))

    async def generate(self, inputs: str, *, policy: Policy = None, **parameters: Any) -> GenerateResponse:
        return GenerateResponse.model_validate(
            await self._post("/generate", _generate_body(self.model, inputs, policy, **parameters)))

    async def generate_stream(self, inputs: str, *, policy: Policy = None,
                              **parameters: Any) -> AsyncIterator[StreamEvent]:
        async for obj in self._stream("/generate_stream", _generate_body(self.model, inputs, policy, **parameters)):
            yield StreamEvent.model_validate(obj)

    async def probe(self, prompts: list[str] | list[list[int]] | list[str | list[int]], *,
                    policy: Policy = None) -> ProbeResponse:
        return ProbeResponse.model_validate(await self._post("/v1/probe", _probe_body(self.model, prompts, policy)))

    async def models(self) -> list[dict[str, Any]]:
        return (await self._get("/v1/models"))["data"]

    async def policies(self) -> dict[str, Any]:
        return await self._get("/policies")

    async def tokenize(self, prompt: str) -> list[int]:
        return (await self._post("/tokenize", {"prompt": prompt}))["tokens"]

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self._post("/detokenize", {"tokens": tokens}))["prompt"]

    async def ready(self) -> bool:
        try:
            return (await self.http.get("/ready")).status_code == 200
        except httpx.HTTPError:
            return False


def _raise_for_stream(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()
        _raise_for(response)
