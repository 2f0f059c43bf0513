"""Signed webhooks after a sync: ids, counts and links, never patient data.

A receiver learns that a case's sync finished and what moved (how many new items by type, which
checklist items were filled or became gaps, which sources failed) and follows the links, with
its own API token, for anything more. The body therefore carries no name, birth date,
identifier or resource: checklist item ids and source ids only.

Signing: ``X-Aggregator-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`` where the MAC is over
``<t>.`` followed by the exact body bytes. The timestamp is inside the MAC so a captured
delivery cannot be replayed later under a fresh timestamp; :func:`verify_signature` is what a
receiver runs (with a tolerance on the age). ``X-Aggregator-Delivery`` is a unique id per
delivery: a receiver that drops repeats can take our retries safely.

Retries: through :class:`connectors.http.HttpClient` (timeouts, backoff with jitter,
``Retry-After``), on 429/502/503/504 and on connections that failed. Because every attempt
carries the same delivery id, a repeat is recognisable, which is what makes retrying this POST
acceptable. A delivery that still fails is recorded on the sync, never raised: the sync itself
succeeded.

Secrets: from an environment variable or a file, named by the schedule (per case) or by
``AGGREGATOR_WEBHOOK_SECRET`` / ``AGGREGATOR_WEBHOOK_SECRET_FILE`` (global, with
``AGGREGATOR_WEBHOOK_URL``); never from the database or a command line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aggregator.errors import AggregatorError, ConfigError, UsageError

log = logging.getLogger(__name__)

URL_ENV = "AGGREGATOR_WEBHOOK_URL"
SECRET_ENV = "AGGREGATOR_WEBHOOK_SECRET"  # noqa: S105 (a variable name, not a secret)
SECRET_FILE_ENV = "AGGREGATOR_WEBHOOK_SECRET_FILE"  # noqa: S105
PUBLIC_URL_ENV = "AGGREGATOR_PUBLIC_URL"
ATTEMPTS_ENV = "AGGREGATOR_WEBHOOK_ATTEMPTS"
#: over the API, a schedule may only name environment variables with this prefix as its secret:
#: a navigator must not be able to make the server use another secret (a database password) as a key
API_SECRET_PREFIX = "AGGREGATOR_WEBHOOK_SECRET"  # noqa: S105
SIGNATURE_HEADER = "X-Aggregator-Signature"
DELIVERY_HEADER = "X-Aggregator-Delivery"
EVENT_HEADER = "X-Aggregator-Event"
EVENT = "sync.completed"
DEFAULT_TOLERANCE = 300


@dataclass(frozen=True)
class Target:
    """Where to POST, and where its secret is (a variable's name or a file's path)."""

    name: str  # "case" or "global"
    url: str
    secret_env: str | None = None
    secret_file: str | None = None


def check_url(url: str) -> str:
    """An http(s) URL without credentials in it (they would be stored and shown)."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("a webhook URL must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise UsageError("a webhook URL must not carry credentials: the signature authenticates us")
    return url


def global_target() -> Target | None:
    """The operator's webhook for every case, from the environment (None when not set)."""
    url = os.environ.get(URL_ENV, "").strip()
    if not url:
        return None
    return Target("global", check_url(url), secret_env=SECRET_ENV, secret_file=os.environ.get(SECRET_FILE_ENV))


def secret_of(target: Target) -> bytes:
    from connectors.secrets import read_secret

    return read_secret(env=target.secret_env, file=target.secret_file, what=f"{target.name} webhook secret"
                       ).encode("utf-8")


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The signature header's value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: bytes, body: bytes, header: str, *, now: float | None = None,
                     tolerance: int = DEFAULT_TOLERANCE) -> bool:
    """What a receiver checks: the MAC matches and the timestamp is within ``tolerance`` seconds."""
    parts = dict(p.split("=", 1) for p in (header or "").split(",") if "=" in p)
    try:
        ts = int(parts.get("t", ""))
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    expected = sign(secret, body, ts).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _link(path: str) -> str:
    base = os.environ.get(PUBLIC_URL_ENV, "").rstrip("/")
    return base + path


