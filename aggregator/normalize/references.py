"""Resolve and rewrite references between resources of the same source.

Sources write references in many forms: ``Type/id`` (possibly ``/_history/n``), absolute URLs
of their own server, ``urn:uuid:`` fullUrls valid only inside one Bundle file, conditional
references (``Type?identifier=system|value``, as Synthea's transaction bundles use), and ``#id``
for contained resources. Resolution is always *within one source*: ``Patient/1`` from hospital A
and ``Patient/1`` from hospital B are different people until identity says otherwise. A reference
first resolves inside its own bundle/file, then across the files of the same download.

Unresolvable references keep their original ``reference`` string (and ``display``) untouched and
are listed in ``record.unresolved`` with their source: rewriting them to something invented would
hide that the target is missing, and dropping them would lose what the source said.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from aggregator.model import SourceInfo
from aggregator.normalize.facts import reference_nodes
from aggregator.normalize.parse import Item

_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")
CONTAINED = object()


def type_id(reference: str) -> str | None:
    """``Type/id`` at the end of a relative or absolute reference, without ``_history``."""
    m = _TAIL.search(reference)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def _base_of(url: str) -> str:
    """The server base of an absolute ``.../Type/id`` URL (what a relative reference is relative to)."""
    m = _TAIL.search(url)
    return url[: m.start()].rstrip("/") if m and "://" in url else ""


class Resolver:
    """Index of one case's items for reference lookup; answers with the target :class:`Item`.

    Nested per source (and bundle) rather than keyed by tuples: the keys are the items' own
    strings, so the index costs a dict slot per entry, not a tuple and a new string.
    """

    def __init__(self, items: list[Item], sources: dict[int, SourceInfo]) -> None:
        self.sources = sources
        self._full: dict[tuple[int, str], dict[str, Item]] = {}
        self._full_any: dict[int, dict[str, Item]] = {}
        self._tid_bundle: dict[tuple[int, str], dict[tuple[str, str], Item]] = {}
        self._tid: dict[int, dict[tuple[str, str], Item]] = {}
        self._ident: dict[tuple[int, str], dict[str, Item]] = {}
        self._bases: dict[int, set[str]] = {}
        for it in items:  # items arrive sorted by (source, key): the first one of a key wins
            sid, bundle = it.source_id, it.bundle
            full = it.full_url
            if full:
                self._full.setdefault((sid, bundle), {}).setdefault(full, it)
                self._full_any.setdefault(sid, {}).setdefault(full, it)
                base = _base_of(full)
                if base:
                    self._bases.setdefault(sid, set()).add(base)
            for b in (it.base_url, sources[sid].base_url if sid in sources else None):
                if b:
                    self._bases.setdefault(sid, set()).add(str(b).rstrip("/"))
            if it.rid:
                key = (it.rtype, it.rid)
                self._tid_bundle.setdefault((sid, bundle), {}).setdefault(key, it)
                self._tid.setdefault(sid, {}).setdefault(key, it)
            if it.facts.idents:
                idx = self._ident.setdefault((sid, it.rtype), {})
                for system, v in it.facts.idents:
                    idx.setdefault(f"{system}|{v}", it)
                    idx.setdefault(v, it)

    def release(self) -> None:
        """Drop the indexes (once references are resolved); later lookups resolve nothing."""
        self._full.clear()
        self._full_any.clear()
        self._tid_bundle.clear()
        self._tid.clear()
        self._ident.clear()
        self._bases.clear()

    def resolve(self, item: Item, reference: str) -> Item | object | None:
        """The target item, :data:`CONTAINED` for ``#id``, or None when it is not in the case."""
        ref = reference.strip()
        if not ref:
            return None
        if ref.startswith("#"):
            return CONTAINED
        sid, bundle = item.source_id, item.bundle
        if ref.startswith(("urn:uuid:", "urn:oid:")):
            return self._full_get(sid, bundle, ref)
        if "?" in ref:
            return self._conditional(sid, ref)
        if "://" in ref:
            hit = self._full_get(sid, bundle, ref)
            if hit is not None:
                return hit
            base = _base_of(ref)
            own = _base_of(item.full_url)
            if not base or (base != own and base not in self._bases.get(sid, set())):
                return None
        m = _TAIL.search(ref)
        if m is None:
            return None
        key = (m.group(1), m.group(2))
        hit = self._tid_bundle.get((sid, bundle), {}).get(key)
        return hit if hit is not None else self._tid.get(sid, {}).get(key)

    def _full_get(self, sid: int, bundle: str, ref: str) -> Item | None:
        hit = self._full.get((sid, bundle), {}).get(ref)
        return hit if hit is not None else self._full_any.get(sid, {}).get(ref)

    def _conditional(self, sid: int, ref: str) -> Item | None:
        rtype, _, query = ref.partition("?")
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "identifier" and value:
                return self._ident.get((sid, rtype.rsplit("/", 1)[-1]), {}).get(unquote(value))
        return None


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


def resolve_loaded(item: Item, resolver: Resolver) -> None:
    """Resolve an item's references from the strings its facts carry, without reading its body,
    and drop the strings (the targets are all later steps need)."""
    refs = item.facts.refs
    if refs is not None:
        item.refs = tuple(_target(resolver, item, r) for r in refs)
        item.facts.refs = None


def _target(resolver: Resolver, item: Item, reference: str) -> Any:
    """The resolved target, or the reference string itself when nothing in the case matches
    (kept so a content digest still tells two different unresolved references apart)."""
    t = resolver.resolve(item, reference)
    return reference if t is None else t


def targets(item: Item, nodes: list[dict[str, Any]], resolver: Resolver) -> tuple[Any, ...]:
    """The target of every reference of ``item`` (``nodes`` = :func:`reference_nodes` of its
    body), resolved once and cached on the item: de-duplication hashes each resource several
    times and rewriting needs the same answers; resolving again each time was most of
    normalization's own cost. The cache is positional, so it holds no part of the body."""
    if item.refs is None or len(item.refs) != len(nodes):
        item.refs = tuple(_target(resolver, item, node["reference"]) for node in nodes)
    return item.refs


def rewrite(item: Item, body: dict[str, Any], known: set[str], unresolved: list[dict[str, Any]]) -> None:
    """Point every reference of ``body`` (the body of ``item``, whose targets are cached in
    ``item.refs``) at ``urn:uuid:<bundle id>``; list the ones that fail.

    ``known`` holds the urn:uuid references already written by normalization (the case Patient,
    DICOM-derived studies), which need no lookup.
    """
    if item.refs == ():
        return  # resolved from the worker's facts: the body holds no reference at all
    nodes = reference_nodes(body, [])
    pairs = zip(nodes, item.refs or (), strict=True)
    failed: list[dict[str, Any]] = []
    for ref, target in pairs:
        original = ref["reference"]
        if original in known:
            continue
        if target is CONTAINED:
            continue
        if isinstance(target, Item) and target.new_id:
            ref["reference"] = f"urn:uuid:{target.new_id}"
            continue
        failed.append(ref)
    if failed:
        paths = {id(node): path for path, node in iter_references(body)}
        for ref in failed:
            unresolved.append({"from": f"{item.rtype}/{item.new_id}", "path": paths[id(ref)],
                               "reference": ref["reference"], "source_id": item.source_id})
