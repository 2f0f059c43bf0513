"""Deterministic ids for the normalized bundle.

Why UUID-5: the bundle must be byte-identical when normalization is re-run on the same raw
store, and an id must not change when an unrelated item is added to the case. So an id is a
name-based UUID of *stable inputs* (source id, ledger kind and key, a StudyInstanceUID, the
case id), never a counter or a random value.
"""

from __future__ import annotations

import uuid

NAMESPACE = uuid.UUID("6f1c2a0e-7d0b-5b8e-9a43-2f61d3c0a9b7")


def new_id(*parts: object) -> str:
    """A UUID-5 (as a lower-case string) of ``parts`` joined with a separator no key contains."""
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(str(p) for p in parts)))


def item_id(source_id: int, kind: str, key: str) -> str:
    """The bundle id of the resource that one ledger item became."""
    return new_id("item", source_id, kind, key)


def patient_id(case_id: str) -> str:
    """The one Patient of a case: stable across re-runs and across added sources."""
    return new_id("patient", case_id)


def study_id(study_uid: str) -> str:
    """ImagingStudy built from DICOM headers: one per StudyInstanceUID, whichever source sent it."""
    return new_id("imaging-study", study_uid)


def provenance_id(source_id: int) -> str:
    return new_id("provenance", source_id)


def urn(rid: str) -> str:
    return f"urn:uuid:{rid}"
