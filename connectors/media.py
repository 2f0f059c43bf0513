"""The media connector: what a patient downloaded from portals, or a DICOM CD, as a folder or zip.

A download is a pile of files of unknown shape and trust. Every file is identified by its
content (magic bytes first, extension only where the content cannot tell), then handled:

* DICOM: a ``DICOMDIR`` is read with :class:`pydicom.fileset.FileSet` and every instance it
  references goes to ``sink.dicom`` with its study/series UIDs; loose DICOM files (with or
  without the Part 10 preamble) go there too. A file is emitted once even when a DICOMDIR
  references it. Broken or truncated files, and references to missing files, are ``failed``.
* FHIR JSON (a resource, a Bundle of any type, nested Bundles, an array, NDJSON): every
  resource goes to ``sink.resource`` with a key ``file:<relpath>#<json-pointer>`` (see
  :mod:`connectors.fhir_files`).
* PDF, plain text, C-CDA and HL7 v2 (ER7): the bytes go to ``sink.binary`` under
  ``file:<relpath>``, and a DocumentReference describing them is emitted too (for C-CDA with the
  header's type, date, authors and title, see :mod:`connectors.ccda`). When the file states whose
  record it is (C-CDA ``recordTarget``, HL7 v2 PID), a Patient with exactly those demographics is
  emitted under ``file:<relpath>#patient`` and is the DocumentReference's subject, so that
  normalization compares it with the case's patient; a file naming several people is skipped
  (it cannot count for one patient).
* Zips are extracted safely into a temporary folder (:mod:`connectors.archive`); members get
  keys ``file:<zip relpath>!/<member>``; a zip inside a zip is opened, one level deeper is not.
* Anything else is ``skipped`` with the detected type, so nothing is silently dropped.

The cursor maps each file's display path to its SHA-256: a re-pull emits only new or changed
files. A pull checkpoints the same map after every file it read (with that file's ledger rows),
so a pull resumed after an interruption does not read those files again. The connector never
writes outside its temporary folder (removed afterwards) and never follows symbolic links, so a
hostile download cannot make it read or write elsewhere.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import logging
import os
import stat
import tempfile
import warnings
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from aggregator.errors import AggregatorError, ConfigError, InputTooLarge, StoreError, UnsafePath, UnsupportedInput
from connectors import ccda, fhir_files, hl7v2, hl7v2_results
from connectors.archive import (
    ByteBudget,
    GiB,
    MiB,
    ZipLimits,
    display_path,
    extract_zip,
    is_office_container,
    write_member,
    write_new_file,
)
from connectors.base import (
    KIND_DICOM,
    KIND_FILE,
    CheckResult,
    Connector,
    ConnectorConfig,
    Cursor,
    PatientRef,
    Progress,
    Sink,
    checkpoints,
)

log = logging.getLogger(__name__)

STREAM = "media"
#: Files per part of a pull's checkpoint (see ``_Pull._checkpoint``).
CHECKPOINT_PART = 500
HEAD = 8192
#: A zip inside a zip is opened; a zip inside that is not (depth counts archives opened).
MAX_ARCHIVE_DEPTH = 2
#: Archive members up to this size are read into memory rather than extracted (64 MiB of them
#: at most per archive, see extract_zip); larger ones, DICOM studies among them, go to disk.
IN_MEMORY_MAX = 256 * 1024
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_DEFER = 1 << 20
_CHUNK = 1 << 20
_DICOM_EXT = frozenset({".dcm", ".dicom", ".dic"})
_JSON_EXT = frozenset({".json", ".fhir"})
_NDJSON_EXT = frozenset({".ndjson", ".jsonl"})
_TEXT_EXT = frozenset({".txt"})
_SEQ_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = 0xFFFFFFFF


@dataclass
class MediaConfig(ConnectorConfig):
    path: str = ""
    max_total_bytes: int = 8 * GiB
    max_ratio: int = 200
    tmp_dir: str | None = None
    """Where archives are unpacked while they are read; the pull runner points it into the case folder."""
    max_files: int = 100_000
    max_json_bytes: int = 8 * MiB
    """JSON files larger than this are streamed entry by entry instead of parsed whole: parsed
    whole, a JSON document takes several times its size in memory."""
    max_xml_bytes: int = 64 * MiB
    """XML (C-CDA) files larger than this are not parsed: failed with the reason, bytes not kept."""


# --- file identification --------------------------------------------------------------------


def sniff(name: str, head: bytes) -> str:
    """The handler for a file: dicom, dicomdir, pdf, text, ccda, xml, hl7v2, json, ndjson, zip, or
    ``unsupported:<what>``. Content decides first; the extension only where content cannot."""
    lower = name.lower()
    ext = os.path.splitext(lower)[1]
    if lower.startswith(".") or lower in ("thumbs.db", "desktop.ini"):
        return "unsupported:hidden or system file"
    if not head:
        return "unsupported:empty file"
    if lower == "dicomdir":
        return "dicomdir"
    if head[128:132] == b"DICM":
        return "dicom"
    if b"%PDF-" in head[:1024]:
        return "pdf"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        if ext in (".docx", ".xlsx", ".pptx", ".odt", ".ods", ".odp") or is_office_container(Path(lower)):
            return f"unsupported:office document ({ext})"
        return "zip"
    head = text_head(head)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if ext in _NDJSON_EXT and text[:1] == b"{":
        return "ndjson"
    if text[:1] in (b"{", b"["):
        return "json"
    if text[:1] == b"<":
        low = text[:512].lower()
        if b"<html" in low or b"<!doctype html" in low:
            return "unsupported:HTML document"
        return "ccda" if ccda.looks_like_ccda(head) else "xml"
    if hl7v2.looks_like_hl7(head):
        return "hl7v2"
    if ext in _DICOM_EXT or _looks_like_raw_dicom(head):
        return "dicom"
    if ext in _TEXT_EXT:
        return "text"
    return "unsupported:" + _describe_binary(head, ext)


_UTF16 = ((b"\xff\xfe", "utf-16-le", 2), (b"\xfe\xff", "utf-16-be", 2),
          (b"<\x00", "utf-16-le", 0), (b"\x00<", "utf-16-be", 0))


#: errors that no other file would escape either: the pull fails as a whole
_SOURCE_LEVEL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def text_head(head: bytes) -> bytes:
    """The first bytes as UTF-8 when they are UTF-16 text (with a BOM, or XML without one).

    UTF-16 is a valid XML encoding that Windows tools write; sniffing its bytes as if they were
    ASCII called such a C-CDA "binary data". Only the sniff sees the transcoded head: the file
    itself is stored and parsed as received (expat reads UTF-16 natively).
    """
    for prefix, codec, skip in _UTF16:
        if head.startswith(prefix):
            body = head[skip:]
            return body[: len(body) & ~1].decode(codec, errors="ignore").encode("utf-8")
    return head


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble (group 0002 or 0008 first)."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    elem = int.from_bytes(head[2:4], "little")
    return group in (0x0002, 0x0008) and elem < 0x0100


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG image"),
    (b"\x89PNG", "PNG image"),
    (b"GIF8", "GIF image"),
    (b"II*\x00", "TIFF image"),
    (b"MM\x00*", "TIFF image"),
    (b"MZ", "Windows executable"),
    (b"\x7fELF", "executable"),
    (b"{\\rtf", "RTF document"),
    (b"\xd0\xcf\x11\xe0", "legacy Office document"),
    (b"\x1f\x8b", "gzip archive"),
    (b"Rar!", "RAR archive"),
    (b"7z\xbc\xaf", "7-Zip archive"),
    (b"\x00\x00\x00\x18ftyp", "video"),
    (b"\x00\x00\x00\x20ftyp", "video"),
    (b"ID3", "audio"),
)


def _describe_binary(head: bytes, ext: str) -> str:
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
        kind = "text"
    except UnicodeDecodeError:
        kind = "binary data"
    return f"{kind} ({ext})" if ext else kind


# --- DICOM files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomInfo:
    sop_uid: str
    study_uid: str | None
    series_uid: str | None
    sop_class: str | None
    part10: bool


def read_dicom_info(path: Path) -> DicomInfo:
    """Read a DICOM file's identifying UIDs and check it is complete.

    pydicom silently accepts a file cut short (the last value is just shorter), so every
    top-level element's declared length is checked against the bytes really present.
    Raises :class:`UnsupportedInput` with a PHI-free reason.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = path.stat().st_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, defer_size=_DEFER)
                part10 = True
            except InvalidDicomError:
                ds = pydicom.dcmread(path, defer_size=_DEFER, force=True)
                part10 = False
            _check_complete(ds, path, size)
            fm = getattr(ds, "file_meta", None)
            sop = str(ds.get("SOPInstanceUID") or (fm.get("MediaStorageSOPInstanceUID") if fm else "") or "")
            sop_class = str(ds.get("SOPClassUID") or (fm.get("MediaStorageSOPClassUID") if fm else "") or "")
            study = ds.get("StudyInstanceUID")
            series = ds.get("SeriesInstanceUID")
    except UnsupportedInput:
        raise
    except Exception as exc:  # pydicom raises many types on broken input; none may escape
        raise UnsupportedInput(f"unreadable DICOM file ({exc.__class__.__name__})") from exc
    if not sop and not sop_class:
        raise UnsupportedInput("not a DICOM file (no SOP Class or SOP Instance UID)")
    if not sop:
        raise UnsupportedInput("DICOM file without a SOP Instance UID")
    return DicomInfo(sop.strip(), str(study).strip() if study else None, str(series).strip() if series else None,
                     sop_class.strip() or None, part10)


