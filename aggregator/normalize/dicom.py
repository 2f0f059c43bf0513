"""DICOM instances -> ImagingStudy resources and :class:`ImageRef` rows.

Headers are re-read from the raw blob (``stop_before_pixels``) instead of trusting connector
meta, so the description matches the bytes the package will ship. Instances are grouped by
StudyInstanceUID; the same SOP Instance received twice (two sources, or a re-pull) is kept once.

Where the images lie: every study that has instances in the record gets an ``endpoint``
reference to one ``Endpoint`` resource whose ``address`` is ``DICOMDIR``, the package-relative
IHE PDI index under which the package writes the images (``DICOM/...``). Endpoint.connectionType
has an extensible binding and no code for removable media, so a local code says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import pydicom
from pydicom.errors import InvalidDicomError

from aggregator.blobs import BlobStore
from aggregator.errors import AggregatorError
from aggregator.ledger import LedgerEntry
from aggregator.model import ImageRef, Quarantined
from aggregator.normalize import ids, uids

KIND_DICOM = "dicom"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENDPOINT_ID = ids.new_id("endpoint", "package-dicomdir")


@dataclass(frozen=True)
class Instance:
    """The header fields normalization needs from one DICOM instance (PHI stays in memory only)."""

    source_id: int
    key: str
    sha256: str
    size: int
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    study_description: str
    accession: str
    series_number: int | None
    series_description: str
    body_part: str
    instance_number: int | None
    pixels: bool = True
    """Whether the instance carries Pixel Data (see :func:`_has_pixel_data`)."""
    institution: str = ""
    """InstitutionName (0008,0080): who made the images, named in next actions of image gaps."""


def _s(ds: Any, name: str) -> str:
    try:
        v = ds.get(name)
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeError):
        return ""
    return "" if v is None else str(v).strip().strip("\x00")


def _int(ds: Any, name: str) -> int | None:
    try:
        v = ds.get(name)
        return None if v is None or v == "" else int(v)
    except (ValueError, TypeError, OverflowError):
        return None


def read_instance(entry: LedgerEntry, blobs: BlobStore) -> Instance:
    """Parse one stored DICOM blob; raises :class:`ValueError` with a PHI-free reason."""
    try:
        if entry.sha256:
            sha256, path = entry.sha256, blobs.path(entry.sha256)
            if not path.is_file():
                raise ValueError("raw content missing from the blob store")
        else:
            # kept by SOP Instance UID while it was retrieved (see aggregator.blobs): hashed here
            # once, and linked into the content-addressed store the package is written from
            sha256 = blobs.adopt_instance(entry.source_id, entry.key).sha256
            path = blobs.path(sha256)
    except AggregatorError as exc:
        raise ValueError("raw content missing from the blob store") from exc
    with warnings.catch_warnings(), path.open("rb") as fp:
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
        except InvalidDicomError:
            try:
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            except Exception as exc:  # pydicom raises many types on garbage input
                raise ValueError(f"broken DICOM: {type(exc).__name__}") from exc
        except Exception as exc:
            raise ValueError(f"broken DICOM: {type(exc).__name__}") from exc
        pixels = _has_pixel_data(ds, fp)
        ts = ""
        fm = getattr(ds, "file_meta", None)
        if fm is not None:
            ts = _s(fm, "TransferSyntaxUID")
        sop = _s(ds, "SOPInstanceUID") or (_s(fm, "MediaStorageSOPInstanceUID") if fm is not None else "")
        sop_class = _s(ds, "SOPClassUID") or (_s(fm, "MediaStorageSOPClassUID") if fm is not None else "")
        study, series = _s(ds, "StudyInstanceUID"), _s(ds, "SeriesInstanceUID")
        missing = [n for n, v in (("SOPInstanceUID", sop), ("StudyInstanceUID", study),
                                  ("SeriesInstanceUID", series)) if not v]
        if missing:
            raise ValueError(f"broken DICOM: missing {', '.join(missing)}")
        return Instance(
            entry.source_id, entry.key, sha256, int(entry.size or path.stat().st_size), sop, sop_class,
            study, series, ts, _s(ds, "Modality"), _s(ds, "PatientID"), _s(ds, "IssuerOfPatientID"),
            _s(ds, "PatientName"), _s(ds, "PatientBirthDate"), _s(ds, "PatientSex"), _s(ds, "StudyDate"),
            _s(ds, "StudyTime"), _s(ds, "StudyDescription"), _s(ds, "AccessionNumber"), _int(ds, "SeriesNumber"),
            _s(ds, "SeriesDescription"), _s(ds, "BodyPartExamined"), _int(ds, "InstanceNumber"), pixels,
            institution=_s(ds, "InstitutionName"),
        )


#: (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
DEFLATED = "1.2.840.10008.1.2.1.99"
NO_PIXELS = "no pixel data (7FE0,0010): not an image"


def _has_pixel_data(ds: Any, fp: BinaryIO) -> bool:
    """Whether the instance carries pixels: a non-empty (7FE0,0010) (or float) Pixel Data element.

    Why it matters: an image SOP class says what the instance should be, not what it holds; an
    instance without Pixel Data (a header-only copy, a stripped export, a structured report)
    shows the consultant nothing and must not count as the study's images.

    The header was read with ``stop_before_pixels``, which leaves the file positioned at the
    start of the pixel element when there is one and at the end otherwise, so the pixels are
    never read: the element's header says whether it is there and how long it is.
    """
    fm = getattr(ds, "file_meta", None)
    if fm is not None and _s(fm, "TransferSyntaxUID") == DEFLATED:
        # the data set is compressed as a whole: the file position says nothing, read it all
        fp.seek(0)
        full = pydicom.dcmread(fp, force=True)
        return any(t in full and len(full[t].value or b"") > 0 for t in PIXEL_TAGS)
    head = fp.read(12)
    if len(head) < 8:
        return False
    implicit, little = getattr(ds, "original_encoding", (False, True))
    order: Literal["little", "big"] = "little" if little is not False else "big"
    tag = int.from_bytes(head[0:2], order) << 16 | int.from_bytes(head[2:4], order)
    if tag not in PIXEL_TAGS:
        return False
    if implicit:
        length = int.from_bytes(head[4:8], order)
    elif len(head) >= 12 and head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OL", b"OV"):
        length = int.from_bytes(head[8:12], order)
    else:
        length = int.from_bytes(head[6:8], order)
    return length != 0  # 0xFFFFFFFF: encapsulated fragments


def read_instances(entries: Iterable[LedgerEntry], blobs: BlobStore,
                   quarantine: Callable[[Quarantined], None]) -> list[Instance]:
    """Every readable instance, sorted by (source, key); broken ones are quarantined."""
    out = []
    for e in entries:
        if e.kind != KIND_DICOM:
            continue
        try:
            out.append(read_instance(e, blobs))
        except ValueError as exc:
            quarantine(Quarantined(e.source_id, e.kind, e.key, str(exc)))
    out.sort(key=lambda i: (i.source_id, i.key))
    return out


def _dicom_datetime(d: str, t: str) -> str | None:
    """DICOM DA (+TM) -> FHIR dateTime; a time without a zone is left as a bare date (FHIR
    requires a zone whenever a time is given, and the DICOM header does not say which)."""
    d = d.replace(".", "").replace("-", "")
    if len(d) != 8 or not d.isdigit():
        return None
    return f"{d[:4]}-{d[4:6]}-{d[6:]}"


def _coding(modality: str) -> dict[str, str]:
    return {"system": DCM, "code": modality}


def build_study(uid: str, instances: list[Instance], patient_urn: str) -> dict[str, Any]:
    """One ImagingStudy (R4) describing the instances of study ``uid`` held in the record."""
    first = instances[0]
    by_series: dict[str, list[Instance]] = {}
    for inst in instances:
        by_series.setdefault(inst.series_uid, []).append(inst)
    series = []
    for suid in sorted(by_series):
        members = sorted(by_series[suid], key=lambda i: (i.instance_number or 0, i.sop_uid))
        head = members[0]
        s: dict[str, Any] = {"uid": suid}
        if head.series_number is not None:
            s["number"] = head.series_number
        s["modality"] = _coding(head.modality or "OT")
        if head.series_description:
            s["description"] = head.series_description
        s["numberOfInstances"] = len(members)
        if head.body_part:
            s["bodySite"] = {"display": head.body_part}
        if head.institution:
            # R4 has no institution element; the performing organization is the closest, and the
            # reference says it names an Organization
            s["performer"] = [{"actor": {"type": "Organization", "display": head.institution}}]
        s["instance"] = []
        for m in members:
            row: dict[str, Any] = {"uid": m.sop_uid,
                                   "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{m.sop_class}"}}
            if m.instance_number is not None:
                row["number"] = m.instance_number
            s["instance"].append(row)
        series.append(s)
    modalities = sorted({i.modality for i in instances if i.modality})
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": ids.study_id(uid),
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
    }
    accession = next((i.accession for i in instances if i.accession), "")
    if accession:
        study["identifier"].append({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": accession})
    if modalities:
        study["modality"] = [_coding(m) for m in modalities]
    study["subject"] = {"reference": patient_urn}
    started = _dicom_datetime(first.study_date, first.study_time)
    if started:
        study["started"] = started
    study["endpoint"] = [{"reference": ids.urn(ENDPOINT_ID)}]
    study["numberOfSeries"] = len(series)
    study["numberOfInstances"] = sum(s["numberOfInstances"] for s in series)
    if first.study_description:
        study["description"] = first.study_description
    study["series"] = series
    return study


def endpoint() -> dict[str, Any]:
    """The package's DICOM images: IHE PDI layout, DICOMDIR at the package root."""
    return {
        "resourceType": "Endpoint",
        "id": ENDPOINT_ID,
        "status": "active",
        "connectionType": {"system": "urn:aggregator:endpoint-connection-type", "code": "dicom-media",
                           "display": "DICOM File-set on the package (IHE PDI: DICOMDIR + DICOM/)"},
        "name": "DICOM images in this package",
        "payloadType": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type",
                                     "code": "DICOM"}], "text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": "DICOMDIR",
    }


