"""Reading secrets (tokens, client secrets, client ids) for connectors.

Secrets come from an environment variable *name* or a file *path* stored in the endpoint
definition - never the secret itself. That keeps secrets out of the database, out of shell
history and out of ``ps`` output, and lets deployments mount them (Docker/K8s secrets).
Error messages name the variable or file, never the value.
"""

from __future__ import annotations

import os
from pathlib import Path

from aggregator.errors import ConfigError

#: A secret file larger than this is certainly not a token or a key; refuse to read it whole.
MAX_SECRET_BYTES = 64 * 1024


def read_secret(*, env: str | None = None, file: str | None = None, what: str = "secret") -> str:
    """Return the secret named by ``env`` (a variable name) or ``file`` (a path), stripped.

    Exactly one source is used: ``env`` wins when both are given and the variable is set.
    Raises :class:`ConfigError` naming the variable or the file when it is missing or empty.
    """
    if env:
        value = os.environ.get(env)
        if value is not None and value.strip():
            return value.strip()
        if not file:
            raise ConfigError(f"{what}: environment variable {env} is not set or empty")
    if file:
        path = Path(file).expanduser()
        try:
            if path.stat().st_size > MAX_SECRET_BYTES:
                raise ConfigError(f"{what}: file {path} is too large to be a secret")
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{what}: file {path} does not exist")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{what}: cannot read file {path} ({type(exc).__name__})")
        if not text.strip():
            raise ConfigError(f"{what}: file {path} is empty")
        return text.strip()
    raise ConfigError(f"{what}: give an environment variable name or a file path")


def read_private_key(path: str | None, *, what: str = "private key") -> bytes:
    """Read a PEM private key file as bytes; the path, never the key, appears in errors."""
    if not path:
        raise ConfigError(f"{what}: give the path of a PEM private key file (--private-key)")
    p = Path(path).expanduser()
    try:
        if p.stat().st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"{what}: file {p} is too large to be a key")
        return p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what}: file {p} does not exist")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read file {p} ({type(exc).__name__})")
