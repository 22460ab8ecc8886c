"""Errors, translated to HTTP once, here. Handlers raise `ApiError` (or let pydantic / FastAPI raise
theirs); every response body is `{"error": {"type", "message"}}`, never a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("moebert.server")


class ApiError(Exception):
    """An error with its HTTP status; `type` is a stable machine-readable name. `close` asks the server to
    close the connection after the answer (what is still on the wire is not worth reading)."""

    status = 400
    type = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None, close: bool = False):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"


class BadRequest(ApiError):
    status, type = 400, "bad_request"


class InvalidInput(ApiError):
    status, type = 422, "invalid_input"


class PayloadTooLarge(ApiError):
    status, type = 413, "payload_too_large"


class RequestTimeout(ApiError):
    status, type = 408, "request_timeout"


class UnknownModel(ApiError):
    status, type = 404, "unknown_model"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str = "missing or wrong API key (Authorization: Bearer KEY)"):
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class _RetryLater(ApiError):
    def __init__(self, message: str, retry_after_s: int = 1, close: bool = False):
        super().__init__(message, {"Retry-After": str(retry_after_s)}, close)


class Overloaded(_RetryLater):
    status, type = 429, "overloaded"


class Unavailable(_RetryLater):
    status, type = 503, "unavailable"


class DeadlineExceeded(_RetryLater):
    status, type = 504, "timeout"


class ClientGone(Exception):
    """The client disconnected; nobody reads the answer."""


def error_body(type_: str, message: str) -> dict:
    return {"error": {"type": type_, "message": message}}


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message), status_code=status, headers=headers)


def api_error_response(err: ApiError) -> JSONResponse:
    """The one translation of an ApiError to HTTP (exception handlers and the ASGI guard both use it)."""
    return error_response(err.status, err.type, err.message, err.headers)


def _describe(errors: list[dict]) -> str:
    """pydantic errors as one readable line, without echoing the (possibly huge) input back."""
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            msg = f"invalid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
        parts.append(f"{loc}: {msg}")
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI, on_error) -> None:
    """`on_error(reason)` counts failures (the metrics hook)."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        on_error(err.type)
        return api_error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        on_error("invalid_input")
        return error_response(422, "invalid_input", _describe(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own: 404 route, 405 method, 400 unparsable body (bad encoding, nesting too deep).
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "bad_request")
        if err.status_code == 400:
            err = StarletteHTTPException(422, "the body is not valid UTF-8 JSON (or is nested too deeply)")
            type_ = "invalid_input"
        on_error(type_)
        return error_response(err.status_code, type_, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        on_error("internal")
        return error_response(500, "internal", "internal error (logged on the server)")
