"""The media connector on real downloads (shared sample data, the project's fixtures) and on
hostile inputs built here, always against a real SQLite ledger and blob store."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.documentreference import DocumentReference

import connectors.media as media_module
from aggregator.ledger import DONE, FAILED, SKIPPED, LedgerEntry
from connectors.base import NullProgress, PatientRef, load_connector_class
from connectors.media import MediaConfig, MediaConnector
from tests.conformance import assert_connector_conforms
from tests.support import SinkHarness, make_sink

MiB = 1024 * 1024
CD = "dicom/cd-dicomdir-3-patients"


class CountingProgress:
    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0
        self.messages: list[str] = []

    def set_total(self, total: int | None) -> None:
        self.total = total

    def advance(self, n: int = 1) -> None:
        self.done += n

    def message(self, text: str) -> None:
        self.messages.append(text)


@pytest.fixture(autouse=True)
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Extraction folders go here, so a test can see that they are removed afterwards."""
    t = tmp_path / "system-tmp"
    t.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


def run(path: Path, tmp_path: Path, *, harness: SinkHarness | None = None, cursor: dict[str, Any] | None = None,
        progress: Any = None, **options: Any) -> tuple[SinkHarness, dict[str, Any], list[LedgerEntry]]:
    h = harness or make_sink(tmp_path / "store")
    conn = MediaConnector(MediaConfig(path=str(path), **options))
    new_cursor = conn.pull(PatientRef(), cursor, h.sink, progress or NullProgress())
    rows = h.entries()
    _assert_ledger_complete(h, rows)
    return h, json.loads(json.dumps(new_cursor)), rows


def _assert_ledger_complete(h: SinkHarness, rows: list[LedgerEntry]) -> None:
    for r in rows:
        if r.state == DONE:
            assert h.path(r).is_file(), r.key
        else:
            assert r.reason, f"{r.key}: {r.state} without a reason"
        r.key.encode("utf-8")  # keys are always storable text


def body(h: SinkHarness, r: LedgerEntry) -> Any:
    assert r.sha256
    return json.loads(h.blobs.path(r.sha256).read_bytes())


def by_key(rows: list[LedgerEntry]) -> dict[str, LedgerEntry]:
    return {r.key: r for r in rows}


def states(rows: list[LedgerEntry]) -> Counter[tuple[str, str]]:
    return Counter((r.kind, r.state) for r in rows)


# --- registry and check() ----------------------------------------------------------------------


def test_registered_under_the_entry_point_group() -> None:
    assert load_connector_class("media") is MediaConnector


