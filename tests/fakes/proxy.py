"""A forwarding HTTP proxy with fault injection, for tests against real peers.

Every GET is forwarded to one upstream (Orthanc, the Medplum FHIR peer) unless a fault is
queued for its path, in which case the proxy answers that status itself (429/503 with
``Retry-After``, 401, 403). ``log`` holds (path with query, status) of every request, so tests
can count what a pull asked for; ``peak`` is the most requests that were in flight at once.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


class FaultProxy:
    """A forwarding HTTP proxy for one upstream, with queued faults per path pattern."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.faults: list[tuple[re.Pattern[str], int, dict[str, str]]] = []
        #: (pattern, seconds): matching requests are forwarded that much later (overlap on demand)
        self.holds: list[tuple[re.Pattern[str], float]] = []
        self.log: list[tuple[str, int]] = []
        self.authorization: list[str | None] = []
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, pattern: str, status: int, retry_after: int | None = None, times: int = 1) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        self.faults += [(re.compile(pattern), status, headers)] * times

    def hold(self, pattern: str, seconds: float) -> None:
        """Forward every request matching ``pattern`` ``seconds`` late, so concurrent ones overlap."""
        self.holds.append((re.compile(pattern), seconds))

    def _take(self, path: str) -> tuple[int, dict[str, str]] | None:
        with self.lock:
            for i, (rx, status, headers) in enumerate(self.faults):
                if rx.search(path):
                    del self.faults[i]
                    return status, headers
        return None

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # http.server's method name
                with proxy.lock:
                    proxy.active += 1
                    proxy.peak = max(proxy.peak, proxy.active)
                try:
                    self._forward()
                finally:
                    with proxy.lock:
                        proxy.active -= 1

            def _forward(self) -> None:
                proxy.authorization.append(self.headers.get("Authorization"))
                fault = proxy._take(self.path)
                if fault is not None:
                    status, headers = fault
                    body = json.dumps({"error": "injected"}).encode()
                    proxy.log.append((self.path, status))
                    self.send_response(status)
                    for k, v in {**headers, "Content-Type": "application/json",
                                 "Content-Length": str(len(body))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                    return
                for rx, seconds in proxy.holds:
                    if rx.search(self.path):
                        time.sleep(seconds)
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                try:
                    # Host stays the proxy's, so the links a server builds lead back through it
                    headers = {k: v for k in ("Host", "Accept", "If-None-Match") if (v := self.headers.get(k))}
                    conn.request("GET", self.path, headers=headers)
                    up = conn.getresponse()
                    body = up.read()
                finally:
                    conn.close()
                proxy.log.append((self.path, up.status))
                self.send_response_only(up.status)  # the upstream's Date, not ours
                self.send_header("Date", up.getheader("Date") or self.date_time_string())
                for name in ("Content-Type", "ETag"):
                    if up.getheader(name):
                        self.send_header(name, up.getheader(name) or "")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
