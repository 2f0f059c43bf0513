"""Content-addressed files on disk with atomic writes.

Every byte a connector receives lands here exactly as received, named by its SHA-256. Writes
stream to a temporary file in the same directory tree and are renamed into place, so a crash
never leaves a half-written blob under a valid name, and the same content stored twice is kept
once. Raw data in this store is never modified: normalization reads it and can be re-run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aggregator.errors import StoreError

CHUNK = 1 << 20


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int


class BlobStore:
    """A folder of blobs: ``ROOT/ab/cdef...`` where ``abcdef...`` is the SHA-256 in hex."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / ".tmp"
        # Fan-out folders already known to exist: creating them on every write cost two
        # syscalls per blob, a measurable share of a fast DICOM retrieve.
        self._dirs: set[str] = set()
        self._tmp_ready = False

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise StoreError("not a SHA-256 hex digest", item=sha256[:80])
        return self.root / sha256[:2] / sha256[2:]

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
        # holds (a re-pulled resource) costs no file system write at all.
        digest = hashlib.sha256(data).hexdigest()
        if self.path(digest).is_file():
            return BlobRef(digest, len(data))
        return self.put_chunks([data], expected_sha256=digest)

    def put_stream(self, stream: BinaryIO, *, expected_sha256: str | None = None) -> BlobRef:
        def chunks() -> Iterator[bytes]:
            while True:
                block = stream.read(CHUNK)
                if not block:
                    return
                yield block

        return self.put_chunks(chunks(), expected_sha256=expected_sha256)

    def put_chunks(self, chunks: Iterable[bytes], *, expected_sha256: str | None = None) -> BlobRef:
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

    def copy_to(self, sha256: str, dest: Path) -> None:
        """Copy a blob to ``dest`` atomically (temporary name, then rename)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(self.path(sha256), tmp)
        os.replace(tmp, dest)


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size
