"""Issue 11, part 4: imaging studies without images, and images the checklist did not see.

Every record here is the project's generated download (``fixtures``: a portal bundle and a DICOM
CD), taken the whole way a navigator's would (media pull -> normalize -> checklist). Only the
spelling of the ImagingStudy's UIDs is changed, to the ways Synthea and many servers write them,
or the radiology reports are taken out, or the CD's instances lose their Pixel Data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator.app import App
from aggregator.cases import add_source, case_summary, create_case
from aggregator.jobs.pull import pull_case
from aggregator.ledger import entries_for_case
from aggregator.pipeline import CaseRecord, check_case, package_case
from fixtures import dicom as fxd
from fixtures import generate as fx

RECORD = "portal-a/record.json"
Edit = Callable[[dict[str, Any]], None]


def _run(tmp_path: Path, variant: str, edit: Edit | None = None, *,
         cd: Callable[[Path], None] | None = None) -> tuple[dict[str, Any], CaseRecord, App]:
    info = fx.generate_download(tmp_path / "dl", variant=variant)
    if edit is not None:
        path = tmp_path / "dl" / RECORD
        bundle = json.loads(path.read_text(encoding="utf-8"))
        edit(bundle)
        path.write_text(json.dumps(bundle), encoding="utf-8")
    if cd is not None:
        cd(tmp_path / "dl" / "cd")
    app = App.open(tmp_path / "home")
    create_case(app, "c", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(tmp_path / "dl"))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    report, cr = check_case(app, "c")
    return report, cr, app


def _studies(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]


def _uid_as(system: str, value: str) -> Edit:
    """Rewrite each ImagingStudy's StudyInstanceUID identifier: ``value`` formats the bare UID."""
    def edit(bundle: dict[str, Any]) -> None:
        for st in _studies(bundle):
            ident = st["identifier"][0]
            uid = ident["value"].removeprefix("urn:oid:")
            st["identifier"][0] = {"use": "official", "system": system, "value": value.format(uid=uid)}
    return edit


def _series_as_urns(bundle: dict[str, Any]) -> None:
    """Series and instance UIDs written ``urn:oid:...`` (and the study UID Synthea's way)."""
    _uid_as("urn:ietf:rfc:3986", "urn:oid:{uid}")(bundle)
    for st in _studies(bundle):
        for s in st["series"]:
            s["uid"] = "urn:oid:" + s["uid"]
            for inst in s["instance"]:
                inst["uid"] = "urn:oid:" + inst["uid"]


def _no_reports(bundle: dict[str, Any]) -> None:
    """The radiology reports taken out: the ImagingStudy resources alone say images exist."""
    bundle["entry"] = [e for e in bundle["entry"] if not (
        e["resource"]["resourceType"] == "DiagnosticReport" and "imagingStudy" in e["resource"])]


def _item(report: dict[str, Any], item_id: str) -> dict[str, Any]:
    return next(i for i in report["items"] if i["id"] == item_id)