def merge_study(base: dict[str, Any], other: dict[str, Any]) -> None:
    """Union ``other``'s series and instances into ``base`` (same StudyInstanceUID); counts are
    never lowered, so a FHIR study that lists more instances than were received still says so."""
    series = {s.get("uid"): s for s in base.get("series") or [] if isinstance(s, dict)}
    for s in other.get("series") or []:
        if not isinstance(s, dict):
            continue
        mine = series.get(s.get("uid"))
        if mine is None:
            base.setdefault("series", []).append(s)
            series[s.get("uid")] = s
            continue
        for k, v in s.items():
            if k not in ("instance", "numberOfInstances") and k not in mine:
                mine[k] = v
        have = {i.get("uid") for i in mine.get("instance") or [] if isinstance(i, dict)}
        for inst in s.get("instance") or []:
            if isinstance(inst, dict) and inst.get("uid") not in have:
                mine.setdefault("instance", []).append(inst)
                have.add(inst.get("uid"))
        mine["numberOfInstances"] = max(int(mine.get("numberOfInstances") or 0),
                                        int(s.get("numberOfInstances") or 0), len(mine.get("instance") or []))
    for s in base.get("series") or []:
        if isinstance(s, dict) and s.get("instance"):
            s["numberOfInstances"] = max(int(s.get("numberOfInstances") or 0), len(s["instance"]))
    mods = {(m.get("system"), m.get("code")): m for m in base.get("modality") or [] if isinstance(m, dict)}
    for m in other.get("modality") or []:
        if isinstance(m, dict):
            mods.setdefault((m.get("system"), m.get("code")), m)
    if mods:
        base["modality"] = [mods[k] for k in sorted(mods, key=lambda k: (str(k[0]), str(k[1])))]
    for k in ("endpoint",):
        refs = {r.get("reference"): r for r in base.get(k) or [] if isinstance(r, dict)}
        for r in other.get(k) or []:
            if isinstance(r, dict):
                refs.setdefault(r.get("reference"), r)
        if refs:
            base[k] = list(refs.values())
    for k in ("started", "description", "subject"):
        if k not in base and k in other:
            base[k] = other[k]
    _merge_identifiers(base, other)
    n_series = len(base.get("series") or [])
    base["numberOfSeries"] = max(int(base.get("numberOfSeries") or 0), int(other.get("numberOfSeries") or 0),
                                 n_series)
    total = sum(int(s.get("numberOfInstances") or 0) for s in base.get("series") or [] if isinstance(s, dict))
    base["numberOfInstances"] = max(int(base.get("numberOfInstances") or 0),
                                    int(other.get("numberOfInstances") or 0), total)


