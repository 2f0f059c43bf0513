"""The application context: settings plus an open database, shared by the CLI, jobs and API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aggregator.blobs import BlobStore
from aggregator.config import Settings, load_settings
from aggregator.store.db import Database


@dataclass
class App:
    settings: Settings
    db: Database

    @classmethod
    def open(cls, home: str | Path | None = None, database_url: str | None = None) -> App:
        settings = load_settings(home, database_url)
        settings.home.mkdir(parents=True, exist_ok=True)
        return cls(settings, Database(settings.database_url))

    def case_dir(self, case_id: str) -> Path:
        return self.settings.case_dir(case_id)

    def blobs(self, case_id: str) -> BlobStore:
        """Each case keeps its own raw store, so nothing of one case is written outside its folder."""
        return BlobStore(self.case_dir(case_id) / "raw")

    def close(self) -> None:
        self.db.dispose()
