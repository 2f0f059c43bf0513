"""Browser sessions for the web pages: password sign-in, an HttpOnly SameSite cookie, CSRF tokens.

Scripts use bearer tokens; a browser should not hold one in JavaScript. Signing in checks the
argon2 password (:func:`aggregator.accounts.check_password`) and sets a random session id in an
``HttpOnly; SameSite=Strict`` cookie (``Secure`` over HTTPS). Every state-changing request made
with the cookie must also carry the session's CSRF token in ``X-CSRF-Token`` (the sign-in answer
gives it to the page), so another site cannot act with the user's cookie even where SameSite is
not honoured.

Sessions are kept in the server's memory: they end with the process (users sign in again) and
after ``LIFETIME`` or ``IDLE`` without use. Only a hash of the session id is kept as the key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from aggregator.accounts import Principal

COOKIE = "aggregator_session"
CSRF_HEADER = "x-csrf-token"
LIFETIME = 12 * 3600.0
IDLE = 3600.0
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class Session:
    principal: Principal
    csrf: str
    created: float
    used: float


class SessionStore:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    def create(self, principal: Principal) -> tuple[str, str]:
        """A new session; returns ``(session id for the cookie, CSRF token for the page)``."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._sessions = {k: s for k, s in self._sessions.items() if self._alive(s, now)}
            self._sessions[self._key(sid)] = Session(principal, csrf, now, now)
        return sid, csrf

    @staticmethod
    def _alive(s: Session, now: float) -> bool:
        return now - s.created < LIFETIME and now - s.used < IDLE

    def get(self, session_id: str) -> Session | None:
        now = time.monotonic()
        with self._lock:
            s = self._sessions.get(self._key(session_id))
            if s is None or not self._alive(s, now):
                return None
            s.used = now
            return s

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(self._key(session_id), None)

    def end_user(self, user_id: int) -> None:
        with self._lock:
            self._sessions = {k: s for k, s in self._sessions.items() if s.principal.user_id != user_id}


def csrf_ok(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(session.csrf, given or "")
