"""DICOMweb through the shared HTTP client: a fault-injecting proxy in front of the real Orthanc.

The proxy forwards every request to Orthanc's DICOMweb root unless a fault is queued for its
path, in which case it answers that status itself (429/503 with ``Retry-After``, 401, 403).
Retries, their waits, the classification of refusals and the masking of PatientIDs in what
is reported are all the shared client's (``connectors/http.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.errors import AccessDenied, AuthError
from connectors.base import KIND_DICOM, NullProgress, PatientRef
from connectors.dicomweb import DicomwebConfig, DicomwebConnector
from tests.fakes.proxy import FaultProxy
from tests.integration.orthanc import LoadedArchive
from tests.support import make_sink

pytestmark = pytest.mark.orthanc


@pytest.fixture()
def proxy(loaded_archive: LoadedArchive) -> Iterator[FaultProxy]:
    with FaultProxy(loaded_archive.server.url) as p:
        yield p


@pytest.fixture()
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr("time.sleep", waits.append)
    return waits


PYD = PatientRef(id="AGG-PYD")


def test_429_and_503_are_retried_after_retry_after(loaded_archive: LoadedArchive, proxy: FaultProxy,
                                                   tmp_path: Path, slept: list[float]) -> None:
    expected = loaded_archive.copies.get("PYD")
    if not expected:
        pytest.skip("no PYD instances loaded")
    proxy.inject(r"^/dicom-web/studies\?", 429, retry_after=4)  # the QIDO-RS study search
    proxy.inject(r"^/dicom-web/studies/[0-9.]+$", 503, retry_after=2, times=2)  # the WADO-RS retrieve
    h = make_sink(tmp_path, kind="dicomweb")
    conn = DicomwebConnector(DicomwebConfig(url=proxy.url("/dicom-web")))
    conn.pull(PYD, None, h.sink, NullProgress())
    conn.close()
    assert slept == [4.0, 2.0, 2.0]  # each wait is the server's Retry-After
    statuses = [s for p, s in proxy.log if re.match(r"^/dicom-web/studies/[0-9.]+$", p)]
    assert statuses[:3] == [503, 503, 200] and statuses.count(503) == 2  # then the patient's other studies
    assert [s for p, s in proxy.log if p.startswith("/dicom-web/studies?")] == [429, 200]
    done = {e.key: e for e in h.entries("done") if e.kind == KIND_DICOM}
    assert set(done) == set(expected)
    for uid, original in expected.items():
        assert h.read(done[uid]) == original, uid
    assert not h.entries("failed")


def test_refusals_are_classified_and_patient_ids_masked(loaded_archive: LoadedArchive, proxy: FaultProxy,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AGG_DW_TOKEN", "sekret-token")
    conn = DicomwebConnector(DicomwebConfig(url=proxy.url("/dicom-web"), auth="bearer", token_env="AGG_DW_TOKEN"))
    proxy.inject(r"^/dicom-web/studies\?", 401, times=2)
    with pytest.raises(AuthError) as denied:
        conn.pull(PYD, None, make_sink(tmp_path, kind="dicomweb").sink, NullProgress())
    # the client sends once more after a 401 (a token may have been refreshed), then it stands
    assert [s for _, s in proxy.log] == [401, 401]
    assert proxy.authorization == ["Bearer sekret-token"] * 2
    proxy.inject(r"^/dicom-web/studies\?", 403)
    (tmp_path / "b").mkdir()
    with pytest.raises(AccessDenied) as forbidden:
        conn.pull(PYD, None, make_sink(tmp_path / "b", kind="dicomweb").sink, NullProgress())
    assert [s for _, s in proxy.log] == [401, 401, 403]  # a 403 is not retried
    conn.close()
    for err in (denied.value, forbidden.value):
        text = str(err)
        assert "/dicom-web/studies" in text and PYD.id not in text  # type: ignore[operator]
        assert err.status in (401, 403)
    # every request line logged (ours and urllib3's) has its query values masked
    assert "PatientID=***" in caplog.text
    assert PYD.id not in caplog.text and "sekret-token" not in caplog.text  # type: ignore[operator]
