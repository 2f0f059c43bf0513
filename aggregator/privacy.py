"""Owner-only files for patient data, whatever the caller's umask.

Everything under the home directory (the database, each case's raw store, scratch files,
normalized bundles) and every package holds protected health information. A umask of 022 - or
000 in a careless service unit - would leave it readable by every local user. Two measures,
because either alone leaves holes:

* :func:`restrict_umask` sets the process umask to 077 when a command or service opens the
  home, so that every file any library creates later (SQLite's WAL and journal files, temp
  files, zip writers) is born owner-only;
* :func:`make_private_dir` / :func:`make_private` fix the mode of the folders and files we name
  ourselves, so that a home created earlier by hand with looser bits is tightened, not trusted.

A home folder that stays group- or world-accessible after that (it belongs to someone else, or
the file system ignores modes) is reported by :func:`exposure_warning`, never silently accepted.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600


def restrict_umask() -> int:
    """Make files created from now on owner-only; returns the umask that was in force."""
    old = os.umask(PRIVATE_UMASK)
    os.umask(old | PRIVATE_UMASK)
    return old


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents we create) as 0700 and tighten it if it exists.

    Only folders this call creates, plus ``path`` itself, are changed: an existing parent such
    as the user's home directory is not ours to chmod.
    """
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
        _chmod(d, DIR_MODE)
    _chmod(path, DIR_MODE)
    return path


def make_private(path: Path) -> None:
    """Owner-only mode for one existing file (0600) or folder (0700)."""
    if path.is_symlink():
        return
    _chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def apply_mode(root: Path, mode: int) -> None:
    """Give ``root`` (a file or a whole tree) ``mode`` for files; folders also get search bits.

    Used by ``package --mode`` when a navigator deliberately shares a package with a group:
    a folder readable without ``x`` cannot be entered, so read bits imply the search bit.
    """
    dir_mode = mode | ((mode & 0o444) >> 2)
    for p in _walk(root):
        _chmod(p, dir_mode if p.is_dir() else mode)


def exposure_warning(home: Path) -> str | None:
    """A warning if ``home`` can be read or entered by the group or others, else None."""
    try:
        mode = stat.S_IMODE(home.stat().st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return (f"warning: the home folder {home} is accessible to other users (mode {mode:04o}); "
                "it holds patient data - run: chmod 700 " + str(home))
    return None


def parse_mode(text: str) -> int:
    """``0640`` / ``640`` / ``0o640`` -> 0o640; only permission bits are accepted."""
    t = text.strip().lower().removeprefix("0o")
    try:
        value = int(t, 8)
    except ValueError:
        raise ValueError(f"not an octal file mode: {text!r}") from None
    if value < 0 or value > 0o777:
        raise ValueError(f"file mode out of range (000-777): {text!r}")
    return value


def _walk(root: Path) -> Iterator[Path]:
    yield root
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                p = Path(dirpath) / name
                if not p.is_symlink():
                    yield p


def _chmod(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except PermissionError:
        # not ours (e.g. a shared mount): exposure_warning reports what stays open
        pass
