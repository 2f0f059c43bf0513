"""Users, API tokens, case assignments and the access rules the API enforces.

Three roles: ``admin`` manages users, endpoints and sync schedules; ``navigator`` does everything on cases;
``consultant`` sees only the cases assigned to them, and of those only the gap report, the
summary and the package. The rules live here (not in the routes) so that the API, the later
web pages and the tests share one statement of them.

Passwords are kept as argon2id hashes. An API token is ``<id>.<secret>``: it is shown once when
created; only the SHA-256 of the secret is stored (a random 256-bit secret needs no slow hash,
and a fast one keeps per-request authentication cheap). Tokens expire and can be revoked.

A case the caller may not see raises the very :class:`NotFound` that a missing case raises,
so a consultant cannot tell an unassigned case from one that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from aggregator.errors import AlreadyExists, AuthenticationRequired, NotFound, PermissionDenied, UsageError
from aggregator.store.models import ApiToken, Case, CaseAssignment, User, utcnow

ADMIN, NAVIGATOR, CONSULTANT = "admin", "navigator", "consultant"
ROLES = (ADMIN, NAVIGATOR, CONSULTANT)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
DEFAULT_TOKEN_LIFETIME = timedelta(days=90)
MIN_PASSWORD = 12

#: What each role may do, by permission. Case-scoped permissions of a consultant also need an
#: assignment (see :func:`case_for`).
PERMISSIONS: dict[str, frozenset[str]] = {
    # records requests: letters name the patient and every record asked for; never a consultant's
    ADMIN: frozenset({"users", "endpoints:write", "endpoints:read", "assign", "schedules", "requests"}),
    NAVIGATOR: frozenset({"endpoints:read", "cases:list", "cases:read", "cases:write", "sources", "pulls", "jobs",
                          "gap-report", "summary", "package:read", "package:build", "assign", "schedules", "syncs",
                          "requests"}),
    CONSULTANT: frozenset({"cases:list", "gap-report", "summary", "package:read"}),
}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the user and the token they used."""

    user_id: int
    name: str
    role: str
    token_id: str | None = None

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, frozenset())


# --- passwords ------------------------------------------------------------------------------


def _hasher() -> Any:
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2id with the library's current recommended parameters


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"a password needs at least {MIN_PASSWORD} characters")
    return str(_hasher().hash(password))


def check_password(db: Any, name: str, password: str) -> Principal | None:
    """The user when ``password`` is theirs (and they are active), else None. For browser sessions."""
    from argon2.exceptions import InvalidHashError, VerificationError

    with db.session() as s:
        user = s.scalar(select(User).where(User.name == name))
        if user is None or not user.active or not user.password_hash:
            _hasher().hash("timing-equaliser")  # no faster answer for an unknown name
            return None
        try:
            _hasher().verify(user.password_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        return Principal(user.id, user.name, user.role)


# --- users ----------------------------------------------------------------------------------


def add_user(db: Any, name: str, role: str, password: str | None) -> dict[str, Any]:
    if not NAME_RE.match(name or ""):
        raise UsageError("invalid user name: use letters, digits, '.', '_', '@' or '-' (up to 100)")
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}")
    pw_hash = hash_password(password) if password is not None else None
    with db.session() as s:
        if s.scalar(select(User).where(User.name == name)) is not None:
            raise AlreadyExists(f"user {name!r} already exists")
        user = User(name=name, role=role, password_hash=pw_hash, active=True)
        s.add(user)
        s.flush()
        return user_to_dict(user)


def user_to_dict(user: User) -> dict[str, Any]:
    return {"id": user.id, "name": user.name, "role": user.role, "active": user.active,
            "password_set": user.password_hash is not None}


def list_users(db: Any) -> list[dict[str, Any]]:
    with db.session() as s:
        return [user_to_dict(u) for u in s.scalars(select(User).order_by(User.name))]


def get_user(db: Any, name: str) -> User:
    with db.session() as s:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFound(f"no user named {name!r}")
        return user


