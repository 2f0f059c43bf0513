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

The rules live here; what they read is apart, one concern a module: :mod:`.needs` (which
resources and facts the checklist's rules can read), :mod:`.index` (the record streamed once into
those facts, references resolved) and :mod:`.content` (whether a candidate carries the document
or images themselves).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from typing import Any

from aggregator.checklist import reasons as R
from aggregator.checklist.content import PENDING_STATUS, Content, State
from aggregator.checklist.index import RecordIndex, Res, parse_date, study_label
from aggregator.checklist.loader import Checklist, Item, Link, Selector
from aggregator.checklist.needs import ENCOUNTER_PATHS, Needs
from aggregator.ledger import LedgerEntry
from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.normalize import uids
from aggregator.tables import load_mapping

REPORT_SCHEMA = "gap-report/1"
FINAL = frozenset({"final", "amended", "corrected", "appended", "current", "completed"})
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
        if any(lk.via == "shared-identifier" for lk in item.links):
            self._same_accession(explicit, claimed, targets)
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
        return any(refs.get(p) for p in ENCOUNTER_PATHS)

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

    @staticmethod
    def _same_accession(explicit: dict[str, set[str]], claimed: dict[str, set[str]], targets: list[Res]) -> None:
        """A subject that names a report is also linked to the other copies of that report: the
        targets with its accession number. The hospital's FHIR server may hold only a summary
        whose full text arrives later by another route (an HL7 v2 message, a records request);
        a procedure naming the summary is then covered by the full report of the same accession."""
        by_acsn: dict[str, set[str]] = {}
        for t in targets:
            for ident in t.identifiers:
                if ident.startswith("acsn|"):
                    by_acsn.setdefault(ident, set()).add(t.ref)
        if not by_acsn:
            return
        acsn_of = {t.ref: [i for i in t.identifiers if i in by_acsn] for t in targets}
        for sref, refs in explicit.items():
            extra = {other for r in refs for i in acsn_of.get(r, ()) for other in by_acsn[i]} - refs
            refs |= extra
            for other in extra:
                claimed.setdefault(other, set()).add(sref)

    def explicit(self, lk: Link, s: Res, t: Res) -> bool:
        idx = self.index
        if lk.via == "reference":
            holder, other = (t, s) if lk.from_ == "target" else (s, t)
            return other.ref in idx.resolved(holder, lk.path)
        if lk.via == "shared-reference":
            return bool(idx.resolved(s, lk.path) & idx.resolved(t, lk.path))
        if lk.via == "encounter":
            enc_t = set().union(*(idx.resolved(t, p) for p in ENCOUNTER_PATHS))
            if s.type == "Encounter":
                return s.ref in enc_t
            enc_s = set().union(*(idx.resolved(s, p) for p in ENCOUNTER_PATHS))
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
