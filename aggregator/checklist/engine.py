"""The checklist rule engine: a normalized record + the ledger -> a gap report.

Three rules cover what a second opinion needs (see ``schemas/checklist.schema.json``):

* ``presence``: at least ``min`` resources of a class, fresh enough, with real content;
  optionally several ``components`` that must each be present (ER, PR and HER2).
* ``each``: every subject X has a linked Y with content ("each biopsy has a pathology report with
  text"). Links are declared per item: references in either direction, shared basedOn,
  same encounter, shared identifiers (accession number, StudyInstanceUID), date proximity (with
  modality agreement for imaging), and undated subjects. Explicit links win: a report that
  references one biopsy is not borrowed by another biopsy through date proximity, and a report
  linked by date goes to the nearest subject only. A note that names its encounter belongs to that
  encounter, never by date to another visit of the day; one that names none links by date only to
  a visit of the class of encounter it is written in. With ``unlinked: check``, a target that no
  subject links to (an ImagingStudy without a report), dated inside the target's window, is judged
  as its own subject: the study says images exist.
* ``identity``: identity conflicts found by normalization.

Content means the underlying document, not a summary: an attachment whose bytes are in the
record, a report with results, DICOM instances whose counts match the ImagingStudy. A text that
only points elsewhere ("See outside report."), is too short, or is a pathology text without a
diagnosis, and a summary of care (discharge summary, IPS patient summary) standing in for the
note or report an item asks for, are ``summary-only`` (:mod:`aggregator.normalize.stubs`). The engine
is deterministic (sorted output, no clock: a window runs from ``within`` days before the case date
to the checklist's grace period after it, or ends at the newest date in the record when the case
has none). Data that exists but only before a window is ``outdated``, not "not found".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

from aggregator.checklist import reasons as R
from aggregator.checklist import stream
from aggregator.checklist.holders import Holders
from aggregator.checklist.holders import is_ours as holders_is_ours
from aggregator.checklist.loader import Checklist, Item, Link, Selector
from aggregator.ledger import LedgerEntry
from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.normalize import stubs, uids
from aggregator.normalize.classify import classify, values_at
from aggregator.tables import load_mapping

REPORT_SCHEMA = "gap-report/1"
FINAL = frozenset({"final", "amended", "corrected", "appended", "current", "completed"})
PENDING_STATUS = frozenset({"registered", "partial", "preliminary", "in-progress", "draft"})
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
_ENCOUNTER_PATHS = ("encounter", "context.encounter", "context")
NOTE_SETTINGS = "tables/note_settings.yaml"

#: resource types that can hold a class, to find ledger failures that explain a missing item
_TYPES_FOR_PREFIX: dict[str, tuple[str, ...]] = {
    "pathology-report": ("DiagnosticReport", "DocumentReference", "Binary", "Composition"),
    "radiology-report": ("DiagnosticReport", "DocumentReference", "Binary"),
    "cardiology-report": ("DiagnosticReport", "DocumentReference", "Binary", "Observation"),
    "genomics-report": ("DiagnosticReport", "DocumentReference", "Observation"),
    "lab-report": ("DiagnosticReport", "Observation"),
    "lab-result": ("Observation", "DiagnosticReport"),
    "lab": ("Observation", "DiagnosticReport"),
    "biomarker": ("Observation", "DiagnosticReport"),
    "staging": ("Observation", "Condition"),
    "gleason": ("Observation", "DiagnosticReport"),
    "note": ("DocumentReference", "DiagnosticReport", "Composition", "Binary"),
    "problem": ("Condition",),
    "cancer": ("Condition",),
    "medication": ("MedicationRequest", "MedicationStatement", "MedicationAdministration",
                   "MedicationDispense", "Medication"),
    "allergy": ("AllergyIntolerance",),
    "imaging-study": ("ImagingStudy",),
    "procedure": ("Procedure",),
    "encounter": ("Encounter",),
    "specimen": ("Specimen",),
    "ecg": ("Observation", "DiagnosticReport", "DocumentReference", "Procedure"),
    "echo": ("Observation", "DiagnosticReport", "DocumentReference", "Procedure", "ImagingStudy"),
    "cardiac-imaging": ("DiagnosticReport", "DocumentReference", "ImagingStudy", "Procedure"),
}
_SUBJECT_LABELS = (
    ("procedure:biopsy", "biopsy"),
    ("procedure:resection", "resection"),
    ("procedure:surgery", "operation"),
    ("specimen", "specimen"),
    ("radiology-report", "imaging report"),
    ("echo", "echocardiogram"),
    ("encounter", "visit"),
)


# --- small helpers ------------------------------------------------------------------------


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


@dataclass
class State:
    """Whether one candidate resource satisfies a target, and if not, why."""

    ok: bool
    code: str = ""
    detail: str = ""
    reason: R.Reason | None = None


# --- what the checklist needs ---------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Which facts of a resource to keep (the union over every selector that matches it)."""

    keep: bool = False
    document: bool = False
    images: bool = False
    display: bool = False
    paths: frozenset[str] = frozenset()
    identifiers: bool = False
    window: int | None = None
    """Days: every rule that matches the resource needs it only while it is at most this old
    (windowed presence candidates and subjects); None: needed whatever its date."""
    stale_for: tuple[Selector, ...] = ()
    """The presence selectors among those rules: a gap there cites the newest stale candidate's date."""

    def __or__(self, other: _Plan) -> _Plan:
        return _Plan(self.keep or other.keep, self.document or other.document, self.images or other.images,
                     self.display or other.display, self.paths | other.paths,
                     self.identifiers or other.identifiers)


