"""The tables shipped as package data in ``schemas/``: read one, compile its patterns.

Clinical knowledge (classification codes, stub wording, the settings a note is written in) lives
in YAML tables so that a new code is a data change, not a code change. Every reader of such a
table must fail the same way when the package data is missing or broken: a
:class:`~aggregator.errors.ConfigError` that names the table, never a bare ``OSError`` or a YAML
trace. This module is that one way; it knows nothing of what the tables mean.
"""

from __future__ import annotations

import re
from importlib.resources import files
from typing import Any

import yaml

from aggregator.errors import ConfigError


def load_mapping(name: str, what: str) -> dict[Any, Any]:
    """The YAML table ``schemas/<name>``, which must be a mapping; ``what`` names it in errors
    (``cannot read the <what> <name>: ...``)."""
    try:
        data = yaml.safe_load(files("schemas").joinpath(name).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the {what} {name}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{name} is not a mapping")
    return data


def compile_pattern(pattern: str, problem: str) -> re.Pattern[str]:
    """A table's case-insensitive pattern; a bad one raises ``ConfigError("<problem>: <why>")``."""
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"{problem}: {exc}") from exc
