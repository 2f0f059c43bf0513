"""RFC 9457 ``application/problem+json`` answers, mapped from the one exception tree.

A problem carries the error's own message (our messages are PHI-free by rule) and never its
``item`` (which may be a file name) nor a stack trace; an unexpected exception is answered by
its absence of detail: "internal error", logged by type only.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aggregator import errors
from aggregator.jobs.lock import CaseBusy

log = logging.getLogger("aggregator.api")
MEDIA_TYPE = "application/problem+json"

#: most specific first: the first class the exception is an instance of gives the status
STATUS: list[tuple[type[BaseException], int]] = [
    (errors.AuthenticationRequired, 401),
    (errors.PermissionDenied, 403),
    (errors.NotFound, 404),
    (errors.AlreadyExists, 409),
    (CaseBusy, 409),
    (errors.RequestTooLarge, 413),
    (errors.RateLimited, 429),
    (errors.InputTooLarge, 413),
    (errors.UsageError, 400),
    (errors.ConfigError, 422),
    (errors.ChecklistError, 422),
    (errors.VerificationFailed, 422),
    (errors.NotImplementedYet, 501),
    (errors.TransientConnectorError, 503),
    (errors.ConnectorError, 502),
    (errors.StoreError, 503),
]

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "error": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
}


def status_for(exc: BaseException) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def problem(status: int, detail: str | None = None, *, error: str | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if error:
        body["error"] = error
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


async def aggregator_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.AggregatorError)
    status = status_for(exc)
    headers = {}
    retry = getattr(exc, "retry_after", None)
    if status in (503, 429, 409) and isinstance(exc, errors.Retriable):
        headers["Retry-After"] = str(max(1, math.ceil(retry or 5)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="aggregator"'
    if status >= 500:
        log.warning("request failed with %s (%s)", status, type(exc).__name__)
    return problem(status, exc.message, error=type(exc).__name__, headers=headers or None)


async def http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    detail = exc.detail if isinstance(exc.detail, str) else None
    return problem(exc.status_code, detail, headers=headers or None)


async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # pydantic's errors quote the input: keep where and what, never the value
    found = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
             for e in exc.errors()]
    return problem(422, "the request does not match the API's schema", error="ValidationError", errors=found)


async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error %s", type(exc).__name__)
    return problem(500, "internal error", error="InternalError")


def install(app: Any) -> None:
    app.add_exception_handler(errors.AggregatorError, aggregator_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for problem answers, so clients (and fuzzers) know their shape."""
    return {s: {"description": HTTPStatus(s).phrase, "content": {MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}}}
            for s in statuses}
