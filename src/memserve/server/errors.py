"""OpenAI-style errors for the public API, and the middleware that turns every failure into one.

Every answer that is not a success carries OpenAI's body::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Mapping (the only place where exceptions become HTTP statuses):

| raised                                  | status | type                      |
|-----------------------------------------|--------|---------------------------|
| ``APIError``                            | its own| its own                   |
| ``RequestError`` (tokenizer, engine, …) | 400    | ``invalid_request_error`` |
| ``EngineOverloadedError``               | 503    | ``server_overloaded`` + ``Retry-After`` |
| aiohttp ``HTTPException`` (404, 405, …) | same   | ``invalid_request_error`` |
| ``UpstreamError`` (scheduler: an instance failed mid-request) | 502 | ``upstream_error`` |
| anything else (a bug)                   | 500    | ``server_error``, logged with its traceback |
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import orjson
import structlog
from aiohttp import web

from memserve.engine.types import EngineOverloadedError, RequestError, UpstreamError

log = structlog.stdlib.get_logger(__name__)

RETRY_AFTER_S = 1
"""Seconds a client is told to wait (``Retry-After``) when the engine is overloaded."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class APIError(Exception):
    """An error answer: raise it from a handler and the middleware sends it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        """The OpenAI error object (also used for errors sent inside an SSE stream)."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str = "The server is overloaded, please retry later") -> APIError:
    return APIError(
        503,
        message,
        type="server_overloaded",
        code="server_overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def internal_error() -> APIError:
    return APIError(500, "Internal server error", type="server_error", code="internal_error")


def to_api_error(exc: Exception) -> APIError:
    """Map an exception to its OpenAI error; anything unrecognised is an internal error (a bug)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return bad_request(str(exc), exc.param)
    if isinstance(exc, EngineOverloadedError):
        return overloaded(str(exc) or "The server is overloaded, please retry later")
    if isinstance(exc, UpstreamError):
        return APIError(502, str(exc), type="upstream_error", code="instance_failed")
    return internal_error()


def _http_exception_error(request: web.Request, exc: web.HTTPException) -> APIError:
    if exc.status == 404:
        message = f"Invalid URL ({request.method} {request.path})"
    elif exc.status == 405:
        message = f"Method {request.method} is not allowed for {request.path}"
    else:
        message = exc.text or exc.reason
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    return APIError(exc.status, message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure of ``handler`` with an OpenAI error body (see the module's table).

    Cancellation (client disconnect with ``handler_cancellation``) propagates untouched.
    """
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_exception_error(request, exc).to_response()
    except Exception as exc:
        error = to_api_error(exc)
        if error.status == 500:
            log.exception("unhandled error", method=request.method, path=request.path)
        return error.to_response()
