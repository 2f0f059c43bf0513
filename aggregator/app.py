"""The application context: settings plus an open database, shared by the CLI, jobs and API."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator.config import Settings, load_settings
from aggregator.privacy import exposure_warning, make_private, make_private_dir, restrict_umask

if TYPE_CHECKING:
    from aggregator.blobs import BlobStore
    from aggregator.store.db import Database
    from aggregator.store.lite import LiteDatabase


def _enter_home(home: str | Path | None, database_url: str | None) -> Settings:
    """Owner-only from here on: the umask, then the home folder itself.

    The umask is set here, not in each writer, because every face (CLI, API, workers) opens
    the home through this call and libraries create files we never name (SQLite's WAL,
    temporary files, zip writers).
    """
    restrict_umask()
    settings = load_settings(home, database_url)
    make_private_dir(settings.home)
    if settings.blob_root is not None:
        make_private_dir(settings.blob_root)
    return settings


def _secure_database_files(settings: Settings) -> list[str]:
    """Tighten the SQLite files (made before the umask, or by hand); the home's exposure warning."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = settings.home / f"aggregator.db{suffix}"
        if p.exists():
            make_private(p)
    warning = exposure_warning(settings.home)
    return [warning] if warning else []


@dataclass
class App:
    settings: Settings
    db: Database
    #: things the operator should know (a home open to other users), printed by the CLI
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, home: str | Path | None = None, database_url: str | None = None) -> App:
        """Open the home and its database; everything created from here on is owner-only."""
        from aggregator.store.db import Database

        settings = _enter_home(home, database_url)
        db = Database(settings.database_url)
        return cls(settings, db, _secure_database_files(settings))

    def case_dir(self, case_id: str) -> Path:
        return self.settings.case_dir(case_id)

    def blobs(self, case_id: str) -> BlobStore:
        """Each case keeps its own raw store, so nothing of one case is written outside its folder."""
        from aggregator.blobs import BlobStore

        return BlobStore(self.case_dir(case_id) / "raw")

    def close(self) -> None:
        self.db.dispose()


@dataclass
class LiteApp:
    """The home opened for the quick path (:mod:`aggregator.store.lite`): no SQLAlchemy.

    Opening it does to the home what :meth:`App.open` does (umask, owner-only folder and
    database files, the exposure warning); only the database connection differs.
    """

    settings: Settings
    db: LiteDatabase
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, home: str | Path | None = None, database_url: str | None = None) -> LiteApp | None:
        """The quick context, or None when this home needs the full :class:`App` (see ``store.lite``)."""
        from aggregator.store.lite import LiteDatabase

        settings = load_settings(home, database_url)
        if not settings.home.is_dir():
            return None  # a new home: App.open creates it, with its database
        settings = _enter_home(home, database_url)
        db = LiteDatabase.open(settings.database_url)
        if db is None:
            return None
        return cls(settings, db, _secure_database_files(settings))

    def close(self) -> None:
        self.db.dispose()
