"""The human entry points of a package: ``summary.html``, ``INDEX.HTM`` and ``README.TXT``.

The consultant opens these first, possibly on a hospital workstation with no network and no
JavaScript, so every page is one self-contained HTML file: inline CSS, inline SVG charts and PNG
thumbnails, no scripts, no external assets, links only to files inside the package. The pages
come from Jinja2 templates with autoescaping (``pages/templates``): a value from the record is
always text, never markup; links are made only to package paths we wrote ourselves.

The summary reads in a physician's order: the case and the checklist status, a one-screen
overview (active problems, current medications, allergies, key dates), then every section in
full - pathology and radiology reports with their whole text, each study with a thumbnail per
series, every lab value grouped by panel with its trend. "Not received" is never worded as a
clinical finding. Only the identifiers a consultant needs (MRNs with their issuer) are shown.
The page is a pure function of its inputs: byte-identical for the same record.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from aggregator import __version__
from aggregator.blobs import BlobStore
from aggregator.checklist import stream
from aggregator.model import CaseInfo, DocumentFile, NormalizedRecord, SourceInfo
from aggregator.normalize import uids
from aggregator.normalize.identity import representation
from aggregator.package.dicomdir import PlacedImage
from aggregator.package.document import SECTION_TYPES, patient_entry, section_of
from aggregator.package.manifest import TOOL_NAME
from aggregator.package.pages.charts import trend_svg
from aggregator.package.pages.fmt import fmt_date, parse_when
from aggregator.package.pages.labs import SOCIAL, VITALS, Series, SeriesBook, Value, value_of
from aggregator.package.pages.thumbnails import Thumbnail, render_series

MAX_INLINE_TEXT = 2 << 20

# --- small readers over FHIR JSON -----------------------------------------------------------


def cc_text(concept: Any) -> str:
    """Display text of a CodeableConcept (text, else first display, else first code)."""
    if not isinstance(concept, Mapping):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for c in concept.get("coding") or []:
        if isinstance(c, Mapping) and c.get("display"):
            return str(c["display"])
    for c in concept.get("coding") or []:
        if isinstance(c, Mapping) and c.get("code"):
            return str(c["code"])
    return ""


def _codes(concept: Any) -> set[str]:
    if not isinstance(concept, Mapping):
        return set()
    return {str(c.get("code")) for c in concept.get("coding") or [] if isinstance(c, Mapping) and c.get("code")}


def _first(res: Mapping[str, Any], *paths: str) -> Any:
    for path in paths:
        node: Any = res
        for part in path.split("."):
            if isinstance(node, list):
                node = node[0] if node else None
            node = node.get(part) if isinstance(node, Mapping) else None
        if node not in (None, "", [], {}):
            return node
    return None


def res_date(res: Mapping[str, Any]) -> str:
    value = _first(res, "effectiveDateTime", "effectivePeriod.start", "issued", "performedDateTime",
                   "performedPeriod.start", "onsetDateTime", "recordedDate", "authoredOn", "dateAsserted",
                   "started", "date", "context.period.start", "content.attachment.creation", "occurrenceDateTime")
    return str(value) if value else ""


def quantity_text(res: Mapping[str, Any]) -> tuple[str, str]:
    """(value, readable unit) of an Observation's value[x]; components joined."""
    text, _, unit = value_of(res)
    if not text and res.get("component"):
        parts = []
        for comp in res["component"]:
            if isinstance(comp, Mapping):
                v, _, u = value_of(comp)
                parts.append(f"{cc_text(comp.get('code'))}: {v} {u}".strip())
        return "; ".join(parts), ""
    return text, unit


