"""The package's images as an IHE PDI / DICOM media file set: ``DICOM/...`` files plus ``DICOMDIR``.

Why not ``pydicom.fileset.FileSet.write``: it re-encodes the instance files it stages, and the
instances must stay byte-identical to what the source sent (the manifest and ``verify`` prove
it, and a consultant's viewer must see exactly what the hospital produced). So the instance
files are plain copies of their blobs, and only the DICOMDIR is built here, record by record.

A DICOMDIR links its records by byte offsets inside the DICOMDIR file itself. The offsets are
fixed-size (UL) values, so the file is written once with zeros, read back to learn where each
record item starts, filled in, and written again; the second write cannot move anything.

Paths follow PS3.10/PS3.12 (and PDI): components of at most 8 characters from ``A-Z0-9_``:
``DICOM/ST000001/SE000001/IM000001``. Attributes a DICOMDIR requires (Type 1) but the
instance lacks are filled with deterministic stand-ins (as DCMTK ``dcmmkdir --invent`` does),
so one odd file never keeps a whole disc from opening; the instance file itself is untouched.
"""

from __future__ import annotations

import io
import itertools
import logging
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pydicom.fileset
import pydicom.filewriter
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from aggregator.blobs import BlobStore
from aggregator.errors import PackageError
from aggregator.model import ImageRef

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
FILESET_ID = "SECONDOPINION"
ROOT_FOLDER = "DICOM"
UID_NAMESPACE = uuid.UUID("6f1c2b8e-3d0a-5c7e-9b4f-2a8d1e6c0b35")

#: SOP Class UID -> directory record type ("RT DOSE", "SR DOCUMENT", "ENCAP DOC", ...); images default to IMAGE
_RECORD_TYPES: dict[str, str] = dict(getattr(pydicom.fileset, "_FOUR_LEVEL_SOP_CLASSES", {}))
_RECORD_TYPES.update(getattr(pydicom.fileset, "_SINGLE_LEVEL_SOP_CLASSES", {}))
_RECORDERS: dict[str, Any] = dict(getattr(pydicom.fileset, "DIRECTORY_RECORDERS", {}))


@dataclass
class PlacedImage:
    """One instance and where it lies in the package."""

    image: ImageRef
    relpath: str
    header: Header = field(repr=False)


@dataclass
class _Series:
    uid: str
    items: list[PlacedImage] = field(default_factory=list)


@dataclass
class _Study:
    uid: str
    series: dict[str, _Series] = field(default_factory=dict)


@dataclass
class _Patient:
    key: str
    studies: dict[str, _Study] = field(default_factory=dict)


#: what the DICOMDIR, the placing order and the summary read of an *image* instance's header.
#: An image's header is cut down to these: a parsed header costs about 20 KiB, and a study of
#: 4000 slices (2 GB) would otherwise hold 80 MiB of them for the whole packaging. Other record
#: types (SR, RT, encapsulated documents...) keep their whole header: pydicom's directory
#: recorders read many more elements of them, and they come by the few, not the thousands.
_IMAGE_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
    "StudyDescription", "StudyID", "AccessionNumber", "Modality", "SeriesNumber", "SeriesDescription",
    "InstanceNumber",
)


#: an instance's header as the package reads it: the whole dataset, or (images) the values of
#: :data:`_IMAGE_KEYWORDS` plus TransferSyntaxUID in a plain dict; both answer ``.get(keyword)``
Header = Dataset | dict[str, Any]


