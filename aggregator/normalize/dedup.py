"""De-duplication within and across sources, driven by ``schemas/tables/dedup.yaml``.

The table says *which* match keys apply to *which* resource types and in what order; this
module only knows how to compute each key (``MATCHERS``). Resources sharing a key are grouped
(transitively, with a union-find), and each group keeps one winner:

* winner order: status rank from the table (amended/corrected > final > preliminary), then
  the newest ``meta.lastUpdated`` / ``versionId``, then the copy that carries text or results,
  then a FHIR copy over a DICOM-derived one, then the first source;
* a loser with the same content is dropped and quarantined as ``duplicate of Type/<id>``; an
  older version of the same server resource, or a lower-status copy, as ``superseded by Type/<id>``
  (its raw JSON stays in the raw store, so it remains traceable);
* a loser that is a *report* with different content that carries text or results is **never
  dropped**: it stays in the bundle as a superseded version and is linked to its successor
  (see :func:`link_superseded`);
* ImagingStudy copies of one StudyInstanceUID are merged (series and instances unioned).

References inside resources differ between sources (each source has its own ids), so the
content hash replaces every resolved reference by its group's id, and is recomputed until no new
group forms (a Condition copy matches once its two Encounter copies have matched).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib.resources import files
from typing import Any

import orjson
import yaml

from aggregator.errors import ConfigError
from aggregator.model import SourceInfo
from aggregator.normalize.dicom import merge_study, study_uid_of
from aggregator.normalize.parse import Item
from aggregator.normalize.references import _base_of

TABLE = "tables/dedup.yaml"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class Rule:
    id: str
    match: str
    types: frozenset[str] | None  # None: any type
    merge: str | None = None
    unique_within_source: bool = False


@dataclass(frozen=True)
class Table:
    rules: tuple[Rule, ...]
    never_merge: frozenset[str]
    status_rank: dict[str, int]
    reports: frozenset[str]


@lru_cache(maxsize=1)
def load_table() -> Table:
    """The rules from the package data (``schemas`` is shipped inside the wheel)."""
    try:
        raw = yaml.safe_load(files("schemas").joinpath(TABLE).read_text(encoding="utf-8"))
        rules = []
        for r in raw["rules"]:
            if r["match"] not in MATCHERS:
                raise ConfigError(f"unknown match key {r['match']!r} in rule {r['id']!r}", item=TABLE)
            types = None if r.get("types") in (None, "any") else frozenset(r["types"])
            rules.append(Rule(str(r["id"]), str(r["match"]), types, r.get("merge"),
                              bool(r.get("unique_within_source"))))
        return Table(tuple(rules), frozenset(raw.get("never_merge") or ()),
                     {str(k): int(v) for k, v in (raw.get("status_rank") or {}).items()},
                     frozenset(raw.get("reports") or ()))
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the de-duplication table: {type(exc).__name__}", item=TABLE)


# --- context for matchers ------------------------------------------------------------------


@dataclass
class Context:
    sources: dict[int, SourceInfo]
    #: resolves a reference of an item to the bundle id of its target, or None
    target_id: Callable[[Item, str], str | None]
    #: attachment -> hex SHA-256 of its bytes when known
    attachment_digest: Callable[[Item, dict[str, Any]], str | None]
    #: bundle id -> group id, updated as groups form
    group_of: dict[str, str] = field(default_factory=dict)
    #: optional: ``(reference object, target)`` pairs of an item, resolved once (a cache); when
    #: set, ``target_id`` is not used for hashing
    references: Callable[[Item], list[tuple[dict[str, Any], Any]]] | None = None


def _codes(cc: Any) -> tuple[str, ...]:
    if not isinstance(cc, dict):
        return ()
    return tuple(sorted(f"{c.get('system') or ''}|{c.get('code') or ''}" for c in cc.get("coding") or []
                        if isinstance(c, dict) and c.get("code"))) or ((str(cc.get("text")),) if cc.get("text")
                                                                        else ())


def server_of(item: Item, sources: dict[int, SourceInfo]) -> str:
    src = sources.get(item.source_id)
    if src is not None and src.base_url:
        return src.base_url.rstrip("/")
    if item.meta.get("base_url"):
        return str(item.meta["base_url"]).rstrip("/")
    base = _base_of(str(item.meta.get("fullUrl") or ""))
    if base:
        return base
    if _UUID.match(item.rid):
        return "uuid"  # globally unique ids (Synthea, many servers): the same across downloads
    return f"source:{item.source_id}"


def _m_server_id(item: Item, ctx: Context) -> Iterable[str]:
    if item.rid and not item.meta.get("derived"):
        yield f"{item.rtype}|{server_of(item, ctx.sources)}|{item.rid}"


def _m_identifier(item: Item, ctx: Context) -> Iterable[str]:
    code = "|".join(_codes(item.data.get("code")))
    idents = item.data.get("identifier")
    if isinstance(idents, dict):
        idents = [idents]
    for i in idents or []:
        if isinstance(i, dict) and i.get("system") and i.get("value"):
            if item.rtype == "ImagingStudy" and i.get("system") == "urn:dicom:uid":
                continue  # handled by study-instance-uid with merging
            yield f"{item.rtype}|{i['system']}|{i['value']}|{code}"


def _value(data: dict[str, Any]) -> str | None:
    for k, v in data.items():
        if not k.startswith("value"):
            continue
        if k == "valueQuantity" and isinstance(v, dict):
            return f"Q|{v.get('value')}|{v.get('code') or v.get('unit') or ''}"
        if k == "valueCodeableConcept":
            return "C|" + ",".join(_codes(v))
        return f"{k}|{orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()}"
    return None


def _m_observation(item: Item, ctx: Context) -> Iterable[str]:
    d = item.data
    code = _codes(d.get("code"))
    eff = d.get("effectiveDateTime") or d.get("effectiveInstant") or (
        (d.get("effectivePeriod") or {}).get("start") if isinstance(d.get("effectivePeriod"), dict) else None)
    value = _value(d)
    comps = [f"{','.join(_codes(c.get('code')))}={_value(c)}" for c in d.get("component") or [] if isinstance(c, dict)]
    if not code or not eff or (value is None and not comps):
        return
    yield f"Observation|{','.join(code)}|{eff}|{value}|{';'.join(sorted(comps))}"


def _m_attachment(item: Item, ctx: Context) -> Iterable[str]:
    if item.rtype == "Binary":
        data = item.data.get("data")
        if isinstance(data, str):
            try:
                yield "bytes|" + hashlib.sha256(base64.b64decode(data, validate=False)).hexdigest()
            except (binascii.Error, ValueError):
                return
        return
    digests = []
    for c in item.data.get("content") or []:
        att = c.get("attachment") if isinstance(c, dict) else None
        if isinstance(att, dict):
            d = ctx.attachment_digest(item, att)
            if d is None:
                return
            digests.append(d)
    if digests:
        yield f"{item.rtype}|" + ",".join(sorted(digests))


def _m_study(item: Item, ctx: Context) -> Iterable[str]:
    uid = study_uid_of(item.data)
    if uid:
        yield f"ImagingStudy|{uid}"


def _canon(node: Any, item: Item, ctx: Context) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                tid = ctx.target_id(item, v)
                out[k] = ctx.group_of.get(tid, tid) if tid else v
            elif isinstance(v, dict | list):
                out[k] = _canon(v, item, ctx)
            else:
                out[k] = v
        return out
    if isinstance(node, list):
        return [_canon(v, item, ctx) for v in node]
    return node


def content_key(item: Item, ctx: Context) -> str:
    """SHA-256 of the canonical JSON of ``item`` without id, meta and text, with every resolved
    reference replaced by its target's group id (so copies from different sources compare equal).

    With ``ctx.references`` the references are swapped in place for the time of one
    ``orjson.dumps`` and put back, instead of copying the whole resource in Python: same bytes,
    a fraction of the time (this runs several times per resource)."""
    body = {k: v for k, v in item.data.items() if k not in ("id", "meta", "text")}
    if ctx.references is None:
        return hashlib.sha256(orjson.dumps(_canon(body, item, ctx), option=orjson.OPT_SORT_KEYS)).hexdigest()
    swapped: list[tuple[dict[str, Any], Any]] = []
    group_of = ctx.group_of
    try:
        for node, target in ctx.references(item):
            tid = target.new_id if isinstance(target, Item) else None
            if tid:
                swapped.append((node, node["reference"]))
                node["reference"] = group_of.get(tid, tid)
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    finally:
        for node, original in swapped:
            node["reference"] = original


def _m_content(item: Item, ctx: Context) -> Iterable[str]:
    yield f"{item.rtype}|{content_key(item, ctx)}"


MATCHERS: dict[str, Callable[[Item, Context], Iterable[str]]] = {
    "server-id": _m_server_id,
    "business-identifier": _m_identifier,
    "observation-value": _m_observation,
    "attachment-hash": _m_attachment,
    "study-instance-uid": _m_study,
    "content-hash": _m_content,
}


# --- grouping ------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        return True


def carries(res: dict[str, Any]) -> frozenset[str]:
    """What a report holds beyond metadata: ``text`` (attachments, narrative sections), ``results``."""
    out = set()
    atts = list(res.get("presentedForm") or []) + [c.get("attachment") for c in res.get("content") or []
                                                    if isinstance(c, dict)]
    if any(isinstance(a, dict) and (a.get("data") or a.get("url")) for a in atts):
        out.add("text")
    if res.get("section"):
        out.add("text")
    if res.get("result"):
        out.add("results")
    if res.get("conclusion"):
        out.add("conclusion")
    return frozenset(out)


def _instant(value: Any) -> float:
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _version(value: Any) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


@dataclass
class Outcome:
    #: (loser, winner, reason) - not in the bundle; references to the loser go to the winner
    dropped: list[tuple[Item, Item, str]] = field(default_factory=list)
    #: (older version kept in the bundle, its successor)
    superseded: list[tuple[Item, Item]] = field(default_factory=list)


def deduplicate(items: list[Item], ctx: Context, table: Table | None = None) -> Outcome:
    """Group ``items`` (sorted, all with ``new_id``) by the table's rules; pick winners; merge."""
    table = table or load_table()
    pool = [it for it in items if it.rtype not in table.never_merge]
    uf = _UnionFind(len(pool))

    def apply(rule: Rule) -> int:
        keyed: dict[str, list[int]] = {}
        for i, it in enumerate(pool):
            if rule.types is not None and it.rtype not in rule.types:
                continue
            for key in MATCHERS[rule.match](it, ctx):
                keyed.setdefault(key, []).append(i)
        joined = 0
        for members in keyed.values():
            if len(members) < 2:
                continue
            if rule.unique_within_source:
                per_source: dict[int, set[str]] = {}
                for i in members:
                    per_source.setdefault(pool[i].source_id, set()).add(pool[i].rid)
                statuses = {(pool[i].data.get("status"), pool[i].data.get("docStatus")) for i in members}
                if any(len(r) > 1 for r in per_source.values()) and len(statuses) == 1:
                    continue  # shared by peers (a claim group), not versions of one resource
            for i in members[1:]:
                if uf.union(members[0], i):
                    joined += 1
        return joined

    def regroup() -> None:
        ctx.group_of = {it.new_id: pool[uf.find(i)].new_id for i, it in enumerate(pool)}

    joined = sum(apply(rule) for rule in table.rules)
    content_rules = [r for r in table.rules if r.match == "content-hash"]
    for _ in range(3):  # references now point at groups: matches may appear
        if not joined or not content_rules:
            break
        regroup()
        joined = sum(apply(r) for r in content_rules)
    regroup()  # winners are judged with references mapped to groups

    groups: dict[int, list[Item]] = {}
    for i, it in enumerate(pool):
        groups.setdefault(uf.find(i), []).append(it)
    out = Outcome()
    for members in groups.values():
        if len(members) > 1:
            _settle(members, ctx, table, out)
    return out


