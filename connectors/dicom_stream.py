"""What the DIMSE and DICOMweb connectors share: Part 10 framing, status classes, socket options.

Instances are stored *as received*: the dataset bytes that came over the wire are never decoded
and re-encoded, because a re-encode can silently change a file (private tags, odd VRs, character
sets) and costs most of the CPU time of a retrieve. For DIMSE we only add what Part 10 needs
around those bytes - the 128-byte preamble, ``DICM`` and a File Meta group built from the
presentation context the dataset arrived on. WADO-RS parts already are Part 10 files.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from connectors.base import KIND_DICOM, KIND_QUERY, PatientRef, Sink

log = logging.getLogger(__name__)

#: Our implementation identity in the File Meta of the files we frame (PS3.7 D.3.3.3 rules:
#: a UID root under 2.25 built from a fixed UUID, plus a short version name).
IMPLEMENTATION_CLASS_UID = "2.25.174906223716470318474418213315418526071"
IMPLEMENTATION_VERSION_NAME = "AGGREGATOR_1"

PREAMBLE = b"\x00" * 128 + b"DICM"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element (the File Meta group is always encoded that way)."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _uid(value: str) -> bytes:
    return _even(value.strip().encode("ascii"), b"\x00")


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
              source_ae: str | None = None) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1) for one instance.

    Hand-encoded rather than built with pydicom: it is a few fixed elements, and doing it with
    ``struct`` keeps the per-instance cost in microseconds on 300-instance studies.
    """
    body = b"".join((
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _uid(sop_class_uid)),
        _element(0x0002, 0x0003, b"UI", _uid(sop_instance_uid)),
        _element(0x0002, 0x0010, b"UI", _uid(transfer_syntax)),
        _element(0x0002, 0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
        _element(0x0002, 0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
        _element(0x0002, 0x0016, b"AE", _even(source_ae.strip().encode("ascii"), b" ")) if source_ae else b"",
    ))
    return PREAMBLE + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def split_part10(data: bytes | memoryview) -> tuple[int, str]:
    """Return (offset of the dataset, transfer syntax UID) of a Part 10 file held in memory.

    Only the File Meta group is parsed (explicit VR little endian by definition); used to
    compare files with different File Meta but the same dataset bytes, and to read the transfer
    syntax of WADO-RS parts without decoding the dataset.
    """
    mv = memoryview(data)
    if len(mv) < 132 or bytes(mv[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    pos = 132
    ts = ""
    while pos + 8 <= len(mv):
        group, elem = struct.unpack_from("<HH", mv, pos)
        if group != 0x0002:
            break
        vr = bytes(mv[pos + 4 : pos + 6])
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            (length,) = struct.unpack_from("<I", mv, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", mv, pos + 6)
            start = pos + 8
        if elem == 0x0010:
            ts = bytes(mv[start : start + length]).rstrip(b"\x00 ").decode("ascii")
        pos = start + length
    return pos, ts


# --- DIMSE statuses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusClass:
    """How a DIMSE status is treated: ``ok`` covers Success *and* Warning (PS3.7 C)."""

    code: int
    category: str
    ok: bool
    pending: bool

    @property
    def hex(self) -> str:
        return f"0x{self.code:04X}"


#: Failure codes in the 01xx/02xx ranges that PS3.7 Annex C names; 0x0107 and 0x0116 are warnings.
_WARNING_CODES = frozenset({0x0001, 0x0107, 0x0116})


def status_category(code: int) -> str:
    """The PS3.7 Annex C class of a DIMSE status: Success, Warning, Failure, Cancel or Pending."""
    if code == 0x0000:
        return "Success"
    if code in (0xFF00, 0xFF01):
        return "Pending"
    if code == 0xFE00:
        return "Cancel"
    if code in _WARNING_CODES or 0xB000 <= code <= 0xBFFF:
        return "Warning"
    if 0xA000 <= code <= 0xAFFF or 0xC000 <= code <= 0xCFFF or 0x0100 <= code <= 0x02FF:
        return "Failure"
    return "Unknown"


def classify_status(code: int) -> StatusClass:
    """Classify a DIMSE status; warnings (0xB000, 0x0107...) count as success."""
    category = status_category(code)
    return StatusClass(code, category, category in ("Success", "Warning"), category == "Pending")


# --- sockets ----------------------------------------------------------------------------------

#: Socket buffer used for large transfers; big enough that one recv() moves a whole max PDU.
SOCKET_BUFFER = 4 * 1024 * 1024


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY on, so small DIMSE responses do not wait for Nagle's ~40 ms delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # pragma: no cover - e.g. a non-TCP socket in a test harness
        log.debug("could not set TCP_NODELAY: %s", exc)


# --- handing instances to the sink ------------------------------------------------------------


def store_instance(sink: Sink, chunks: Iterable[bytes | memoryview], *, sop_uid: str,
                   meta: Mapping[str, Any]) -> None:
    """Hand one Part 10 instance (as a few chunks, no concatenation) to the sink.

    The sink hashes and writes the chunks to a temporary file and renames it into the blob
    store, so an instance is either complete or absent. Keys are SOP Instance UIDs, so a second
    copy of the same instance collapses onto the first ledger row.
    """
    sink.dicom(sop_uid, chunks, meta=dict(meta))  # type: ignore[arg-type]


def record_failure(sink: Sink, sop_uid: str, reason: str, status: int | str | None,
                   meta: Mapping[str, Any] | None = None) -> None:
    status_text = f"0x{status:04X}" if isinstance(status, int) else status
    sink.failed(KIND_DICOM, sop_uid, reason, status=status_text, meta=dict(meta or {}))


# --- spooling an incoming instance -------------------------------------------------------------

#: An instance larger than this is spilled to a temporary file while it arrives.
SPILL_BYTES = 16 * 1024 * 1024


class SpoolBuffer:
    """Collects one instance's bytes: chunks kept in memory while small, a temp file past ``SPILL_BYTES``.

    Chunks may be memoryviews of received PDUs: no copy is made while the instance is small, and
    memory stays bounded for a single huge (e.g. multi-frame) instance.
    """

    def __init__(self, spill_bytes: int = SPILL_BYTES) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.size = 0
        self.spill_bytes = spill_bytes
        self.file: Any = None

    def write(self, data: bytes | memoryview) -> None:
        if not len(data):
            return
        self.size += len(data)
        if self.file is not None:
            self.file.write(data)
            return
        self.chunks.append(data)
        if self.size > self.spill_bytes:
            import tempfile

            self.file = tempfile.TemporaryFile()
            for c in self.chunks:
                self.file.write(c)
            self.chunks = []

    def head(self, n: int) -> bytes:
        if self.file is not None:
            self.file.seek(0)
            return bytes(self.file.read(n))
        out = bytearray()
        for c in self.chunks:
            out += c[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)

    def iter_chunks(self, block: int = 1024 * 1024) -> Iterable[bytes | memoryview]:
        if self.file is None:
            yield from self.chunks
            return
        self.file.seek(0)
        while True:
            b = self.file.read(block)
            if not b:
                return
            yield b

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.chunks = []


# The DIMSE association itself (PDUs, commands, C-FIND/C-GET/C-MOVE/C-ECHO) is in
# connectors.dimse_link.


# --- writing behind the network -----------------------------------------------------------------


class BackgroundWriter:
    """Runs sink writes on one worker thread, so hashing and disk writes overlap the network.

    Both hashlib and file writes release the GIL on large buffers, so on two cores the socket
    keeps being read while the previous instance is written. At most ``max_bytes`` of received
    data wait in the queue (bounded memory). The sink is only ever called from the worker while
    the writer is open, so it needs no locking. ``close()`` waits for everything and re-raises
    the first error that was not an item-level failure.
    """

    #: Received bytes that may wait for the writer. Measured on a 300 x 512 KiB WADO-RS study:
    #: 8 MiB cost ~7-9 MiB of RSS growth, 2 MiB ~3-4 MiB, with no measurable loss of speed.
    MAX_PENDING = 2 * 1024 * 1024

    def __init__(self, max_bytes: int = MAX_PENDING) -> None:
        import threading

        self.max_bytes = max_bytes
        self._pending = 0
        self._queue: list[tuple[Callable[[], None], int]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dicom-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], size: int) -> None:
        with self._cond:
            while self._pending and self._pending + size > self.max_bytes and self.error is None:
                self._cond.wait()
            if self.error is not None:
                raise self.error
            self._queue.append((job, size))
            self._pending += size
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job, size = self._queue.pop(0)
            try:
                if self.error is None:
                    job()
            except BaseException as exc:  # handed to the submitting thread
                self.error = exc
            finally:
                with self._cond:
                    self._pending -= size
                    self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted job has run; re-raise a worker error."""
        with self._cond:
            while self._pending or self._queue:
                if self.error is not None:
                    break
                self._cond.wait()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- report to study: hints from the FHIR data, matched against the archive ---------------------
#
# Rule (which archive studies a hint may bring in):
#   * A hint is queried at STUDY level by StudyInstanceUID, else by AccessionNumber, else by
#     StudyDate + ModalitiesInStudy scoped to the patient's PatientID (only when one is known).
#   * Only exact matches count (the archive's answer is re-checked: no wildcard or prefix match).
#   * A match under the patient's own PatientID (and issuer, when given) is taken.
#   * A UID or accession match under another PatientID (an archive that files the patient under
#     its own identifier) is taken only when nothing contradicts the patient: the birth date and
#     the family name, where both sides have one, must agree, and all the matches must belong to
#     one patient. A date + modality match is never taken outside the patient's PatientID.
#   * Anything else is a ``query`` gap in the ledger keyed ``study:<ref>``, with the reason.

_HINT_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


@dataclass(frozen=True)
class StudyHint:
    """One report or ImagingStudy that names an imaging study (see ``aggregator.jobs.hints``)."""

    ref: str
    study_uid: str | None = None
    accession: str | None = None
    date: str | None = None
    modality: str | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> StudyHint:
        """A hint from config JSON; values that could widen a C-FIND/QIDO match are dropped.

        A ``*``, ``?`` or ``\\`` in an accession number would make it a wildcard or list query,
        so such a value is not used; UIDs must be well-formed, dates YYYYMMDD.
        """
        def text(key: str) -> str | None:
            v = data.get(key)
            return str(v).strip() or None if v is not None else None

        uid, acc, date, mod = text("study_uid"), text("accession"), text("date"), text("modality")
        return cls(
            ref=text("ref") or "unknown",
            study_uid=uid if uid and len(uid) <= 64 and _HINT_UID.match(uid) else None,
            accession=acc if acc and len(acc) <= 64 and not set(acc) & set("*?\\") else None,
            date=date.replace("-", "") if date and re.match(r"^\d{4}-?\d{2}-?\d{2}$", date) else None,
            modality=mod.upper() if mod and re.match(r"^[A-Za-z]{2,3}$", mod) else None,
        )

    @property
    def key(self) -> str:
        return "study:" + self.ref

    def criterion(self, patient_id: str | None) -> str | None:
        if self.study_uid:
            return "uid"
        if self.accession:
            return "accession"
        if self.date and self.modality and patient_id:
            return "date+modality"
        return None


def parse_hints(raw: Sequence[Mapping[str, Any]] | None) -> list[StudyHint]:
    """Config hints, one per ref (the first wins)."""
    out: dict[str, StudyHint] = {}
    for item in raw or []:
        if isinstance(item, Mapping):
            hint = StudyHint.parse(item)
            out.setdefault(hint.ref, hint)
    return list(out.values())


@dataclass
class StudyMatch:
    """A study the archive returned for a hint query, with what identifies its patient."""

    study_uid: str
    patient_id: str = ""
    issuer: str = ""
    name: str = ""
    birth_date: str = ""
    accession: str = ""
    date: str = ""
    modalities: frozenset[str] = frozenset()
    count: int | None = None
    sop_classes: tuple[str, ...] = ()


NO_CRITERIA = ("the report names no StudyInstanceUID or accession number, and no date with a modality "
               "for a known PatientID", "no-criteria")


def select_hinted(hint: StudyHint, how: str, found: Sequence[StudyMatch], patient: PatientRef
                  ) -> tuple[list[StudyMatch], str | None, str | None]:
    """Apply the rule above: (studies to take, gap reason, gap status); the reason is PHI-free."""
    if how == "uid":
        exact = [m for m in found if m.study_uid == hint.study_uid]
    elif how == "accession":
        exact = [m for m in found if m.accession == hint.accession]
    else:
        exact = [m for m in found if m.date == hint.date and hint.modality in m.modalities]
    if not exact:
        return [], f"no matching study at the archive (matched on {how})", "not-found"
    own = [m for m in exact if patient.id and m.patient_id == patient.id
           and (not patient.issuer or not m.issuer or m.issuer == patient.issuer)]
    if own:
        return own, None, None
    if how == "date+modality":
        return [], "no matching study of this patient at the archive (matched on date+modality)", "not-found"
    fitting = [m for m in exact if not _contradicts(m, patient)]
    if not fitting:
        return [], (f"the study matching on {how} belongs to another patient at the archive "
                    "(birth date or name differ)"), "other-patient"
    if len({(m.patient_id, m.issuer) for m in fitting}) > 1:
        return [], f"the {how} matches studies of several patients at the archive", "ambiguous"
    return fitting, None, None


def _fold(text: str) -> set[str]:
    import unicodedata

    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return {t for t in re.split(r"[^a-z]+", plain) if len(t) > 1}


def _contradicts(m: StudyMatch, patient: PatientRef) -> bool:
    """True when the study's birth date or family name disagrees with the patient's."""
    if patient.birth_date and m.birth_date:
        mine = re.sub(r"\D", "", patient.birth_date)[:8]
        theirs = re.sub(r"\D", "", m.birth_date)[:8]
        if len(mine) == 8 and len(theirs) == 8 and mine != theirs:
            return True
    if patient.name and m.name:
        family = _fold(m.name.split("^")[0])
        if family and not family & _fold(patient.name):
            return True
    return False


def record_hint_gap(sink: Sink, hint: StudyHint, reason: str, status: str) -> None:
    log.info("study hint %s: %s", hint.ref, reason)
    sink.failed(KIND_QUERY, hint.key, reason, status=status, meta={"ref": hint.ref})


# --- whose studies: one PatientID, several people -------------------------------------------------
#
# A PatientID is unique only within its issuer. An archive fed by several hospitals can hold two
# people under one PatientID, and a query by PatientID alone returns both. With the source's
# issuer configured, the connectors query with it and drop other issuers. Without one,
# :func:`own_studies` decides: studies whose birth date or family name contradict the case's
# patient are another person's; if what remains still belongs to more than one person
# (different issuers or birth dates), none of it is taken, because guessing would put another
# patient's images in the consultant's package. Both outcomes are query gaps, so the navigator
# sees them and what to do.

#: ledger key prefix of such a gap; the StudyInstanceUID follows. The gap report reads "Study" in
#: a query key as "about images" and finds the study by its UID in the key.
PATIENT_STUDY = "query:Study/"


def patient_studies(found: Iterable[StudyMatch], patient: PatientRef, modalities: str | None,
                    sink: Sink) -> list[StudyMatch]:
    """What a query by the patient's PatientID returned, kept when it is this patient's study.

    Dropped: answers without a StudyInstanceUID, of another PatientID (an archive that matched
    loosely), of another issuer when the source names one, or without any of ``modalities``
    (comma or backslash separated). The rest goes through :func:`own_studies`.
    """
    wanted = {m.strip().upper() for m in (modalities or "").replace("\\", ",").split(",") if m.strip()}
    issuer = (patient.issuer or "").strip()
    kept: list[StudyMatch] = []
    for m in found:
        if not m.study_uid:
            continue
        if (m.patient_id or patient.id) != patient.id:
            log.warning("the query returned a study of another PatientID; skipped: %s", m.study_uid)
            continue
        if issuer and m.issuer != issuer:
            log.info("study %s belongs to another issuer of the same PatientID; skipped", m.study_uid)
            continue
        if wanted and not wanted & m.modalities:
            continue
        kept.append(m)
    return own_studies(kept, patient, sink)


def own_studies(found: Sequence[StudyMatch], patient: PatientRef, sink: Sink) -> list[StudyMatch]:
    """The studies found by PatientID alone that are this patient's (see the rule above)."""
    if patient.issuer or _people(found) <= 1:
        return list(found)
    other = [m for m in found if _contradicts(m, patient)]
    for m in other:
        _record_patient_gap(sink, m, "a study under this PatientID belongs to another patient at the archive "
                                     "(birth date or name differ)", "other-patient")
    rest = [m for m in found if m not in other]
    if _people(rest) <= 1:
        return rest
    issuers = sorted({m.issuer for m in rest if m.issuer})
    named = f" (issuers {', '.join(issuers)})" if issuers else " (different birth dates)"
    reason = (f"this PatientID names several patients at the archive{named}; nothing of them was retrieved: "
              "set the source's --issuer, or the case's --birth-date and patient name")
    for m in rest:
        _record_patient_gap(sink, m, reason, "ambiguous")
    return []


def _people(matches: Sequence[StudyMatch]) -> int:
    """How many different people the studies certainly belong to (by issuer, then birth date)."""
    issuers = {m.issuer for m in matches if m.issuer}
    births = {d for d in (re.sub(r"\D", "", m.birth_date)[:8] for m in matches) if len(d) == 8}
    return max(len(issuers), len(births), 1 if matches else 0)


def _record_patient_gap(sink: Sink, m: StudyMatch, reason: str, status: str) -> None:
    log.warning("study %s not retrieved: %s", m.study_uid, status)
    sink.failed(KIND_QUERY, PATIENT_STUDY + m.study_uid, reason, status=status, meta={"study": m.study_uid})