# --- tokens ---------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta | None:
    """``30d``, ``12h``, ``90m``, ``2w``; ``never`` for a token that does not expire."""
    text = (text or "").strip().lower()
    if text == "never":
        return None
    m = _DURATION_RE.match(text)
    if not m or int(m.group(1)) == 0:
        raise UsageError("a duration is a positive number followed by m, h, d or w (e.g. 30d), or 'never'")
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(db: Any, user_name: str, lifetime: timedelta | None = DEFAULT_TOKEN_LIFETIME) -> dict[str, Any]:
    """A new token for the user; the returned ``token`` is the only time the secret is seen."""
    user = get_user(db, user_name)
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    expires = utcnow() + lifetime if lifetime is not None else None
    with db.session() as s:
        s.add(ApiToken(id=token_id, user_id=user.id, secret_hash=_secret_hash(secret), expires_at=expires))
    return {"id": token_id, "user": user.name, "role": user.role, "token": f"{token_id}.{secret}",
            "expires_at": expires.isoformat() if expires else None}


def revoke_token(db: Any, token_id: str) -> dict[str, Any]:
    with db.session() as s:
        tok = s.get(ApiToken, token_id)
        if tok is None:
            raise NotFound(f"no token with id {token_id!r}")
        if tok.revoked_at is None:
            tok.revoked_at = utcnow()
        return {"id": tok.id, "revoked": True}


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)  # SQLite returns naive UTC


def authenticate(db: Any, token: str) -> Principal:
    """The caller behind a bearer token; :class:`AuthenticationRequired` for any bad token.

    Every refusal has the same message: whether a token id exists is not told.
    """
    token_id, _, secret = (token or "").partition(".")
    refused = AuthenticationRequired("a valid API token is required")
    if not token_id or not secret or len(token_id) > 32:
        raise refused
    with db.session() as s:
        row = s.execute(select(ApiToken, User).join(User, User.id == ApiToken.user_id)
                        .where(ApiToken.id == token_id)).first()
    if row is None:
        raise refused
    tok, user = row
    if not hmac.compare_digest(tok.secret_hash, _secret_hash(secret)):
        raise refused
    if tok.revoked_at is not None or not user.active:
        raise refused
    if tok.expires_at is not None and _aware(tok.expires_at) <= datetime.now(UTC):
        raise refused
    return Principal(user.id, user.name, user.role, tok.id)


# --- assignments and case access ------------------------------------------------------------


def assign_case(db: Any, case_id: str, user_name: str) -> dict[str, Any]:
    """Let a user (normally a consultant) see a case; idempotent."""
    user = get_user(db, user_name)
    with db.session() as s:
        if s.get(Case, case_id) is None:
            raise NotFound(f"no case named {case_id!r}")
        if s.get(CaseAssignment, (case_id, user.id)) is None:
            s.add(CaseAssignment(case_id=case_id, user_id=user.id))
    return {"case": case_id, "user": user.name, "role": user.role, "assigned": True}


def require(principal: Principal, permission: str) -> None:
    """Refuse (403) a caller whose role lacks the permission, whatever the resource."""
    if not principal.can(permission):
        raise PermissionDenied(f"the {principal.role} role may not do this")


def case_for(db: Any, principal: Principal, case_id: str, permission: str) -> None:
    """Check that the caller may use ``permission`` on the case.

    The role is checked first (403 for every case alike, so it tells nothing about which cases
    exist); then a consultant's case must be assigned to them, else the answer is the same
    NotFound as for a case that does not exist.
    """
    require(principal, permission)
    missing = NotFound(f"no case named {case_id!r}")
    with db.session() as s:
        if s.get(Case, case_id) is None:
            raise missing
        if principal.role == CONSULTANT and s.get(CaseAssignment, (case_id, principal.user_id)) is None:
            raise missing


def visible_cases(db: Any, principal: Principal) -> set[str] | None:
    """The case ids a caller may list; None means all of them."""
    if principal.role != CONSULTANT:
        return None
    with db.session() as s:
        return set(s.scalars(select(CaseAssignment.case_id).where(CaseAssignment.user_id == principal.user_id)))
