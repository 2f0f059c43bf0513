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
from functools import lru_cache
from importlib.resources import files
from typing import Any

import orjson
import yaml

from aggregator.errors import ConfigError
from aggregator.model import SourceInfo
from aggregator.normalize.dicom import merge_study
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
    #: ``(item, attachment index, attachment)`` -> hex SHA-256 of its bytes when known
    attachment_digest: Callable[[Item, int, dict[str, Any]], str | None]
    #: the targets of an item's references (cached on the item; see references.resolve_loaded)
    references: Callable[[Item], tuple[Any, ...]]
    #: bundle id -> group id, for ids whose group is not their own, updated as groups form
    group_of: dict[str, str] = field(default_factory=dict)
    #: bundle ids whose group changed at the last regrouping: a cached content digest whose
    #: references point at none of them is still valid
    changed: set[str] = field(default_factory=set)


def server_of(item: Item, sources: dict[int, SourceInfo]) -> str:
    src = sources.get(item.source_id)
    if src is not None and src.base_url:
        return src.base_url.rstrip("/")
    if item.base_url:
        return item.base_url.rstrip("/")
    base = _base_of(item.full_url)
    if base:
        return base
    if _UUID.match(item.rid):
        return "uuid"  # globally unique ids (Synthea, many servers): the same across downloads
    return f"source:{item.source_id}"


def _m_server_id(item: Item, ctx: Context) -> Iterable[str]:
    if item.rid and not item.derived:
        yield f"{item.rtype}|{server_of(item, ctx.sources)}|{item.rid}"


def _m_identifier(item: Item, ctx: Context) -> Iterable[str]:
    return item.facts.ident_keys


def _m_observation(item: Item, ctx: Context) -> Iterable[bytes]:
    if item.facts.obs_key is not None:
        yield item.facts.obs_key


def _m_attachment(item: Item, ctx: Context) -> Iterable[str]:
    body = item.body()
    if item.rtype == "Binary":
        data = body.get("data")
        if isinstance(data, str):
            try:
                yield "bytes|" + hashlib.sha256(base64.b64decode(data, validate=False)).hexdigest()
            except (binascii.Error, ValueError):
                return
        return
    digests = []
    atts = [c.get("attachment") for c in body.get("content") or [] if isinstance(c, dict)]
    for i, att in enumerate(a for a in atts if isinstance(a, dict)):
        d = ctx.attachment_digest(item, i, att)
        if d is None:
            return
        digests.append(d)
    if digests:
        yield f"{item.rtype}|" + ",".join(sorted(digests))


def _m_study(item: Item, ctx: Context) -> Iterable[str]:
    if item.facts.study_uid:
        yield f"ImagingStudy|{item.facts.study_uid}"


def content_key(item: Item, ctx: Context) -> bytes:
    """Digest of ``item``'s content without id, meta and text, with every resolved reference
    replaced by its target's group id (so copies from different sources compare equal).

    Made of the body digest the validation worker computed with reference values blanked
    (``facts.cbase``) and the sorted reference values: no body is read here. Sorted rather than
    positional, so two exports that order the same elements differently still match; the
    price is that two references swapped between elements of one resource also match. The
    digest is cached and recomputed only when the group of one of its targets changed.
    """
    refs = ctx.references(item)
    if item.chash is not None and not (
            ctx.changed and any(isinstance(t, Item) and t.new_id in ctx.changed for t in refs)):
        return item.chash
    group_of = ctx.group_of
    values = sorted(_reference_value(t, group_of) for t in refs)
    h = hashlib.blake2b(item.facts.cbase, digest_size=16)
    h.update(orjson.dumps(values))
    item.chash = h.digest()
    return item.chash


def _reference_value(target: Any, group_of: dict[str, str]) -> str:
    """What a reference contributes to a content digest: its target's group, else what it is."""
    if isinstance(target, Item):
        return group_of.get(target.new_id, target.new_id) if target.new_id else f"item:{target.source_id}:{target.key}"
    if isinstance(target, str):
        return target  # unresolved: the reference as written
    return "#" if target is not None else ""


def _m_content(item: Item, ctx: Context) -> Iterable[bytes]:
    yield item.rtype.encode() + b"|" + content_key(item, ctx)


