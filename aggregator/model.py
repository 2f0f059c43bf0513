"""Plain data passed between the phases: pull -> normalize -> check -> package.

These types are the seams between modules, so each phase can be built and tested alone:
normalization takes :class:`CaseInfo`, :class:`SourceInfo` and ledger entries and returns a
:class:`NormalizedRecord`; the checklist reads that record plus the ledger; the package writer
reads the record, the gap report and the blob store.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from array import array
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson


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
    question: str | None = None
    """The case question for the consultant (free text; may hold clinical detail: never logged)."""


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
    """ISO 8601 time of the last successful pull (None: never pulled). From a built record on
    (check, package: :func:`aggregator.pipeline.build_record`) it is the source's data time
    (:attr:`NormalizedRecord.source_times`), so those outputs never depend on a clock."""
    organization: str | None = None
    """Name of the organization behind the source, for next-action texts."""
    patient_id: str | None = None
    """The patient id the source was added with (``--patient-id``): it pins the case's patient."""


@dataclass(frozen=True)
class TextProfile:
    """What the stub detector (:mod:`aggregator.normalize.stubs`) read of one document's text.

    Computed once per document file at normalization, where the bytes are at hand, so the
    checklist can judge "is this the report, or a pointer to it?" from a few fields instead of
    the bytes. ``snippet`` and ``pointer`` are words of the document: they go to the gap report
    (which names the trigger), never to logs.
    """

    words: int
    """Meaningful words (letters, 2+ characters) in the text."""
    pointer: str = ""
    """A phrase that points at another document ("see outside report"), as written; "" if none."""
    sections: frozenset[str] = frozenset()
    """Keys of the section headings found (``diagnosis``)."""
    snippet: str = ""
    """The start of a short text (for the gap detail); "" for a long one."""


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
    text: TextProfile | None = None
    """What its text shows (None: not judged - PDF, image, unreadable, or not profiled)."""


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
    pixels: bool = True
    """Whether it carries Pixel Data: an instance without is shipped, but is not an image."""


@dataclass(frozen=True)
class Quarantined:
    """A raw item that is not in the bundle, and why (invalid, another patient, merged into X...)."""

    source_id: int
    kind: str
    key: str
    reason: str
    survivor: str = ""
    """``Type/<bundle id>`` the item was merged into (its id maps to it); empty when not merged."""


BUNDLE_HEAD = b'{"resourceType":"Bundle","type":"collection","entry":[\n'
BUNDLE_TAIL = b"\n]}\n"