_NOTHING = _Plan()


class Needs:
    """What one checklist's rules read of the record: which resources, and which facts of each.

    Why: the rules only ever look at resources that a selector (applies_if, subjects, target,
    components, summaries) matches by type and class, and at a handful of their fields. Deciding
    that once per (resource type, classes) pair lets the index drop everything else while it
    streams the record: billing resources, vital signs no item asks for, and the bulk of every
    kept resource.
    """

    def __init__(self, items: Iterable[Item]) -> None:
        self._rules: list[tuple[Selector, _Plan, int | None, bool]] = []
        """(selector, facts, window in days or None, is a presence candidate)"""
        for item in items:
            self._add_item(item)
        self._cache: dict[tuple[str, frozenset[str]], _Plan] = {}

    def _add_item(self, item: Item) -> None:
        if item.applies_if is not None:
            self._rules.append((item.applies_if, _Plan(keep=True), None, False))
        for comp in item.components:  # components are only ever read by the presence rule
            self._rules.append((comp, _content_plan(comp), comp.within_days, True))
        if item.target is not None:
            target = _content_plan(item.target)
            if item.rule == "each" and item.subjects is not None:
                s_paths: set[str] = set()
                t_paths: set[str] = set()
                idents = False
                for lk in item.links:
                    if lk.via == "reference":
                        (t_paths if lk.from_ == "target" else s_paths).add(lk.path)
                    elif lk.via == "shared-reference":
                        s_paths.add(lk.path)
                        t_paths.add(lk.path)
                    elif lk.via == "encounter":
                        s_paths.update(_ENCOUNTER_PATHS)
                        t_paths.update(_ENCOUNTER_PATHS)
                    elif lk.via == "shared-identifier":
                        idents = True
                # each() only looks at fresh subjects, but at every target (and at their dates)
                self._rules.append((item.subjects, _Plan(keep=True, display=True, paths=frozenset(s_paths),
                                                         identifiers=idents), item.subjects.within_days, False))
                target = target | _Plan(keep=True, paths=frozenset(t_paths), identifiers=idents)
                self._rules.append((item.target, target, None, False))
            else:
                self._rules.append((item.target, target, item.target.within_days, item.rule == "presence"))
        if item.summaries:
            self._rules.append((Selector(classes_any=item.summaries), _Plan(keep=True), None, False))

    def plan(self, rtype: str, classes: frozenset[str]) -> _Plan:
        """The facts to keep of a resource of this type and classes (nothing: do not keep it)."""
        key = (rtype, classes)
        got = self._cache.get(key)
        if got is None:
            got = _NOTHING
            windows: list[int] = []
            unbounded = False
            stale_for: list[Selector] = []
            for sel, plan, window, presence in self._rules:
                if sel.matches(rtype, classes):
                    got = got | plan
                    if window is None:
                        unbounded = True
                    else:
                        windows.append(window)
                        if presence:
                            stale_for.append(sel)
            if got.keep and windows and not unbounded:
                got = replace(got, window=max(windows), stale_for=tuple(stale_for))
            self._cache[key] = got
        return got


def _content_plan(sel: Selector) -> _Plan:
    return _Plan(keep=True, document=sel.content not in ("any", "images"), images=sel.content == "images")


# --- the record index ---------------------------------------------------------------------

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

    def _too_old(self, plan: _Plan, when: date | None) -> bool:
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


# --- content -------------------------------------------------------------------------------


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


