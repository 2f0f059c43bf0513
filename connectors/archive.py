"""Safe extraction of the zip files patients download from portals.

A portal download is untrusted input. A zip can try to write outside the folder it is unpacked
into (``../evil``, ``/etc/x``, ``C:\\x``, symbolic links), or expand into far more bytes than it
holds (zip bombs). This module never builds an output path from a member name without checking
every component, never follows or creates links, and counts the bytes it actually writes
(declared sizes in the archive can lie) against three limits: total uncompressed bytes, the
per-member compression ratio, and the number of members.

A bad *member* is rejected on its own (:class:`UnsafePath`, :class:`InputTooLarge` or
:class:`UnsupportedInput` naming it) and the rest of the archive is kept. Only problems that
make the whole archive untrustworthy (too many members, total size over the limit, not a zip)
raise for the archive.

The module also holds :func:`display_path`, the one PHI-free, printable and bounded form of a
file name used in ledger keys, so hostile names (non-UTF-8 bytes, control characters, very long
names) can never break a key, a log line or the database.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.errors import AggregatorError, InputTooLarge, UnsafePath, UnsupportedInput

GiB = 1024**3
MiB = 1024**2

#: Members smaller than this are not ratio-checked: small, highly repetitive text (a JSON file of
#: nulls) legitimately compresses more than 200:1 and cannot hurt anyone.
RATIO_FLOOR = 1 * MiB
#: Longest file-name component written to disk (ext4 and most file systems allow 255 bytes).
MAX_COMPONENT_BYTES = 120
#: Longest printable path in ledger keys; longer names keep their start, a digest and their end.
MAX_DISPLAY = 240

_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_OFFICE_EXT = frozenset({".docx", ".xlsx", ".pptx", ".odt", ".ods", ".odp", ".jar", ".apk", ".epub"})


@dataclass(frozen=True)
class ZipLimits:
    """Safety limits for one pull; nested archives draw on the same :class:`ByteBudget`."""

    max_total_bytes: int = 8 * GiB
    max_ratio: int = 200
    max_files: int = 100_000
    ratio_floor: int = RATIO_FLOOR


@dataclass
class ByteBudget:
    """Uncompressed bytes still allowed; shared by an archive and the archives nested in it."""

    remaining: int


@dataclass(frozen=True)
class ExtractedMember:
    name: str
    """The member's path inside the archive as the archive names it (``/`` separated, checked)."""
    path: Path
    """Where its bytes are on disk, always inside the extraction folder; for a member kept in
    memory, where they would be (nothing is there until :func:`write_member` puts them)."""
    size: int
    data: bytes | None = None
    """The bytes of a small member read into memory instead of written out (see extract_zip)."""


@dataclass
class ExtractResult:
    members: list[ExtractedMember] = field(default_factory=list)
    #: members not extracted, with the error naming them (display form of the member name)
    rejected: list[tuple[str, AggregatorError]] = field(default_factory=list)
    total_bytes: int = 0


def display_path(name: str, *, limit: int = MAX_DISPLAY) -> str:
    """A printable, bounded, valid-UTF-8 rendering of a (possibly hostile) path.

    Undecodable bytes (Python's surrogate escapes) and control characters become ``\\xNN``
    escapes; a name longer than ``limit`` keeps its start and end around a short digest of the
    whole, so two long names stay distinct and the extension stays visible.
    """
    if len(name) <= limit and name.isascii() and name.isprintable():
        return name  # the common case, unchanged below: no per-character lookups (a zip of 100k names)
    raw = name.encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "backslashreplace")
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    text = "".join(out)
    if len(text) > limit:
        digest = hashlib.sha256(raw).hexdigest()[:12]
        tail = 40
        text = f"{text[: limit - tail - 17]}...{digest}..{text[-tail:]}"
    return text


