"""Which institution holds an item, read from the record itself, for next actions.

"Request the pathology report from portal-export" names a folder the patient downloaded, not a
place a navigator can call. The record usually says who holds each item: a document's custodian
(C-CDA ``custodian`` is carried into DocumentReference.custodian), the organization that
performed a report or a procedure, the hospital that provided the visit, the institution named in
a DICOM header (``InstitutionName``, carried as the ImagingStudy series performer), and the
organizations a source's own Provenance names as agents. This module collects those names while
the engine streams the record, and answers two questions:

* :meth:`Holders.of_resource`: the institution(s) holding one resource the engine kept, most
  specific path first (custodian before performer before the visit's provider);
* :meth:`Holders.of_source`: the institution a source's data names most often, for gaps that
  have no resource to point at.

Memory stays flat: names are kept per Organization (few) and per distinct mention; per resource
only for the resources the engine keeps, as shared tuples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from aggregator.normalize.classify import values_at

ORGANIZATION = "Organization"
_OUR_SOURCE = "urn:aggregator:source"
_SOURCE_TAG = "urn:aggregator:source:"

#: resource type -> (path, whether the path can only hold an Organization), most telling first.
#: The organization that holds an item is its custodian, else whoever performed it, else the
#: organization of its author; only Organization references count (a performing practitioner is
#: not an institution).
_PATHS: dict[str, tuple[tuple[str, bool], ...]] = {
    "DocumentReference": (("custodian", True), ("author", False)),
    "Composition": (("custodian", True), ("author", False)),
    "DiagnosticReport": (("performer", False), ("resultsInterpreter", False)),
    "Observation": (("performer", False),),
    "Procedure": (("performer.onBehalfOf", True), ("performer.actor", False)),
    "ImagingStudy": (("series.performer.actor", False), ("referrer", False)),
    "Encounter": (("serviceProvider", True),),
    "Specimen": (("collection.collector", False),),
    "Media": (("operator", False),),
    "Patient": (("managingOrganization", True),),
    "MedicationRequest": (("requester", False),),
    "ServiceRequest": (("performer", False),),
}
_ENCOUNTER_PATHS = ("encounter", "context.encounter", "context")


class Mention(NamedTuple):
    """One reference to a possible institution: where it was found and what it says."""

    rank: int
    """Position of the path in :data:`_PATHS` (0 = most telling); Provenance agents come after."""
    reference: str
    display: str
    org_only: bool
    """The path holds only Organizations (or the reference says it is one)."""


def _mentions(rtype: str, res: Mapping[str, Any]) -> tuple[Mention, ...]:
    out: list[Mention] = []
    for rank, (path, org_only) in enumerate(_PATHS.get(rtype, ())):
        for v in values_at(res, path.split(".")):
            m = _mention(rank, v, org_only)
            if m is not None:
                out.append(m)
    return tuple(out)


def _mention(rank: int, v: Any, org_only: bool) -> Mention | None:
    if not isinstance(v, Mapping):
        return None
    ref = v.get("reference")
    ref = ref if isinstance(ref, str) else ""
    disp = v.get("display")
    disp = disp.strip() if isinstance(disp, str) else ""
    if not ref and not disp:
        return None
    org = org_only or v.get("type") == ORGANIZATION or _names_type(ref, ORGANIZATION)
    return Mention(rank, ref, disp, org)


def _names_type(ref: str, rtype: str) -> bool:
    parts = ref.split("/_history/")[0].rstrip("/").split("/")
    return len(parts) >= 2 and parts[-2] == rtype


def _rid(ref: str) -> str:
    """The logical id at the end of a reference (``urn:uuid:x``, ``Type/x``, an absolute URL)."""
    if ref.startswith("urn:uuid:"):
        return ref[len("urn:uuid:"):]
    return ref.split("/_history/")[0].rstrip("/").rsplit("/", 1)[-1]


def source_tag(res: Mapping[str, Any]) -> int | None:
    """The source normalization wrote in ``meta.source`` (``urn:aggregator:source:<id>#...``)."""
    meta = res.get("meta")
    src = meta.get("source") if isinstance(meta, Mapping) else None
    if not isinstance(src, str) or not src.startswith(_SOURCE_TAG):
        return None
    head = src[len(_SOURCE_TAG):].split("#", 1)[0]
    return int(head) if head.isdigit() else None


def is_ours(prov: Mapping[str, Any]) -> bool:
    """Whether a Provenance is the one normalization writes per pull (its agents are our labels)."""
    if any(isinstance(p, str) and p.startswith(_SOURCE_TAG) for p in prov.get("policy") or []):
        return True
    return any(isinstance(i, Mapping) and i.get("system") == _OUR_SOURCE
               for i in values_at(prov, ["entity", "what", "identifier"]))


class Holders:
    """Organization names seen in the record, per kept resource and per source."""

    def __init__(self) -> None:
        self._orgs: dict[str, str] = {}
        """Organization reference spellings (``Organization/id``, ``urn:uuid:id``, fullUrl, id) -> name."""
        self._kept: dict[str, tuple[Mention, ...]] = {}
        self._encounter_of: dict[str, str] = {}
        """Kept resource ref -> the reference of its encounter (whose provider holds it otherwise)."""
        self._providers: dict[str, tuple[Mention, ...]] = {}
        """Encounter id -> its serviceProvider mentions."""
        self._by_source: dict[int, Counter[Mention]] = {}
        self._untagged: list[str] = []
        """Kept refs with mentions but no source in meta.source: credited through Provenance later."""
        self._shared: dict[Any, Any] = {}

    def _share(self, value: Any) -> Any:
        return self._shared.setdefault(value, value)

    # -- collecting -------------------------------------------------------------------------

    def see(self, entry: Mapping[str, Any], res: Mapping[str, Any], kept_ref: str | None) -> None:
        """One resource of the record as it streams past; ``kept_ref`` when the engine keeps it."""
        rtype = str(res.get("resourceType") or "")
        rid = str(res.get("id") or "")
        if rtype == ORGANIZATION:
            name = res.get("name")
            if isinstance(name, str) and name.strip():
                for key in (f"{rtype}/{rid}" if rid else "", f"urn:uuid:{rid}" if rid else "",
                            str(entry.get("fullUrl") or "")):
                    if key:
                        self._orgs[key] = name.strip()
            return
        found = _mentions(rtype, res)
        if not found:
            if kept_ref is not None:
                enc = self._encounter_ref(res)
                if enc:
                    self._encounter_of[kept_ref] = enc
            return
        found = tuple(self._share(m) for m in found)
        if rtype == "Encounter" and rid:
            self._providers[rid] = self._share(tuple(m for m in found if m.rank == 0))
        tag = source_tag(res)
        if tag is not None:
            counts = self._by_source.setdefault(tag, Counter())
            counts.update(found)
        if kept_ref is not None:
            self._kept[kept_ref] = self._share(found)
            enc = self._encounter_ref(res)
            if enc:
                self._encounter_of[kept_ref] = enc
            if tag is None:
                self._untagged.append(kept_ref)

    @staticmethod
    def _encounter_ref(res: Mapping[str, Any]) -> str:
        for path in _ENCOUNTER_PATHS:
            for v in values_at(res, path.split(".")):
                if isinstance(v, Mapping) and isinstance(v.get("reference"), str):
                    return str(v["reference"])
        return ""

    def provenance(self, prov: Mapping[str, Any], targets: Iterable[str],
                   resolve: Callable[[str], str | None]) -> None:
        """A source's own Provenance: the organizations among its agents hold its targets.

        Normalization's Provenance (one per pull) is skipped: its agents are our source labels.
        """
        if is_ours(prov):
            return
        rank = max(len(p) for p in _PATHS.values())
        found: list[Mention] = []
        for agent in prov.get("agent") or []:
            if not isinstance(agent, Mapping):
                continue
            for key in ("onBehalfOf", "who"):
                m = _mention(rank, agent.get(key), False)
                if m is not None:
                    found.append(m)
        if not found:
            return
        add = tuple(self._share(m) for m in found)
        tag = source_tag(prov)
        if tag is not None:
            self._by_source.setdefault(tag, Counter()).update(add)
        for t in targets:
            ref = resolve(t)
            if ref is None:
                continue
            self._kept[ref] = self._share(tuple(dict.fromkeys(self._kept.get(ref, ()) + add)))

    def credit(self, sources_of: Callable[[str], Iterable[int]]) -> None:
        """Count the mentions of kept resources without a source tag for the sources Provenance
        gave them (DICOM studies, documents made from files)."""
        for ref in self._untagged:
            for sid in sources_of(ref):
                self._by_source.setdefault(sid, Counter()).update(self._kept.get(ref, ()))
        self._untagged = []

    # -- answering --------------------------------------------------------------------------

    def name(self, m: Mention) -> str | None:
        """The institution a mention names, or None (a practitioner, an unknown reference)."""
        if m.reference:
            hit = self._orgs.get(m.reference) or self._orgs.get(f"{ORGANIZATION}/{_rid(m.reference)}")
            if hit:
                return hit
        return m.display if m.display and m.org_only else None

    def of_resource(self, ref: str) -> list[str]:
        """The institutions holding a kept resource: the names on its most telling path, else
        the provider of its encounter; empty when the record does not say."""
        names = self._best(self._kept.get(ref, ()))
        if names:
            return names
        enc = self._encounter_of.get(ref)
        if enc:
            return self._best(self._providers.get(_rid(enc), ()))
        return []

    def _best(self, mentions: Iterable[Mention]) -> list[str]:
        by_rank: dict[int, list[str]] = {}
        for m in mentions:
            n = self.name(m)
            if n:
                by_rank.setdefault(m.rank, [])
                if n not in by_rank[m.rank]:
                    by_rank[m.rank].append(n)
        return sorted(by_rank[min(by_rank)]) if by_rank else []

    def of_source(self, source_id: int) -> str | None:
        """The institution a source's data names most often (ties: alphabetical)."""
        counts: Counter[str] = Counter()
        for m, n in (self._by_source.get(source_id) or Counter()).items():
            name = self.name(m)
            if name:
                counts[name] += n
        if not counts:
            return None
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
