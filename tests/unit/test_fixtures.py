"""The synthetic patient generator: deterministic, valid FHIR R4B, readable DICOM, twins that differ once."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydicom import dcmread
from pydicom.fileset import FileSet

from fixtures import (
    CASE_DATE,
    VARIANTS,
    DownloadInfo,
    generate_ct_study,
    generate_download,
    generate_multi_patient_dicom,
    generate_zip,
)
from fixtures.pdf import layout_lines, text_pdf

HL7 = "{urn:hl7-org:v3}"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DownloadInfo]:
    base = tmp_path_factory.mktemp("downloads")
    return {v: generate_download(base / v, variant=v) for v in VARIANTS}


def _sha(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _bundle(info: DownloadInfo) -> dict[str, Any]:
    return json.loads((info.root / "portal-a/record.json").read_text("utf-8"))


def _ndjson(info: DownloadInfo) -> list[dict[str, Any]]:
    lines = (info.root / "portal-b/labs.ndjson").read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _resources(info: DownloadInfo) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {("a", e["resource"]["resourceType"], e["resource"]["id"]): e["resource"] for e in _bundle(info)["entry"]}
    out.update({("b", r["resourceType"], r["id"]): r for r in _ndjson(info)})
    return out


def _diff(info: DownloadInfo, twin: DownloadInfo) -> tuple[set[Any], set[Any], set[Any]]:
    """(keys only in ``info``, keys only in ``twin``, keys present in both but different)."""
    a, b = _resources(info), _resources(twin)
    changed = {k for k in a.keys() & b.keys() if a[k] != b[k]}
    return a.keys() - b.keys(), b.keys() - a.keys(), changed


def _text(attachment: dict[str, Any]) -> str:
    return base64.b64decode(attachment["data"]).decode("utf-8")


# --------------------------------------------------------------------------- determinism


def test_same_call_gives_byte_identical_files(tmp_path: Path, downloads: dict[str, DownloadInfo]) -> None:
    again = generate_download(tmp_path / "again")
    first = _sha(downloads["complete"].root)
    assert first == _sha(again.root)
    assert len(first) == len(downloads["complete"].files) > 10


def test_another_seed_gives_another_patient_record(tmp_path: Path, downloads: dict[str, DownloadInfo]) -> None:
    other = generate_download(tmp_path / "other", seed="other-seed")
    assert other.patient_id != downloads["complete"].patient_id
    assert set(other.study_uids).isdisjoint(downloads["complete"].study_uids)


def test_zip_is_deterministic_and_holds_the_same_files(tmp_path: Path,
                                                       downloads: dict[str, DownloadInfo]) -> None:
    one = generate_zip(tmp_path / "one.zip")
    two = generate_zip(tmp_path / "two.zip")
    assert one.root == tmp_path / "one.zip"
    assert hashlib.sha256(one.root.read_bytes()).digest() == hashlib.sha256(two.root.read_bytes()).digest()
    folder = downloads["complete"].root
    with zipfile.ZipFile(one.root) as zf:
        assert zf.namelist() == list(downloads["complete"].files)
        for item in zf.infolist():
            assert item.date_time == (2026, 9, 30, 12, 0, 0)
            assert zf.read(item) == (folder / item.filename).read_bytes()


def test_refuses_a_non_empty_folder_and_unknown_variants(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        generate_download(tmp_path / "busy")
    with pytest.raises(ValueError, match="unknown fixture variant"):
        generate_download(tmp_path / "new", variant="no-such-variant")


def test_command_line_gives_the_same_bytes_in_another_process(tmp_path: Path,
                                                             downloads: dict[str, DownloadInfo]) -> None:
    """Another interpreter (another hash seed) must write exactly the same files, DICOMDIR included."""
    run = subprocess.run([sys.executable, "-m", "fixtures", str(tmp_path / "dl"), "--variant", "second-patient"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["variant"] == "second-patient"
    assert summary["dicom_instances"] == 12
    assert _sha(tmp_path / "dl") == _sha(downloads["second-patient"].root)
    again = subprocess.run([sys.executable, "-m", "fixtures", str(tmp_path / "dl")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "not empty" in again.stderr


# --------------------------------------------------------------------------- FHIR


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_resource_validates_as_r4b(variant: str, downloads: dict[str, DownloadInfo]) -> None:
    info = downloads[variant]
    bundle = _bundle(info)
    assert bundle["type"] in ("collection", "searchset")
    get_fhir_model_class("Bundle").model_validate(bundle)
    for resource in [e["resource"] for e in bundle["entry"]] + _ndjson(info):
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_references_resolve_within_the_download(variant: str, downloads: dict[str, DownloadInfo]) -> None:
    info = downloads[variant]
    bundle = _bundle(info)
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == f"urn:uuid:{entry['resource']['id']}"
        for ref in _references(entry["resource"]):
            assert ref in full_urls, (entry["resource"]["resourceType"], ref)
    relative = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    for resource in _ndjson(info):
        for ref in _references(resource):
            assert ref in relative, ref
    assert {r["subject"]["reference"] for r in _ndjson(info) if "subject" in r} == {f"Patient/{info.patient_id}"}


def test_complete_record_content(downloads: dict[str, DownloadInfo]) -> None:
    info = downloads["complete"]
    res = _resources(info)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for (_, rtype, _), r in res.items():
        by_type.setdefault(rtype, []).append(r)
    assert info.resource_counts == {t: len(v) for t, v in sorted(by_type.items())}

    patient = next(r for r in by_type["Patient"] if r["id"] == info.patient_id)
    assert patient["birthDate"] == info.birth_date
    assert patient["identifier"][0] == {**patient["identifier"][0], "system": info.mrn_system, "value": info.mrn}

    reports = by_type["DiagnosticReport"]
    path = next(r for r in reports if any(c["code"] == "SP" for cat in r["category"] for c in cat["coding"]))
    assert path["code"]["coding"][0]["code"] in ("60568-3", "11526-1")
    text = _text(path["presentedForm"][0])
    assert "Invasive ductal carcinoma" in text and "HER2" in text
    attachment = path["presentedForm"][0]
    raw = base64.b64decode(attachment["data"])
    assert attachment["size"] == len(raw)
    assert base64.b64decode(attachment["hash"]) == hashlib.sha1(raw).digest()
    results = {res[("a", "Observation", r["reference"].removeprefix("urn:uuid:"))]["code"]["coding"][0]["code"]
               for r in path["result"]}
    assert results == {"16112-5", "16113-3", "48676-1"}
    procedure = by_type["Procedure"][0]
    assert procedure["report"] == [{"reference": f"urn:uuid:{path['id']}"}]

    rad = [r for r in reports if r["category"][0]["coding"][0]["code"] == "RAD"]
    studies = {s["id"]: s for s in by_type["ImagingStudy"]}
    assert len(rad) == 2
    for report in rad:
        study = studies[report["imagingStudy"][0]["reference"].removeprefix("urn:uuid:")]
        acsn = [i["value"] for i in study["identifier"]
                if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"]
        assert acsn == [report["identifier"][0]["value"]]
        assert study["numberOfInstances"] == sum(s["numberOfInstances"] for s in study["series"])
        assert study["numberOfSeries"] == len(study["series"])
    assert {i["value"] for s in studies.values() for i in s["identifier"] if i["system"] == "urn:dicom:uid"} == {
        f"urn:oid:{u}" for u in info.study_uids
    }

    labs = [r for r in by_type["Observation"] if r["category"][0]["coding"][0]["code"] == "laboratory"
            and "valueQuantity" in r]
    assert len(labs) == 12
    assert all(date.fromisoformat(r["effectiveDateTime"][:10]) > date(2026, 9, 1) for r in labs)

    window_start = CASE_DATE.toordinal() - 90
    encounters = by_type["Encounter"]
    assert all(date.fromisoformat(e["period"]["start"][:10]).toordinal() >= window_start for e in encounters)
    noted = {d["context"]["encounter"][0]["reference"] for d in by_type["DocumentReference"]}
    assert noted == {f"urn:uuid:{e['id']}" for e in encounters}
    assert {d["type"]["coding"][0]["code"] for d in by_type["DocumentReference"]} == {"11506-3", "11488-4"}
    for doc in by_type["DocumentReference"]:
        assert _text(doc["content"][0]["attachment"]).strip()


# --------------------------------------------------------------------------- variants: exactly one difference


def test_variant_no_pathology_text(downloads: dict[str, DownloadInfo]) -> None:
    info, twin = downloads["no-pathology-text"], downloads["complete"]
    only_here, only_twin, changed = _diff(info, twin)
    assert only_here == set()
    assert {k[1] for k in only_twin} == {"Observation"} and len(only_twin) == 3
    assert len(changed) == 1
    report = _resources(info)[next(iter(changed))]
    assert report["resourceType"] == "DiagnosticReport"
    assert report["conclusion"] and "presentedForm" not in report and "result" not in report
    assert set(twin.files) - set(info.files) == {"portal-b/pathology-report.pdf"}
    assert set(info.files) <= set(twin.files)


def test_variant_no_images(downloads: dict[str, DownloadInfo]) -> None:
    info, twin = downloads["no-images"], downloads["complete"]
    assert _diff(info, twin) == (set(), set(), set())
    missing = set(twin.files) - set(info.files)
    assert missing and all(f.startswith("cd/") for f in missing)
    assert set(info.files) < set(twin.files)
    assert info.dicom_instances == 0 and info.dicom_study_uids == ()
    assert info.study_uids == twin.study_uids


def test_variant_no_recent_labs(downloads: dict[str, DownloadInfo]) -> None:
    info, twin = downloads["no-recent-labs"], downloads["complete"]
    only_here, only_twin, changed = _diff(info, twin)
    assert only_here == only_twin == set()
    res = _resources(info)
    assert len(changed) == 13  # 4 CBC + 8 CMP Observations and the CBC panel
    for key in changed:
        r = res[key]
        assert r["resourceType"] in ("Observation", "DiagnosticReport")
        assert (CASE_DATE - date.fromisoformat(r["effectiveDateTime"][:10])).days > 365
    assert info.files == twin.files


def test_variant_no_visit_note(downloads: dict[str, DownloadInfo]) -> None:
    info, twin = downloads["no-visit-note"], downloads["complete"]
    only_here, only_twin, changed = _diff(info, twin)
    assert only_here == set() and changed == set()
    assert len(only_twin) == 1
    note = _resources(twin)[next(iter(only_twin))]
    assert note["resourceType"] == "DocumentReference"
    encounter_id = note["context"]["encounter"][0]["reference"].removeprefix("urn:uuid:")
    encounter = _resources(info)[("a", "Encounter", encounter_id)]
    assert (CASE_DATE - date.fromisoformat(encounter["period"]["start"][:10])).days <= 90
    assert info.files == twin.files


def test_variant_identity_conflict(downloads: dict[str, DownloadInfo]) -> None:
    info, twin = downloads["identity-conflict"], downloads["complete"]
    only_here, only_twin, changed = _diff(info, twin)
    assert only_here == only_twin == set()
    assert changed == {("b", "Patient", info.patient_id)}
    here, there = _resources(info)[("b", "Patient", info.patient_id)], _resources(twin)[("b", "Patient",
                                                                                         info.patient_id)]
    assert here["birthDate"] != there["birthDate"] == info.birth_date
    assert {k: v for k, v in here.items() if k != "birthDate"} == {k: v for k, v in there.items() if k != "birthDate"}
    assert _resources(info)[("a", "Patient", info.patient_id)]["birthDate"] == info.birth_date


def test_variant_second_patient(downloads: dict[str, DownloadInfo]) -> None:
    info, twin = downloads["second-patient"], downloads["complete"]
    only_here, only_twin, changed = _diff(info, twin)
    assert only_twin == set() and changed == set()
    assert sorted(k[1] for k in only_here) == ["Observation", "Patient"]
    res = _resources(info)
    other = next(res[k] for k in only_here if k[1] == "Patient")
    obs = next(res[k] for k in only_here if k[1] == "Observation")
    assert obs["subject"]["reference"] == f"urn:uuid:{other['id']}"
    assert other["birthDate"] != info.birth_date
    fs = FileSet(info.root / "cd/DICOMDIR")
    assert len(fs.find_values("PatientID")) == 2
    assert len(info.dicom_study_uids) == 3
    assert set(twin.files) < set(info.files)
    assert all(f.startswith("cd/") for f in set(info.files) - set(twin.files) - {"cd/DICOMDIR"})


# --------------------------------------------------------------------------- DICOM


def test_dicom_cd_is_readable_by_pydicom_and_matches_the_imaging_studies(
    downloads: dict[str, DownloadInfo],
) -> None:
    info = downloads["complete"]
    fs = FileSet(info.root / "cd/DICOMDIR")
    assert len(fs) == info.dicom_instances == 10
    assert fs.find_values("PatientID") == [info.mrn]
    assert sorted(fs.find_values("StudyInstanceUID")) == sorted(info.study_uids)
    studies = {s["identifier"][0]["value"].removeprefix("urn:oid:"): s
               for s in _resources(info).values() if s["resourceType"] == "ImagingStudy"}
    seen: dict[str, set[str]] = {}
    for instance in fs:
        ds = instance.load()
        assert ds.PatientName == info.dicom_patient_name
        assert ds.PatientBirthDate == info.birth_date.replace("-", "")
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
        study = studies[ds.StudyInstanceUID]
        acsn = [i["value"] for i in study["identifier"] if "type" in i]
        assert ds.AccessionNumber == acsn[0]
        seen.setdefault(ds.StudyInstanceUID, set()).add(ds.SOPInstanceUID)
    for uid, study in studies.items():
        described = {i["uid"] for s in study["series"] for i in s["instance"]}
        assert described == seen[uid]
    for path in (info.root / "cd").rglob("*"):
        for part in path.relative_to(info.root / "cd").parts:
            assert re.fullmatch(r"[A-Z0-9_]{1,8}", part), part


@pytest.mark.dcmtk
def test_dicom_cd_is_readable_by_dcmtk(downloads: dict[str, DownloadInfo]) -> None:
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        pytest.skip("DCMTK dcmdump is not installed")
    info = downloads["second-patient"]
    out = subprocess.run([dcmdump, "-q", str(info.root / "cd/DICOMDIR")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('refFileID="DICOM\\PT') == len(list((info.root / "cd/DICOM").rglob("IM*")))
    instances = sorted(str(p) for p in (info.root / "cd/DICOM").rglob("IM*"))
    for path in instances:
        run = subprocess.run([dcmdump, "-q", str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stderr == "", (path, run.stderr)
    dcmftest = shutil.which("dcmftest")  # "yes: FILE" for every valid Part 10 file
    if dcmftest is not None:
        run = subprocess.run([dcmftest, str(info.root / "cd/DICOMDIR"), *instances], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0
        assert run.stdout.count("yes: ") == len(instances) + 1, run.stdout


def test_ct_study_for_benchmarks_is_small_when_asked_and_deterministic(tmp_path: Path) -> None:
    one = generate_ct_study(tmp_path / "one", n_instances=5, rows=32, cols=48)
    two = generate_ct_study(tmp_path / "two", n_instances=5, rows=32, cols=48)
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]
    datasets = [dcmread(p) for p in one]
    assert {ds.StudyInstanceUID for ds in datasets} == {datasets[0].StudyInstanceUID}
    assert len({ds.SOPInstanceUID for ds in datasets}) == 5
    assert all(len(ds.PixelData) == 32 * 48 * 2 for ds in datasets)
    assert len({ds.PixelData for ds in datasets}) == 5
    assert datasets[0].PatientID == "BENCH001" and datasets[0].Modality == "CT"


def test_multi_patient_dicom(tmp_path: Path) -> None:
    paths = generate_multi_patient_dicom(tmp_path / "multi")
    datasets = {p.parent.name + "/" + p.name: dcmread(p) for p in paths}
    colliding = [ds for ds in datasets.values() if ds.PatientID == "100200"]
    assert {ds.IssuerOfPatientID for ds in colliding} == {"HOSP-A", "HOSP-B"}
    assert len({str(ds.PatientName) for ds in colliding}) == 2
    latin = datasets["LATIN1/0001.dcm"]
    assert latin.SpecificCharacterSet == "ISO_IR 100" and str(latin.PatientName) == "Müller^Jürgen"
    assert "Müller".encode("latin-1") in (tmp_path / "multi/LATIN1/0001.dcm").read_bytes()
    utf = datasets["UTF8/0001.dcm"]
    assert utf.SpecificCharacterSet == "ISO_IR 192" and str(utf.PatientName) == "Łukasiewicz^Zoë"
    assert int(utf.NumberOfFrames) == 4
    assert len(utf.PixelData) == 4 * utf.Rows * utf.Columns * 2


# --------------------------------------------------------------------------- PDF and C-CDA


def _check_pdf(data: bytes) -> bytes:
    """Check the header, every xref offset and startxref; return the page content stream."""
    assert data.startswith(b"%PDF-1.4\n") and data.endswith(b"%%EOF\n")
    startxref = int(data.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
    assert data[startxref:].startswith(b"xref\n")
    table = data[startxref:].split(b"trailer")[0].decode("ascii").splitlines()[2:]
    for number, row in enumerate(table):
        offset, _, kind = row.split()
        if kind == "n":
            assert data[int(offset):].startswith(f"{number} 0 obj".encode()), number
    length = int(re.search(rb"/Length (\d+)", data).group(1))  # type: ignore[union-attr]
    start = data.index(b"stream\n") + len(b"stream\n")
    assert data[start + length:].startswith(b"endstream")
    return data[start:start + length]


def test_pathology_pdf_is_a_valid_pdf_with_the_report_text(downloads: dict[str, DownloadInfo]) -> None:
    info = downloads["complete"]
    content = _check_pdf((info.root / "portal-b/pathology-report.pdf").read_bytes())
    path = next(r for r in _resources(info).values() if r["resourceType"] == "DiagnosticReport"
                and "presentedForm" in r and r["code"]["coding"][0]["code"] == "60568-3")
    report = _text(path["presentedForm"][0])
    shown = [
        m.decode("latin-1").replace("\\(", "(").replace("\\)", ")").replace("\\\\", "\\")
        for m in re.findall(rb"^\((.*)\) Tj T\*$", content, flags=re.M)
    ]
    assert shown == layout_lines(report)
    joined = " ".join(" ".join(shown).split())
    for phrase in ("Invasive ductal carcinoma", "Estrogen receptor (ER): POSITIVE", "HER2 (IHC, clone 4B5)"):
        assert phrase in joined


def test_pdf_writer_escapes_and_refuses_overflow() -> None:
    content = _check_pdf(text_pdf("a (b) c\\d", title="t"))
    assert b"(a \\(b\\) c\\\\d) Tj" in content
    with pytest.raises(ValueError, match="one page"):
        text_pdf("\n".join(f"line {i}" for i in range(200)))


def test_consult_note_is_a_ccda_consultation_note(downloads: dict[str, DownloadInfo]) -> None:
    info = downloads["complete"]
    root = ET.parse(info.root / "portal-b/consult-note.xml").getroot()
    assert root.tag == f"{HL7}ClinicalDocument"
    assert root.find(f"{HL7}code").get("code") == "11488-4"  # type: ignore[union-attr]
    templates = {t.get("root") for t in root.findall(f"{HL7}templateId")}
    assert {"2.16.840.1.113883.10.20.22.1.1", "2.16.840.1.113883.10.20.22.1.4"} <= templates
    assert root.findtext(f"{HL7}title")
    assert root.find(f"{HL7}effectiveTime").get("value", "").startswith("20260715")  # type: ignore[union-attr]
    role = root.find(f"{HL7}recordTarget/{HL7}patientRole")
    assert role is not None
    assert role.find(f"{HL7}id").get("extension") == info.mrn  # type: ignore[union-attr]
    birth = role.find(f"{HL7}patient/{HL7}birthTime").get("value")  # type: ignore[union-attr]
    assert birth == info.birth_date.replace("-", "")
    assert root.find(f"{HL7}author/{HL7}assignedAuthor/{HL7}assignedPerson") is not None
    sections = root.findall(f"{HL7}component/{HL7}structuredBody/{HL7}component/{HL7}section")
    assert len(sections) >= 4 and all(s.find(f"{HL7}text/{HL7}paragraph") is not None for s in sections)
