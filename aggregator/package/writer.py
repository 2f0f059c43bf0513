"""Write the consultant package: a folder (or one zip) that any recipient can open and verify.

The package is assembled in a temporary folder next to the target and moved into place only
when complete, so a crash or a full disk never leaves a half package under the real name, and
``verify`` never sees one. An existing target is replaced only when it is itself a package
(its manifest.json says so) or an empty folder; anything else is refused, so a typo in
``--out`` cannot wipe a user's folder.

Determinism: every file is a pure function of the inputs (no clock, sorted orders, UUIDv5 ids),
and the zip uses sorted entries with fixed timestamps and modes, so the same record gives a
byte-identical package (an encrypted one differs only by its random salts).

A zip is streamed: the files made here (summary, bundle, DICOMDIR...) are staged in ``scratch``
(a folder inside the case folder: the package's plaintext never lands anywhere else), while
documents and DICOM instances go straight from the blob store into the archive, one 1 MiB
block at a time, and through the encryption when ``sealing`` asks for it. Only the finished
(encrypted) zip is written next to ``out``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.blobs import BlobStore
from aggregator.errors import PackageError, StoreError, UsageError
from aggregator.model import CaseInfo, DocumentFile, NormalizedRecord, SourceInfo
from aggregator.package.dicomdir import place_images, write_images
from aggregator.package.document import document_timestamp, record_digest, write_document
from aggregator.package.manifest import MANIFEST, MANIFEST_SCHEMA, build_manifest, dump_manifest, unsafe_relpath
from aggregator.package.sealing import AGE_SUFFIX, Sealing, open_encrypted_zip, zip_sink
from aggregator.package.summary import render_index, render_readme, render_summary
from aggregator.package.xdm import PATH as XDM_PATH
from aggregator.package.xdm import write_metadata_xml
from aggregator.privacy import make_private_dir

log = logging.getLogger(__name__)

DOCUMENTS = "documents"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_MODE = 0o100644 << 16
MAX_NAME_BYTES = 255
CHUNK = 1 << 20


@dataclass(frozen=True)
class _Linked:
    """A package file streamed from the blob store rather than staged: its bytes must hash to ``sha256``."""

    path: Path
    sha256: str
    size: int


def write_package(
    out: Path,
    case: CaseInfo,
    record: NormalizedRecord,
    gap_report: dict[str, Any],
    blobs: BlobStore,
    sources: Sequence[SourceInfo],
    *,
    as_zip: bool = False,
    sealing: Sealing | None = None,
    scratch: Path | None = None,
) -> Path:
    """Write the package for ``case`` at ``out`` (a folder, or ``out[.zip]``) and return its path.

    ``sealing`` encrypts the zip (``as_zip`` is then required; an age-sealed one is named
    ``.zip.age``). ``scratch`` is where a zip's generated files are staged: the case folder's
    scratch space, so that no plaintext lands outside the case folder. An encrypted package
    requires it; a plain zip without it stages next to ``out``.
    """
    out = _target_name(Path(out), as_zip, sealing)
    if sealing is not None and scratch is None:
        raise PackageError("an encrypted package must be staged inside the case folder (no scratch folder given)")
    _check_target(out, as_zip, sealing)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    stage = work
    try:
        if as_zip and scratch is not None:
            make_private_dir(scratch)
            stage = Path(tempfile.mkdtemp(dir=scratch, prefix="package-", suffix=".tmp"))
        root = stage / "package"
        root.mkdir()
        files, linked = _build(root, case, record, gap_report, blobs, sources, link_blobs=as_zip)
        if as_zip:
            zpath = work / "package.zip"
            _zip(root, files, linked, zpath, sealing)
            os.replace(zpath, out)
        else:
            if out.exists():
                os.replace(out, work / "previous")
            os.replace(root, out)
    except OSError as exc:
        raise PackageError(f"cannot write the package ({type(exc).__name__}: {exc.strerror or 'I/O error'})",
                           item=out.name)
    finally:
        if stage != work:
            shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    log.info("package written: %d document(s), %d image(s)%s%s", len(record.documents),
             len(record.images), " as zip" if as_zip else "", f", encrypted ({sealing.kind})" if sealing else "")
    return out


def _target_name(out: Path, as_zip: bool, sealing: Sealing | None) -> Path:
    """``F`` -> ``F.zip`` for a zip; ``F[.zip][.age]`` -> ``F.zip.age`` for an age-sealed one."""
    if sealing is not None and not as_zip:
        raise UsageError("an encrypted package is a zip: add --zip")
    age = sealing is not None and sealing.recipients
    if age and out.name.lower().endswith(AGE_SUFFIX):
        out = out.with_name(out.name[: -len(AGE_SUFFIX)])
    if as_zip and out.suffix.lower() != ".zip":
        out = out.with_name(out.name + ".zip")
    return out.with_name(out.name + AGE_SUFFIX) if age else out


# --- the target -------------------------------------------------------------------------------


def _is_previous_package_manifest(raw: bytes) -> bool:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("schema") == MANIFEST_SCHEMA


def _check_target(out: Path, as_zip: bool, sealing: Sealing | None = None) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink():
        raise PackageError("target is a symbolic link; refusing to replace it", item=out.name)
    if sealing is not None and sealing.recipients:
        # an age file cannot be opened without the recipient's key, so it cannot be told apart
        # from any other file someone would hate to lose
        raise PackageError("target exists; an age-encrypted file cannot be checked to be a previous package, "
                           "so it is not overwritten: remove it or choose another --out", item=out.name)
    if as_zip:
        ok = False
        if out.is_file() and zipfile.is_zipfile(out):
            try:
                opened = (open_encrypted_zip(out, sealing.passphrase) if sealing is not None and sealing.passphrase
                          else zipfile.ZipFile(out))
                with opened as z:
                    ok = MANIFEST in z.namelist() and _is_previous_package_manifest(z.read(MANIFEST))
            except (RuntimeError, NotImplementedError):
                # pyzipper: another passphrase; zipfile: an encrypted member it cannot read
                how = "this passphrase does not open" if sealing is not None else "is opened only with its passphrase"
                raise PackageError(f"target is an encrypted zip that {how}; refusing to overwrite it: remove it or "
                                   "choose another --out", item=out.name) from None
            except (zipfile.BadZipFile, OSError, KeyError):
                ok = False
        if not ok:
            raise PackageError("target exists and is not a previous package zip; refusing to overwrite it",
                               item=out.name)
        return
    if not out.is_dir():
        raise PackageError("target exists and is not a folder", item=out.name)
    if not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    if manifest.is_file() and _is_previous_package_manifest(manifest.read_bytes()):
        return
    raise PackageError("target folder is not empty and is not a previous package; refusing to overwrite it",
                       item=out.name)


# --- the content ------------------------------------------------------------------------------


def _documents(record: NormalizedRecord) -> list[DocumentFile]:
    """The record's documents, checked to stay under documents/ and de-duplicated by path."""
    by_path: dict[str, DocumentFile] = {}
    folded: dict[str, str] = {}
    for doc in sorted(record.documents, key=lambda d: (d.path, d.sha256)):
        rel = doc.path
        if unsafe_relpath(rel) or not rel.startswith(DOCUMENTS + "/") or rel == DOCUMENTS + "/":
            raise PackageError("document path must be a plain relative path under documents/", item=rel[:200])
        if any(len(p.encode("utf-8")) > MAX_NAME_BYTES for p in rel.split("/")):
            raise PackageError("document file name is too long", item=rel[:200])
        if rel in by_path:
            if by_path[rel].sha256 != doc.sha256:
                raise PackageError("two different documents share one package path", item=rel)
            continue
        # case-insensitive file systems (a consultant's laptop, a FAT stick) must not merge two files
        if folded.setdefault(rel.casefold(), rel) != rel:
            raise PackageError("two documents' paths differ only in letter case", item=rel)
        by_path[rel] = doc
    return list(by_path.values())


