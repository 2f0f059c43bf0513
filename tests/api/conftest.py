"""An API on a fresh home (SQLite, or PostgreSQL through ``db_url``), with one user per role."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from aggregator import accounts
from aggregator.api import create_app
from aggregator.api.app import ApiConfig
from aggregator.app import App

ROLES = ("admin", "navigator", "consultant", "outsider")


@dataclass
class Api:
    core: App
    client: TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def h(self, who: str) -> dict[str, str]:
        """Headers for an identity: a role's user, anonymous, or a revoked or expired token."""
        return {} if who == "anonymous" else {"Authorization": f"Bearer {self.tokens[who]}"}

    def wait(self, job_id: str, who: str = "navigator", timeout: float = 120.0) -> dict[str, Any]:
        self.client.app.state.runner.wait(job_id, timeout)  # type: ignore[attr-defined]
        r = self.client.get(f"/jobs/{job_id}", headers=self.h(who))
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def make_api(home: Path, db_url: str | None, config: ApiConfig | None = None) -> Api:
    core = App.open(home, database_url=db_url)
    users = {"admin": "admin", "navigator": "navigator", "consultant": "consultant", "outsider": "consultant"}
    # jobs run in this process on both databases here (the queue and its workers: tests/jobs)
    config = config or ApiConfig(rate_per_second=1000, burst=1000)
    config.job_engine = config.job_engine or "inprocess"
    api = Api(core, TestClient(create_app(core, config),
                               client=("127.0.0.9", 50000)))
    for name, role in users.items():
        accounts.add_user(core.db, name, role, None)
        api.tokens[name] = accounts.create_token(core.db, name)["token"]
    revoked = accounts.create_token(core.db, "navigator")
    accounts.revoke_token(core.db, revoked["id"])
    api.tokens["revoked"] = revoked["token"]
    api.tokens["expired"] = accounts.create_token(core.db, "navigator", timedelta(seconds=-5))["token"]
    return api


@pytest.fixture()
def api(tmp_path: Path, db_url: str) -> Iterator[Api]:
    a = make_api(tmp_path / "home", db_url)
    with a.client:
        yield a
    a.core.close()


@pytest.fixture(scope="session")
def media_zip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from fixtures.generate import generate_zip

    out = tmp_path_factory.mktemp("media") / "download.zip"
    return out, generate_zip(out)