def _merge_identifiers(base: dict[str, Any], other: dict[str, Any]) -> None:
    """Add ``other``'s identifiers that ``base`` lacks: the accession number the DICOM headers
    carry is what a radiology department asks for, and Synthea-style FHIR studies have none. The
    study UID is not repeated in another spelling (``urn:dicom:uid`` vs ``urn:ietf:rfc:3986``)."""
    mine = [i for i in base.get("identifier") or [] if isinstance(i, dict)]
    have_uids = {u for i in mine if (u := uids.identifier_uid(i))}
    have_values = {(str(i.get("system") or ""), str(i.get("value") or "")) for i in mine}
    have_plain = {str(i.get("value") or "") for i in mine}
    added = False
    for ident in other.get("identifier") or []:
        if not isinstance(ident, dict) or not ident.get("value"):
            continue
        uid = uids.identifier_uid(ident)
        if uid is not None:
            if uid in have_uids:
                continue
            have_uids.add(uid)
        elif (str(ident.get("system") or ""), str(ident["value"])) in have_values or (
                not ident.get("system") and str(ident["value"]) in have_plain):
            continue  # an accession without a system matches the same value under any system
        mine.append(ident)
        have_values.add((str(ident.get("system") or ""), str(ident["value"])))
        added = True
    if added:
        base["identifier"] = mine


