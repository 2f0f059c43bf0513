"""Bearer-token authentication, per-token rate limits, role checks and the audit of each act.

Every route depends on :func:`caller`; the access rules themselves are in
:mod:`aggregator.accounts`. :func:`guard` checks a case-scoped permission and records a denied
attempt in the audit trail before the refusal is answered; :func:`audited` records the act
itself with the user, the token id and the client address.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from aggregator import accounts, audit
from aggregator.accounts import Principal
from aggregator.api import sessions
from aggregator.errors import AuthenticationRequired, NotFound, PermissionDenied, RateLimited


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: ``rate`` requests a second on average, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) > 100_000:  # forget idle keys rather than grow without end
                    self._buckets.clear()
                b = self._buckets[key] = _Bucket(float(self.burst), now)
            b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
            b.at = now
            if b.tokens < 1.0:
                raise RateLimited(math.ceil((1.0 - b.tokens) / self.rate))
            b.tokens -= 1.0


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def caller(request: Request) -> Principal:
    """The authenticated caller (FastAPI dependency); 401 without a valid token, 429 when too fast.

    A bearer token comes first; without one, a browser session cookie, with the session's CSRF
    token required on every state-changing method.
    """
    state = request.app.state
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    address = client_address(request)
    if not header:
        session_id = request.cookies.get(sessions.COOKIE)
        if session_id:
            return _from_session(request, session_id, address)
    if scheme.lower() != "bearer" or not token.strip():
        state.limiter.take("addr:" + address)
        raise AuthenticationRequired("a valid API token is required")
    try:
        principal = accounts.authenticate(state.core.db, token.strip())
    except AuthenticationRequired:
        state.limiter.take("addr:" + address)
        audit.record(state.core.db, audit.Actor("anonymous", kind="user", address=address), audit.EXECUTE,
                     "authentication", outcome=audit.DENIED, detail="invalid, revoked or expired token")
        raise
    state.limiter.take("token:" + (principal.token_id or principal.name))
    request.state.principal = principal
    return principal


def _from_session(request: Request, session_id: str, address: str) -> Principal:
    state = request.app.state
    session = state.sessions.get(session_id)
    if session is None:
        state.limiter.take("addr:" + address)
        raise AuthenticationRequired("the session has ended; sign in again")
    state.limiter.take("session:" + session.csrf[:16])
    if request.method not in sessions.SAFE_METHODS and not sessions.csrf_ok(
            session, request.headers.get(sessions.CSRF_HEADER)):
        audit.record(state.core.db, audit.Actor(session.principal.name, address=address, role=session.principal.role),
                     audit.EXECUTE, "csrf", outcome=audit.DENIED, detail="missing or wrong CSRF token")
        raise PermissionDenied("a state-changing request from a browser session needs its X-CSRF-Token")
    request.state.principal = session.principal
    return session.principal


#: the parameter type of every authenticated route
Caller = Annotated[Principal, Depends(caller)]


def actor(request: Request, principal: Principal) -> audit.Actor:
    return audit.Actor(principal.name, kind="user", token_id=principal.token_id, address=client_address(request),
                       role=principal.role)


def audited(request: Request, principal: Principal, action: str, what: str, *, case_id: str | None = None,
            outcome: str = audit.SUCCESS, detail: str = "", entity: dict[str, str] | None = None,
            access_change: bool = False) -> None:
    audit.record(request.app.state.core.db, actor(request, principal), action, what, case_id=case_id,
                 outcome=outcome, detail=detail, entity=entity, access_change=access_change)


def guard(request: Request, principal: Principal, case_id: str, permission: str, action: str, what: str) -> Any:
    """May the caller use ``permission`` on the case? A refusal is audited, then answered.

    Returns the core App for the route's convenience.
    """
    core = request.app.state.core
    try:
        accounts.case_for(core.db, principal, case_id, permission)
    except (NotFound, PermissionDenied) as exc:
        audited(request, principal, action, what, case_id=case_id, outcome=audit.DENIED, detail=type(exc).__name__)
        raise
    return core


def require(request: Request, principal: Principal, permission: str, action: str, what: str) -> Any:
    """A role check for routes that are not about one case; a refusal is audited too."""
    core = request.app.state.core
    try:
        accounts.require(principal, permission)
    except PermissionDenied:
        audited(request, principal, action, what, outcome=audit.DENIED, detail="PermissionDenied")
        raise
    return core