def _check_complete(ds: Any, path: Path, size: int) -> None:
    last = None
    for tag in ds.keys():
        el = ds.get_item(tag, keep_deferred=True)
        length = getattr(el, "length", None)
        if length is None or length == _UNDEFINED:
            last = (tag, length)
            continue
        value = getattr(el, "value", None)
        tell = getattr(el, "value_tell", None)
        if value is None and tell is not None and tell + length > size:
            raise UnsupportedInput(f"truncated DICOM file: element {tag} needs {length} bytes, file ends early")
        if isinstance(value, bytes | bytearray) and len(value) < length:
            raise UnsupportedInput(f"truncated DICOM file: element {tag} is shorter than declared")
        last = (tag, length)
    if last is not None and last[1] == _UNDEFINED and int(last[0]) == 0x7FE00010:
        with path.open("rb") as fp:
            fp.seek(max(size - 8, 0))
            if fp.read(8) != _SEQ_DELIM:
                raise UnsupportedInput("truncated DICOM file: encapsulated pixel data has no end delimiter")
    is_image = str(ds.get("SOPClassUID") or "").startswith("1.2.840.10008.5.1.4.1.1.")
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if is_image and "Rows" in ds and "Columns" in ds and not has_pixels:
        raise UnsupportedInput("truncated DICOM file: image attributes but no pixel data")


