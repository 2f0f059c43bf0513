"""Cron times: month ends, time zones and daylight saving, checked against a minute-by-minute oracle.

The oracle reads the five fields itself (numbers, lists, ranges, steps, ``*``) and walks every
minute of a window in the schedule's zone; :func:`aggregator.jobs.cron.next_after` must name
exactly the same instants. Windows without a clock change compare all of them; the clock-change
days are checked against what classic cron does on them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from aggregator.errors import UsageError
from aggregator.jobs import cron


def _field(spec: str, lo: int, hi: int) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        rng, _, step = part.partition("/")
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a, b = (int(x) for x in rng.split("-"))
        else:
            a = b = int(rng)
        out.update(range(a, b + 1, int(step or 1)))
    return out


def _oracle(expr: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    """Every minute in (start, end] whose local wall clock the expression names (POSIX day rule:
    when both day fields are restricted, either one matching is enough)."""
    minute, hour, dom, month, dow = expr.split()
    mins, hours, months = _field(minute, 0, 59), _field(hour, 0, 23), _field(month, 1, 12)
    doms, dows = _field(dom, 1, 31), {d % 7 for d in _field(dow, 0, 7)}
    zone = ZoneInfo(tz)
    out = []
    t = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while t <= end:
        local = t.astimezone(zone)
        day_ok = (local.day in doms or (local.isoweekday() % 7) in dows) if dom != "*" and dow != "*" else (
            local.day in doms and (local.isoweekday() % 7) in dows)
        if local.minute in mins and local.hour in hours and local.month in months and day_ok:
            out.append(t)
        t += timedelta(minutes=1)
    return out


def _fires(expr: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    out, t = [], start
    while True:
        t = cron.next_after(expr, tz, t)
        if t > end:
            return out
        out.append(t)


# windows with no clock change in their zone (New York keeps EST until March 8, 2026)
CASES = [
    ("0 6 31 * *", "America/New_York", "2026-01-01", "2026-03-05"),  # no 31st in February: skipped
    ("30 23 28-31 * *", "America/New_York", "2026-01-25", "2026-03-05"),  # every month-end day, late evening
    ("0 0 1 * *", "Asia/Kolkata", "2025-12-15", "2026-03-15"),  # +05:30: midnight is 18:30 UTC the day before
    ("15 */6 * * 1-5", "Asia/Kolkata", "2026-01-28", "2026-02-04"),  # weekdays only, across January's end
    ("0 6 29 2 *", "UTC", "2027-01-01", "2028-03-02"),  # 29 February: not in 2027, then in the leap year 2028
    ("0 12 13 * 5", "Europe/Paris", "2026-01-01", "2026-03-01"),  # the 13th OR any Friday (both fields set)
    ("45 5 * * *", "Australia/Sydney", "2026-01-30", "2026-02-02"),  # +11:00: local morning is UTC's evening
]


@pytest.mark.parametrize("expr,tz,start,end", CASES)
def test_fire_times_match_the_oracle(expr: str, tz: str, start: str, end: str) -> None:
    a = datetime.fromisoformat(start).replace(tzinfo=UTC)
    b = datetime.fromisoformat(end).replace(tzinfo=UTC)
    want = _oracle(expr, tz, a, b)
    assert want, "the window must hold at least one fire time"
    assert _fires(expr, tz, a, b) == want


@pytest.mark.parametrize("expr,tz,start,end", CASES)
def test_latest_at_or_before_is_the_last_oracle_time(expr: str, tz: str, start: str, end: str) -> None:
    a = datetime.fromisoformat(start).replace(tzinfo=UTC)
    b = datetime.fromisoformat(end).replace(tzinfo=UTC)
    times = _oracle(expr, tz, a, b)
    for t in times[1:]:
        assert cron.latest_at_or_before(expr, tz, t) == t  # at a fire time: that time
        assert cron.latest_at_or_before(expr, tz, t + timedelta(seconds=59)) == t
        before = cron.latest_at_or_before(expr, tz, t - timedelta(seconds=1))
        assert before == times[times.index(t) - 1]


def test_month_end_L_names_the_last_day_of_each_month() -> None:
    start = datetime(2026, 1, 15, tzinfo=UTC)
    fires = _fires("0 6 L * *", "UTC", start, datetime(2026, 5, 1, tzinfo=UTC))
    # the day after each fire is the 1st of a month
    assert [(f + timedelta(days=1)).day for f in fires] == [1, 1, 1, 1]
    assert [f.month for f in fires] == [1, 2, 3, 4]


def test_local_morning_moves_in_utc_with_daylight_saving() -> None:
    ny = "America/New_York"
    winter = cron.next_after("0 6 * * *", ny, datetime(2026, 1, 10, tzinfo=UTC))
    summer = cron.next_after("0 6 * * *", ny, datetime(2026, 7, 10, tzinfo=UTC))
    assert (winter.hour, summer.hour) == (11, 10)  # EST is UTC-5, EDT UTC-4
    for t in (winter, summer):
        assert t.astimezone(ZoneInfo(ny)).hour == 6


def test_spring_gap_runs_once_just_after_the_jump() -> None:
    # Paris, 29 March 2026: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day
    fires = _fires("30 2 * * *", "Europe/Paris", datetime(2026, 3, 27, 12, tzinfo=UTC),
                   datetime(2026, 3, 30, 12, tzinfo=UTC))
    assert len(fires) == 3
    assert fires[1] == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST, the first minute after the gap


def test_autumn_repeat_runs_a_fixed_time_once_and_an_hourly_one_twice() -> None:
    # Paris, 25 October 2026: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice
    start, end = datetime(2026, 10, 24, 12, tzinfo=UTC), datetime(2026, 10, 25, 12, tzinfo=UTC)
    assert _fires("30 2 * * *", "Europe/Paris", start, end) == [datetime(2026, 10, 25, 0, 30, tzinfo=UTC)]
    hourly = [t for t in _fires("30 * * * *", "Europe/Paris", start, end)
              if t.astimezone(ZoneInfo("Europe/Paris")).hour == 2]
    assert hourly == [datetime(2026, 10, 25, 0, 30, tzinfo=UTC), datetime(2026, 10, 25, 1, 30, tzinfo=UTC)]


@pytest.mark.parametrize("expr", ["0 6 * *", "0 6 * * * *", "61 6 * * *", "0 6 * * mon-xyz", "", "every day"])
def test_bad_expressions_are_refused(expr: str) -> None:
    with pytest.raises(UsageError):
        cron.validate(expr)


def test_named_and_spaced_expressions_are_accepted() -> None:
    assert cron.validate("@Daily") == "@daily"
    assert cron.validate("  0   6 * *  1-5 ") == "0 6 * * 1-5"


def test_unknown_zone_is_refused() -> None:
    with pytest.raises(UsageError):
        cron.zone("Mars/Olympus_Mons")
