"""Clinical classification of FHIR resources, driven by the code tables in ``schemas/tables``.

The checklist never looks at codes itself: it asks for classes such as ``pathology-report``,
``radiology-report``, ``lab-result`` or ``procedure:biopsy``. Keeping the codes in one YAML table
(LOINC, SNOMED CT, HL7 v2-0074, DocumentReference type/category, DICOM modality, ICD-10) means a
new code is a data change reviewed by a clinician, not a code change.

Classification is pure and deterministic: the same resource always gets the same classes. It
reads codings first, then meta.profile, then keyword rules over the code texts and displays
(for local codes such as ``acmeonline.com|4503 "Biopsy ..."``), and finally removes classes that a
more specific one contradicts (``suppress``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from aggregator.tables import compile_pattern, load_mapping

TABLE = "tables/classification.yaml"


@dataclass(frozen=True)
class _Keyword:
    pattern: re.Pattern[str]
    exclude: re.Pattern[str] | None
    classes: frozenset[str]


@dataclass(frozen=True)
class _Group:
    resource_types: frozenset[str]
    fields: tuple[str, ...]
    #: (system alias, code) -> classes; prefixes ("C50*") are kept apart
    codes: dict[tuple[str, str], frozenset[str]]
    prefixes: tuple[tuple[str, str, frozenset[str]], ...]
    keywords: tuple[_Keyword, ...]


@dataclass(frozen=True)
class Tables:
    systems: dict[str, str]
    """code system URI -> alias used in the tables"""
    types: dict[str, frozenset[str]]
    groups: tuple[_Group, ...]
    profiles: dict[str, frozenset[str]]
    elements: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)
    suppress: dict[str, frozenset[str]] = field(default_factory=dict)


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    return compile_pattern(pattern, f"bad keyword pattern in {TABLE} ({where})")


def parse_tables(data: Mapping[str, Any]) -> Tables:
    """Build lookup structures from the YAML document (exposed for tests of custom tables)."""
    systems: dict[str, str] = {}
    for alias, uris in (data.get("systems") or {}).items():
        for uri in uris:
            systems[str(uri)] = str(alias)
    types = {str(t): frozenset(map(str, cs)) for t, cs in (data.get("types") or {}).items()}
    groups = []
    for gname, g in (data.get("groups") or {}).items():
        codes: dict[tuple[str, str], frozenset[str]] = {}
        prefixes: list[tuple[str, str, frozenset[str]]] = []
        for alias, table in (g.get("codes") or {}).items():
            for code, classes in (table or {}).items():
                code_s = str(code)
                cls = frozenset(map(str, classes))
                if code_s.endswith("*"):
                    prefixes.append((str(alias), code_s[:-1].upper(), cls))
                else:
                    codes[(str(alias), code_s.upper())] = codes.get((str(alias), code_s.upper()), frozenset()) | cls
        keywords = tuple(
            _Keyword(
                _compile(k["pattern"], gname),
                _compile(k["exclude"], gname) if k.get("exclude") else None,
                frozenset(map(str, k["classes"])),
            )
            for k in g.get("keywords") or []
        )
        groups.append(
            _Group(frozenset(g.get("resource_types") or []), tuple(g.get("fields") or []), codes,
                   tuple(prefixes), keywords)
        )
    profiles = {str(p): frozenset(map(str, cs)) for p, cs in (data.get("profiles") or {}).items()}
    suppress = {str(k): frozenset(map(str, v or [])) for k, v in (data.get("suppress") or {}).items()}
    elements = {
        str(t): {str(e): frozenset(map(str, cs)) for e, cs in (els or {}).items()}
        for t, els in (data.get("elements") or {}).items()
    }
    return Tables(systems, types, tuple(groups), profiles, elements, suppress)


@lru_cache(maxsize=1)
def load_tables() -> Tables:
    """The shipped tables (read once per process)."""
    return parse_tables(load_mapping(TABLE, "classification tables"))


# --- walking the resource ------------------------------------------------------------------


def values_at(node: Any, path: Sequence[str]) -> Iterator[Any]:
    """Every value at a dotted path, flattening lists on the way (FHIRPath-like, no filters)."""
    if not path:
        if isinstance(node, list):
            yield from node
        elif node is not None:
            yield node
        return
    if isinstance(node, list):
        for n in node:
            yield from values_at(n, path)
        return
    if isinstance(node, Mapping):
        head = path[0]
        if head in node:
            yield from values_at(node[head], path[1:])
        else:
            # choice types: "value" matches valueCodeableConcept etc. is not needed; exact names only
            return


def _codings(value: Any) -> Iterator[Mapping[str, Any]]:
    """Codings of a CodeableConcept, or the value itself when it is a Coding (Encounter.class)."""
    if not isinstance(value, Mapping):
        return
    if "coding" in value or "text" in value:
        for c in value.get("coding") or []:
            if isinstance(c, Mapping):
                yield c
    elif "code" in value or "system" in value:
        yield value


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
        return
    if not isinstance(value, Mapping):
        return
    if isinstance(value.get("text"), str):
        yield value["text"]
    for c in _codings(value):
        if isinstance(c.get("display"), str):
            yield c["display"]


def _profile_names(resource: Mapping[str, Any]) -> Iterable[str]:
    meta = resource.get("meta")
    if not isinstance(meta, Mapping):
        return []
    out = []
    for p in meta.get("profile") or []:
        if isinstance(p, str):
            out.append(p.split("|", 1)[0].rstrip("/").rsplit("/", 1)[-1])
    return out


def _suppress(classes: set[str], rules: Mapping[str, frozenset[str]]) -> set[str]:
    removed: set[str] = set()
    for winner, losers in rules.items():
        if winner in classes:
            removed |= set(losers)
    if not removed:
        return classes
    # removing "note" also removes "note:progress" etc.
    return {c for c in classes if c not in removed and c.split(":", 1)[0] not in removed}


def classify_with(tables: Tables, resource: Mapping[str, Any]) -> frozenset[str]:
    """Classes of ``resource`` under ``tables``."""
    rtype = str(resource.get("resourceType") or "")
    classes: set[str] = set(tables.types.get(rtype, ()))
    for group in tables.groups:
        if rtype not in group.resource_types:
            continue
        texts: list[str] = []
        for fpath in group.fields:
            for value in values_at(resource, fpath.split(".")):
                for coding in _codings(value):
                    alias = tables.systems.get(str(coding.get("system") or ""))
                    code = coding.get("code")
                    if alias is None or code is None:
                        continue
                    code_u = str(code).strip().upper()
                    classes |= group.codes.get((alias, code_u), frozenset())
                    for p_alias, prefix, cls in group.prefixes:
                        if p_alias == alias and code_u.startswith(prefix):
                            classes |= cls
                texts.extend(_texts(value))
        if texts and group.keywords:
            blob = " | ".join(texts)
            for kw in group.keywords:
                if kw.pattern.search(blob) and not (kw.exclude and kw.exclude.search(blob)):
                    classes |= kw.classes
    for element, cls in tables.elements.get(rtype, {}).items():
        if resource.get(element):
            classes |= cls
    for name in _profile_names(resource):
        classes |= tables.profiles.get(name, frozenset())
    return frozenset(_suppress(classes, tables.suppress))


def classify(resource: Mapping[str, Any]) -> frozenset[str]:
    """Clinical classes of one FHIR resource (R4 or R4B shaped), e.g. ``{"pathology-report"}``.

    Unknown resource types get an empty set; a DiagnosticReport or DocumentReference whose codes
    are all unknown keeps only its base class (``report`` / ``document``).
    """
    return classify_with(load_tables(), resource)