#: resource types the summary looks up by reference besides the ones its sections show
_LOOKED_UP = frozenset({"Medication", "Observation", "ImagingStudy"})
_BY_REF_TYPES = SECTION_TYPES | _LOOKED_UP
#: identifier types a consultant does not need (minimum necessary): SSN, driver's licence, passport...
_HIDDEN_ID_TYPES = frozenset({"SS", "SB", "DL", "PPN", "TAX", "PEN", "MC", "MA", "BA", "DR", "CZ", "NI"})
_HIDDEN_ID_WORDS = ("ssn", "social", "driver", "licen", "passport", "us-ssn", "2.16.840.1.113883.4.1")
#: SNOMED CT codes of a recorded "no known allergy" (a finding, unlike an empty section)
_NO_KNOWN_ALLERGY = frozenset({"716186003", "409137002", "428607008", "429625007", "428197003"})
#: gap reasons as the status a navigator reads
REASON_TEXT = {
    "not-found": "missing", "not-found-at-source": "not available at the source", "access-denied":
    "not available (access denied)", "retrieval-failed": "not available (retrieval failed)",
    "pending": "requested, not yet received", "summary-only": "summary only; the full report is missing",
    "images-not-retrieved": "images not retrieved", "identity-conflict": "identity conflict",
    "outdated": "outdated", "several-patients": "records of several patients",
    "identity-unverified": "identity not verified",
}


def _ref_key(ref: Any) -> str | None:
    if isinstance(ref, Mapping):
        ref = ref.get("reference")
    return str(ref) if ref else None


def _day(value: Any) -> str:
    return parse_when(value)[0]


@dataclass
class Row:
    """One dated row of a section (values already as text; the template escapes them)."""

    when: str
    cells: dict[str, Any]
    order: int = 0


@dataclass
class SeriesView:
    uid: str
    number: str
    description: str
    modality: str
    instances: int
    folder: str
    thumbnail: Thumbnail | None


@dataclass
class StudyView:
    uid: str
    anchor: str
    when: str
    description: str
    modalities: str
    declared_series: str
    declared_instances: str
    folder: str
    series: list[SeriesView] = field(default_factory=list)
    described: bool = True
    no_pixels: str = ""
    """A warning when files of the study carry no Pixel Data (see :func:`_no_pixels`)."""


