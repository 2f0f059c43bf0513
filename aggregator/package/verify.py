"""Check a package (folder or zip) against its manifest.json.

A consultant receives the package by some channel we do not control (a USB stick, a download,
a burned disc). ``verify_package`` tells whether what arrived is exactly what was written: every
file listed is there with the same size and SHA-256, nothing was added, and the manifest itself
is well-formed. Each problem names the file concerned so a navigator can resend just that.

For a zip the member names are checked before anything else: a member that would land outside
the package when extracted (``../``, absolute, drive letters, NUL) is reported, never followed.
Reading a member stops one byte past its manifest size, so a zip bomb costs no more than the
package it pretends to be.

An encrypted package (see :mod:`aggregator.package.sealing`) is verified with its passphrase or
age identity. With a passphrase, every member must be encrypted: a plaintext member, or a whole
plaintext manifest slipped into the zip, would otherwise let anyone who never knew the passphrase
forge files that "verify". An age package is decrypted, streamed, into a private temporary
folder (``scratch``, or the system's), verified there and removed: the zip's central directory
is at its end, so it cannot be read as a stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from aggregator.errors import PackageError
from aggregator.package.manifest import MANIFEST, schema_problems, unsafe_relpath
from aggregator.package.sealing import decrypt_age, is_age_file, member_encrypted, open_encrypted_zip

CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20

MISSING = "missing"
ALTERED = "altered (sha256 mismatch)"
SIZE = "size mismatch"
EXTRA = "extra file not in manifest"


def verify_package(path: Path, *, passphrase: bytes | None = None, identities: list[Any] | None = None,
                   scratch: Path | None = None) -> list[tuple[str, str]]:
    """Problems found in the package at ``path`` as ``[(relative file, problem)]``; empty when OK.

    ``passphrase`` opens a WinZip-AES package, ``identities`` (age X25519 secret keys) an age one.
    An encrypted package without its secret, or with the wrong one, raises :class:`PackageError`
    saying so: that is not a problem of the package.
    """
    path = Path(path)
    if path.is_dir():
        return _verify_folder(path)
    if path.is_file() and is_age_file(path):
        if not identities:
            raise PackageError("the package is encrypted with age: give the recipient's key with --identity-file",
                               item=path.name)
        with tempfile.TemporaryDirectory(dir=scratch, prefix=".verify-") as tmp:  # created 0700
            plain = Path(tmp) / "package.zip"
            decrypt_age(path, identities, plain)
            return _verify_zip(plain, None, label=path.name)
    if path.is_file() and zipfile.is_zipfile(path):
        return _verify_zip(path, passphrase)
    if path.exists():
        return [(path.name, "not a package folder or zip file")]
    return [(path.name, "package not found")]


# --- the comparison, shared by folders and zips ---------------------------------------------


def _hash(stream: IO[bytes], limit: int) -> tuple[str, int]:
    """SHA-256 and size of ``stream``, reading at most ``limit + 1`` bytes."""
    h = hashlib.sha256()
    size = 0
    while size <= limit:
        block = stream.read(min(CHUNK, limit + 1 - size))
        if not block:
            break
        h.update(block)
        size += len(block)
    return h.hexdigest(), size


def _parse_manifest(raw: bytes | None) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    if raw is None:
        return None, [(MANIFEST, MISSING)]
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [(MANIFEST, f"not valid JSON ({type(exc).__name__})")]
    problems = [(MANIFEST, f"does not match the manifest schema: {p}") for p in schema_problems(manifest)]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return None, problems or [(MANIFEST, "has no file list")]
    return manifest, problems


def _compare(
    manifest: dict[str, Any],
    present: set[str],
    opener: Callable[[str], IO[bytes]],
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    listed: set[str] = set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict):
            continue
        rel, size, digest = entry.get("path"), entry.get("size"), entry.get("sha256")
        if not isinstance(rel, str) or not isinstance(size, int) or not isinstance(digest, str):
            continue  # already reported by the schema check
        if unsafe_relpath(rel) or rel == MANIFEST:
            problems.append((rel, "unsafe or reserved path listed in the manifest"))
            continue
        if rel in listed:
            problems.append((rel, "listed twice in the manifest"))
            continue
        listed.add(rel)
        if rel not in present:
            problems.append((rel, MISSING))
            continue
        try:
            with opener(rel) as f:
                got, got_size = _hash(f, max(size, 0))
        except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as exc:
            # RuntimeError: pyzipper's "bad password" for a member sealed with another passphrase
            problems.append((rel, f"unreadable ({type(exc).__name__})"))
            continue
        if got_size != size:
            problems.append((rel, SIZE))
        elif got != digest:
            problems.append((rel, ALTERED))
    for rel in sorted(present - listed - {MANIFEST}):
        problems.append((rel, EXTRA))
    return problems


# --- folders ----------------------------------------------------------------------------------


def _walk(root: Path) -> Iterator[tuple[str, bool]]:
    """(relative path, is a regular file) for everything below ``root``; links are not followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for d in list(dirnames):
            if (base / d).is_symlink():
                dirnames.remove(d)
                yield (base / d).relative_to(root).as_posix(), False
        for name in filenames:
            p = base / name
            yield p.relative_to(root).as_posix(), stat.S_ISREG(p.lstat().st_mode)


