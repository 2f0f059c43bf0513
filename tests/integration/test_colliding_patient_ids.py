"""One PatientID, two people (issuers HOSP-A and HOSP-B): without an issuer nothing is guessed.

Both imaging connectors against the real Orthanc of the session: with only the PatientID, the
studies of both people are refused as ambiguous query gaps; with the case's birth date or name
the patient's own studies are retrieved and the other person's are reported, never stored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from connectors.base import KIND_DICOM, KIND_QUERY, Connector, NullProgress, PatientRef
from connectors.dicom_stream import PATIENT_STUDY
from connectors.dicomweb import DicomwebConfig, DicomwebConnector
from connectors.dimse import DimseConfig, DimseConnector
from tests.integration.orthanc import CLIENT_AET, MOVE_AET, LoadedArchive
from tests.support import make_sink

pytestmark = pytest.mark.orthanc

MAKERS: dict[str, Callable[[LoadedArchive], Connector]] = {
    "c-get": lambda a: DimseConnector(DimseConfig(
        host="127.0.0.1", port=a.server.dicom_port, called_ae=a.server.aet, calling_ae=CLIENT_AET)),
    "c-move": lambda a: DimseConnector(DimseConfig(
        host="127.0.0.1", port=a.server.dicom_port, called_ae=a.server.aet, calling_ae=CLIENT_AET,
        retrieve="move", move_ae=MOVE_AET, store_port=a.server.store_port)),
    "wado-rs": lambda a: DicomwebConnector(DicomwebConfig(url=a.server.dicomweb)),
}


def study_of(archive: LoadedArchive, label: str) -> str:
    (uid,) = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in archive.groups[label]}
    return uid


@pytest.mark.parametrize("how", MAKERS)
def test_patient_id_alone_retrieves_nothing_of_either_person(loaded_archive: LoadedArchive, tmp_path: Path,
                                                             how: str) -> None:
    h = make_sink(tmp_path, kind=how)
    MAKERS[how](loaded_archive).pull(PatientRef(id="100200"), None, h.sink, NullProgress())
    assert not [e for e in h.entries() if e.kind == KIND_DICOM]
    gaps = {e.key: e for e in h.entries("failed") if e.kind == KIND_QUERY}
    assert set(gaps) == {PATIENT_STUDY + study_of(loaded_archive, "HOSPA"),
                         PATIENT_STUDY + study_of(loaded_archive, "HOSPB")}
    for gap in gaps.values():
        assert gap.status == "ambiguous"
        # Orthanc's QIDO-RS leaves IssuerOfPatientID out of study answers; the birth dates tell then
        assert gap.reason and "--issuer" in gap.reason
        told_by = "(different birth dates)" if how == "wado-rs" else "(issuers HOSP-A, HOSP-B)"
        assert told_by in gap.reason
        assert "Kowalski" not in gap.reason and "Tanaka" not in gap.reason


@pytest.mark.parametrize("how", MAKERS)
@pytest.mark.parametrize(("who", "mine", "theirs"), [
    (PatientRef(id="100200", birth_date="1961-03-05"), "HOSPA", "HOSPB"),
    (PatientRef(id="100200", name="Robin Tanaka"), "HOSPB", "HOSPA"),
], ids=["by-birth-date", "by-name"])
def test_the_case_demographics_pick_the_patient(loaded_archive: LoadedArchive, tmp_path: Path, how: str,
                                                who: PatientRef, mine: str, theirs: str) -> None:
    h = make_sink(tmp_path, kind=how)
    MAKERS[how](loaded_archive).pull(who, None, h.sink, NullProgress())
    done = {e.key for e in h.entries("done") if e.kind == KIND_DICOM}
    assert done == loaded_archive.uids(mine)
    (gap,) = [e for e in h.entries("failed") if e.kind == KIND_QUERY]
    assert gap.key == PATIENT_STUDY + study_of(loaded_archive, theirs)
    assert gap.status == "other-patient"
