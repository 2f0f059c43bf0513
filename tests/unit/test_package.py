"""The consultant package: written from a hand-built record with real DICOM files, then verified."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from aggregator.blobs import BlobStore
from aggregator.errors import PackageError
from aggregator.model import CaseInfo, DocumentFile, ImageRef, NormalizedRecord, Quarantined, SourceInfo
from aggregator.package import verify_package, write_package

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
PATHOLOGY_TEXT = "SURGICAL PATHOLOGY REPORT\nDiagnosis: invasive ductal carcinoma, grade 2.\nMargins negative."
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


def _testfile(name: str) -> str:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return path


def _id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def _ref(n: int) -> dict[str, str]:
    return {"reference": f"urn:uuid:{_id(n)}"}


def _image(blobs: BlobStore, path: Path | str, source_id: int = 1) -> ImageRef:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    ref = blobs.put_file(Path(path))
    return ImageRef(
        sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), sha256=ref.sha256, size=ref.size,
        modality=str(ds.get("Modality", "")), patient_id=str(ds.get("PatientID", "")), source_id=source_id)


def build_record(blobs: BlobStore, dicom_files: list[Path | str]) -> NormalizedRecord:
    pdf = blobs.put_bytes(PDF)
    txt = blobs.put_bytes(PATHOLOGY_TEXT.encode())
    note = blobs.put_bytes(b"Progress note: patient seen in clinic.\n")
    images = [_image(blobs, f) for f in dicom_files]
    ct = images[0]
    lab_cat = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory"}]}]
    hgb = {"coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"}]}
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": _id(1), "name": [{"family": "Doe", "given": ["Jane"]}],
         "gender": "female", "birthDate": "1970-01-01", "identifier": [{"system": "urn:mrn", "value": "MRN123"}]},
        {"resourceType": "Condition", "id": _id(2), "subject": _ref(1),
         "code": {"text": "Malignant neoplasm of breast"}, "recordedDate": "2024-01-10",
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                        "code": "active"}]}},
        {"resourceType": "DiagnosticReport", "id": _id(3), "status": "final", "subject": _ref(1),
         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "SP"}]}],
         "code": {"coding": [{"system": "http://loinc.org", "code": "60568-3"}], "text": "Surgical pathology"},
         "effectiveDateTime": "2024-01-05", "conclusion": "Invasive ductal carcinoma",
         "presentedForm": [{"contentType": "application/pdf", "url": "documents/DOC0001.PDF", "title": "Path PDF"},
                           {"contentType": "text/plain", "url": "documents/DOC0002.TXT"}]},
        {"resourceType": "ImagingStudy", "id": _id(4), "status": "available", "subject": _ref(1),
         "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{ct.study_instance_uid}"}],
         "started": "2004-01-19T07:06:01Z", "numberOfSeries": 1, "numberOfInstances": 1, "description": "CT",
         "series": [{"uid": ct.series_instance_uid, "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                                                                 "code": "CT"},
                     "instance": [{"uid": ct.sop_instance_uid, "sopClass": {"code": ct.sop_class_uid}}]}]},
        {"resourceType": "DiagnosticReport", "id": _id(5), "status": "final", "subject": _ref(1),
         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
         "code": {"text": "CT chest"}, "effectiveDateTime": "2024-01-03", "conclusion": "Nodule 8 mm",
         "imagingStudy": [_ref(4)]},
        {"resourceType": "Observation", "id": _id(6), "status": "final", "subject": _ref(1), "category": lab_cat,
         "code": hgb, "effectiveDateTime": "2023-12-01", "valueQuantity": {"value": 11.1, "unit": "g/dL"}},
        {"resourceType": "Observation", "id": _id(7), "status": "final", "subject": _ref(1), "category": lab_cat,
         "code": hgb, "effectiveDateTime": "2024-01-02", "valueQuantity": {"value": 12.7, "unit": "g/dL"}},
        {"resourceType": "MedicationRequest", "id": _id(8), "status": "active", "intent": "order",
         "subject": _ref(1), "medicationCodeableConcept": {"text": "Tamoxifen 20 mg"}, "authoredOn": "2024-01-11"},
        {"resourceType": "AllergyIntolerance", "id": _id(9), "patient": _ref(1), "code": {"text": "Penicillin"}},
        {"resourceType": "DocumentReference", "id": _id(10), "status": "current", "subject": _ref(1),
         "type": {"text": "Progress note"}, "date": "2024-01-12T10:00:00Z",
         "content": [{"attachment": {"contentType": "text/plain", "url": "documents/DOC0003.TXT"}}]},
        {"resourceType": "Provenance", "id": _id(11), "target": [_ref(3)], "recorded": "2024-02-01T00:00:00Z",
         "agent": [{"who": {"display": "source 1"}}]},
    ]
    documents = [
        DocumentFile("documents/DOC0001.PDF", pdf.sha256, pdf.size, "application/pdf", "Path PDF",
                     f"DiagnosticReport/{_id(3)}"),
        DocumentFile("documents/DOC0002.TXT", txt.sha256, txt.size, "text/plain", "", f"DiagnosticReport/{_id(3)}"),
        DocumentFile("documents/DOC0003.TXT", note.sha256, note.size, "text/plain", "Progress note",
                     f"DocumentReference/{_id(10)}"),
    ]
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}
    return NormalizedRecord(bundle=bundle, documents=documents, images=images, patient_ref=f"Patient/{_id(1)}",
                            quarantine=[Quarantined(1, "resource", "Observation/bad", "invalid: missing status")])


CASE = CaseInfo(id="case-1", checklist="oncology", case_date="2024-02-01")
SOURCES = [SourceInfo(id=1, kind="media", label="download.zip", method="media", pulled_at="2024-02-01T09:00:00Z")]
GAPS: dict[str, Any] = {
    "schema": "gap-report/1", "score": 0.5,
    "items": [
        {"id": "pathology", "title": "Pathology report with full text", "status": "complete", "gaps": []},
        {"id": "imaging", "title": "Images for each radiology report", "status": "missing",
         "gaps": [{"reason": "images-not-retrieved", "detail": "MR study not pulled",
                   "next_action": "Ask the PACS for the study"}]},
        {"title": "an item with missing keys"},
    ],
}


@pytest.fixture()
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture()
def record(blobs: BlobStore) -> NormalizedRecord:
    return build_record(blobs, [_testfile("CT_small.dcm"), _testfile("MR_small.dcm")])


@pytest.fixture()
def package(tmp_path: Path, record: NormalizedRecord, blobs: BlobStore) -> Path:
    return write_package(tmp_path / "out" / "pkg", CASE, record, GAPS, blobs, SOURCES)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_package_layout_and_verification(package: Path, record: NormalizedRecord, blobs: BlobStore) -> None:
    for name in ("INDEX.HTM", "README.TXT", "summary.html", "fhir/bundle.json", "fhir/gap-report.json",
                 "DICOMDIR", "IHE_XDM/SUBSET01/METADATA.XML", "manifest.json"):
        assert (package / name).is_file(), name
    for doc in record.documents:
        assert (package / doc.path).read_bytes() == blobs.read_bytes(doc.sha256)
    manifest = json.loads((package / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads((SCHEMAS / "manifest.schema.json").read_text()))
    listed = [f["path"] for f in manifest["files"]]
    assert listed == sorted(listed)
    assert set(listed) == set(_tree_bytes(package)) - {"manifest.json"}
    assert manifest["case"] == "case-1" and manifest["created"] == "2024-02-01T00:00:00Z"
    assert json.loads((package / "fhir/gap-report.json").read_text()) == GAPS
    assert verify_package(package) == []


def test_bundle_is_a_valid_r4_document(package: Path, record: NormalizedRecord) -> None:
    bundle = json.loads((package / "fhir/bundle.json").read_text())
    Bundle.model_validate(bundle)  # the whole document, every resource, with R4B
    assert bundle["type"] == "document" and bundle["timestamp"] == "2024-02-01T00:00:00Z"
    assert bundle["identifier"]["value"].startswith("urn:uuid:")
    comp = bundle["entry"][0]["resource"]
    assert comp["resourceType"] == "Composition" and comp["subject"]["reference"] == f"urn:uuid:{_id(1)}"
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    # every original resource is there, with its fullUrl, and every section entry resolves
    assert {e["fullUrl"] for e in record.bundle["entry"]} <= full_urls
    sections = {s["title"]: [x["reference"] for x in s.get("entry", [])] for s in comp["section"]}
    for refs in sections.values():
        assert set(refs) <= full_urls
    assert sections["Pathology reports"] == [f"urn:uuid:{_id(3)}"]
    assert f"urn:uuid:{_id(5)}" in sections["Imaging: reports and studies"]
    assert f"urn:uuid:{_id(4)}" in sections["Imaging: reports and studies"]
    assert sorted(sections["Laboratory and other results"]) == [f"urn:uuid:{_id(6)}", f"urn:uuid:{_id(7)}"]
    assert sections["Problem list"] == [f"urn:uuid:{_id(2)}"]
    assert sections["Medications"] and sections["Allergies and intolerances"]
    assert sections["Clinical notes and documents"] == [f"urn:uuid:{_id(10)}"]
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types.count("Provenance") == 2  # the source's and the package's own


def test_tampering_is_named(package: Path) -> None:
    victim = package / "documents/DOC0001.PDF"
    data = bytearray(victim.read_bytes())
    data[5] ^= 0x01
    victim.write_bytes(bytes(data))
    (package / "README.TXT").unlink()
    (package / "extra.txt").write_text("not in the manifest")
    (package / "DICOM/ST000001/SE000001/IM000001").write_bytes(b"short")
    problems = dict(verify_package(package))
    assert problems == {
        "documents/DOC0001.PDF": "altered (sha256 mismatch)",
        "README.TXT": "missing",
        "extra.txt": "extra file not in manifest",
        "DICOM/ST000001/SE000001/IM000001": "size mismatch",
    }


def test_broken_manifest_is_reported(package: Path) -> None:
    (package / "manifest.json").write_text("{not json")
    assert verify_package(package) == [("manifest.json", "not valid JSON (JSONDecodeError)")]
    manifest = {"schema": "package-manifest/1", "files": [{"path": "../escape", "size": 1, "sha256": "0" * 64}]}
    (package / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_package(package)
    assert any(f == "manifest.json" and "schema" in p for f, p in problems)
    assert ("../escape", "unsafe or reserved path listed in the manifest") in problems
    (package / "manifest.json").unlink()
    assert ("manifest.json", "missing") in verify_package(package)


def test_same_inputs_give_identical_packages(tmp_path: Path, record: NormalizedRecord, blobs: BlobStore,
                                             package: Path) -> None:
    again = write_package(tmp_path / "again", CASE, record, GAPS, blobs, SOURCES)
    assert _tree_bytes(again) == _tree_bytes(package)
    za = write_package(tmp_path / "a", CASE, record, GAPS, blobs, SOURCES, as_zip=True)
    zb = write_package(tmp_path / "b.zip", CASE, record, GAPS, blobs, SOURCES, as_zip=True)
    assert za.name == "a.zip" and zb.name == "b.zip"
    assert za.read_bytes() == zb.read_bytes()
    with zipfile.ZipFile(za) as z:
        names = z.namelist()
        assert names == sorted(names)
        assert {n: z.read(n) for n in names} == _tree_bytes(package)
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert verify_package(za) == []
    # no temporary folders left next to the outputs
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_zip_streams_blobs_and_stops_on_a_damaged_one(tmp_path: Path, record: NormalizedRecord,
                                                      blobs: BlobStore) -> None:
    """A zip takes documents and instances straight from the blob store, hashing them on the way:
    a blob whose bytes no longer match its address stops the package (the manifest already
    promised the address), and nothing is left behind, staged or half-written."""
    scratch = tmp_path / "case" / "tmp"
    z = write_package(tmp_path / "ok.zip", CASE, record, GAPS, blobs, SOURCES, as_zip=True, scratch=scratch)
    assert verify_package(z) == [] and list(scratch.iterdir()) == []
    doc = record.documents[0]
    path = blobs.path(doc.sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="no longer match"):
        write_package(tmp_path / "bad.zip", CASE, record, GAPS, blobs, SOURCES, as_zip=True, scratch=scratch)
    assert not (tmp_path / "bad.zip").exists()
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _rezip(src: Path, dest: Path, change: dict[str, bytes | None]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            if info.filename in change:
                if change[info.filename] is not None:
                    zout.writestr(info.filename, change[info.filename])  # type: ignore[arg-type]
                continue
            zout.writestr(info, zin.read(info))
        for name, data in change.items():
            if name not in zin.namelist() and data is not None:
                zout.writestr(name, data)


def test_zip_tampering_and_path_escapes(tmp_path: Path, record: NormalizedRecord, blobs: BlobStore) -> None:
    z = write_package(tmp_path / "p.zip", CASE, record, GAPS, blobs, SOURCES, as_zip=True)
    bad = tmp_path / "bad.zip"
    _rezip(z, bad, {"summary.html": b"<html>changed</html>", "INDEX.HTM": None, "../../evil.txt": b"x",
                    "/abs.txt": b"y"})
    problems = dict(verify_package(bad))
    assert problems["summary.html"] in ("altered (sha256 mismatch)", "size mismatch")
    assert problems["INDEX.HTM"] == "missing"
    assert "escape" in problems["../../evil.txt"] and "escape" in problems["/abs.txt"]
    assert not (tmp_path.parent / "evil.txt").exists()
    # a package zipped as a folder (pkg/...) is accepted
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(z) as zin, zipfile.ZipFile(nested, "w") as zout:
        for info in zin.infolist():
            zout.writestr("pkg/" + info.filename, zin.read(info))
    assert verify_package(nested) == []
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04 not really")
    assert verify_package(garbage) and verify_package(tmp_path / "nothing-here")


def test_dicomdir_is_readable_and_instances_are_untouched(package: Path, record: NormalizedRecord,
                                                          blobs: BlobStore) -> None:
    fs = FileSet(pydicom.dcmread(package / "DICOMDIR"))
    assert len(fs) == len(record.images)
    by_sop = {i.sop_instance_uid: i for i in record.images}
    for inst in fs:
        rel = Path(inst.path).relative_to(package)
        assert all(len(p) <= 8 and re.fullmatch(r"[A-Z0-9_]+", p) for p in rel.parts), rel
        img = by_sop[inst.SOPInstanceUID]
        assert Path(inst.path).read_bytes() == blobs.read_bytes(img.sha256)
        assert inst.ReferencedTransferSyntaxUIDInFile == img.transfer_syntax_uid
    assert len(fs.find(Modality="CT")) == 1 and len(fs.find(Modality="MR")) == 1


def test_dicomdir_record_links_point_at_records(package: Path) -> None:
    """The DICOMDIR is assembled from records encoded one by one, its links set in the bytes: every
    offset must land on a record as pydicom parses the file, and our own walk must agree."""
    from aggregator.package.dicomdir import _item_offsets

    data = (package / "DICOMDIR").read_bytes()
    ds = pydicom.dcmread(package / "DICOMDIR")
    tells = [int(item.seq_item_tell) for item in ds.DirectoryRecordSequence]
    assert _item_offsets(data) == tells and len(tells) > 4
    links = {ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity,
             ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity}
    for item in ds.DirectoryRecordSequence:
        links |= {item.OffsetOfTheNextDirectoryRecord, item.OffsetOfReferencedLowerLevelDirectoryEntity}
    assert links - {0} <= set(tells) and len(links - {0}) >= len(tells) - 1


def test_dicomdir_passes_dcmdump(package: Path) -> None:
    if not shutil.which("dcmdump"):
        pytest.skip("DCMTK dcmdump is not installed (apt-get install dcmtk)")
    r = subprocess.run(["dcmdump", "-E", str(package / "DICOMDIR")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("(0004,1430)") == 2 * 4  # PATIENT, STUDY, SERIES, IMAGE for each of the two files
    assert "W:" not in r.stderr and "E:" not in r.stderr


def test_summary_is_self_contained_and_complete(package: Path) -> None:
    html = (package / "summary.html").read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert "invasive ductal carcinoma, grade 2." in html  # pathology full text inlined
    assert "Doe" in html and "MRN123" in html
    # the latest hemoglobin in the table, every value in its history and its trend chart
    assert re.search(r'<td class="num">12\.7</td>', html) and not re.search(r'<td class="num">11\.1</td>', html)
    assert "<strong>11.1</strong>" in html and 'data-value="11.1"' in html
    assert "Tamoxifen 20 mg" in html and "Penicillin" in html
    assert "Ask the PACS for the study" in html and "an item with missing keys" in html
    assert "invalid: missing status" in html
    for href in re.findall(r'href="([^"#]+)"', html):
        assert (package / href).is_file(), href
    index = (package / "INDEX.HTM").read_text()
    for href in re.findall(r'href="([^"#]+)"', index):
        assert (package / href).is_file(), href
    (package / "README.TXT").read_bytes().decode("ascii")


def test_xdm_metadata_describes_each_document(package: Path, record: NormalizedRecord) -> None:
    rim = "{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}"
    meta = package / "IHE_XDM/SUBSET01/METADATA.XML"
    root = ET.parse(meta).getroot()
    assert root.tag == "{urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0}SubmitObjectsRequest"
    docs = root.findall(f".//{rim}ExtrinsicObject")
    assert len(docs) == len(record.documents)
    for eo in docs:
        slots = {s.get("name"): s.find(f"{rim}ValueList/{rim}Value").text for s in eo.findall(f"{rim}Slot")}  # type: ignore[union-attr]
        target = (meta.parent / str(slots["URI"])).resolve()
        assert target.is_file() and target.is_relative_to(package.resolve())
        data = target.read_bytes()
        assert slots["hash"] == hashlib.sha1(data).hexdigest() and slots["size"] == str(len(data))
        assert eo.get("mimeType")
    assert len(root.findall(f".//{rim}RegistryPackage")) == 1
    assert len(root.findall(f".//{rim}Association")) == len(record.documents)


def test_xdm_metadata_is_written_exactly_as_elementtree_serialises_it(tmp_path: Path, blobs: BlobStore) -> None:
    """METADATA.XML is written as text, one entry at a time (flat memory at 100k documents); it
    must stay byte for byte what ElementTree makes of the same tree, escapes included."""
    from aggregator.package.xdm import metadata_xml, write_metadata_xml

    ref = blobs.put_bytes(b"note")
    docs = [DocumentFile("documents/DOC0001.TXT", ref.sha256, ref.size, "text/plain", 'a & <b> "q"\n\tx\r'),
            DocumentFile("documents/DOC0002.TXT", ref.sha256, ref.size, None, None),
            DocumentFile("documents/DOC0003.TXT", ref.sha256, ref.size, "", "\u00e9\u6f22")]
    for documents in (docs, []):
        data = metadata_xml(documents, blobs, case_id='c&<"1', timestamp="2026-01-02T03:04:05Z", seed="s")
        ET.register_namespace("lcm", "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0")
        ET.register_namespace("rim", "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0")
        root = ET.fromstring(data)
        for el in root.iter():  # drop the indentation, then let ElementTree indent it again
            if len(el):
                el.text = None
            el.tail = None
        ET.indent(root)
        assert ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n" == data
        assert len(root.findall(".//{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}ExtrinsicObject")) == len(documents)
    out = tmp_path / "M.XML"
    write_metadata_xml(out, docs, blobs, case_id="c", timestamp="2026-01-02T03:04:05Z", seed="s")
    assert out.read_bytes() == metadata_xml(docs, blobs, case_id="c", timestamp="2026-01-02T03:04:05Z", seed="s")


def test_replaces_a_previous_package_but_not_other_folders(tmp_path: Path, record: NormalizedRecord,
                                                           blobs: BlobStore, package: Path) -> None:
    (package / "stale.txt").write_text("left over")
    again = write_package(package, CASE, record, GAPS, blobs, SOURCES)
    assert not (again / "stale.txt").exists() and verify_package(again) == []
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.doc").write_text("mine")
    with pytest.raises(PackageError):
        write_package(precious, CASE, record, GAPS, blobs, SOURCES)
    assert (precious / "thesis.doc").read_text() == "mine"
    not_a_zip = tmp_path / "x.zip"
    not_a_zip.write_text("mine")
    with pytest.raises(PackageError):
        write_package(not_a_zip, CASE, record, GAPS, blobs, SOURCES, as_zip=True)
    assert not_a_zip.read_text() == "mine"


@pytest.mark.parametrize("bad", ["documents/../../evil.pdf", "/etc/evil.pdf", "elsewhere/x.pdf", "documents/a\x00b"])
def test_hostile_document_paths_are_refused(tmp_path: Path, record: NormalizedRecord, blobs: BlobStore,
                                            bad: str) -> None:
    d = record.documents[0]
    record.documents.append(DocumentFile(bad, d.sha256, d.size, d.content_type))
    with pytest.raises(PackageError) as err:
        write_package(tmp_path / "out" / "pkg", CASE, record, GAPS, blobs, SOURCES)
    assert "documents/" in str(err.value)
    assert not (tmp_path / "evil.pdf").exists() and not (tmp_path / "out" / "pkg").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_missing_blob_is_a_clear_error(tmp_path: Path, record: NormalizedRecord, blobs: BlobStore) -> None:
    blobs.path(record.images[0].sha256).unlink()
    with pytest.raises(PackageError) as err:
        write_package(tmp_path / "pkg", CASE, record, GAPS, blobs, SOURCES)
    assert record.images[0].sop_instance_uid in str(err.value)


def test_empty_record_still_makes_a_valid_package(tmp_path: Path, blobs: BlobStore) -> None:
    record = NormalizedRecord(bundle={"resourceType": "Bundle", "type": "collection", "entry": []})
    pkg = write_package(tmp_path / "pkg", CaseInfo(id="empty", checklist="general"), record, {}, blobs, [])
    assert verify_package(pkg) == []
    Bundle.model_validate(json.loads((pkg / "fhir/bundle.json").read_text()))
    assert len(FileSet(pydicom.dcmread(pkg / "DICOMDIR"))) == 0


def test_real_dicom_cd_goes_into_the_package(shared_data: Path, tmp_path: Path, blobs: BlobStore) -> None:
    cd = shared_data / "dicom" / "cd-dicomdir-3-patients"
    files = [p for p in sorted(cd.rglob("*")) if p.is_file() and p.parent != cd]
    record = build_record(blobs, [Path(_testfile("CT_small.dcm")), *files])
    pkg = write_package(tmp_path / "pkg", CASE, record, GAPS, blobs, SOURCES)
    assert verify_package(pkg) == []
    fs = FileSet(pydicom.dcmread(pkg / "DICOMDIR"))
    assert len(fs) == len(record.images) == len(files) + 1
    assert {i.SOPInstanceUID for i in fs} == {i.sop_instance_uid for i in record.images}
    for inst in fs:
        assert hashlib.sha256(Path(inst.path).read_bytes()).hexdigest() in {i.sha256 for i in record.images}
    patient_ids = {str(pydicom.dcmread(f, stop_before_pixels=True).PatientID)
                   for f in [Path(_testfile("CT_small.dcm")), *files]}
    assert sorted(fs.find_values("PatientID")) == sorted(patient_ids)


def test_summary_and_document_read_references_both_ways(tmp_path: Path, blobs: BlobStore) -> None:
    """The summary keeps rows, not resources: references from cards and medication rows are looked
    up whether they point back or forward in the bundle; ties in a lab's dates go to the later value;
    the document's sections list their resources in bundle order."""
    lab_cat = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory"}]}]
    glu = {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]}
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": _id(1)},
        {"resourceType": "MedicationRequest", "id": _id(2), "status": "active", "intent": "order",
         "subject": _ref(1), "medicationReference": _ref(3), "authoredOn": "2024-01-11"},
        {"resourceType": "Medication", "id": _id(3), "code": {"text": "Letrozole 2.5 mg"}},
        {"resourceType": "Observation", "id": _id(4), "status": "final", "category": lab_cat, "code": glu,
         "effectiveDateTime": "2024-01-02", "valueQuantity": {"value": 5.5, "unit": "mmol/L"}},
        {"resourceType": "DiagnosticReport", "id": _id(5), "status": "final", "subject": _ref(1),
         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
         "code": {"text": "CT chest"}, "effectiveDateTime": "2024-01-03", "result": [_ref(6), _ref(4)]},
        {"resourceType": "Observation", "id": _id(6), "status": "final", "code": {"text": "Nodule size"},
         "effectiveDateTime": "2024-01-03", "valueQuantity": {"value": 8, "unit": "mm"}},
        {"resourceType": "Observation", "id": _id(7), "status": "final", "category": lab_cat, "code": glu,
         "effectiveDateTime": "2024-01-02", "valueQuantity": {"value": 6.25, "unit": "mmol/L"}},
        {"resourceType": "Provenance", "id": _id(8), "target": [_ref(n) for n in range(1, 8)],
         "recorded": "2024-02-01T00:00:00Z", "agent": [{"who": {"display": "source 1"}}]},
    ]
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}
    record = NormalizedRecord(bundle=bundle, patient_ref=f"Patient/{_id(1)}")
    pkg = write_package(tmp_path / "pkg", CASE, record, GAPS, blobs, SOURCES)
    assert verify_package(pkg) == []
    html = (pkg / "summary.html").read_text()
    assert "Letrozole 2.5 mg" in html  # a medication defined after the request
    assert "<p>Nodule size: 8 mm</p>" in html and "<p>Glucose: 5.5 mmol/L</p>" in html  # forward and back
    labs = html[html.index('id="labs"'):html.index('id="vitals"')]
    # a tie in dates goes to the later value; both are listed, with their times unknown
    assert '<td class="num">6.25</td>' in labs and "<strong>5.5</strong>" in labs and "2 values" in labs
    doc = json.loads((pkg / "fhir/bundle.json").read_text())
    Bundle.model_validate(doc)
    sections = {s["title"]: [e["reference"] for e in s.get("entry", [])]
                for s in doc["entry"][0]["resource"]["section"]}
    assert sections["Laboratory and other results"] == [f"urn:uuid:{_id(n)}" for n in (4, 6, 7)]
    assert sections["Imaging: reports and studies"] == [f"urn:uuid:{_id(5)}"]
    assert sections["Medications"] == [f"urn:uuid:{_id(2)}"]
    assert sections["Problem list"] == []