@dataclass(frozen=True)
class DicomdirRef:
    dicomdir: str
    sop_uid: str | None
    study_uid: str | None
    series_uid: str | None


# --- the walk --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    rel: str
    """Display path, used in keys and in the cursor (``a/b.json``, ``x.zip!/c/d.dcm``)."""
    path: Path
    problem: str | None = None
    """Why this entry is not a readable regular file (symbolic link, device...)."""
    data: bytes | None = None
    """A small archive member's bytes, kept in memory instead of extracted (creating a file per
    member was most of the time of a download of many tiny documents). ``path`` is then where
    it would be; :meth:`on_disk` puts it there for the readers that need a file."""

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data) if self.data is not None else self.path.open("rb")

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()

    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size

    def digests(self) -> tuple[str, int]:
        """SHA-256 (hex) and size."""
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest(), len(self.data)
        return file_digests(self.path)

    def head(self) -> bytes | None:
        if self.data is not None:
            return self.data[:HEAD]
        return _read_head(self.path)

    def on_disk(self) -> Path:
        """A file holding the bytes (a DICOM reader, a nested archive)."""
        if self.data is not None and not self.path.exists():
            write_new_file(self.path, self.data)
        return self.path


def walk_folder(root: Path, prefix: str = "") -> list[InputFile]:
    """Every entry under ``root``, sorted, without following symbolic links."""
    found: list[tuple[tuple[str, ...], InputFile]] = []

    def visit(folder: Path, parts: tuple[str, ...]) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            rel = prefix + display_path("/".join(parts) or ".")
            found.append((parts, InputFile(rel, folder, f"cannot list folder ({exc.strerror})")))
            return
        for entry in entries:
            p = (*parts, entry.name)
            rel = prefix + display_path("/".join(p))
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                found.append((p, InputFile(rel, Path(entry.path), f"cannot read file ({exc.strerror})")))
                continue
            if stat.S_ISLNK(st.st_mode):
                found.append((p, InputFile(rel, Path(entry.path), "symbolic link, not followed")))
            elif stat.S_ISDIR(st.st_mode):
                visit(Path(entry.path), p)
            elif stat.S_ISREG(st.st_mode):
                found.append((p, InputFile(rel, Path(entry.path))))
            else:
                found.append((p, InputFile(rel, Path(entry.path), "not a regular file (device, pipe or socket)")))

    visit(root, ())
    found.sort(key=lambda t: t[0])
    return [f for _, f in found]


