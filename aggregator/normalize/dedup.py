"""De-duplication within and across sources, driven by ``schemas/tables/dedup.yaml``.

The table says *which* match keys apply to *which* resource types and in what order; this
module only knows how to compute each key (``MATCHERS``). Resources sharing a key are grouped
(transitively, with a union-find). A key only proposes: each group is then split into *parts*
of the same fact (:meth:`_Judge.relation`), because twins that share code, time and value may
be two results (another encounter, specimen, performer, status...). Two ids of one server are
one fact only when identical but for id/meta/text; copies from different servers only when the
table's ``clinical_elements`` are equal. When a group falls apart, the references to its parts
differ again, so groups are re-judged until none splits. Each part keeps one winner:

* winner order: status rank from the table (amended/corrected > final > preliminary), then
  the newest ``meta.lastUpdated`` / ``versionId``, then the copy that carries text or results,
  then a FHIR copy over a DICOM-derived one, then the first source;
* a loser is dropped and quarantined as ``merged into Type/<id>`` (``(older version)`` added for
  an older version of the same server resource); its raw JSON stays in the raw store, its id
  maps to the winner's (references follow), and the winner's merge Provenance names it;
* a loser that is a *report* with different content that carries text or results is **never
  dropped**: it stays in the bundle as a superseded version and is linked to its successor
  (see :func:`link_superseded`), as is a report sharing a business identifier with the winner;
* ImagingStudy copies of one StudyInstanceUID are merged (series and instances unioned).

References inside resources differ between sources (each source has its own ids), so the
content hash replaces every resolved reference by its group's id, and is recomputed until no new
group forms (a Condition copy matches once its two Encounter copies have matched).

How, for a record of any size: match keys are columns of the scratch database (computed when a
resource is loaded, or by one scan for the attachment and content keys), the items that share a
key come out of one window query per rule, the union-find is an array over item ranks, and only
the members of one group at a time are loaded as :class:`~.scratch.Item` views to be settled.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from itertools import chain
from typing import Any

import orjson
import yaml

from aggregator.errors import ConfigError
from aggregator.model import SourceInfo
from aggregator.normalize.dicom import merge_study
from aggregator.normalize.facts import reference_nodes
from aggregator.normalize.references import CONTAINED, Resolver, _base_of
from aggregator.normalize.scratch import ITEM_COLS_I, KEPT, Item, Scratch, Spool

TABLE = "tables/dedup.yaml"
#: how the ledger names a dropped copy: ``merged into Type/<survivor id>``
MERGED_INTO = "merged into"
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
    #: elements whose difference makes two resources two facts (``name[x]``: any choice type)
    clinical: tuple[str, ...] = ()


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
                     frozenset(raw.get("reports") or ()),
                     tuple(str(e) for e in raw.get("clinical_elements") or ()))
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the de-duplication table: {type(exc).__name__}", item=TABLE)


# --- match keys ------------------------------------------------------------------------------


def server_key(rtype: str, rid: str, derived: bool, sid: int, base_url: str, full_url: str,
               sources: dict[int, SourceInfo]) -> str | None:
    """The key of the server-id rule: ``Type|server|id``, or None (no id, or DICOM-derived).

    Computed when a resource is loaded (it needs nothing decided later) and kept in its row.
    """
    if not rid or derived:
        return None
    src = sources.get(sid)
    if src is not None and src.base_url:
        server = src.base_url.rstrip("/")
    elif base_url:
        server = base_url.rstrip("/")
    else:
        server = _base_of(full_url)
        if not server:
            # globally unique ids (Synthea, many servers) are the same across downloads
            server = "uuid" if _UUID.match(rid) else f"source:{sid}"
    return f"{rtype}|{server}|{rid}"


@dataclass
class Context:
    scratch: Scratch
    spool: Spool
    #: ``(item, attachment index, attachment)`` -> hex SHA-256 of its bytes when known
    attachment_digest: Callable[[Item, int, dict[str, Any]], str | None]
    #: re-resolves the references of a body that de-duplication changed (a merged study)
    resolver: Resolver


def _attachment_key(item: Item, ctx: Context) -> str | None:
    body = item.body()
    if item.rtype == "Binary":
        data = body.get("data")
        if isinstance(data, str):
            try:
                return "bytes|" + hashlib.sha256(base64.b64decode(data, validate=False)).hexdigest()
            except (binascii.Error, ValueError):
                return None
        return None
    digests = []
    atts = [c.get("attachment") for c in body.get("content") or [] if isinstance(c, dict)]
    for i, att in enumerate(a for a in atts if isinstance(a, dict)):
        d = ctx.attachment_digest(item, i, att)
        if d is None:
            return None
        digests.append(d)
    return f"{item.rtype}|" + ",".join(sorted(digests)) if digests else None


#: per match key: the SQL expressions of the key (two columns; NULL in both = no key) and the rows
#: it reads, with ``i`` the item (``{pool}`` is the pool condition on ``i``)
MATCHERS: dict[str, tuple[str, str, str]] = {
    "server-id": ("i.skey", "NULL", "item i WHERE {pool} AND i.skey IS NOT NULL"),
    "business-identifier": ("k.k", "NULL", "ikey k JOIN item i ON i.lid = k.lid WHERE {pool}"),
    "observation-value": ("i.obs_key", "NULL", "item i WHERE {pool} AND i.obs_key IS NOT NULL"),
    "attachment-hash": ("m.k", "NULL", "mk m JOIN item i ON i.lid = m.lid WHERE {pool}"),
    "study-instance-uid": ("i.study_uid", "NULL", "item i WHERE {pool} AND i.study_uid != ''"),
    "content-hash": ("i.rtype", "i.chash", "item i WHERE {pool} AND i.chash IS NOT NULL"),
}


# --- content digests -------------------------------------------------------------------------


#: what each reference of item ``i`` contributes to its content digest, as a JSON array (in no
#: particular order: the values are sorted in Python): its target's group, else its target's
#: bundle id, else (a target outside the record) the target's ledger key; "#" for a contained
#: resource; the reference as written when it resolves to nothing
_VALUES = (
    "(SELECT json_group_array(CASE WHEN r.target IS NULL THEN (CASE WHEN r.mode = 1 THEN '#' "
    "ELSE r.text END) WHEN t.new_id != '' THEN coalesce(nullif(t.gid, ''), t.new_id) "
    "ELSE 'item:' || t.sid || ':' || t.key END) "
    "FROM ref r LEFT JOIN item t ON t.lid = r.target WHERE r.lid = i.lid AND r.pos >= 0)"
)
assert CONTAINED == 1  # the literal mode above


def refresh_digests(ctx: Context, where: str, params: Sequence[Any] = ()) -> None:
    """Recompute ``chash`` of the items matching ``where`` (on ``i``).

    The digest is the body digest the validation worker computed with reference values blanked
    (``cbase``) plus the *sorted* values of the references, each replaced by its target's group id
    (so copies from different sources compare equal): no body is read here. Sorted rather than
    positional, so two exports that order the same elements differently still match; the price is
    that two references swapped between elements of one resource also match.
    """
    db = ctx.scratch.db
    db.execute("DELETE FROM ch")
    rows = db.execute(f"SELECT i.lid, i.cbase, {_VALUES} FROM item i WHERE {where}", params)  # noqa: S608
    db.executemany("INSERT INTO ch(chash, lid) VALUES (?, ?)",
                   ((_digest(cbase, orjson.loads(values)), lid) for lid, cbase, values in rows))
    db.execute("UPDATE item SET chash = ch.chash FROM ch WHERE ch.lid = item.lid")


def _digest(cbase: bytes, values: list[str]) -> bytes:
    values.sort()
    h = hashlib.blake2b(cbase, digest_size=16)
    h.update(orjson.dumps(values))
    return h.digest()


# --- grouping ------------------------------------------------------------------------------


class _UnionFind:
    """Union-find over item ``ord`` s, in a compact array (4 bytes per item)."""

    def __init__(self, n: int) -> None:
        self.parent = array("i", range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
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
    #: (older version kept in the bundle, its successor), as lids. The dropped ones are rows of
    #: the ``drop`` table: (loser, winner, reason); references to a loser go to its winner.
    superseded: list[tuple[int, int]] = field(default_factory=list)


def deduplicate(ctx: Context, table: Table | None = None) -> Outcome:
    """Group the kept items by the table's rules; pick winners; merge. Writes ``gid``/``chash``
    of the pool and the ``drop`` table."""
    table = table or load_table()
    db = ctx.scratch.db
    never = sorted(table.never_merge)
    pool = f"i.state = {KEPT} AND i.rtype NOT IN ({','.join('?' * len(never))})"
    n = ctx.scratch.next_ord()
    uf = _UnionFind(n)
    members = bytearray(n)
    for (o,) in db.execute(f"SELECT i.ord FROM item i WHERE {pool}", never):  # noqa: S608
        members[o] = 1
    last = array("i", range(n))
    db.execute(f"UPDATE item SET gid = NULL, chash = NULL, cshared = 0 WHERE lid IN (SELECT i.lid FROM item i "  # noqa: S608
               f"WHERE {pool})", never)
    # only items whose content without references equals another's can share a content digest:
    # the others need one only if another rule puts them in a group (see _settle_groups)
    db.execute("UPDATE item SET cshared = 1 WHERE lid IN (SELECT lid FROM (SELECT i.lid, count(*) OVER "  # noqa: S608
               f"(PARTITION BY i.rtype, i.cbase) AS c FROM item i WHERE {pool}) WHERE c > 1)", never)
    cpool = f"{pool} AND i.cshared = 1"
    refresh_digests(ctx, cpool, never)

    def apply(rule: Rule) -> int:
        if rule.match == "attachment-hash":
            _fill_attachment_keys(ctx, rule, pool, never)
        k, k2, source = MATCHERS[rule.match]
        types = sorted(rule.types) if rule.types is not None else []
        cond = f" AND i.rtype IN ({','.join('?' * len(types))})" if types else ""
        inner = (f"SELECT {k} AS k, {k2} AS k2, i.ord AS o, i.sid AS sid, i.rid AS rid, i.status AS st, "  # noqa: S608
                 f"i.doc_status AS ds FROM {source.format(pool=pool)}{cond}")
        rows = db.execute(
            "SELECT k, k2, o, sid, rid, st, ds FROM (SELECT *, count(*) OVER (PARTITION BY k, k2) AS c FROM "  # noqa: S608
            f"({inner})) WHERE c > 1 ORDER BY k, k2, o", (*never, *types))
        joined = 0
        group: list[tuple[Any, ...]] = []
        for row in chain(rows, [None]):
            if group and (row is None or row[:2] != group[0][:2]):
                joined += _join(group, rule, uf)
                group = []
            if row is not None:
                group.append(row)
        return joined

    def regroup() -> None:
        """Point every pool item at its group's id; re-digest the items whose targets moved."""
        moved = array("i")
        for o in range(n):
            if members[o]:
                r = uf.find(o)
                if r != last[o]:
                    last[o] = r
                    moved.append(o)
        db.execute("DELETE FROM chg")
        db.executemany("INSERT INTO chg(ord) VALUES (?)", ((o,) for o in moved))
        db.executemany("UPDATE item SET gid = (SELECT r.new_id FROM item r WHERE r.ord = ?) WHERE ord = ?",
                       ((last[o], o) for o in moved))
        if moved:
            refresh_digests(ctx, f"{cpool} AND i.lid IN (SELECT r.lid FROM chg c JOIN item t ON t.ord = c.ord "  # noqa: S608
                                 "JOIN ref r ON r.target = t.lid AND r.pos >= 0)", never)

    joined = sum(apply(rule) for rule in table.rules)
    content_rules = [r for r in table.rules if r.match == "content-hash"]
    for _ in range(3):  # references now point at groups: matches may appear
        if not joined or not content_rules:
            break
        regroup()
        joined = sum(apply(r) for r in content_rules)
    regroup()  # winners are judged with references mapped to groups
    while _partition(ctx, table, uf, members):
        # a group fell apart into distinct resources: references to its parts now differ, so
        # the resources that point at them are judged again with the finer groups
        uf = _refined(ctx, n)
        regroup()
    return _settle_groups(ctx, table)