MATCHERS: dict[str, Callable[[Item, Context], Iterable[str | bytes]]] = {
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
    ctx.group_of, ctx.changed = {}, set()
    for it in pool:
        it.chash = None

    def apply(rule: Rule) -> int:
        # the first holder of a key is remembered as an int; only shared keys get a list
        first: dict[str | bytes, int] = {}
        shared: dict[str | bytes, list[int]] = {}
        for i, it in enumerate(pool):
            if rule.types is not None and it.rtype not in rule.types:
                continue
            for key in MATCHERS[rule.match](it, ctx):
                j = first.setdefault(key, i)
                if j != i:
                    shared.setdefault(key, [j]).append(i)
        del first
        joined = 0
        for members in shared.values():
            if rule.unique_within_source:
                per_source: dict[int, set[str]] = {}
                for i in members:
                    per_source.setdefault(pool[i].source_id, set()).add(pool[i].rid)
                statuses = {(pool[i].facts.status, pool[i].facts.doc_status) for i in members}
                if any(len(r) > 1 for r in per_source.values()) and len(statuses) == 1:
                    continue  # shared by peers (a claim group), not versions of one resource
            for i in members[1:]:
                if uf.union(members[0], i):
                    joined += 1
        return joined

    def regroup() -> None:
        old = ctx.group_of
        new: dict[str, str] = {}
        for i, it in enumerate(pool):
            root = pool[uf.find(i)].new_id
            if root != it.new_id:
                new[it.new_id] = root
        ctx.changed = {k for k in old.keys() | new.keys() if old.get(k, k) != new.get(k, k)}
        ctx.group_of = new

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
        table.status_rank.get(it.facts.status, 0),
        table.status_rank.get(it.facts.doc_status, 0),
        it.facts.updated,
        it.facts.version,
        len(it.facts.carries),
        not it.derived,
    ), reverse=True)
    winner, losers = ranked[0], ranked[1:]
    merge = any(r.merge == "union-series" and (r.types is None or winner.rtype in r.types) for r in table.rules)
    win_key = content_key(winner, ctx)
    win_server = next(iter(_m_server_id(winner, ctx)), None)
    win_rank = table.status_rank.get(winner.facts.status, 0)
    merged: dict[str, Any] | None = None
    for lo in losers:
        if winner.rtype == "ImagingStudy" and lo.rtype == "ImagingStudy" and merge:
            merged = merged if merged is not None else winner.body()
            merge_study(merged, lo.body())
        same = content_key(lo, ctx) == win_key
        lo_carries = lo.facts.carries
        same_version_line = win_server is not None and next(iter(_m_server_id(lo, ctx)), None) == win_server
        if lo.rtype in table.reports and not same and lo_carries & {"text", "results"} and (
                not same_version_line or not lo_carries <= winner.facts.carries):
            out.superseded.append((lo, winner))
            continue
        lower = table.status_rank.get(lo.facts.status, 0) < win_rank
        reason = "duplicate of" if same or not (same_version_line or lower) else "superseded by"
        out.dropped.append((lo, winner, f"{reason} {winner.rtype}/{winner.new_id}"))
    if merged is not None:
        winner.store(merged)
        winner.refs = None  # new references may have arrived: resolve again when rewriting


def link_superseded(old: Item, new: Item, recorded: str) -> dict[str, Any] | None:
    """Link a kept older report to its successor; returns a Provenance to add, if one is needed.

    DocumentReference has the standard way: the new one ``replaces`` the old one, whose status
    becomes ``superseded``. Other reports (DiagnosticReport has no such element or status in R4)
    get a Provenance on the successor with the old version as its ``revision`` entity. The
    DocumentReference changes are recorded in the items' ``patch`` and applied when the bundle
    is written, in the same order as every other change.
    """
    if old.rtype == "DocumentReference" and new.rtype == "DocumentReference":
        old.patch = {**(old.patch or {}), "status": "superseded"}
        patch = new.patch = dict(new.patch or {})
        replaces = patch.setdefault("replaces", [])
        if old.new_id not in replaces:
            replaces.append(old.new_id)
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


def apply_patch(item: Item, body: dict[str, Any]) -> None:
    """Apply the changes :func:`link_superseded` recorded to a loaded body."""
    patch = item.patch or {}
    if "status" in patch:
        body["status"] = patch["status"]
    for old_id in patch.get("replaces") or ():
        rel = body.setdefault("relatesTo", [])
        target = {"reference": f"urn:uuid:{old_id}"}
        if not any(isinstance(r, dict) and r.get("target") == target for r in rel):
            rel.append({"code": "replaces", "target": target})
