"""Encrypted delivery of a package zip: a passphrase (WinZip AES-256) or an ``age`` recipient.

A package holds a patient's whole record and often travels by e-mail, a download link or a USB
stick. Two ways to seal it, both streamed so a 2 GB imaging study is never held in memory:

* **Passphrase** (``--passphrase-file`` / ``--passphrase-env``): every member is encrypted with
  WinZip AES-256 (AE-2, through ``pyzipper``), which 7-Zip, WinZip, macOS Archive Utility
  alternatives and most unzip tools open with the passphrase. The format fixes the key derivation
  (PBKDF2-HMAC-SHA1, 1000 rounds), so the passphrase's length is the protection: we refuse short
  ones. The file names inside the zip are not encrypted by the format; ours carry no PHI
  (``documents/DOC0001.PDF``, ``DICOM/ST000001/...``).
* **Recipient** (``--recipient age1...``): the zip is streamed through a pipe into ``age``
  encryption (``pyrage``) to one or more X25519 public keys; the result is ``F.zip.age``. No
  plaintext byte of the zip exists anywhere on disk.

Secrets never come from the command line (where ``ps`` and shell history would show them):
only from a file or an environment variable that the option names.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aggregator.errors import ConfigError, PackageError, UsageError

#: the WinZip AES key derivation is weak by design (1000 PBKDF2-SHA1 rounds): a long passphrase
#: is what keeps a stolen package closed
MIN_PASSPHRASE_CHARS = 12
MAX_SECRET_FILE_BYTES = 64 << 10
AGE_SUFFIX = ".age"
AGE_MAGIC = b"age-encryption.org/v1\n"
#: blocks between the zip writer and the age encryptor: a pipe holds at most 64 KiB in flight
PIPE_BLOCK = 1 << 20


@dataclass(frozen=True)
class Sealing:
    """How to encrypt a package zip: exactly one of a passphrase or age recipients."""

    passphrase: bytes | None = None
    recipients: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.passphrase is None) == (not self.recipients):
            raise UsageError("encryption needs either a passphrase or age recipients, not both")

    @property
    def kind(self) -> str:
        return "zip-aes256" if self.passphrase is not None else "age"

    def __repr__(self) -> str:  # never print the passphrase
        return f"Sealing(kind={self.kind!r}, recipients={len(self.recipients)})"


# --- secrets from files and the environment ------------------------------------------------------


def _secret_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file ({type(exc).__name__})", item=Path(path).name) from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"the {what} file is too large to be a {what}", item=Path(path).name)
    return data


def read_passphrase(*, file: str | None = None, env: str | None = None, new: bool = True) -> bytes:
    """The passphrase from ``file`` or the environment variable ``env`` (one of them).

    One trailing newline is dropped (``echo pass > F`` writes one); nothing else is changed, so
    a passphrase typed in 7-Zip opens the zip. A ``new`` one (to encrypt with) must be long
    enough; one to open an existing package is taken as it is.
    """
    if (file is None) == (env is None):
        raise UsageError("give the passphrase with exactly one of --passphrase-file or --passphrase-env")
    if file is not None:
        raw = _secret_file(file, "passphrase")
    else:
        assert env is not None
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"environment variable {env} is not set")
        raw = os.fsencode(value)
    raw = raw.removesuffix(b"\n").removesuffix(b"\r")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("the passphrase is not UTF-8 text") from None
    if "\n" in text or "\x00" in text:
        raise ConfigError("the passphrase must be one line")
    if not text:
        raise ConfigError("the passphrase is empty")
    if new and len(text) < MIN_PASSPHRASE_CHARS:
        raise ConfigError(f"the passphrase is too short: use at least {MIN_PASSPHRASE_CHARS} characters "
                          "(WinZip AES derives its key with only 1000 rounds)")
    return raw


def parse_recipients(keys: Sequence[str]) -> tuple[str, ...]:
    """Check ``age1...`` X25519 public keys; return them as given."""
    x25519 = _pyrage().x25519
    out = []
    for key in keys:
        try:
            x25519.Recipient.from_str(key.strip())
        except Exception:
            raise UsageError("not an age X25519 public key (age1...)", item=key[:80]) from None
        out.append(key.strip())
    if not out:
        raise UsageError("no age recipient given")
    return tuple(out)


def read_identities(path: str) -> list[Any]:
    """The ``AGE-SECRET-KEY-...`` lines of an age identity file (``age-keygen`` output)."""
    x25519 = _pyrage().x25519
    text = _secret_file(path, "identity").decode("utf-8", errors="replace")
    identities = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(x25519.Identity.from_str(line))
        except Exception:
            raise ConfigError("the identity file has a line that is not an age X25519 secret key",
                              item=Path(path).name) from None
    if not identities:
        raise ConfigError("the identity file holds no age secret key", item=Path(path).name)
    return identities


def _pyrage() -> Any:
    try:
        import pyrage
    except ImportError:
        raise ConfigError("age encryption needs the 'pyrage' package (pip install pyrage)") from None
    return pyrage


def is_age_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(AGE_MAGIC)) == AGE_MAGIC
    except OSError:
        return False


# --- writing ----------------------------------------------------------------------------------


class ZipSink:
    """One zip being written: plain, WinZip AES-256, or streamed into age. Members are added one
    at a time by :meth:`open_member`, which returns a writable stream."""

    def __init__(self, zf: Any, info_cls: Any, deflated: int) -> None:
        self._zf = zf
        self._info_cls = info_cls
        self._deflated = deflated

    def open_member(self, name: str, size: int, *, date_time: tuple[int, int, int, int, int, int],
                    external_attr: int) -> IO[bytes]:
        info = self._info_cls(name, date_time=date_time)
        info.compress_type = self._deflated
        info.external_attr = external_attr
        info.create_system = 3
        info.file_size = size  # decides ZIP64 up front: the stream may not seek back
        stream: IO[bytes] = self._zf.open(info, "w")
        return stream


@contextmanager
def zip_sink(dest: Path, sealing: Sealing | None) -> Iterator[ZipSink]:
    """A :class:`ZipSink` writing ``dest``; closed (central directory written) on exit."""
    if sealing is None:
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
            yield ZipSink(z, zipfile.ZipInfo, zipfile.ZIP_DEFLATED)
    elif sealing.passphrase is not None:
        import pyzipper

        with pyzipper.AESZipFile(dest, "w", compression=pyzipper.ZIP_DEFLATED, allowZip64=True,
                                 encryption=pyzipper.WZ_AES, encryption_kwargs={"nbits": 256}) as z:
            z.setpassword(sealing.passphrase)
            yield ZipSink(z, z.zipinfo_cls, pyzipper.ZIP_DEFLATED)
    else:
        with _age_pipe(dest, sealing.recipients) as pipe_in, \
                zipfile.ZipFile(pipe_in, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
            yield ZipSink(z, zipfile.ZipInfo, zipfile.ZIP_DEFLATED)


@contextmanager
def _age_pipe(dest: Path, recipients: Sequence[str]) -> Iterator[IO[bytes]]:
    """A writable pipe whose bytes a thread encrypts with age into ``dest``.

    ``pyrage.encrypt_io`` pulls from a reader; the zip writer pushes. A pipe joins the two with
    64 KiB in flight, so nothing is buffered whole and no plaintext reaches the disk. If the
    encryptor fails, its end of the pipe is closed, so the writer stops with a broken pipe
    instead of blocking forever, and the encryptor's error is raised.
    """
    pyrage = _pyrage()
    keys = [pyrage.x25519.Recipient.from_str(k) for k in recipients]
    rfd, wfd = os.pipe()
    reader = os.fdopen(rfd, "rb", buffering=PIPE_BLOCK)
    writer = os.fdopen(wfd, "wb", buffering=PIPE_BLOCK)
    errors: list[BaseException] = []

    def encrypt() -> None:
        try:
            with open(dest, "wb") as out:
                pyrage.encrypt_io(reader, out, keys)
        except BaseException as exc:  # reported by the writer's side
            errors.append(exc)
        finally:
            reader.close()

    thread = threading.Thread(target=encrypt, name="age-encrypt", daemon=True)
    thread.start()
    broken = False
    try:
        yield writer
    except BrokenPipeError:
        broken = True
    finally:
        try:
            writer.close()
        except BrokenPipeError:
            broken = True
        thread.join()
    if errors:
        raise PackageError(f"age encryption failed ({type(errors[0]).__name__})", item=dest.name)
    if broken:
        raise PackageError("age encryption stopped before the package was complete", item=dest.name)


# --- reading ----------------------------------------------------------------------------------


def open_encrypted_zip(path: Path, passphrase: bytes) -> Any:
    """A ``pyzipper.AESZipFile`` for reading ``path`` with ``passphrase``."""
    import pyzipper

    zf = pyzipper.AESZipFile(path)
    zf.setpassword(passphrase)
    return zf


def member_encrypted(info: Any) -> bool:
    """Whether a zip member is encrypted with WinZip AES (not the broken ZipCrypto)."""
    return bool(info.flag_bits & 0x1) and getattr(info, "wz_aes_version", None) is not None


def decrypt_age(path: Path, identities: list[Any], dest: Path) -> None:
    """Decrypt the age file ``path`` into ``dest`` (streamed)."""
    pyrage = _pyrage()
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owner-only whatever the umask
        with open(path, "rb") as src, open(fd, "wb") as out:
            pyrage.decrypt_io(src, out, identities)
    except pyrage.DecryptError:
        raise PackageError("cannot decrypt: no identity in the identity file matches this package, "
                           "or the file is damaged", item=path.name) from None
