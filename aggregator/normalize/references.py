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
    """Index of one case's items for reference lookup; answers with the target :class:`Item`."""

    def __init__(self, items: list[Item], sources: dict[int, SourceInfo]) -> None:
        self.sources = sources
        self._full: dict[tuple[int, str, str], Item] = {}
        self._full_any: dict[tuple[int, str], Item] = {}
        self._tid_bundle: dict[tuple[int, str, str], Item] = {}
        self._tid: dict[tuple[int, str], Item] = {}
        self._ident: dict[tuple[int, str, str], Item] = {}
        self._bases: dict[int, set[str]] = {}
        for it in items:  # items arrive sorted by (source, key): the first one of a key wins
            sid, bundle = it.source_id, it.bundle
            full = str(it.meta.get("fullUrl") or "")
            if full:
                self._full.setdefault((sid, bundle, full), it)
                self._full_any.setdefault((sid, full), it)
                base = _base_of(full)
                if base:
                    self._bases.setdefault(sid, set()).add(base)
            for b in (it.meta.get("base_url"), sources[sid].base_url if sid in sources else None):
                if b:
                    self._bases.setdefault(sid, set()).add(str(b).rstrip("/"))
            if it.rid:
                self._tid_bundle.setdefault((sid, bundle, it.ref), it)
                self._tid.setdefault((sid, it.ref), it)
            for ident in it.data.get("identifier") or [] if isinstance(it.data.get("identifier"), list) else []:
                if isinstance(ident, dict) and ident.get("value"):
                    v = str(ident["value"])
                    self._ident.setdefault((sid, it.rtype, f"{ident.get('system') or ''}|{v}"), it)
                    self._ident.setdefault((sid, it.rtype, v), it)

    def release(self) -> None:
        """Drop the indexes (once references are rewritten); later lookups resolve nothing."""
        for index in (self._full, self._full_any, self._tid_bundle, self._tid, self._ident, self._bases):
            index.clear()

    def resolve(self, item: Item, reference: str) -> Item | object | None:
        """The target item, :data:`CONTAINED` for ``#id``, or None when it is not in the case."""
        ref = reference.strip()
        if not ref:
            return None
        if ref.startswith("#"):
            return CONTAINED
        sid, bundle = item.source_id, item.bundle
        if ref.startswith(("urn:uuid:", "urn:oid:")):
            return self._full.get((sid, bundle, ref)) or self._full_any.get((sid, ref))
        if "?" in ref:
            return self._conditional(sid, ref)
        if "://" in ref:
            hit = self._full.get((sid, bundle, ref)) or self._full_any.get((sid, ref))
            if hit is not None:
                return hit
            base = _base_of(ref)
            own = _base_of(str(item.meta.get("fullUrl") or ""))
            if not base or (base != own and base not in self._bases.get(sid, set())):
                return None
        tid = type_id(ref)
        if tid is None:
            return None
        return self._tid_bundle.get((sid, bundle, tid)) or self._tid.get((sid, tid))

    def _conditional(self, sid: int, ref: str) -> Item | None:
        rtype, _, query = ref.partition("?")
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "identifier" and value:
                return self._ident.get((sid, rtype.rsplit("/", 1)[-1], unquote(value)))
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


def reference_nodes(node: Any, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every Reference object under ``node``, in document order (like :func:`iter_references`,
    without building paths: this runs for every resource, paths are needed only on failure)."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            out.append(node)
        for v in node.values():
            if isinstance(v, dict | list):
                reference_nodes(v, out)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, dict | list):
                reference_nodes(v, out)
    return out


def targets(item: Item, resolver: Resolver) -> list[tuple[dict[str, Any], Any]]:
    """``(reference object, target)`` for every reference of ``item``, resolved once and cached on
    the item: de-duplication hashes each resource several times and rewriting needs the same
    answers; walking and resolving again each time was most of normalization's own cost."""
    if item.refs is None:
        item.refs = [(node, resolver.resolve(item, node["reference"])) for node in reference_nodes(item.data, [])]
    return item.refs


def rewrite(item: Item, resolver: Resolver, known: set[str], unresolved: list[dict[str, Any]]) -> None:
    """Point every reference of ``item`` at ``urn:uuid:<bundle id>``; list the ones that fail.

    ``known`` holds the urn:uuid references already written by normalization (the case Patient,
    DICOM-derived studies), which need no lookup. The cached targets are dropped afterwards.
    """
    if item.refs is not None:
        # the cache lists every reference of the resource as it stands (de-duplication drops it
        # when it merges content into a resource); references normalization adds are ``known``
        pairs, item.refs = item.refs, None
    else:
        pairs = [(node, resolver.resolve(item, node["reference"])) for node in reference_nodes(item.data, [])
                 if node["reference"] not in known]
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
        paths = {id(node): path for path, node in iter_references(item.data)}
        for ref in failed:
            unresolved.append({"from": f"{item.rtype}/{item.new_id}", "path": paths[id(ref)],
                               "reference": ref["reference"], "source_id": item.source_id})
