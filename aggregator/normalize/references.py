"""Resolve and rewrite references between resources of the same source.

Sources write references in many forms: ``Type/id`` (possibly ``/_history/n``), absolute URLs
of their own server, ``urn:uuid:`` fullUrls valid only inside one Bundle file, conditional
references (``Type?identifier=system|value``, as Synthea's transaction bundles use), and ``#id``
for contained resources. Resolution is always *within one source*: ``Patient/1`` from hospital A
and ``Patient/1`` from hospital B are different people until identity says otherwise. A reference
first resolves inside its own bundle/file, then across the files of the same download; of several
resources that match, the first in (source, ledger key) order wins.

How, for a record of any size: each reference string is parsed once in Python into a *plan*
(which lookup it needs and with which keys, :func:`plan`) and written to the scratch database;
then all references are resolved by a few ``UPDATE`` statements over indexed lookups
(:class:`Resolver`), so no lookup dict of the whole record is ever held in memory.

Unresolvable references keep their original ``reference`` string (and ``display``) untouched and
are listed in ``record.unresolved`` with their source: rewriting them to something invented would
hide that the target is missing, and dropping them would lose what the source said.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import unquote

import orjson

from aggregator.model import SourceInfo
from aggregator.normalize.facts import reference_nodes
from aggregator.normalize.scratch import Item, Scratch

_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")

# how a reference is looked up (ref.mode)
NONE, CONTAINED, FULL, FULL_TID, TID, IDENT, ABSOLUTE = range(7)


def type_id(reference: str) -> str | None:
    """``Type/id`` at the end of a relative or absolute reference, without ``_history``."""
    m = _TAIL.search(reference)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def _base_of(url: str) -> str:
    """The server base of an absolute ``.../Type/id`` URL (what a relative reference is relative to)."""
    m = _TAIL.search(url)
    return url[: m.start()].rstrip("/") if m and "://" in url else ""


Plan = tuple[int, str | None, str | None, str | None, str | None]


def plan(reference: str, own_base: str, bases: set[str] | None) -> Plan:
    """``(mode, url, type, id, base)``: how ``reference`` is looked up within its source.

    ``own_base`` is the server base of the referring resource's fullUrl; ``bases`` the known
    server bases of its source, or None while they are not all known yet (an absolute URL on a
    foreign base is then :data:`ABSOLUTE`, decided by :meth:`Resolver.settle_absolute`).
    """
    ref = reference.strip()
    if not ref:
        return NONE, None, None, None, None
    if ref.startswith("#"):
        return CONTAINED, None, None, None, None
    if ref.startswith(("urn:uuid:", "urn:oid:")):
        return FULL, ref, None, None, None
    if "?" in ref:
        rtype, _, query = ref.partition("?")
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "identifier" and value:
                return IDENT, None, rtype.rsplit("/", 1)[-1], unquote(value), None
        return NONE, None, None, None, None
    m = _TAIL.search(ref)
    if "://" in ref:
        base = _base_of(ref)
        if not base or m is None:
            return FULL, ref, None, None, None
        if base == own_base or (bases is not None and base in bases):
            return FULL_TID, ref, m.group(1), m.group(2), None
        if bases is None:
            return ABSOLUTE, ref, m.group(1), m.group(2), base
        return FULL, ref, None, None, None
    if m is None:
        return NONE, None, None, None, None
    return TID, None, m.group(1), m.group(2), None


def pending_rows(lid: int, refs: Sequence[str], patient_refs: Sequence[str], own_base: str,
                 bases: set[str] | None) -> Iterator[tuple[Any, ...]]:
    """``ref``/``pend`` rows of one item: its references at positions 0.. (:func:`reference_nodes` order)
    and its top-level subject/patient references at -1, -2, ... (identity reads those)."""
    for pos, text in enumerate(refs):
        yield (lid, pos, text, *plan(text, own_base, bases))
    for i, text in enumerate(patient_refs):
        yield (lid, -1 - i, text, *plan(text, own_base, bases))


_COLS = "lid, pos, text, mode, url, ty, rid, base"
#: the references of loaded resources go straight to ``ref`` (resolved there in one pass); those
#: of items made or changed later go through ``pend``
INSERT_REF = f"INSERT INTO ref({_COLS}) VALUES (?,?,?,?,?,?,?,?)"  # noqa: S608
INSERT_PENDING = f"INSERT INTO pend({_COLS}) VALUES (?,?,?,?,?,?,?,?)"  # noqa: S608

# Each lookup takes the first match in (source, key) order among the loaded resources of the
# referring resource's source (``o``): in its own bundle first, then anywhere in the source.
# ``{t}`` is the table resolved: ``ref`` once after loading, ``pend`` for later additions.
_RESOLVE = (
    ("UPDATE {t} SET target = coalesce("
     "(SELECT i.lid FROM item o JOIN item i ON i.sid = o.sid AND i.full_url = {t}.url AND i.bundle = o.bundle "
     "WHERE o.lid = {t}.lid AND i.lookup = 1 ORDER BY i.ord LIMIT 1), "
     "(SELECT i.lid FROM item o JOIN item i ON i.sid = o.sid AND i.full_url = {t}.url "
     "WHERE o.lid = {t}.lid AND i.lookup = 1 ORDER BY i.ord LIMIT 1)) "
     "WHERE {t}.mode IN (?, ?)", (FULL, FULL_TID)),
    ("UPDATE {t} SET target = coalesce("
     "(SELECT i.lid FROM item o JOIN item i ON i.sid = o.sid AND i.rtype = {t}.ty AND i.rid = {t}.rid "
     "AND i.bundle = o.bundle WHERE o.lid = {t}.lid AND i.lookup = 1 ORDER BY i.ord LIMIT 1), "
     "(SELECT i.lid FROM item o JOIN item i ON i.sid = o.sid AND i.rtype = {t}.ty AND i.rid = {t}.rid "
     "WHERE o.lid = {t}.lid AND i.lookup = 1 ORDER BY i.ord LIMIT 1)) "
     "WHERE {t}.mode IN (?, ?) AND {t}.target IS NULL", (FULL_TID, TID)),
    ("UPDATE {t} SET target = (SELECT d.lid FROM item o JOIN ident d ON d.sid = o.sid AND d.rtype = {t}.ty "
     "AND d.k = {t}.rid JOIN item i ON i.lid = d.lid WHERE o.lid = {t}.lid ORDER BY i.ord LIMIT 1) "
     "WHERE {t}.mode = ?", (IDENT,)),
)
_RESOLVE_IN = {t: tuple((sql.format(t=t), params) for sql, params in _RESOLVE) for t in ("ref", "pend")}


class Resolver:
    """Resolves the pending references of the scratch database against the loaded resources.

    Holds only the server bases of each source (a handful of strings): the lookup indexes are
    the scratch database's.
    """

    def __init__(self, scratch: Scratch, sources: dict[int, SourceInfo]) -> None:
        self.scratch = scratch
        self.sources = sources
        self.bases: dict[int, set[str]] = {}

    def note(self, sid: int, full_url: str, base_url: str) -> None:
        """Learn the server bases a loaded resource reveals (its fullUrl's, its file's, its
        source's)."""
        src = self.sources.get(sid)
        for b in (_base_of(full_url) if full_url else "", base_url.rstrip("/") if base_url else "",
                  src.base_url.rstrip("/") if src is not None and src.base_url else ""):
            if b:
                self.bases.setdefault(sid, set()).add(b)

    def settle_absolute(self) -> None:
        """Absolute references on a base that was not known when they were planned: now that
        every base of the source is known, look them up by ``Type/id`` too, or by URL only."""
        db = self.scratch.db
        rows = db.execute("SELECT r.lid, r.pos, r.base, i.sid FROM ref r JOIN item i ON i.lid = r.lid "
                          "WHERE r.mode = ?", (ABSOLUTE,)).fetchall()
        db.executemany("UPDATE ref SET mode = ? WHERE lid = ? AND pos = ?",
                       [(FULL_TID if base in self.bases.get(sid, set()) else FULL, lid, pos)
                        for lid, pos, base, sid in rows])

    def resolve_loaded(self) -> None:
        """Resolve the references of every loaded resource, once all are loaded and indexed."""
        db = self.scratch.db
        for sql, params in _RESOLVE_IN["ref"]:
            db.execute(sql, params)
        db.execute("CREATE INDEX ref_target ON ref(target)")

    def _resolve_pending(self) -> None:
        db = self.scratch.db
        for sql, params in _RESOLVE_IN["pend"]:
            db.execute(sql, params)
        db.execute(f"INSERT OR REPLACE INTO ref({_COLS}, target) SELECT {_COLS}, target FROM pend")  # noqa: S608
        db.execute("DELETE FROM pend")

    def add(self, item: Item, body: dict[str, Any], patient_refs: Sequence[str] = ()) -> None:
        """Plan and resolve the references of one item (made by normalization, or whose body
        changed), replacing whatever was known of them."""
        self.scratch.db.execute("DELETE FROM ref WHERE lid = ?", (item.lid,))
        refs = [n["reference"] for n in reference_nodes(body, [])]
        own = _base_of(item.full_url) if item.full_url else ""
        self.scratch.db.executemany(INSERT_PENDING, pending_rows(item.lid, refs, patient_refs, own,
                                                                 self.bases.get(item.source_id, set())))
        self._resolve_pending()


def iter_references(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, reference object)`` for every Reference (a dict with a string ``reference``)."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield path, node
        for k, v in node.items():
            if isinstance(v, dict | list):
                yield from iter_references(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from iter_references(v, f"{path}[{i}]")


#: what a reference is rewritten to: a bundle id, "contained" (left alone), or None (unresolved)
IS_CONTAINED = "#"

#: what each reference of item ``i`` becomes, as a JSON array of ``[position, value]`` (see
#: :func:`targets`)
TARGETS = (
    "(SELECT json_group_array(json_array(r.pos, CASE WHEN r.mode = 1 THEN '#' "
    "ELSE coalesce(t.new_id, '') END)) FROM ref r LEFT JOIN item t ON t.lid = r.target "
    "WHERE r.lid = i.lid AND r.pos >= 0)"
)
assert CONTAINED == 1  # the literal mode above


def targets(packed: str) -> list[str | None]:
    """What each reference of an item (in :func:`reference_nodes` order) becomes in the bundle:
    a bundle id, :data:`IS_CONTAINED`, or None (unresolved); ``packed`` is the :data:`TARGETS`
    column of its row."""
    return [value or None for _pos, value in sorted(orjson.loads(packed))]


def targets_of(scratch: Scratch, lid: int) -> list[str | None]:
    """:func:`targets` of one item."""
    row = scratch.db.execute(f"SELECT {TARGETS} FROM item i WHERE i.lid = ?", (lid,)).fetchone()  # noqa: S608
    return targets(row[0])


def rewrite(item: Item, body: dict[str, Any], targets: Sequence[str | None], known: set[str],
            unresolved: list[dict[str, Any]]) -> None:
    """Point every reference of ``body`` at ``urn:uuid:<bundle id>`` (``targets``: see
    :func:`targets_of`); list the ones that fail.

    ``known`` holds the urn:uuid references already written by normalization (the case Patient,
    DICOM-derived studies), which need no lookup.
    """
    if not targets:
        return  # no reference in the body at all
    nodes = reference_nodes(body, [])
    failed: list[dict[str, Any]] = []
    for ref, target in zip(nodes, targets, strict=True):
        if ref["reference"] in known or target == IS_CONTAINED:
            continue
        if target:
            ref["reference"] = f"urn:uuid:{target}"
            continue
        failed.append(ref)
    if failed:
        paths = {id(node): path for path, node in iter_references(body)}
        for ref in failed:
            unresolved.append({"from": f"{item.rtype}/{item.new_id}", "path": paths[id(ref)],
                               "reference": ref["reference"], "source_id": item.source_id})