def pixel_notes(instances: Iterable[Instance]) -> list[Quarantined]:
    """Ledger notes for the kept instances without pixel data (waveforms aside: the tracing is their
    content), sorted: they go to the package (never dropped) but are not images, and the
    navigator should know before the consultant opens them."""
    notes = [Quarantined(i.source_id, KIND_DICOM, i.key,
                         f"{NO_PIXELS} (SOP class {i.sop_class or 'unknown'}"
                         f"{', an image class' if uids.is_image_class(i.sop_class) else ''}; "
                         f"study {i.study_uid}, instance {i.sop_uid})")
             for i in instances if uids.shows_nothing(i.sop_class, i.pixels)]
    return sorted(notes, key=lambda n: (n.source_id, n.key))


def image_ref(inst: Instance) -> ImageRef:
    return ImageRef(inst.sop_uid, inst.sop_class, inst.study_uid, inst.series_uid, inst.transfer_syntax,
                    inst.sha256, inst.size, inst.modality, inst.patient_id, inst.source_id, inst.pixels)


def study_uid_of(res: dict[str, Any]) -> str:
    """The study's UID however the identifier spells it (see :mod:`.uids`): the key that merges a
    FHIR ImagingStudy with the one built from its DICOM files."""
    return uids.study_uid(res)
