"""Job engine fixtures: media folders big enough to stop a pull half way, worker processes, a PostgreSQL database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.jobs import records
from aggregator.store.models import LedgerItem, Pull, Source
from tests.conftest import PG_ADMIN, _pg_up
from tests.integration.orthanc import CLIENT_AET, Orthanc, orthanc_server, rehome

__all__ = ["orthanc_server"]

ROOT = Path(__file__).resolve().parents[2]
MAIN = "import sys; from aggregator.cli import main; sys.exit(main(sys.argv[1:]))"


def media_folder(path: Path, n: int) -> Path:
    """``n`` one-resource FHIR files: a media pull of about 1000 items per second here, one ledger row each."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (path / f"obs-{i:05d}.json").write_text(json.dumps({
            "resourceType": "Observation", "id": f"o{i}", "status": "final", "code": {"text": "weight"},
            "subject": {"reference": "Patient/p1"}, "valueQuantity": {"value": i, "unit": "kg"}}))
    return path


def media_case(app: App, case_id: str, folder: Path) -> None:
    create_case(app, case_id, "oncology", case_date="2024-05-01")
    add_source(app, case_id, media=str(folder))


JOBS_PATIENT = "AGG-JOBS"


@dataclass
class BigStudy:
    """One study of many small instances on the session's Orthanc (patient ``AGG-JOBS``)."""

    server: Orthanc
    study_uid: str
    sizes: dict[str, int]
    """SOP Instance UID -> size of the archive's file."""


@pytest.fixture(scope="session")
def big_study(orthanc_server: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> BigStudy:
    """150 copies of pydicom's CT_small (39 KiB) in one study: about 6 MiB, a C-GET of seconds when throttled."""
    from pydicom.data import get_testdata_file

    src = Path(str(get_testdata_file("CT_small.dcm")))
    out = tmp_path_factory.mktemp("jobs-study")
    study = "2.25.4711000000000000000000000000000000001"
    paths = [p for i in range(150) if (p := rehome(src, out / f"ct{i:03d}.dcm", patient_id=JOBS_PATIENT, issuer=None,
                                                   salt=f"jobs-{i}", study_uid=study))]
    ids = orthanc_server.upload(paths)
    sizes = {orthanc_server.sop_uid(i): len(orthanc_server.file(i)) for i in ids}
    return BigStudy(orthanc_server, study, sizes)


def dimse_case(app: App, case_id: str, host: str, port: int, aet: str, *, endpoint: str = "pacs") -> int:
    """A case with one DIMSE (C-GET) source for the jobs patient; the endpoint is made once per home."""
    from aggregator.cases import add_endpoint
    from aggregator.errors import AlreadyExists

    try:
        add_endpoint(app, endpoint, "dimse", {"host": host, "port": port, "called_ae": aet,
                                              "calling_ae": CLIENT_AET})
    except AlreadyExists:
        pass
    try:
        create_case(app, case_id, "oncology", case_date="2024-05-01")
    except AlreadyExists:
        pass
    return int(add_source(app, case_id, endpoint=endpoint, patient_id=JOBS_PATIENT)["id"])


def ledger_of(app: App, case_id: str) -> list[tuple[str, str, str, int, Any, str | None, Any]]:
    """(kind, key, state, attempts, updated_at, worker, sha256) of every ledger row of the case."""
    with app.db.session() as s:
        q = (select(LedgerItem.kind, LedgerItem.key, LedgerItem.state, LedgerItem.attempts, LedgerItem.updated_at,
                    Pull.worker, LedgerItem.sha256)
             .join(Source, Source.id == LedgerItem.source_id).join(Pull, Pull.id == LedgerItem.pull_id, isouter=True)
             .where(Source.case_id == case_id))
        return [tuple(r) for r in s.execute(q)]  # type: ignore[misc]


def checkpointed_files(app: App, case_id: str) -> set[str]:
    """The files that interrupted media pulls of the case checkpointed (read with their rows)."""
    from aggregator.jobs.pull import load_cursor
    from connectors.base import checkpoints

    files: set[str] = set()
    with app.db.session() as s:
        sources = list(s.scalars(select(Source.id).where(Source.case_id == case_id)))
    for sid in sources:
        for part in checkpoints(load_cursor(app, sid), "media"):
            files.update(part.get("files", {}))
    return files


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def progress_done(app: App, job_id: str) -> int:
    job = records.get(app, job_id)
    return sum(int(p.get("done") or 0) for p in job.progress.values())


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of its own on 127.0.0.1:5432, dropped afterwards."""
    if not _pg_up():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    from sqlalchemy import create_engine, text

    name = "agg_jobs_" + uuid.uuid4().hex[:10]
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        pytest.skip(f"cannot create a PostgreSQL test database: {type(exc).__name__}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Workers:
    """``aggregator worker`` processes on one home and database; stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, home: Path, url: str, env: dict[str, str]) -> None:
        self.home, self.url = home, url
        self.env = {**os.environ, "AGGREGATOR_HOME": str(home), "AGGREGATOR_DATABASE_URL": url,
                    "PYTHONPATH": str(ROOT), "AGGREGATOR_LOG_LEVEL": "INFO", **env}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, n: int = 1, concurrency: int = 1) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(n):
            log = self.home.parent / f"worker-{len(self.procs)}.log"
            with open(log, "wb") as out:
                p = subprocess.Popen([sys.executable, "-c", MAIN, "worker", "--concurrency", str(concurrency)],
                                     env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            self.procs.append(p)
            self.logs.append(log)
            started.append(p)
        return started

    def by_pid(self, pid: int) -> subprocess.Popen[bytes]:
        return next(p for p in self.procs if p.pid == pid)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in self.logs)


@pytest.fixture()
def workers(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., Workers]]:
    made: list[Workers] = []

    def make(home: Path, **env: str) -> Workers:
        w = Workers(home, pg_url, {"AGGREGATOR_JOB_DEAD_AFTER": "6", **env})
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()
