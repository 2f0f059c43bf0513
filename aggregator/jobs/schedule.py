"""Per-case sync schedules and :func:`run_due`, which syncs the cases whose time has come.

``aggregator sync --due`` (for cron or a systemd timer) and the job worker's periodic task both
call :func:`run_due`; neither keeps state of its own. A schedule stores the next time its cron
names (``next_due_at``, UTC); it is due once the clock has passed it. A runner *claims* a due
schedule with one conditional UPDATE (``WHERE runs = <count read>``) that also moves
``next_due_at`` past now, so of two runners that saw the same due schedule (a worker and a
cron job, two workers) exactly one syncs it, and times missed while nothing ran (a machine that
was off) are run once, not once each.

Closed cases keep their schedule but are not synced; a case whose pull lock is held by someone
else is handed back (its ``next_due_at`` restored) so that the next run tries again rather than
waiting a whole period.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from aggregator.app import App
from aggregator.errors import AggregatorError, NotFound, UsageError
from aggregator.jobs import cron
from aggregator.jobs.sync import BUSY, OPEN, SCHEDULE, sync_case
from aggregator.jobs.webhooks import Target, check_url
from aggregator.store.models import Case, SyncSchedule, utcnow

log = logging.getLogger(__name__)

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")


def _aware(when: datetime | None) -> datetime | None:
    if when is None:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)  # SQLite gives naive UTC back


def _now(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise UsageError("`now` must carry a time zone")
    return now.astimezone(UTC)


def schedule_to_dict(row: SyncSchedule, case_status: str | None = None) -> dict[str, Any]:
    """A schedule as ``schedule show --json`` and the API give it (secret locations, never secrets)."""
    data: dict[str, Any] = {
        "case": row.case_id,
        "cron": row.cron,
        "timezone": row.timezone,
        "next_due_at": _iso(row.next_due_at),
        "last_slot_at": _iso(row.last_slot_at),
        "runs": row.runs,
        "webhook": None if not row.webhook_url else {
            "url": row.webhook_url,
            "secret_env": row.webhook_secret_env,
            "secret_file": row.webhook_secret_file,
        },
    }
    if case_status is not None:
        data["case_status"] = case_status
        data["active"] = case_status == OPEN
    return data


def _iso(when: datetime | None) -> str | None:
    aware = _aware(when)
    return aware.isoformat() if aware else None


def set_schedule(app: App, case_id: str, expr: str, *, timezone: str = "UTC", webhook_url: str | None = None,
                 webhook_secret_env: str | None = None, webhook_secret_file: str | None = None,
                 now: datetime | None = None) -> dict[str, Any]:
    """Create or replace the case's schedule; its first run is the next time the cron names.

    A webhook needs exactly one place for its secret: an environment variable's *name* or a
    file's *path* (the secret itself is never an argument and never stored).
    """
    text = cron.validate(expr)
    cron.zone(timezone)
    current = _now(now)
    if webhook_url is not None:
        check_url(webhook_url)
        if bool(webhook_secret_env) == bool(webhook_secret_file):
            raise UsageError("a webhook needs its secret's place: exactly one of an environment variable "
                             "name or a file path")
        if webhook_secret_env and not ENV_NAME_RE.match(webhook_secret_env):
            raise UsageError("the webhook secret's environment variable name is not a valid name")
    elif webhook_secret_env or webhook_secret_file:
        raise UsageError("a webhook secret was given without a webhook URL")
    with app.db.session() as s:
        case = s.get(Case, case_id)
        if case is None:
            raise NotFound(f"no case named {case_id!r}")
        if case.status != OPEN:
            raise UsageError(f"case {case_id!r} is {case.status}: reopen it (`aggregator case reopen`) to schedule it")
        row = s.get(SyncSchedule, case_id)
        if row is None:
            row = SyncSchedule(case_id=case_id, runs=0)
            s.add(row)
        else:
            row.runs += 1  # a runner that read the old schedule can no longer claim it
        row.cron, row.timezone = text, timezone
        row.next_due_at = cron.next_after(text, timezone, current)
        row.webhook_url = webhook_url
        row.webhook_secret_env = webhook_secret_env or None
        row.webhook_secret_file = webhook_secret_file or None
        row.updated_at = current
        s.flush()
        return schedule_to_dict(row, case.status)


def get_schedule(app: App, case_id: str) -> dict[str, Any]:
    with app.db.session() as s:
        case = s.get(Case, case_id)
        if case is None:
            raise NotFound(f"no case named {case_id!r}")
        row = s.get(SyncSchedule, case_id)
        if row is None:
            raise NotFound(f"case {case_id!r} has no sync schedule")
        return schedule_to_dict(row, case.status)


def clear_schedule(app: App, case_id: str) -> dict[str, Any]:
    with app.db.session() as s:
        if s.get(Case, case_id) is None:
            raise NotFound(f"no case named {case_id!r}")
        row = s.get(SyncSchedule, case_id)
        if row is None:
            raise NotFound(f"case {case_id!r} has no sync schedule")
        s.delete(row)
    return {"case": case_id, "cleared": True}


def list_schedules(app: App) -> list[dict[str, Any]]:
    with app.db.session() as s:
        rows = s.execute(select(SyncSchedule, Case.status).join(Case, Case.id == SyncSchedule.case_id)
                         .order_by(SyncSchedule.case_id))
        return [schedule_to_dict(row, status) for row, status in rows]


def case_webhook(app: App, case_id: str) -> Target | None:
    """The case's own webhook target, when its schedule names one."""
    with app.db.session() as s:
        row = s.get(SyncSchedule, case_id)
        if row is None or not row.webhook_url:
            return None
        return Target("case", row.webhook_url, row.webhook_secret_env, row.webhook_secret_file)


