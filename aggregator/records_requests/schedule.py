"""When a sent request is due, and when a navigator should follow up: pure date arithmetic.

Days are calendar days counted from the day the letter was sent (``date`` + ``timedelta``), so a
letter sent on 31 January has its day-10 reminder on 10 February and, under a 30-day rule, is due
on 2 March (1 March in a leap year): month ends need no special case and no month is "30 days".

A reminder is due on a calendar day in the navigators' time zone: at 01:00 UTC on 10 February it
is already the 10th in Tokyo and still the 9th in Los Angeles. :func:`local_today` takes an aware
instant and the zone; :func:`starts_at` gives the instant a day begins in that zone (midnight,
whatever the daylight-saving offset of that day), for callers that schedule by instants.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo

FOLLOW_UP = "follow-up"
OVERDUE = "overdue"


@dataclass(frozen=True)
class Point:
    """One moment of a request's schedule: a follow-up on day N, or the first day it is overdue."""

    kind: str
    day: int
    """Days after the day the letter was sent."""
    on: date


def due_on(sent_on: date, days: int, extension_days: int = 0, extended: bool = False) -> date:
    """The last day the institution has: ``days`` after sending, plus the extension once it was taken."""
    return sent_on + timedelta(days=days + (extension_days if extended else 0))


def schedule(sent_on: date, days: int, reminders: Iterable[int], *, extension_days: int = 0,
             extended: bool = False) -> list[Point]:
    """Follow-ups before the due date, then the day after it (overdue), in order."""
    last = days + (extension_days if extended else 0)
    points = [Point(FOLLOW_UP, d, sent_on + timedelta(days=d)) for d in sorted(set(reminders)) if 0 < d <= last]
    points.append(Point(OVERDUE, last + 1, sent_on + timedelta(days=last + 1)))
    return points


def pending_point(points: Iterable[Point], today: date, last_contact: date | None) -> Point | None:
    """The latest point that has come and that no contact with the institution answered yet.

    One follow-up answers every point before it, so a navigator who is late sees one reminder,
    not a backlog; an acknowledgment counts as contact (the institution spoke), but an overdue
    point comes only after the due date and so only a later follow-up answers it.
    """
    come = [p for p in points if p.on <= today and (last_contact is None or last_contact < p.on)]
    return come[-1] if come else None


def local_today(now: datetime, zone: tzinfo) -> date:
    """The calendar day ``now`` (an aware instant) falls on in ``zone``."""
    if now.tzinfo is None:
        raise ValueError("local_today needs an aware datetime")
    return now.astimezone(zone).date()


def starts_at(day: date, zone: tzinfo) -> datetime:
    """The instant ``day`` begins in ``zone`` (local midnight, with that day's offset)."""
    return datetime.combine(day, time(0, 0), tzinfo=zone)