def _join(group: list[tuple[Any, ...]], rule: Rule, uf: _UnionFind) -> int:
    """Union the items sharing one key (rows ``(k, k2, ord, sid, rid, status, doc_status)``)."""
    if rule.unique_within_source:
        per_source: dict[int, set[str]] = {}
        for row in group:
            per_source.setdefault(row[3], set()).add(row[4])
        statuses = {(row[5], row[6]) for row in group}
        if any(len(r) > 1 for r in per_source.values()) and len(statuses) == 1:
            return 0  # shared by peers (a claim group), not versions of one resource
    first = group[0][2]
    return sum(1 for row in group[1:] if uf.union(first, row[2]))


def _fill_attachment_keys(ctx: Context, rule: Rule, pool: str, never: list[str]) -> None:
    db = ctx.scratch.db
    db.execute("DELETE FROM mk")
    types = sorted(rule.types) if rule.types is not None else []
    cond = f" AND i.rtype IN ({','.join('?' * len(types))})" if types else ""
    rows = db.execute(f"SELECT {ITEM_COLS_I} FROM item i WHERE {pool}{cond} ORDER BY i.ord", (*never, *types))  # noqa: S608

    def keys() -> Iterator[tuple[str, int]]:
        for row in rows:
            it = Item(row, ctx.scratch, ctx.spool)
            key = _attachment_key(it, ctx)
            if key is not None:
                yield key, it.lid

    db.executemany("INSERT INTO mk(k, lid) VALUES (?, ?)", keys())


