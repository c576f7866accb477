"""The service's one error base: an error raised on purpose, carrying its HTTP answer.

Owns `ApiError` (status, machine-readable type, message, the field at fault, an optional
Retry-After) and the two JSON shapes an error leaves the service in: loraloop's
`{"error": {"type", "message", "field"?}}` (`error_body`) and, for the OpenAI gateway, OpenAI's
`{"error": {"message", "type", "param", "code"}}` (`openai_error_body`). Subclasses live beside the
code that raises them (service.api.errors, service.inference.proxy); the one exception-to-HTTP
mapping is service.api.errors. Knows nothing of FastAPI, routes or the database.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "error_body", "openai_error_body"]


def error_body(error_type: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    """loraloop's error shape: `{"error": {"type", "message", "field"?, **extra}}`."""
    error: dict[str, Any] = {"type": error_type, "message": message}
    if field is not None:
        error["field"] = field
    error.update(extra)
    return {"error": error}


def openai_error_body(message: str, error_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    """The error shape OpenAI clients parse: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ApiError(Exception):
    """An error the service raises itself, with its HTTP status and machine-readable type."""

    status_code = 400
    error_type = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.error_type, self.message, self.field)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
