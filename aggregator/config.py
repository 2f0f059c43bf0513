"""Settings: where the home directory is, which database to use, where the case folders are.

The home directory holds the SQLite database (by default) and one folder per case. With
``AGGREGATOR_BLOB_ROOT`` the case folders (raw blobs, packages, reports) live there instead:
shared storage that workers on several machines mount, while each keeps its own home. Secrets are
never stored here: endpoint definitions keep only the *name* of an environment variable or the
path of a file that holds the secret (see :mod:`connectors.secrets`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "AGGREGATOR_HOME"
DATABASE_ENV = "AGGREGATOR_DATABASE_URL"
BLOB_ROOT_ENV = "AGGREGATOR_BLOB_ROOT"


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    blob_root: Path | None = None
    """Where the case folders are when not in the home (``AGGREGATOR_BLOB_ROOT``)."""

    @property
    def cases_dir(self) -> Path:
        return self.blob_root if self.blob_root is not None else self.home / "cases"

    def case_dir(self, case_id: str) -> Path:
        return self.cases_dir / case_id


def default_home() -> Path:
    return Path.home() / ".aggregator"


def load_settings(home: str | os.PathLike[str] | None = None, database_url: str | None = None) -> Settings:
    """Resolve settings from arguments, then the environment, then defaults."""
    home_path = Path(home or os.environ.get(HOME_ENV) or default_home()).expanduser().resolve()
    url = database_url or os.environ.get(DATABASE_ENV) or f"sqlite:///{home_path / 'aggregator.db'}"
    root = os.environ.get(BLOB_ROOT_ENV)
    blob_root = Path(root).expanduser().resolve() if root else None
    return Settings(home=home_path, database_url=url, blob_root=blob_root)
