"""The rule in force for a records request: how long the institution has, and when to follow up.

Under HIPAA (45 CFR 164.524(b)(2)) a covered entity has 30 days to act on a request for access,
with one extension of at most 30 more days if it says so in writing within the first 30. Some
states are stricter, and some institutions answer slowly enough that a navigator wants to call
earlier, so the days and the follow-up points are data: the built-in table
(``schemas/tables/request-rules.yaml``, the federal rule only) merged with the operator's file
(``$AGGREGATOR_REQUEST_RULES``, else ``<home>/request-rules.yaml``), which may add jurisdictions,
name the jurisdiction of an institution and override days or reminders for one institution.

A request keeps the rule it was drafted under (its letter cites those days), so editing the file
later does not move the dates of letters already written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from importlib.resources import files
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from aggregator.errors import ConfigError

RULES_ENV = "AGGREGATOR_REQUEST_RULES"
OVERDUE_DAYS_ENV = "AGGREGATOR_REQUEST_OVERDUE_DAYS"
"""Older setting, still honoured: the days of the default jurisdiction when no file sets them."""
HOME_FILE = "request-rules.yaml"
_TOP = {"default", "reminders", "timezone", "jurisdictions", "institutions"}
_JURISDICTION = {"title", "citation", "days", "extension_days", "reminders"}
_INSTITUTION = {"jurisdiction", "days", "extension_days", "reminders"}


@dataclass(frozen=True)
class Rule:
    """The days an institution has and the follow-up points, as one request is held to them."""

    jurisdiction: str
    title: str
    citation: str
    days: int
    extension_days: int
    reminders: tuple[int, ...]


@dataclass(frozen=True)
class Rules:
    default: str
    reminders: tuple[int, ...]
    timezone: str | None
    jurisdictions: Mapping[str, Mapping[str, Any]]
    institutions: Mapping[str, Mapping[str, Any]]

    def zone(self) -> tzinfo:
        """The navigators' zone: their "today" decides when a reminder is due."""
        name = os.environ.get("AGGREGATOR_TZ") or self.timezone
        if not name:
            local = datetime.now().astimezone().tzinfo
            assert local is not None
            return local
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"unknown time zone {name!r} for records request reminders") from exc

    def for_institution(self, institution: str, *, jurisdiction: str | None = None) -> Rule:
        """The rule for a letter to ``institution`` (names match without regard to case)."""
        own: Mapping[str, Any] = next((v for k, v in self.institutions.items()
                                       if k.casefold() == institution.casefold()), {})
        name = jurisdiction or own.get("jurisdiction") or self.default
        j = self.jurisdictions.get(name)
        if j is None:
            raise ConfigError(f"records request rules: unknown jurisdiction {name!r}; "
                              f"known: {', '.join(sorted(self.jurisdictions))}")
        reminders = own.get("reminders", j.get("reminders", self.reminders))
        return Rule(name, str(j.get("title", name)), str(j.get("citation", "")),
                    int(own.get("days", j["days"])), int(own.get("extension_days", j.get("extension_days", 0))),
                    tuple(sorted(set(int(d) for d in reminders))))


def _days(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 3650:
        raise ConfigError(f"records request rules: {where} must be a whole number of days (0 to 3650)")
    return value


def _reminders(value: Any, where: str) -> list[int]:
    if not isinstance(value, list):
        raise ConfigError(f"records request rules: {where} must be a list of days")
    out = [_days(v, where) for v in value]
    if 0 in out:
        raise ConfigError(f"records request rules: {where}: a reminder is at least 1 day after sending")
    return out


def _check(data: Any, origin: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"records request rules in {origin}: expected a mapping")
    extra = set(data) - _TOP
    if extra:
        raise ConfigError(f"records request rules in {origin}: unknown key(s) {', '.join(sorted(extra))}")
    for name, j in (data.get("jurisdictions") or {}).items():
        if not isinstance(j, dict) or set(j) - _JURISDICTION:
            raise ConfigError(f"records request rules in {origin}: jurisdiction {name!r} takes "
                              f"{', '.join(sorted(_JURISDICTION))}")
        for k in ("days", "extension_days"):
            if k in j:
                _days(j[k], f"{name}.{k}")
        if "reminders" in j:
            _reminders(j["reminders"], f"{name}.reminders")
    for i in (data.get("institutions") or {}).values():
        if not isinstance(i, dict) or set(i) - _INSTITUTION:
            raise ConfigError(f"records request rules in {origin}: an institution takes "
                              f"{', '.join(sorted(_INSTITUTION))}")
        for k in ("days", "extension_days"):
            if k in i:
                _days(i[k], f"institution {k}")
        if "reminders" in i:
            _reminders(i["reminders"], "institution reminders")
    if "reminders" in data:
        _reminders(data["reminders"], "reminders")
    tz = data.get("timezone")
    if tz is not None and not isinstance(tz, str):
        raise ConfigError(f"records request rules in {origin}: timezone is an IANA name such as America/New_York")
    return data


def _read(path: Path) -> dict[str, Any]:
    try:
        return _check(yaml.safe_load(path.read_text(encoding="utf-8")), path.name)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the records request rules file {path.name} ({type(exc).__name__})") from exc


def load_rules(home: Path | None = None) -> Rules:
    """The built-in table merged with the operator's file (theirs wins, key by key)."""
    base = _check(yaml.safe_load(files("schemas").joinpath("tables/request-rules.yaml").read_text("utf-8")),
                  "the built-in table")
    jurisdictions = {k: dict(v) for k, v in base["jurisdictions"].items()}
    env_days = os.environ.get(OVERDUE_DAYS_ENV, "").strip()
    if env_days.isdigit():
        jurisdictions[base["default"]]["days"] = int(env_days)
    named = os.environ.get(RULES_ENV)
    path = Path(named) if named else (home / HOME_FILE if home is not None else None)
    own: dict[str, Any] = {}
    if path is not None and (named or path.is_file()):
        own = _read(path)
    for k, v in (own.get("jurisdictions") or {}).items():
        jurisdictions[k] = {**jurisdictions.get(k, {}), **v}
    for k, v in jurisdictions.items():
        if "days" not in v:
            raise ConfigError(f"records request rules: jurisdiction {k!r} has no days")
    default = str(own.get("default", base["default"]))
    if default not in jurisdictions:
        raise ConfigError(f"records request rules: the default jurisdiction {default!r} is not defined")
    return Rules(default=default,
                 reminders=tuple(own.get("reminders", base["reminders"])),
                 timezone=own.get("timezone", base.get("timezone")),
                 jurisdictions=jurisdictions,
                 institutions={**(base.get("institutions") or {}), **(own.get("institutions") or {})})
