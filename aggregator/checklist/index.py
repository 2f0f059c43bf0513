"""The record index: the resources a checklist can match, each as the few facts its rules read.

Apart from the engine because it is the part that reads the record (streamed once, kept only
where :class:`~aggregator.checklist.needs.Needs` says a rule can match) and resolves references;
the rules in :mod:`.engine` and :mod:`.content` only ever see its :class:`Res` facts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date
from typing import Any, NamedTuple

from aggregator.checklist import stream
from aggregator.checklist.holders import Holders
from aggregator.checklist.holders import is_ours as holders_is_ours
from aggregator.checklist.loader import Selector
from aggregator.checklist.needs import Needs, Plan
from aggregator.model import NormalizedRecord, SourceInfo
from aggregator.normalize import stubs, uids
from aggregator.normalize.classify import classify, values_at

IGNORED_STATUS = frozenset({"entered-in-error", "cancelled", "superseded", "not-done", "planned"})
_SKIP_TYPES = frozenset({"Provenance", "Bundle", "OperationOutcome"})

#: where the date of a resource lives, per type (first found wins)
_DATE_PATHS: dict[str, tuple[str, ...]] = {
    "Procedure": ("performedDateTime", "performedPeriod.start", "performedPeriod.end"),
    "Specimen": ("collection.collectedDateTime", "collection.collectedPeriod.start", "receivedTime"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "DocumentReference": ("context.period.start", "date", "content.attachment.creation"),
    "Composition": ("date",),
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
    "ImagingStudy": ("started", "series.started"),
    "Encounter": ("period.start", "period.end"),
    "Condition": ("onsetDateTime", "onsetPeriod.start", "recordedDate"),
    "MedicationRequest": ("authoredOn",),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod.start", "dateAsserted"),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod.start"),
    "MedicationDispense": ("whenHandedOver", "whenPrepared"),
    "AllergyIntolerance": ("recordedDate", "onsetDateTime"),
    "Immunization": ("occurrenceDateTime", "recorded"),
    "Media": ("createdDateTime", "createdPeriod.start", "issued"),
}


def parse_date(value: Any) -> date | None:
    """The calendar date of a FHIR date/dateTime/instant (partial dates: first day)."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    text = value[:10]
    if len(text) == 4:
        text += "-01-01"
    elif len(text) == 7:
        text += "-01"
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def _ref_strings(res: Mapping[str, Any], path: str) -> list[str]:
    out = []
    for v in values_at(res, path.split(".")):
        if isinstance(v, Mapping) and isinstance(v.get("reference"), str):
            out.append(v["reference"])
    return out


def _display(res: Mapping[str, Any]) -> str:
    for key in ("code", "type"):
        v = res.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, Mapping):
            if isinstance(v.get("text"), str) and v["text"]:
                return str(v["text"])
            for c in v.get("coding") or []:
                if isinstance(c, Mapping) and c.get("display"):
                    return str(c["display"])
    return ""


class DocumentFacts(NamedTuple):
    """What :meth:`Content.state` reads of a report or document: does it carry the document itself?"""

    has_bytes: bool
    """An attachment with inline data, or a package document (``documents/...``) with a size."""
    has_attachments: bool
    composition_text: bool
    """A Composition whose sections carry narrative text."""
    results: int
    """Number of ``result`` references (structured results of a report)."""
    urls: tuple[str, ...]
    """Attachment URLs, to look their retrieval up in the ledger."""
    conclusion: bool
    stub: str = ""
    """Why its text is a stub rather than the document ("its text points elsewhere...: "see
    outside report""), from the text profiles normalization made; "" when full or not judged."""
    summary: str = ""
    """The summary document it is by type ("discharge summary (LOINC 18842-5)"), or ""."""
    conclusion_pointer: str = ""
    """A phrase of the conclusion that points at another report ("see outside report"), or ""."""


class StudyFacts(NamedTuple):
    """What the image check reads of an ImagingStudy: its UID and the counts it declares."""

    uid: str
    listed: frozenset[str]
    """SOP Instance UIDs the study lists."""
    instances: int | None
    series_count: int | None
    series: tuple[tuple[Any, int], ...]
    """(series UID, numberOfInstances) of each series that declares a count, in order."""
    modality: str = ""
    """The study's modalities (``CT``, ``CT/PT``), from the study or its series."""
    accession: str = ""
    """The accession number: what a radiology department files the study under."""


