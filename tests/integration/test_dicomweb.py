"""The DICOMweb connector against a real Orthanc (DICOMweb plugin): QIDO-RS + WADO-RS."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.errors import ConfigError, ProtocolError, RemoteNotFound
from connectors.base import KIND_DICOM, NullProgress, PatientRef
from connectors.dicomweb import (
    DicomwebConfig,
    DicomwebConnector,
    FramingMismatch,
    chunk_blocks,
    iter_multipart,
    iter_multipart_blocks,
)
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
        assert h.read(done[uid]) == original, uid
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
        data = h.read(done[uid])
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


def _sized_body(parts: list[bytes], lengths: list[int], boundary: bytes = b"XyZ") -> bytes:
    """Parts that announce a Content-Length (as Orthanc's do), possibly a wrong one."""
    out = b""
    for p, n in zip(parts, lengths, strict=True):
        out += (b"--" + boundary + b"\r\nContent-Type: application/dicom\r\nContent-Length: "
                + str(n).encode() + b"\r\n\r\n" + p + b"\r\n")
    return out + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 100000])
def test_multipart_parser_any_chunking(chunk: int) -> None:
    parts = [b"first\r\n--XyNOT-the-boundary", b"", b"\r\n--Xy" * 5 + b"end"]
    body = _body(parts)
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    got = [b"".join(p.iter_chunks()) for _, p in iter_multipart(chunks, b"XyZ")]
    assert got == parts


@pytest.mark.parametrize("chunk", [1, 5, 64, 100000])
def test_multipart_parts_taken_by_their_content_length(chunk: int) -> None:
    # the payloads hold the delimiter itself: only a parser that counts bytes gets them whole
    parts = [b"a\r\n--XyZ\r\n" * 3, b"", b"\r\n--XyZ--\r\n", b"x" * 70_000]
    body = _sized_body(parts, [len(p) for p in parts])
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    got = [b"".join(p.iter_chunks()) for _, p in iter_multipart(chunks, b"XyZ")]
    assert got == parts


@pytest.mark.parametrize("wrong", [-1, +1, +40])
def test_multipart_wrong_content_length_is_detected_and_delimiters_still_work(wrong: int) -> None:
    parts = [b"first part", b"second part"]
    body = _sized_body(parts, [len(parts[0]) + wrong, len(parts[1])])
    with pytest.raises(FramingMismatch):
        list(iter_multipart([body], b"XyZ"))
    blocks = chunk_blocks([body[i : i + 7] for i in range(0, len(body), 7)])
    got = [b"".join(p.iter_chunks()) for _, p in iter_multipart_blocks(blocks, b"XyZ", trust_lengths=False)]
    assert got == parts


def test_multipart_truncated_is_a_protocol_error() -> None:
    body = _body([b"abc"])[:-12]
    with pytest.raises(ProtocolError):
        list(iter_multipart([body], b"XyZ"))


def test_multipart_endless_part_headers_are_refused() -> None:
    body = b"--XyZ\r\n" + b"X-Junk: " + b"a" * 200_000
    with pytest.raises(ProtocolError, match="oversized header"):
        list(iter_multipart([body[i : i + 4096] for i in range(0, len(body), 4096)], b"XyZ"))


def _part10(sop_uid: str) -> bytes:
    from connectors.dicom_stream import file_meta

    return file_meta("1.2.840.10008.5.1.4.1.1.7", sop_uid, "1.2.840.10008.1.2.1") + b"\x08\x00\x18\x00UI\x04\x001.2 "


def test_a_server_with_wrong_part_lengths_is_read_again_by_delimiters(tmp_path: Path) -> None:
    """Content-Length is trusted only while it agrees with the framing; then delimiters decide."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    parts = [_part10("1.2.3.1"), _part10("1.2.3.2")]
    body = _sized_body(parts, [len(parts[0]) + 3, len(parts[1])])
    wado_requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's method name
            if self.path.startswith("/studies?"):
                data = json.dumps([{"0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                                    "00100020": {"vr": "LO", "Value": ["P1"]},
                                    "00201208": {"vr": "IS", "Value": [2]}}]).encode()
                ctype = "application/dicom+json"
            elif "/series?" in self.path:  # the series listing: one series, so one study request
                data = json.dumps([{"0020000E": {"vr": "UI", "Value": ["1.2.3.9"]},
                                    "00201209": {"vr": "IS", "Value": [2]}}]).encode()
                ctype = "application/dicom+json"
            else:
                wado_requests.append(self.path)
                data, ctype = body, 'multipart/related; type="application/dicom"; boundary=XyZ'
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        h = make_sink(tmp_path, kind="dicomweb")
        conn = DicomwebConnector(DicomwebConfig(url=f"http://127.0.0.1:{server.server_port}"))
        conn.pull(PatientRef(id="P1"), None, h.sink, NullProgress())
    finally:
        server.shutdown()
    done = {e.key: e for e in h.entries("done") if e.kind == KIND_DICOM}
    assert wado_requests == ["/studies/1.2.3", "/studies/1.2.3"]
    assert set(done) == {"1.2.3.1", "1.2.3.2"}
    assert h.read(done["1.2.3.1"]) == parts[0] and h.read(done["1.2.3.2"]) == parts[1]
