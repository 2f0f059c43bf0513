"""Imaging items: a study with no report still needs its images; pixel-less instances are not images.

Records are the hand-built twins of ``test_checklist_engine`` (the complete record there has a
CT report, its ImagingStudy and both instances), changed one thing at a time.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tests.unit.test_checklist_engine import HOSPITAL, PACS, STUDY, complete_resources, images, item, record, run

SR = "1.2.840.10008.5.1.4.1.1.88.22"


def _study_only(started: str = "2026-02-20T08:00:00Z") -> dict[str, dict[str, Any]]:
    res = complete_resources()
    del res["rad1"]
    res["is1"]["started"] = started
    res["is1"]["identifier"] = [{"use": "official", "system": "urn:ietf:rfc:3986", "value": f"urn:oid:{STUDY}"},
                                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                      "code": "ACSN"}]}, "value": "ACC-77"}]
    return res


def test_study_without_report_or_images_in_the_window_is_a_gap() -> None:
    rad = item(run(record(_study_only(), imgs=[])), "radiology-images")
    assert rad["status"] == "missing"
    (gap,) = rad["gaps"]
    assert gap["reason"] == "images-not-retrieved"
    assert gap["subject"] == gap["resource"] == "ImagingStudy/is1"
    for text in (gap["detail"], gap["next_action"]):
        assert "CT study of 2026-02-20" in text and "accession ACC-77" in text
    assert "Good Hospital" in gap["next_action"], "the place to ask: the source that holds the study"


def test_study_without_report_with_its_images_is_complete() -> None:
    rad = item(run(record(_study_only())), "radiology-images")
    assert rad["status"] == "complete" and rad["evidence"] == ["ImagingStudy/is1"]


def test_study_without_report_outside_the_window_is_not_applicable() -> None:
    rad = item(run(record(_study_only("2024-01-10T08:00:00Z"), imgs=[])), "radiology-images")
    assert rad["status"] == "not-applicable"


def test_unlinked_study_next_to_a_covered_report_is_its_own_subject() -> None:
    res = complete_resources()
    other = dict(res["is1"], id="is2", started="2025-12-01T08:00:00Z",
                 identifier=[{"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.9"}])
    res["is2"] = other
    rad = item(run(record(res)), "radiology-images")
    assert rad["status"] == "partial"
    assert [s["ref"] for s in rad["subjects"]] == ["DiagnosticReport/rad1", "ImagingStudy/is2"]
    (gap,) = rad["gaps"]
    assert gap["subject"] == "ImagingStudy/is2" and "CT study of 2025-12-01" in gap["next_action"]


def test_a_report_linked_study_is_not_judged_twice() -> None:
    rad = item(run(record(complete_resources(), imgs=[])), "radiology-images")
    assert [g["subject"] for g in rad["gaps"]] == ["DiagnosticReport/rad1"]


def test_instances_without_pixel_data_do_not_satisfy_images() -> None:
    blank = [replace(i, pixels=False) for i in images()]
    report = run(record(complete_resources(), imgs=blank))
    (gap,) = item(report, "radiology-images")["gaps"]
    assert gap["reason"] == "images-not-retrieved"
    assert "carry no pixel data" in gap["detail"] and "not images" in gap["detail"]
    assert report["record"]["instances_without_pixels"] == 2


def test_one_image_without_pixels_among_two_is_incomplete_but_a_report_object_is_not() -> None:
    one, two = images()
    report = run(record(complete_resources(), imgs=[one, replace(two, pixels=False)]))
    (gap,) = item(report, "radiology-images")["gaps"]
    assert "1 instance(s) of an image SOP class without pixel data" in gap["detail"]
    # a structured report next to the images carries no pixels either, and that is normal
    res = complete_resources()
    res["is1"]["numberOfInstances"] = 3
    sr = replace(two, sop_instance_uid="1.2.826.0.1.3680043.8.498.1.1.3", sop_class_uid=SR, pixels=False)
    res["is1"]["series"][0]["numberOfInstances"] = 3
    report = run(record(res, imgs=[one, two, sr]), sources=[HOSPITAL, PACS])
    assert item(report, "radiology-images")["status"] == "complete"
    assert report["record"]["instances_without_pixels"] == 1
