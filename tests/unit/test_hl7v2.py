"""The HL7 v2 PID reader (demographics only) and how media import files an .hl7 message."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors import hl7v2
from connectors.media import sniff
from fixtures import identity as fx


def test_pid_of_the_generated_result() -> None:
    data = fx.hl7v2_result(fx.ME)
    assert hl7v2.looks_like_hl7(data[:8192]) and sniff("result.hl7", data[:8192]) == "hl7v2"
    (d,) = hl7v2.read_patients(data)
    assert d.identifiers == [("urn:oid:2.16.840.1.113883.19.5.99999.1", fx.ME.mrn)]
    assert d.names == [((fx.ME.given,), fx.ME.family)]
    assert d.birth_date == fx.ME.birth and d.gender == "female"
    p = hl7v2.patient_resource(d, "doc-1")
    assert p["meta"]["tag"][0]["code"] == "hl7v2" and p["birthDate"] == fx.ME.birth


def test_other_separators_escapes_line_endings_and_batches() -> None:
    msg = ("MSH#:~\\&#LAB#H\nPID#1##77:::LOCAL##O\\F\\Brien:Ann:Marie~Smith:Ann##198002#U\n"
           "MSH#:~\\&#LAB#H\r\nPID#1##78##Doe:John##19991231120000#M\r\n")
    a, b = hl7v2.read_patients(msg.encode())
    assert a.identifiers == [("urn:aggregator:hl7v2-authority:LOCAL", "77")]
    assert b.identifiers == [("urn:aggregator:hl7v2-patient-id", "78")]
    assert a.names == [(("Ann", "Marie"), "O#Brien"), (("Ann",), "Smith")]
    assert a.birth_date == "1980-02" and a.gender == "unknown"
    assert b.birth_date == "1999-12-31" and b.gender == "male" and not b.same_as(a)


@pytest.mark.parametrize("data", [b"PID|1||x", b"MSH|^~|short", b"hello"])
def test_not_hl7(data: bytes) -> None:
    with pytest.raises(hl7v2.NotHl7):
        hl7v2.read_patients(data)


def test_media_skips_a_file_naming_two_patients(tmp_path: Path) -> None:
    from connectors.media import MediaConfig, MediaConnector
    from tests.support import RecordingProgress, make_sink

    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "batch.hl7").write_bytes(fx.hl7v2_result(fx.ME) + fx.hl7v2_result(fx.OTHER, "MSG0002"))
    (tmp_path / "dl" / "one.hl7").write_bytes(fx.hl7v2_result(fx.ME) + fx.hl7v2_result(fx.ME, "MSG0002"))
    h = make_sink(tmp_path)
    MediaConnector(MediaConfig(path=str(tmp_path / "dl"))).pull(None, None, h.sink, RecordingProgress())  # type: ignore[arg-type]
    rows = {(e.key, e.state): e for e in h.entries()}
    skipped = rows[("file:batch.hl7", "skipped")]
    assert skipped.reason and "2 different patients" in skipped.reason
    assert fx.ME.family not in skipped.reason and fx.OTHER.family not in skipped.reason
    assert ("file:one.hl7#patient", "done") in rows and ("file:one.hl7#docref", "done") in rows
    assert not any(k.startswith("file:batch.hl7#") for k, _ in rows)
