"""DIMSE pulls as jobs (issue 14), against the real Orthanc the tests start, on SQLite and PostgreSQL.

The archive is reached through a throttled link (:mod:`tests.fakes.throttle`, about 1.5 MB/s),
so a C-GET of the 150-instance study takes seconds: long enough to cancel it half way, and the
link counts the bytes the archive sent, so a test can tell what a resumed pull fetched again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from aggregator.app import App
from aggregator.jobs import lock as case_lock
from aggregator.jobs.dispatch import InProcessDispatcher, JobService
from aggregator.jobs.records import Timing
from aggregator.store.models import Pull
from tests.fakes.throttle import ThrottledLink
from tests.jobs.conftest import BigStudy, dimse_case, ledger_of, progress_done, wait_for

pytestmark = pytest.mark.orthanc

FAST = Timing(dead_after=3.0, max_attempts=3, backoff=0.5)
RATE = 1_500_000


@pytest.fixture()
def core(tmp_path: Path, db_url: str) -> Iterator[App]:
    app = App.open(tmp_path / "home", database_url=db_url)
    yield app
    app.close()


@pytest.fixture()
def service(core: App) -> Iterator[JobService]:
    svc = JobService(core, InProcessDispatcher(core, 2, timing=FAST))
    yield svc
    svc.shutdown(wait=False)


def test_cancel_mid_c_get_stops_the_retrieve_and_the_resumed_pull_fetches_only_what_is_missing(
        core: App, service: JobService, big_study: BigStudy) -> None:
    total = sum(big_study.sizes.values())
    with ThrottledLink("127.0.0.1", big_study.server.dicom_port, RATE) as link:
        dimse_case(core, "c1", "127.0.0.1", link.port, big_study.server.aet)
        job = service.submit("pull", "c1", owner="nina", params={})
        wait_for(lambda: progress_done(core, job.id) >= 30, 60, "the C-GET to be under way")
        t0 = time.monotonic()
        service.cancel(job.id)
        ended = service.wait(job.id, 30)
        stopped_in = time.monotonic() - t0
        assert ended.state == "cancelled", ended
        rows = ledger_of(core, "c1")
        got = {r[1] for r in rows if r[2] == "done"}
        assert 30 <= len(got) < len(big_study.sizes) and got <= set(big_study.sizes)
        missing = total - sum(big_study.sizes[u] for u in got)
        # stopped by C-CANCEL within seconds, long before the rest of the study could have come
        assert stopped_in < 5 and stopped_in < missing / RATE, (stopped_in, missing / RATE)
        with core.db.session() as s:
            pull = s.scalar(select(Pull).where(Pull.job_id == job.id))
            # ended by the cancel (C-CANCEL on every association of a parallel retrieve), not by
            # an abort (which would read "interrupted")
            assert pull is not None and pull.state == "failed"
            assert "was cancelled" in (pull.error or "") and "interrupted" not in (pull.error or "")
        assert not case_lock.is_held(core, "c1")
        # the association ended cleanly: the archive answers at once to the next pull, which fetches
        # only the instances the ledger lacks
        before = link.received
        again = service.wait(service.submit("pull", "c1", owner="nina", params={}).id, 120)
        fetched = link.received - before
    assert again.state == "done", again
    rows = ledger_of(core, "c1")
    assert {r[1] for r in rows} == set(big_study.sizes) and {r[2] for r in rows} == {"done"}
    assert {r[3] for r in rows} == {1}  # nothing stored twice
    assert again.result["pulls"][0]["items"]["done"] == len(big_study.sizes) - len(got)
    # on the wire: the missing instances (plus queries), not the whole study again
    assert missing <= fetched < missing + (total - missing) / 2, (fetched, missing, total)
