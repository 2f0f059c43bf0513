"""Plain data passed between the phases: pull -> normalize -> check -> package.

These types are the seams between modules, so each phase can be built and tested alone:
normalization takes :class:`CaseInfo`, :class:`SourceInfo` and ledger entries and returns a
:class:`NormalizedRecord`; the checklist reads that record plus the ledger; the package writer
reads the record, the gap report and the blob store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CaseInfo:
    id: str
    checklist: str
    patient_name: str | None = None
    """As the navigator typed it, e.g. "Jane Q Doe" or "Doe^Jane"; used for identity matching only."""
    birth_date: str | None = None
    """YYYY-MM-DD."""
    case_date: str | None = None
    """YYYY-MM-DD: the reference date for freshness windows (defaults to the creation date)."""


@dataclass(frozen=True)
class SourceInfo:
    id: int
    kind: str
    """Connector kind: media, fhir, fhir-bulk, dimse, dicomweb."""
    label: str
    """PHI-free description: the endpoint name, or the media folder's base name."""
    endpoint_name: str | None = None
    base_url: str | None = None
    """FHIR base URL of the source server, used to rewrite absolute references."""
    method: str = ""
    """How the last pull got the data: $everything, crawl, $export, C-GET, C-MOVE, WADO-RS, media."""
    pulled_at: str | None = None
    """ISO 8601 time of the last successful pull."""
    organization: str | None = None
    """Name of the organization behind the source, for next-action texts."""


@dataclass(frozen=True)
class DocumentFile:
    """An original document that goes into the package's ``documents/`` folder."""

    path: str
    """Package-relative path, e.g. ``documents/DOC0001.PDF``; attachment.url in the bundle uses it."""
    sha256: str
    size: int
    content_type: str
    title: str = ""
    resource_ref: str = ""
    """``DocumentReference/<id>`` or ``DiagnosticReport/<id>`` in the normalized bundle."""


@dataclass(frozen=True)
class ImageRef:
    """One DICOM instance kept in the record (bytes are the blob ``sha256``)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    sha256: str
    size: int
    modality: str = ""
    patient_id: str = ""
    source_id: int = 0


@dataclass(frozen=True)
class Quarantined:
    """A raw item that is not in the bundle, and why (invalid, another patient, duplicate of X...)."""

    source_id: int
    kind: str
    key: str
    reason: str


@dataclass
class NormalizedRecord:
    bundle: dict[str, Any]
    """A FHIR R4 ``collection`` Bundle. Ids are deterministic UUIDs; each entry's ``fullUrl`` is
    ``urn:uuid:<id>`` and references between entries are written as ``urn:uuid:<id>``. Gap
    reports and logs cite resources as ``Type/<id>``."""
    documents: list[DocumentFile] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    quarantine: list[Quarantined] = field(default_factory=list)
    unresolved: list[dict[str, Any]] = field(default_factory=list)
    """References that do not resolve inside the bundle:
    ``{"from": "Type/id", "reference": ..., "source_id": n}``."""
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    """Identity conflicts for a navigator: ``{"field": "birthDate", "values": [...], "sources": [...]}``.
    The values go to reports, never to logs."""
    patient_ref: str | None = None
    """``Patient/<id>`` of the record's patient in the bundle."""

    def resources(self, resource_type: str | None = None) -> list[dict[str, Any]]:
        out = []
        for entry in self.bundle.get("entry", []):
            res = entry.get("resource") or {}
            if resource_type is None or res.get("resourceType") == resource_type:
                out.append(res)
        return out
