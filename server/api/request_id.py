"""Request ids a client chooses, for tracing a request through proxies and logs (vLLM's): an `X-Request-Id` header is
echoed on its response, whatever the route and status, and names the answer of a completion or chat request
(`cmpl-<id>`, `chatcmpl-<id>`; a body's `request_id`, vLLM's field, where no header is sent). The engine's own
request ids stay the server's: a client's id is never a key of any state, so two clients sending the same one collide
in nothing."""

from __future__ import annotations

import uuid

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError

HEADER = "x-request-id"
MAX_CHARS = 256  # a longer id would be repeated in every streamed chunk


def response_id(prefix: str, request: Request, given: str | None) -> str:
    """The id of an answer: `prefix`-, then the X-Request-Id header, else the body's `given` request_id, else a fresh
    one (vLLM's precedence). A 400 naming the id when it is longer than MAX_CHARS characters."""
    chosen = request.headers.get(HEADER) or given
    if chosen and len(chosen) > MAX_CHARS:
        param = "X-Request-Id" if request.headers.get(HEADER) else "request_id"
        raise APIError(400, f"{param} is {len(chosen)} characters; send at most {MAX_CHARS}", param=param)
    return f"{prefix}-{chosen or uuid.uuid4().hex}"


class EchoRequestId:
    """A pure ASGI middleware: the response to a request that sent X-Request-Id carries it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = None
        if scope["type"] == "http":
            sent = next((v for k, v in scope["headers"] if k == HEADER.encode()), None)
        if sent is None:
            await self.app(scope, receive, send)
            return

        async def echo(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), sent)]}
            await send(message)
        await self.app(scope, receive, echo)
