"""Error classes of the HTTP layer and their JSON shapes.

Every error leaves the server in the shape the official client of that route parses: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` everywhere, except Anthropic's
``{"type": "error", "error": {"type", "message"}}`` on ``/v1/messages*``.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

log = logging.getLogger("llamagen.server")

ANTHROPIC_PREFIX = "/v1/messages"


class APIError(Exception):
    """An error answered with ``status``; subclasses fix the status and the type names."""
    status = 500
    openai_type = "server_error"
    anthropic_type = "api_error"

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Mapping[str, str]] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


class InvalidRequest(APIError):
    status = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"

    def __init__(self, message: str):
        # RFC 9110: a 401 names the scheme it wants
        super().__init__(message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class NotFound(APIError):
    status = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"


class MethodNotAllowed(APIError):
    status = 405
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status = 413
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"


class NotServed(APIError):
    """A capability this server was not started with (e.g. embeddings without --embeddings)."""
    status = 501
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class Overloaded(APIError):
    """The queue is full, the model is still loading, or the server is shutting down."""
    status = 503
    openai_type = "server_error"
    anthropic_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after: int = 1, code: Optional[str] = None):
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class ClientClosed(APIError):
    """The client went away before the answer (nginx's 499); nobody reads this response."""
    status = 499


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def error_body(path: str, err: APIError) -> dict:
    if is_anthropic(path):
        return {"type": "error", "error": {"type": err.anthropic_type, "message": err.message}}
    return {"error": {"message": err.message, "type": err.openai_type, "param": err.param,
                      "code": err.code}}


def error_response(path: str, err: APIError) -> JSONResponse:
    return JSONResponse(error_body(path, err), status_code=err.status, headers=err.headers)


def stream_error_payload(path: str, err: APIError) -> dict:
    """The body of the one error event that ends a stream which has already started."""
    return error_body(path, err)


def _param_of(loc) -> Optional[str]:
    """OpenAI's ``param`` for a pydantic location: ('body', 'messages', 0, 'content') ->
    'messages[0].content'.  Union branches (pydantic adds the branch's type name) are dropped."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in _UNION_TAGS):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    if not errors:
        return InvalidRequest("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return InvalidRequest(f"malformed JSON in the request body: {ctx.get('error', 'cannot parse')}")
    param = _param_of(first.get("loc", ()))
    if param is None:
        if first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            return InvalidRequest("the request body must be a JSON object "
                                  "(send it with Content-Type: application/json)")
        return InvalidRequest(f"invalid request body: {first.get('msg')}")
    # a union (prompt, content, stop) reports one error per branch: name the field once
    msg = first.get("msg", "invalid value")
    if sum(1 for e in errors if _param_of(e.get("loc", ())) == param) > 1 and param in _UNION_HELP:
        msg = _UNION_HELP[param]
    return InvalidRequest(f"{param}: {msg}", param=param)


_UNION_HELP = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of "
              "token ids",
    "stop": "must be a string or a list of strings",
    "system": "must be a string or a list of text blocks",
}


def install_handlers(app: FastAPI) -> None:
    """One handler per error class: ours, pydantic's (400), routing's (404/405), and the last
    resort (500, in the route's shape, logged with its traceback)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        cls = {404: NotFound, 405: MethodNotAllowed}.get(exc.status_code)
        if cls is None:
            # a 4xx from the framework (a body that does not parse: FastAPI's 400) is the
            # client's error, typed as such; anything else keeps its status as a server error
            err = (InvalidRequest if 400 <= exc.status_code < 500 else APIError)(str(exc.detail))
            err.status = exc.status_code
        else:
            err = cls(f"{request.method} {request.url.path}: {exc.detail}")
        return error_response(request.url.path, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        # Starlette answers this one outside every middleware, so the error counter that sees
        # the other responses does not see it: counted here
        state = getattr(request.app.state, "llamagen", None)
        if state is not None:
            state.metrics.http_error(500)
        return error_response(request.url.path, APIError(f"internal error: {type(exc).__name__}"))


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
