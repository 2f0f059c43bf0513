"""The pull runner: cursor committed only with its data, failures recorded, dead pulls reaped."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from aggregator.app import App
from aggregator.errors import TransientConnectorError
from aggregator.jobs import pull as pull_job
from aggregator.jobs.pull import load_cursor, reap_stale_pulls, run_pull
from aggregator.store.models import Case, Pull, Source, utcnow
from connectors.base import CheckResult, Connector, ConnectorConfig, Cursor, PatientRef, Progress, Sink


@dataclass
class ScriptedConfig(ConnectorConfig):
    items: int = 3
    fail_after: int | None = None
    fail_query: bool = False


class ScriptedConnector(Connector):
    """A fake peer: emits ``items`` resources, optionally failing part-way like a dropped connection."""

    kind = "scripted"
    config_type = ScriptedConfig

    def check(self) -> CheckResult:
        return CheckResult(True)

    def pull(self, patient: PatientRef, since: Cursor | None, sink: Sink, progress: Progress) -> Cursor:
        cfg: Any = self.config
        sink.set_method("scripted")
        start = int((since or {}).get("obs", {}).get("next", 0))
        if cfg.fail_query:
            sink.failed("query", "query:Observation", "HTTP 503 (transient)", status=503)
        for i in range(start, start + cfg.items):
            if cfg.fail_after is not None and i - start >= cfg.fail_after:
                raise TransientConnectorError("connection reset by peer", item=f"Observation/o{i}")
            sink.resource({"resourceType": "Observation", "id": f"o{i}", "status": "final"})
            progress.advance()
        return {"obs": {"next": start + cfg.items}}


@pytest.fixture()
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> App:
    a = App.open(tmp_path / "home")
    with a.db.session() as s:
        s.add(Case(id="c", checklist="general"))
        s.add(Source(id=1, case_id="c", kind="scripted", config={}, label="scripted"))
    return a


def _use(monkeypatch: pytest.MonkeyPatch, app: App, **cfg: Any) -> None:
    def config_for(_app: App, sid: int) -> tuple[str, dict[str, Any], Source]:
        with _app.db.session() as s:
            src = s.get(Source, sid)
            assert src is not None
            return "scripted", cfg, src

    monkeypatch.setattr(pull_job, "connector_config", config_for)
    monkeypatch.setattr(pull_job, "create_connector", lambda kind, config: ScriptedConnector.from_dict(config))


def test_successful_pull_commits_cursor_and_counts(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, app, items=3)
    summary = run_pull(app, 1)
    assert summary.state == "done" and summary.counts["done"] == 3 and summary.method == "scripted"
    assert load_cursor(app, 1) == {"obs": {"next": 3}}
    summary = run_pull(app, 1)
    assert load_cursor(app, 1) == {"obs": {"next": 6}}


def test_failed_pull_keeps_items_but_not_the_cursor(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, app, items=5, fail_after=2)
    summary = run_pull(app, 1)
    assert summary.state == "failed"
    assert "connection reset" in (summary.error or "")
    assert load_cursor(app, 1) == {}  # nothing committed: the next pull re-fetches, never skips
    with app.db.session() as s:
        pull = s.scalars(select(Pull)).one()
        assert pull.state == "failed" and pull.finished_at is not None and pull.counts["done"] == 2


def test_stale_running_pull_is_reaped(app: App) -> None:
    with app.db.session() as s:
        s.add(Pull(source_id=1, state="running", heartbeat_at=utcnow() - timedelta(hours=1)))
        s.add(Pull(source_id=1, state="running", heartbeat_at=utcnow()))
    assert reap_stale_pulls(app) == 1
    with app.db.session() as s:
        states = sorted(p.state for p in s.scalars(select(Pull)))
    assert states == ["failed", "running"]


def test_a_query_failure_not_repeated_by_the_next_pull_is_cleared(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    from aggregator.ledger import entries_for_case

    _use(monkeypatch, app, items=1, fail_query=True)
    assert run_pull(app, 1).state == "partial"
    assert [e.key for e in entries_for_case(app.db, "c", state="failed")] == ["query:Observation"]
    _use(monkeypatch, app, items=1, fail_query=False)
    assert run_pull(app, 1).state == "done"
    assert list(entries_for_case(app.db, "c", state="failed")) == []