def test_check_reports_counts_by_type_and_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text('{"resourceType": "Patient"}')
    (tmp_path / "d" / "b.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    (tmp_path / "d" / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    result = MediaConnector(MediaConfig(path=str(tmp_path / "d"))).check()
    assert result.ok
    assert result.details["files"] == 3
    assert result.details["types"] == {"json": 1, "pdf": 1, "unsupported": 1}
    missing = MediaConnector(MediaConfig(path=str(tmp_path / "nope"))).check()
    assert not missing.ok and "does not exist" in missing.details["error"]


# --- DICOM discs ---------------------------------------------------------------------------------


def _fileset_uids(dicomdir: Path) -> set[str]:
    """The SOP Instance UIDs a DICOMDIR's records reference, read straight from its records."""
    ds = pydicom.dcmread(dicomdir)
    return {str(r.ReferencedSOPInstanceUIDInFile) for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r}


def test_dicom_cd_every_referenced_instance_once_with_uids(shared_data: Path, tmp_path: Path) -> None:
    cd = shared_data / CD
    progress = CountingProgress()
    h, cursor, rows = run(cd, tmp_path, progress=progress)
    dicom = [r for r in rows if r.kind == "dicom"]
    assert {r.key for r in dicom} == _fileset_uids(cd / "DICOMDIR")
    assert all(r.state == DONE for r in dicom)
    for r in dicom:
        src = cd / r.meta["file"]
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        assert r.key == ds.SOPInstanceUID
        assert r.meta["study_uid"] == ds.StudyInstanceUID and r.meta["series_uid"] == ds.SeriesInstanceUID
        assert r.meta["dicomdir"] == "DICOMDIR"
        assert h.path(r).read_bytes() == src.read_bytes()  # bytes as they are on the disc
    # the other DICOMDIR encodings are directory files, not instances: skipped with a reason
    skipped = {r.key for r in rows if r.state == SKIPPED}
    assert {"file:DICOMDIR-bigEnd", "file:DICOMDIR-nopatient", "file:DICOMDIR-empty.dcm"} <= skipped
    n_files = sum(1 for p in cd.rglob("*") if p.is_file())
    assert progress.total == n_files and progress.done == n_files
    assert len(cursor["media"]["files"]) == n_files


@pytest.fixture()
def cd_copy(shared_data: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cd"
    shutil.copytree(shared_data / CD, dst)
    for p in dst.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dst


def test_dicomdir_pointing_at_a_missing_file_and_a_truncated_instance(cd_copy: Path, tmp_path: Path) -> None:
    uids = _fileset_uids(cd_copy / "DICOMDIR")
    missing = cd_copy / "98892003" / "MR2" / "4950"
    missing_uid = pydicom.dcmread(missing, stop_before_pixels=True).SOPInstanceUID
    missing.unlink()
    truncated = cd_copy / "77654033" / "CT2" / "17106"
    truncated_uid = pydicom.dcmread(truncated, stop_before_pixels=True).SOPInstanceUID
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 100])
    _, _, rows = run(cd_copy, tmp_path)
    keys = by_key(rows)
    gone = keys["file:98892003/MR2/4950"]
    assert (gone.kind, gone.state) == ("dicom", FAILED) and "missing" in str(gone.reason)
    broken = keys["file:77654033/CT2/17106"]
    assert (broken.kind, broken.state) == ("dicom", FAILED) and "truncated" in str(broken.reason)
    done = {r.key for r in rows if r.kind == "dicom" and r.state == DONE}
    assert done == uids - {missing_uid, truncated_uid}  # the rest of the disc is kept


def test_unreadable_dicomdir_falls_back_to_loose_files(cd_copy: Path, tmp_path: Path) -> None:
    uids = _fileset_uids(cd_copy / "DICOMDIR")
    shutil.copy(cd_copy / "DICOMDIR-nopatient", cd_copy / "DICOMDIR")
    _, _, rows = run(cd_copy, tmp_path)
    dd = by_key(rows)["file:DICOMDIR"]
    assert dd.state == FAILED and "unreadable DICOMDIR" in str(dd.reason)
    done = [r for r in rows if r.kind == "dicom" and r.state == DONE]
    assert {r.key for r in done} == uids
    assert all("dicomdir" not in r.meta for r in done)