def member_parts(name: str) -> list[str]:
    """The checked path components of a member name; raises :class:`UnsafePath` for an escape.

    Both ``/`` and ``\\`` count as separators (archives made on Windows use either), so
    ``..\\..\\x`` is caught as well as ``../../x``.
    """
    shown = display_path(name)
    if "\x00" in name:
        raise UnsafePath("member name contains a NUL byte", item=shown)
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise UnsafePath("absolute path in archive", item=shown)
    parts = [p for p in re.split(r"[\\/]", name) if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePath("path escapes the archive folder ('..')", item=shown)
    if not parts:
        raise UnsafePath("empty member name", item=shown)
    return parts


def safe_component(part: str) -> str:
    """A file-system-safe rendering of one checked path component."""
    cleaned = "".join("_" if (unicodedata.category(c) in ("Cc", "Cf", "Cs") or c in '/\\:') else c for c in part)
    data = cleaned.encode("utf-8", "surrogateescape")
    if len(data) > MAX_COMPONENT_BYTES:
        _stem, dot, ext = cleaned.rpartition(".")
        ext = ext if dot and len(ext) <= 10 else ""
        digest = hashlib.sha256(data).hexdigest()[:10]
        head = data[: MAX_COMPONENT_BYTES - 24].decode("utf-8", "ignore")
        cleaned = f"{head}~{digest}" + (f".{ext}" if ext else "")
    else:
        cleaned = data.decode("utf-8", "replace")
    return cleaned or "_"


def _special_kind(info: zipfile.ZipInfo) -> str | None:
    """'symbolic link' / 'device or special file' for Unix-made members that are not plain files."""
    mode = info.external_attr >> 16
    if info.create_system != 3 or mode == 0:
        return None
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFLNK:
        return "symbolic link"
    if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "device or special file"
    return None


def is_office_container(path: Path) -> bool:
    """Office/e-book formats are zips too, but they are documents, not archives to unpack."""
    return path.suffix.lower() in _OFFICE_EXT


def _iter_infos(zf: zipfile.ZipFile) -> Iterator[zipfile.ZipInfo]:
    yield from sorted(zf.infolist(), key=lambda i: i.filename)


def extract_zip(
    archive: Path,
    dest: Path,
    limits: ZipLimits,
    budget: ByteBudget | None = None,
    *,
    label: str | None = None,
    in_memory: int = 0,
    memory_budget: int = 64 * MiB,
) -> ExtractResult:
    """Extract ``archive`` into the existing folder ``dest`` and report every member's fate.

    ``label`` names the archive in errors (its display path). Members of at most ``in_memory``
    bytes (declared, and then counted) are read into memory rather than written, up to
    ``memory_budget`` bytes in all: creating a file cost 0.1 to 2 ms here, most of the time of
    reading a download of 100k tiny documents, and the caller reads each of them once anyway.
    The same checks and limits apply to both kinds of member. Raises :class:`InputTooLarge`
    when the archive as a whole breaks a limit and :class:`UnsupportedInput` when it cannot be
    read as a zip; anything already written into ``dest`` is left for the caller's temporary
    folder to remove.
    """
    label = label or display_path(archive.name)
    budget = budget if budget is not None else ByteBudget(limits.max_total_bytes)
    dest_root = dest.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnsupportedInput(f"not a readable zip archive ({exc.__class__.__name__})", item=label) from exc
    result = ExtractResult()
    with zf:
        infos = list(_iter_infos(zf))
        files = [i for i in infos if not i.is_dir()]
        if len(files) > limits.max_files:
            raise InputTooLarge(f"archive holds {len(files)} files, more than the limit of {limits.max_files}",
                                item=label)
        declared = sum(i.file_size for i in files)
        if declared > budget.remaining:
            raise InputTooLarge(
                f"archive would expand to {declared} bytes, over the remaining limit of {budget.remaining}",
                item=label)
        names = _Names()
        memory = memory_budget
        for info in files:
            shown = display_path(info.filename)
            keep = 0 < info.file_size <= min(in_memory, memory)
            try:
                member = _extract_one(zf, info, dest_root, limits, budget, names, keep=keep)
            except InputTooLarge as exc:
                if budget.remaining <= 0:
                    raise InputTooLarge(f"archive expands beyond the limit of {limits.max_total_bytes} bytes",
                                        item=label) from exc
                result.rejected.append((shown, exc))
                continue
            except (UnsafePath, UnsupportedInput) as exc:
                result.rejected.append((shown, exc))
                continue
            result.members.append(member)
            result.total_bytes += member.size
            if member.data is not None:
                memory -= member.size
    return result


@dataclass
class _Names:
    """What an extraction has placed so far, to refuse members that collide with each other
    without asking the file system (members kept in memory are not on disk to collide with)."""

    used: set[str] = field(default_factory=set)
    """Case-folded output paths of files (a case-insensitive disk must not merge two)."""
    seen: set[str] = field(default_factory=set)
    """Logical member names."""
    files: set[str] = field(default_factory=set)
    """Output paths of files, as written."""
    dirs: set[str] = field(default_factory=set)
    """Output paths of the folders files were placed in, as written."""
    checked: set[Path] = field(default_factory=set)
    """Folders this extraction made and found to resolve to themselves inside its root."""
    inside: set[Path] = field(default_factory=set)
    """Folders of members kept in memory, found to resolve inside the root (not made yet)."""

    def place(self, rel: str, shown: str) -> None:
        """Refuse a file whose path is a folder of another, or lies under another file."""
        if rel in self.dirs or rel in self.files:
            raise UnsupportedInput("member path conflicts with another member", item=shown)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self.files:
                raise UnsupportedInput("member path conflicts with another member", item=shown)
        self.files.add(rel)
        for i in range(1, len(parts)):
            self.dirs.add("/".join(parts[:i]))


def write_member(member: ExtractedMember) -> Path:
    """Put a member kept in memory on disk at its planned path (for readers that need a file:
    a nested archive, a DICOM directory). A member already on disk is left as it is."""
    if member.data is None or member.path.exists():
        return member.path
    return write_new_file(member.path, member.data)


def write_new_file(target: Path, data: bytes) -> Path:
    """Create ``target`` (and its missing folders) with ``data``, owner-only, never following
    a link and never replacing a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return target


def _extract_one(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    dest_root: Path,
    limits: ZipLimits,
    budget: ByteBudget,
    names: _Names,
    *,
    keep: bool = False,
) -> ExtractedMember:
    """Extract one member, or with ``keep`` read it into memory. ``names.checked`` holds the
    folders this extraction made and found to resolve to themselves inside ``dest_root``: a
    member in one of them needs no second ``resolve()`` (a ``lstat`` per path component; two per
    member were most of the system calls of extracting 100k small files). Only regular files and
    folders are ever created here, and the file is opened with ``O_EXCL | O_NOFOLLOW``, so a
    checked folder cannot change under us."""
    shown = display_path(info.filename)
    parts = member_parts(info.filename)
    logical = "/".join(parts)
    special = _special_kind(info)
    if special:
        raise UnsafePath(f"{special} in archive, not extracted", item=shown)
    if logical in names.seen:
        raise UnsafePath("duplicate member name in archive, not extracted", item=shown)
    names.seen.add(logical)
    if info.flag_bits & 0x1:
        raise UnsupportedInput("encrypted archive member", item=shown)
    if info.file_size > limits.ratio_floor and (
        info.compress_size == 0 or info.file_size / info.compress_size > limits.max_ratio
    ):
        raise InputTooLarge(
            f"compression ratio {info.file_size // max(info.compress_size, 1)}:1 is over the limit of "
            f"{limits.max_ratio}:1 (zip bomb?)", item=shown)

    safe = [safe_component(p) for p in parts]
    rel = "/".join(safe)
    n = 1
    while rel.casefold() in names.used:
        n += 1
        safe[-1] = f"{safe_component(parts[-1])}~{n}"
        rel = "/".join(safe)
    names.used.add(rel.casefold())
    target = dest_root.joinpath(*safe)
    known = target.parent in names.checked
    # Belt and braces: the components were checked, but never write where resolve() disagrees.
    if not known and target.parent not in names.inside and not str(
            target.resolve(strict=False)).startswith(str(dest_root) + os.sep):
        raise UnsafePath("path escapes the archive folder", item=shown)
    names.place(rel, shown)
    if keep:
        # nothing is written now; write_member creates only plain folders and files later, so
        # a folder found inside the root stays inside it
        names.inside.add(target.parent)
        chunks: list[bytes] = []
        try:
            written = _copy_member(zf, info, chunks.append, limits, budget, shown)
        except OSError as exc:
            raise UnsupportedInput(f"cannot extract member ({exc.strerror or exc.__class__.__name__})",
                                   item=shown) from exc
        return ExtractedMember(logical, target, written, b"".join(chunks))
    try:
        if not known:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.parent.resolve() != target.parent or not str(target.parent).startswith(str(dest_root)):
                raise UnsafePath("path escapes the archive folder", item=shown)
            names.checked.add(target.parent)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise UnsupportedInput("member path conflicts with another member", item=shown) from exc
    except OSError as exc:
        raise UnsupportedInput(f"cannot extract member ({exc.strerror})", item=shown) from exc

    ok = False
    try:
        with os.fdopen(fd, "wb") as out:
            written = _copy_member(zf, info, out.write, limits, budget, shown)
        ok = True
    except OSError as exc:
        raise UnsupportedInput(f"cannot extract member ({exc.strerror or exc.__class__.__name__})",
                               item=shown) from exc
    finally:
        if not ok:
            target.unlink(missing_ok=True)
    return ExtractedMember(logical, target, written)


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, write: Callable[[bytes], object],
                 limits: ZipLimits, budget: ByteBudget, shown: str) -> int:
    """Decompress one member into ``write``, counting what it really expands to (declared sizes
    can lie) against the budget and the ratio limit; returns the bytes written."""
    written = 0
    ratio_cap = max(limits.ratio_floor, limits.max_ratio * max(info.compress_size, 1))
    try:
        with zf.open(info) as src:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                budget.remaining -= len(chunk)
                if budget.remaining < 0:
                    raise InputTooLarge("archive expands beyond the total size limit", item=shown)
                if written > ratio_cap:
                    raise InputTooLarge(f"member expands beyond {limits.max_ratio}:1 (zip bomb?)", item=shown)
                write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise UnsupportedInput(f"corrupt or unsupported archive member ({exc.__class__.__name__})",
                               item=shown) from exc
    return written
