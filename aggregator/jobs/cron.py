"""Cron expressions, read by croniter in the schedule's own time zone.

Why a library: month ends (``L``, a 31st that February lacks), day-of-week/day-of-month
unions and daylight-saving jumps are exactly where a hand-written cron goes wrong. Why a time
zone per schedule: "06:00" means the navigator's morning, which is 11:00 UTC in winter and
10:00 UTC in summer in New York; the expression is evaluated in local time and every instant
we store is UTC.

Daylight saving follows the classic cron (Vixie, cronie): a time skipped by the spring jump
runs just after it, and a time that the autumn fall-back repeats runs once, unless the hour
field is ``*`` (an hourly schedule runs in both of the repeated hours).

Only the five-field form (minute hour day month weekday) and the ``@hourly``-style names are
accepted: croniter also reads a sixth field of seconds, and a sync every second is a mistake.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from aggregator.errors import UsageError

NAMED = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``Europe/Paris``, ``UTC``); a clear error for an unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"unknown time zone {name!r}: give an IANA name such as UTC or America/New_York")


def validate(expr: str) -> str:
    """The expression, normalized (single spaces), or :class:`UsageError` saying what is wrong."""
    text = " ".join((expr or "").split())
    if text.lower() in NAMED:
        return text.lower()
    fields = text.split(" ")
    if len(fields) != 5:
        raise UsageError(f"a schedule is a cron expression of five fields (minute hour day month weekday), "
                         f"e.g. \"0 6 * * *\"; got {len(fields)} field(s)")
    if not croniter.is_valid(text):
        raise UsageError(f"not a valid cron expression: {text!r}")
    return text


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)  # SQLite gives naive UTC back


def _runs_twice(expr: str) -> bool:
    """Does a repeated wall-clock hour run twice? Only when the hour field is a wildcard."""
    if expr.startswith("@"):
        return expr == "@hourly"
    return expr.split(" ")[1] == "*"


def _repeat(expr: str, when: datetime, tz: ZoneInfo) -> bool:
    """``when`` is the second pass of a wall-clock time the fall-back repeats, and runs only once.

    The fold is read from the instant converted anew (croniter's own results may carry a fold
    of 1 on times that are not ambiguous at all).
    """
    return when.astimezone(UTC).astimezone(tz).fold == 1 and not _runs_twice(expr)


def next_after(expr: str, tz: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that ``expr`` names in ``tz``, in UTC."""
    zi = zone(tz)
    it = croniter(expr, _aware(after).astimezone(zi))
    nxt: datetime = it.get_next(datetime)
    while _repeat(expr, nxt, zi):
        nxt = it.get_next(datetime)
    return nxt.astimezone(UTC)


def latest_at_or_before(expr: str, tz: str, now: datetime) -> datetime:
    """The last time at or before ``now`` that ``expr`` names in ``tz``, in UTC.

    Cron times fall on whole minutes, so the last one at or before ``now`` is the last one
    strictly before the start of the next minute.
    """
    zi = zone(tz)
    # the next minute, in UTC then local: a naive "+1 minute" on a local time can land in a gap
    bound = (_aware(now).astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)).astimezone(zi)
    it = croniter(expr, bound)
    prev: datetime = it.get_prev(datetime)
    while _repeat(expr, prev, zi):
        prev = it.get_prev(datetime)
    return prev.astimezone(UTC)