class _Index:
    """What the summary shows, gathered while the record streams past.

    Why not the resources themselves: a large record holds tens of thousands of Observations,
    medications and conditions. Each section keeps only what it prints; lab values are kept as
    small series; the few report cards are kept whole (their text is printed in full); references
    from cards and medications are looked up in one more pass keeping only what they name.
    """

    def __init__(self, record: NormalizedRecord, blobs: BlobStore) -> None:
        self.record = record
        self.blobs = blobs
        self.docs = {d.path: d for d in record.documents}
        self.docs_by_ref: dict[str, list[DocumentFile]] = {}
        for d in record.documents:
            self.docs_by_ref.setdefault(d.resource_ref, []).append(d)
        self.problems: list[Row] = []
        self.procedures: list[Row] = []
        self.pathology: list[dict[str, Any]] = []
        self.radiology: list[dict[str, Any]] = []
        self.studies: list[dict[str, Any]] = []
        self.book = SeriesBook()
        self.medications: list[Row] = []
        self.med_refs: list[tuple[Row, str | None]] = []
        self.allergies: list[Row] = []
        self.no_known_allergy: list[Row] = []
        self.notes: list[Row] = []
        self.lookups: dict[str, dict[str, Any] | None] = {}
        n = 0
        for entry, _ in stream.entries(record):
            res = entry.get("resource") or {}
            key = section_of(res)
            if key:
                n += 1
                self._add(key, res, entry, n)
        self.book.finish()
        if self.lookups:
            self._look_up()
        for row, ref in self.med_refs:
            if not row.cells["medication"] and (m := self.get(ref)):
                row.cells["medication"] = cc_text(m.get("code"))
            row.cells["medication"] = row.cells["medication"] or row.cells.pop("fallback", "") or "(not named)"

    def _want(self, ref: Any) -> None:
        key = _ref_key(ref)
        if key:
            self.lookups[key] = None

    def _add(self, key: str, res: dict[str, Any], entry: Mapping[str, Any], n: int) -> None:
        rtype = res.get("resourceType")
        when = res_date(res)
        if key == "problems":
            onset = _first(res, "onsetDateTime", "onsetPeriod.start", "onsetString")
            self.problems.append(Row(when, {
                "name": cc_text(res.get("code")), "status": cc_text(res.get("clinicalStatus")),
                "active": bool(_codes(res.get("clinicalStatus")) & {"active", "recurrence", "relapse"})
                or not res.get("clinicalStatus"),
                "verification": cc_text(res.get("verificationStatus")),
                "onset": fmt_date(onset) if onset else "", "onset_raw": str(onset or ""),
                "recorded": fmt_date(res.get("recordedDate"))}, n))
        elif key == "procedures":
            self.procedures.append(Row(when, {"name": cc_text(res.get("code")), "status": res.get("status") or "",
                                              "date": fmt_date(when), "body_site": "; ".join(
                                                  cc_text(b) for b in res.get("bodySite") or [])}, n))
        elif key == "pathology" or (key == "imaging" and rtype != "ImagingStudy"):
            (self.pathology if key == "pathology" else self.radiology).append(res)
            for ref in [*(res.get("result") or []), *(res.get("imagingStudy") or []), *(res.get("specimen") or [])]:
                self._want(ref)
        elif key == "imaging":
            self.studies.append(res)
        elif key == "results" and rtype == "Observation":
            refs = [str(entry["fullUrl"])] if entry.get("fullUrl") else []
            if res.get("id"):
                refs.append(f"Observation/{res['id']}")
            self.book.add(res, refs)
        elif key == "results" and rtype == "DiagnosticReport":
            refs = [k for r in res.get("result") or [] if (k := _ref_key(r))]
            self.book.add_panel(res, refs)
        elif key == "medications":
            med = cc_text(res.get("medicationCodeableConcept"))
            if not med:
                self._want(res.get("medicationReference"))
            dosage = "; ".join(str(d.get("text")) for d in (res.get("dosageInstruction") or res.get("dosage") or [])
                               if isinstance(d, Mapping) and d.get("text"))
            status = str(res.get("status") or "")
            row = Row(when, {"medication": med, "fallback": str((res.get("medicationReference") or {}).get(
                "display") or ""), "status": status, "date": fmt_date(when), "dosage": dosage,
                "kind": {"MedicationRequest": "prescribed", "MedicationStatement": "reported",
                         "MedicationAdministration": "administered", "MedicationDispense": "dispensed"}.get(
                    str(rtype), str(rtype)),
                "current": status in ("active", "intended", "on-hold", "in-progress")}, n)
            self.medications.append(row)
            self.med_refs.append((row, _ref_key(res.get("medicationReference"))))
        elif key == "allergies":
            reactions = "; ".join(cc_text(m) for r in res.get("reaction") or [] if isinstance(r, Mapping)
                                  for m in r.get("manifestation") or [])
            row = Row(when, {"substance": cc_text(res.get("code")), "status": cc_text(res.get("clinicalStatus")),
                             "verification": cc_text(res.get("verificationStatus")),
                             "criticality": res.get("criticality") or "", "reactions": reactions,
                             "recorded": fmt_date(when)}, n)
            if _codes(res.get("code")) & _NO_KNOWN_ALLERGY:
                self.no_known_allergy.append(row)
            else:
                self.allergies.append(row)
        elif key == "notes":
            title = cc_text(res.get("type")) or cc_text(res.get("code")) or res.get("description") or ""
            texts = [t for att in _attachments(res) if (t := self.attachment_text(att)) is not None]
            self.notes.append(Row(when, {"date": fmt_date(when), "title": title, "kind": str(rtype),
                                         "author": "; ".join(str(a.get("display")) for a in res.get("author") or []
                                                             if isinstance(a, Mapping) and a.get("display")),
                                         "links": self.doc_links(res), "texts": texts}, n))

    def _look_up(self) -> None:
        """Fill :attr:`lookups` in one more pass, keeping only the resources referenced."""
        for entry, _ in stream.entries(self.record):
            res = entry.get("resource") or {}
            rtype = res.get("resourceType")
            if rtype not in _BY_REF_TYPES and rtype != "Specimen":
                continue
            keys = [str(entry["fullUrl"])] if entry.get("fullUrl") else []
            if rtype and res.get("id"):
                keys.append(f"{rtype}/{res['id']}")
            for key in keys:
                if key in self.lookups:
                    self.lookups[key] = res

    def get(self, ref: Any) -> dict[str, Any] | None:
        key = _ref_key(ref)
        return self.lookups.get(key) if key else None

    def attachment_text(self, att: Mapping[str, Any]) -> str | None:
        """Full text of a text attachment (inline data or a package document), else None."""
        ctype = str(att.get("contentType") or "").split(";")[0].strip().lower()
        if ctype and ctype != "text/plain":
            return None  # PDFs, C-CDA and images are linked, not inlined
        raw: bytes | None = None
        if att.get("data"):
            try:
                raw = base64.b64decode(str(att["data"]), validate=False)
            except (binascii.Error, ValueError):
                return None
        elif (doc := self.docs.get(str(att.get("url") or ""))) and doc.content_type.startswith("text/plain"):
            if doc.size <= MAX_INLINE_TEXT and self.blobs.exists(doc.sha256):
                raw = self.blobs.read_bytes(doc.sha256)
        if raw is None or len(raw) > MAX_INLINE_TEXT:
            return None
        return raw.decode("utf-8", "replace")

    def doc_links(self, res: Mapping[str, Any]) -> list[DocumentFile]:
        out = []
        for att in _attachments(res):
            if (doc := self.docs.get(str(att.get("url") or ""))) and doc not in out:
                out.append(doc)
        ref = f"{res.get('resourceType')}/{res.get('id')}"
        out += [d for d in self.docs_by_ref.get(ref, ()) if d not in out]
        return out