SPELLINGS = {
    "rfc3986-urn-oid": _uid_as("urn:ietf:rfc:3986", "urn:oid:{uid}"),
    "dicom-uid-urn-oid": _uid_as("urn:dicom:uid", "urn:oid:{uid}"),
    "dicom-uid-bare": _uid_as("urn:dicom:uid", "{uid}"),
    "no-system-urn-oid": _uid_as("", "urn:oid:{uid}"),
    "series-and-instances-urn-oid": _series_as_urns,
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_study_uid_spellings_with_their_dicom_files_are_one_study_and_no_gap(tmp_path: Path, spelling: str) -> None:
    report, cr, app = _run(tmp_path, "complete", SPELLINGS[spelling])
    item = _item(report, "radiology-images")
    assert item["status"] == "complete", item
    assert not item["gaps"]
    mg, ct = fx._studies("demo")
    studies = cr.record.resources("ImagingStudy")
    # FHIR and DICOM ImagingStudy merged: one per StudyInstanceUID, with the instances received
    from aggregator.normalize.uids import study_uid
    assert sorted(study_uid(s) for s in studies) == sorted([mg.uid, ct.uid])
    ids = {f"urn:uuid:{s['id']}" for s in studies}
    for s in studies:
        assert s["numberOfInstances"] == {mg.uid: mg.instance_count, ct.uid: ct.instance_count}[study_uid(s)]
        assert any(r.get("reference", "").startswith("urn:uuid:") for r in s.get("endpoint", [])), "images linked"
        codes = {c.get("code") for i in s["identifier"] for c in (i.get("type") or {}).get("coding", [])}
        assert "ACSN" in codes
        for series in s["series"]:
            assert not series["uid"].startswith("urn:"), "R4 id type: the UID is written bare"
    # every report's imagingStudy reference still names a study of the bundle
    reports = [r for r in cr.record.resources("DiagnosticReport") if r.get("imagingStudy")]
    assert len(reports) == 2
    for r in reports:
        for ref in r["imagingStudy"]:
            assert ref["reference"] in ids
    assert not [u for u in cr.record.unresolved if "ImagingStudy" in json.dumps(u)]
    quarantined = [e for e in entries_for_case(app.db, "c") if e.kind == "quarantine"]
    assert not [e for e in quarantined if "ImagingStudy" in e.key or "invalid" in (e.reason or "")], \
        [(e.key, e.reason) for e in quarantined]


@pytest.mark.parametrize("spelling", ["rfc3986-urn-oid", "series-and-instances-urn-oid"])
def test_study_uid_spellings_without_their_dicom_files_are_gaps(tmp_path: Path, spelling: str) -> None:
    report, cr, _ = _run(tmp_path, "no-images", SPELLINGS[spelling])
    item = _item(report, "radiology-images")
    assert item["status"] == "missing"
    assert [g["reason"] for g in item["gaps"]] == ["images-not-retrieved"] * 2
    assert len(cr.record.resources("ImagingStudy")) == 2


def test_imaging_study_without_report_or_pixels_is_a_gap_naming_the_study(tmp_path: Path) -> None:
    # Synthea's way: a UID as urn:ietf:rfc:3986 + urn:oid:, no report, no DICOM
    edit = _uid_as("urn:ietf:rfc:3986", "urn:oid:{uid}")

    def both(bundle: dict[str, Any]) -> None:
        edit(bundle)
        _no_reports(bundle)

    report, _, _ = _run(tmp_path, "no-images", both)
    item = _item(report, "radiology-images")
    assert item["status"] == "missing", "an ImagingStudy says images exist: not 'not applicable'"
    gaps = sorted(item["gaps"], key=lambda g: g["detail"])
    assert [g["reason"] for g in gaps] == ["images-not-retrieved"] * 2
    for gap, (modality, day, accession) in zip(gaps, [("CT", "2026-09-05", fx.CT_ACCESSION),
                                                      ("MG", "2026-07-08", fx.MG_ACCESSION)], strict=True):
        for text in (gap["detail"], gap["next_action"]):
            assert f"{modality} study of {day}" in text
            assert f"accession {accession}" in text
        # the place to ask: the source that holds the study (the download's folder, "dl"), or its institution
        assert " dl " in gap["next_action"] or "Synthetic General Hospital" in gap["next_action"], gap
        assert gap["subject"] == gap["resource"] and gap["subject"].startswith("ImagingStudy/")


def test_imaging_study_outside_the_window_without_report_is_not_a_gap(tmp_path: Path) -> None:
    def old(bundle: dict[str, Any]) -> None:
        _no_reports(bundle)
        for st in _studies(bundle):
            st["started"] = "2019-03-01T10:00:00-05:00"
            for s in st["series"]:
                s.pop("started", None)

    report, _, _ = _run(tmp_path, "no-images", old)
    item = _item(report, "radiology-images")
    assert item["status"] == "not-applicable", item


def test_report_less_study_with_its_images_is_complete(tmp_path: Path) -> None:
    report, _, _ = _run(tmp_path, "complete", _no_reports)
    item = _item(report, "radiology-images")
    assert item["status"] == "complete" and len(item["evidence"]) == 2, item


def test_synthea_imaging_study_alone_is_a_gap(tmp_path: Path, shared_data: Path) -> None:
    """A real Synthea ImagingStudy (urn:oid: UID, series modality only, no accession), re-dated
    into the case's window and given to the generated patient."""
    found = None
    for path in sorted((shared_data / "fhir" / "synthea-r4-bundles").glob("*.json")):
        for e in json.loads(path.read_text(encoding="utf-8")).get("entry", []):
            if e["resource"]["resourceType"] == "ImagingStudy":
                found = e["resource"]
                break
        if found:
            break
    if found is None:
        pytest.skip("no ImagingStudy in the Synthea sample bundles")

    def add(bundle: dict[str, Any]) -> None:
        _no_reports(bundle)
        bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "ImagingStudy"]
        patient = next(e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        st = dict(found)
        st.pop("encounter", None)
        st["subject"] = {"reference": f"urn:uuid:{patient}"}
        st["started"] = "2026-08-01T10:00:00-05:00"
        st["series"] = [{**s, "started": "2026-08-01T10:00:00-05:00"} for s in st["series"]]
        bundle["entry"].append({"fullUrl": f"urn:uuid:{st['id']}", "resource": st})

    report, _, _ = _run(tmp_path, "no-images", add)
    item = _item(report, "radiology-images")
    (gap,) = item["gaps"]
    modality = found["series"][0]["modality"]["code"]
    assert gap["reason"] == "images-not-retrieved"
    assert f"{modality} study of 2026-08-01" in gap["next_action"]
    assert "no accession number" in gap["detail"]
    uid = found["identifier"][0]["value"].removeprefix("urn:oid:")
    assert uid in gap["detail"]


#: the Image Pixel module: a header-only copy (an export that kept the headers) has none of it.
#: (With Rows and Columns but no Pixel Data the media connector calls the file truncated.)
PIXEL_MODULE = ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "SamplesPerPixel", "PhotometricInterpretation")