# --- one group -> its parts -----------------------------------------------------------------

#: how a member relates to the winner of its part: the same fact (may be dropped), or another
#: version of the same report (kept in the bundle and linked to it)
SAME, VERSION = 1, 2

#: a reference's value in a clinical signature: its target's group, as in :data:`_VALUES`
_POSITIONS = (
    "SELECT r.pos, CASE WHEN r.target IS NULL THEN (CASE WHEN r.mode = 1 THEN '#' ELSE r.text END) "
    "WHEN t.new_id != '' THEN coalesce(nullif(t.gid, ''), t.new_id) ELSE 'item:' || t.sid || ':' || t.key END "
    "FROM ref r LEFT JOIN item t ON t.lid = r.target WHERE r.lid = ? AND r.pos >= 0"
)


def _ranked(members: list[Item], table: Table) -> list[Item]:
    """Members best first: status rank, newest, carrying most, FHIR over DICOM-derived, first source."""
    ranked = sorted(members, key=lambda it: (it.source_id, it.key))
    ranked.sort(key=lambda it: (
        table.status_rank.get(it.status, 0),
        table.status_rank.get(it.doc_status, 0),
        it.updated,
        it.version,
        len(it.carries),
        not it.derived,
    ), reverse=True)
    return ranked


def _server(it: Item) -> str:
    """Which server's id space an item's id belongs to (ids are only comparable within one)."""
    if it.skey:
        server = it.skey.split("|", 2)[1]
        if server != "uuid":
            return server
    return f"source:{it.source_id}"


