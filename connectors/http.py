"""Shared HTTP client for the FHIR connectors: timeouts, retries, limits, error mapping.

Why one module: every HTTP call a connector makes must have connect/read timeouts, must retry
only what is safe to retry (429, 502-504, connection errors; idempotent methods only), must
honour ``Retry-After``, must respect a per-endpoint concurrency cap and an optional request
rate, and must translate failures into :mod:`aggregator.errors` at the boundary so no
``requests`` exception escapes. :func:`classify_response` is the *one* place that decides what
an HTTP status means. Logs carry URLs with their query values masked (search values can be
PHI: names, birth dates, identifiers) and never bodies or tokens.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, stop_after_attempt

from aggregator.errors import (
    AccessDenied,
    AuthError,
    ConnectorError,
    Fatal,
    ProtocolError,
    RemoteNotFound,
    TransientConnectorError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: Longest wait we accept from a Retry-After before giving up on the attempt loop.
MAX_RETRY_AFTER = 300.0
MAX_TEXT = 200


class RequestRejected(ConnectorError, Fatal):
    """The server refused the request as asked (HTTP 400, 405, 406, 409, 412, 415, 422...)."""


class AuthStrategy(Protocol):
    """What the HTTP client needs from an auth method (see :mod:`connectors.smart`)."""

    name: str

    def headers(self) -> dict[str, str]:
        """Headers to add to a request to the FHIR server (may fetch a token)."""
        ...

    def invalidate(self) -> None:
        """Forget a cached token after a 401 so the next ``headers()`` gets a fresh one."""
        ...

    # Optional: ``rescope() -> bool`` - after a 403, switch to another scope and get a token
    # for it; True when the request is worth sending again (see connectors.smart).


class NoAuth:
    name = "none"

    def headers(self) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        pass


class StaticAuth:
    """Credentials that cannot be refreshed: a bearer token issued elsewhere, or HTTP Basic.

    Used by DICOMweb; a 401 makes the client send once more (``invalidate`` has nothing to
    forget), then it stands."""

    def __init__(self, name: str, authorization: str) -> None:
        self.name = name
        self._value = authorization

    @classmethod
    def bearer(cls, token: str) -> StaticAuth:
        return cls("bearer", f"Bearer {token}")

    @classmethod
    def basic(cls, user: str, password: str) -> StaticAuth:
        raw = f"{user}:{password}".encode()
        return cls("basic", "Basic " + base64.b64encode(raw).decode("ascii"))

    def headers(self) -> dict[str, str]:
        return {"Authorization": self._value}

    def invalidate(self) -> None:
        pass


# --- small pure helpers ---------------------------------------------------------------------


def mask_url(url: str) -> str:
    """The URL with every query value replaced by ``***`` (keys stay, for debugging)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if not parts.query:
        return urlunsplit(parts._replace(fragment=""))
    keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
    masked = "&".join(f"{k}=***" for k in keys)
    return urlunsplit(parts._replace(query=masked, fragment=""))