def _header_only(ds: Any) -> Any:
    for name in PIXEL_MODULE:
        if name in ds:
            delattr(ds, name)
    return ds


def _strip_ct_pixels(cd: Path) -> None:
    """The CD written again from the generator's datasets, the CT instances without Pixel Data."""
    import shutil

    shutil.rmtree(cd)
    me = fx._dicom_patient()
    mg, ct = fx._studies("demo")
    # CT Image Storage, an image SOP class, without (7FE0,0010)
    datasets = fxd.study_datasets(me, mg) + [_header_only(ds) for ds in fxd.study_datasets(me, ct)]
    fxd.write_cd(cd, datasets, seed="demo")


def test_instances_without_pixel_data_are_not_images(tmp_path: Path) -> None:
    report, cr, app = _run(tmp_path, "complete", cd=_strip_ct_pixels)
    _, ct = fx._studies("demo")
    item = _item(report, "radiology-images")
    assert item["status"] == "partial"
    (gap,) = item["gaps"]
    assert gap["reason"] == "images-not-retrieved"
    assert "carry no pixel data" in gap["detail"] and "not images" in gap["detail"]
    assert f"accession {fx.CT_ACCESSION}" in gap["detail"]
    assert report["record"]["instances_without_pixels"] == ct.instance_count
    # kept and shipped (never dropped), with a note in the ledger
    assert sum(1 for i in cr.record.images if i.study_instance_uid == ct.uid) == ct.instance_count
    notes = [e for e in entries_for_case(app.db, "c") if e.kind == "note"]
    assert len(notes) == ct.instance_count
    assert all("no pixel data" in (e.reason or "") and "not an image" in (e.reason or "") for e in notes)
    assert case_summary(app, "c")["sources"][0]["notes"] == ct.instance_count
    # and in the consultant's summary
    out, _ = package_case(app, "c", tmp_path / "pkg")
    html = (out / "summary.html").read_text(encoding="utf-8")
    assert f"{ct.instance_count} without pixel data: none is an image" in html


def test_stripped_copy_next_to_the_real_images_is_incomplete(tmp_path: Path) -> None:
    """One CT instance without its pixels among whole ones: received, counted, and still a gap."""
    def one_stripped(cd: Path) -> None:
        import shutil

        shutil.rmtree(cd)
        me = fx._dicom_patient()
        mg, ct = fx._studies("demo")
        cts = fxd.study_datasets(me, ct)
        _header_only(cts[0])
        fxd.write_cd(cd, fxd.study_datasets(me, mg) + cts, seed="demo")

    report, _, _ = _run(tmp_path, "complete", cd=one_stripped)
    (gap,) = _item(report, "radiology-images")["gaps"]
    assert "1 instance(s) of an image SOP class without pixel data (not images)" in gap["detail"]
    assert report["record"]["instances_without_pixels"] == 1