def test_loose_dicom_with_and_without_preamble_and_broken_ones(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "loose"
    folder.mkdir()
    src = shared_data / "dicom/pydicom/test_files/CT_small.dcm"
    shutil.copy(src, folder / "IM0001")  # no extension
    ds = pydicom.dcmread(shared_data / "dicom/pydicom/test_files/MR_small.dcm")
    ds.preamble = None
    del ds.file_meta
    ds.save_as(folder / "raw-no-preamble", enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert (folder / "raw-no-preamble").read_bytes()[128:132] != b"DICM"
    (folder / "garbage.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    data = src.read_bytes()
    (folder / "cut.dcm").write_bytes(data[:20000])
    pixel_tell = pydicom.dcmread(src, defer_size=100).get_item(0x7FE00010, keep_deferred=True).value_tell
    (folder / "cut-at-pixels.dcm").write_bytes(data[: pixel_tell - 12])  # ends exactly before Pixel Data
    h, _, rows = run(folder, tmp_path)
    keys = by_key(rows)
    ct = pydicom.dcmread(src, stop_before_pixels=True)
    assert keys[ct.SOPInstanceUID].meta["file"] == "IM0001"
    raw = keys[ds.SOPInstanceUID]
    assert raw.state == DONE and raw.meta["part10"] is False
    assert h.path(raw).read_bytes() == (folder / "raw-no-preamble").read_bytes()
    for name in ("garbage.dcm", "cut.dcm", "cut-at-pixels.dcm"):
        r = keys[f"file:{name}"]
        assert (r.kind, r.state) == ("dicom", FAILED) and r.reason


def test_a_zipped_cd_inside_a_zip(shared_data: Path, tmp_path: Path, private_tmp: Path) -> None:
    cd = shared_data / CD
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        for p in sorted(cd.rglob("*")):
            if p.is_file():
                zf.write(p, f"CD/{p.relative_to(cd).as_posix()}")
    outer_dir = tmp_path / "download"
    outer_dir.mkdir()
    with zipfile.ZipFile(outer_dir / "portal.zip", "w") as zf:
        zf.write(inner, "disc/inner.zip")
        zf.writestr("notes/visit.txt", "Seen in clinic.")
    _, cursor, rows = run(outer_dir, tmp_path)
    dicom = [r for r in rows if r.kind == "dicom" and r.state == DONE]
    assert {r.key for r in dicom} == _fileset_uids(cd / "DICOMDIR")
    assert all(r.meta["file"].startswith("portal.zip!/disc/inner.zip!/CD/") for r in dicom)
    assert by_key(rows)["file:portal.zip!/notes/visit.txt"].kind == "binary"
    assert "portal.zip!/disc/inner.zip!/CD/DICOMDIR" in cursor["media"]["files"]
    assert list(private_tmp.iterdir()) == []  # extraction folders are removed


def test_a_zip_three_levels_deep_is_not_opened(tmp_path: Path) -> None:
    level3 = tmp_path / "l3.zip"
    with zipfile.ZipFile(level3, "w") as zf:
        zf.writestr("deep.txt", "deep")
    level2 = tmp_path / "l2.zip"
    with zipfile.ZipFile(level2, "w") as zf:
        zf.write(level3, "l3.zip")
    folder = tmp_path / "dl"
    folder.mkdir()
    with zipfile.ZipFile(folder / "l1.zip", "w") as zf:
        zf.write(level2, "l2.zip")
    _, _, rows = run(folder, tmp_path)
    r = by_key(rows)["file:l1.zip!/l2.zip!/l3.zip"]
    assert r.state == SKIPPED and "nested" in str(r.reason)


# --- FHIR JSON -----------------------------------------------------------------------------------


def _resources(rows: list[LedgerEntry]) -> list[LedgerEntry]:
    return [r for r in rows if r.kind == "resource" and r.state == DONE]


def test_synthea_bundles_every_entry_is_a_resource(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "synthea"
    folder.mkdir()
    srcs = sorted((shared_data / "fhir/synthea-r4-bundles").glob("*.json"))[:3]
    for p in srcs:
        shutil.copy(p, folder / p.name)
    h, _, rows = run(folder, tmp_path)
    res = _resources(rows)
    expected = sum(len(json.loads(p.read_bytes())["entry"]) for p in srcs)
    assert len(res) == expected
    sample = next(r for r in res if r.meta["file"] == srcs[0].name)
    doc = json.loads(srcs[0].read_bytes())
    index = int(sample.key.split("#/entry/")[1].split("/")[0])
    assert sample.key == f"file:{srcs[0].name}#/entry/{index}/resource"
    assert body(h, sample) == doc["entry"][index]["resource"]
    assert sample.meta["fullUrl"] == doc["entry"][index]["fullUrl"]
    assert sample.meta["bundle"] == f"{srcs[0].name}#" and sample.meta["bundle_type"] == doc["type"]


def test_all_shared_fhir_examples_are_accounted_for(shared_data: Path, tmp_path: Path) -> None:
    """IPS document bundles, mCODE, US Core, HL7 examples: every entry is a resource or a skip."""
    folder = tmp_path / "examples"
    folder.mkdir()
    for group in ("ips-examples", "mcode-examples", "us-core-examples", "hl7-r4-spec-examples"):
        if (shared_data / "fhir" / group).is_dir():
            shutil.copytree(shared_data / "fhir" / group, folder / group)
    _, _, rows = run(folder, tmp_path)
    assert not [r for r in rows if r.state == FAILED]
    expected = 0
    for p in sorted(folder.rglob("*.json")):
        expected += _count_leaves(json.loads(p.read_bytes()))
    accounted = [r for r in rows if r.kind in ("resource", "file")]
    assert len(accounted) == expected
    ips = [r for r in _resources(rows) if r.meta.get("bundle_type") == "document"]
    assert ips, "the IPS examples hold document bundles"
    first = min(ips, key=lambda r: r.key)
    assert first.key.endswith("#/entry/0/resource") and first.meta["resourceType"] == "Composition"


def _count_leaves(obj: Any) -> int:
    """Independent count of what should come out of one JSON document: resources + unusable entries."""
    if isinstance(obj, list):
        return sum(_count_leaves(o) for o in obj)
    if not isinstance(obj, dict) or obj.get("resourceType") != "Bundle":
        return 1
    entries = obj.get("entry") or []
    if not entries:
        return 1
    return sum(_count_leaves(e["resource"]) if "resource" in e else 1 for e in entries)


def test_nested_bundles_and_their_pointers(tmp_path: Path) -> None:
    inner = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111",
         "resource": {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}}},
        {"response": {"status": "404 Not Found"}},
    ]}
    outer = {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"resource": inner, "response": {"status": "200"}},
        {"fullUrl": "Patient/p1", "resource": {"resourceType": "Patient", "id": "p1"}},
        {"resource": {"noResourceType": True}},
    ]}
    folder = tmp_path / "n"
    folder.mkdir()
    (folder / "nested.json").write_text(json.dumps(outer))
    h, _, rows = run(folder, tmp_path)
    keys = by_key(rows)
    obs = keys["file:nested.json#/entry/0/resource/entry/0/resource"]
    assert obs.meta["bundle"] == "nested.json#/entry/0/resource" and obs.meta["bundle_type"] == "searchset"
    assert obs.meta["fullUrl"] == "urn:uuid:11111111-1111-1111-1111-111111111111"
    assert body(h, obs)["id"] == "o1"
    pat = keys["file:nested.json#/entry/1/resource"]
    assert pat.meta["bundle"] == "nested.json#" and pat.meta["bundle_type"] == "batch-response"
    assert "404" in str(keys["file:nested.json#/entry/0/resource/entry/1"].reason)
    assert "resourceType" in str(keys["file:nested.json#/entry/2/resource"].reason)
    assert len(rows) == 4  # the Bundles themselves are envelopes, not items