def _json_bytes(data: Any, *, sort_keys: bool) -> bytes:
    try:
        return (json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise PackageError(f"cannot serialise as JSON ({type(exc).__name__})")


def _write(root: Path, rel: str, data: bytes, written: list[str]) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    written.append(rel)


def _link(blobs: BlobStore, sha256: str, rel: str, what: str) -> _Linked:
    try:
        path = blobs.path(sha256)
        size = path.stat().st_size
    except (StoreError, FileNotFoundError):
        raise PackageError(f"{what} bytes are missing from the blob store", item=rel)
    return _Linked(path, sha256, size)


def _build(root: Path, case: CaseInfo, record: NormalizedRecord, gap_report: dict[str, Any], blobs: BlobStore,
           sources: Sequence[SourceInfo], *, link_blobs: bool = False) -> tuple[list[str], dict[str, _Linked]]:
    """Stage the package under ``root``; with ``link_blobs`` the documents and DICOM instances are
    not copied but returned as ``{relative path: blob}`` for the zip writer to stream."""
    written: list[str] = []
    linked: dict[str, _Linked] = {}
    timestamp = document_timestamp(case, sources)
    seed = f"{case.id}|{record_digest(record)}"

    documents = _documents(record)
    for doc in documents:
        if link_blobs:
            linked[doc.path] = _link(blobs, doc.sha256, doc.path, "document")
        else:
            try:
                blobs.copy_to(doc.sha256, root / doc.path, atomic=False)  # staged, renamed as a whole
            except (StoreError, FileNotFoundError):
                raise PackageError("document bytes are missing from the blob store", item=doc.path)
        written.append(doc.path)
    (root / DOCUMENTS).mkdir(exist_ok=True)

    placed = place_images(record.images, blobs)
    written += write_images(root, placed, blobs, seed=seed, copy=not link_blobs)
    if link_blobs:
        for p in placed:
            linked[p.relpath] = _link(blobs, p.image.sha256, p.relpath, "DICOM instance")

    (root / "fhir").mkdir(parents=True, exist_ok=True)
    write_document(root / "fhir/bundle.json", case, record, sources)
    written.append("fhir/bundle.json")
    _write(root, "fhir/gap-report.json", _json_bytes(gap_report, sort_keys=True), written)

    summary = render_summary(case, record, gap_report, sources, placed, blobs, timestamp)
    _write(root, "summary.html", summary.encode("utf-8"), written)
    _write(root, "INDEX.HTM", render_index(case, documents, len(placed)).encode("utf-8"), written)
    _write(root, "README.TXT", render_readme(case, len(documents), len(placed), timestamp).encode("ascii"), written)
    write_metadata_xml(root / XDM_PATH, documents, blobs, case_id=case.id, timestamp=timestamp, seed=seed)
    written.append(XDM_PATH)

    counts = {
        "resources": record.count(),
        "documents": len(documents),
        "images": len(placed),
        "quarantined": len(record.quarantine),
        "unresolved_references": len(record.unresolved),
    }
    known = {rel: (blob.sha256, blob.size) for rel, blob in linked.items()}
    manifest = build_manifest(root, written, case_id=case.id, created=timestamp, checklist=case.checklist,
                              sources=sources, counts=counts, known=known)
    _write(root, MANIFEST, dump_manifest(manifest), written)
    return sorted(written), linked


def _zip(root: Path, files: Sequence[str], linked: Mapping[str, _Linked], dest: Path,
         sealing: Sealing | None = None) -> None:
    """A deterministic zip: sorted entries, fixed time and mode, DEFLATE; encrypted by ``sealing``.

    Each file is streamed in 1 MiB blocks. A file taken straight from the blob store is hashed as
    it goes by and must match its content address: the manifest already promised that hash, and
    a blob damaged on disk must stop the package, not ship under a hash it no longer has.
    """
    with zip_sink(dest, sealing) as sink:
        for rel in sorted(files):
            blob = linked.get(rel)
            src = blob.path if blob is not None else root / rel
            with open(src, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if blob is not None and size != blob.size:
                    raise PackageError("a file changed in the blob store while packaging", item=rel)
                h = hashlib.sha256() if blob is not None else None
                with sink.open_member(rel, size, date_time=ZIP_TIME, external_attr=ZIP_MODE) as w:
                    while block := f.read(CHUNK):
                        if h is not None:
                            h.update(block)
                        w.write(block)
                if blob is not None and h is not None and h.hexdigest() != blob.sha256:
                    raise PackageError("a blob's bytes no longer match its SHA-256 (damaged on disk?)", item=rel)
