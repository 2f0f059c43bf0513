"""DICOM UIDs as FHIR writes them: one reader for normalization, the checklist and the study hints.

Why one function: the same StudyInstanceUID reaches us spelled several ways, and every reader
that knew only one of them made a study and its images strangers. A checklist that read only
``system = urn:dicom:uid`` found no images for Synthea's ImagingStudy (``system =
urn:ietf:rfc:3986``, ``value = urn:oid:1.2...``) although they were in the record, and the
normalizer kept that study apart from the one it built from the DICOM files.

Spellings recognised (FHIR R4 ImagingStudy.identifier, and the report identifiers that carry a
study UID):

* ``{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}`` (the R4 guidance) and the same with
  a bare ``1.2.3`` value;
* ``{"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3"}`` (Synthea, many servers), and any
  identifier whose value is an OID URN, with or without a system;
* ``series.uid`` / ``series.instance.uid`` written either bare (R4's ``id`` type) or as
  ``urn:oid:1.2.3`` (which R4 rejects: :func:`plain_series_uids` repairs it before validation).

Also here, because it is read wherever images are counted: whether a SOP class is an image class
and whether an instance shows anything (:func:`is_image_class`, :func:`shows_nothing`, from
``schemas/tables/sop-classes.yaml``).

A leaf module: it imports nothing of the project (only its package data), so every layer may use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from importlib.resources import files
from typing import Any

import yaml

DICOM_UID_SYSTEM = "urn:dicom:uid"
URI_SYSTEM = "urn:ietf:rfc:3986"
OID_PREFIX = "urn:oid:"
#: DICOM PS3.5 9.1: digits and dots, components without leading dots, at most 64 characters
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
MAX_UID = 64


def plain_uid(value: Any) -> str | None:
    """``1.2.3`` from ``1.2.3`` or ``urn:oid:1.2.3`` (padding removed); None when it is no UID."""
    if not isinstance(value, str):
        return None
    text = value.strip().strip("\x00").strip()
    if text[:len(OID_PREFIX)].lower() == OID_PREFIX:
        text = text[len(OID_PREFIX):]
    return text if len(text) <= MAX_UID and _UID.match(text) else None


def identifier_uid(ident: Any) -> str | None:
    """The DICOM UID an Identifier carries, or None.

    ``urn:dicom:uid`` takes the value bare or as an OID URN; any other system (``urn:ietf:rfc:3986``,
    none, or a local one) only as an OID URN, so that an accession number that happens to be
    digits and dots is not mistaken for a UID.
    """
    if not isinstance(ident, Mapping):
        return None
    value = ident.get("value")
    if not isinstance(value, str):
        return None
    if str(ident.get("system") or "").strip() == DICOM_UID_SYSTEM:
        return plain_uid(value)
    if value.strip()[:len(OID_PREFIX)].lower() != OID_PREFIX:
        return None
    return plain_uid(value)


def identifiers_uid(identifiers: Any) -> str | None:
    """The first DICOM UID among Identifiers, ``urn:dicom:uid`` first (the most explicit)."""
    idents = identifiers if isinstance(identifiers, list) else [identifiers] if identifiers else []
    explicit = [i for i in idents if isinstance(i, Mapping) and i.get("system") == DICOM_UID_SYSTEM]
    for ident in [*explicit, *(i for i in idents if i not in explicit)]:
        uid = identifier_uid(ident)
        if uid is not None:
            return uid
    return None


def study_uid(res: Mapping[str, Any]) -> str:
    """The StudyInstanceUID of an ImagingStudy (or of a report's identifiers); "" when none."""
    return identifiers_uid(res.get("identifier")) or ""


def series_uid(series: Any) -> str:
    """SeriesInstanceUID of an ImagingStudy.series element, bare; "" when none."""
    return (plain_uid(series.get("uid")) or "") if isinstance(series, Mapping) else ""


def instance_uid(instance: Any) -> str:
    """SOPInstanceUID of an ImagingStudy.series.instance element, bare; "" when none."""
    return (plain_uid(instance.get("uid")) or "") if isinstance(instance, Mapping) else ""


def plain_series_uids(res: Mapping[str, Any]) -> dict[str, Any] | None:
    """A copy of an ImagingStudy whose series and instance UIDs written as ``urn:oid:`` are bare,
    or None when there is none to change.

    Why a repair rather than a quarantine: R4 types these elements ``id`` (no colon), some servers
    write the URN anyway, and the UID it names is the same; quarantining the study would hide
    that images exist.
    """
    if res.get("resourceType") != "ImagingStudy" or not isinstance(res.get("series"), list):
        return None
    changed = False
    series_out = []
    for s in res["series"]:
        if not isinstance(s, Mapping):
            series_out.append(s)
            continue
        s2 = dict(s)
        if _is_urn(s2.get("uid")) and (u := plain_uid(s2["uid"])):
            s2["uid"], changed = u, True
        if isinstance(s2.get("instance"), list):
            insts = []
            for inst in s2["instance"]:
                if isinstance(inst, Mapping) and _is_urn(inst.get("uid")) and (u := plain_uid(inst["uid"])):
                    inst, changed = {**inst, "uid": u}, True
                insts.append(inst)
            s2["instance"] = insts
        series_out.append(s2)
    return {**res, "series": series_out} if changed else None


def _is_urn(value: Any) -> bool:
    return isinstance(value, str) and value.strip()[:len(OID_PREFIX)].lower() == OID_PREFIX


STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."


@lru_cache(maxsize=2)
def _classes(key: str) -> tuple[frozenset[str], tuple[str, ...]]:
    data = yaml.safe_load(files("schemas").joinpath("tables/sop-classes.yaml").read_text(encoding="utf-8"))
    values = [str(v) for v in (data or {}).get(key) or []]
    return frozenset(v for v in values if not v.endswith(".")), tuple(v for v in values if v.endswith("."))


def _listed(sop_class: str, key: str) -> bool:
    exact, prefixes = _classes(key)
    return sop_class in exact or sop_class.startswith(prefixes)


def viewable_without_pixels(sop_class: str) -> bool:
    """Whether an instance of this class shows its content without Pixel Data (a waveform: the
    ECG tracing is the data), so that it counts as the study's images."""
    return _listed(plain_uid(sop_class) or "", "viewable_without_pixels")


def shows_nothing(sop_class: str, pixels: bool) -> bool:
    """An instance a viewer cannot show: no Pixel Data and not a waveform. It is not an image."""
    return not pixels and not viewable_without_pixels(sop_class)


def is_image_class(sop_class: str) -> bool:
    """Whether a SOP class is an image storage class (so its instances should carry Pixel Data):
    a storage class (``1.2.840.10008.5.1.4.1.1.*``) that ``schemas/tables/sop-classes.yaml`` does
    not list as a document, report, waveform, presentation state or RT object. An unknown or
    private class is not assumed to be an image."""
    cls = plain_uid(sop_class) or ""
    return cls.startswith(STORAGE_ROOT) and not _listed(cls, "not_images")
