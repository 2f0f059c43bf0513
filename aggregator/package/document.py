"""The normalized ``collection`` Bundle turned into a FHIR R4 ``document`` Bundle.

A document Bundle is what a receiving EHR or a consultant's FHIR viewer can file as one unit:
its first entry is a Composition that names the patient and sorts the record into sections
(problems, results, pathology, imaging, medications, allergies, notes), and the rest of the
entries are every resource of the record, Provenance included, with their ``urn:uuid`` fullUrls
unchanged so references keep resolving.

Determinism: ids are UUIDv5 of the case and the record content, the timestamp is the case date
(or the newest source data time), never a clock, so the same record gives the same bytes.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from html import escape
from pathlib import Path
from typing import IO, Any

import orjson

from aggregator import __version__
from aggregator.checklist import stream
from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.package.manifest import TOOL_NAME

NAMESPACE = uuid.UUID("0b5d8a52-8f0e-5a3c-b7a1-4c2e9d6f1a70")
LOINC = "http://loinc.org"
FALLBACK_TIMESTAMP = "1970-01-01T00:00:00Z"

#: (key, LOINC code, display, title)
SECTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("problems", "11450-4", "Problem list - Reported", "Problem list"),
    ("pathology", "11526-1", "Pathology study", "Pathology reports"),
    ("imaging", "18748-4", "Diagnostic imaging study", "Imaging: reports and studies"),
    ("results", "30954-2", "Relevant diagnostic tests/laboratory data Narrative", "Laboratory and other results"),
    ("medications", "10160-0", "History of Medication use Narrative", "Medications"),
    ("allergies", "48765-2", "Allergies and adverse reactions Document", "Allergies and intolerances"),
    ("procedures", "47519-4", "History of Procedures Document", "Procedures"),
    ("notes", "34109-9", "Note", "Clinical notes and documents"),
)

_MEDICATION_TYPES = frozenset({"MedicationRequest", "MedicationStatement", "MedicationAdministration",
                               "MedicationDispense"})
#: every resource type that :func:`section_of` puts in a section, whatever its classes
SECTION_TYPES = _MEDICATION_TYPES | frozenset({"Condition", "AllergyIntolerance", "ImagingStudy", "Procedure",
                                               "DiagnosticReport", "DocumentReference", "Observation", "Composition"})


def _classes(resource: dict[str, Any]) -> frozenset[str]:
    """Clinical classes from the shared code tables; an unusable table only loses the finer split."""
    try:
        from aggregator.normalize.classify import classify

        return classify(resource)
    except Exception:  # the classification tables are another module's data; never block a package
        return frozenset()


def section_of(resource: dict[str, Any]) -> str | None:
    """Which Composition section a resource belongs in (None: in the bundle, not in a section)."""
    rtype = resource.get("resourceType")
    if rtype == "Condition":
        return "problems"
    if rtype == "AllergyIntolerance":
        return "allergies"
    if rtype in _MEDICATION_TYPES:
        return "medications"
    if rtype == "ImagingStudy":
        return "imaging"
    if rtype == "Procedure":
        return "procedures"
    if rtype in ("DiagnosticReport", "DocumentReference", "Observation", "Composition"):
        classes = _classes(resource)
        if "pathology-report" in classes:
            return "pathology"
        if "radiology-report" in classes:
            return "imaging"
        if rtype == "Observation" or (rtype == "DiagnosticReport" and "note" not in classes):
            return "results"
        return "notes"
    return None


def _instant(value: str) -> str | None:
    """An ISO 8601 date or date-time as a FHIR instant (UTC when no zone is given)."""
    v = value.strip()
    if len(v) == 10 and v[4] == "-" and v[7] == "-":
        return f"{v}T00:00:00Z"
    if "T" not in v or len(v) < 19:
        return None
    if v.endswith("Z") or (v[-6] in "+-" and v[-3] == ":"):
        return v
    return v + "Z"


def document_timestamp(case: CaseInfo, sources: Sequence[SourceInfo]) -> str:
    """The package's time: the case date, else the newest pull, else a fixed epoch (never 'now')."""
    if case.case_date and (ts := _instant(case.case_date)):
        return ts
    pulled = sorted(ts for s in sources if s.pulled_at and (ts := _instant(s.pulled_at)))
    return pulled[-1] if pulled else FALLBACK_TIMESTAMP