def _attachments(res: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    atts = list(res.get("presentedForm") or [])
    atts += [c.get("attachment") for c in res.get("content") or [] if isinstance(c, Mapping)]
    return [a for a in atts if isinstance(a, Mapping)]


def _newest_first(rows: list[Row]) -> list[Row]:
    """Rows by date, newest first; rows of equal dates keep their bundle order."""
    return sorted(rows, key=lambda r: (_neg(parse_when(r.when)), r.order))


def _neg(key: tuple[str, str]) -> tuple[int, ...]:
    """A sort key that orders (day, time) newest first while staying a plain ascending sort."""
    text = (key[0] + "T" + key[1]) if key[0] else ""
    return tuple(-ord(c) for c in text.ljust(16, "\0"))


# --- views ----------------------------------------------------------------------------------


def _study_uid(study: Mapping[str, Any]) -> str:
    return uids.study_uid(study)


def _no_pixels(items: Sequence[PlacedImage]) -> str:
    """A warning when files of a study carry no Pixel Data: the consultant must not expect to see
    them in a viewer (a stripped copy, a structured report, a presentation state)."""
    n = sum(1 for p in items if uids.shows_nothing(p.image.sop_class_uid, p.image.pixels))
    if not n:
        return ""
    what = "none is an image" if n == len(items) else f"{n} of them not images"
    return f"{n} without pixel data: {what}"


def placed_folder(items: Sequence[PlacedImage]) -> str:
    return items[0].relpath.rsplit("/", 2)[0] if items else ""


def _series_views(items: Sequence[PlacedImage], blobs: BlobStore) -> list[SeriesView]:
    by_series: dict[str, list[PlacedImage]] = {}
    for p in items:
        by_series.setdefault(p.image.series_instance_uid, []).append(p)
    out = []
    for uid, group in by_series.items():
        head = group[0].header
        paths = []
        for p in group:
            try:
                number = int(p.header.get("InstanceNumber", 0) or 0)
            except (TypeError, ValueError):
                number = 0
            paths.append((number, p.image.sop_instance_uid, blobs.path(p.image.sha256)))
        out.append(SeriesView(uid, str(head.get("SeriesNumber", "") or ""),
                              str(head.get("SeriesDescription", "") or ""),
                              group[0].image.modality or str(head.get("Modality", "") or ""), len(group),
                              group[0].relpath.rsplit("/", 1)[0], render_series(paths)))
    return sorted(out, key=lambda s: (_int(s.number), s.uid))


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 1 << 30


def _studies(idx: _Index, placed: Sequence[PlacedImage], blobs: BlobStore) -> list[StudyView]:
    images_by_study: dict[str, list[PlacedImage]] = {}
    for p in placed:
        images_by_study.setdefault(p.image.study_instance_uid, []).append(p)
    views: list[StudyView] = []
    seen: set[str] = set()
    for s in idx.studies:
        uid = _study_uid(s)
        items = images_by_study.get(uid, [])
        modalities = sorted({cc_text(m) or str(m.get("code", "")) for se in s.get("series") or []
                             if isinstance(se, Mapping) and isinstance((m := se.get("modality")), Mapping)})
        modalities = modalities or sorted({p.image.modality for p in items if p.image.modality})
        views.append(StudyView(uid, f"study-{len(views) + 1}", res_date(s), str(s.get("description") or ""),
                               ", ".join(modalities), str(s.get("numberOfSeries", len(s.get("series") or []))),
                               str(s.get("numberOfInstances", "")), placed_folder(items),
                               _series_views(items, blobs) if uid not in seen else []))
        seen.add(uid)
    for uid, items in sorted(images_by_study.items()):
        if uid not in seen:
            head = items[0].header
            views.append(StudyView(uid, f"study-{len(views) + 1}", str(head.get("StudyDate", "") or ""),
                                   str(head.get("StudyDescription", "") or ""),
                                   ", ".join(sorted({p.image.modality for p in items if p.image.modality})), "", "",
                                   placed_folder(items), _series_views(items, blobs), described=False))
    for v in views:
        v.no_pixels = _no_pixels(images_by_study.get(v.uid, []))
        if not v.described and len(v.when) == 8 and v.when.isdigit():
            v.when = f"{v.when[:4]}-{v.when[4:6]}-{v.when[6:]}"
    return sorted(views, key=lambda v: (_neg(parse_when(v.when)), v.anchor))


def _report(idx: _Index, res: Mapping[str, Any], studies_by_uid: Mapping[str, StudyView]) -> dict[str, Any]:
    title = cc_text(res.get("code")) or cc_text(res.get("type")) or res.get("description") or res.get("resourceType")
    results = []
    for result in res.get("result") or []:
        obs = idx.get(result)
        if obs:
            v, u = quantity_text(obs)
            results.append(f"{cc_text(obs.get('code'))}: {v} {u}".strip())
    texts = [t for att in _attachments(res) if (t := idx.attachment_text(att)) is not None]
    specimens = []
    for ref in res.get("specimen") or []:
        sp = idx.get(ref)
        label = (cc_text(sp.get("type")) if sp else "") or (ref.get("display") if isinstance(ref, Mapping) else "")
        if sp:
            site = cc_text(_first(sp, "collection.bodySite"))
            method = cc_text(_first(sp, "collection.method"))
            collected = _first(sp, "collection.collectedDateTime", "collection.collectedPeriod.start")
            extra = ", ".join(x for x in (site, method, f"collected {fmt_date(collected)}" if collected else "") if x)
            label = f"{label} ({extra})" if extra else label
        if label:
            specimens.append(label)
    studies = []
    for ref in res.get("imagingStudy") or []:
        study = idx.get(ref)
        if study and (view := studies_by_uid.get(_study_uid(study))):
            studies.append(view)
    return {"title": title, "date": fmt_date(res_date(res)), "status": res.get("status") or "",
            "conclusion": res.get("conclusion") or "", "results": results, "texts": texts,
            "specimens": specimens, "studies": studies, "links": idx.doc_links(res),
            "performer": "; ".join(str(p.get("display")) for p in res.get("performer") or []
                                   if isinstance(p, Mapping) and p.get("display")),
            "ref": f"{res.get('resourceType')}/{res.get('id')}"}


def _identifiers(res: Mapping[str, Any]) -> list[dict[str, str]]:
    """The MRNs (and other record numbers a consultant may quote), each with its issuer.

    Minimum necessary: Social Security, driver's licence, passport and insurance numbers are
    never shown (they stay in the FHIR bundle, which is the full record)."""
    out = []
    for ident in res.get("identifier") or []:
        if not isinstance(ident, Mapping) or not ident.get("value"):
            continue
        codes = {c.upper() for c in _codes(ident.get("type"))}
        words = f"{ident.get('system') or ''} {cc_text(ident.get('type'))}".lower()
        if codes & _HIDDEN_ID_TYPES or any(w in words for w in _HIDDEN_ID_WORDS):
            continue
        if codes and "MR" not in codes:
            continue
        issuer = str(_first(ident, "assigner.display") or ident.get("system") or "issuer not stated")
        out.append({"value": str(ident["value"]), "issuer": issuer,
                    "kind": "MRN" if "MR" in codes else (cc_text(ident.get("type")) or "Record number")})
    return out


#: how the Patient row labels a name's EN-representation (the alphabetic one needs no label)
_SPELLING = {"IDE": "ideographic", "SYL": "phonetic"}


def _patient(record: NormalizedRecord, case: CaseInfo) -> dict[str, Any]:
    res = (patient_entry(record) or {}).get("resource") or {}
    names = []
    for n in res.get("name") or []:
        if isinstance(n, Mapping):
            text = n.get("text") or " ".join([*(n.get("given") or []), str(n.get("family") or "")]).strip()
            spelled = _SPELLING.get(representation(n))  # a DICOM name's ideographic/phonetic group
            text = f"{text} ({spelled})" if text and spelled else text
            if text and text not in names:
                names.append(str(text))
    birth = res.get("birthDate") or case.birth_date or ""
    return {"name": "; ".join(names) or case.patient_name or "", "birth": fmt_date(birth) if birth else "",
            "sex": res.get("gender") or "", "identifiers": _identifiers(res),
            "deceased": fmt_date(res["deceasedDateTime"]) if res.get("deceasedDateTime") else ""}


def _gaps(gap_report: Mapping[str, Any]) -> dict[str, Any]:
    from aggregator.records_requests.annotate import phrase as request_phrase

    items = []
    for item in gap_report.get("items") or []:
        if not isinstance(item, Mapping):
            continue
        gaps = [{"reason": str(g.get("reason") or ""),
                 "status": REASON_TEXT.get(str(g.get("reason") or ""), str(g.get("reason") or "")),
                 "detail": g.get("detail") or "", "next": g.get("next_action") or "", "source": g.get("source") or "",
                 # "not yet arrived, due on 12 Jan 2027" vs "never asked for" (reports without requests: "")
                 "request": request_phrase(g["request"]) if "request" in g else ""}
                for g in item.get("gaps") or [] if isinstance(g, Mapping)]
        items.append({"title": item.get("title") or item.get("id") or "", "status": str(item.get("status") or ""),
                      "detail": item.get("detail") or "", "gaps": gaps})
    score = gap_report.get("score")
    return {"title": gap_report.get("checklist_title") or gap_report.get("checklist") or "",
            "score": round(100 * float(score)) if isinstance(score, (int, float)) else None,
            "complete": gap_report.get("complete"), "rows": items,
            "open": [i for i in items if i["status"] in ("missing", "partial")],
            "counts": gap_report.get("counts") or {}}


def _key_dates(idx: _Index, pathology: list[dict[str, Any]], studies: list[StudyView]) -> list[dict[str, str]]:
    """Diagnosis, biopsy, imaging and treatment dates, oldest first: the case's timeline at a glance."""
    rows: list[tuple[str, str, str]] = []
    for p in idx.problems:
        if p.cells["active"] and p.cells["onset_raw"]:
            rows.append((p.cells["onset_raw"], "Diagnosis", p.cells["name"]))
    for r in idx.pathology:
        rows.append((res_date(r), "Pathology", cc_text(r.get("code")) or cc_text(r.get("type")) or "report"))
    for proc in idx.procedures:
        name = proc.cells["name"]
        rows.append((proc.when, "Biopsy" if "biops" in name.lower() else "Procedure", name))
    for s in studies:
        desc = s.description if s.description.upper().startswith(s.modalities.upper()) else " ".join(
            x for x in (s.modalities, s.description) if x)
        rows.append((s.when, "Imaging", desc or "study"))
    for m in idx.medications:
        if m.cells["current"]:
            rows.append((m.when, "Treatment started", m.cells["medication"]))
    rows = [r for r in rows if _day(r[0])]
    rows.sort(key=lambda r: (parse_when(r[0]), r[1], r[2]))
    return [{"date": fmt_date(w), "kind": k, "what": t} for w, k, t in rows]


@dataclass
class LabGroup:
    title: str
    series: list[SeriesRow]


def _lab_groups(book: SeriesBook, category: str) -> list[LabGroup]:
    out = []
    for title, group in book.groups(category):
        out.append(LabGroup(title, [_series_view(s) for s in group]))
    return out


@dataclass
class SeriesRow:
    """One test as its table row shows it: latest value, range, chart, and every value newest first."""

    title: str
    unit: str
    range: str
    latest: Value
    history: list[Value]
    chart: Markup | None

    @property
    def count(self) -> int:
        return len(self.history)


def _series_view(s: Series) -> SeriesRow:
    ordered = s.ordered()
    chart = trend_svg(s)
    # the chart is built from numbers, and the record's text in it is escaped (charts.py)
    return SeriesRow(s.title, s.unit, s.range_text, ordered[-1], list(reversed(ordered)),
                     Markup(chart) if chart else None)  # noqa: S704


def _merge_copies(notes: list[Row]) -> list[Row]:
    """One card per document: a note recorded twice (Synthea writes each note as a DocumentReference
    and as a DiagnosticReport with the same text) is printed once, its card naming both records.

    Only identical texts and document files merge, so nothing that differs is hidden."""
    out: list[Row] = []
    seen: dict[tuple[Any, ...], Row] = {}
    for row in notes:
        texts = tuple(row.cells["texts"])
        key = (texts, tuple(d.path for d in row.cells["links"]), row.cells["title"], _day(row.when))
        if texts and key in seen:
            first = seen[key]
            if row.cells["kind"] not in first.cells["kind"].split(" and "):
                first.cells["kind"] += f" and {row.cells['kind']}"
            first.cells["author"] = first.cells["author"] or row.cells["author"]
            continue
        seen[key] = row
        out.append(row)
    return out


def _css_string(text: str) -> str:
    """A CSS string literal's content (for the print header): quotes, backslashes and '<' escaped."""
    out = []
    for ch in text:
        if ch in '"\\<>' or ord(ch) < 32:
            out.append(f"\\{ord(ch):x} ")
        else:
            out.append(ch)
    return "".join(out)


@cache
def _env() -> Environment:
    env = Environment(loader=PackageLoader("aggregator.package.pages", "templates"),
                      autoescape=select_autoescape(enabled_extensions=("html", "j2", "htm"), default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["date"] = fmt_date
    return env


def render_summary(case: CaseInfo, record: NormalizedRecord, gap_report: Mapping[str, Any],
                   sources: Sequence[SourceInfo], placed: Sequence[PlacedImage], blobs: BlobStore,
                   timestamp: str) -> str:
    """summary.html: the consultant's clinical summary, one self-contained page."""
    idx = _Index(record, blobs)
    studies = _studies(idx, placed, blobs)
    by_uid = {s.uid: s for s in studies if s.uid}
    by_date = lambda r: (_neg(parse_when(res_date(r))), str(r.get("id") or ""))  # noqa: E731
    pathology = [_report(idx, r, by_uid) for r in sorted(idx.pathology, key=by_date)]
    radiology = [_report(idx, r, by_uid) for r in sorted(idx.radiology, key=by_date)]
    patient = _patient(record, case)
    quarantined: dict[int, int] = {}
    for q in record.quarantine:
        quarantined[q.source_id] = quarantined.get(q.source_id, 0) + 1
    problems = _newest_first(idx.problems)
    meds = _newest_first(idx.medications)
    header = " · ".join(x for x in (patient["name"], f"born {patient['birth']}" if patient["birth"] else "",
                                    f"case {case.id}") if x)
    context = {
        "case": case, "tool": TOOL_NAME, "version": __version__, "assembled": fmt_date(timestamp),
        "patient": patient, "gaps": _gaps(gap_report),
        "print_header": Markup(_css_string(header)),  # noqa: S704 - CSS-escaped above
        "active_problems": [p for p in problems if p.cells["active"]], "problems": problems,
        "current_meds": [m for m in meds if m.cells["current"]], "medications": meds,
        "allergies": idx.allergies, "no_known_allergy": idx.no_known_allergy,
        "key_dates": _key_dates(idx, pathology, studies),
        "pathology": pathology, "radiology": radiology, "studies": studies, "n_images": len(placed),
        "labs": _lab_groups(idx.book, "laboratory"), "vitals": _lab_groups(idx.book, VITALS),
        "social": _lab_groups(idx.book, SOCIAL), "procedures": _newest_first(idx.procedures),
        "notes": _merge_copies(_newest_first(idx.notes)),
        "sources": [{"s": s, "left_out": quarantined.get(s.id, 0), "pulled": fmt_date(s.pulled_at or "")}
                    for s in sorted(sources, key=lambda s: s.id)],
        "quarantine": record.quarantine, "unresolved": len(record.unresolved),
        "provenance": record.count("Provenance"),
    }
    return _env().get_template("summary.html.j2").render(context)


def render_index(case: CaseInfo, documents: Sequence[DocumentFile], n_images: int) -> str:
    """INDEX.HTM: the IHE PDI entry page, pointing at everything in the package."""
    return _env().get_template("index.html.j2").render(case=case, documents=documents, n_images=n_images)


def render_readme(case: CaseInfo, n_documents: int, n_images: int, timestamp: str) -> str:
    """README.TXT: plain ASCII, for a recipient with nothing but a text viewer."""
    text = f"""SECOND-OPINION PACKAGE
======================

Case: {case.id}
Assembled: {timestamp} by {TOOL_NAME} {__version__}

This package contains a patient's medical record gathered for a second opinion.
It contains protected health information: store and share it accordingly.

Start with INDEX.HTM or summary.html in any web browser (no network needed).

Contents
  summary.html                   clinical summary: problems, pathology, imaging, labs,
                                 medications, allergies, notes, gaps, sources
  fhir/bundle.json               the full record, FHIR R4 document Bundle
  fhir/gap-report.json           checklist result: what is missing and why
  documents/                     {n_documents} original document(s), unchanged
  DICOMDIR, DICOM/               {n_images} DICOM image file(s), unchanged (IHE PDI layout)
  IHE_XDM/SUBSET01/METADATA.XML  IHE XDM metadata for the documents
  manifest.json                  size and SHA-256 of every other file

Checking the package
  aggregator verify PACKAGE      (with the aggregator tool), or compare each file's
  SHA-256 with manifest.json (e.g. sha256sum FILE).
"""
    return text.encode("ascii", "replace").decode("ascii").replace("\n", "\r\n")