class Content:
    """Judges whether a candidate carries the underlying data a target asks for."""

    def __init__(self, index: RecordIndex, ledger: R.LedgerIndex) -> None:
        self.index = index
        self.ledger = ledger

    def state(self, res: Res, sel: Selector) -> State:
        status = res.status
        if sel.final_only and status in PENDING_STATUS:
            return State(False, R.PENDING, f"{res.ref} is {status}: the final report is pending")
        need = sel.content
        if need == "any":
            return State(True)
        if need == "images":
            return self._images(res)
        return self._document(res, sel, allow_results=need == "full")

    def _document(self, res: Res, sel: Selector, *, allow_results: bool) -> State:
        doc = res.document
        assert doc is not None, "Needs keeps document facts for every document target"
        if doc.summary and not stubs.wants_summary(sel.classes_any | sel.classes_all):
            # a summary of care stands in for the note or report the item asks for
            return State(False, R.SUMMARY_ONLY, f"{res.ref} is a {doc.summary}, not the underlying document")
        if allow_results and doc.results:
            return State(True)
        if doc.has_bytes or (res.ref in self.index.doc_refs and doc.has_attachments) or doc.composition_text:
            if doc.stub:
                return State(False, R.SUMMARY_ONLY, f"{res.ref}: {doc.stub}")
            return State(True)
        urls = list(doc.urls)
        failure = self.ledger.for_keys(urls) if urls else None
        if failure is not None:
            return State(False, failure.code, f"{res.ref}: the document was not received - {failure.detail}", failure)
        if urls:
            return State(False, R.RETRIEVAL_FAILED,
                         f"{res.ref} points at a document that was not retrieved ({len(urls)} attachment(s))")
        what = []
        if doc.conclusion_pointer:
            what.append(f'a conclusion line that points elsewhere ("{doc.conclusion_pointer}")')
        elif doc.conclusion:
            what.append("a conclusion line")
        if doc.results:
            what.append(f"{doc.results} structured result(s)")
        if not what:
            what.append("metadata")
        return State(False, R.SUMMARY_ONLY, f"{res.ref} has only {' and '.join(what)}, no report text")

    def _images(self, res: Res) -> State:
        if res.type != "ImagingStudy":
            return State(False, R.IMAGES_NOT_RETRIEVED, f"{res.ref} is not an imaging study")
        study = res.study
        assert study is not None, "Needs keeps study facts for every image target"
        uid = study.uid
        received = self.index.images_by_study.get(uid, []) if uid else []
        # an instance without Pixel Data (a stripped copy, a report, a presentation state) is
        # received, and counts as received, but shows nothing: it is not an image
        images = [i for i in received if not uids.shows_nothing(i.sop_class_uid, i.pixels)]
        blank = [i for i in received if uids.shows_nothing(i.sop_class_uid, i.pixels)]
        blank_images = [i for i in blank if uids.is_image_class(i.sop_class_uid)]
        listed = study.listed
        have = {i.sop_instance_uid for i in received}
        label = f"{res.ref} ({study_label(res)})"
        if not images:
            failure = self.ledger.for_study(uid, sorted(listed)) if uid else None
            if blank:
                detail = (f"{label}: images not retrieved - the {len(blank)} DICOM instance(s) received carry no "
                          "pixel data (7FE0,0010), so they are not images")
            else:
                detail = f"{label}: images not retrieved - no DICOM instances of this study in the record"
            if failure is not None:
                return State(False, failure.code, f"{detail} - {failure.detail}", failure)
            pending = [] if blank else self.ledger.pending_sources(images=True)
            if pending:
                # an imaging source (a CD, a PACS) is on the case but not pulled yet: the images
                # may well be there; "retrieve them" would send the navigator after a disc they have
                reason = R.Reason(R.PENDING, f"source {R.names(pending)} has not been pulled yet", pending[0].id)
                return State(False, R.PENDING, f"{label}: images not received yet - {reason.detail}", reason)
            return State(False, R.IMAGES_NOT_RETRIEVED, detail)
        problems = []
        if blank_images:
            problems.append(f"{len(blank_images)} instance(s) of an image SOP class without pixel data (not images)")
        expected = study.instances
        if expected is not None and len(have) < expected:
            problems.append(f"{len(have)} of {expected} instances")
        n_series = study.series_count
        got_series = {i.series_instance_uid for i in received}
        if n_series is not None and len(got_series) < n_series:
            problems.append(f"{len(got_series)} of {n_series} series")
        for s_uid, n in study.series:
            got = sum(1 for i in received if i.series_instance_uid == s_uid)
            if got < n:
                problems.append(f"series {s_uid}: {got} of {n} instances")
        missing = sorted(listed - have)
        if missing and not problems:
            problems.append(f"{len(missing)} listed instance(s) absent")
        if problems:
            failure = self.ledger.for_study(uid, missing)
            detail = f"{label}: incomplete images ({'; '.join(problems[:4])})"
            if failure is not None:
                return State(False, failure.code, f"{detail} - {failure.detail}", failure)
            return State(False, R.IMAGES_NOT_RETRIEVED, detail)
        return State(True)


# --- evaluation ----------------------------------------------------------------------------


