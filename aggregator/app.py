"""The application context: settings plus an open database, shared by the CLI, jobs and API."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aggregator.blobs import BlobStore
from aggregator.config import Settings, load_settings
from aggregator.privacy import exposure_warning, make_private, make_private_dir, restrict_umask
from aggregator.store.db import Database


@dataclass
class App:
    settings: Settings
    db: Database
    #: things the operator should know (a home open to other users), printed by the CLI
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, home: str | Path | None = None, database_url: str | None = None) -> App:
        """Open the home and its database; everything created from here on is owner-only.

        The umask is set here, not in each writer, because every face (CLI, API, workers)
        opens the home through this call and libraries create files we never name (SQLite's
        WAL, temporary files, zip writers).
        """
        restrict_umask()
        settings = load_settings(home, database_url)
        make_private_dir(settings.home)
        db = Database(settings.database_url)
        for suffix in ("", "-wal", "-shm", "-journal"):
            p = settings.home / f"aggregator.db{suffix}"
            if p.exists():
                make_private(p)
        warning = exposure_warning(settings.home)
        return cls(settings, db, [warning] if warning else [])

    def case_dir(self, case_id: str) -> Path:
        return self.settings.case_dir(case_id)

    def blobs(self, case_id: str) -> BlobStore:
        """Each case keeps its own raw store, so nothing of one case is written outside its folder."""
        return BlobStore(self.case_dir(case_id) / "raw")

    def close(self) -> None:
        self.db.dispose()
