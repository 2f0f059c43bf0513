"""A Bulk Data pull as a job (issue 14): cancelled while the export runs, on SQLite and PostgreSQL.

The local FHIR server (:class:`tests.fakes.fhir_server.FakeFhirServer`) keeps the export "in
progress" with a long ``Retry-After``, as a busy server does: the job must not sit out that
wait, and the server must be told to drop the export (``DELETE`` on its status URL).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from aggregator.app import App
from aggregator.cases import add_endpoint, add_source, create_case
from aggregator.jobs import lock as case_lock
from aggregator.jobs.dispatch import InProcessDispatcher, JobService
from aggregator.jobs.records import Timing
from aggregator.store.models import Pull
from tests.fakes.fhir_server import FakeFhirServer
from tests.jobs.conftest import wait_for

FAST = Timing(dead_after=3.0, max_attempts=3, backoff=0.5)
RETRY_AFTER = 120


@pytest.fixture()
def core(tmp_path: Path, db_url: str) -> Iterator[App]:
    app = App.open(tmp_path / "home", database_url=db_url)
    yield app
    app.close()


def test_cancel_mid_bulk_export_stops_the_wait_and_deletes_the_export(core: App) -> None:
    svc = JobService(core, InProcessDispatcher(core, 1, timing=FAST))
    with FakeFhirServer(n_obs=20) as srv:
        srv.export_polls, srv.export_retry_after = 10_000, RETRY_AFTER
        add_endpoint(core, "bulk", "fhir-bulk", {"url": srv.url, "auth": "none"})
        create_case(core, "c1", "oncology", case_date="2024-05-01")
        add_source(core, "c1", endpoint="bulk", patient_id="p0")
        try:
            job = svc.submit("pull", "c1", owner="nina", params={})
            wait_for(lambda: any("/bulkstatus/" in path for _, path in srv.log), 30, "the export to be polled")
            t0 = time.monotonic()
            svc.cancel(job.id)
            ended = svc.wait(job.id, 30)
            stopped_in = time.monotonic() - t0
        finally:
            svc.shutdown(wait=False)
        deleted = list(srv.deleted_jobs)
        polls = [path for method, path in srv.log if method == "GET" and "/bulkstatus/" in path]
    assert ended.state == "cancelled" and ended.error == "cancelled on request", ended
    assert stopped_in < 5 < RETRY_AFTER, stopped_in  # the server's Retry-After was not sat out
    assert deleted == ["job1"]  # the export was cancelled on the server (Bulk Data: DELETE on the status URL)
    assert len(polls) == 1
    with core.db.session() as s:
        pull = s.scalar(select(Pull).where(Pull.job_id == job.id))
        assert pull is not None and pull.state == "failed" and "cancelled" in (pull.error or "")
    assert not case_lock.is_held(core, "c1")
