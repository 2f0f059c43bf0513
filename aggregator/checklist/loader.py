"""Loading and validating checklists (YAML data checked against ``schemas/checklist.schema.json``).

Checklists are data so that a clinician can write one without touching code. A bad checklist
must therefore fail with a message a clinician can act on: the item, the field (as a path) and
what is wrong - including class names that the classification tables never produce, which
would otherwise silently make an item "missing" forever.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from aggregator.errors import ChecklistError, NotFound
from aggregator.normalize.classify import load_tables

SCHEMA = "checklist.schema.json"
FOLDER = "checklists"
_DURATION = re.compile(r"^(\d+)([dwmy])$")
_UNIT_DAYS = {"d": 1, "w": 7, "m": 30, "y": 365}


def parse_duration(text: str) -> int:
    """``90d`` -> 90, ``6m`` -> 180 (months count as 30 days, years as 365)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ChecklistError(f"bad duration {text!r}: use a number and d, w, m or y, e.g. 90d")
    return int(m.group(1)) * _UNIT_DAYS[m.group(2)]


@dataclass(frozen=True)
class Selector:
    """Which resources a part of an item is about (by class, type and window).

    A window (``within``) runs from ``within_days`` before the reference date to ``grace_days``
    after it: results dated years after the case date are not "of the last 90 days before" it,
    but a lab drawn a few days after the referral still belongs to the question being asked.
    """

    classes_any: frozenset[str] = frozenset()
    classes_all: frozenset[str] = frozenset()
    classes_none: frozenset[str] = frozenset()
    resource_types: frozenset[str] = frozenset()
    within_days: int | None = None
    grace_days: int = 0
    """Days after the reference date that still count for a window (the checklist's ``grace``)."""
    label: str = ""
    content: str = "any"
    final_only: bool = False
    min: int = 1
    request: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, grace_days: int = 0) -> Selector | None:
        if d is None:
            return None
        return cls(
            classes_any=frozenset(d.get("classes_any") or ()),
            classes_all=frozenset(d.get("classes_all") or ()),
            classes_none=frozenset(d.get("classes_none") or ()),
            resource_types=frozenset(d.get("resource_types") or ()),
            within_days=parse_duration(d["within"]) if d.get("within") else None,
            grace_days=grace_days,
            label=str(d.get("label") or ""),
            content=str(d.get("content") or "any"),
            final_only=bool(d.get("final_only", False)),
            min=int(d.get("min") or 1),
            request=str(d.get("request") or ""),
        )

    def matches(self, resource_type: str, classes: frozenset[str]) -> bool:
        if self.resource_types and resource_type not in self.resource_types:
            return False
        if self.classes_all and not self.classes_all <= classes:
            return False
        if self.classes_none and self.classes_none & classes:
            return False
        return not (self.classes_any and not (self.classes_any & classes))


@dataclass(frozen=True)
class Link:
    via: str
    from_: str = "target"
    path: str = ""
    days_before: int = 0
    days_after: int = 0
    same_modality: bool = False


@dataclass(frozen=True)
class Item:
    id: str
    title: str
    rule: str
    description: str = ""
    applies_if: Selector | None = None
    subjects: Selector | None = None
    target: Selector | None = None
    components: tuple[Selector, ...] = ()
    links: tuple[Link, ...] = ()
    summaries: frozenset[str] = frozenset()
    otherwise: str = "not-applicable"
    request: str = ""
    unlinked: str = "ignore"
    """rule each: ``check`` judges each target no subject links to (within the target's window)."""


@dataclass(frozen=True)
class Checklist:
    name: str
    title: str
    items: tuple[Item, ...]
    description: str = ""
    version: str = ""
    grace_days: int = 0
    """How many days after the case date still count for the windows of its items."""
    source: str = ""
    """Where it was loaded from: ``builtin:NAME`` or the file path."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The checklist as written (for ``checklist show --json``), plus where it came from."""
        return {**self.raw, "source": self.source}


# --- schema and validation -----------------------------------------------------------------


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(files("schemas").joinpath(SCHEMA).read_text(encoding="utf-8"))
    return data


@lru_cache(maxsize=1)
def known_classes() -> frozenset[str]:
    """Every class the classification tables can produce (to catch typos in checklists)."""
    t = load_tables()
    out: set[str] = set()
    for cs in t.types.values():
        out |= cs
    for g in t.groups:
        for cs in g.codes.values():
            out |= cs
        for _, _, cs in g.prefixes:
            out |= cs
        for kw in g.keywords:
            out |= kw.classes
    for cs in t.profiles.values():
        out |= cs
    for els in t.elements.values():
        for cs in els.values():
            out |= cs
    return frozenset(out)


def _where(path: Any, data: Any) -> str:
    """``items[3] (pathology-report).target.content`` from a jsonschema path."""
    parts: list[str] = []
    node = data
    for p in path:
        if isinstance(p, int):
            label = f"[{p}]"
            if isinstance(node, list) and p < len(node) and isinstance(node[p], dict) and node[p].get("id"):
                label += f" ({node[p]['id']})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(p))
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            node = None
    return "".join(parts) or "(top level)"


