"""The case question (issue 16: the summary starts with "the case question and the checklist
status"): set at `case create --question` or `case set`, stored (migration 0007) on SQLite and
PostgreSQL, and handed to the package as ``CaseInfo.question``."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from aggregator.app import App
from aggregator.cases import case_info, case_summary, create_case, set_case_question
from aggregator.errors import NotFound, UsageError
from aggregator.store.db import MIGRATIONS, Database


def test_question_is_stored_changed_and_cleared(db_url: str, tmp_path: Path) -> None:
    app = App.open(tmp_path / "home", db_url)
    try:
        create_case(app, "q1", "oncology", question="  Is this DCIS or invasive?\r\nSecond line.  ")
        assert case_info(app, "q1").question == "Is this DCIS or invasive?\nSecond line."
        assert case_summary(app, "q1")["question"] == "Is this DCIS or invasive?\nSecond line."
        assert set_case_question(app, "q1", "Staging: T1 or T2?")["question"] == "Staging: T1 or T2?"
        assert case_info(app, "q1").question == "Staging: T1 or T2?"
        assert set_case_question(app, "q1", "   ")["question"] is None
        assert case_info(app, "q1").question is None
        create_case(app, "q2", "oncology")
        assert case_info(app, "q2").question is None
        with pytest.raises(UsageError, match="too long"):
            set_case_question(app, "q2", "x" * 4001)
        with pytest.raises(UsageError, match="control characters"):
            set_case_question(app, "q2", "bell\x07")
        with pytest.raises(NotFound):
            set_case_question(app, "nope", "?")
    finally:
        app.close()


def test_migration_0007_adds_and_removes_the_column(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    db = Database(db_url)
    assert "question" in {c["name"] for c in inspect(db.engine).get_columns("cases")}
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007-1")
    assert "question" not in {c["name"] for c in inspect(db.engine).get_columns("cases")}
    db.dispose()
    db = Database(db_url)  # opening upgrades again
    assert "question" in {c["name"] for c in inspect(db.engine).get_columns("cases")}
    db.dispose()