def record_digest(record: NormalizedRecord) -> str:
    """SHA-256 of the record's bundle file (deterministic bytes, read in blocks)."""
    return record.digest()


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "|".join(parts)))


def _div(text: str) -> str:
    return f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{escape(text)}</p></div>'


def _full_url(entry: dict[str, Any]) -> str:
    res = entry.get("resource") or {}
    return str(entry.get("fullUrl") or f"urn:uuid:{res.get('id')}")


def patient_entry(record: NormalizedRecord) -> dict[str, Any] | None:
    """The entry of the record's patient (``record.patient_ref``), else the first Patient."""
    want = record.patient_ref.split("/", 1)[1] if record.patient_ref and "/" in record.patient_ref else None
    first = None
    for entry in record.entries(("Patient",)):
        res = entry.get("resource") or {}
        if want is None or res.get("id") == want:
            return dict(entry)
        first = first or entry
    return dict(first) if first else None


def write_document(path: Path, case: CaseInfo, record: NormalizedRecord, sources: Sequence[SourceInfo]) -> None:
    """Write the FHIR R4 document Bundle for the package (Composition first, then every resource).

    Streamed: the record's entries are read twice (once to sort them into sections, once to copy
    their bytes unchanged, one entry per line). The Composition's section entries, one reference
    per sectioned resource, are spooled to unlinked files next to ``path`` and spliced into its
    JSON as it is written, so memory stays flat whatever the size of the record.
    """
    with ExitStack() as stack:
        spools: dict[str, IO[bytes]] = {}
        firsts: dict[str, str] = {}
        counts: dict[str, int] = {key: 0 for key, *_ in SECTIONS}
        for entry, _ in stream.entries(record):  # a Provenance's target list is not materialised
            if not isinstance(entry.get("resource"), dict):
                continue
            key = section_of(entry["resource"])
            if key is None:
                continue
            ref = _full_url(entry)
            spool = spools.get(key)
            if spool is None:
                spool = spools[key] = stack.enter_context(tempfile.TemporaryFile(dir=path.parent))
                firsts[key] = ref
            else:
                spool.write(b",")
            spool.write(orjson.dumps({"reference": ref}))
            counts[key] += 1
        _write_document(path, case, record, sources, counts, spools, firsts)


#: stands for a section's entry list in the Composition's JSON until the spooled list replaces it
_SPLICE = "\x00section:"


def _write_document(path: Path, case: CaseInfo, record: NormalizedRecord, sources: Sequence[SourceInfo],
                    counts: dict[str, int], spools: dict[str, IO[bytes]], firsts: dict[str, str]) -> None:
    digest = record_digest(record)
    timestamp = document_timestamp(case, sources)
    patient = patient_entry(record)

    device_id = _uuid(case.id, digest, "device")
    device = {
        "resourceType": "Device",
        "id": device_id,
        "deviceName": [{"name": TOOL_NAME, "type": "manufacturer-name"}],
        "version": [{"value": __version__}],
    }
    composition_id = _uuid(case.id, digest, "composition")

    sections = []
    for key, code, display, title in SECTIONS:
        section: dict[str, Any] = {
            "title": title,
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        }
        n = counts[key]
        if n:
            section["text"] = {"status": "generated", "div": _div(f"{n} resource(s) in this record.")}
            section["entry"] = [_SPLICE + key]
        else:
            section["text"] = {"status": "generated", "div": _div("None found in the gathered record.")}
            section["emptyReason"] = {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason",
                "code": "unavailable", "display": "Unavailable"}]}
        sections.append(section)

    composition: dict[str, Any] = {
        "resourceType": "Composition",
        "id": composition_id,
        "status": "final",
        "type": {"coding": [{"system": LOINC, "code": "60591-5", "display": "Patient summary Document"}],
                 "text": "Second-opinion record"},
        "date": timestamp,
        "author": [{"reference": f"urn:uuid:{device_id}", "display": TOOL_NAME}],
        "title": f"Second-opinion record, case {case.id}",
        "section": sections,
    }
    if patient is not None:
        composition["subject"] = {"reference": _full_url(patient)}

    provenance = {
        "resourceType": "Provenance",
        "id": _uuid(case.id, digest, "provenance"),
        "target": [{"reference": f"urn:uuid:{composition_id}"}],
        "recorded": timestamp,
        "activity": {"text": "assembled for a second opinion from the sources listed in entity"},
        "agent": [{"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
            "code": "assembler", "display": "Assembler"}]},
            "who": {"reference": f"urn:uuid:{device_id}", "display": TOOL_NAME}}],
        "entity": [{"role": "source", "what": {"display": _source_text(s)}}
                   for s in sorted(sources, key=lambda s: s.id)],
    }
    if not provenance["entity"]:
        del provenance["entity"]

    bundle_id = _uuid(case.id, digest, "bundle")
    first = {"fullUrl": f"urn:uuid:{composition_id}", "resource": composition}
    last = [{"fullUrl": f"urn:uuid:{device_id}", "resource": device},
            {"fullUrl": f"urn:uuid:{provenance['id']}", "resource": provenance}]
    shell = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{bundle_id}"},
        "type": "document",
        "timestamp": timestamp,
        "entry": [first, *last],
    }
    validate_document_shell(shell, firsts)
    head = orjson.dumps({**shell, "entry": []})
    assert head.endswith(b"[]}")
    skip = (b'{"fullUrl":' + orjson.dumps(_full_url(patient)) + b",") if patient is not None else None
    with open(path, "wb") as f:
        f.write(head[:-2] + b"\n")
        _write_spliced(f, orjson.dumps(first), spools)
        if patient is not None:
            f.write(b",\n" + orjson.dumps(patient))
        for line in record.lines():
            if (skip is not None and line.startswith(skip)) or b'"resource":{' not in line:
                continue  # the patient is written second; an entry without a resource is no entry
            f.write(b",\n")
            f.write(line)
        for entry in last:
            f.write(b",\n" + orjson.dumps(entry))
        f.write(b"\n]}\n")