def _verify_folder(root: Path) -> list[tuple[str, str]]:
    mpath = root / MANIFEST
    raw = None
    if mpath.is_file() and not mpath.is_symlink():
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            return [(MANIFEST, "too large to be a manifest")]
        raw = mpath.read_bytes()
    manifest, problems = _parse_manifest(raw)
    if manifest is None:
        return problems
    present: set[str] = set()
    for rel, regular in _walk(root):
        if regular:
            present.add(rel)
        else:
            problems.append((rel, "not a regular file (links are not allowed in a package)"))

    def opener(rel: str) -> IO[bytes]:
        return open(root / rel, "rb")

    return problems + _compare(manifest, present, opener)


# --- zips -------------------------------------------------------------------------------------


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


NOT_ENCRYPTED = "not encrypted, in a package that must be (added or replaced after it was sealed?)"


def _verify_zip(path: Path, passphrase: bytes | None, *, label: str | None = None) -> list[tuple[str, str]]:
    shown = label or path.name
    try:
        zf: Any = open_encrypted_zip(path, passphrase) if passphrase is not None else zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return [(shown, f"not a readable zip file ({type(exc).__name__})")]
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if passphrase is None and any(i.flag_bits & 0x1 for i in infos):
            raise PackageError("the package is encrypted: give its passphrase with --passphrase-file or "
                               "--passphrase-env", item=shown)
        names = [i.filename for i in infos]
        # A package zipped as a folder ("pkg/manifest.json") is accepted: strip that one prefix.
        prefix = ""
        if MANIFEST not in names:
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST}" in names:
                prefix = next(iter(tops)) + "/"
        problems: list[tuple[str, str]] = []
        members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if unsafe_relpath(name):
                problems.append((name, "unsafe member name (would escape the package)"))
                continue
            if _is_link(info):
                problems.append((name, "not a regular file (links are not allowed in a package)"))
                continue
            if passphrase is not None and not member_encrypted(info):
                problems.append((name, NOT_ENCRYPTED))
            rel = name[len(prefix):] if name.startswith(prefix) else name
            if rel in members:
                problems.append((rel, "member appears twice in the zip"))
                continue
            members[rel] = info
        raw = None
        if MANIFEST in members:
            minfo = members[MANIFEST]
            if minfo.file_size > MAX_MANIFEST_BYTES:
                return [*problems, (MANIFEST, "too large to be a manifest")]
            try:
                raw = zf.read(minfo)
            except RuntimeError:
                raise PackageError("wrong passphrase: the package cannot be decrypted with it", item=shown) from None
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                return [*problems, (MANIFEST, f"unreadable ({type(exc).__name__})")]
        manifest, mproblems = _parse_manifest(raw)
        problems += mproblems
        if manifest is None:
            return problems

        def opener(rel: str) -> IO[bytes]:
            return zf.open(members[rel])

        return problems + _compare(manifest, set(members), opener)