class _MaskQueryValues(logging.Filter):
    """Masks the query values in urllib3's own request log lines.

    urllib3 logs every request line at DEBUG, query included: with ``AGGREGATOR_LOG_LEVEL=DEBUG``
    a FHIR search's names and birth dates, or a QIDO-RS PatientID, would reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(mask_url(a) if isinstance(a, str) and "?" in a else a for a in record.args)
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_MaskQueryValues())


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now if now is not None else time.time()
    return max(0.0, when.timestamp() - current)


def server_time(response: requests.Response) -> datetime | None:
    """The server's clock from its ``Date`` header, when it sent one."""
    value = response.headers.get("Date")
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _trim(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def outcome_text(body: Any) -> str | None:
    """A short, PHI-safe summary of an OperationOutcome: each issue's code and details.text.

    ``diagnostics`` is left out on purpose: servers echo search values (names, identifiers)
    into it. ``details.text`` is trimmed. Returns None when ``body`` is not an OperationOutcome.
    """
    if isinstance(body, bytes | bytearray | str):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(body, Mapping) or body.get("resourceType") != "OperationOutcome":
        return None
    parts = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        code = str(issue.get("code") or "unknown")
        details = issue.get("details")
        text = details.get("text") if isinstance(details, Mapping) else None
        parts.append(f"{code}: {_trim(str(text))}" if text else code)
    return "; ".join(parts) or "OperationOutcome without issues"


def outcome_codes(body: Any) -> set[str]:
    """The issue codes of an OperationOutcome body (``transient``, ``not-found``...)."""
    if isinstance(body, bytes | bytearray | str):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            return set()
    if not isinstance(body, Mapping) or body.get("resourceType") != "OperationOutcome":
        return set()
    return {str(i.get("code")) for i in body.get("issue") or [] if isinstance(i, Mapping)}


def classify_response(response: requests.Response, *, item: str | None = None) -> ConnectorError | None:
    """The one place that decides what an HTTP answer means; None for success (2xx, 304).

    429 and 5xx are retriable (with the server's Retry-After); 401 -> :class:`AuthError` (the
    client refreshes the token once before giving up); 403 -> :class:`AccessDenied`; 404/410 ->
    :class:`RemoteNotFound`; other 4xx -> :class:`RequestRejected`. The message carries the
    status and the OperationOutcome summary, never the request or response body.
    """
    status = response.status_code
    if status < 400 or status == 304:
        return None
    item = item or mask_url(response.url or "")
    try:
        body = response.content or b""
    except requests.RequestException:
        body = b""
    body = body.strip()
    detail = outcome_text(body) if body[:1] == b"{" else None
    if detail is None and body[:1] == b"{":
        # OAuth errors: {"error": "...", "error_description": "..."} - codes, not PHI.
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, Mapping) and isinstance(data.get("error"), str):
            desc = data.get("error_description")
            detail = data["error"] + (f": {_trim(str(desc))}" if desc else "")
    reason = f"HTTP {status} {response.reason or ''}".strip() + (f" ({detail})" if detail else "")
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status == 429 or status >= 500:
        return TransientConnectorError(reason, item=item, status=status, retry_after=retry_after)
    if status == 401:
        return AuthError(reason, item=item, status=status)
    if status == 403:
        return AccessDenied(reason, item=item, status=status)
    if status in (404, 410):
        return RemoteNotFound(reason, item=item, status=status)
    return RequestRejected(reason, item=item, status=status)


def retriable_status(error: ConnectorError) -> bool:
    """True for the errors the client retries: 429, 502-504 and transport failures (no status)."""
    return isinstance(error, TransientConnectorError) and (error.status is None or error.status in RETRY_STATUSES)


# --- the client -----------------------------------------------------------------------------