def _source_text(s: SourceInfo) -> str:
    parts = [f"source {s.id}", s.kind, s.label]
    if s.organization:
        parts.append(s.organization)
    if s.method:
        parts.append(f"via {s.method}")
    if s.pulled_at:
        parts.append(f"data as of {s.pulled_at}")  # the data's time, not the pull's clock
    return ", ".join(parts)


def _write_spliced(f: IO[bytes], data: bytes, spools: dict[str, IO[bytes]]) -> None:
    """Write ``data`` with each section's placeholder replaced by its spooled entry list."""
    pos = 0
    for key in sorted(spools, key=lambda k: data.index(orjson.dumps(_SPLICE + k))):
        mark = orjson.dumps(_SPLICE + key)
        at = data.index(mark, pos)
        f.write(data[pos:at])
        spool = spools[key]
        spool.seek(0)
        shutil.copyfileobj(spool, f, 1 << 20)
        pos = at + len(mark)
    f.write(data[pos:])


def _first_entries(bundle: dict[str, Any], firsts: dict[str, str]) -> dict[str, Any]:
    """The shell with each spliced section's entry list as its first reference (the rest are alike)."""
    comp = bundle["entry"][0]["resource"]
    sections = []
    for section in comp.get("section") or []:
        entry = section.get("entry")
        if isinstance(entry, list) and len(entry) == 1 and isinstance(entry[0], str) and entry[0].startswith(_SPLICE):
            section = {**section, "entry": [{"reference": firsts[entry[0][len(_SPLICE):]]}]}
        sections.append(section)
    first = {**bundle["entry"][0], "resource": {**comp, "section": sections}}
    return {**bundle, "entry": [first, *bundle["entry"][1:]]}


def validate_document_shell(bundle: dict[str, Any], firsts: dict[str, str] | None = None) -> None:
    """Validate what this module adds (Composition, Device, Provenance, Bundle fields) with R4B.

    The record's own resources were validated by normalization; re-validating a large record
    here would only cost time. Each Composition section is validated with its first entry only:
    every entry is the same ``{"reference": fullUrl}`` shape, and a section of a large record
    lists a hundred thousand of them. Raises :class:`PackageError` naming the resource on failure.
    """
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    from aggregator.errors import PackageError

    if firsts is not None:
        bundle = _first_entries(bundle, firsts)
    entries = bundle["entry"]
    shell = dict(bundle)
    shell["entry"] = [entries[0], *entries[-2:]]
    try:
        Bundle.model_validate(shell)
    except ValidationError as exc:
        raise PackageError(f"document bundle is not valid FHIR R4 ({exc.error_count()} error(s))",
                           item="fhir/bundle.json")
