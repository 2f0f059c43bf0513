"""Write the consultant package: a folder (or one zip) that any recipient can open and verify.

The package is assembled in a temporary folder next to the target and moved into place only
when complete, so a crash or a full disk never leaves a half package under the real name, and
``verify`` never sees one. An existing target is replaced only when it is itself a package
(its manifest.json says so) or an empty folder; anything else is refused, so a typo in
``--out`` cannot wipe a user's folder.

Determinism: every file is a pure function of the inputs (no clock, sorted orders, UUIDv5 ids),
and the zip uses sorted entries with fixed timestamps and modes, so the same record gives a
byte-identical package.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aggregator.blobs import BlobStore
from aggregator.errors import PackageError, StoreError
from aggregator.model import CaseInfo, DocumentFile, NormalizedRecord, SourceInfo
from aggregator.package.dicomdir import place_images, write_images
from aggregator.package.document import document_timestamp, record_digest, write_document
from aggregator.package.manifest import MANIFEST, MANIFEST_SCHEMA, build_manifest, dump_manifest, unsafe_relpath
from aggregator.package.summary import render_index, render_readme, render_summary
from aggregator.package.xdm import PATH as XDM_PATH
from aggregator.package.xdm import write_metadata_xml

log = logging.getLogger(__name__)

DOCUMENTS = "documents"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_MODE = 0o100644 << 16
MAX_NAME_BYTES = 255


def write_package(
    out: Path,
    case: CaseInfo,
    record: NormalizedRecord,
    gap_report: dict[str, Any],
    blobs: BlobStore,
    sources: Sequence[SourceInfo],
    *,
    as_zip: bool = False,
) -> Path:
    """Write the package for ``case`` at ``out`` (a folder, or ``out[.zip]``) and return its path."""
    out = Path(out)
    if as_zip and out.suffix.lower() != ".zip":
        out = out.with_name(out.name + ".zip")
    _check_target(out, as_zip)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        root = work / "package"
        root.mkdir()
        files = _build(root, case, record, gap_report, blobs, sources)
        if as_zip:
            zpath = work / "package.zip"
            _zip(root, files, zpath)
            os.replace(zpath, out)
        else:
            if out.exists():
                os.replace(out, work / "previous")
            os.replace(root, out)
    except OSError as exc:
        raise PackageError(f"cannot write the package ({type(exc).__name__}: {exc.strerror or 'I/O error'})",
                           item=out.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("package written: %d document(s), %d image(s)%s", len(record.documents),
             len(record.images), " as zip" if as_zip else "")
    return out


# --- the target -------------------------------------------------------------------------------


def _is_previous_package_manifest(raw: bytes) -> bool:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("schema") == MANIFEST_SCHEMA


def _check_target(out: Path, as_zip: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink():
        raise PackageError("target is a symbolic link; refusing to replace it", item=out.name)
    if as_zip:
        ok = False
        if out.is_file() and zipfile.is_zipfile(out):
            try:
                with zipfile.ZipFile(out) as z:
                    ok = MANIFEST in z.namelist() and _is_previous_package_manifest(z.read(MANIFEST))
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


def _build(root: Path, case: CaseInfo, record: NormalizedRecord, gap_report: dict[str, Any], blobs: BlobStore,
           sources: Sequence[SourceInfo]) -> list[str]:
    written: list[str] = []
    timestamp = document_timestamp(case, sources)
    seed = f"{case.id}|{record_digest(record)}"

    documents = _documents(record)
    for doc in documents:
        try:
            blobs.copy_to(doc.sha256, root / doc.path, atomic=False)  # staged, renamed as a whole
        except (StoreError, FileNotFoundError):
            raise PackageError("document bytes are missing from the blob store", item=doc.path)
        written.append(doc.path)
    (root / DOCUMENTS).mkdir(exist_ok=True)

    placed = place_images(record.images, blobs)
    written += write_images(root, placed, blobs, seed=seed)

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
    manifest = build_manifest(root, written, case_id=case.id, created=timestamp, checklist=case.checklist,
                              sources=sources, counts=counts)
    _write(root, MANIFEST, dump_manifest(manifest), written)
    return sorted(written)


def _zip(root: Path, files: Sequence[str], dest: Path) -> None:
    """A deterministic zip: sorted entries, fixed time and mode, DEFLATE."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
        for rel in sorted(files):
            src = root / rel
            info = zipfile.ZipInfo(rel, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = ZIP_MODE
            info.create_system = 3
            info.file_size = src.stat().st_size
            with open(src, "rb") as f, z.open(info, "w") as w:
                shutil.copyfileobj(f, w, 1 << 20)