def validate_data(data: Any) -> list[str]:
    """Schema errors and semantic errors (duplicate ids, unknown classes, bad durations)."""
    if not isinstance(data, dict):
        return ["(top level): a checklist must be a YAML mapping with name, title and items"]
    validator = jsonschema.Draft202012Validator(_schema())
    errors = []
    for err in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        errors.append(f"{_where(err.absolute_path, data)}: {_message(err)}")
    if errors:
        return errors
    seen: set[str] = set()
    known = known_classes()
    for i, item in enumerate(data["items"]):
        where = f"items[{i}] ({item['id']})"
        if item["id"] in seen:
            errors.append(f"{where}.id: duplicate item id {item['id']!r}")
        seen.add(item["id"])
        for part in ("applies_if", "subjects", "target"):
            errors += _unknown(f"{where}.{part}", item.get(part), known)
        for j, comp in enumerate(item.get("components") or []):
            errors += _unknown(f"{where}.components[{j}]", comp, known)
        for c in item.get("summaries") or []:
            if c not in known:
                errors.append(f"{where}.summaries: unknown class {c!r}")
    return errors


def _message(err: jsonschema.ValidationError) -> str:
    schema = err.schema if isinstance(err.schema, dict) else {}
    if err.validator == "additionalProperties":
        return f"{err.message} (allowed: {', '.join(sorted(schema.get('properties', {})))})"
    if err.validator == "enum" and isinstance(err.validator_value, list):
        return f"{err.instance!r} is not one of {', '.join(map(str, err.validator_value))}"
    if err.validator == "pattern" and isinstance(err.instance, str) and err.validator_value == "^[0-9]+[dwmy]$":
        return f"{err.instance!r} is not a duration: use a number and d, w, m or y, e.g. 90d"
    return err.message


def _unknown(where: str, part: Any, known: frozenset[str]) -> list[str]:
    if not isinstance(part, dict):
        return []
    out = []
    for key in ("classes_any", "classes_all", "classes_none"):
        for c in part.get(key) or []:
            if c not in known:
                close = difflib.get_close_matches(c, sorted(known), n=4, cutoff=0.6)
                hint = f" (did you mean one of: {', '.join(close)})" if close else ""
                out.append(f"{where}.{key}: unknown class {c!r}{hint}")
    return out


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ChecklistError(f"not valid YAML{at}: {getattr(exc, 'problem', None) or exc}", item=where) from exc


def validate_checklist_file(path: Path) -> list[str]:
    """Human-readable problems with a checklist file; empty when it is valid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"cannot read the file: {exc.__class__.__name__}"]
    try:
        data = _read_yaml(text, str(path))
    except ChecklistError as exc:
        return [exc.message]
    return validate_data(data)


# --- loading -------------------------------------------------------------------------------


def list_checklists() -> list[str]:
    """Names of the built-in checklists."""
    folder = files("schemas").joinpath(FOLDER)
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))


def _build(data: dict[str, Any], source: str) -> Checklist:
    grace = parse_duration(data["grace"]) if data.get("grace") else 0

    def sel(d: dict[str, Any] | None) -> Selector | None:
        return Selector.from_dict(d, grace)

    items = []
    for it in data["items"]:
        items.append(
            Item(
                id=it["id"],
                title=it["title"],
                rule=it["rule"],
                description=str(it.get("description") or ""),
                applies_if=sel(it.get("applies_if")),
                subjects=sel(it.get("subjects")),
                target=sel(it.get("target")),
                components=tuple(s for s in (sel(c) for c in it.get("components") or []) if s),
                links=tuple(
                    Link(
                        via=lk["via"],
                        from_=lk.get("from", "target"),
                        path=lk.get("path", ""),
                        days_before=int(lk.get("days_before", 0)),
                        days_after=int(lk.get("days_after", 0)),
                        same_modality=bool(lk.get("same_modality", False)),
                    )
                    for lk in it.get("links") or []
                ),
                summaries=frozenset(it.get("summaries") or ()),
                otherwise=it.get("otherwise", "not-applicable"),
                request=str(it.get("request") or ""),
                unlinked=str(it.get("unlinked") or "ignore"),
            )
        )
    return Checklist(
        name=data["name"],
        title=data["title"],
        items=tuple(items),
        description=str(data.get("description") or ""),
        version=str(data.get("version") or ""),
        grace_days=grace,
        source=source,
        raw=data,
    )


def _from_text(text: str, source: str) -> Checklist:
    data = _read_yaml(text, source)
    errors = validate_data(data)
    if errors:
        raise ChecklistError("invalid checklist:\n  " + "\n  ".join(errors), item=source)
    return _build(data, source)


def load_checklist(name_or_path: str) -> Checklist:
    """A built-in checklist by name (``oncology``) or a custom one by path (``./mine.yaml``)."""
    looks_like_path = name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or "\\" in name_or_path
    if looks_like_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise NotFound("checklist file not found", item=name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChecklistError(f"cannot read the checklist: {exc.__class__.__name__}", item=name_or_path) from exc
        return _from_text(text, str(path))
    names = list_checklists()
    if name_or_path not in names:
        raise NotFound(f"unknown checklist; built-in checklists: {', '.join(names)} (or give a YAML path)",
                       item=name_or_path)
    text = files("schemas").joinpath(FOLDER, f"{name_or_path}.yaml").read_text(encoding="utf-8")
    return _from_text(text, f"builtin:{name_or_path}")