class BundleWriter:
    """Writes a collection Bundle one entry per line, inside one valid JSON document.

    Why this shape: the record of a large case must never be one dict in memory. Each entry is
    one ``orjson`` line, so a reader can stream it line by line (or seek to one entry through
    the index kept here), and the file as a whole still parses as an ordinary FHIR Bundle.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")
        self._f.write(BUNDLE_HEAD)
        self._pos = len(BUNDLE_HEAD)
        self.index: dict[str, tuple[array[int], array[int]]] = {}

    @classmethod
    def written(cls, path: Path, index: dict[str, tuple[array[int], array[int]]]) -> BundleWriter:
        """A closed writer over a bundle file written earlier, with its index (no file is opened)."""
        self = cls.__new__(cls)
        self.path, self.index = path, index
        self._pos = path.stat().st_size
        return self

    def add(self, resource: dict[str, Any]) -> None:
        """Append a resource as an entry whose fullUrl is ``urn:uuid:<id>``."""
        self.add_raw(str(resource["resourceType"]),
                     orjson.dumps({"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource}))

    def add_entry(self, entry: dict[str, Any]) -> None:
        """Append an entry as given (a Bundle built elsewhere keeps its own fullUrls)."""
        res = entry.get("resource")
        self.add_raw(str(res.get("resourceType") or "") if isinstance(res, dict) else "", orjson.dumps(entry))

    def add_raw(self, resource_type: str, line: bytes) -> None:
        """Append one entry already serialized as compact JSON (no newline inside)."""
        self.add_parts(resource_type, (line,))

    def add_parts(self, resource_type: str, parts: Iterable[bytes]) -> None:
        """Append one entry given as consecutive pieces of compact JSON (no newline inside): an
        entry too large to build as one bytes object (a Provenance naming every resource of a
        large source) is written as it is produced."""
        if self._pos > len(BUNDLE_HEAD):
            self._f.write(b",\n")
            self._pos += 2
        start = self._pos
        for part in parts:
            self._f.write(part)
            self._pos += len(part)
        offsets, lengths = self.index.setdefault(resource_type, (array("q"), array("q")))
        offsets.append(start)
        lengths.append(self._pos - start)

    def close(self) -> None:
        self._f.write(BUNDLE_TAIL)
        self._f.close()


class NormalizedRecord:
    """The case's normalized record: a FHIR R4 ``collection`` Bundle *in a file* plus side lists.

    Ids are deterministic UUIDs; each entry's ``fullUrl`` is ``urn:uuid:<id>`` and references
    between entries are written as ``urn:uuid:<id>``. Gap reports and logs cite resources as
    ``Type/<id>``. The bundle file (:attr:`bundle_path`, one entry per line) is read through
    :meth:`entries` / :meth:`iter_resources`, which stream it; only a per-type index of line
    offsets stays in memory. The file lives in a temporary folder owned by the record and
    removed with it (or by :meth:`close`).

    Built from a ``bundle`` dict (tests, small tools), the dict is written to such a file first.
    """

    def __init__(self, bundle: dict[str, Any] | None = None, documents: list[DocumentFile] | None = None,
                 images: list[ImageRef] | None = None, quarantine: list[Quarantined] | None = None,
                 unresolved: list[dict[str, Any]] | None = None, conflicts: list[dict[str, Any]] | None = None,
                 patient_ref: str | None = None, *, writer: BundleWriter | None = None,
                 source_times: dict[int, str] | None = None,
                 kept: dict[tuple[int, str, str], int] | None = None) -> None:
        self.documents: list[DocumentFile] = documents if documents is not None else []
        self.images: list[ImageRef] = images if images is not None else []
        self.quarantine: list[Quarantined] = quarantine if quarantine is not None else []
        self.unresolved: list[dict[str, Any]] = unresolved if unresolved is not None else []
        """References that do not resolve inside the bundle:
        ``{"from": "Type/id", "reference": ..., "source_id": n}``."""
        self.conflicts: list[dict[str, Any]] = conflicts if conflicts is not None else []
        """Identity conflicts for a navigator: ``{"field": "birthDate", "values": [...], "sources": [...]}``.
        The values go to reports, never to logs."""
        self.patient_ref = patient_ref
        """``Patient/<id>`` of the record's patient in the bundle."""
        self.identity: dict[str, Any] = {}
        """How the case's patient was established, for the identity item (see
        :func:`aggregator.normalize.pipeline.identity_facts`); empty for records built by hand."""
        self.notes: list[Quarantined] = []
        """Raw items kept in the record with a warning the navigator should see in the ledger
        (a DICOM instance without pixel data: shipped, but not an image)."""
        self.source_times: dict[int, str] = source_times if source_times is not None else {}
        """Per source id, the time its data speaks for (FHIR instant): the newest
        ``meta.lastUpdated`` it gave, else the case date; never a clock reading, so the same data
        gives the same record and package (its Provenance.recorded)."""
        self.kept: dict[tuple[int, str, str], int] = kept if kept is not None else {}
        """How many pulled items of each ``(source id, ledger kind, resource type)`` the record
        keeps (DICOM instances and documents under the type ``""``): with :attr:`quarantine`,
        what ``aggregator reconcile`` adds up against the ledger."""
        if writer is None:
            writer = BundleWriter(new_bundle_path())
            try:
                for entry in (bundle or {}).get("entry") or []:
                    if isinstance(entry, dict):
                        writer.add_entry(entry)
            finally:
                writer.close()
        self.bundle_path: Path = writer.path
        self._index = writer.index
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(writer.path.parent), True)

    @classmethod
    def adopt(cls, bundle_path: Path, index: dict[str, tuple[array[int], array[int]]],
              **lists: Any) -> NormalizedRecord:
        """A record over a bundle file kept from an earlier computation (see
        :mod:`aggregator.record_state`). The record owns the file's folder from now on and removes
        it when closed, like one it wrote itself."""
        return cls(writer=BundleWriter.written(bundle_path, index), **lists)

    def close(self) -> None:
        """Remove the bundle file now (the record is unusable afterwards)."""
        self._finalizer()

    def types(self) -> list[str]:
        return sorted(self._index)

    def count(self, resource_type: str | None = None) -> int:
        """Number of entries (of one type) without reading the file."""
        if resource_type is not None:
            return len(self._index.get(resource_type, ((), ()))[0])
        return sum(len(o) for o, _ in self._index.values())

    def entries(self, types: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
        """The bundle's entries in bundle order, read one at a time (only ``types``, if given)."""
        if types is None:
            for line in self.lines():
                yield orjson.loads(line)
            return
        spans = sorted((o, n) for t in types if t in self._index for o, n in zip(*self._index[t], strict=True))
        with open(self.bundle_path, "rb") as f:
            for off, n in spans:
                f.seek(off)
                yield orjson.loads(f.read(n))

    def lines(self) -> Iterator[bytes]:
        """The entries as the compact JSON bytes stored in the file (for copying without parsing)."""
        with open(self.bundle_path, "rb") as f:
            f.readline()
            for line in f:
                line = line.rstrip(b",\n")
                if line and line != b"]}":
                    yield line

    def iter_resources(self, resource_type: str | None = None) -> Iterator[dict[str, Any]]:
        for entry in self.entries(None if resource_type is None else (resource_type,)):
            yield entry["resource"]

    def resources(self, resource_type: str | None = None) -> list[dict[str, Any]]:
        """All resources (of one type) as a list: for small records and tests; stream large ones
        with :meth:`iter_resources`."""
        return list(self.iter_resources(resource_type))

    def copy_bundle(self, dest: IO[bytes]) -> None:
        """Copy the bundle file's bytes to ``dest``."""
        with open(self.bundle_path, "rb") as f:
            shutil.copyfileobj(f, dest, 1 << 20)

    def digest(self) -> str:
        """SHA-256 of the bundle file: the same record gives the same bytes, hence the same digest."""
        h = hashlib.sha256()
        with open(self.bundle_path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    @property
    def bundle(self) -> dict[str, Any]:
        """The whole Bundle as one dict: a compatibility accessor for tests and small records.
        Production code streams with :meth:`entries` instead (a large record does not fit)."""
        return dict(orjson.loads(self.bundle_path.read_bytes()))


def new_bundle_path(directory: str | None = None) -> Path:
    """A path for a record's bundle file, in a fresh private temporary folder."""
    return Path(tempfile.mkdtemp(prefix="aggregator-record-", dir=directory)) / "bundle.json"