class Res:
    """One resource the checklist's rules can match, as the few facts they read of it.

    Why not the resource itself: a large record holds hundreds of thousands of resources; the
    engine used to keep each one it read as a dict, which cost more memory than normalizing the
    record. Only resources that a selector of the checklist can match are kept, and of each only
    what :class:`Needs` says its rules read (document facts for report targets, study facts for
    image targets, references at the link paths, a display name for subjects...).
    """

    __slots__ = ("classes", "date", "display", "document", "identifiers", "ref", "refs", "sources", "status",
                 "study", "type")

    def __init__(self, ref: str, rtype: str, classes: frozenset[str], date_: date | None, status: str) -> None:
        self.ref = ref
        self.type = rtype
        self.classes = classes
        self.date = date_
        self.status = status
        self.sources: frozenset[int] = frozenset()
        self.display = ""
        self.document: DocumentFacts | None = None
        self.study: StudyFacts | None = None
        self.refs: dict[str, tuple[str, ...]] | None = None
        """Raw reference strings at the link paths the checklist compares (only non-empty paths)."""
        self.identifiers: frozenset[str] = frozenset()


class RecordIndex:
    """The resources a checklist can match, with classes, dates, sources; reference resolution.

    The record is streamed once; a resource is kept only when :class:`Needs` says a rule can
    match it, and then only as its :class:`Res` facts. What the rules read of the record as a
    whole is counted on the way: the number of resources (for the report) and the newest date
    (the reference date of a case without one). Provenance is read at the end from its bytes, and
    references that point outside the kept resources are resolved, when a rule compares them, by
    one more pass that keeps only the names of those targets.
    """

    def __init__(self, record: NormalizedRecord, sources: Sequence[SourceInfo], needs: Needs,
                 classify_fn: Callable[[Mapping[str, Any]], frozenset[str]] = classify, *,
                 reference: date | None = None) -> None:
        self.record = record
        self.needs = needs
        self.reference = reference
        """The case date, when the case has one: freshness windows count back from it."""
        self.stale_newest: dict[Selector, date] = {}
        """Presence selector -> newest date of its candidates that were too old to keep."""
        self.items: list[Res] = []
        self.by_key: dict[str, Res] = {}
        self.aliases: dict[str, str] = {}
        """Reference string -> ``Type/id`` of a resource that is in the record but not kept."""
        self.count = 0
        """Resources in the record that the engine considers (not Provenance, not ignored statuses)."""
        self.newest: date | None = None
        """The newest date of any considered resource but the Patient."""
        self._texts = {d.path: d.text for d in record.documents if d.text is not None}
        """Package path -> what the document's text shows (stub detection)."""
        self._shared: dict[Any, Any] = {}
        self._names = _source_names(sources)
        self._sources = sources
        self._odd_fullurls = False
        """Whether a considered resource has a fullUrl other than ``urn:uuid:<its id>``."""
        self.holders = Holders()
        """Which institution holds each kept resource, and each source's, from the data."""
        provenances: list[tuple[Mapping[str, Any], stream.PlainTargets | None]] = []
        for entry, targets in stream.entries(record):  # streamed: the record is never one dict in memory
            res = entry.get("resource") if isinstance(entry, Mapping) else None
            if not isinstance(res, Mapping):
                continue
            if res.get("resourceType") == "Provenance":
                provenances.append((res, targets))  # without their target lists, when plain
            else:
                kept = len(self.items)
                self._add(entry, res, classify_fn)
                self.holders.see(entry, res, self.items[-1].ref if len(self.items) > kept else None)
        self.items.sort(key=lambda r: r.ref)
        self._attach_sources(provenances)
        self._attach_holders(provenances)
        self._resolve_outside()
        self._shared.clear()
        self.doc_refs = {d.resource_ref for d in record.documents if d.size > 0}
        self.images_by_study: dict[str, list[Any]] = {}
        for img in record.images:
            self.images_by_study.setdefault(img.study_instance_uid, []).append(img)

    def _share(self, value: Any) -> Any:
        """One object per distinct value (classes, dates, statuses, names repeat across resources)."""
        return self._shared.setdefault(value, value)

    def _add(self, entry: Mapping[str, Any], res: Mapping[str, Any],
             classify_fn: Callable[[Mapping[str, Any]], frozenset[str]]) -> None:
        rtype = str(res.get("resourceType") or "")
        rid = str(res.get("id") or "")
        full = str(entry.get("fullUrl") or "")
        if not rid and full.startswith("urn:uuid:"):
            rid = full[len("urn:uuid:"):]
        if not rtype or rtype in _SKIP_TYPES or not rid:
            return
        status = str(res.get("status") or "")
        if status in IGNORED_STATUS:
            return
        when = self._date(rtype, res)
        self.count += 1
        if full and full != f"urn:uuid:{rid}":
            self._odd_fullurls = True
        if when is not None and rtype != "Patient" and (self.newest is None or when > self.newest):
            self.newest = when
        classes = classify_fn(res)
        plan = self.needs.plan(rtype, classes)
        if not plan.keep or self._too_old(plan, when):
            return
        r = Res(f"{rtype}/{rid}", self._share(rtype), self._share(classes), self._share(when), self._share(status))
        r.sources = self._share(_meta_sources(res, self._names))
        if plan.display:
            r.display = self._share(_display(res))
        if plan.document:
            r.document = _document_facts(rtype, res, classes, self._texts)
        if plan.images and rtype == "ImagingStudy":
            r.study = _study_facts(res)
        if plan.paths:
            refs = {p: tuple(_ref_strings(res, p)) for p in sorted(plan.paths)}
            r.refs = {p: v for p, v in refs.items() if v} or None
        if plan.identifiers:
            r.identifiers = frozenset(_identifiers(res))
        self.items.append(r)
        for key in (r.ref, f"urn:uuid:{rid}", full):
            if key:
                self.by_key[key] = r

    def _too_old(self, plan: Plan, when: date | None) -> bool:
        """Whether every rule that wants this resource will find it outside its window.

        Why: a long record is mostly history, and "recent labs" reads only the recent ones; of the
        rest a gap cites only the newest date. The reference date is the case date, or (without
        one) the newest date in the record, which is never older than the newest seen so far.
        """
        if plan.window is None or when is None:
            return False
        ref = self.reference or self.newest
        if ref is None or (ref - when).days <= plan.window:
            return False
        for sel in plan.stale_for:
            old = self.stale_newest.get(sel)
            if old is None or when > old:
                self.stale_newest[sel] = when
        return True

    @staticmethod
    def _date(rtype: str, res: Mapping[str, Any]) -> date | None:
        for p in _DATE_PATHS.get(rtype, ()):
            for v in values_at(res, p.split(".")):
                d = parse_date(v)
                if d is not None:
                    return d
        return None

    def _attach_sources(self, provenances: list[tuple[Mapping[str, Any], stream.PlainTargets | None]]) -> None:
        """Map resources to the sources they came from, through Provenance (meta.source was read
        with each resource). A Provenance's plain targets are read from its bytes, one at a time."""
        names = self._names
        for prov, targets in provenances:
            ids = {names[t] for t in _strings(prov) if t in names}
            if targets is not None:
                ids |= {names[t] for t in iter(targets) if t in names}
            ids |= {s.id for s in self._sources for ident in values_at(prov, ["entity", "what", "identifier"])
                    if isinstance(ident, Mapping) and "source" in str(ident.get("system") or "")
                    and str(ident.get("value")) == str(s.id)}
            if not ids:
                continue
            refs = iter(targets) if targets is not None else iter(_ref_strings(prov, "target"))
            for ref in refs:
                r = self.resolve(ref)
                if r is not None and not ids <= r.sources:
                    r.sources = self._share(r.sources | ids)

    def _attach_holders(self, provenances: list[tuple[Mapping[str, Any], stream.PlainTargets | None]]) -> None:
        """The organizations a source's own Provenance names hold its targets; resources read
        without a source tag count for the sources Provenance gave them."""
        def kept(ref: str) -> str | None:
            r = self.resolve(ref)
            return r.ref if r is not None else None

        for prov, targets in provenances:
            if not holders_is_ours(prov):
                refs = iter(targets) if targets is not None else iter(_ref_strings(prov, "target"))
                self.holders.provenance(prov, refs, kept)
        self.holders.credit(lambda ref: sorted(r.sources) if (r := self.by_key.get(ref)) is not None else [])

    def _resolve_outside(self) -> None:
        """Resolve the compared references that point at resources the index did not keep.

        Two reports "share" a basedOn or an encounter when their references name the same
        resource, whatever the spelling (``urn:uuid:``, ``Type/id``, an absolute URL); that
        resource is usually one the checklist never matches (a ServiceRequest, an Encounter).
        Only the strings in question are looked for, in one more streamed pass, and only when
        two of them could name one resource: when every fullUrl is ``urn:uuid:<id>`` (as
        normalization writes them), that takes two different strings ending in the same id.
        """
        wanted: set[str] = set()
        for r in self.items:
            for refs in (r.refs or {}).values():
                wanted.update(s for s in refs if self.resolve(s) is None)
        if not wanted or not (self._odd_fullurls or _spellings_meet(wanted)):
            return
        tails: dict[str, list[str]] = {}
        for s in wanted:
            tail = _tail(s)
            if tail is not None:
                tails.setdefault(tail, []).append(s)
        exact: dict[str, str] = {}
        by_tail: dict[str, str] = {}
        for entry, _ in stream.entries(self.record):
            res = entry.get("resource") if isinstance(entry, Mapping) else None
            if not isinstance(res, Mapping):
                continue
            rtype = str(res.get("resourceType") or "")
            rid = str(res.get("id") or "")
            full = str(entry.get("fullUrl") or "")
            if not rid and full.startswith("urn:uuid:"):
                rid = full[len("urn:uuid:"):]
            if not rtype or rtype in _SKIP_TYPES or not rid or str(res.get("status") or "") in IGNORED_STATUS:
                continue
            ref = f"{rtype}/{rid}"
            for key in (ref, f"urn:uuid:{rid}", full):
                if key in wanted:
                    exact[key] = ref
            for s in tails.get(ref, ()):
                by_tail[s] = ref
        for s in wanted:
            target = exact.get(s) or by_tail.get(s)
            if target is not None:
                self.aliases[s] = target

    def resolve(self, reference: str) -> Res | None:
        if reference in self.by_key:
            return self.by_key[reference]
        tail = _tail(reference)
        return self.by_key.get(tail) if tail is not None else None

    def resolved(self, res: Res, path: str) -> set[str]:
        """The resources ``res`` references at ``path``, as ``Type/id`` when they are in the record."""
        out = set()
        for s in (res.refs or {}).get(path, ()):
            r = self.resolve(s)
            out.add(r.ref if r is not None else self.aliases.get(s, s))
        return out

    def select(self, sel: Selector) -> list[Res]:
        return [r for r in self.items if sel.matches(r.type, r.classes)]


