"""Shared test fixtures: where the public sample data and recordings are, and a fresh home."""

from __future__ import annotations

import os
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