class RateLimiter:
    """Spaces request starts at least ``1/rps`` seconds apart across all threads."""

    def __init__(self, rps: float | None) -> None:
        self.interval = 1.0 / rps if rps and rps > 0 else 0.0
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class Slots:
    """The per-endpoint concurrency cap, held for a whole exchange (headers *and* body).

    Re-entrant per thread: a thread that already holds a slot (streaming a file, or inside a
    request whose 401 makes it fetch a new token through the same client) does not take a
    second one, so a cap of 1 cannot deadlock on itself.
    """

    def __init__(self, n: int) -> None:
        self.size = max(1, n)
        self._sem = threading.BoundedSemaphore(self.size)
        self._local = threading.local()

    @contextmanager
    def hold(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._sem.acquire()
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                self._sem.release()


class HttpClient:
    """A ``requests`` session bound to one endpoint, with the project's network discipline."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: AuthStrategy | None = None,
        concurrency: int = 4,
        rps: float | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        max_attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        user_agent: str = "second-opinion-aggregator",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth: AuthStrategy = auth or NoAuth()
        self.timeout = (connect_timeout, timeout)
        self.max_attempts = max(1, max_attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = max(1, concurrency)
        self.slots = Slots(self.concurrency)
        self._rate = RateLimiter(rps)
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.concurrency + 2, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = user_agent
        self.session.trust_env = False
        #: how many requests were sent (attempts included); for tests and benchmarks
        self.requests_sent = 0

    def close(self) -> None:
        self.session.close()

    # -- URL helpers --------------------------------------------------------------------

    def url(self, path_or_url: str) -> str:
        """Absolute URL for a relative FHIR path (``Patient/1``) or an absolute URL as is."""
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self.base_url}/{path_or_url.lstrip('/')}"

    def same_server(self, url: str) -> bool:
        """True when ``url`` is under the FHIR base: only such URLs receive the token."""
        return url == self.base_url or url.startswith(self.base_url + "/") or url.startswith(self.base_url + "?")

    # -- requests -----------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        data: Any = None,
        basic: tuple[str, str] | None = None,
        stream: bool = False,
        send_auth: bool | None = None,
        retry: bool | None = None,
        retry_on: frozenset[int] | None = None,
        ok_statuses: frozenset[int] = frozenset(),
    ) -> requests.Response:
        """Send one request with retries; return the response or raise a ConnectorError.

        ``send_auth`` defaults to "only to the FHIR server itself" so presigned storage URLs
        never see the bearer token. ``retry`` defaults to True for idempotent methods only.
        ``retry_on`` narrows the retries to answers with these statuses, for requests that
        must not be sent twice unless the server said it did nothing (a Bulk kick-off: after a
        429 or 503 no job exists, after a dropped connection one may). Statuses in
        ``ok_statuses`` are returned instead of raised (the caller decides).
        """
        return self.call(method, url, lambda r: r, headers=headers, params=params, data=data, basic=basic,
                         stream=stream, send_auth=send_auth, retry=retry, retry_on=retry_on,
                         ok_statuses=ok_statuses)

    @contextmanager
    def stream(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        send_auth: bool | None = None,
    ) -> Iterator[requests.Response]:
        """GET a body for the caller to read while the block runs (an export file).

        The concurrency slot is held until the block ends - until the body has been read - so
        the per-endpoint cap counts transfers, not just requests waiting for headers."""
        with self.slots.hold():
            resp = self.request("GET", url, headers=headers, stream=True, send_auth=send_auth)
            try:
                yield resp
            finally:
                resp.close()

    def get_json(
        self,
        url: str,
        *,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        send_auth: bool | None = None,
    ) -> tuple[dict[str, Any], requests.Response]:
        """GET a JSON object; a truncated or malformed body counts as a transient failure."""
        hdrs = {"Accept": "application/fhir+json", **dict(headers or {})}

        def parse(resp: requests.Response) -> tuple[dict[str, Any], requests.Response]:
            return parse_json_object(resp), resp

        return self.call("GET", url, parse, params=params, headers=hdrs, send_auth=send_auth)

    def call(
        self,
        method: str,
        url: str,
        handle: Callable[[requests.Response], T],
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        data: Any = None,
        basic: tuple[str, str] | None = None,
        stream: bool = False,
        send_auth: bool | None = None,
        retry: bool | None = None,
        retry_on: frozenset[int] | None = None,
        ok_statuses: frozenset[int] = frozenset(),
    ) -> T:
        """Like :meth:`request`, but ``handle`` runs inside each attempt, so a body that breaks
        while being read or parsed is retried like a dropped connection."""
        method = method.upper()
        url = self.url(url)
        if retry is None:
            retry = method in IDEMPOTENT or retry_on is not None
        if send_auth is None:
            send_auth = self.same_server(url)
        state = {"refreshed": False, "rescoped": False}

        def attempt() -> T:
            # The slot covers the whole exchange: a streamed body read by ``handle`` counts
            # against the cap until it is consumed, not just until its headers arrived.
            with self.slots.hold():
                resp = self._send(method, url, headers, params, data, basic, stream, send_auth)
                if resp.status_code == 401 and send_auth and not state["refreshed"]:
                    # One refresh: the cached token may have expired or been revoked early.
                    state["refreshed"] = True
                    resp.close()
                    log.info("401 from %s: refreshing the token once", mask_url(url))
                    self.auth.invalidate()
                    resp = self._send(method, url, headers, params, data, basic, stream, send_auth)
                if resp.status_code == 403 and send_auth and not state["rescoped"] and 403 not in ok_statuses:
                    # Once: the token's scope may be the wrong SMART version for this server.
                    state["rescoped"] = True
                    rescope = getattr(self.auth, "rescope", None)
                    if rescope is not None and rescope():
                        resp.close()
                        resp = self._send(method, url, headers, params, data, basic, stream, send_auth)
                if resp.status_code not in ok_statuses:
                    err = classify_response(resp, item=mask_url(url))
                    if err is not None:
                        resp.close()
                        raise err
                try:
                    return handle(resp)
                except requests.RequestException as exc:
                    resp.close()
                    raise TransientConnectorError(f"response broke while reading ({type(exc).__name__})",
                                                  item=mask_url(url))

        if not retry:
            return attempt()
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            retry=_retry_if_retriable if retry_on is None else _retry_if_status(retry_on),
            wait=self._wait,
            sleep=_sleep,
            reraise=True,
            before_sleep=lambda rs: log.info(
                "retrying %s %s after %s (attempt %d)", method, mask_url(url),
                _status_of(rs), rs.attempt_number),
        )
        return retrying(attempt)

    def _wait(self, rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            return min(float(after), MAX_RETRY_AFTER)
        base = min(self.max_backoff, self.backoff * (2 ** (rs.attempt_number - 1)))
        return base * (0.5 + random.random() / 2)

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        params: Any,
        data: Any,
        basic: tuple[str, str] | None,
        stream: bool,
        send_auth: bool,
    ) -> requests.Response:
        hdrs = dict(headers or {})
        if send_auth:
            hdrs.update(self.auth.headers())
        self._rate.wait()
        self.requests_sent += 1
        try:
            resp = self.session.request(
                method, url, headers=hdrs, params=params, data=data, auth=basic,
                stream=stream, timeout=self.timeout, allow_redirects=True,
            )
        except requests.Timeout as exc:
            raise TransientConnectorError(f"timed out ({type(exc).__name__})", item=mask_url(url))
        except requests.RequestException as exc:
            raise TransientConnectorError(f"connection failed ({type(exc).__name__})", item=mask_url(url))
        log.debug("%s %s -> %s", method, mask_url(resp.url or url), resp.status_code)
        return resp


def _sleep(seconds: float) -> None:
    time.sleep(seconds)  # looked up at call time so tests can patch time.sleep


def _status_of(rs: RetryCallState) -> str:
    exc = rs.outcome.exception() if rs.outcome else None
    status = getattr(exc, "status", None)
    return f"HTTP {status}" if status else type(exc).__name__


def _retry_if_retriable(retry_state: RetryCallState) -> bool:
    """Retry 429/502/503/504 and transport errors; a 500 is not retried blindly."""
    if retry_state.outcome is None or not retry_state.outcome.failed:
        return False
    exc = retry_state.outcome.exception()
    return isinstance(exc, TransientConnectorError) and retriable_status(exc)


def _retry_if_status(statuses: frozenset[int]) -> Callable[[RetryCallState], bool]:
    """Retry only answers with one of ``statuses``; a transport error is never retried here."""

    def check(retry_state: RetryCallState) -> bool:
        if retry_state.outcome is None or not retry_state.outcome.failed:
            return False
        exc = retry_state.outcome.exception()
        return isinstance(exc, TransientConnectorError) and exc.status in statuses

    return check


def parse_json_object(resp: requests.Response) -> dict[str, Any]:
    """Parse a JSON object body. A body that is not JSON (a cut connection, a proxy's HTML
    error page) is transient: it is retried, then reported - never half-used."""
    body = resp.content
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise TransientConnectorError(f"response is not valid JSON ({len(body)} bytes)",
                                      item=mask_url(resp.url or ""))
    if not isinstance(data, dict):
        raise ProtocolError("response is not a JSON object", item=mask_url(resp.url or ""))
    return data


def with_params(url: str, set_params: Mapping[str, str | None]) -> str:
    """``url`` with query parameters replaced (None removes); other parameters keep their order."""
    parts = urlsplit(url)
    pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in set_params]
    pairs += [(k, v) for k, v in set_params.items() if v is not None]
    return urlunsplit(parts._replace(query=urlencode(pairs, safe=",:|/")))


__all__ = [
    "AuthStrategy",
    "HttpClient",
    "NoAuth",
    "RateLimiter",
    "RequestRejected",
    "Slots",
    "StaticAuth",
    "classify_response",
    "mask_url",
    "outcome_codes",
    "outcome_text",
    "parse_json_object",
    "parse_retry_after",
    "server_time",
    "with_params",
]