def _spellings_meet(refs: Iterable[str]) -> bool:
    """Whether two of these reference strings end in the same id (so could name one resource)."""
    seen: dict[str, str] = {}
    for s in refs:
        if s.startswith("urn:uuid:"):
            rid: str | None = s[len("urn:uuid:"):]
        else:
            tail = _tail(s)
            rid = tail.split("/", 1)[1] if tail is not None else None
        if rid is not None and seen.setdefault(rid, s) != s:
            return True
    return False


def _tail(reference: str) -> str | None:
    """``Type/id`` from the end of a reference (absolute URL, ``_history`` version), if it has one."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 else None


def _source_names(sources: Sequence[SourceInfo]) -> dict[str, int]:
    """What a Provenance or meta.source may call each source: its URN, label, endpoint, base URL."""
    names: dict[str, int] = {}
    for s in sources:
        names[f"urn:aggregator:source:{s.id}"] = s.id
        for v in (s.label, s.endpoint_name, s.base_url, s.organization):
            if v:
                names.setdefault(v, s.id)
    return names


def _meta_sources(res: Mapping[str, Any], names: Mapping[str, int]) -> frozenset[int]:
    meta = res.get("meta")
    src = meta.get("source") if isinstance(meta, Mapping) else None
    if not isinstance(src, str):
        return frozenset()
    return frozenset(sid for name, sid in names.items()
                     if src == name or (name.startswith("http") and src.startswith(name)))


def _strings(node: Any) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


# --- content facts -------------------------------------------------------------------------


def _attachments(rtype: str, res: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if rtype == "DiagnosticReport":
        raw = list(res.get("presentedForm") or [])
    elif rtype == "DocumentReference":
        raw = [c.get("attachment") for c in res.get("content") or [] if isinstance(c, Mapping)]
    elif rtype == "Media":
        raw = [res.get("content")]
    else:
        raw = []
    return [a for a in raw if isinstance(a, Mapping)]


def _has_bytes(att: Mapping[str, Any]) -> bool:
    if isinstance(att.get("data"), str) and att["data"].strip():
        return True
    url = att.get("url")
    size = att.get("size")
    return isinstance(url, str) and url.startswith("documents/") and isinstance(size, int) and size > 0


def _composition_text(res: Mapping[str, Any]) -> bool:
    for div in values_at(res, ["section", "text", "div"]):
        if isinstance(div, str) and len(div) > 40:
            return True
    return False


def _document_facts(rtype: str, res: Mapping[str, Any], classes: frozenset[str] = frozenset(),
                    texts: Mapping[str, Any] | None = None) -> DocumentFacts:
    atts = _attachments(rtype, res)
    with_bytes = [a for a in atts if _has_bytes(a)]
    composed = rtype == "Composition" and _composition_text(res)
    # the text profiles of what carries the document: attachments with bytes, a Composition's narrative
    profiles = [(texts or {}).get(str(a.get("url") or "")) for a in with_bytes]
    if composed:
        profiles.append(stubs.profile_text(stubs.composition_text(res)))
    return DocumentFacts(
        has_bytes=bool(with_bytes),
        has_attachments=bool(atts),
        composition_text=composed,
        results=len(_ref_strings(res, "result")),
        urls=tuple(str(a.get("url")) for a in atts if a.get("url")),
        conclusion=bool(res.get("conclusion") or res.get("conclusionCode")),
        stub=stubs.judge(classes, profiles),
        summary=stubs.summary_type(res),
        conclusion_pointer=(stubs.profile_text(res["conclusion"]).pointer
                            if isinstance(res.get("conclusion"), str) else ""),
    )


def _study_facts(res: Mapping[str, Any]) -> StudyFacts:
    expected = res.get("numberOfInstances")
    n_series = res.get("numberOfSeries")
    series = tuple((uids.series_uid(s) or s.get("uid"), n) for s in res.get("series") or []
                   if isinstance(s, Mapping) and isinstance((n := s.get("numberOfInstances")), int))
    codes = [c.get("code") for c in values_at(res, ["modality"]) if isinstance(c, Mapping)]
    codes += [c.get("code") for c in values_at(res, ["series", "modality"]) if isinstance(c, Mapping)]
    modality = "/".join(sorted({str(c).strip() for c in codes if c and str(c).strip()}))
    accession = ""
    for ident in res.get("identifier") or []:
        if isinstance(ident, Mapping) and ident.get("value") and any(
                isinstance(c, Mapping) and c.get("code") == "ACSN" for c in values_at(ident, ["type", "coding"])):
            accession = str(ident["value"]).strip()
            break
    return StudyFacts(
        uid=study_uid(res),
        listed=frozenset(uids.instance_uid(i) or str(i.get("uid")) for i in values_at(res, ["series", "instance"])
                         if isinstance(i, Mapping)),
        instances=expected if isinstance(expected, int) else None,
        series_count=n_series if isinstance(n_series, int) else None,
        series=series,
        modality=modality,
        accession=accession,
    )


def study_label(res: Res) -> str:
    """``CT study of 2026-09-05, accession A123, Study Instance UID 1.2...``: what a radiology
    department needs to find a study (gaps name it, so that the navigator can ask for it)."""
    study = res.study
    parts = [f"{study.modality if study is not None and study.modality else 'imaging'} study"]
    if res.date is not None:
        parts[0] += f" of {res.date.isoformat()}"
    parts.append(f"accession {study.accession}" if study is not None and study.accession else "no accession number")
    if study is not None and study.uid:
        parts.append(f"Study Instance UID {study.uid}")
    return ", ".join(parts)


def study_uid(res: Mapping[str, Any]) -> str:
    """The StudyInstanceUID however the identifier spells it (``urn:dicom:uid``, ``urn:ietf:rfc:3986``
    with ``urn:oid:``...): the key to the images in the record (see :mod:`aggregator.normalize.uids`)."""
    return uids.study_uid(res)


def _identifiers(res: Mapping[str, Any]) -> set[str]:
    """Comparable identifiers: system|value, accession numbers by value, DICOM UIDs without urn:oid."""
    out = set()
    for ident in res.get("identifier") or []:
        if not isinstance(ident, Mapping) or not ident.get("value"):
            continue
        value = str(ident["value"])
        system = str(ident.get("system") or "")
        uid = uids.identifier_uid(ident)
        if uid is not None:
            out.add("uid|" + uid)
            continue
        codes = {str(c.get("code")) for c in values_at(ident, ["type", "coding"]) if isinstance(c, Mapping)}
        if "ACSN" in codes:
            out.add("acsn|" + value)
        out.add(f"{system}|{value}")
    # a specimen's accession number is the one its pathology report carries
    acc = res.get("accessionIdentifier")
    if isinstance(acc, Mapping) and acc.get("value"):
        out.add("acsn|" + str(acc["value"]))
    # an extension or identifier may carry the StudyInstanceUID of the report's study
    for ext in res.get("extension") or []:
        if isinstance(ext, Mapping) and "studyinstanceuid" in str(ext.get("url", "")).lower():
            v = ext.get("valueString") or ext.get("valueOid") or ext.get("valueId")
            if isinstance(v, str) and (uid := uids.plain_uid(v)):
                out.add("uid|" + uid)
    return out
