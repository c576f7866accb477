"""The one mapping from exceptions to HTTP answers.

Every error leaves the API as `{"error": {"type", "message", "field"?}}` (422s from request
validation also carry `errors: [{field, reason}]`); the gateway's own errors (service.inference.proxy,
subclasses of the one base `service.errors.ApiError`) carry OpenAI's shape instead. Layers below raise their own exceptions
(memory_store.errors, training.render.RenderError) and never build HTTP responses themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from memory_store.errors import Conflict, DatabaseUnavailable, IdempotencyConflict, NotFound
from service.errors import ApiError, error_body
from training.render import RenderError

logger = logging.getLogger(__name__)


class InvalidField(ApiError):
    """A well-formed request whose field is still unacceptable (unknown id, over a limit)."""

    status_code = 422
    error_type = "invalid_request"


class Unauthenticated(ApiError):
    status_code = 401
    error_type = "unauthenticated"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": "Bearer"}


class Forbidden(ApiError):
    status_code = 403
    error_type = "forbidden"


class ResourceNotFound(ApiError):
    status_code = 404
    error_type = "not_found"


class AdapterFilesUnavailable(ApiError):
    """The registry names a version whose folder is missing or does not match its sha256."""

    status_code = 409
    error_type = "adapter_files_unavailable"


class BodyTooLarge(ApiError):
    status_code = 413
    error_type = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes", field="body")
        self.limit = limit

    def body(self) -> dict[str, Any]:
        return error_body(self.error_type, self.message, self.field, limit_bytes=self.limit)


def field_path(loc: Sequence[str | int]) -> str:
    """`("body", "items", 3, "target_index")` -> `items[3].target_index` (the request's own terms)."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        where, parts = parts[0], parts[1:]
        if not parts:
            return str(where)
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _validation_reason(error: Any) -> str:
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "json_invalid":
        loc, cause = error.get("loc", ()), (error.get("ctx") or {}).get("error")
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return f"{message}{where}" + (f": {cause}" if cause else "")
    return message.removeprefix("Value error, ")


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    # The exception carries its own answer: loraloop's shape, or OpenAI's for the gateway's errors.
    return _json(exc.status_code, exc.body(), exc.headers() or None)


def _validation_field(error: Any) -> str:
    if error.get("type") == "json_invalid":
        return "body"  # its loc is ("body", <character offset>), not a field of the request
    return field_path(error.get("loc", ()))


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"field": _validation_field(err), "reason": _validation_reason(err)} for err in exc.errors()]
    first = errors[0] if errors else {"field": "body", "reason": "invalid request"}
    return _json(
        422,
        error_body("validation_error", f"{first['field']}: {first['reason']}", first["field"], errors=errors),
    )


async def _render_error(request: Request, exc: RenderError) -> JSONResponse:
    return _json(422, error_body("invalid_feedback", f"{exc.field}: {exc.reason}", exc.field))


async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return _json(404, error_body("not_found", str(exc)))


async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
    if isinstance(exc, IdempotencyConflict):
        return _json(409, error_body("idempotency_conflict", str(exc), "Idempotency-Key"))
    return _json(409, error_body("conflict", str(exc)))


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The cause can hold connection strings; it goes to the log at WARNING without the URL.
    logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return _json(
        503,
        error_body("database_unavailable", "the database is unavailable; retry later"),
        {"Retry-After": "1"},
    )


async def _dbapi_error(request: Request, exc: DBAPIError) -> JSONResponse:
    if exc.connection_invalidated or _is_connection_error(exc):
        return await _database_unavailable(request, exc)
    # Not the exception text: PostgreSQL's DETAIL ("Failing row contains (...)") holds the row's
    # values, i.e. feedback content. The statement (placeholders only) and SQLSTATE locate the bug.
    logger.error(
        "database error on %s %s: %s (sqlstate %s) in %s",
        request.method,
        request.url.path,
        type(exc.orig).__name__,
        getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "sqlite_errorname", None),
        exc.statement,
    )
    return _json(500, error_body("internal_error", "internal database error"))


def _is_connection_error(exc: DBAPIError) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(exc, InterfaceError):
        return True
    if isinstance(exc, OperationalError):
        text = str(exc.orig).lower()
        # SQLite's "database is locked" is contention, the others are a server that is gone.
        return any(
            marker in text
            for marker in (
                "connect",
                "server closed",
                "terminating",
                "database is locked",
                "timeout",
                "shutdown",
            )
        )
    return False


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = {
        400: "bad_request",
        404: "not_found",
        405: "method_not_allowed",
        413: "body_too_large",
        415: "unsupported_media_type",
    }.get(exc.status_code, "http_error")
    # FastAPI's only 400 is a body it could not decode (invalid UTF-8, nesting too deep for json).
    field = "body" if exc.status_code == 400 else None
    return _json(
        exc.status_code, error_body(error_type, str(exc.detail), field), dict(exc.headers or {}) or None
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json(500, error_body("internal_error", "internal server error"))


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping on `app`; the only place an exception becomes an HTTP status."""
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(RenderError, _render_error)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _not_found)  # type: ignore[arg-type]
    app.add_exception_handler(Conflict, _conflict)  # type: ignore[arg-type]
    app.add_exception_handler(DatabaseUnavailable, _database_unavailable)
    app.add_exception_handler(PoolTimeout, _database_unavailable)
    app.add_exception_handler(DBAPIError, _dbapi_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