@dataclass
class Gap:
    reason: str
    detail: str
    next_action: str
    subject: str | None = None
    resource: str | None = None
    source: str | None = None
    component: str | None = None
    holder: str | None = None
    """The institution the next action names: records requests are grouped by it."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"reason": self.reason, "detail": self.detail, "next_action": self.next_action}
        for k in ("subject", "resource", "source", "component", "holder"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


@dataclass
class ItemResult:
    item: Item
    status: str
    score: float
    detail: str = ""
    evidence: set[str] = field(default_factory=set)
    gaps: list[Gap] = field(default_factory=list)
    subjects: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.item.id,
            "title": self.item.title,
            "rule": self.item.rule,
            "status": self.status,
            "score": round(self.score, 4),
            "detail": self.detail,
            "evidence": sorted(self.evidence),
            "gaps": [g.to_dict() for g in self.gaps],
        }
        if self.subjects:
            d["subjects"] = self.subjects
        return d


class Evaluator:
    def __init__(self, record: NormalizedRecord, ledger: Iterable[LedgerEntry], case: CaseInfo,
                 sources: Sequence[SourceInfo], items: Sequence[Item]) -> None:
        self.record = record
        self.case = case
        self.sources = sorted(sources, key=lambda s: s.id)
        self.source_by_id = {s.id: s for s in self.sources}
        case_date = parse_date(case.case_date) if case.case_date else None
        self.index = RecordIndex(record, self.sources, Needs(items), reference=case_date)
        self.ledger = R.LedgerIndex(ledger, self.sources)
        self.content = Content(self.index, self.ledger)
        if case_date is not None:
            self.reference_date: date | None = case_date
            self.reference_basis = "case-date"
        else:
            self.reference_date = self.index.newest
            self.reference_basis = "newest-record-date" if self.index.newest is not None else "none"

    # -- helpers ---------------------------------------------------------------------------

    def fresh(self, res: Res, sel: Selector) -> bool:
        """Whether ``res`` is dated inside the selector's window (always, without a window).

        The window runs from ``within`` days before the reference date to the checklist's grace
        period after it: "the last 90 days before the case date" is not met by results from years
        after it. Undated resources are never inside a window.
        """
        if sel.within_days is None or self.reference_date is None:
            return True
        if res.date is None:
            return False
        return -sel.grace_days <= (self.reference_date - res.date).days <= sel.within_days

    def window_words(self, sel: Selector) -> str:
        """``2026-07-03 to 2026-10-08 (90 days before the case date 2026-10-01, up to 7 days after)``."""
        ref = self.reference_date
        basis = "the case date" if self.reference_basis == "case-date" else "the newest date in the record"
        if ref is None or sel.within_days is None:
            return f"the last {sel.within_days} days before {basis}"
        start = ref - timedelta(days=sel.within_days)
        end = ref + timedelta(days=sel.grace_days)
        after = f", up to {sel.grace_days} days after" if sel.grace_days else ""
        return (f"{start.isoformat()} to {end.isoformat()} "
                f"({sel.within_days} days before {basis} {ref.isoformat()}{after})")

    def institution(self, src: SourceInfo) -> str:
        """Who to ask about a source's data: the organization configured for its endpoint, else
        the institution its data names most (performers, custodians, DICOM InstitutionName), else
        the endpoint's name; the source's label (a folder name for media) only as a last resort."""
        return (src.organization or self.index.holders.of_source(src.id) or src.endpoint_name
                or src.label or f"source {src.id}")

    def where(self, res: Res | None, *, images: bool = False, also: Res | None = None) -> str:
        """The institution that holds ``res`` (or ``also``): named by the data itself when it can
        be, else the institutions of the sources it came from, else of every source that could
        deliver it."""
        for r in (res, also):
            if r is not None:
                held = self.index.holders.of_resource(r.ref)
                if held:
                    return R.join_names(held)
        for r in (res, also):
            if r is not None and r.sources:
                return R.join_names(self.institution(self.source_by_id[i]) for i in sorted(r.sources)
                                    if i in self.source_by_id)
        capable = [s for s in self.sources if s.kind in (R.IMAGE_KINDS if images else R.FHIR_KINDS)]
        return R.join_names(self.institution(s) for s in capable or self.sources)

    def about(self, res: Res, sel: Selector | None) -> str:
        label = sel.label if sel and sel.label else ""
        if not label:
            for cls, name in _SUBJECT_LABELS:
                if cls in res.classes or any(c.startswith(cls + ":") for c in res.classes):
                    label = name
                    break
        label = label or res.type
        when = f" of {res.date.isoformat()}" if res.date else ""
        disp = res.display
        return f"the {label}{when}" + (f" ({disp})" if disp and disp.lower() != label.lower() else "")

    def target_types(self, sel: Selector) -> set[str]:
        if sel.resource_types:
            return set(sel.resource_types) | ({"Binary"} if sel.content in ("document", "full") else set())
        out: set[str] = set()
        for c in sel.classes_any | sel.classes_all:
            out.update(_TYPES_FOR_PREFIX.get(c, _TYPES_FOR_PREFIX.get(c.split(":")[0], ())))
        return out or {"DiagnosticReport", "DocumentReference", "Observation", "Binary"}

    def absent_reason(self, sel: Selector, item: Item, near: Res | None, stale: list[Res],
                      dropped: date | None = None) -> R.Reason:
        """Why nothing usable was found: summaries, ledger failures, pending sources, not found."""
        images = sel.content == "images"
        if item.summaries:
            summaries = [r for r in self.index.items if r.classes & item.summaries
                         and (near is None or near.date is None or r.date is None
                              or abs((r.date - near.date).days) <= 60)]
            if summaries:
                refs = ", ".join(r.ref for r in summaries[:3])
                return R.Reason(R.SUMMARY_ONLY, f"only a summary document was found ({refs})")
        failure = self.ledger.for_types(self.target_types(sel), images=images)
        if failure is not None:
            return failure
        pending = self.ledger.pending_sources(images=images)
        if pending:
            return R.Reason(R.PENDING, f"source {R.names(pending)} has not been pulled yet", pending[0].id)
        if images:
            return R.Reason(R.IMAGES_NOT_RETRIEVED, "no imaging study with DICOM instances is linked to this report")
        outside = self.outside_window(sel, stale, dropped)
        if outside is not None:
            return outside
        return R.Reason(R.NOT_FOUND, "not found at any source")

    def outside_window(self, sel: Selector, stale: list[Res], dropped: date | None) -> R.Reason | None:
        """Why candidates outside the window do not count: too old (``outdated``), too late, undated.

        Data that exists but is too old is not "not found": the navigator asks for recent results,
        and the gap names the newest date. Data dated after the window (beyond the checklist's
        grace period after the case date) does not answer "before the case date" either; the gap
        says so, with the earliest such date. Candidates too old to keep in the index
        (:meth:`RecordIndex._too_old`) count through ``dropped``, their newest date.
        """
        ref = self.reference_date
        older = [r.date for r in stale if r.date is not None and ref is not None and r.date < ref]
        later = sorted(r.date for r in stale if r.date is not None and ref is not None and r.date > ref)
        undated = [r for r in stale if r.date is None]
        if dropped is not None:
            older.append(dropped)
        window = self.window_words(sel)
        grace = f", beyond the {sel.grace_days}-day grace period" if sel.grace_days else ""
        if older:
            detail = (f"nothing recent at any source: the newest is from {max(older).isoformat()}, "
                      f"older than the window {window}")
            if later:
                detail += (f"; {len(later)} later one(s), from {later[0].isoformat()}, are dated after the case "
                           f"date{grace}")
            return R.Reason(R.OUTDATED, detail)
        if later:
            return R.Reason(R.NOT_FOUND, f"nothing in the window {window}: the only ones are dated after the case "
                                         f"date{grace}, the earliest from {later[0].isoformat()}")
        if undated:
            return R.Reason(R.NOT_FOUND, f"nothing in the window {window}: {len(undated)} undated one(s) "
                                         f"cannot be placed in it ({', '.join(r.ref for r in undated[:3])})")
        return None

    def ref_text(self) -> str:
        return self.reference_date.isoformat() if self.reference_date else "the case date"

    def make_gap(self, reason: R.Reason, item: Item, request: str, about: str, *, where_res: Res | None,
                 subject: Res | None = None, resource: Res | None = None, component: str | None = None,
                 images: bool = False) -> Gap:
        src = self.source_by_id.get(reason.source_id) if reason.source_id is not None else None
        # a failure at a source is the source's to fix; otherwise ask whoever holds the item
        where = (self.institution(src) if src is not None
                 else self.where(resource or where_res, images=images, also=where_res))
        # a report received in a preliminary state: the final version is still to be signed
        unsigned = reason.code == R.PENDING and resource is not None and resource.status in PENDING_STATUS
        action = R.next_action(reason.code, request or item.request or item.title.lower(), about, where,
                               reason.detail, source_label=src.label if src is not None else "",
                               report_status=resource.status if unsigned and resource is not None else "")
        return Gap(reason.code, reason.detail, action, subject.ref if subject else None,
                   resource.ref if resource else None, src.label if src is not None else None, component,
                   holder=where or None)

    def applies(self, item: Item) -> bool:
        if item.applies_if is None:
            return True
        return any(True for _ in self.index.select(item.applies_if))

    # -- rules -----------------------------------------------------------------------------

    def evaluate(self, item: Item) -> ItemResult:
        if item.rule == "identity":
            return self.identity(item)
        if not self.applies(item):
            return ItemResult(item, "not-applicable", 1.0, "no matching condition in the record")
        if item.rule == "each":
            return self.each(item)
        return self.presence(item)

    def identity(self, item: Item) -> ItemResult:
        """One patient, and every source that states a patient agrees with it.

        Reads what normalization established (``record.identity``): several persons and no pin
        (nothing chosen), conflicts (fields that differ, documents about another patient), a
        patient no name or birth date confirms; the detail names the documents that state no
        patient at all (kept, not compared)."""
        facts = self.record.identity or {}
        where_all = R.names(self.sources)
        several = facts.get("several") or []
        if several:
            people = []
            for n, group in enumerate(several, 1):
                parts = [f"{m['resource']} at {self._source_label(m['source_id'])}: "
                         f"{m['count']} {'instance' if m['kind'] == 'dicom' else 'resource'}"
                         f"{'' if m['count'] == 1 else 's'}" for m in group]
                people.append(f"patient {n}: " + "; ".join(parts))
            detail = f"several patients in the sources: pick one ({len(several)} found: {' | '.join(people)})"
            res = ItemResult(item, "missing", 0.0, f"several patients in the sources: pick one ({len(several)})")
            res.gaps.append(Gap(R.SEVERAL_PATIENTS, detail, R.next_action(R.SEVERAL_PATIENTS, "", "", where_all)))
            return res
        gaps: list[Gap] = []
        for c in sorted(self.record.conflicts or [], key=lambda c: (str(c.get("field")), str(c.get("file") or ""))):
            fieldname = str(c.get("field") or "demographics")
            values = " / ".join(str(v) for v in c.get("values") or [])
            where = " and ".join(sorted({self._source_label(s) for s in c.get("sources") or [] if s is not None})) \
                or "the sources"
            if fieldname == "patient":
                detail = (f"another patient's document ({c.get('file') or 'a document'}): quarantined, counts "
                          f"toward no item; it names {values}")
                gaps.append(Gap(R.IDENTITY_CONFLICT, detail, R.next_action(
                    R.IDENTITY_CONFLICT, "", "", where, "a document names another patient")))
                continue
            detail = f"{fieldname} differs across sources: {values}" if values else f"{fieldname} differs"
            gaps.append(Gap(R.IDENTITY_CONFLICT, detail,
                            R.next_action(R.IDENTITY_CONFLICT, "", "", where, f"{fieldname} differs")))
        if facts.get("anonymous"):
            gaps.append(Gap(R.IDENTITY_UNVERIFIED, "the patient in the sources has no name and no birth date: "
                            "nothing confirms who it is", R.next_action(R.IDENTITY_UNVERIFIED, "", "", where_all)))
        unverified = sorted({str(u.get("file") or u.get("resource")) for u in facts.get("unverified") or []})
        not_compared = f"; not compared (the file states no patient): {', '.join(unverified)}" if unverified else ""
        if gaps:
            conflicts = sum(1 for g in gaps if g.reason == R.IDENTITY_CONFLICT)
            status = "missing" if conflicts else "partial"
            text = (f"{conflicts} identity conflict(s) to confirm" if conflicts
                    else "identity not confirmed") + not_compared
            res = ItemResult(item, status, 0.0 if conflicts else 0.5, text)
            res.gaps.extend(gaps)
            return res
        if facts and not facts.get("chosen"):
            return ItemResult(item, "complete", 1.0, f"no source states the patient's demographics{not_compared}")
        if unverified:
            return ItemResult(item, "complete", 1.0, "one patient; demographics agree across the sources that state "
                              f"them{not_compared}")
        return ItemResult(item, "complete", 1.0, "one patient, identity confirmed: demographics agree across sources")

    def _source_label(self, sid: Any) -> str:
        if isinstance(sid, int) and sid in self.source_by_id:
            return R.source_name(self.source_by_id[sid])
        return str(sid)

    def presence(self, item: Item) -> ItemResult:
        parts = list(item.components) if item.components else [item.target] if item.target else []
        res = ItemResult(item, "complete", 1.0)
        got = 0.0
        for sel in parts:
            assert sel is not None
            ok, gap, evidence, partial = self.present(item, sel, component=sel.label if item.components else None)
            res.evidence |= evidence
            if ok:
                got += 1
            else:
                got += 0.5 if partial else 0.0
                if gap:
                    res.gaps.append(gap)
        res.score = got / len(parts) if parts else 1.0
        if not res.gaps:
            res.status = "complete"
            res.detail = f"{len(res.evidence)} resource(s)"
        elif res.score > 0:
            res.status = "partial"
        else:
            res.status = "missing"
        if res.gaps and not res.detail:
            res.detail = R.compose((g.detail for g in res.gaps), limit=3)
        return res

    def present(self, item: Item, sel: Selector, component: str | None) -> tuple[bool, Gap | None, set[str], bool]:
        candidates = self.index.select(sel)
        fresh = [r for r in candidates if self.fresh(r, sel)]
        stale = [r for r in candidates if not self.fresh(r, sel)]  # too old, after the window, or undated
        good: list[Res] = []
        bad: list[tuple[Res, State]] = []
        for r in fresh:
            st = self.content.state(r, sel)
            (good.append(r) if st.ok else bad.append((r, st)))
        request = sel.request or item.request
        if len(good) >= sel.min:
            return True, None, {r.ref for r in good}, False
        if bad:
            r, st = sorted(bad, key=lambda b: (_STATE_ORDER.get(b[1].code, 9), b[0].ref))[0]
            reason = st.reason or R.Reason(st.code, st.detail)
            if st.reason is not None:
                reason = R.Reason(st.reason.code, st.detail, st.reason.source_id, st.reason.key)
            gap = self.make_gap(reason, item, request, "", where_res=r, resource=r, component=component)
            return False, gap, {g.ref for g in good}, True
        reason = self.absent_reason(sel, item, None, stale, self.index.stale_newest.get(sel))
        gap = self.make_gap(reason, item, request, "", where_res=None, component=component,
                            images=sel.content == "images")
        return False, gap, {g.ref for g in good}, bool(good)

    def each(self, item: Item) -> ItemResult:
        assert item.subjects is not None and item.target is not None
        subjects = [s for s in self.index.select(item.subjects) if self.fresh(s, item.subjects)]
        if not subjects and not self.unlinked_candidates(item, [], {}):
            if item.otherwise == "presence":
                return self.presence(item)
            if item.otherwise == "check-existing" and self.index.select(item.target):
                return self.presence(item)
            return ItemResult(item, "not-applicable", 1.0, "nothing in the record that needs it")
        targets = [t for t in self.index.select(item.target)]
        links = self.link(item, subjects, targets)
        res = ItemResult(item, "complete", 1.0)
        satisfied = 0
        for s in subjects:
            linked = links.get(s.ref, [])
            states = [(t, self.content.state(t, item.target)) for t in linked]
            good = [t for t, st in states if st.ok]
            entry: dict[str, Any] = {"ref": s.ref, "about": self.about(s, item.subjects),
                                     "linked": [t.ref for t in linked]}
            if good:
                satisfied += 1
                res.evidence |= {t.ref for t in good}
                res.evidence.add(s.ref)
                entry["status"] = "complete"
                res.subjects.append(entry)
                continue
            about = self.about(s, item.subjects)
            images = item.target.content == "images"
            if states:
                t, st = sorted(states, key=lambda b: (_STATE_ORDER.get(b[1].code, 9), b[0].ref))[0]
                base = st.reason or R.Reason(st.code, st.detail)
                reason = R.Reason(base.code, st.detail, base.source_id, base.key)
                gap = self.make_gap(reason, item, item.target.request or item.request, about,
                                    where_res=s, subject=s, resource=t, images=images)
            else:
                reason = self.absent_reason(item.target, item, s, [])
                gap = self.make_gap(reason, item, item.target.request or item.request, about,
                                    where_res=s, subject=s, images=images)
            res.gaps.append(gap)
            entry["status"] = "missing"
            entry["reason"] = gap.reason
            res.subjects.append(entry)
        alone = self.unlinked_candidates(item, targets, links)
        satisfied += self.unlinked_targets(item, alone, res)
        total = len(subjects) + len(alone)
        res.score = satisfied / total
        res.status = "complete" if satisfied == total else "partial" if satisfied else "missing"
        noun = item.subjects.label or "item"
        res.detail = f"{satisfied} of {total} {noun}(s) covered" if not alone else (
            f"{satisfied} of {total} covered: {len(subjects)} {noun}(s) and {len(alone)} "
            f"{item.target.label or 'target'}(s) that no {noun} links to")
        return res

    def unlinked_candidates(self, item: Item, targets: list[Res], links: Mapping[str, list[Res]]) -> list[Res]:
        """Targets that no subject links to, dated within the target's window, when the item checks
        them (``unlinked: check``): an ImagingStudy says images exist, with or without a report."""
        if item.unlinked != "check" or item.target is None:
            return []
        claimed = {t.ref for linked in links.values() for t in linked}
        pool = targets if targets else self.index.select(item.target)
        return [t for t in pool if t.ref not in claimed and self.fresh(t, item.target)]

    def unlinked_targets(self, item: Item, alone: list[Res], res: ItemResult) -> int:
        """Judge each unlinked target as its own subject; returns how many satisfy the target."""
        assert item.target is not None
        satisfied = 0
        for t in alone:
            st = self.content.state(t, item.target)
            about = study_label(t) if t.type == "ImagingStudy" else self.about(t, item.target)
            entry: dict[str, Any] = {"ref": t.ref, "about": about, "linked": [t.ref]}
            if st.ok:
                satisfied += 1
                res.evidence.add(t.ref)
                entry["status"] = "complete"
            else:
                base = st.reason or R.Reason(st.code, st.detail)
                reason = R.Reason(base.code, st.detail, base.source_id, base.key)
                gap = self.make_gap(reason, item, item.target.request or item.request, f"the {about}",
                                    where_res=t, subject=t, resource=t, images=item.target.content == "images")
                res.gaps.append(gap)
                entry["status"] = "missing"
                entry["reason"] = gap.reason
            res.subjects.append(entry)
        return satisfied

    # -- linkage ---------------------------------------------------------------------------

    def link(self, item: Item, subjects: list[Res], targets: list[Res]) -> dict[str, list[Res]]:
        """Subject ref -> linked targets: explicit links first, then date proximity to the nearest."""
        explicit: dict[str, set[str]] = {s.ref: set() for s in subjects}
        claimed: dict[str, set[str]] = {}
        date_links = [lk for lk in item.links if lk.via == "date"]
        undated = any(lk.via == "undated" for lk in item.links)
        by_encounter = any(lk.via == "encounter" for lk in item.links)
        for s in subjects:
            for t in targets:
                if any(self.explicit(lk, s, t) for lk in item.links if lk.via not in ("date", "undated")):
                    explicit[s.ref].add(t.ref)
                    claimed.setdefault(t.ref, set()).add(s.ref)
        by_ref = {s.ref: s for s in subjects}
        by_date: dict[str, set[str]] = {s.ref: set() for s in subjects}
        for t in targets:
            if t.date is None:
                continue
            cands: list[tuple[int, Res]] = []
            for s in subjects:
                # A subject with an explicit link is judged on what it names: a report that
                # references its own study must not borrow another study taken days apart.
                if s.date is None or explicit[s.ref]:
                    continue
                # Linked by encounter first: a note that names its encounter belongs to that one,
                # never by date to another visit of the same day (an inpatient stay's note does
                # not cover an outpatient visit).
                if by_encounter and self.names_encounter(t) and (s.type == "Encounter" or self.names_encounter(s)):
                    continue
                if not self.same_setting(s, t):
                    continue
                owners = [by_ref[o] for o in sorted(claimed.get(t.ref, ()))]
                if owners and not any(self.same_episode(o, s) for o in owners):
                    continue
                # a target claimed explicitly by another subject goes to the subject nearest that owner
                dated_owners = [o for o in owners if o.date is not None]
                for lk in date_links:
                    delta = (t.date - s.date).days
                    if -lk.days_before <= delta <= lk.days_after and self.modality_ok(lk, s, t):
                        dist = (min(abs((o.date - s.date).days) for o in dated_owners if o.date)
                                if dated_owners else abs(delta))
                        cands.append((dist, s))
                        break
            if cands:
                best = min(d for d, _ in cands)
                for d, s in cands:
                    if d == best:
                        by_date[s.ref].add(t.ref)
        out: dict[str, list[Res]] = {}
        tmap = {t.ref: t for t in targets}
        for s in subjects:
            refs = explicit[s.ref] | by_date[s.ref]
            if undated and s.date is None:
                refs |= set(tmap)
            out[s.ref] = [tmap[r] for r in sorted(refs)]
        return out

    @staticmethod
    def names_encounter(res: Res) -> bool:
        """Whether ``res`` references an encounter (only known when a link compares encounters)."""
        refs = res.refs or {}
        return any(refs.get(p) for p in _ENCOUNTER_PATHS)

    @staticmethod
    def same_setting(s: Res, t: Res) -> bool:
        """Whether two resources may belong to the same class of encounter (a date link's condition).

        An Encounter's class (``encounter:inpatient``...) or, for a note, the classes its kind is
        written in (``schemas/tables/note_settings.yaml``: a discharge summary belongs to a stay).
        Unknown on either side: they agree.
        """
        a, b = _settings(s.classes), _settings(t.classes)
        return not a or not b or bool(a & b)

    @staticmethod
    def same_episode(a: Res, b: Res) -> bool:
        if a.ref == b.ref or a.date is None or b.date is None:
            return True
        return abs((a.date - b.date).days) <= 3

    @staticmethod
    def modality_ok(lk: Link, s: Res, t: Res) -> bool:
        if not lk.same_modality:
            return True
        ms = {c for c in s.classes if c.startswith("modality:")}
        mt = {c for c in t.classes if c.startswith("modality:")}
        return not ms or not mt or bool(ms & mt)

    def explicit(self, lk: Link, s: Res, t: Res) -> bool:
        idx = self.index
        if lk.via == "reference":
            holder, other = (t, s) if lk.from_ == "target" else (s, t)
            return other.ref in idx.resolved(holder, lk.path)
        if lk.via == "shared-reference":
            return bool(idx.resolved(s, lk.path) & idx.resolved(t, lk.path))
        if lk.via == "encounter":
            enc_t = set().union(*(idx.resolved(t, p) for p in _ENCOUNTER_PATHS))
            if s.type == "Encounter":
                return s.ref in enc_t
            enc_s = set().union(*(idx.resolved(s, p) for p in _ENCOUNTER_PATHS))
            return bool(enc_s & enc_t)
        if lk.via == "shared-identifier":
            return bool(s.identifiers & t.identifiers)
        return False


@lru_cache(maxsize=1)
def _note_settings() -> dict[str, frozenset[str]]:
    """Note class -> the Encounter classes that kind of note is written in (package data)."""
    data = load_mapping(NOTE_SETTINGS, "note settings table")
    return {str(k): frozenset(map(str, v or ())) for k, v in data.items()}


@lru_cache(maxsize=256)
def _settings(classes: frozenset[str]) -> frozenset[str]:
    """The Encounter classes a resource of these classes belongs to (empty: unknown)."""
    table = _note_settings()
    out = {c for c in classes if c.startswith("encounter:")}
    for c in classes:
        out |= table.get(c, frozenset())
    return frozenset(out)


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
    # an extension or identifier may carry the StudyInstanceUID of the report's study
    for ext in res.get("extension") or []:
        if isinstance(ext, Mapping) and "studyinstanceuid" in str(ext.get("url", "")).lower():
            v = ext.get("valueString") or ext.get("valueOid") or ext.get("valueId")
            if isinstance(v, str) and (uid := uids.plain_uid(v)):
                out.add("uid|" + uid)
    return out


_STATE_ORDER = {R.ACCESS_DENIED: 0, R.NOT_FOUND_AT_SOURCE: 1, R.RETRIEVAL_FAILED: 2, R.PENDING: 3,
                R.IMAGES_NOT_RETRIEVED: 4, R.SUMMARY_ONLY: 5}


def evaluate(checklist: Checklist, record: NormalizedRecord, ledger: Iterable[LedgerEntry], case: CaseInfo,
             sources: Sequence[SourceInfo]) -> dict[str, Any]:
    """The gap report of ``record`` against ``checklist`` (valid against gap-report.schema.json).

    ``ledger`` is read once and only its failed rows are kept, so a caller may pass a stream of
    a large case's rows instead of a list.
    """
    items = list(checklist.items)
    if not any(i.rule == "identity" for i in items):
        items.insert(0, Item(id="identity", title="One patient, identity confirmed", rule="identity"))
    ev = Evaluator(record, ledger, case, sources, items)
    results = [ev.evaluate(i) for i in items]
    applicable = [r for r in results if r.status != "not-applicable"]
    score = sum(r.score for r in applicable) / len(applicable) if applicable else 1.0
    counts: dict[str, Any] = {s: sum(1 for r in results if r.status == s)
                              for s in ("complete", "partial", "missing", "not-applicable")}
    counts["items"] = len(results)
    gaps = [g for r in results for g in r.gaps]
    counts["gaps"] = len(gaps)
    by_reason: dict[str, int] = {}
    for g in gaps:
        by_reason[g.reason] = by_reason.get(g.reason, 0) + 1
    counts["by_reason"] = dict(sorted(by_reason.items()))
    return {
        "schema": REPORT_SCHEMA,
        "case": case.id,
        "checklist": checklist.name,
        "checklist_title": checklist.title,
        "case_date": case.case_date,
        "reference_date": ev.reference_date.isoformat() if ev.reference_date else None,
        "reference_date_basis": ev.reference_basis,
        "patient": record.patient_ref,
        "score": round(score, 4),
        "complete": not gaps,
        "counts": counts,
        "items": [r.to_dict() for r in results],
        "sources": [
            {"id": s.id, "label": s.label, "kind": s.kind, "organization": s.organization,
             "pulled_at": s.pulled_at, "problems": ev.ledger.problems(s.id),
             "skipped": ev.ledger.skipped_items(s.id)}
            for s in ev.sources
        ],
        "record": {
            "resources": ev.index.count,
            "documents": len(record.documents),
            "images": len(record.images),
            # DICOM instances kept (and shipped) without pixel data (waveforms aside): not images
            "instances_without_pixels": sum(1 for i in record.images if uids.shows_nothing(i.sop_class_uid, i.pixels)),
            "quarantined": len(record.quarantine),
            "unresolved_references": len(record.unresolved),
            "identity_conflicts": len(record.conflicts),
        },
    }
