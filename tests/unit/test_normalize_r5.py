"""R5-shaped resources keep their information in R4 shape; what R4 cannot hold is quarantined."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from aggregator.normalize.parse import check_resource

SUBJ = {"reference": "Patient/p1"}
CC = {"coding": [{"system": "http://snomed.info/sct", "code": "254837009", "display": "Breast cancer"}]}
DCM = "http://dicom.nema.org/resources/ontology/DCM"

R5_SHAPED: dict[str, dict[str, Any]] = {
    "medication-request": {
        "resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order", "subject": SUBJ,
        "medication": {"concept": {"text": "letrozole 2.5 mg"}}, "reason": [{"concept": CC}],
    },
    "medication-statement": {
        "resourceType": "MedicationStatement", "id": "ms1", "status": "recorded", "subject": SUBJ,
        "medication": {"reference": {"reference": "Medication/x"}},
    },
    "procedure": {
        "resourceType": "Procedure", "id": "pr1", "status": "completed", "subject": SUBJ, "code": CC,
        "occurrenceDateTime": "2026-08-20", "reason": [{"reference": {"reference": "Condition/c1"}}],
    },
    "encounter": {
        "resourceType": "Encounter", "id": "e1", "status": "completed", "subject": SUBJ,
        "class": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}]}],
        "actualPeriod": {"start": "2026-08-20T09:00:00Z"},
        "participant": [{"actor": {"reference": "Practitioner/d1"}}],
        "reason": [{"value": [{"concept": CC}]}],
    },
    "imaging-study": {
        "resourceType": "ImagingStudy", "id": "is1", "status": "available", "subject": SUBJ,
        "modality": [{"coding": [{"system": DCM, "code": "MG"}]}],
        "series": [{"uid": "1.2.3.4", "modality": {"coding": [{"system": DCM, "code": "MG"}]}}],
        "procedure": [{"concept": {"text": "Mammogram"}}],
    },
    "diagnostic-report": {
        "resourceType": "DiagnosticReport", "id": "dr1", "status": "final", "subject": SUBJ,
        "code": {"text": "Mammogram report"}, "study": [{"reference": "ImagingStudy/is1"}],
    },
    "document-reference": {
        "resourceType": "DocumentReference", "id": "d1", "status": "current", "subject": SUBJ,
        "context": [{"reference": "Encounter/e1"}], "period": {"start": "2026-08-20"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "bm90ZQ=="},
                     "profile": [{"valueCoding": {"system": "urn:oid:1.3.6.1.4.1.19376.1.2.3",
                                                  "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient"}}]}],
    },
    "allergy": {
        "resourceType": "AllergyIntolerance", "id": "a1", "patient": SUBJ,
        "type": {"coding": [{"code": "allergy"}]}, "code": {"text": "penicillin"},
        "participant": [{"actor": {"reference": "Practitioner/d1"}}],
    },
}


@pytest.mark.parametrize("name", sorted(R5_SHAPED))
def test_r5_shape_is_kept_in_r4_shape(name: str) -> None:
    res = R5_SHAPED[name]
    with pytest.raises(ValidationError):  # bare R4B refuses it: the repair is what keeps it
        get_fhir_model_class(res["resourceType"]).model_validate(res)
    error, repaired = check_resource(res)
    assert error is None and repaired is not None
    get_fhir_model_class(res["resourceType"]).model_validate(repaired)
    assert repaired["id"] == res["id"] and repaired["subject" if "subject" in res else "patient"]


def test_information_is_moved_not_lost() -> None:
    _, mr = check_resource(R5_SHAPED["medication-request"])
    assert mr and mr["medicationCodeableConcept"]["text"] == "letrozole 2.5 mg" and mr["reasonCode"] == [CC]
    _, enc = check_resource(R5_SHAPED["encounter"])
    assert enc and enc["period"]["start"] == "2026-08-20T09:00:00Z" and enc["reasonCode"] == [CC]
    assert enc["participant"][0]["individual"]["reference"] == "Practitioner/d1"
    _, dr = check_resource(R5_SHAPED["diagnostic-report"])
    assert dr and dr["imagingStudy"] == [{"reference": "ImagingStudy/is1"}]
    _, doc = check_resource(R5_SHAPED["document-reference"])
    assert doc and doc["context"]["encounter"] == [{"reference": "Encounter/e1"}]
    assert doc["context"]["period"]["start"] == "2026-08-20"


def test_what_r4_cannot_hold_is_not_trimmed_away() -> None:
    res = dict(R5_SHAPED["procedure"], focus={"reference": "Patient/p2"})  # R5-only element
    error, repaired = check_resource(res)
    assert error is not None and "invalid FHIR R4" in error and repaired is None
