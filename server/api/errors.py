"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, except on TGI's routes (/, /generate,
/generate_stream, /info), which answer in TGI's, {"error": message, "error_type": type}, with TGI's status codes:
what TGI's clients (huggingface_hub's InferenceClient, text-generation) parse into their ValidationError,
OverloadedError, ..."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from server.policy.policy import PolicyError
from server.engine.sampling_params import SamplingError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error", 408: "invalid_request_error",
         413: "invalid_request_error",
         429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


CODES = {400: "bad_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
         413: "context_length_exceeded", 429: "queue_full", 499: "client_closed_request", 500: "internal_error",
         503: "model_not_ready"}


CLIENT_CLOSED = 499  # nginx's status for a client that left before its answer (which nobody reads)
GENERATION_FAILED = "generation_failed"  # the code of an error the engine raised while generating

TGI_PATHS = frozenset({"/", "/generate", "/generate_stream", "/info"})
# TGI's router: a validation error is 422 and a failed generation 424 (its InferError); error_type is what its
# clients dispatch on. Statuses TGI never sends keep theirs.
TGI_STATUS = {400: 422}
TGI_TYPES = {401: "authentication", 404: "validation", 408: "validation", 413: "validation", 422: "validation",
             424: "generation", 429: "overloaded",
             499: "cancelled", 500: "incomplete_generation", 503: "unavailable"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    code = code or CODES.get(status, f"http_{status}")  # OpenAI's schema: code is a string
    return {"error": {"message": message, "type": TYPES.get(status, "error"), "param": param, "code": code}}


def tgi_error(status: int, message: str, *, code: str | None = None) -> tuple[int, dict]:
    """(status, body) of an error on TGI's routes, from the status and code the OpenAI routes would answer with."""
    status = 424 if code == GENERATION_FAILED else TGI_STATUS.get(status, status)
    return status, {"error": message, "error_type": TGI_TYPES.get(status, "error")}


def route_path(scope: Scope) -> str:
    """The path the app routes on: `scope["path"]` less the `root_path` a proxy mounted it under (uvicorn's
    --root-path and ASGI mounts put the prefix in both)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


def shaped(path: str, status: int, message: str, *, param: str | None = None,
           code: str | None = None) -> tuple[int, dict]:
    """(status, body) of an error answered on `path` (a route path): TGI's shape on its routes, OpenAI's elsewhere."""
    if path in TGI_PATHS:
        return tgi_error(status, message, code=code)
    return status, error_body(status, message, param=param, code=code)


def _response(request: Request, status: int, message: str, *, param: str | None = None, code: str | None = None,
              headers: dict[str, str] | None = None) -> JSONResponse:
    status, body = shaped(route_path(request.scope), status, message, param=param, code=code)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and status != CLIENT_CLOSED:  # a client that left is counted once, as an abort
        metrics.observe_error(status)
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _response(request, e.status, e.message, param=e.param, code=e.code, headers=e.headers)

    @app.exception_handler(PolicyError)
    async def policy_error(request: Request, e: PolicyError) -> JSONResponse:
        return _response(request, 400, str(e), param="policy", code="invalid_policy")

    @app.exception_handler(SamplingError)
    async def sampling_error(request: Request, e: SamplingError) -> JSONResponse:
        return _response(request, 400, str(e), code="invalid_sampling_parameters")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            detail = next(str(err.get("ctx", {}).get("error", "")) for err in errs if err.get("type") == "json_invalid")
            return _response(request, 400, f"request body is not valid JSON ({detail})", code="invalid_json")
        parts = []
        param = None
        for err in errs:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            param = param or loc or None
            msg = str(err.get("msg")).removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
            parts.append(f"{loc}: {msg}" if loc else msg)
        return _response(request, 400, "invalid request: " + "; ".join(parts), param=param, code="invalid_request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:  # a bug: still answer in JSON
        return _response(request, 500, f"internal error: {type(e).__name__}: {e}", code="internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _response(request, e.status_code, str(e.detail), headers=getattr(e, "headers", None))