def test_bulk_ndjson_folder_line_by_line(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bulk"
    folder.mkdir()
    src = shared_data / "fhir/synthea-bulk-export-ndjson-10pt"
    for name in ("AllergyIntolerance.000.ndjson", "Patient.000.ndjson", "Device.000.ndjson", "log.ndjson"):
        shutil.copy(src / name, folder / name)
    h, _, rows = run(folder, tmp_path)
    for name in ("AllergyIntolerance.000.ndjson", "Patient.000.ndjson", "Device.000.ndjson"):
        lines = [ln for ln in (folder / name).read_bytes().splitlines() if ln.strip()]
        mine = [r for r in _resources(rows) if r.meta["file"] == name]
        assert len(mine) == len(lines)
        third = by_key(rows)[f"file:{name}#L3"]
        assert body(h, third) == json.loads(lines[2]) and third.meta["line"] == 3
    log_rows = [r for r in rows if r.key.startswith("file:log.ndjson#")]
    assert log_rows and all(r.state == SKIPPED and "resourceType" in str(r.reason) for r in log_rows)


def test_malformed_json_and_ndjson_lines_are_failed_and_the_rest_kept(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.json").write_text('{\n  "resourceType": "Patient",\n  "id": "x",,\n}')
    (folder / "good.json").write_text('{"resourceType": "Patient", "id": "ok"}')
    (folder / "mixed.ndjson").write_text('{"resourceType": "Observation", "id": "a"}\n{"resourceType": "Obs\n\n'
                                         '{"resourceType": "Observation", "id": "c"}\n')
    (folder / "lines.json").write_text('{"resourceType": "Condition", "id": "1"}\n'
                                       '{"resourceType": "Condition", "id": "2"}\n')
    (folder / "scalar.json").write_text('"just a string"')
    _, _, rows = run(folder, tmp_path)
    keys = by_key(rows)
    broken = keys["file:broken.json"]
    assert broken.state == FAILED and str(broken.reason).startswith("malformed JSON at line 3")
    assert "Patient" not in str(broken.reason)  # no content echoed
    assert keys["file:good.json#"].state == DONE
    assert keys["file:mixed.ndjson#L1"].state == DONE and keys["file:mixed.ndjson#L4"].state == DONE
    bad_line = keys["file:mixed.ndjson#L2"]
    assert bad_line.state == FAILED and str(bad_line.reason).startswith("malformed JSON at line 2")
    assert keys["file:lines.json#L1"].state == DONE and keys["file:lines.json#L2"].state == DONE
    assert keys["file:scalar.json"].state == SKIPPED


# --- documents ------------------------------------------------------------------------------------


def test_pdf_and_text_become_binary_plus_document_reference(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    (folder / "sub" / "report.pdf").write_bytes(pdf)
    (folder / "letter.txt").write_text("Dear colleague,\nplease see.\n")
    h, _, rows = run(folder, tmp_path)
    keys = by_key(rows)
    for rel, data, ctype in (("sub/report.pdf", pdf, "application/pdf"),
                             ("letter.txt", (folder / "letter.txt").read_bytes(), "text/plain")):
        b = keys[f"file:{rel}"]
        assert (b.kind, b.state, b.content_type) == ("binary", DONE, ctype)
        assert h.path(b).read_bytes() == data
        ref = keys[f"file:{rel}#docref"]
        doc = body(h, ref)
        DocumentReference.model_validate(doc)
        att = doc["content"][0]["attachment"]
        assert att["url"] == f"file:{rel}" and att["contentType"] == ctype and att["size"] == len(data)
        assert att["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()
        assert att["title"] == rel.rsplit("/", 1)[-1]
        assert doc["status"] == "current" and "subject" not in doc and "patient download" in doc["description"]
        assert ref.meta["file"] == rel


def test_ccda_samples_become_document_references(shared_data: Path, tmp_path: Path) -> None:
    h, _, rows = run(shared_data / "ccda", tmp_path)
    xmls = sorted((shared_data / "ccda").rglob("*.xml"))
    refs = [r for r in rows if r.key.endswith("#docref")]
    assert len(refs) == len(xmls)
    for r in refs:
        doc = body(h, r)
        DocumentReference.model_validate(doc)
        assert doc["type"]["coding"][0]["system"] == "http://loinc.org"
        assert doc["author"] and doc["description"]
        assert "date" in doc or "period" in doc.get("context", {})
        att = doc["content"][0]["attachment"]
        assert att["contentType"] == "application/xml" and doc["content"][0]["format"]["code"].startswith(
            "urn:hl7-org:sdwg:ccda-")
        binary = by_key(rows)[att["url"]]
        assert binary.kind == "binary" and binary.size == att["size"]


def test_unsupported_files_are_skipped_with_the_detected_type(tmp_path: Path) -> None:
    folder = tmp_path / "misc"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    (folder / "viewer.exe").write_bytes(b"MZ\x90\x00")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "letter.docx").write_bytes(b"PK\x03\x04 office")
    (folder / "index.html").write_text("<!DOCTYPE html><html><body>hi</body></html>")
    (folder / "fhir.xml").write_text('<Patient xmlns="http://hl7.org/fhir"><id value="x"/></Patient>')
    (folder / "empty.pdf").write_bytes(b"")
    _, _, rows = run(folder, tmp_path)
    reasons = {r.key: str(r.reason) for r in rows}
    assert all(r.state == SKIPPED for r in rows) and len(rows) == 7
    assert "JPEG" in reasons["file:photo.jpg"] and "executable" in reasons["file:viewer.exe"]
    assert "hidden" in reasons["file:.DS_Store"] and "office" in reasons["file:letter.docx"]
    assert "HTML" in reasons["file:index.html"] and "<Patient>" in reasons["file:fhir.xml"]
    assert "empty" in reasons["file:empty.pdf"]
    assert all(v.startswith("unsupported file type: ") for v in reasons.values())


def test_hostile_file_names_do_not_crash_and_keys_are_printable(tmp_path: Path) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    raw = os.fsencode(folder)
    odd = [b"scan-\xff\xfe.pdf", b"new\nline.txt", b"ctl\x01\x7f.json", b"x" * 250 + b".txt"]
    for name in odd:
        with open(raw + b"/" + name, "wb") as fp:
            fp.write(b"%PDF-1.4\n%%EOF\n" if name.endswith(b".pdf") else
                     b'{"resourceType": "Basic"}' if name.endswith(b".json") else b"text")
    os.symlink("/etc/passwd", folder / "link.txt")
    _, _, rows = run(folder, tmp_path)
    keys = by_key(rows)
    assert keys["file:scan-\\xff\\xfe.pdf"].state == DONE
    assert keys["file:new\\x0aline.txt"].state == DONE
    assert keys["file:ctl\\x01\\x7f.json#"].state == DONE
    long_keys = [k for k in keys if k.startswith("file:xxxx")]
    assert long_keys and all(len(k) < 300 for k in long_keys)
    link = keys["file:link.txt"]
    assert link.state == SKIPPED and "symbolic link" in str(link.reason)
    assert all(r.sha256 != hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() for r in rows)


# --- hostile archives inside a download ---------------------------------------------------------


def test_hostile_zip_members_are_failed_and_nothing_escapes(tmp_path: Path, private_tmp: Path) -> None:
    folder = tmp_path / "dl"
    folder.mkdir()
    with zipfile.ZipFile(folder / "portal.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("../evil.json", '{"resourceType": "Patient"}')
        zf.writestr("/abs/evil.txt", "absolute")
        link = zipfile.ZipInfo("link.txt")
        link.create_system = 3
        link.external_attr = (0o120777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("records/patient.json", '{"resourceType": "Patient", "id": "p"}')
        with zf.open("bomb.bin", "w") as w:
            for _ in range(100):
                w.write(bytes(MiB))
    before = sorted(p.name for p in tmp_path.iterdir())
    _, _, rows = run(folder, tmp_path)
    keys = by_key(rows)
    assert keys["file:portal.zip!/records/patient.json#"].state == DONE
    for member, error in (("../evil.json", "UnsafePath"), ("/abs/evil.txt", "UnsafePath"),
                          ("link.txt", "UnsafePath"), ("bomb.bin", "InputTooLarge")):
        r = keys[f"file:portal.zip!/{member}"]
        assert r.state == FAILED and r.meta["error"] == error and r.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "store"})
    assert not (tmp_path / "evil.json").exists() and not Path("/abs/evil.txt").exists()
    assert list(private_tmp.iterdir()) == []


def test_archive_limits_reject_the_whole_zip_and_keep_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "dl"
    folder.mkdir()
    with zipfile.ZipFile(folder / "many.zip", "w") as zf:
        for i in range(12):
            zf.writestr(f"n{i}.txt", "note")
    (folder / "kept.txt").write_text("kept")
    _, _, rows = run(folder, tmp_path, max_files=10)
    keys = by_key(rows)
    assert keys["file:many.zip"].state == FAILED and "limit of 10" in str(keys["file:many.zip"].reason)
    assert keys["file:kept.txt"].state == DONE
    assert not any(k.startswith("file:many.zip!/") for k in keys)


# --- cursor, re-pull, conformance -------------------------------------------------------------------


def test_re_pull_emits_only_new_and_changed_files(tmp_path: Path) -> None:
    folder = tmp_path / "dl"
    folder.mkdir()
    (folder / "a.json").write_text('{"resourceType": "Patient", "id": "a"}')
    (folder / "b.txt").write_text("first")
    with zipfile.ZipFile(folder / "c.zip", "w") as zf:
        zf.writestr("c1.txt", "one")
        zf.writestr("c2.txt", "two")
    h, cursor, rows = run(folder, tmp_path)
    assert set(cursor["media"]["files"]) == {"a.json", "b.txt", "c.zip", "c.zip!/c1.txt", "c.zip!/c2.txt"}
    n_rows = len(rows)

    sink = h.new_sink()
    _, cursor2, rows2 = run(folder, tmp_path, harness=h, cursor=cursor)
    assert sink.counts == {DONE: 0, FAILED: 0, SKIPPED: 0}
    assert cursor2 == cursor and len(rows2) == n_rows

    (folder / "b.txt").write_text("second")
    (folder / "d.txt").write_text("new")
    with zipfile.ZipFile(folder / "c.zip", "w") as zf:
        zf.writestr("c1.txt", "one")
        zf.writestr("c2.txt", "two, edited")
    sink = h.new_sink()
    _, cursor3, rows3 = run(folder, tmp_path, harness=h, cursor=cursor2)
    emitted = {r.key for r in rows3 if r.attempts > 1 or r.key not in by_key(rows2)}
    assert emitted == {"file:b.txt", "file:b.txt#docref", "file:d.txt", "file:d.txt#docref",
                       "file:c.zip!/c2.txt", "file:c.zip!/c2.txt#docref"}
    assert sink.counts[DONE] == 6
    assert cursor3["media"]["files"]["b.txt"] != cursor2["media"]["files"]["b.txt"]


def test_conformance_suite(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "dl"
    folder.mkdir()
    shutil.copytree(shared_data / CD, folder / "cd")
    shutil.copy(shared_data / "fhir/ips-examples/Bundle-bundle-minimal.json", folder / "ips.json")
    (folder / "junk.bin").write_bytes(b"\x00\x01\x02")
    report = assert_connector_conforms(lambda: MediaConnector(MediaConfig(path=str(folder))), PatientRef(),
                                       tmp_path / "conf", kind="media", min_done=31)
    assert report.second_counts.get(DONE, 0) == 0


def test_the_projects_synthetic_download_is_fully_taken(tmp_path: Path) -> None:
    from fixtures.generate import generate_download

    info = generate_download(tmp_path / "download")
    _, _, rows = run(tmp_path / "download", tmp_path)
    dicom = [r for r in rows if r.kind == "dicom" and r.state == DONE]
    assert len(dicom) == info.dicom_instances
    assert {r.meta["study_uid"] for r in dicom} == set(info.dicom_study_uids)
    counts = Counter(r.meta["resourceType"] for r in _resources(rows) if not r.meta.get("derived"))
    assert dict(counts) == info.resource_counts
    not_done = [r for r in rows if r.state != DONE]
    assert [r.key for r in not_done] == ["file:portal-b/photo.jpg"]
    assert any(r.key == "file:portal-b/consult-note.xml#docref" for r in rows)


def test_archives_are_unpacked_only_inside_the_given_tmp_dir(
    tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    download = tmp_path / "download"
    download.mkdir()
    with zipfile.ZipFile(download / "portal.zip", "w") as zf:
        zf.writestr("notes/visit.txt", "Seen in clinic.")
    case_tmp = tmp_path / "case" / "tmp"
    seen: list[Path] = []
    real_extract = media_module.extract_zip

    def spy(archive: Path, dest: Path, *args: Any, **kwargs: Any) -> Any:
        seen.append(dest)
        return real_extract(archive, dest, *args, **kwargs)

    monkeypatch.setattr(media_module, "extract_zip", spy)
    _, _, rows = run(download, tmp_path, tmp_dir=str(case_tmp))
    assert by_key(rows)["file:portal.zip!/notes/visit.txt"].state == DONE
    assert seen and all(case_tmp in d.parents for d in seen)
    assert list(private_tmp.iterdir()) == []  # nothing went to the system temp dir
    assert list(case_tmp.iterdir()) == []  # and the extraction folder is gone afterwards
