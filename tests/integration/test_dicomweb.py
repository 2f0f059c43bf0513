"""The DICOMweb connector against a real Orthanc (DICOMweb plugin): QIDO-RS + WADO-RS."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.errors import ConfigError, ProtocolError, RemoteNotFound
from connectors.base import KIND_DICOM, NullProgress, PatientRef
from connectors.dicomweb import DicomwebConfig, DicomwebConnector, iter_multipart
from tests.integration.orthanc import LoadedArchive
from tests.support import make_sink

pytestmark = pytest.mark.orthanc

PATIENTS = {
    "HOSPA": PatientRef(id="100200", issuer="HOSP-A"),
    "HOSPB": PatientRef(id="100200", issuer="HOSP-B"),
    "LATIN1": PatientRef(id="LAT-0001"),
    "UTF8": PatientRef(id="UTF-0001"),
    "PYD": PatientRef(id="AGG-PYD"),
    "SHR": PatientRef(id="AGG-SHR"),
    "MANY": PatientRef(id="AGG-MANY"),
}


def connector(archive: LoadedArchive, **kw: object) -> DicomwebConnector:
    return DicomwebConnector(DicomwebConfig(url=archive.server.dicomweb, **kw))  # type: ignore[arg-type]


def test_check_runs_a_qido_query(loaded_archive: LoadedArchive) -> None:
    result = connector(loaded_archive).check()
    assert result.ok and result.details["qido"] is True and result.details["studies_seen"] == 1


@pytest.mark.parametrize("label", ["PYD", "SHR", "MANY", "HOSPA", "HOSPB", "LATIN1", "UTF8"])
def test_wado_rs_files_are_the_archive_copies(loaded_archive: LoadedArchive, tmp_path: Path, label: str) -> None:
    expected = loaded_archive.copies.get(label)
    if not expected:
        pytest.skip(f"no {label} instances loaded")
    h = make_sink(tmp_path, kind="dicomweb")
    cursor = connector(loaded_archive).pull(PATIENTS[label], None, h.sink, NullProgress())
    done = {e.key: e for e in h.entries("done") if e.kind == KIND_DICOM}
    assert set(done) == set(expected)  # nothing from the other patient sharing the PatientID
    for uid, original in expected.items():
        assert h.blobs.read_bytes(done[uid].sha256 or "") == original, uid
    assert h.sink.method == "WADO-RS"
    # re-pull with the cursor: no new rows
    before = h.entries()
    assert connector(loaded_archive).pull(PATIENTS[label], cursor, h.new_sink(), NullProgress()) == cursor
    assert h.entries() == before


def test_resume_fetches_only_missing(loaded_archive: LoadedArchive, tmp_path: Path) -> None:
    expected = loaded_archive.copies["PYD"]
    h = make_sink(tmp_path, kind="dicomweb")
    earlier = sorted(expected)[:3]
    for uid in earlier:
        h.sink.dicom(uid, b"earlier " + uid.encode())
    connector(loaded_archive).pull(PATIENTS["PYD"], None, h.new_sink(), NullProgress())
    done = {e.key: e for e in h.entries("done")}
    assert set(done) == set(expected)
    for uid in expected:
        data = h.blobs.read_bytes(done[uid].sha256 or "")
        assert data.startswith(b"earlier") if uid in earlier else data == expected[uid]


def test_unknown_base_url_is_a_clear_error(loaded_archive: LoadedArchive) -> None:
    with pytest.raises(RemoteNotFound):
        DicomwebConnector(DicomwebConfig(url=loaded_archive.server.url + "/no-such-root")).check()


def test_bearer_token_must_be_available() -> None:
    with pytest.raises(ConfigError, match="AGG_NO_SUCH_TOKEN"):
        DicomwebConnector(DicomwebConfig(url="http://127.0.0.1:9", auth="bearer", token_env="AGG_NO_SUCH_TOKEN"))


def _body(parts: list[bytes], boundary: bytes = b"XyZ") -> bytes:
    out = b"preamble\r\n"
    for p in parts:
        out += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 100000])
def test_multipart_parser_any_chunking(chunk: int) -> None:
    parts = [b"first\r\n--XyNOT-the-boundary", b"", b"\r\n--Xy" * 5 + b"end"]
    body = _body(parts)
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    got = [b"".join(p.iter_chunks()) for _, p in iter_multipart(chunks, b"XyZ")]
    assert got == parts


def test_multipart_truncated_is_a_protocol_error() -> None:
    body = _body([b"abc"])[:-12]
    with pytest.raises(ProtocolError):
        list(iter_multipart([body], b"XyZ"))


def test_multipart_endless_part_headers_are_refused() -> None:
    body = b"--XyZ\r\n" + b"X-Junk: " + b"a" * 200_000
    with pytest.raises(ProtocolError, match="oversized header"):
        list(iter_multipart([body[i : i + 4096] for i in range(0, len(body), 4096)], b"XyZ"))