def payload(run: dict[str, Any]) -> dict[str, Any]:
    """The body for one sync: ids, counts and links only (see the module docstring)."""
    case, sync_id = run["case"], run["id"]
    return {
        "event": EVENT,
        "case": case,
        "sync": sync_id,
        "trigger": run["trigger"],
        "state": run["state"],
        "scheduled_for": run.get("scheduled_for"),
        "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"),
        "score": run.get("score"),
        "counts": {
            "new_resources": dict(run.get("new_resources", {})),
            "new_documents": run.get("new_documents", 0),
            "new_instances": run.get("new_instances", 0),
            "updated": run.get("updated", 0),
            "filled": len(run.get("filled", [])),
            "new_gaps": len(run.get("new_gaps", [])),
            "open_gaps": len(run.get("open_gaps", [])),
            "failed_sources": len(run.get("failed_sources", [])),
            "reminders_due": len(run.get("reminders_due", [])),
        },
        # records-request follow-ups now due: request ids and dates (not the institution's name)
        "reminders_due": [{k: r.get(k) for k in ("request", "kind", "on", "due_on")}
                          for r in run.get("reminders_due", [])],
        # checklist item ids ("pathology-report") and source ids: names of slots, not data
        "filled": list(run.get("filled", [])),
        "new_gaps": list(run.get("new_gaps", [])),
        "failed_sources": [f["source"] for f in run.get("failed_sources", [])],
        "links": {
            "sync": _link(f"/cases/{case}/syncs/{sync_id}"),
            "case": _link(f"/cases/{case}"),
            "gap_report": _link(f"/cases/{case}/gap-report"),
        },
    }


def _attempts() -> int:
    try:
        return max(1, int(os.environ.get(ATTEMPTS_ENV, "5")))
    except ValueError:
        return 5


def deliver(target: Target, body: dict[str, Any], *, backoff: float = 1.0, timeout: float = 10.0) -> dict[str, Any]:
    """POST ``body`` to the target, signed, with retries; what happened, never raised.

    The answer names the target (case or global) and never its URL, whose query may hold a
    receiver's token.
    """
    from connectors.http import HttpClient, mask_url

    outcome: dict[str, Any] = {"target": target.name, "delivered": False}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    delivery = str(uuid.uuid4())
    outcome["delivery"] = delivery
    try:
        secret = secret_of(target)
    except ConfigError as exc:
        outcome["error"] = str(exc)
        log.warning("%s webhook not sent: %s", target.name, exc)
        return outcome
    client = HttpClient(target.url, concurrency=1, timeout=timeout, connect_timeout=min(timeout, 10.0),
                        max_attempts=_attempts(), backoff=backoff, max_backoff=60.0,
                        user_agent="second-opinion-aggregator-webhook")
    try:
        resp = client.call("POST", target.url, lambda r: r, headers=_SignedHeaders(secret, raw, delivery), data=raw,
                           send_auth=False, retry=True)
        outcome.update(delivered=True, status=resp.status_code)
        resp.close()
    except AggregatorError as exc:
        outcome["status"] = getattr(exc, "status", None)
        outcome["error"] = exc.message
        log.warning("%s webhook to %s failed: %s", target.name, mask_url(target.url), exc.message)
    finally:
        outcome["attempts"] = client.requests_sent
        client.close()
    return outcome


class _SignedHeaders(Mapping[str, str]):
    """The request's headers, signed anew each time the client copies them (once per attempt).

    A retry after a long ``Retry-After`` then still carries a timestamp a receiver accepts.
    """

    def __init__(self, secret: bytes, body: bytes, delivery: str) -> None:
        self._secret, self._body, self._delivery = secret, body, delivery
        self._now: dict[str, str] = {}

    def __iter__(self) -> Iterator[str]:
        self._now = {"Content-Type": "application/json", EVENT_HEADER: EVENT, DELIVERY_HEADER: self._delivery,
                     SIGNATURE_HEADER: sign(self._secret, self._body, int(time.time()))}
        return iter(self._now)

    def __getitem__(self, key: str) -> str:
        if not self._now:
            iter(self)
        return self._now[key]

    def __len__(self) -> int:
        return 4