def _settle(members: list[Item], ctx: Context, table: Table, out: Outcome) -> None:
    ranked = sorted(members, key=lambda it: (it.source_id, it.key))
    ranked.sort(key=lambda it: (
        table.status_rank.get(str(it.data.get("status") or ""), 0),
        table.status_rank.get(str(it.data.get("docStatus") or ""), 0),
        _instant((it.data.get("meta") or {}).get("lastUpdated") if isinstance(it.data.get("meta"), dict) else None),
        _version((it.data.get("meta") or {}).get("versionId") if isinstance(it.data.get("meta"), dict) else None),
        len(carries(it.data)),
        not it.meta.get("derived"),
    ), reverse=True)
    winner, losers = ranked[0], ranked[1:]
    merge = any(r.merge == "union-series" and (r.types is None or winner.rtype in r.types) for r in table.rules)
    win_key = content_key(winner, ctx)
    win_server = next(iter(_m_server_id(winner, ctx)), None)
    win_rank = table.status_rank.get(str(winner.data.get("status") or ""), 0)
    for lo in losers:
        if winner.rtype == "ImagingStudy" and lo.rtype == "ImagingStudy" and merge:
            merge_study(winner.data, lo.data)
            winner.refs = None  # new references may have arrived: resolve again when rewriting
        same = content_key(lo, ctx) == win_key
        lo_carries = carries(lo.data)
        same_version_line = win_server is not None and next(iter(_m_server_id(lo, ctx)), None) == win_server
        if lo.rtype in table.reports and not same and lo_carries & {"text", "results"} and (
                not same_version_line or not lo_carries <= carries(winner.data)):
            out.superseded.append((lo, winner))
            continue
        lower = table.status_rank.get(str(lo.data.get("status") or ""), 0) < win_rank
        reason = "duplicate of" if same or not (same_version_line or lower) else "superseded by"
        out.dropped.append((lo, winner, f"{reason} {winner.rtype}/{winner.new_id}"))


