"""One reader for DICOM UIDs in FHIR: every spelling the record meets, and the same answer everywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aggregator.checklist.index import study_uid as checklist_study_uid
from aggregator.jobs.hints import imaging_study_hint
from aggregator.normalize.dicom import study_uid_of
from aggregator.normalize.parse import check_resource
from aggregator.normalize.uids import (
    identifier_uid,
    instance_uid,
    is_image_class,
    plain_series_uids,
    series_uid,
    shows_nothing,
    study_uid,
)
from fixtures.dicom import uid_for

UID = uid_for("uids-test", "study")
SERIES = uid_for("uids-test", "series")
SOP = uid_for("uids-test", "instance")


def study(identifier: dict[str, Any], *, urn_series: bool = False) -> dict[str, Any]:
    s, i = (f"urn:oid:{SERIES}", f"urn:oid:{SOP}") if urn_series else (SERIES, SOP)
    return {"resourceType": "ImagingStudy", "id": "s1", "status": "available", "subject": {"reference": "Patient/p"},
            "identifier": [identifier], "started": "2026-09-05T13:15:00-05:00",
            "series": [{"uid": s, "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"},
                        "instance": [{"uid": i, "sopClass": {"system": "urn:ietf:rfc:3986",
                                                             "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"}}]}]}


SPELLINGS = [
    {"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"},
    {"system": "urn:dicom:uid", "value": UID},
    {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{UID}"},
    {"use": "official", "system": "urn:ietf:rfc:3986", "value": f"urn:oid:{UID}"},  # Synthea
    {"value": f"urn:oid:{UID}"},
    {"system": "urn:dicom:uid", "value": f" urn:oid:{UID}\x00"},
]


@pytest.mark.parametrize("ident", SPELLINGS, ids=[json.dumps(s) for s in SPELLINGS])
def test_every_spelling_gives_the_same_uid_to_normalize_checklist_and_hints(ident: dict[str, Any]) -> None:
    res = study(ident)
    assert study_uid(res) == study_uid_of(res) == checklist_study_uid(res) == UID
    assert imaging_study_hint("ImagingStudy/s1", res)["study_uid"] == UID


@pytest.mark.parametrize("ident", [
    {"system": "urn:ietf:rfc:3986", "value": UID},  # a bare value under a URI system is not a UID
    {"system": "http://hospital.example/accession", "value": "1.2.3"},  # digits and dots, still an accession
    {"system": "urn:dicom:uid", "value": "not-a-uid"},
    {"system": "urn:dicom:uid", "value": "urn:oid:1." + "2" * 70},  # longer than 64
])
def test_what_is_not_a_study_uid(ident: dict[str, Any]) -> None:
    assert identifier_uid(ident) is None
    assert study_uid(study(ident)) == ""


def test_urn_dicom_uid_wins_over_another_spelling() -> None:
    res = study({"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3.4"})
    res["identifier"].append({"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"})
    assert study_uid(res) == UID


def test_series_and_instance_uids_as_urn_oid_are_repaired_before_validation() -> None:
    res = study(SPELLINGS[2], urn_series=True)
    assert series_uid(res["series"][0]) == SERIES and instance_uid(res["series"][0]["instance"][0]) == SOP
    error, repaired = check_resource(res)
    assert error is None and repaired is not None
    assert repaired["series"][0]["uid"] == SERIES and repaired["series"][0]["instance"][0]["uid"] == SOP
    assert res["series"][0]["uid"] == f"urn:oid:{SERIES}", "the input is not changed"
    assert plain_series_uids(study(SPELLINGS[0])) is None, "nothing to repair: no copy"


def test_image_classes_and_instances_that_show_nothing() -> None:
    ct, sr, ecg = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.9.1.1"
    assert is_image_class(ct) and is_image_class(f"urn:oid:{ct}")
    assert not is_image_class(sr) and not is_image_class(ecg) and not is_image_class("1.2.840.10008.5.1.4.1.1.104.1")
    assert not is_image_class("1.2.3.4")  # private: not assumed to be an image
    assert shows_nothing(ct, False) and not shows_nothing(ct, True)
    assert shows_nothing(sr, False)
    assert not shows_nothing(ecg, False), "a waveform is the tracing itself"


def test_synthea_imaging_studies_all_have_a_uid(shared_data: Path) -> None:
    seen = 0
    for path in sorted((shared_data / "fhir" / "synthea-r4-bundles").glob("*.json"))[:6]:
        for e in json.loads(path.read_text(encoding="utf-8")).get("entry", []):
            res = e["resource"]
            if res["resourceType"] == "ImagingStudy":
                seen += 1
                assert study_uid(res) == res["identifier"][0]["value"].removeprefix("urn:oid:")
                assert check_resource(res)[0] is None
    assert seen
