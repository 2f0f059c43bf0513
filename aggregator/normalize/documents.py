"""Attachments -> files for the package's ``documents/`` folder.

An attachment gets its bytes from inline ``data`` or from a binary of the *same source* whose
ledger key is what ``attachment.url`` points at (exactly, relative to the source's server, as
``Binary/<id>``, a FHIR Binary resource of the source, or a file next to the one the resource came
from). Identical bytes become one :class:`DocumentFile`, named from their SHA-256
(``documents/D<7 hex>.<EXT>``: 8.3 names, stable across re-runs and independent of order).

The attachment then points at the package file (``url``) and states ``size`` and ``hash``
(base64 SHA-1, as FHIR R4 defines it). Inline ``data`` is kept: a viewer that reads only the
bundle still finds the text, and FHIR allows both when they hold the same content. An attachment
whose bytes never arrived (failed or absent binary) stays exactly as the source wrote it, so
the checklist can say why it is missing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

import orjson

from aggregator.blobs import BlobStore
from aggregator.ledger import LedgerEntry
from aggregator.model import DocumentFile, SourceInfo, TextProfile
from aggregator.normalize.references import type_id
from aggregator.normalize.scratch import ITEM_COLS, Item, Scratch, Spool
from aggregator.normalize.stubs import load_rules, profile_bytes

KIND_BINARY = "binary"
EXT = {
    "application/pdf": "PDF", "text/plain": "TXT", "text/html": "HTM", "text/xml": "XML",
    "application/xml": "XML", "application/hl7-v3+xml": "XML", "application/cda+xml": "XML",
    "text/rtf": "RTF", "application/rtf": "RTF", "image/jpeg": "JPG", "image/png": "PNG", "image/tiff": "TIF",
    "image/gif": "GIF", "application/json": "JSN", "application/fhir+json": "JSN",
    "application/msword": "DOC", "text/markdown": "TXT", "text/csv": "CSV",
}


def attachments_of(rtype: str, d: dict[str, Any]) -> list[dict[str, Any]]:
    """The attachments of a resource body, in document order (their index names them)."""
    if rtype == "DocumentReference":
        raw = [c.get("attachment") for c in d.get("content") or [] if isinstance(c, dict)]
    elif rtype == "DiagnosticReport":
        raw = list(d.get("presentedForm") or [])
    else:
        return []
    return [a for a in raw if isinstance(a, dict)]


#: attachment types that can hold a document
ATTACHMENT_TYPES = frozenset({"DocumentReference", "DiagnosticReport"})


@dataclass
class Blob:
    sha256: str
    size: int
    content_type: str
    sha1_b64: str | None = None
    data: bytes | None = None  # only for the bytes of a FHIR Binary not yet in the blob store
    inline: bool = False  # the bytes are the attachment's own ``data`` (decoded again when needed)


_FHIR_BINARIES = (f"SELECT {ITEM_COLS} FROM item WHERE lookup = 1 AND sid = ?1 AND rtype = 'Binary' "  # noqa: S608
                  "AND (rid = ?2 OR (rid = '' AND key = ?3)) ORDER BY ord DESC")


class Documents:
    """Finds attachment bytes and collects the package's document files.

    Attachments are named by ``(item, index)``: bodies are loaded for a step and dropped, so the
    identity of a loaded dict means nothing from one step to the next. Nothing is kept per
    attachment: the bytes behind one are looked up again when needed (a cheap, deterministic
    lookup), and the plan for an item's attachments is kept in its scratch row.
    """

    def __init__(self, binaries: list[LedgerEntry], sources: dict[int, SourceInfo], blobs: BlobStore,
                 scratch: Scratch, spool: Spool) -> None:
        self.blobs = blobs
        self.sources = sources
        self.scratch = scratch
        self.spool = spool
        self._bin: dict[tuple[int, str], LedgerEntry] = {}
        for e in binaries:
            self._bin.setdefault((e.source_id, e.key), e)
            tid = type_id(e.key)
            if tid:
                self._bin.setdefault((e.source_id, tid), e)
        self.used: set[tuple[int, str]] = set()
        self.files: dict[str, tuple[Blob, str, str]] = {}  # sha256 -> blob, first resource ref, title
        self.paths: dict[str, str] = {}
        self.texts: dict[str, TextProfile] = {}
        """sha256 -> what its text shows, for the checklist's stub detection (text documents only)."""

    def _fhir_binary(self, sid: int, tid: str) -> Item | None:
        """The last loaded FHIR Binary of source ``sid`` named ``tid`` (``Binary/<id>``, or the ledger
        key of a Binary without id) whose body holds ``data``."""
        rid = tid[len("Binary/"):] if tid.startswith("Binary/") else None
        rows = self.scratch.db.execute(_FHIR_BINARIES, (sid, rid, tid))
        for row in rows:
            it = Item(row, self.scratch, self.spool)
            if isinstance(it.body().get("data"), str):
                return it
        return None

    def _entry_for(self, item: Item, url: str) -> LedgerEntry | Item | None:
        sid = item.source_id
        hit = self._bin.get((sid, url))
        if hit is not None:
            return hit
        base = self.sources[sid].base_url if sid in self.sources else None
        if base and url.startswith(base.rstrip("/") + "/"):
            hit = self._bin.get((sid, url[len(base.rstrip("/")) + 1:]))
            if hit is not None:
                return hit
        if "://" not in url and not url.startswith(("urn:", "file:")) and item.file:
            rel = posixpath.normpath(posixpath.join(posixpath.dirname(item.file), url))
            hit = self._bin.get((sid, f"file:{rel}"))
            if hit is not None:
                return hit
        tid = type_id(url)
        if tid:
            return self._bin.get((sid, tid)) or self._fhir_binary(sid, tid)
        return None

    def blob_for(self, item: Item, index: int, att: dict[str, Any]) -> Blob | None:
        """The bytes behind attachment ``index`` of ``item``, or None when they are not in the record."""
        blob: Blob | None = None
        ctype = str(att.get("contentType") or "")
        if isinstance(att.get("data"), str):
            blob = _inline(att["data"], ctype)
            if blob is not None:
                blob.data, blob.inline = None, True  # the body holds the bytes; do not keep a copy
        elif isinstance(att.get("url"), str):
            hit = self._entry_for(item, att["url"])
            if isinstance(hit, Item):
                blob = _inline(str(hit.body()["data"]), ctype or str(hit.body().get("contentType") or ""))
                self.used.add((hit.source_id, f"resource:{hit.key}"))
            elif hit is not None and hit.sha256:
                blob = Blob(hit.sha256, int(hit.size or 0), ctype or str(hit.content_type or ""))
                self.used.add((hit.source_id, hit.key))
        return blob

    def digest(self, item: Item, index: int, att: dict[str, Any]) -> str | None:
        b = self.blob_for(item, index, att)
        return b.sha256 if b else None

    def attach(self, item: Item, body: dict[str, Any]) -> None:
        """Plan how each attachment whose bytes are known points at its package file (call after
        ids are final); the plan goes to the item's scratch row and is applied by :meth:`apply`."""
        plan: list[tuple[int, str, int, str, str]] = []
        for i, att in enumerate(attachments_of(item.rtype, body)):
            blob = self.blob_for(item, i, att)
            if blob is None:
                continue
            # A small document already in the store is read once for its SHA-1 and its text
            # profile, not opened twice and looked up a third time (100k small documents).
            stored = (blob.data is None and not blob.inline and blob.size <= load_rules().max_bytes
                      and (blob.sha1_b64 is None or blob.sha256 not in self.files))
            if stored:
                blob.data = self.blobs.read_bytes(blob.sha256)
            if blob.sha1_b64 is None:
                blob.sha1_b64 = self._sha1(blob, att)
            ref = f"{item.rtype}/{item.new_id}"
            known = self.files.get(blob.sha256)
            if known is not None:
                if ref < known[1]:
                    self.files[blob.sha256] = (known[0], ref, known[2])
            else:
                self.files[blob.sha256] = (blob, ref, str(att.get("title") or ""))
                self._profile(blob, att)
                if not stored:
                    self._store(blob, att)
            if stored:
                blob.data = None
            plan.append((i, blob.sha256, blob.size, blob.sha1_b64, blob.content_type))
        if plan:
            self.scratch.put(item.lid, plan=orjson.dumps(plan))

    def _store(self, blob: Blob, att: dict[str, Any]) -> None:
        """Put bytes that arrived inline into the blob store, so the package finds every document."""
        if self.blobs.exists(blob.sha256):
            return
        if blob.data is not None:
            self.blobs.put_bytes(blob.data)
        elif blob.inline:
            self.blobs.put_bytes(base64.b64decode(str(att["data"]), validate=False))
        blob.data = None

    def _profile(self, blob: Blob, att: dict[str, Any]) -> None:
        """Read the text of a document once, here where its bytes are at hand, so the checklist can
        tell a report from a stub ("See outside report.") without the bytes. Only documents small
        enough to be a stub are read; a larger one cannot be."""
        if blob.size > load_rules().max_bytes:
            return
        if blob.data is not None:
            raw = blob.data
        elif blob.inline:
            raw = base64.b64decode(str(att["data"]), validate=False)
        else:
            with self.blobs.open(blob.sha256) as f:
                raw = f.read(load_rules().max_bytes + 1)
        prof = profile_bytes(raw, blob.content_type or str(att.get("contentType") or ""))
        if prof is not None:
            self.texts[blob.sha256] = prof

    def _sha1(self, blob: Blob, att: dict[str, Any]) -> str:
        h = hashlib.sha1()  # FHIR R4 Attachment.hash is defined as SHA-1
        if blob.data is not None:
            h.update(blob.data)
        elif blob.inline:
            h.update(base64.b64decode(str(att["data"]), validate=False))
        else:
            with self.blobs.open(blob.sha256) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        return base64.b64encode(h.digest()).decode("ascii")

    def finish(self) -> list[DocumentFile]:
        """Name the files (their package paths go into the attachments through :meth:`apply`)."""
        taken: set[str] = set()
        for sha in sorted(self.files):
            blob = self.files[sha][0]
            ext = EXT.get(blob.content_type.split(";")[0].strip().lower(), "BIN")
            for start in range(0, 57):
                name = f"documents/D{sha[start:start + 7].upper()}.{ext}"
                if name not in taken:
                    break
            taken.add(name)
            self.paths[sha] = name
        out = []
        for sha in sorted(self.files):
            blob, ref, title = self.files[sha]
            out.append(DocumentFile(self.paths[sha], sha, blob.size, blob.content_type or "application/octet-stream",
                                    title, ref, self.texts.get(sha)))
        return sorted(out, key=lambda d: d.path)

    def apply(self, item: Item, body: dict[str, Any]) -> None:
        """Point the planned attachments of a loaded body at their package files."""
        if not item.plan:
            return
        atts = attachments_of(item.rtype, body)
        for i, sha256, size, sha1_b64, content_type in item.plan:
            att = atts[i]
            att["size"] = size
            att["hash"] = sha1_b64
            if not att.get("contentType") and content_type:
                att["contentType"] = content_type
            att["url"] = self.paths[sha256]


def _inline(data: str, ctype: str) -> Blob | None:
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        return None
    return Blob(hashlib.sha256(raw).hexdigest(), len(raw), ctype, data=raw)
