"""Follow-up reminders from the database: ``due_reminders`` (the sync job's call) and ``request list --due``.

Requests are stored rows (SQLite, and PostgreSQL when it is up); the clock is given as an aware
instant so that "today" is the navigators' day in their zone.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from aggregator.app import App
from aggregator.cases import create_case
from aggregator.cli import main
from aggregator.errors import UsageError
from aggregator.records_requests import (
    close,
    due_reminders,
    get_request,
    list_requests,
    mark_acknowledged,
    mark_followed_up,
    mark_sent,
)
from aggregator.store.models import Case, RecordsRequest, RecordsRequestItem


def _request(app: App, case_id: str, rid: str, institution: str, *, lines: int = 2, due_days: int | None = 30,
             reminders: str | None = "10,25") -> None:
    with app.db.session() as s:
        row = RecordsRequest(id=rid, case_id=case_id, institution=institution, state="draft",
                             jurisdiction="US-HIPAA" if due_days is not None else None, due_days=due_days,
                             extension_days=30 if due_days is not None else None, reminder_days=reminders)
        row.items = [RecordsRequestItem(gap_keys=f"item{i}|||", item_id=f"item{i}", reason="not-found",
                                        text=f"line {i}", status="requested") for i in range(lines)]
        s.add(row)


@pytest.fixture()
def app(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> App:
    for var in ("AGGREGATOR_REQUEST_RULES", "AGGREGATOR_REQUEST_OVERDUE_DAYS", "AGGREGATOR_TZ"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "request-rules.yaml").write_text("timezone: America/Los_Angeles\n", encoding="utf-8")
    a = App.open(tmp_path / "home", database_url=db_url)
    for case in ("c1", "c2"):
        create_case(a, case, "oncology")
    return a


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_due_reminders_through_a_request_life(app: App) -> None:
    _request(app, "c1", "rq-a", "St Mary")
    _request(app, "c2", "rq-b", "City Imaging", lines=1)
    assert due_reminders(app, now=_at("2026-03-01T12:00:00+00:00")) == []  # drafts have no schedule
    mark_sent(app, "rq-a", date(2026, 1, 31), "fax")
    mark_sent(app, "rq-b", date(2026, 2, 5), "mail")

    # 10 Feb 07:00 UTC is still 9 Feb in Los Angeles: nothing yet
    assert due_reminders(app, now=_at("2026-02-10T07:00:00+00:00")) == []
    (d,) = due_reminders(app, now=_at("2026-02-10T09:00:00+00:00"))
    assert (d["case"], d["request"], d["institution"], d["kind"], d["day"], d["on"]) == (
        "c1", "rq-a", "St Mary", "follow-up", 10, "2026-02-10")
    assert d["due_at"] == "2026-02-10T00:00:00-08:00" and d["due_on"] == "2026-03-02"
    assert (d["outstanding"], d["items"], d["sent_on"]) == (2, 2, "2026-01-31")

    # 15 Feb: both cases have a day-10 reminder; one case only when asked for it
    both = due_reminders(app, now=_at("2026-02-15T20:00:00+00:00"))
    assert [(x["request"], x["on"]) for x in both] == [("rq-a", "2026-02-10"), ("rq-b", "2026-02-15")]
    assert [x["request"] for x in due_reminders(app, case_id="c2", now=_at("2026-02-15T20:00:00+00:00"))] == ["rq-b"]

    # a follow-up answers it until the next point
    mark_followed_up(app, "rq-a", date(2026, 2, 11))
    assert [x["request"] for x in due_reminders(app, now=_at("2026-02-20T20:00:00+00:00"))] == ["rq-b"]
    assert due_reminders(app, case_id="c1", now=_at("2026-02-25T20:00:00+00:00"))[0]["day"] == 25
    # the institution acknowledges on the 26th and takes its extension: due 1 April, no overdue on 3 March
    r = mark_acknowledged(app, "rq-a", date(2026, 2, 26), extended=True)
    assert (r["state"], r["due_on"], r["extended_on"]) == ("acknowledged", "2026-04-01", "2026-02-26")
    assert due_reminders(app, case_id="c1", now=_at("2026-03-05T20:00:00+00:00")) == []
    (late,) = due_reminders(app, case_id="c1", now=_at("2026-04-02T20:00:00+00:00"))
    assert (late["kind"], late["day"], late["on"]) == ("overdue", 61, "2026-04-02")
    (row,) = list_requests(app, "c1", now=_at("2026-04-02T20:00:00+00:00"))
    assert row["overdue"] and row["status"] == "overdue" and row["state"] == "acknowledged"
    assert [x["answered"] for x in row["reminders"]] == [True, True, False]
    assert list_requests(app, "c1", now=_at("2026-04-02T20:00:00+00:00"), due_only=True) == [row]
    assert list_requests(app, "c1", now=_at("2026-03-05T20:00:00+00:00"), due_only=True) == []

    # a closed request and a closed case are no longer followed up
    close(app, "rq-b")
    with app.db.session() as s:
        case = s.get(Case, "c1")
        assert case is not None
        case.status = "closed"
    assert due_reminders(app, now=_at("2026-04-02T20:00:00+00:00")) == []


def test_a_request_filled_by_hand_or_never_sent_needs_no_follow_up(app: App) -> None:
    _request(app, "c1", "rq-a", "St Mary", lines=1)
    with pytest.raises(UsageError, match="is draft"):
        mark_acknowledged(app, "rq-a", date(2026, 2, 1))
    mark_sent(app, "rq-a", date(2026, 1, 31), "fax")
    with pytest.raises(UsageError, match="before that"):
        mark_followed_up(app, "rq-a", date(2026, 1, 30))
    from aggregator.records_requests import mark_received

    r = mark_received(app, "rq-a")
    assert r["state"] == "received" and r["items"][0]["received_how"] == "navigator"
    assert due_reminders(app, now=_at("2026-03-10T20:00:00+00:00")) == []
    with pytest.raises(UsageError, match="is received"):
        mark_sent(app, "rq-a", date(2026, 2, 1), "fax")


def test_a_request_from_before_the_rules_follows_the_rule_in_force(app: App) -> None:
    _request(app, "c1", "rq-old", "St Mary", due_days=None, reminders=None)
    mark_sent(app, "rq-old", date(2026, 1, 31), "mail")
    r = get_request(app, "rq-old", today=date(2026, 2, 10))
    assert r["due_on"] == "2026-03-02" and r["reminder_due"]["day"] == 10
    assert r["rule"] == {"jurisdiction": "US-HIPAA", "days": 30, "extension_days": 30, "reminders": [10, 25]}


def test_cli_request_list_due_across_cases(app: App, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", db_url)
    home = str(tmp_path / "home")
    _request(app, "c1", "rq-a", "St Mary")
    _request(app, "c2", "rq-b", "City Imaging")
    from zoneinfo import ZoneInfo

    today = datetime.now(UTC).astimezone(ZoneInfo("America/Los_Angeles")).date()
    assert main(["--home", home, "request", "sent", "rq-a", "--on", (today - timedelta(days=12)).isoformat()]) == 0
    assert main(["--home", home, "request", "sent", "rq-b", "--on", (today - timedelta(days=3)).isoformat()]) == 0
    capsys.readouterr()
    assert main(["--home", home, "request", "list", "--due", "--json"]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert (d["request"], d["kind"], d["day"]) == ("rq-a", "follow-up", 10)
    assert main(["--home", home, "request", "list", "--due"]) == 0
    assert "rq-a  St Mary: day-10 reminder" in capsys.readouterr().out
    assert main(["--home", home, "request", "list", "c2", "--due"]) == 0
    assert capsys.readouterr().out.strip() == "no follow-up due"
    assert main(["--home", home, "request", "list", "c1"]) == 0
    assert "follow-up due: day-10 reminder" in capsys.readouterr().out
    assert main(["--home", home, "request", "followed-up", "rq-a"]) == 0
    capsys.readouterr()
    assert main(["--home", home, "request", "acknowledged", "rq-b", "--extended", "--json"]) == 0
    ack = json.loads(capsys.readouterr().out)
    assert ack["state"] == "acknowledged" and ack["due_on"] == (today + timedelta(days=57)).isoformat()
    assert main(["--home", home, "request", "list", "--due", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["--home", home, "request", "list"]) == 2  # neither CASE nor --due
