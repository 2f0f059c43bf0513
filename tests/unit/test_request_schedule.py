"""Due dates and follow-up reminders of records requests: month ends, leap years, time zones, rules.

Expected dates are written out by hand (counted on a calendar), not computed the way the code does.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from aggregator.errors import ConfigError
from aggregator.records_requests.rules import load_rules
from aggregator.records_requests.schedule import (
    FOLLOW_UP,
    OVERDUE,
    Point,
    due_on,
    local_today,
    pending_point,
    schedule,
    starts_at,
)


def _on(points: list[Point]) -> list[tuple[str, int, str]]:
    return [(p.kind, p.day, p.on.isoformat()) for p in points]


@pytest.mark.parametrize(("sent", "expected", "due"), [
    # 31 January: February has 28 days in 2026
    ("2026-01-31", [("follow-up", 10, "2026-02-10"), ("follow-up", 25, "2026-02-25"), ("overdue", 31, "2026-03-03")],
     "2026-03-02"),
    # ... and 29 in 2028
    ("2028-01-31", [("follow-up", 10, "2028-02-10"), ("follow-up", 25, "2028-02-25"), ("overdue", 31, "2028-03-02")],
     "2028-03-01"),
    # across the year end
    ("2026-12-20", [("follow-up", 10, "2026-12-30"), ("follow-up", 25, "2027-01-14"), ("overdue", 31, "2027-01-20")],
     "2027-01-19"),
    # a 30-day month into a 31-day one
    ("2026-04-30", [("follow-up", 10, "2026-05-10"), ("follow-up", 25, "2026-05-25"), ("overdue", 31, "2026-05-31")],
     "2026-05-30"),
])
def test_schedule_across_month_ends(sent: str, expected: list[tuple[str, int, str]], due: str) -> None:
    day = date.fromisoformat(sent)
    assert _on(schedule(day, 30, [25, 10, 10])) == expected
    assert due_on(day, 30, 30).isoformat() == due


def test_extension_moves_the_due_date_and_keeps_later_reminders() -> None:
    sent = date(2026, 12, 20)
    assert due_on(sent, 30, 30, extended=True) == date(2027, 2, 18)
    assert _on(schedule(sent, 30, [10, 25, 45], extension_days=30, extended=True)) == [
        (FOLLOW_UP, 10, "2026-12-30"), (FOLLOW_UP, 25, "2027-01-14"), (FOLLOW_UP, 45, "2027-02-03"),
        (OVERDUE, 61, "2027-02-19")]
    # without the extension a day-45 point would fall after the due date: the overdue point says it
    assert _on(schedule(sent, 30, [10, 25, 45], extension_days=30)) == [
        (FOLLOW_UP, 10, "2026-12-30"), (FOLLOW_UP, 25, "2027-01-14"), (OVERDUE, 31, "2027-01-20")]


def test_pending_point_one_at_a_time() -> None:
    points = schedule(date(2026, 1, 31), 30, [10, 25])
    assert pending_point(points, date(2026, 2, 9), None) is None
    assert pending_point(points, date(2026, 2, 10), None) == Point(FOLLOW_UP, 10, date(2026, 2, 10))
    # a navigator who is late sees the latest reminder only
    assert pending_point(points, date(2026, 2, 27), None) == Point(FOLLOW_UP, 25, date(2026, 2, 25))
    # a follow-up on the 12th answers day 10, not day 25
    assert pending_point(points, date(2026, 2, 20), date(2026, 2, 12)) is None
    assert pending_point(points, date(2026, 2, 25), date(2026, 2, 12)) == Point(FOLLOW_UP, 25, date(2026, 2, 25))
    # an acknowledgment before the due date does not answer the overdue point
    assert pending_point(points, date(2026, 3, 3), date(2026, 2, 26)) == Point(OVERDUE, 31, date(2026, 3, 3))
    assert pending_point(points, date(2026, 3, 10), date(2026, 3, 4)) is None


@pytest.mark.parametrize(("instant", "zone", "due"), [
    # day 10 of a letter sent 31 Jan is 10 Feb: at 01:00 UTC that day has begun in Tokyo, not in Los Angeles
    ("2026-02-10T01:00:00+00:00", "Asia/Tokyo", True),
    ("2026-02-10T01:00:00+00:00", "America/Los_Angeles", False),
    ("2026-02-10T08:00:00+00:00", "America/Los_Angeles", True),
    ("2026-02-09T14:59:00+00:00", "Asia/Tokyo", False),
    ("2026-02-09T15:00:00+00:00", "Asia/Tokyo", True),
])
def test_reminder_comes_due_on_the_local_day(instant: str, zone: str, due: bool) -> None:
    points = schedule(date(2026, 1, 31), 30, [10, 25])
    today = local_today(datetime.fromisoformat(instant), ZoneInfo(zone))
    assert (pending_point(points, today, None) is not None) is due


def test_month_end_seen_from_both_sides_of_the_date_line() -> None:
    # sent 21 Jan: day 10 is 31 Jan; at 12:00 UTC on 30 Jan it is already 31 Jan in Auckland (UTC+13)
    points = schedule(date(2026, 1, 21), 30, [10])
    noon = datetime(2026, 1, 30, 12, 0, tzinfo=UTC)
    assert local_today(noon, ZoneInfo("Pacific/Auckland")) == date(2026, 1, 31)
    assert pending_point(points, local_today(noon, ZoneInfo("Pacific/Auckland")), None) is not None
    assert pending_point(points, local_today(noon, ZoneInfo("Pacific/Honolulu")), None) is None
    # a day later it is 1 February in Auckland and 31 January in Honolulu: due in both
    later = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    assert local_today(later, ZoneInfo("Pacific/Auckland")) == date(2026, 2, 1)
    assert pending_point(points, local_today(later, ZoneInfo("Pacific/Honolulu")), None) is not None
    with pytest.raises(ValueError, match="aware"):
        local_today(datetime(2026, 1, 31, 12, 0), ZoneInfo("UTC"))


def test_a_day_starts_at_local_midnight_whatever_the_offset() -> None:
    ny = ZoneInfo("America/New_York")  # daylight saving time starts 8 March 2026 at 02:00
    points = schedule(date(2026, 2, 26), 30, [10, 25])
    assert [starts_at(p.on, ny).isoformat() for p in points] == [
        "2026-03-08T00:00:00-05:00", "2026-03-23T00:00:00-04:00", "2026-03-29T00:00:00-04:00"]


def test_rules_default_is_hipaa(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGGREGATOR_REQUEST_RULES", raising=False)
    monkeypatch.delenv("AGGREGATOR_REQUEST_OVERDUE_DAYS", raising=False)
    rule = load_rules(tmp_path).for_institution("Any Hospital")
    assert (rule.jurisdiction, rule.days, rule.extension_days, rule.reminders) == ("US-HIPAA", 30, 30, (10, 25))
    assert rule.citation == "45 CFR 164.524(b)(2)"
    monkeypatch.setenv("AGGREGATOR_REQUEST_OVERDUE_DAYS", "20")
    assert load_rules(tmp_path).for_institution("Any Hospital").days == 20


def test_rules_per_jurisdiction_and_institution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGGREGATOR_REQUEST_RULES", raising=False)
    monkeypatch.delenv("AGGREGATOR_REQUEST_OVERDUE_DAYS", raising=False)
    (tmp_path / "request-rules.yaml").write_text(
        "reminders: [7, 21]\n"
        "timezone: Europe/Paris\n"
        "jurisdictions:\n"
        "  US-XX: {title: State XX access, citation: 'XX Code 1.2', days: 15, extension_days: 0}\n"
        "institutions:\n"
        "  St Mary Hospital: {jurisdiction: US-XX}\n"
        "  Slow Clinic: {reminders: [5, 12, 19], days: 21}\n", encoding="utf-8")
    rules = load_rules(tmp_path)
    assert rules.zone() == ZoneInfo("Europe/Paris")
    mary = rules.for_institution("st mary hospital")
    assert (mary.jurisdiction, mary.days, mary.extension_days, mary.reminders, mary.citation) == (
        "US-XX", 15, 0, (7, 21), "XX Code 1.2")
    slow = rules.for_institution("Slow Clinic")
    assert (slow.jurisdiction, slow.days, slow.extension_days, slow.reminders) == ("US-HIPAA", 21, 30, (5, 12, 19))
    other = rules.for_institution("Other")
    assert (other.days, other.reminders) == (30, (7, 21))
    # the file named by the environment wins over the home's
    named = tmp_path / "elsewhere.yaml"
    named.write_text("default: US-HIPAA\nreminders: [3]\n", encoding="utf-8")
    monkeypatch.setenv("AGGREGATOR_REQUEST_RULES", str(named))
    assert load_rules(tmp_path).for_institution("St Mary Hospital").reminders == (3,)


@pytest.mark.parametrize("text", [
    "reminders: [0]\n", "reminders: ten\n", "colour: red\n", "default: NOWHERE\n",
    "jurisdictions: {X: {days: -1}}\n", "jurisdictions: {X: {title: no days}}\n",
    "institutions: {A: {fax: 1}}\n", "timezone: Mars/Olympus\n", "[unclosed\n",
])
def test_bad_rules_are_refused_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  text: str) -> None:
    monkeypatch.delenv("AGGREGATOR_REQUEST_RULES", raising=False)
    monkeypatch.delenv("AGGREGATOR_TZ", raising=False)
    (tmp_path / "request-rules.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"records request rules|time zone"):
        load_rules(tmp_path).zone()


def test_unknown_jurisdiction_of_an_institution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGGREGATOR_REQUEST_RULES", raising=False)
    (tmp_path / "request-rules.yaml").write_text("institutions: {A: {jurisdiction: US-ZZ}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown jurisdiction 'US-ZZ'"):
        load_rules(tmp_path).for_institution("A")
