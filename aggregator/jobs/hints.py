"""Report to study: what the case's FHIR data says about imaging studies to retrieve.

A radiology DiagnosticReport or an ImagingStudy pulled from a FHIR source names a study by its
StudyInstanceUID, its accession number, or at least its date and modality. The imaging
connectors (``dimse``, ``dicomweb``) take these hints (``study_hints`` in their config) and
query the archive for each one, so a study is found even when the archive files the patient
under another PatientID, and a report whose images cannot be found becomes a gap with its reason.

The hints are computed from the raw resources in the blob store (ledger rows of kind
``resource`` in state ``done``), not from normalized records: pulls of imaging sources run
before normalization. A hint is a plain dict so it can travel inside a connector config:
``{"ref": "DiagnosticReport/<id>", "study_uid", "accession", "date": "YYYYMMDD", "modality"}``,
unknown values being None.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from aggregator.blobs import BlobStore
from aggregator.errors import StoreError
from aggregator.ledger import LedgerEntry
from aggregator.normalize.uids import identifiers_uid
from connectors.base import KIND_RESOURCE

log = logging.getLogger(__name__)

ACSN_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
#: Diagnostic service section codes that mean "imaging": v2-0074 RAD and its sub-sections,
#: LOINC "Radiology" (US Core category), SNOMED "Radiology" (specialty).
RADIOLOGY_CATEGORIES = {
    (V2_0074, "RAD"), (V2_0074, "RX"), (V2_0074, "CT"), (V2_0074, "NMR"), (V2_0074, "NMS"), (V2_0074, "VUS"),
    (V2_0074, "CUS"), (V2_0074, "OUS"), (LOINC, "LP29684-5"), (SNOMED, "394914008"),
}
#: Modality words in a report's code text, checked in order (the first match wins).
_MODALITY_WORDS = [
    (re.compile(r"\b(ct|computed tomography|cat scan)\b"), "CT"),
    (re.compile(r"\b(mr|mri|magnetic resonance)\b"), "MR"),
    (re.compile(r"\b(pet|positron)\b"), "PT"),
    (re.compile(r"\b(us|ultrasound|ultrasonography|sonography|echography|doppler)\b"), "US"),
    (re.compile(r"\b(mammogra\w*|mg)\b"), "MG"),
    (re.compile(r"\b(nm|nuclear medicine|scintigra\w*|spect)\b"), "NM"),
    (re.compile(r"\b(xr|x-ray|xray|radiograph\w*|plain film)\b"), "DX"),
    (re.compile(r"\b(fluoroscop\w*|rf)\b"), "RF"),
]


def study_hints(entries: Iterable[LedgerEntry], blobs: BlobStore) -> list[dict[str, Any]]:
    """One hint per radiology DiagnosticReport and per ImagingStudy among the case's resources.

    A report that references ImagingStudy resources borrows their UID and accession when it has
    none of its own. Resources that cannot be read are logged (by key) and left out: they are
    already in the ledger, and normalization reports them.
    """
    studies: dict[str, dict[str, Any]] = {}
    reports: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e.kind != KIND_RESOURCE or e.state != "done" or not e.sha256:
            continue
        rtype = str(e.meta.get("resourceType") or e.key.split("/", 1)[0])
        if rtype not in ("DiagnosticReport", "ImagingStudy"):
            continue
        try:
            res = orjson.loads(blobs.read_bytes(e.sha256))
        except (StoreError, orjson.JSONDecodeError) as exc:
            log.warning("resource %s could not be read for study hints: %s", e.key, type(exc).__name__)
            continue
        if not isinstance(res, dict) or res.get("resourceType") != rtype:
            continue
        ref = f"{rtype}/{res['id']}" if res.get("id") else e.key
        target = studies if rtype == "ImagingStudy" else reports
        target.setdefault(ref, res)  # the same resource from two sources: one hint
    hints = [imaging_study_hint(ref, res) for ref, res in studies.items()]
    for ref, res in reports.items():
        if is_radiology_report(res):
            hints.append(report_hint(ref, res, studies))
    return hints


def imaging_study_hint(ref: str, res: Mapping[str, Any]) -> dict[str, Any]:
    modality = None
    for coding in _list(res.get("modality")):
        modality = modality or _modality_code(coding)
    for series in _list(res.get("series")):
        if isinstance(series, dict):
            modality = modality or _modality_code(series.get("modality"))
    return {"ref": ref, "study_uid": _study_uid(res.get("identifier")), "accession": _accession(res.get("identifier")),
            "date": _date(res.get("started")), "modality": modality}


def report_hint(ref: str, res: Mapping[str, Any], studies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    identifiers = _list(res.get("identifier"))
    accession = _accession(identifiers)
    if accession is None:
        # Radiology systems commonly use the accession number as the report's own identifier;
        # only an untyped (or filler-typed) single identifier is taken that way.
        plain = [i for i in identifiers if isinstance(i, dict) and i.get("value")
                 and _type_codes(i) <= {"FILL", "ACSN"}]
        if len(plain) == 1:
            accession = str(plain[0]["value"]).strip() or None
    study_uid = _study_uid(identifiers)
    effective = res.get("effectiveDateTime") or (res.get("effectivePeriod") or {}).get("start") or res.get("issued")
    hint = {"ref": ref, "study_uid": study_uid, "accession": accession, "date": _date(effective),
            "modality": _report_modality(res)}
    for link in _list(res.get("imagingStudy")):
        target = link.get("reference") if isinstance(link, dict) else None
        study = studies.get(str(target)) if target else None
        if study is None:
            continue
        linked = imaging_study_hint(str(target), study)
        for k in ("study_uid", "accession", "date", "modality"):
            hint[k] = hint[k] or linked[k]
    return hint


def is_radiology_report(res: Mapping[str, Any]) -> bool:
    """Radiology by category (v2-0074 RAD..., LOINC/SNOMED "Radiology") or by linked ImagingStudy."""
    if _list(res.get("imagingStudy")):
        return True
    for cat in _list(res.get("category")):
        for coding in _list(cat.get("coding") if isinstance(cat, dict) else None):
            if isinstance(coding, dict) and (coding.get("system"), coding.get("code")) in RADIOLOGY_CATEGORIES:
                return True
    return False


# --- field readers --------------------------------------------------------------------------------


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _type_codes(identifier: Mapping[str, Any]) -> set[str]:
    t = identifier.get("type")
    codings = _list(t.get("coding")) if isinstance(t, dict) else []
    return {str(c.get("code")) for c in codings if isinstance(c, dict) and c.get("code")}


def _accession(identifiers: Any) -> str | None:
    for ident in _list(identifiers):
        if isinstance(ident, dict) and ident.get("value") and "ACSN" in _type_codes(ident):
            return str(ident["value"]).strip() or None
    return None


def _study_uid(identifiers: Any) -> str | None:
    """StudyInstanceUID however the identifiers spell it (:func:`aggregator.normalize.uids.identifiers_uid`)."""
    return identifiers_uid(identifiers)


def _date(value: Any) -> str | None:
    m = re.match(r"^(\d{4})-(\d{2})-(\d{2})", str(value or ""))
    return "".join(m.groups()) if m else None


def _modality_code(coding: Any) -> str | None:
    """A DICOM modality code from a Coding (R4) or CodeableConcept (R5)."""
    if isinstance(coding, dict) and "coding" in coding:
        for c in _list(coding.get("coding")):
            got = _modality_code(c)
            if got:
                return got
        return None
    if isinstance(coding, dict) and coding.get("code") and coding.get("system") in (DICOM_DCM, None):
        code = str(coding["code"]).strip().upper()
        return code if re.match(r"^[A-Z]{2,3}$", code) else None
    return None


def _report_modality(res: Mapping[str, Any]) -> str | None:
    raw = res.get("code")
    code: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    for coding in _list(code.get("coding")):
        if isinstance(coding, dict) and coding.get("system") == DICOM_DCM:
            return _modality_code(coding)
    texts = [str(code.get("text") or "")]
    texts += [str(c.get("display") or "") for c in _list(code.get("coding")) if isinstance(c, dict)]
    for text in texts:
        low = text.lower()
        for pattern, modality in _MODALITY_WORDS:
            if pattern.search(low):
                return modality
    return None
