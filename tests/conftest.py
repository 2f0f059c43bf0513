"""Shared test fixtures: where the public sample data and recordings are, and a fresh home."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AGGREGATOR_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it are skipped, with the reason, when it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"public sample data not present at {path}")
    return path


@pytest.fixture(scope="session")
def recordings() -> Path:
    """``../shared/recordings`` (real HTTP exchanges for replay with ``responses``)."""
    path = SHARED / "recordings"
    if not path.is_dir():
        pytest.skip(f"HTTP recordings not present at {path}")
    return path


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty aggregator home directory for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("AGGREGATOR_HOME", str(h))
    monkeypatch.delenv("AGGREGATOR_DATABASE_URL", raising=False)
    return h


PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _pg_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database on SQLite, and on the PostgreSQL at 127.0.0.1:5432 when it is up.

    The PostgreSQL database is created for the test and dropped afterwards.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    if not _pg_up():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    from sqlalchemy import create_engine, text

    name = "agg_test_" + uuid.uuid4().hex[:10]
    try:
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # e.g. no such role on this machine
        pytest.skip(f"cannot create a PostgreSQL test database: {type(exc).__name__}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
