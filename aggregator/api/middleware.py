"""Hardening as plain ASGI middleware: security headers, body limits, a PHI-free access log.

Plain ASGI (not Starlette's ``BaseHTTPMiddleware``) so that streamed uploads and downloads pass
through without being buffered, and so that job-status polling stays cheap.

* Headers: a strict Content-Security-Policy (the interactive docs get the one CDN they load
  from), ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``, frame denial
  (``X-Frame-Options`` and ``frame-ancestors``), and ``Cache-Control: no-store`` on everything
  that is not the docs (answers hold patient data).
* Body limits: a declared ``Content-Length`` over the limit is refused at once (413); a body
  without one is counted as it arrives and cut off at the limit. Uploads have their own limit.
* Access log: method, path, status and time; the query string is replaced by ``?<masked>``
  (case ids are opaque, but a query may carry anything a client put there).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aggregator.errors import RequestTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("aggregator.api.access")

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
#: the package summary page: its own inline styles, images from itself, nothing else
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; "
            "base-uri 'none'")
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "img-src 'self' data: https://fastapi.tiangolo.com; "
            "connect-src 'self'; worker-src blob:; frame-ancestors 'none'; base-uri 'none'")
DOCS_PATHS = ("/docs", "/redoc")


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        docs = path.startswith(DOCS_PATHS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", (DOCS_CSP if docs else API_CSP).encode()))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY"), (b"cross-origin-opener-policy", b"same-origin")]
                if not docs and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (``upload_limit`` on upload paths)."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int, upload_suffix: str = "/sources/media") -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit
        self.upload_suffix = upload_suffix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope.get("path", "").endswith(self.upload_suffix) else self.limit
        declared = next((v for k, v in scope.get("headers") or [] if k.lower() == b"content-length"), None)
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                await _refuse(send, 413, "the request body is over the size limit")
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestTooLarge("the request body is over the size limit")
            return message

        await self.app(scope, counted, send)


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"type": "about:blank", "title": "Content Too Large", "status": status,
                       "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/problem+json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """One line per request, with the query string masked and no header or body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                query = "?<masked>" if scope.get("query_string") else ""
                access_log.info('%s "%s %s%s" %s %.1fms', client[0], scope.get("method"), scope.get("path"),
                                query, status or 500, (time.perf_counter() - start) * 1000)
