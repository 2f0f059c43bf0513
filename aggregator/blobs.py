"""Raw files on disk with atomic writes: content-addressed blobs, and DICOM instances by UID.

Every byte a connector receives lands here exactly as received. Resources and documents are
named by their SHA-256. Writes stream to a temporary file in the same directory tree and are
renamed into place, so a crash never leaves a half-written blob under a valid name, and the same
content stored twice is kept once. Raw data in this store is never modified: normalization reads
it and can be re-run.

DICOM instances are the exception to naming by content: they are kept under
``dicom/<source id>/<SOP Instance UID>``, as PS3.4 identifies them. Hashing a study while it
arrives cost more CPU than receiving it (SHA-256 of 158 MB is ~0.09 s here, a third of a C-GET)
and on two cores that time was taken from the archive sending it. Normalization needs every
instance's SHA-256 anyway (the package manifest, the content-addressed copy the package is
written from), so it hashes each instance once there and hard-links it into the
content-addressed store (:meth:`BlobStore.adopt_instance`): no second copy on disk.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aggregator.errors import StoreError

CHUNK = 1 << 20

#: A DICOM UID as PS3.5 9.1 allows it (digits and dots, at most 64 characters). Anything else
#: (a broken or hostile file) is stored under a hash of its key, so a key never names a path.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
#: A SHA-256 in lower-case hex: one regular-expression match per lookup (a per-character check
#: was ~5% of packaging 100k small documents, which looks up each blob several times).
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int


class BlobStore:
    """A folder of blobs: ``ROOT/ab/cdef...`` where ``abcdef...`` is the SHA-256 in hex."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._root_str = str(self.root)
        self._tmp = self.root / ".tmp"
        # Fan-out folders already known to exist: creating them on every write cost two
        # syscalls per blob, a measurable share of a fast DICOM retrieve.
        self._dirs: set[str] = set()
        self._tmp_ready = False
        self._counter = itertools.count()
        self._tag = secrets.token_hex(4)

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise StoreError("not a SHA-256 hex digest", item=sha256[:80])
        # one Path built from a string, not two joins (a lookup per document in normalize and package)
        return Path(f"{self._root_str}/{sha256[:2]}/{sha256[2:]}")

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def _new_tmp(self) -> tuple[int, str]:
        if not self._tmp_ready:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._tmp_ready = True
        return tempfile.mkstemp(dir=self._tmp, prefix="in-")

    def _commit(self, tmp_name: str, digest: str) -> Path:
        final = self.path(digest)
        if digest[:2] not in self._dirs:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(digest[:2])
        if final.exists():
            os.unlink(tmp_name)
        else:
            os.replace(tmp_name, final)
        return final

    def put_bytes(self, data: bytes) -> BlobRef:
        # Bytes in memory can be hashed before anything is written: content the store already
        # holds (a re-pulled resource) costs no file system write at all, and the rest is written
        # with one open, one write and one rename (mkstemp's random names and a file object per
        # blob were a fifth of pulling 100k tiny documents).
        digest = hashlib.sha256(data).hexdigest()
        final = self.path(digest)
        if final.is_file():
            return BlobRef(digest, len(data))
        if digest[:2] not in self._dirs:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(digest[:2])
        self._write_new(final, (data,))
        return BlobRef(digest, len(data))

    def _write_new(self, final: Path, chunks: Iterable[bytes | memoryview]) -> int:
        """Write ``chunks`` to a fresh temporary file and rename it to ``final`` (whose folder
        exists); returns the size. Nothing is left under either name if it fails."""
        tmp_name = self._tmp_name()
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            try:
                size = _write_gathered(fd, chunks)
            finally:
                os.close(fd)
            os.replace(tmp_name, final)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise
        return size

    def _tmp_name(self) -> str:
        """A temporary file name no other writer uses: this process, a random tag of this store
        (a file left by a dead process with the same pid must not collide), a counter (threads
        share it; ``next`` on a count is atomic under the GIL)."""
        if not self._tmp_ready:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._tmp_ready = True
        return f"{self._tmp}/in-{os.getpid()}-{self._tag}-{next(self._counter)}"

    def put_stream(self, stream: BinaryIO, *, expected_sha256: str | None = None) -> BlobRef:
        return self.put_chunks(iter_blocks(stream), expected_sha256=expected_sha256)

    def put_chunks(self, chunks: Iterable[bytes | memoryview], *, expected_sha256: str | None = None) -> BlobRef:
        """Stream chunks to disk, hashing on the way; the blob appears only when complete."""
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = self._new_tmp()
        try:
            with os.fdopen(fd, "wb") as out:
                for block in chunks:
                    h.update(block)
                    size += len(block)
                    out.write(block)
            digest = h.hexdigest()
            if expected_sha256 and expected_sha256 != digest:
                raise StoreError("content does not match its expected SHA-256", item=expected_sha256)
            self._commit(tmp_name, digest)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise
        return BlobRef(digest, size)

    # -- DICOM instances, keyed by SOP Instance UID ---------------------------------------------

    def instance_path(self, source_id: int, sop_uid: str) -> Path:
        """Where the instance ``sop_uid`` received from source ``source_id`` is kept."""
        name = sop_uid if len(sop_uid) <= 64 and _UID.fullmatch(sop_uid) else (
            "x" + hashlib.sha256(sop_uid.encode("utf-8", "surrogateescape")).hexdigest())
        return self.root / "dicom" / str(int(source_id)) / name

    def put_instance(self, source_id: int, sop_uid: str, chunks: Iterable[bytes | memoryview]) -> int:
        """Write one instance as received (temporary file, then rename); return its size.

        A second copy of the same SOP instance from the same source replaces the first: the
        archive's newest answer is the one kept, and either the whole old or the whole new file
        is visible at any moment.
        """
        final = self.instance_path(source_id, sop_uid)
        folder = str(final.parent)
        if folder not in self._dirs:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(folder)
        return self._write_new(final, chunks)

    def adopt_instance(self, source_id: int, sop_uid: str) -> BlobRef:
        """Hash a stored instance and make it a content-addressed blob too (a hard link).

        Idempotent. Where the file system has no hard links the bytes are copied instead.
        """
        src = self.instance_path(source_id, sop_uid)
        try:
            digest, size = sha256_file(src)
        except FileNotFoundError:
            raise StoreError("instance is missing from the store", item=sop_uid) from None
        final = self.path(digest)
        if not final.is_file():
            if digest[:2] not in self._dirs:
                final.parent.mkdir(parents=True, exist_ok=True)
                self._dirs.add(digest[:2])
            try:
                os.link(src, final)
            except FileExistsError:
                pass
            except OSError:
                self.put_file(src)
        return BlobRef(digest, size)

    def put_file(self, src: Path) -> BlobRef:
        with open(src, "rb") as f:
            return self.put_stream(f)

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise StoreError("blob is missing from the store", item=sha256)

    def read_bytes(self, sha256: str) -> bytes:
        with self.open(sha256) as f:
            return f.read()

    def copy_to(self, sha256: str, dest: Path, *, atomic: bool = True) -> None:
        """Copy a blob to ``dest``: atomically (temporary name, then rename) unless ``atomic`` is
        false, for a caller that writes into a staging folder renamed into place as a whole
        (the package writer): there the rename per file was a third of the file system work."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not atomic:
            shutil.copyfile(self.path(sha256), dest)
            return
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(self.path(sha256), tmp)
        os.replace(tmp, dest)


#: Chunks and bytes gathered into one ``writev`` call (bounded: a spilled instance arrives as
#: 1 MiB blocks read from disk, which must not all be held at once).
GATHER_CHUNKS = 64
GATHER_BYTES = 8 << 20


def _write_gathered(fd: int, chunks: Iterable[bytes | memoryview]) -> int:
    """Write chunks to ``fd`` with few system calls; return the number of bytes written.

    An instance arrives as many PDV fragments or multipart blocks; one ``writev`` per batch
    instead of one ``write`` per fragment (and no copy into a userspace buffer) was a measurable
    share of a retrieve's system time.
    """
    total = 0
    batch: list[bytes | memoryview] = []
    batch_bytes = 0

    def flush() -> None:
        views = [memoryview(b).cast("B") for b in batch if len(b)]
        while views:
            n = os.writev(fd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        batch.clear()

    for block in chunks:
        batch.append(block)
        batch_bytes += len(block)
        total += len(block)
        if len(batch) >= GATHER_CHUNKS or batch_bytes >= GATHER_BYTES:
            flush()
            batch_bytes = 0
    flush()
    return total


def iter_blocks(stream: BinaryIO) -> Iterator[bytes]:
    """A readable stream as blocks of at most :data:`CHUNK` bytes."""
    while block := stream.read(CHUNK):
        yield block


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size