@dataclass(frozen=True)
class Claim:
    """A due schedule this runner now owns: sync the case for the cron time ``slot``."""

    case_id: str
    slot: datetime
    previous_due: datetime
    runs: int
    webhook: Target | None


def claim_due(app: App, *, now: datetime | None = None) -> list[Claim]:
    """Claim every due schedule of an open case; each is claimed by one runner only.

    For a dispatcher that wants one job per case; :func:`run_due` claims and runs in one go.
    """
    current = _now(now)
    # SQLite keeps naive UTC text: compare with a naive UTC bound there (as reap_stale_pulls does)
    bound = current.replace(tzinfo=None) if app.db.engine.dialect.name == "sqlite" else current
    claims = []
    times: dict[tuple[str, str], tuple[datetime, datetime]] = {}  # many cases share one cron
    # one transaction for every claim: a runner that reads the same rows meanwhile waits for it
    # (a row lock on PostgreSQL, the write lock on SQLite) and then finds ``runs`` moved on
    with app.db.session() as s:
        rows = list(s.execute(select(SyncSchedule).join(Case, Case.id == SyncSchedule.case_id)
                              .where(Case.status == OPEN, SyncSchedule.next_due_at <= bound)
                              .order_by(SyncSchedule.case_id)).scalars())
        for row in rows:
            due = _aware(row.next_due_at)
            assert due is not None
            if due > current:
                continue
            key = (row.cron, row.timezone)
            if key not in times:
                times[key] = (cron.latest_at_or_before(row.cron, row.timezone, current),
                              cron.next_after(row.cron, row.timezone, current))
            slot, following = times[key]
            claimed = s.execute(update(SyncSchedule)
                                .where(SyncSchedule.case_id == row.case_id, SyncSchedule.runs == row.runs)
                                .values(runs=row.runs + 1, last_slot_at=slot, next_due_at=following)
                                .execution_options(synchronize_session=False))
            if not getattr(claimed, "rowcount", 0):
                continue  # another runner claimed it (or the schedule changed) since we read it
            hook = (Target("case", row.webhook_url, row.webhook_secret_env, row.webhook_secret_file)
                    if row.webhook_url else None)
            claims.append(Claim(row.case_id, slot, due, row.runs + 1, hook))
    return claims


def release(app: App, claim: Claim) -> bool:
    """Hand a claim back (the case was busy): due again at once, unless the schedule changed since."""
    with app.db.session() as s:
        done = s.execute(update(SyncSchedule)
                         .where(SyncSchedule.case_id == claim.case_id, SyncSchedule.runs == claim.runs)
                         .values(runs=claim.runs + 1, next_due_at=claim.previous_due))
        return bool(getattr(done, "rowcount", 0))


def run_claim(app: App, claim: Claim, *, actor: Any = None) -> dict[str, Any]:
    """Sync a claimed case; a busy case's claim is handed back for the next run."""
    result = sync_case(app, claim.case_id, trigger=SCHEDULE, scheduled_for=claim.slot, actor=actor,
                       webhook=claim.webhook)
    if result.get("state") == BUSY:
        release(app, claim)
        log.info("case %s is being pulled; its scheduled sync is due again", claim.case_id)
    return result


def run_due(app: App, *, now: datetime | None = None, actor: Any = None) -> list[dict[str, Any]]:
    """Sync every open case whose schedule is due at ``now`` (default: the clock), once each.

    Returns one entry per case claimed, as :func:`aggregator.jobs.sync.sync_case` gives it (a
    stored sync with what changed, or a ``busy`` entry for a case someone else is pulling).
    Safe to call from several processes at once: each due case is synced by one of them.
    """
    from aggregator import audit

    who = actor or audit.Actor("scheduler", kind="system")
    results = []
    for claim in claim_due(app, now=now):
        try:
            results.append(run_claim(app, claim, actor=who))
        except Exception as exc:  # one case's failure must not cost the other due cases their run
            # our errors are PHI-free by rule; anything else is named by type only
            message = exc.message if isinstance(exc, AggregatorError) else f"unexpected {type(exc).__name__}"
            log.error("scheduled sync of case %s failed: %s", claim.case_id, message)
            results.append({"case": claim.case_id, "state": "failed", "trigger": SCHEDULE,
                            "scheduled_for": claim.slot.isoformat(), "error": message})
    return results