def link_superseded(old: Item, new: Item, recorded: str) -> dict[str, Any] | None:
    """Link a kept older report to its successor; returns a Provenance to add, if one is needed.

    DocumentReference has the standard way: the new one ``replaces`` the old one, whose status
    becomes ``superseded``. Other reports (DiagnosticReport has no such element or status in R4)
    get a Provenance on the successor with the old version as its ``revision`` entity.
    """
    if old.rtype == "DocumentReference" and new.rtype == "DocumentReference":
        old.data["status"] = "superseded"
        rel = new.data.setdefault("relatesTo", [])
        target = {"reference": f"urn:uuid:{old.new_id}"}
        if not any(isinstance(r, dict) and r.get("target") == target for r in rel):
            rel.append({"code": "replaces", "target": target})
        return None
    from aggregator.normalize import ids

    return {
        "resourceType": "Provenance",
        "id": ids.new_id("revision", new.new_id, old.new_id),
        "target": [{"reference": f"urn:uuid:{new.new_id}"}],
        "recorded": recorded,
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                 "code": "UPDATE", "display": "revise"}]},
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                        "code": "assembler"}]},
                   "who": {"display": "second-opinion-aggregator normalization"}}],
        "entity": [{"role": "revision", "what": {"reference": f"urn:uuid:{old.new_id}"}}],
    }
