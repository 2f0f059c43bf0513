"""A study of several series, retrieved series by series in parallel, from the real Orthanc.

DIMSE goes through a TCP relay (:mod:`tests.fakes.tcp_proxy`) that counts open associations and
can cut the one that asks for a given series; DICOMweb through the fault proxy, which counts
requests in flight and can fail one series' request. What is stored is compared byte for byte
with Orthanc's copies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from aggregator.errors import TransientConnectorError
from connectors.base import KIND_DICOM, NullProgress, PatientRef
from connectors.dicom_stream import split_part10
from connectors.dicomweb import DicomwebConfig, DicomwebConnector
from connectors.dimse import DimseConfig, DimseConnector
from tests.fakes.proxy import FaultProxy
from tests.fakes.tcp_proxy import CountingRelay
from tests.integration.orthanc import CLIENT_AET, MOVE_AET, Orthanc
from tests.support import RecordingProgress, SinkHarness, make_sink

pytestmark = pytest.mark.orthanc

PATIENT = PatientRef(id="AGG-PAR")
SERIES = 4
PER_SERIES = 12


class Study:
    def __init__(self, server: Orthanc, study_uid: str, series: dict[str, set[str]], copies: dict[str, bytes]) -> None:
        self.server, self.study_uid, self.series, self.copies = server, study_uid, series, copies


@pytest.fixture(scope="module")
def study(orthanc_server: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Study:
    """Four series of twelve 128x128 CT slices under their own PatientID."""
    from fixtures.dicom import generate_ct_study

    files = generate_ct_study(tmp_path_factory.mktemp("par"), SERIES * PER_SERIES, 128, 128,
                              patient_id=PATIENT.id or "", seed="parallel", series=SERIES)
    ids = orthanc_server.upload(files)
    copies = {orthanc_server.sop_uid(i): orthanc_server.file(i) for i in ids}
    series: dict[str, set[str]] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        series.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert len(series) == SERIES and set(copies) == set().union(*series.values())
    return Study(orthanc_server, study_uid, series, copies)


@pytest.fixture()
def relay(study: Study) -> Iterator[CountingRelay]:
    with CountingRelay(study.server.dicom_port, hold=0.2) as r:
        yield r


def dimse(study: Study, relay: CountingRelay, retrieve: str = "get", **kw: object) -> DimseConnector:
    srv = study.server
    return DimseConnector(DimseConfig(
        host="127.0.0.1", port=relay.port, called_ae=srv.aet, calling_ae=CLIENT_AET, retrieve=retrieve,
        move_ae=MOVE_AET if retrieve == "move" else None, store_port=srv.store_port if retrieve == "move" else None,
        **kw))  # type: ignore[arg-type]


def assert_identical(h: SinkHarness, expected: dict[str, bytes], *, whole_file: bool = False) -> None:
    done = {e.key: e for e in h.entries("done") if e.kind == KIND_DICOM}
    assert set(done) == set(expected)
    for uid, original in expected.items():
        got = h.read(done[uid])
        if whole_file:
            assert got == original, uid
        else:
            a, ta = split_part10(got)
            b, tb = split_part10(original)
            assert ta == tb and got[a:] == original[b:], uid


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_series_in_parallel_are_byte_identical_within_the_bound(study: Study, relay: CountingRelay, tmp_path: Path,
                                                               retrieve: str) -> None:
    h = make_sink(tmp_path, kind="dimse")
    progress = RecordingProgress()
    cursor = dimse(study, relay, retrieve, max_associations=2).pull(PATIENT, None, h.sink, progress)
    assert_identical(h, study.copies)
    assert h.entries("failed") == []
    assert progress.done == progress.total == len(study.copies)
    assert cursor["studies"]["studies"] == {study.study_uid: len(study.copies)}
    # one retrieve per series, never more than two associations open at once, and two did run together
    assert all(relay.asked_for(s.encode()) == 1 for s in study.series)
    assert relay.peak == 2


def test_default_bound_is_four_associations(study: Study, relay: CountingRelay, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="dimse")
    dimse(study, relay).pull(PATIENT, None, h.sink, NullProgress())
    assert_identical(h, study.copies)
    assert 2 <= relay.peak <= 4


def test_one_association_is_the_old_whole_study_retrieve(study: Study, relay: CountingRelay, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="dimse")
    dimse(study, relay, max_associations=1).pull(PATIENT, None, h.sink, NullProgress())
    assert_identical(h, study.copies)
    assert relay.peak == 1 and not any(relay.asked_for(s.encode()) for s in study.series)


def test_a_failed_series_fails_only_its_instances_and_is_fetched_next_time(study: Study, relay: CountingRelay,
                                                                          tmp_path: Path) -> None:
    broken = sorted(study.series)[1]
    relay.cut_when(broken.encode())  # the association whose C-GET names this series is dropped
    h = make_sink(tmp_path, kind="dimse")
    cursor = dimse(study, relay).pull(PATIENT, None, h.sink, NullProgress())
    others = {uid: data for uid, data in study.copies.items() if uid not in study.series[broken]}
    assert_identical(h, others)
    failed = {e.key: e for e in h.entries("failed")}
    assert set(failed) == study.series[broken]
    assert all("its retrieve failed" in e.reason for e in failed.values())
    assert cursor["studies"]["studies"] == {}  # incomplete: looked at again next time

    relay.heal()
    relay.reset_counts()
    h.new_sink()
    dimse(study, relay).pull(PATIENT, cursor, h.sink, NullProgress())
    assert_identical(h, study.copies)
    # only the missing series was asked for again: what was done is not fetched twice
    assert relay.asked_for(broken.encode()) == 1
    assert not any(relay.asked_for(s.encode()) for s in study.series if s != broken)


def test_cancel_stops_every_association(study: Study, relay: CountingRelay, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="dimse")
    conn = dimse(study, relay, max_associations=4)
    first = threading.Event()

    class CancelAfterFirst(RecordingProgress):
        def advance(self, n: int = 1) -> None:
            super().advance(n)
            if n and self.done >= 3:
                first.set()

    progress = CancelAfterFirst()
    threading.Thread(target=lambda: first.wait(20) and conn.cancel(), daemon=True).start()
    with pytest.raises(TransientConnectorError, match="cancelled"):
        conn.pull(PATIENT, None, h.sink, progress)
    assert len(h.entries("done")) < len(study.copies)
    deadline = time.monotonic() + 5  # the relay sees the last release or abort a moment later
    while relay.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay.active == 0  # every association ended (released or aborted), none left behind


@pytest.fixture()
def proxy(study: Study) -> Iterator[FaultProxy]:
    with FaultProxy(study.server.url) as p:
        yield p


def test_wado_series_in_parallel_within_the_bound(study: Study, proxy: FaultProxy, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="dicomweb")
    proxy.hold(r"/series/[0-9.]+$", 0.2)  # requests sent together overlap, however loaded the machine
    conn = DicomwebConnector(DicomwebConfig(url=proxy.url("/dicom-web"), concurrency=2))
    cursor = conn.pull(PATIENT, None, h.sink, NullProgress())
    conn.close()
    assert_identical(h, study.copies, whole_file=True)
    retrieves = [p for p, _ in proxy.log if p.rstrip("/").rsplit("/", 2)[-2] == "series"]
    assert sorted(p.rsplit("/", 1)[-1] for p in retrieves) == sorted(study.series)
    assert proxy.peak == 2
    assert cursor["studies"]["studies"] == {study.study_uid: len(study.copies)}


def test_wado_failed_series_fails_only_its_instances(study: Study, proxy: FaultProxy, tmp_path: Path) -> None:
    broken = sorted(study.series)[2]
    proxy.inject(rf"/series/{broken}$", 500)  # a 500 is not retried
    h = make_sink(tmp_path, kind="dicomweb")
    conn = DicomwebConnector(DicomwebConfig(url=proxy.url("/dicom-web")))
    conn.pull(PATIENT, None, h.sink, NullProgress())
    conn.close()
    assert_identical(h, {u: d for u, d in study.copies.items() if u not in study.series[broken]}, whole_file=True)
    failed = {e.key: e for e in h.entries("failed")}
    assert set(failed) == study.series[broken]
    assert {e.status for e in failed.values()} == {"500"}


def test_a_job_cancel_raised_in_one_lane_ends_the_pull(study: Study, relay: CountingRelay, tmp_path: Path) -> None:
    """The job engine's cancel is a BaseException raised at a progress step, in whichever lane."""

    class JobStopped(BaseException):
        pass

    class StopAtFive(RecordingProgress):
        def advance(self, n: int = 1) -> None:
            super().advance(n)
            if self.done >= 5:
                raise JobStopped

    h = make_sink(tmp_path, kind="dimse")
    with pytest.raises(JobStopped):
        dimse(study, relay).pull(PATIENT, None, h.sink, StopAtFive())
    assert len(h.entries("done")) < len(study.copies)
    deadline = time.monotonic() + 5
    while relay.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay.active == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("dimse-get")]


def test_wado_cancel_stops_every_request(study: Study, proxy: FaultProxy, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="dicomweb")
    conn = DicomwebConnector(DicomwebConfig(url=proxy.url("/dicom-web")))

    class CancelAtThree(RecordingProgress):
        def advance(self, n: int = 1) -> None:
            super().advance(n)
            if self.done >= 3:
                conn.cancel()

    with pytest.raises(TransientConnectorError, match="cancelled"):
        conn.pull(PATIENT, None, h.sink, CancelAtThree())
    conn.close()
    assert 3 <= len(h.entries("done")) < len(study.copies)
    assert h.entries("failed") == []  # a cancel is not the archive's failure
