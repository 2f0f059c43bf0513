"""The DIMSE connector against a real Orthanc: C-ECHO/C-FIND/C-GET/C-MOVE, patients kept apart."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from aggregator.errors import AccessDenied
from connectors.base import KIND_DICOM, NullProgress, PatientRef
from connectors.dicom_stream import split_part10
from connectors.dimse import DimseConfig, DimseConnector
from tests.integration.orthanc import CLIENT_AET, MOVE_AET, LoadedArchive, free_port
from tests.support import RecordingProgress, SinkHarness, make_sink

pytestmark = pytest.mark.orthanc

PATIENTS = {  # label -> PatientRef as the archive knows it
    "HOSPA": PatientRef(id="100200", issuer="HOSP-A"),
    "HOSPB": PatientRef(id="100200", issuer="HOSP-B"),
    "LATIN1": PatientRef(id="LAT-0001"),
    "UTF8": PatientRef(id="UTF-0001"),
    "PYD": PatientRef(id="AGG-PYD"),
    "SHR": PatientRef(id="AGG-SHR"),
    "MANY": PatientRef(id="AGG-MANY"),
}


def connector(archive: LoadedArchive, retrieve: str = "get", **kw: object) -> DimseConnector:
    srv = archive.server
    cfg = DimseConfig(host="127.0.0.1", port=srv.dicom_port, called_ae=srv.aet, calling_ae=CLIENT_AET,
                      retrieve=retrieve, move_ae=MOVE_AET if retrieve == "move" else None,
                      store_port=srv.store_port if retrieve == "move" else None, **kw)  # type: ignore[arg-type]
    return DimseConnector(cfg)



def assert_identical(h: SinkHarness, expected: dict[str, bytes]) -> None:
    """Each done row holds the archive's dataset bytes unchanged, in the same transfer syntax."""
    done = {e.key: e for e in h.entries("done") if e.kind == KIND_DICOM}
    assert set(done) == set(expected)
    for uid, original in expected.items():
        got = h.read(done[uid])
        got_at, got_ts = split_part10(got)
        orig_at, orig_ts = split_part10(original)
        assert got_ts == orig_ts, uid
        assert got[got_at:] == original[orig_at:], (uid, got_ts, len(got) - got_at, len(original) - orig_at)
        meta = pydicom.dcmread(h.path(done[uid]), stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == uid
        assert done[uid].meta["transfer_syntax"] == orig_ts


def test_check_reports_echo_and_retrieve_levels(loaded_archive: LoadedArchive) -> None:
    result = connector(loaded_archive).check()
    assert result.ok
    assert result.details["echo"] is True
    assert result.details["retrieve_works"] == {"get": True, "move": True}
    assert result.details["find"]["STUDY"] is True


@pytest.mark.parametrize("label", ["PYD", "HOSPA", "HOSPB", "LATIN1", "UTF8"])
def test_c_get_is_byte_identical_and_patient_scoped(loaded_archive: LoadedArchive, tmp_path: Path,
                                                    label: str) -> None:
    h = make_sink(tmp_path, kind="dimse")
    progress = RecordingProgress()
    cursor = connector(loaded_archive).pull(PATIENTS[label], None, h.sink, progress)
    assert_identical(h, loaded_archive.copies[label])
    assert progress.total == len(loaded_archive.copies[label]) == progress.done
    assert h.entries("failed") == []
    assert set(cursor["studies"]["studies"]) == {
        str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in loaded_archive.groups[label]}


def test_c_get_shared_data(loaded_archive: LoadedArchive, tmp_path: Path) -> None:
    if not loaded_archive.copies.get("SHR"):
        pytest.skip("../shared/data/dicom not present")
    h = make_sink(tmp_path, kind="dimse")
    connector(loaded_archive).pull(PATIENTS["SHR"], None, h.sink, NullProgress())
    assert_identical(h, loaded_archive.copies["SHR"])


def test_c_move_is_byte_identical(loaded_archive: LoadedArchive, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="dimse")
    connector(loaded_archive, "move").pull(PATIENTS["PYD"], None, h.sink, NullProgress())
    assert_identical(h, loaded_archive.copies["PYD"])
    h2 = make_sink(tmp_path / "b", kind="dimse")
    connector(loaded_archive, "move").pull(PATIENTS["HOSPB"], None, h2.sink, NullProgress())
    assert_identical(h2, loaded_archive.copies["HOSPB"])


def test_c_move_to_unknown_destination_says_so(loaded_archive: LoadedArchive, tmp_path: Path) -> None:
    srv = loaded_archive.server
    cfg = DimseConfig(host="127.0.0.1", port=srv.dicom_port, called_ae=srv.aet, calling_ae=CLIENT_AET,
                      retrieve="move", move_ae="NOBODY", store_port=free_port())
    h = make_sink(tmp_path, kind="dimse")
    with pytest.raises(AccessDenied, match="move destination"):
        DimseConnector(cfg).pull(PATIENTS["HOSPA"], None, h.sink, NullProgress())


def test_unknown_calling_ae_is_refused_clearly(loaded_archive: LoadedArchive) -> None:
    srv = loaded_archive.server
    cfg = DimseConfig(host="127.0.0.1", port=srv.dicom_port, called_ae=srv.aet, calling_ae="STRANGER")
    with pytest.raises(AccessDenied, match="STRANGER"):
        DimseConnector(cfg).check()


def test_resume_fetches_only_missing_and_repull_adds_nothing(loaded_archive: LoadedArchive,
                                                             tmp_path: Path) -> None:
    expected = loaded_archive.copies["PYD"]
    h = make_sink(tmp_path, kind="dimse")
    # an earlier, interrupted pull stored two instances (marker bytes: a re-fetch would replace them)
    earlier = sorted(expected)[:2]
    for uid in earlier:
        h.sink.dicom(uid, b"earlier pull " + uid.encode())
    h.new_sink()
    progress = RecordingProgress()
    cursor = connector(loaded_archive).pull(PATIENTS["PYD"], None, h.sink, progress)
    rows = {e.key: e for e in h.entries("done")}
    assert set(rows) == set(expected)
    for uid in earlier:
        assert h.read(rows[uid]).startswith(b"earlier pull")
    assert progress.done == len(expected)
    # re-pull with the cursor: nothing new, no duplicate rows
    before = h.entries()
    cursor2 = connector(loaded_archive).pull(PATIENTS["PYD"], cursor, h.new_sink(), NullProgress())
    assert h.entries() == before
    assert cursor2 == cursor


def test_modality_and_date_filters(loaded_archive: LoadedArchive, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="dimse")
    connector(loaded_archive, modalities="MR").pull(PATIENTS["PYD"], None, h.sink, NullProgress())
    mods = {str(pydicom.dcmread(p, stop_before_pixels=True).get("Modality", "")) for p in loaded_archive.groups["PYD"]}
    assert "MR" in mods and len(mods) > 1
    done = {e.key for e in h.entries("done")}
    assert done and done < loaded_archive.uids("PYD")
    h2 = make_sink(tmp_path / "d", kind="dimse")
    connector(loaded_archive, date_from="2026-08-03", date_to="2026-08-03").pull(
        PATIENTS["HOSPB"], None, h2.sink, NullProgress())
    assert {e.key for e in h2.entries("done")} == loaded_archive.uids("HOSPB")
    h3 = make_sink(tmp_path / "e", kind="dimse")
    connector(loaded_archive, date_from="2020-01-01", date_to="2020-12-31").pull(
        PATIENTS["HOSPB"], None, h3.sink, NullProgress())
    assert h3.entries() == []


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_later_pull_fetches_only_missing_instances(loaded_archive: LoadedArchive, tmp_path: Path,
                                                   retrieve: str) -> None:
    """With a cursor, a partly stored study is completed at IMAGE level, leaving stored copies alone."""
    expected = loaded_archive.copies["HOSPA"]
    assert len(expected) == 2
    kept, wanted = sorted(expected)
    h = make_sink(tmp_path, kind="dimse")
    h.sink.dicom(kept, b"stored earlier " + kept.encode())
    progress = RecordingProgress()
    connector(loaded_archive, retrieve).pull(PATIENTS["HOSPA"], {"studies": {"studies": {}}}, h.new_sink(),
                                             progress)
    done = {e.key: e for e in h.entries("done")}
    assert set(done) == {kept, wanted}
    assert h.read(done[kept]).startswith(b"stored earlier")
    got = h.read(done[wanted])
    assert got[split_part10(got)[0]:] == expected[wanted][split_part10(expected[wanted])[0]:]
    assert progress.done == 2


@pytest.mark.parametrize("since", [None, {"studies": {"studies": {}}}])
def test_study_with_more_sop_classes_than_contexts(loaded_archive: LoadedArchive, tmp_path: Path,
                                                   since: dict[str, dict[str, object]] | None) -> None:
    classes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in loaded_archive.groups["MANY"]}
    assert len(classes) > 7  # 17 transfer-syntax contexts per class: 8 classes exceed 128 contexts
    h = make_sink(tmp_path, kind="dimse")
    connector(loaded_archive).pull(PATIENTS["MANY"], since, h.sink, NullProgress())  # type: ignore[arg-type]
    assert_identical(h, loaded_archive.copies["MANY"])
    assert h.entries("failed") == []