def clinical_signature(body: dict[str, Any], values: Sequence[str], elements: Sequence[str]) -> bytes:
    """Digest of the elements that give a resource its clinical meaning (the table's
    ``clinical_elements``), each reference replaced by ``values`` (its target's group, in
    :func:`~.facts.reference_nodes` order), so copies from two sources compare equal and twins
    that differ in encounter, specimen, performer, time, value or status do not."""
    nodes = reference_nodes(body, [])
    for node, value in zip(nodes, values, strict=False):
        node["reference"] = value
    picked: dict[str, Any] = {}
    for name in elements:
        if name.endswith("[x]"):
            stem = name[:-3]
            picked.update((k, v) for k, v in body.items() if k.startswith(stem) and k[len(stem):][:1].isupper())
        elif name in body:
            picked[name] = body[name]
    return hashlib.blake2b(orjson.dumps(picked, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


class _Judge:
    """Decides, for one group, which members are the same fact as which (see :meth:`relation`)."""

    def __init__(self, ctx: Context, table: Table) -> None:
        self.ctx, self.table = ctx, table
        self._sig: dict[int, bytes] = {}
        self._ikeys: dict[int, frozenset[str]] = {}

    def signature(self, it: Item) -> bytes:
        sig = self._sig.get(it.lid)
        if sig is None:
            rows = sorted(self.ctx.scratch.db.execute(_POSITIONS, (it.lid,)))
            sig = self._sig[it.lid] = clinical_signature(it.body(), [str(v) for _p, v in rows], self.table.clinical)
        return sig

    def ikeys(self, it: Item) -> frozenset[str]:
        keys = self._ikeys.get(it.lid)
        if keys is None:
            # asked of few items (reports that differ from their winner): the index is built on first need
            self.ctx.scratch.db.execute("CREATE INDEX IF NOT EXISTS ikey_lid ON ikey(lid)")
            keys = self._ikeys[it.lid] = frozenset(
                str(k) for (k,) in self.ctx.scratch.db.execute("SELECT k FROM ikey WHERE lid = ?", (it.lid,)))
        return keys

    def relation(self, win: Item, lo: Item) -> int:
        """:data:`SAME`, :data:`VERSION` or 0 (distinct: both stay, unlinked).

        The same fact: the same resource of one server (versions of it); copies whose content
        except id/meta/text is identical; one imaging study (its UID names it everywhere); or,
        from *different* servers, copies whose clinical signatures are equal. Two ids of one
        server are two resources unless identical: the server said so. A report that shares a
        business identifier with the winner but is not the same is another version of it.
        """
        if win.skey is not None and lo.skey == win.skey:
            return SAME
        if lo.chash is not None and lo.chash == win.chash:
            return SAME
        if win.rtype == "ImagingStudy" and win.study_uid and lo.study_uid == win.study_uid:
            return SAME
        if _server(win) != _server(lo) and self.signature(win) == self.signature(lo):
            return SAME
        if (lo.rtype in self.table.reports and lo.rtype == win.rtype and lo.carries & {"text", "results"}
                and self.ikeys(win) & self.ikeys(lo)):
            return VERSION
        return 0


def _partition(ctx: Context, table: Table, uf: _UnionFind, members: bytearray) -> bool:
    """Split every group of ``uf`` into parts of the same fact (table ``sub``: part leader, member,
    relation; parts of one item are left out). True when some group held more than one part."""
    db = ctx.scratch.db
    n = len(members)
    size = array("i", bytes(4 * n))
    for o in range(n):
        if members[o]:
            size[uf.find(o)] += 1
    db.execute("DELETE FROM grp")
    db.executemany("INSERT INTO grp(root, ord) VALUES (?, ?)",
                   ((r, o) for o in range(n) if members[o] and size[r := uf.find(o)] > 1))
    del size
    refresh_digests(ctx, "i.cshared = 0 AND i.lid IN (SELECT m.lid FROM grp g JOIN item m ON m.ord = g.ord)")
    db.execute("DELETE FROM sub")
    rows = db.execute(f"SELECT g.root, {ITEM_COLS_I} FROM grp g JOIN item i ON i.ord = g.ord ORDER BY g.root, g.ord")  # noqa: S608
    split = False
    found: list[tuple[int, int, int]] = []
    group: list[Item] = []
    root = None
    for row in chain(rows, [None]):
        if group and (row is None or row[0] != root):
            judge = _Judge(ctx, table)
            parts: list[list[tuple[Item, int]]] = []
            for it in _ranked(group, table):
                for part in parts:
                    rel = judge.relation(part[0][0], it)
                    if rel:
                        part.append((it, rel))
                        break
                else:
                    parts.append([(it, 0)])
            split = split or len(parts) > 1
            found.extend((p[0][0].ord, it.ord, rel) for p in parts if len(p) > 1 for it, rel in p)
            group = []
        if row is not None:
            root = row[0]
            group.append(Item(row[1:], ctx.scratch, ctx.spool))
    db.executemany("INSERT INTO sub(leader, ord, rel) VALUES (?, ?, ?)", found)
    return split


def _refined(ctx: Context, n: int) -> _UnionFind:
    """A union-find holding exactly the parts of the last :func:`_partition`."""
    uf = _UnionFind(n)
    for leader, o in ctx.scratch.db.execute("SELECT leader, ord FROM sub"):
        uf.union(leader, o)
    return uf


def _settle_groups(ctx: Context, table: Table) -> Outcome:
    """Settle every part of more than one item (table ``sub``), in the order of their winners."""
    db = ctx.scratch.db
    out = Outcome()
    merged: list[tuple[Item, dict[str, Any]]] = []
    rows = db.execute(f"SELECT s.leader, s.rel, {ITEM_COLS_I} FROM sub s JOIN item i ON i.ord = s.ord "  # noqa: S608
                      "ORDER BY s.leader, s.rel, i.ord")
    part: list[tuple[Item, int]] = []
    leader = None
    for row in chain(rows, [None]):
        if part and (row is None or row[0] != leader):
            done = _settle(part, table, out, ctx)
            if done is not None:
                merged.append(done)
            part = []
        if row is not None:
            leader = row[0]
            part.append((Item(row[2:], ctx.scratch, ctx.spool), row[1]))
    for winner, body in merged:  # after the scan: these change rows it was reading
        winner.store(body)
        ctx.resolver.add(winner, body)  # new references may have arrived with the merged series
    return out


def _settle(part: list[tuple[Item, int]], table: Table, out: Outcome,
            ctx: Context) -> tuple[Item, dict[str, Any]] | None:
    """Record each member of a part as dropped (merged into its winner) or kept as a superseded
    version. Returns the winner and its merged body when ImagingStudy copies were merged (stored
    by the caller)."""
    winner = next(it for it, rel in part if rel == 0)
    merge = any(r.merge == "union-series" and (r.types is None or winner.rtype in r.types) for r in table.rules)
    win_key = winner.chash
    win_server = winner.skey
    merged: dict[str, Any] | None = None
    drops = []
    for lo, rel in part:
        if lo is winner:
            continue
        if rel == VERSION:
            out.superseded.append((lo.lid, winner.lid))
            continue
        if winner.rtype == "ImagingStudy" and lo.rtype == "ImagingStudy" and merge:
            merged = merged if merged is not None else winner.body()
            merge_study(merged, lo.body())
        same = lo.chash == win_key
        lo_carries = lo.carries
        same_version_line = win_server is not None and lo.skey == win_server
        if lo.rtype in table.reports and not same and lo_carries & {"text", "results"} and (
                not same_version_line or not lo_carries <= winner.carries):
            out.superseded.append((lo.lid, winner.lid))
            continue
        older = " (older version)" if same_version_line and not same else ""
        drops.append((lo.lid, winner.lid, f"{MERGED_INTO} {winner.rtype}/{winner.new_id}{older}"))
    ctx.scratch.db.executemany("INSERT INTO drop_(lid, win, reason) VALUES (?, ?, ?)", drops)
    return (winner, merged) if merged is not None else None


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