def _slim(ds: Dataset, shared: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """The values of :data:`_IMAGE_KEYWORDS` as a plain dict (a tenth of a Dataset's memory).

    Values equal to one already seen (the study's and series' own, repeated in every instance)
    are taken from ``shared``, so thousands of slices hold one copy of each.
    """
    out: dict[str, Any] = {}
    for keyword in _IMAGE_KEYWORDS:
        try:
            value = ds.get(keyword)  # decoded with the source's character set
        except Exception:  # a value that cannot be decoded is treated as absent, as _text does
            value = None
        if value is not None:
            out[keyword] = shared.setdefault((keyword, str(value)), value)
    ts = _text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID")
    if ts:
        out["TransferSyntaxUID"] = shared.setdefault(("TransferSyntaxUID", ts), ts)
    return out


def _read_header(blobs: BlobStore, image: ImageRef, shared: dict[tuple[str, str], Any]) -> Header:
    """The instance's header, or an empty dataset when it cannot be parsed (the file is kept anyway)."""
    try:
        ds = pydicom.dcmread(blobs.path(image.sha256), stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many kinds on damaged files
        log.warning("DICOM header unreadable for %s (%s); using the record's UIDs", image.sop_instance_uid,
                    type(exc).__name__)
        return Dataset()
    sop_class = image.sop_class_uid or _text(ds, "SOPClassUID")
    return ds if _RECORD_TYPES.get(sop_class, "IMAGE") != "IMAGE" else _slim(ds, shared)


def _text(ds: Header, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a value that cannot be decoded is treated as absent
        return ""
    return "" if value is None else str(value).strip()


def _number(ds: Header, keyword: str) -> int | None:
    try:
        return int(str(ds.get(keyword)).strip())
    except (TypeError, ValueError):
        return None
    except Exception:
        return None


def place_images(images: Iterable[ImageRef], blobs: BlobStore) -> list[PlacedImage]:
    """Assign every instance a path ``DICOM/STnnnnnn/SEnnnnnn/IMnnnnnn``, in a stable order.

    Exact duplicates (same SOP Instance UID and same bytes) are kept once; two different files
    claiming one SOP Instance UID are both kept, so no received instance is lost.
    """
    seen: set[tuple[str, str]] = set()
    unique: list[ImageRef] = []
    for img in sorted(images, key=lambda i: (i.sop_instance_uid, i.sha256)):
        if (img.sop_instance_uid, img.sha256) in seen:
            continue
        seen.add((img.sop_instance_uid, img.sha256))
        if not blobs.exists(img.sha256):
            raise PackageError("DICOM instance is missing from the blob store", item=img.sop_instance_uid)
        unique.append(img)
    shared: dict[tuple[str, str], Any] = {}
    headers = {(i.sop_instance_uid, i.sha256): _read_header(blobs, i, shared) for i in unique}
    del shared

    def study_key(i: ImageRef) -> tuple[str, str]:
        h = headers[(i.sop_instance_uid, i.sha256)]
        return (_text(h, "StudyDate"), i.study_instance_uid)

    def series_key(i: ImageRef) -> tuple[int, str]:
        h = headers[(i.sop_instance_uid, i.sha256)]
        n = _number(h, "SeriesNumber")
        return (n if n is not None else 1 << 30, i.series_instance_uid)

    def instance_key(i: ImageRef) -> tuple[int, str, str]:
        h = headers[(i.sop_instance_uid, i.sha256)]
        n = _number(h, "InstanceNumber")
        return (n if n is not None else 1 << 30, i.sop_instance_uid, i.sha256)

    # study order: first sorted instance's study date, then UID; series/instances by their numbers
    study_order = sorted({i.study_instance_uid for i in unique},
                         key=lambda s: min(study_key(i) for i in unique if i.study_instance_uid == s))
    placed: list[PlacedImage] = []
    for st_n, study_uid in enumerate(study_order, 1):
        in_study = [i for i in unique if i.study_instance_uid == study_uid]
        series_order = sorted({i.series_instance_uid for i in in_study},
                              key=lambda s: min(series_key(i) for i in in_study if i.series_instance_uid == s))
        for se_n, series_uid in enumerate(series_order, 1):
            members = sorted((i for i in in_study if i.series_instance_uid == series_uid), key=instance_key)
            for im_n, img in enumerate(members, 1):
                rel = f"{ROOT_FOLDER}/ST{st_n:06d}/SE{se_n:06d}/IM{im_n:06d}"
                placed.append(PlacedImage(img, rel, headers[(img.sop_instance_uid, img.sha256)]))
    return placed


def _patient_key(p: PlacedImage) -> str:
    return _text(p.header, "PatientID") or p.image.patient_id or "UNKNOWN"


def _tree(placed: Sequence[PlacedImage]) -> list[_Patient]:
    patients: dict[str, _Patient] = {}
    # a study belongs to the patient of its first instance, so one study never splits across patients
    study_patient: dict[str, str] = {}
    for p in placed:
        pkey = study_patient.setdefault(p.image.study_instance_uid, _patient_key(p))
        patient = patients.setdefault(pkey, _Patient(pkey))
        study = patient.studies.setdefault(p.image.study_instance_uid, _Study(p.image.study_instance_uid))
        study.series.setdefault(p.image.series_instance_uid, _Series(p.image.series_instance_uid)).items.append(p)
    return [patients[k] for k in sorted(patients)]


def _record(kind: str, source: Header, charset: bool) -> Dataset:
    rec = Dataset()
    rec.OffsetOfTheNextDirectoryRecord = 0
    rec.RecordInUseFlag = 0xFFFF
    rec.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    rec.DirectoryRecordType = kind
    if charset and source.get("SpecificCharacterSet") is not None:
        rec.SpecificCharacterSet = source.get("SpecificCharacterSet")
    return rec


def _copy(rec: Dataset, source: Header, keyword: str, default: Any, ascii_only: bool) -> None:
    try:
        value = source.get(keyword)
    except Exception:
        value = None
    if value is None or str(value).strip() == "":
        value = default
    if ascii_only and value is not None:
        value = str(value).encode("ascii", "replace").decode("ascii")
    setattr(rec, keyword, value)


def _records(patients: list[_Patient], ascii_only: bool) -> tuple[list[bytearray], list[int], dict[int, int],
                                                                  dict[int, int]]:
    """Records in depth-first order, each encoded as its sequence item at once (a few hundred bytes
    instead of a Dataset of a few KiB), plus the root chain and next/lower links by record index."""
    records: list[bytearray] = []
    nxt: dict[int, int] = {}
    lower: dict[int, int] = {}

    def chain(indices: list[int]) -> None:
        for a, b in itertools.pairwise(indices):
            nxt[a] = b

    roots: list[int] = []
    charset = not ascii_only
    for patient in patients:
        first = next(iter(next(iter(patient.studies.values())).series.values())).items[0]
        rec = _record("PATIENT", first.header, charset)
        _copy(rec, first.header, "PatientName", "", ascii_only)
        rec.PatientID = patient.key if not ascii_only else patient.key.encode("ascii", "replace").decode()
        roots.append(len(records))
        p_idx = len(records)
        records.append(_item_bytes(rec))
        study_idx: list[int] = []
        for st_n, study in enumerate(patient.studies.values(), 1):
            s_first = next(iter(study.series.values())).items[0]
            h = s_first.header
            rec = _record("STUDY", h, charset)
            _copy(rec, h, "StudyDate", "19000101", ascii_only)
            _copy(rec, h, "StudyTime", "000000", ascii_only)
            _copy(rec, h, "StudyDescription", "", ascii_only)
            rec.StudyInstanceUID = study.uid
            _copy(rec, h, "StudyID", str(st_n), ascii_only)
            _copy(rec, h, "AccessionNumber", "", ascii_only)
            study_idx.append(len(records))
            records.append(_item_bytes(rec))
            series_idx: list[int] = []
            for se_n, series in enumerate(study.series.values(), 1):
                h = series.items[0].header
                rec = _record("SERIES", h, charset)
                _copy(rec, h, "Modality", series.items[0].image.modality or "OT", ascii_only)
                rec.SeriesInstanceUID = series.uid
                _copy(rec, h, "SeriesNumber", str(se_n), ascii_only)
                series_idx.append(len(records))
                records.append(_item_bytes(rec))
                inst_idx: list[int] = []
                for im_n, p in enumerate(series.items, 1):
                    inst_idx.append(len(records))
                    records.append(_item_bytes(_instance_record(p, im_n, charset, ascii_only)))
                chain(inst_idx)
                lower[series_idx[-1]] = inst_idx[0]
            chain(series_idx)
            lower[study_idx[-1]] = series_idx[0]
        chain(study_idx)
        lower[p_idx] = study_idx[0]
    chain(roots)
    return records, roots, nxt, lower


def _instance_record(p: PlacedImage, number: int, charset: bool, ascii_only: bool) -> Dataset:
    h = p.header
    sop_class = p.image.sop_class_uid or _text(h, "SOPClassUID")
    kind = _RECORD_TYPES.get(sop_class, "IMAGE")
    rec = _record(kind, h, charset and kind != "IMAGE")
    rec.ReferencedFileID = p.relpath.split("/")
    rec.ReferencedSOPClassUIDInFile = sop_class
    rec.ReferencedSOPInstanceUIDInFile = p.image.sop_instance_uid
    ts = p.image.transfer_syntax_uid or (_text(h, "TransferSyntaxUID") if isinstance(h, dict)
                                         else _text(getattr(h, "file_meta", Dataset()), "TransferSyntaxUID"))
    rec.ReferencedTransferSyntaxUIDInFile = ts or ExplicitVRLittleEndian
    extra: Dataset | None = None
    if kind != "IMAGE" and kind in _RECORDERS and not ascii_only:
        try:
            extra = _RECORDERS[kind](h)
        except Exception:  # the instance lacks what that record type wants: keep the basic record
            extra = None
    if extra is not None:
        for elem in extra:
            if elem.tag not in rec:
                rec.add(elem)
    else:
        _copy(rec, h, "InstanceNumber", str(number), ascii_only)
    return rec


def _item_bytes(rec: Dataset) -> bytearray:
    """One directory record as pydicom writes a sequence item: item tag, defined length, dataset."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    pydicom.filewriter.write_dataset(fp, rec)
    body = fp.getvalue()
    return bytearray(struct.pack("<HHL", *_ITEM, len(body)) + body)


def _set_ul(item: bytearray, tag: tuple[int, int], value: int) -> None:
    """Set the UL element ``tag`` at the top level of an encoded record item (explicit VR LE)."""
    pos = 8
    while pos + 8 <= len(item):
        group, elem = struct.unpack_from("<HH", item, pos)
        vr = bytes(item[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", item, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", item, pos + 6)
            value_at = pos + 8
        if (group, elem) == tag:
            if vr != b"UL" or length != 4:
                break
            struct.pack_into("<L", item, value_at, value)
            return
        if length == 0xFFFFFFFF:
            break
        pos = value_at + length
    raise PackageError("DICOMDIR: a directory record lacks its offset element", item="DICOMDIR")


def _head(sop_uid: str, first: int, last: int, sequence_length: int) -> bytes:
    """Everything before the first record: file meta, file-set elements, the sequence's header."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MEDIA_STORAGE_DIRECTORY)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("DICOMDIR", Dataset(), file_meta=meta, preamble=b"\x00" * 128)
    ds.FileSetID = FILESET_ID
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = first
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = last
    ds.FileSetConsistencyFlag = 0
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    # (0004,1220) is the data set's last element: its header, then the items, written by us
    return buf.getvalue() + struct.pack("<HH2s2xL", *_DIRECTORY_RECORD_SEQUENCE, b"SQ", sequence_length)


def _encode(records: list[bytearray], roots: list[int], nxt: dict[int, int], lower: dict[int, int],
            sop_uid: str) -> tuple[bytes, list[int]]:
    """The DICOMDIR's bytes and its records' offsets: each record's place follows from the sizes
    of the records before it, so the links are set in the encoded records without a second pass."""
    total = sum(len(r) for r in records)
    start = len(_head(sop_uid, 0, 0, total))
    offsets = []
    pos = start
    for r in records:
        offsets.append(pos)
        pos += len(r)
    for i, r in enumerate(records):
        _set_ul(r, _NEXT_RECORD, offsets[nxt[i]] if i in nxt else 0)
        _set_ul(r, _LOWER_RECORD, offsets[lower[i]] if i in lower else 0)
    head = _head(sop_uid, offsets[roots[0]] if roots else 0, offsets[roots[-1]] if roots else 0, total)
    return head + b"".join(records), offsets


#: explicit VR little endian: these VRs have 2 reserved bytes and a 4-byte length
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM = (0xFFFE, 0xE000)
_SEQ_END = (0xFFFE, 0xE0DD)
_DIRECTORY_RECORD_SEQUENCE = (0x0004, 0x1220)
_NEXT_RECORD = (0x0004, 0x1400)
_LOWER_RECORD = (0x0004, 0x1420)


def _item_offsets(data: bytes) -> list[int]:
    """File offsets of the DirectoryRecordSequence's items in an encoded DICOMDIR.

    A walk over the top-level elements of what :func:`_encode` wrote (explicit VR little endian,
    items of defined length, as pydicom writes new datasets), not a parse: parsing a DICOMDIR of
    thousands of records back into datasets cost as much memory as building it.
    """
    pos = 128 + 4  # preamble, "DICM"
    end = len(data)
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            value = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value = pos + 8
        if (group, elem) == _DIRECTORY_RECORD_SEQUENCE:
            return _items(data, value, None if length == 0xFFFFFFFF else value + length)
        if length == 0xFFFFFFFF:
            raise PackageError("DICOMDIR: unexpected undefined length before the record sequence", item="DICOMDIR")
        pos = value + length
    return []


def _items(data: bytes, pos: int, stop: int | None) -> list[int]:
    offsets = []
    while pos + 8 <= (stop if stop is not None else len(data)):
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        if (group, elem) == _SEQ_END:
            break
        if (group, elem) != _ITEM or length == 0xFFFFFFFF:
            raise PackageError("DICOMDIR: unexpected encoding of a directory record", item="DICOMDIR")
        offsets.append(pos)
        pos += 8 + length
    return offsets


def dicomdir_bytes(placed: Sequence[PlacedImage], *, seed: str) -> bytes:
    """The DICOMDIR for ``placed`` (paths relative to the package root, where DICOMDIR lies)."""
    sop_uid = f"2.25.{uuid.uuid5(UID_NAMESPACE, 'dicomdir|' + seed).int}"
    patients = _tree(placed)
    for ascii_only in (False, True):
        try:
            records, roots, nxt, lower = _records(patients, ascii_only)
            data, offsets = _encode(records, roots, nxt, lower, sop_uid)
        except Exception as exc:  # an undecodable character set: retry with plain ASCII record values
            if ascii_only:
                raise PackageError(f"cannot write the DICOMDIR ({type(exc).__name__})", item="DICOMDIR")
            log.warning("DICOMDIR: retrying with ASCII-only record values (%s)", type(exc).__name__)
            continue
        if _item_offsets(data) != offsets:  # the walk of what was written finds each record where it was put
            raise PackageError("DICOMDIR record offsets do not match the records written", item="DICOMDIR")
        return data
    raise PackageError("cannot write the DICOMDIR", item="DICOMDIR")  # pragma: no cover


def write_images(root: Path, placed: Sequence[PlacedImage], blobs: BlobStore, *, seed: str,
                 copy: bool = True) -> list[str]:
    """Copy the instance files byte for byte and write DICOMDIR; returns the relative paths written.

    With ``copy=False`` only DICOMDIR is written: the caller (the zip writer) streams each
    instance from the blob store into the archive itself.
    """
    written: list[str] = []
    for p in placed:
        if copy:
            blobs.copy_to(p.image.sha256, root / p.relpath, atomic=False)  # staged, renamed as a whole
        written.append(p.relpath)
    # written even with no images: an empty file set is valid, and the layout stays the same
    (root / "DICOMDIR").write_bytes(dicomdir_bytes(placed, seed=seed))
    written.append("DICOMDIR")
    return written