def file_digests(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fp:
        while chunk := fp.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sha1_b64(path: Path) -> str:
    """FHIR R4 ``Attachment.hash``: base64 of the SHA-1 of the data."""
    h = hashlib.sha1()  # FHIR R4 defines Attachment.hash as SHA-1
    with path.open("rb") as fp:
        while chunk := fp.read(_CHUNK):
            h.update(chunk)
    return base64.b64encode(h.digest()).decode("ascii")


def _file_name(rel: str) -> str:
    return rel.rsplit("!/", 1)[-1].rsplit("/", 1)[-1]


# --- the connector -----------------------------------------------------------------------------


class MediaConnector(Connector):
    """Folders and zips a patient downloaded, and DICOM discs."""

    kind = "media"
    config_type = MediaConfig
    config: MediaConfig

    def __init__(self, config: ConnectorConfig) -> None:
        if not isinstance(config, MediaConfig):
            raise ConfigError("the media connector needs a MediaConfig")
        if not config.path:
            raise ConfigError("the media connector needs a path")
        for name in ("max_total_bytes", "max_ratio", "max_files"):
            if not isinstance(getattr(config, name), int) or getattr(config, name) <= 0:
                raise ConfigError(f"media option {name} must be a positive integer")
        super().__init__(config)

    @property
    def root(self) -> Path:
        return Path(self.config.path).expanduser()

    def limits(self) -> ZipLimits:
        return ZipLimits(self.config.max_total_bytes, self.config.max_ratio, self.config.max_files)

    def check(self) -> CheckResult:
        """Whether the path exists and what it holds, counted by file type (no names, no PHI)."""
        root = self.root
        if not root.exists():
            return CheckResult(False, {"error": "path does not exist", "path": display_path(root.name)})
        types: Counter[str] = Counter()
        if root.is_dir():
            files = walk_folder(root)
            for f in files:
                types[_check_type(f)] += 1
            return CheckResult(True, {"path_kind": "folder", "files": len(files), "types": dict(sorted(types.items()))})
        head = _read_head(root)
        kind = sniff(root.name, head) if head is not None else "unreadable"
        details: dict[str, Any] = {"path_kind": "zip" if kind == "zip" else "file", "files": 1}
        if kind == "zip":
            try:
                with zipfile.ZipFile(root) as zf:
                    members = [i for i in zf.infolist() if not i.is_dir()]
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                return CheckResult(False, {"error": f"not a readable zip archive ({exc.__class__.__name__})"})
            details["files"] = len(members)
            for m in members:
                types[_type_from_name(m.filename)] += 1
        else:
            types[kind.split(":", 1)[0]] += 1
        details["types"] = dict(sorted(types.items()))
        return CheckResult(True, details)

    def pull(self, patient: PatientRef, since: Cursor | None, sink: Sink, progress: Progress) -> Cursor:
        """Emit every file under the path (or in the zip); unchanged files since ``since`` are skipped.

        ``patient`` is not used to filter: a download is the patient's own record, and matching
        it to the case's patient is normalization's job (it quarantines other patients).
        """
        root = self.root
        if not root.exists():
            raise ConfigError("media path does not exist", item=display_path(root.name))
        sink.set_method("media")
        previous: dict[str, str] = {}
        # the last finished pull's cursor, then what interrupted pulls since got through
        for value in [(since or {}).get(STREAM) or {}, *checkpoints(since, STREAM)]:
            files = value.get("files") if isinstance(value, dict) else None
            if isinstance(files, dict):
                previous.update((str(k), str(v)) for k, v in files.items())
        run = _Pull(sink, progress, self.limits(), previous, tmp_dir=self.config.tmp_dir,
                    max_json_bytes=self.config.max_json_bytes, max_xml_bytes=self.config.max_xml_bytes)
        if root.is_dir():
            run.process(walk_folder(root), depth=0)
        else:
            run.process([InputFile(display_path(root.name), root)], depth=0)
        progress.message(f"media: {run.counts['files']} files read, {run.counts['unchanged']} unchanged")
        return {STREAM: {"files": dict(sorted(run.files.items()))}}


def _read_head(path: Path) -> bytes | None:
    try:
        with path.open("rb") as fp:
            return fp.read(HEAD)
    except OSError:
        return None


def _check_type(f: InputFile) -> str:
    if f.problem:
        return "unreadable"
    head = f.head()
    if head is None:
        return "unreadable"
    return sniff(f.path.name, head).split(":", 1)[0]


def _type_from_name(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    ext = os.path.splitext(base)[1]
    if base == "dicomdir":
        return "dicomdir"
    if ext in _DICOM_EXT:
        return "dicom"
    mapping = {".json": "json", ".ndjson": "ndjson", ".pdf": "pdf", ".txt": "text", ".xml": "xml", ".zip": "zip",
               ".hl7": "hl7v2"}
    return mapping.get(ext, "other")


@dataclass
class _Pull:
    sink: Sink
    progress: Progress
    limits: ZipLimits
    previous: dict[str, str]
    tmp_dir: str | None = None
    max_json_bytes: int = 8 * MiB
    max_xml_bytes: int = 64 * MiB
    files: dict[str, str] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    total: int = 0
    budget: ByteBudget = field(init=False)
    read: dict[str, str] = field(default_factory=dict)
    """Files read by this pull in the current checkpoint part (see :meth:`_checkpoint`)."""
    part: int = 0

    def __post_init__(self) -> None:
        self.budget = ByteBudget(self.limits.max_total_bytes)

    # -- walking ------------------------------------------------------------------------------

    def process(self, files: list[InputFile], depth: int) -> None:
        """Read ``files``, which this empties: each entry (an archive member's bytes among them)
        is let go as soon as it is read, so memory does not grow with the number of members."""
        self.total += len(files)
        self.progress.set_total(self.total)
        refs = self._index_dicomdirs(files)
        queue = deque(files)
        files.clear()
        while queue:
            f = queue.popleft()
            try:
                self._one(f, refs, depth)
            finally:
                self.progress.advance()

    def _one(self, f: InputFile, refs: dict[str, DicomdirRef], depth: int) -> None:
        key = f"file:{f.rel}"
        if f.problem:
            self.sink.skipped(KIND_FILE, key, f.problem)
            return
        try:
            digest, size = f.digests()
        except OSError as exc:
            self.sink.failed(KIND_FILE, key, f"cannot read file ({exc.strerror or exc.__class__.__name__})")
            return
        self.counts["files"] += 1
        if self.previous.get(f.rel) == digest:
            self.counts["unchanged"] += 1
            self.files[f.rel] = digest
            self._carry_members(f.rel)
            return
        head = f.head() or b""
        ref = refs.get(os.path.normpath(str(f.path)))
        kind = "dicom" if ref is not None else sniff(_file_name(f.rel), head)
        try:
            self._handle(kind, f, ref, size, depth)
        except OSError as exc:
            if exc.errno in _SOURCE_LEVEL_ERRNOS:
                raise  # a full disk fails the whole pull: every later file would fail the same way
            self.sink.failed(KIND_FILE, key, f"cannot read file ({exc.strerror or exc.__class__.__name__})")
            return  # not in the cursor: the next pull tries again
        except StoreError:
            raise  # our own raw store failed: a source-level condition, not this file's fault
        except AggregatorError as exc:
            self.sink.failed(KIND_FILE, key, exc.message, meta={"error": exc.__class__.__name__})
            return
        except Exception as exc:
            # One bad file never sinks the source: whatever a parser raises (LookupError for an
            # unknown XML encoding, RecursionError, a library bug) fails this item only. The
            # type alone is recorded: a library's message may quote the data it choked on.
            log.warning("unexpected %s while reading one file (its ledger row names it)", exc.__class__.__name__)
            self.sink.failed(KIND_FILE, key, f"could not be read: unexpected {exc.__class__.__name__}",
                             meta={"error": exc.__class__.__name__})
            return
        self.files[f.rel] = digest
        self._checkpoint(f.rel, digest)

    def _checkpoint(self, rel: str, digest: str) -> None:
        """After each file read: the files read so far, so a resumed pull does not read them again.

        In parts of :data:`CHECKPOINT_PART` files (``media.00000``, ``media.00001``...), so a
        checkpoint writes at most one part however many files the download holds; the sink
        writes it in the same transaction as the file's rows (``aligned``).
        """
        if len(self.read) >= CHECKPOINT_PART:
            self.part, self.read = self.part + 1, {}
        self.read[rel] = digest
        self.sink.checkpoint({f"{STREAM}.{self.part:05d}": {"files": dict(self.read)}}, aligned=True)

    def _carry_members(self, rel: str) -> None:
        """An unchanged zip: keep its members' cursor entries without opening it."""
        prefix = rel + "!/"
        for k, v in self.previous.items():
            if k.startswith(prefix):
                self.files[k] = v

    def _handle(self, kind: str, f: InputFile, ref: DicomdirRef | None, size: int, depth: int) -> None:
        key = f"file:{f.rel}"
        if kind.startswith("unsupported:"):
            self.sink.skipped(KIND_FILE, key, "unsupported file type: " + kind.split(":", 1)[1])
        elif kind == "dicomdir":
            pass  # read by _index_dicomdirs, which records its problems
        elif kind == "dicom":
            self._dicom(f, ref)
        elif kind == "pdf":
            self._document(f, size, "application/pdf", "PDF document")
        elif kind == "text":
            self._document(f, size, "text/plain", "Plain-text document")
        elif kind in ("ccda", "xml"):
            self._xml(f, size)
        elif kind == "hl7v2":
            self._hl7v2(f, size)
        elif kind == "json":
            self._json(f)
        elif kind == "ndjson":
            with f.open() as fp:
                self._ndjson(f, fp)
        elif kind == "zip":
            self._zip(f, depth)
        else:  # pragma: no cover - sniff() returns only the kinds above
            self.sink.skipped(KIND_FILE, key, f"unsupported file type: {kind}")

    # -- DICOM ----------------------------------------------------------------------------------

    def _index_dicomdirs(self, files: list[InputFile]) -> dict[str, DicomdirRef]:
        """Read every DICOMDIR among ``files``: the instances each references, by file path."""
        if not any(_file_name(f.rel).lower() == "dicomdir" for f in files if not f.problem):
            return {}  # most downloads: no path index of every file to build
        by_path = {os.path.normpath(str(f.path)): f for f in files if not f.problem}
        by_fold = {k.casefold(): v for k, v in by_path.items()}
        refs: dict[str, DicomdirRef] = {}
        for f in files:
            if f.problem or _file_name(f.rel).lower() != "dicomdir":
                continue
            changed = self._changed(f)
            try:
                instances = _read_dicomdir(f.on_disk())
            except UnsupportedInput as exc:
                if changed:
                    self.sink.failed(KIND_FILE, f"file:{f.rel}", f"unreadable DICOMDIR: {exc.message}; "
                                     "its folder is read as loose DICOM files instead")
                continue
            base = f.path.parent
            base_rel = f.rel[: -len(_file_name(f.rel))]
            for file_id, ref in instances:
                comps = [c for c in file_id if c]
                target_rel = base_rel + display_path("/".join(comps))
                if any(c in ("..", ".") or "/" in c for c in comps) or not comps:
                    if changed:
                        self.sink.failed(KIND_DICOM, f"file:{target_rel}",
                                         "DICOMDIR references a path outside the disc; not read")
                    continue
                target = os.path.normpath(str(base.joinpath(*comps)))
                hit = by_path.get(target) or by_fold.get(target.casefold())
                if hit is None:
                    if changed:
                        self.sink.failed(KIND_DICOM, f"file:{target_rel}", "referenced by DICOMDIR but missing "
                                         "from the disc", meta={"dicomdir": f.rel, **_uid_meta(ref)})
                    continue
                refs[os.path.normpath(str(hit.path))] = DicomdirRef(f.rel, ref.sop_uid, ref.study_uid,
                                                                    ref.series_uid)
        return refs

    def _changed(self, f: InputFile) -> bool:
        if f.rel not in self.previous:
            return True
        try:
            return f.digests()[0] != self.previous[f.rel]
        except OSError:
            return True

    def _dicom(self, f: InputFile, ref: DicomdirRef | None) -> None:
        key = f"file:{f.rel}"
        try:
            info = read_dicom_info(f.on_disk())
        except UnsupportedInput as exc:
            self.sink.failed(KIND_DICOM, key, exc.message, meta={"dicomdir": ref.dicomdir} if ref else {})
            return
        if info.sop_class == MEDIA_STORAGE_DIRECTORY:
            self.sink.skipped(KIND_FILE, key, "DICOM directory file (not an image); only a file named "
                              "DICOMDIR is read as a disc index")
            return
        meta: dict[str, Any] = {"file": f.rel, "study_uid": info.study_uid, "series_uid": info.series_uid}
        if not info.part10:
            meta["part10"] = False
        if ref is not None:
            meta["dicomdir"] = ref.dicomdir
            if ref.sop_uid and ref.sop_uid != info.sop_uid:
                meta["dicomdir_mismatch"] = True
        with f.open() as fp:
            self.sink.dicom(info.sop_uid, fp, meta=meta)

    # -- documents ------------------------------------------------------------------------------

    def _document(self, f: InputFile, size: int, content_type: str, what: str,
                  fields: dict[str, Any] | None = None, fmt: dict[str, str] | None = None) -> None:
        key = f"file:{f.rel}"
        if f.data is not None:
            self.sink.binary(key, f.data, content_type, meta={"file": f.rel})
            sha1 = base64.b64encode(hashlib.sha1(f.data).digest()).decode("ascii")  # FHIR R4: SHA-1
        else:
            with f.path.open("rb") as fp:
                self.sink.binary(key, fp, content_type, meta={"file": f.rel})
            sha1 = sha1_b64(f.path)
        attachment = {"contentType": content_type, "url": key, "size": size, "hash": sha1,
                      "title": _file_name(f.rel)}
        content: dict[str, Any] = {"attachment": attachment}
        if fmt:
            content["format"] = fmt
        doc: dict[str, Any] = {"resourceType": "DocumentReference", "status": "current"}
        doc.update(fields or {})
        doc.setdefault("description", f"{what} from a patient download ({_file_name(f.rel)})")
        doc["content"] = [content]
        self.sink.resource(doc, key=f"{key}#docref", meta={"file": f.rel, "derived": "media"})

    def _xml(self, f: InputFile, size: int) -> None:
        key = f"file:{f.rel}"
        if size > self.max_xml_bytes:
            self.sink.failed(KIND_FILE, key, f"XML file of {size // MiB} MiB is larger than the "
                             f"{self.max_xml_bytes // MiB} MiB limit for clinical documents; not read",
                             meta={"error": "InputTooLarge"})
            return
        data = f.read()
        try:
            header = ccda.read_header(data)
        except ccda.NotCcda as exc:
            self.sink.skipped(KIND_FILE, key, f"unsupported file type: {exc.message}")
            return
        except UnsupportedInput as exc:
            self.sink.failed(KIND_FILE, key, exc.message)
            return
        fields = ccda.document_reference_fields(header)
        if not self._subject(f, header.record_targets, ccda.patient_resource, fields):
            return
        self._document(f, size, "application/xml", "C-CDA document", fields, ccda.format_coding(header))

    def _hl7v2(self, f: InputFile, size: int) -> None:
        """An HL7 v2 file: kept as a text document, its PID says whose it is, and each ORU^R01
        result group becomes a DiagnosticReport with its Observations and full text."""
        key = f"file:{f.rel}"
        data = f.read()
        try:
            people = hl7v2.read_patients(data)
            orders, others = hl7v2_results.read_orders(data)
        except UnsupportedInput as exc:
            self.sink.failed(KIND_FILE, key, exc.message)
            return
        fields: dict[str, Any] = {}
        if not self._subject(f, people, hl7v2.patient_resource, fields):
            return
        self._document(f, size, "text/plain", "HL7 v2 message file", fields)
        for rkey, resource in hl7v2_results.resources(orders, key, fields.get("subject")):
            self.sink.resource(resource, key=rkey, meta={"file": f.rel, "derived": "media"})
        if others:  # said, not dropped: the file itself is in the record as a text document
            self.sink.skipped(KIND_FILE, f"{key}#results", "HL7 v2 message type(s) "
                              f"{', '.join(sorted(set(others)))[:200]}: kept as a text document; only ORU^R01 "
                              "results are read into reports")

    def _subject(self, f: InputFile, people: list[ccda.Demographics],
                 make: Callable[[ccda.Demographics, str], dict[str, Any]], fields: dict[str, Any]) -> bool:
        """Emit the Patient a document says it is about and make it the document's subject.

        False (and a ``skipped`` row) when the file names more than one person: it cannot count
        for one patient, and splitting it is not ours to do. Nothing is emitted for a file that
        states no demographics: normalization marks such a document unverified."""
        key = f"file:{f.rel}"
        distinct: list[ccda.Demographics] = []
        for p in people:
            if not p.empty and not any(p.same_as(d) for d in distinct):
                distinct.append(p)
        if len(distinct) > 1:
            self.sink.skipped(KIND_FILE, key, f"the document names {len(distinct)} different patients; "
                              "not read (it cannot count for one patient)")
            return False
        if distinct:
            rid = "doc-" + hashlib.sha256(key.encode()).hexdigest()[:40]
            self.sink.resource(make(distinct[0], rid), key=f"{key}#patient", meta={"file": f.rel, "derived": "media"})
            fields["subject"] = {"reference": f"Patient/{rid}"}
        return True

    # -- FHIR JSON ----------------------------------------------------------------------------

    def _json(self, f: InputFile) -> None:
        key = f"file:{f.rel}"
        if f.size() > self.max_json_bytes:
            self._large_json(f)
            return
        data = f.read()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            doc = fhir_files.parse_json(data)
        except fhir_files.MalformedJson as exc:
            if fhir_files.looks_like_ndjson(data):
                self._ndjson(f, data.splitlines())
                return
            self.sink.failed(KIND_FILE, key, exc.message)
            return
        if not isinstance(doc, dict | list):
            self.sink.skipped(KIND_FILE, key, "JSON file holds no object (not FHIR)")
            return
        self._emit(f, fhir_files.walk(doc), "", None)

    def _large_json(self, f: InputFile) -> None:
        """A JSON file above ``max_json_bytes``: streamed, never held whole (see stream_json)."""
        key = f"file:{f.rel}"
        with f.open() as fp:
            if fhir_files.first_line_is_object(fp):
                self._ndjson(f, fp)
                return
            try:
                self._emit(f, fhir_files.stream_json(fp), "", None)
            except fhir_files.MalformedJson as exc:
                # the entries before the fault are kept; the file says why the rest is missing
                self.sink.failed(KIND_FILE, key, exc.message)

    def _ndjson(self, f: InputFile, lines: Any) -> None:
        for line in fhir_files.iter_ndjson(lines):
            prefix = f"L{line.number}"
            if line.error:
                self.sink.failed(KIND_FILE, f"file:{f.rel}#{prefix}", line.error)
                continue
            self._emit(f, iter(line.items), prefix, line.number)

    def _emit(self, f: InputFile, items: Iterator[fhir_files.Found | fhir_files.Problem], prefix: str,
              line: int | None) -> None:
        for it in items:
            key = f"file:{f.rel}#{prefix}{it.pointer}"
            if isinstance(it, fhir_files.Problem):
                self.sink.skipped(KIND_FILE, key, it.reason)
                continue
            meta: dict[str, Any] = {"file": f.rel}
            if line is not None:
                meta["line"] = line
            if it.bundle is not None:
                meta["bundle"] = f"{f.rel}#{prefix}{it.bundle}"
                meta["fullUrl"] = it.full_url
                if it.bundle_type:
                    meta["bundle_type"] = it.bundle_type
            self.sink.resource(it.resource, key=key, meta=meta)

    # -- archives -----------------------------------------------------------------------------

    def _zip(self, f: InputFile, depth: int) -> None:
        key = f"file:{f.rel}"
        if depth >= MAX_ARCHIVE_DEPTH:
            self.sink.skipped(KIND_FILE, key, "archive nested more than one level deep inside another; not opened")
            return
        self.progress.message(f"extracting {f.rel}")
        tmp_root = self.tmp_dir
        if tmp_root:
            Path(tmp_root).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="aggregator-media-", dir=tmp_root) as tmp:
            try:
                result = extract_zip(f.on_disk(), Path(tmp), self.limits, self.budget, label=f.rel,
                                     in_memory=IN_MEMORY_MAX)
            except (InputTooLarge, UnsupportedInput, UnsafePath) as exc:
                self.sink.failed(KIND_FILE, key, exc.message, meta={"error": exc.__class__.__name__})
                return
            for name, err in result.rejected:
                # "member": refused for its path or type, its content never read (see reasons.py)
                self.sink.failed(KIND_FILE, f"{key}!/{name}", _reason(err),
                                 meta={"error": err.__class__.__name__, "member": "rejected"})
            if any(_file_name(m.name).lower() == "dicomdir" for m in result.members):
                # a disc's index is read by pydicom's FileSet, which looks for its files on disk
                members = [InputFile(f"{f.rel}!/{display_path(m.name)}", write_member(m)) for m in result.members]
            else:
                members = [InputFile(f"{f.rel}!/{display_path(m.name)}", m.path, data=m.data)
                           for m in result.members]
            del result  # its members' bytes are now held by ``members`` alone, which process() empties
            self.process(members, depth + 1)


def _reason(err: AggregatorError) -> str:
    return err.message


def _uid_meta(ref: DicomdirRef) -> dict[str, Any]:
    return {k: v for k, v in (("sop_uid", ref.sop_uid), ("study_uid", ref.study_uid),
                              ("series_uid", ref.series_uid)) if v}


def _read_dicomdir(path: Path) -> list[tuple[list[str], DicomdirRef]]:
    """``(ReferencedFileID components, UIDs)`` of every instance a DICOMDIR references."""
    import pydicom
    from pydicom.fileset import FileSet

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            fs = FileSet(ds)
            try:
                found = {tuple(c): ref for c, ref in _instances(fs, path)}
                # FileSet leaves out records whose file is absent; the records themselves list them all.
                out: list[tuple[list[str], DicomdirRef]] = []
                for rec in ds.get("DirectoryRecordSequence") or []:
                    if "ReferencedFileID" not in rec:
                        continue
                    comps = _file_id(rec.ReferencedFileID)
                    sop = rec.get("ReferencedSOPInstanceUIDInFile")
                    out.append((comps, found.get(tuple(comps))
                                or DicomdirRef(path.name, str(sop) if sop else None, None, None)))
                return out
            finally:
                # FileSet keeps an (empty) staging TemporaryDirectory that is removed only when the
                # object is garbage collected; remove it now so no temp folders pile up.
                stage = getattr(fs, "_stage", None)
                cleanup = getattr(stage.get("t") if isinstance(stage, dict) else None, "cleanup", None)
                if callable(cleanup):
                    cleanup()
    except Exception as exc:  # pydicom raises many types on a broken DICOMDIR; none may escape
        raise UnsupportedInput(f"{exc.__class__.__name__}") from exc


def _instances(fs: Any, path: Path) -> list[tuple[list[str], DicomdirRef]]:
    """Each instance record of a FileSet: its file-ID components and its SOP/study/series UIDs."""
    out: list[tuple[list[str], DicomdirRef]] = []
    for inst in fs:
        comps = _file_id(inst.ReferencedFileID if "ReferencedFileID" in inst else "")
        study = series = None
        for node in inst.node.reverse():
            if node.record_type == "SERIES" and series is None:
                series = str(node.key)
            elif node.record_type == "STUDY" and study is None:
                study = str(node.key)
        sop = inst.ReferencedSOPInstanceUIDInFile if "ReferencedSOPInstanceUIDInFile" in inst else None
        out.append((comps, DicomdirRef(path.name, str(sop) if sop else None, study, series)))
    return out


def _file_id(fid: Any) -> list[str]:
    """Referenced File ID (a multi-valued CS, or one string) -> path components."""
    raw = [str(fid)] if isinstance(fid, str) else [str(c) for c in fid]
    return [p for c in raw for p in c.replace("\\", "/").split("/")]
