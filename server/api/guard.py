"""The gate every HTTP request passes before routing (a pure ASGI middleware): the API key, the shutdown drain, and
the body's size and arrival time limits, each refused in the route's error shape (OpenAI's; TGI's on its routes)
before any JSON is parsed or any text tokenized. It also counts the requests in flight, so a drain knows when the last
answer has been written."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import route_path, shaped
from server.api.state import AppState

# probes carry no key (SageMaker's /ping is one); nor does a version check (as vLLM)
ALWAYS_OPEN = frozenset({"/health", "/ready", "/ping", "/version"})


class Guard:
    def __init__(self, app: ASGIApp, *, state: AppState, keys: tuple[str, ...], open_paths: frozenset[str]) -> None:
        self.app, self.state, self.open_paths = app, state, open_paths
        # Digests have one length, so comparing them says nothing about a key's length; keys are never kept in
        # clear beyond this point, nor logged or echoed.
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if self._digests and path not in self.open_paths and not self._authorized(scope):
            await self._refuse(send, path, 401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return
        if self.state.draining and path not in self.open_paths | {"/metrics"}:
            e = self.state.draining_error()
            await self._refuse(send, path, e.status, e.message, code=e.code, headers=e.headers)
            return
        limit = self.state.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._too_large(send, path, declared, limit)
            return
        self.state.in_flight += 1
        try:
            timeout = self.state.settings.body_timeout_s
            try:  # a body trickled in a byte at a time held its connection, and a file descriptor, for ever
                async with asyncio.timeout(timeout):
                    body = await _read_body(receive, limit)
            except TimeoutError:
                await self._refuse(send, path, 408, f"the request body did not arrive within {timeout:g} s "
                                   "(body_timeout_s); send it at once", code="request_timeout",
                                   headers={"Connection": "close"})
                return
            if body is None:
                await self._too_large(send, path, None, limit)
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.state.in_flight -= 1

    def _authorized(self, scope: Scope) -> bool:
        auth = (_header(scope, b"authorization") or "").strip()
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else (_header(scope, b"x-api-key") or "")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for known in self._digests:  # every key compared, in constant time: no early exit
            ok |= hmac.compare_digest(digest, known)
        return ok

    async def _too_large(self, send: Send, path: str, declared: str | None, limit: int) -> None:
        size = f"{declared} bytes" if declared and declared.isdigit() else "larger than that"
        await self._refuse(send, path, 413, f"request body is {size}; this server accepts at most {limit} bytes "
                                      "(max_body_bytes); send a shorter prompt or split the request",
                           code="request_too_large", headers={"Connection": "close"})

    async def _refuse(self, send: Send, path: str, status: int, message: str, *, code: str | None,
                      headers: dict[str, str] | None = None) -> None:
        status, shape = shaped(path, status, message, code=code)
        self.state.metrics.observe_error(status)
        body = json.dumps(shape).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes (a chunked body declares no length)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left before sending it all
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read above, then the real channel (so disconnects still reach the app)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
