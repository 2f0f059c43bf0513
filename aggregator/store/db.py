"""Database engine, migrations and sessions.

SQLite (a file in the home directory) is the default; PostgreSQL works with the same code for
multi-worker deployments. The schema is always brought to the latest Alembic revision when a
database is opened, so a fresh home and an old one behave the same.

SQLAlchemy is imported when a :class:`Database` is made, not with this module: the quick
read path of :mod:`aggregator.store.lite` shares this module's revision and pragmas, and a
command such as ``case list`` must not pay a quarter of a second for an engine it never builds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aggregator.errors import StoreError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

MIGRATIONS = Path(__file__).with_name("migrations")
#: The newest migration. Checked first so that opening an up-to-date database does not import
#: Alembic (about 12 MiB of a pull process's memory); a test keeps it equal to Alembic's head.
HEAD_REVISION = "0007"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets a reader (the API, `case show`) look while a pull writes; foreign keys are off by default.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    # NORMAL is durable against crashes of the process and, with WAL, keeps the database
    # consistent on power loss (a last commit may be lost, and a pull resumes from its ledger);
    # FULL syncs the WAL on every commit, which a pull's frequent ledger batches paid for.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    import orjson
    from sqlalchemy import create_engine, event

    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # orjson reads the JSON columns (ledger meta): several times faster than json.loads on
        # the hundreds of thousands of rows normalization reads
        engine = create_engine(url, connect_args={"timeout": 30}, json_deserializer=orjson.loads)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10},
                         json_deserializer=orjson.loads)


def current_revision(engine: Engine) -> str | None:
    from sqlalchemy import inspect, text

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision."""
    if current_revision(engine) == HEAD_REVISION:
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    """An engine plus a session factory; one per process."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.orm import sessionmaker

        self.url = url
        try:
            self.engine = make_engine(url)
            migrate(self.engine)
        except StoreError:
            raise
        except Exception as exc:  # driver errors carry the URL, which may hold a password
            raise StoreError(f"cannot open the database ({type(exc).__name__})") from exc
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends normally, rolled back otherwise."""
        s = self._factory()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def dispose(self) -> None:
        self.engine.dispose()
