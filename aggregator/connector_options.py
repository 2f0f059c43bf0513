"""Endpoint options derived from each connector's ``config_type``, for the CLI and the API.

The CLI used to declare 36 connector options by hand, so a connector installed through the
entry point could only be configured with ``--option KEY=VALUE``. Here every installed kind's
config dataclass is read once: each scalar field becomes an option (``page_size`` ->
``--page-size``), typed, with the help, choices and aliases its :func:`connectors.base.option`
metadata gives. The same description yields a JSON Schema per kind for the API, so a
third-party connector gets both faces without touching the core.

Loading the kinds imports their modules, so this runs only when ``endpoint add`` (or its
help) is used, never at start-up of other commands.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from aggregator.errors import UsageError

#: Kinds whose sources are not endpoints (they are added with ``source add --media``).
NOT_ENDPOINTS = frozenset({"media"})
_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    """The config field (``page_size``)."""
    py_type: type
    required: bool
    default: Any
    help: str
    choices: tuple[str, ...] | None
    aliases: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _scalar(annotation: Any) -> tuple[type | None, bool]:
    """``(str, False)`` for ``str``; ``(int, True)`` for ``int | None``; ``(None, _)`` otherwise."""
    if annotation in _SCALARS:
        return annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return args[0], True
    return None, False


def fields_of(config_type: type) -> list[FieldSpec]:
    """The user-settable scalar fields of a connector config dataclass, in declaration order."""
    hints = typing.get_type_hints(config_type)
    out = []
    for f in dataclasses.fields(config_type):
        meta: typing.Mapping[str, Any] = f.metadata or {}
        if meta.get("cli") is False:
            continue
        py_type, _optional = _scalar(hints.get(f.name))
        if py_type is None:
            continue  # lists and mappings are set by the core or with --option
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required or f.default is dataclasses.MISSING else f.default
        out.append(FieldSpec(f.name, py_type, required, default, str(meta.get("help") or f.name.replace("_", " ")),
                             tuple(meta["choices"]) if meta.get("choices") else None, tuple(meta.get("aliases") or ())))
    return out


def endpoint_kinds() -> dict[str, list[FieldSpec]]:
    """Every installed connector kind that defines endpoints, with its fields."""
    from connectors.base import available_kinds, load_connector_class

    return {kind: fields_of(load_connector_class(kind).config_type)
            for kind in available_kinds() if kind not in NOT_ENDPOINTS}


@dataclass(frozen=True)
class CliOption:
    """One CLI option: the union of the same-named field over the kinds that have it."""

    flag: str
    dest: str
    py_type: type
    help: str
    choices: tuple[str, ...] | None
    kinds: tuple[str, ...]


def cli_options(kinds: dict[str, list[FieldSpec]]) -> list[CliOption]:
    """Options for ``endpoint add``: each field name (and alias) once, naming the kinds it serves.

    Click only parses and documents them; :func:`config_from_options` converts and checks each
    value against the chosen kind's own field, so kinds may disagree on a field's type or
    choices without one constraining the other.
    """
    seen: dict[str, list[tuple[str, FieldSpec]]] = {}
    for kind, specs in sorted(kinds.items()):
        for spec in specs:
            for name in (spec.name, *spec.aliases):
                seen.setdefault(name, []).append((kind, spec))
    out = []
    for name, uses in sorted(seen.items()):
        typed = {spec.py_type for _, spec in uses}
        py_type = typed.pop() if len(typed) == 1 else str
        choice_sets = [spec.choices for _, spec in uses]
        choices = tuple(sorted({c for cs in choice_sets if cs for c in cs})) if all(choice_sets) else None
        main = next((spec for _, spec in uses if spec.name == name), uses[0][1])
        defaults = {repr(spec.default) for _, spec in uses if spec.name == name and spec.default is not None}
        kinds_ = tuple(dict.fromkeys(kind for kind, _ in uses))
        if any(spec.name == name for _, spec in uses):
            help_ = main.help
        else:  # only an alias by this name: say what it sets
            help_ = "Sets " + ", ".join(sorted({spec.flag for _, spec in uses})) + "."
        if len(defaults) == 1:
            help_ += f" Default: {defaults.pop().strip(chr(39))}."
        out.append(CliOption("--" + name.replace("_", "-"), name, py_type, f"{help_} [{', '.join(kinds_)}]",
                             choices, kinds_))
    return out


def config_from_options(kind: str, specs: list[FieldSpec], given: dict[str, Any]) -> dict[str, Any]:
    """The config for ``kind`` from the options a user gave; refuses options of other kinds.

    Values are converted to each field's type and checked against its choices; an alias sets
    every field that declares it. Required fields are left to the config's own validation,
    which names what is missing.
    """
    by_name = {s.name: s for s in specs}
    by_alias: dict[str, list[FieldSpec]] = {}
    for s in specs:
        for a in s.aliases:
            by_alias.setdefault(a, []).append(s)
    config: dict[str, Any] = {}
    foreign = []
    for name, value in given.items():
        if value is None:
            continue
        targets = [by_name[name]] if name in by_name else by_alias.get(name, [])
        if not targets:
            foreign.append("--" + name.replace("_", "-"))
            continue
        for spec in targets:
            config[spec.name] = _convert(spec, value)
    if foreign:
        raise UsageError(f"option(s) {', '.join(sorted(foreign))} do not apply to kind {kind!r}")
    return config


def _convert(spec: FieldSpec, value: Any) -> Any:
    try:
        if spec.py_type is bool and isinstance(value, str):
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            out: Any = low in ("true", "1", "yes")
        else:
            out = spec.py_type(value)
    except (TypeError, ValueError):
        raise UsageError(f"{spec.flag} expects {_SCALARS[spec.py_type]}") from None
    if spec.choices and out not in spec.choices:
        raise UsageError(f"{spec.flag} must be one of {', '.join(spec.choices)}")
    return out


def json_schema(kind: str, specs: list[FieldSpec]) -> dict[str, Any]:
    """A JSON Schema for one kind's endpoint config (the API validates request bodies with it)."""
    props: dict[str, Any] = {}
    for s in specs:
        prop: dict[str, Any] = {"type": _SCALARS[s.py_type], "description": s.help}
        if s.choices:
            prop["enum"] = list(s.choices)
        if s.default is not None:
            prop["default"] = s.default
        props[s.name] = prop
    return {"title": f"{kind} endpoint", "type": "object", "properties": props,
            "required": [s.name for s in specs if s.required], "additionalProperties": False}
