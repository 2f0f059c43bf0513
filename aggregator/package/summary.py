"""The human entry points of a package: ``summary.html``, ``INDEX.HTM`` and ``README.TXT``.

The consultant opens these first, possibly on a hospital workstation with no network and no
JavaScript, so every page is one self-contained HTML file: inline CSS, no scripts, no external
assets, links only to files inside the package. Every value from the record is HTML-escaped;
links are made only to package paths we wrote ourselves, never to URLs found in the data.

The summary shows the underlying record, not a digest of it: pathology reports with their full
text, radiology reports next to the studies they describe, the latest value of every lab test,
and the gap report saying what is still missing and why.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any, NamedTuple

from aggregator import __version__
from aggregator.blobs import BlobStore
from aggregator.checklist import stream
from aggregator.model import CaseInfo, DocumentFile, NormalizedRecord, SourceInfo
from aggregator.normalize import uids
from aggregator.normalize.identity import representation
from aggregator.package.dicomdir import PlacedImage
from aggregator.package.document import SECTION_TYPES, patient_entry, section_of
from aggregator.package.manifest import TOOL_NAME

MAX_INLINE_TEXT = 2 << 20
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0 auto;max-width:72rem;
padding:1rem 1.5rem;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #2b5797;padding-bottom:.2rem;margin-top:2rem}
h3{margin-bottom:.3rem}table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}th{background:#eef2f8}
pre{white-space:pre-wrap;background:#f7f7f7;border:1px solid #ddd;padding:.6rem;font-size:.9rem}
.muted{color:#666}.status-complete{color:#1a7f37}.status-partial{color:#9a6700}.status-missing{color:#cf222e}
nav a{margin-right:.8rem}.card{border:1px solid #ddd;border-radius:4px;padding:.6rem .9rem;margin:.6rem 0}
@media print{nav{display:none}}
"""


# --- small readers over FHIR JSON -----------------------------------------------------------


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


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
    """(value, unit) of an Observation's value[x]."""
    q = res.get("valueQuantity")
    if isinstance(q, Mapping):
        comparator = q.get("comparator") or ""
        return f"{comparator}{q.get('value', '')}", str(q.get("unit") or q.get("code") or "")
    for key in ("valueString", "valueBoolean", "valueInteger", "valueDateTime", "valueTime"):
        if key in res:
            return str(res[key]), ""
    if "valueCodeableConcept" in res:
        return cc_text(res["valueCodeableConcept"]), ""
    if isinstance(res.get("valueRange"), Mapping):
        r = res["valueRange"]
        return f"{(r.get('low') or {}).get('value', '')}-{(r.get('high') or {}).get('value', '')}", str(
            (r.get("low") or r.get("high") or {}).get("unit", ""))
    if res.get("component"):
        parts = []
        for comp in res["component"]:
            if isinstance(comp, Mapping):
                v, u = quantity_text(comp)
                parts.append(f"{cc_text(comp.get('code'))}: {v} {u}".strip())
        return "; ".join(parts), ""
    if res.get("dataAbsentReason"):
        return f"(absent: {cc_text(res['dataAbsentReason'])})", ""
    return "", ""


#: resource types the summary looks up by reference besides the ones its sections show
_LOOKED_UP = frozenset({"Medication", "Observation", "ImagingStudy"})
#: resource types a reference from a card or a medication can resolve to (as in a by-reference map
#: of everything a section shows or links to: not claims, encounters...)
_BY_REF_TYPES = SECTION_TYPES | _LOOKED_UP


def _ref_key(ref: Any) -> str | None:
    """The key a Reference (or a plain reference string) is looked up by."""
    if isinstance(ref, Mapping):
        ref = ref.get("reference")
    return str(ref) if ref else None


class _Lab:
    """One lab test (per code) while the record streams: its latest value and how many values."""

    __slots__ = ("count", "date", "latest", "title")

    def __init__(self, res: dict[str, Any]) -> None:
        self.title = cc_text(res.get("code")).lower()
        """Sort key: the code text of the test's first value in the record."""
        self.count = 1
        self.date = res_date(res)
        self.latest = res

    def add(self, res: dict[str, Any]) -> None:
        self.count += 1
        when = res_date(res)
        if when >= self.date:  # a stable sort by date would put the last of equal dates last
            self.date = when
            self.latest = res


class _MedRow(NamedTuple):
    """A medication row before its Medication is looked up (the cells are already escaped)."""

    med: str
    """The medicationCodeableConcept's text; empty: look ``ref`` up."""
    ref: str | None
    fallback: str
    """The medicationReference's display, for a Medication that is not in the record."""
    status: str
    date: str
    dosage: str
    kind: str


class _Index:
    """What the summary shows, gathered while the record streams past, and documents by path.

    Why not the resources themselves: a large record holds tens of thousands of Observations,
    medications and conditions. Each section keeps only what it prints: the rows of its table
    (already escaped), one latest Observation per lab test, the few report cards in full (their
    text is printed whole); references from cards and medications are looked up in one more pass
    that keeps only the resources they name.
    """

    def __init__(self, record: NormalizedRecord, blobs: BlobStore,
                 images_by_study: Mapping[str, list[PlacedImage]]) -> None:
        self.record = record
        self.blobs = blobs
        self.images_by_study = images_by_study
        self.docs = {d.path: d for d in record.documents}
        self.docs_by_ref: dict[str, list[DocumentFile]] = {}
        for d in record.documents:
            self.docs_by_ref.setdefault(d.resource_ref, []).append(d)
        self.problems: list[tuple[str, tuple[str, ...]]] = []
        self.pathology: list[dict[str, Any]] = []
        self.radiology: list[dict[str, Any]] = []
        self.studies: list[tuple[str, str, tuple[str, ...]]] = []
        self.labs: dict[str, _Lab] = {}
        self.medications: list[tuple[str, _MedRow]] = []
        self.allergies: list[tuple[str, ...]] = []
        self.notes: list[tuple[str, tuple[str, ...]]] = []
        self.lookups: dict[str, dict[str, Any] | None] = {}
        """Resources that cards and medication rows reference, by reference key (None: not found)."""
        for entry, _ in stream.entries(record):
            res = entry.get("resource") or {}
            key = section_of(res)
            if key:
                self._add(key, res)
        if self.lookups:
            self._look_up()

    def _want(self, ref: Any) -> None:
        key = _ref_key(ref)
        if key:
            self.lookups[key] = None

    def _add(self, key: str, res: dict[str, Any]) -> None:
        rtype = res.get("resourceType")
        if key == "problems":
            self.problems.append((res_date(res), _problem_row(res)))
        elif key == "pathology" or (key == "imaging" and rtype != "ImagingStudy"):
            (self.pathology if key == "pathology" else self.radiology).append(res)
            for ref in [*(res.get("result") or []), *(res.get("imagingStudy") or [])]:
                self._want(ref)
        elif key == "imaging":
            self.studies.append((res_date(res), _study_uid(res), self._study_row(res)))
        elif key == "results" and rtype == "Observation":
            code = res.get("code") or {}
            codings = code.get("coding") or [{}]
            first = codings[0] if isinstance(codings[0], dict) else {}
            lab = f"{first.get('system', '')}|{first.get('code', '')}" if first.get("code") else cc_text(code)
            if lab in self.labs:
                self.labs[lab].add(res)
            else:
                self.labs[lab] = _Lab(res)
        elif key == "medications":
            med = cc_text(res.get("medicationCodeableConcept"))
            if not med:
                self._want(res.get("medicationReference"))
            dosage = "; ".join(str(d.get("text")) for d in (res.get("dosageInstruction") or res.get("dosage") or [])
                               if isinstance(d, Mapping) and d.get("text"))
            fallback = str((res.get("medicationReference") or {}).get("display") or "")
            self.medications.append((res_date(res), _MedRow(
                med, _ref_key(res.get("medicationReference")), fallback, _e(res.get("status") or ""),
                _e(res_date(res)), _e(dosage), _e(rtype))))
        elif key == "allergies":
            reactions = "; ".join(cc_text(m) for r in res.get("reaction") or [] if isinstance(r, Mapping)
                                  for m in r.get("manifestation") or [])
            self.allergies.append((_e(cc_text(res.get("code"))), _e(cc_text(res.get("clinicalStatus"))),
                                   _e(res.get("criticality") or ""), _e(reactions), _e(res_date(res))))
        elif key == "notes":
            title = cc_text(res.get("type")) or cc_text(res.get("code")) or res.get("description") or ""
            links = "<br>".join(_link(d) for d in self.doc_links(res)) or '<span class="muted">no document file</span>'
            self.notes.append((res_date(res), (_e(res_date(res)), _e(title), _e(rtype), links)))

    def _study_row(self, s: dict[str, Any]) -> tuple[str, ...]:
        uid = _study_uid(s)
        placed = self.images_by_study.get(uid, [])
        n_series = len({p.image.series_instance_uid for p in placed})
        return (_e(res_date(s)), _e(s.get("description") or ""), _e(s.get("numberOfSeries", "")),
                _e(s.get("numberOfInstances", "")), f"{n_series} / {len(placed)}{_no_pixels(placed)}",
                _e(placed_folder(placed)))

    def _look_up(self) -> None:
        """Fill :attr:`lookups` in one more pass, keeping only the resources referenced (the last
        resource under a key wins, as in a map built in bundle order)."""
        for entry, _ in stream.entries(self.record):
            res = entry.get("resource") or {}
            rtype = res.get("resourceType")
            if rtype not in _BY_REF_TYPES:
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
        atts = list(res.get("presentedForm") or [])
        atts += [c.get("attachment") for c in res.get("content") or [] if isinstance(c, Mapping)]
        out = []
        for att in atts:
            if isinstance(att, Mapping) and (doc := self.docs.get(str(att.get("url") or ""))):
                out.append(doc)
        ref = f"{res.get('resourceType')}/{res.get('id')}"
        out += [d for d in self.docs_by_ref.get(ref, ()) if d not in out]
        return out


def _link(doc: DocumentFile, prefix: str = "") -> str:
    label = doc.title or doc.path.rsplit("/", 1)[-1]
    href = escape(prefix + doc.path, quote=True)
    return f'<a href="{href}">{_e(label)}</a> <span class="muted">({_e(doc.content_type)}, {doc.size} bytes)</span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --- sections of summary.html ---------------------------------------------------------------


#: how the Patient row labels a name's EN-representation (the alphabetic one needs no label)
_SPELLING = {"IDE": "ideographic", "SYL": "phonetic"}


def _patient(record: NormalizedRecord, case: CaseInfo) -> str:
    entry = patient_entry(record)
    res = (entry or {}).get("resource") or {}
    names = []
    for n in res.get("name") or []:
        if isinstance(n, Mapping):
            text = n.get("text") or " ".join([*(n.get("given") or []), str(n.get("family") or "")]).strip()
            spelled = _SPELLING.get(representation(n))  # a DICOM name's ideographic/phonetic group
            names.append(f"{text} ({spelled})" if text and spelled else text)
    ids = [f"{_e(i.get('value'))} <span class=\"muted\">{_e(cc_text(i.get('type')) or i.get('system') or '')}</span>"
           for i in res.get("identifier") or [] if isinstance(i, Mapping)]
    rows = [
        ("Name", _e("; ".join(x for x in names if x) or case.patient_name or "(not recorded)")),
        ("Birth date", _e(res.get("birthDate") or case.birth_date or "")),
        ("Sex", _e(res.get("gender") or "")),
        ("Identifiers", "<br>".join(ids)),
        ("Case", _e(case.id) + (f" (case date {_e(case.case_date)})" if case.case_date else "")),
    ]
    return "<h2 id=\"patient\">Patient</h2>" + _table(("", ""), rows, "")


def _problem_row(res: Mapping[str, Any]) -> tuple[str, ...]:
    return (_e(cc_text(res.get("code"))), _e(cc_text(res.get("clinicalStatus"))),
            _e(cc_text(res.get("verificationStatus"))),
            _e(_first(res, "onsetDateTime", "onsetPeriod.start", "onsetString") or ""),
            _e(res.get("recordedDate") or ""))


def _newest_first(rows: list[tuple[str, Any]]) -> list[Any]:
    """Rows by date, newest first; rows of equal dates keep their bundle order (a stable sort)."""
    return [row for _, row in sorted(rows, key=lambda r: r[0], reverse=True)]


def _problems(idx: _Index) -> str:
    rows = _newest_first(idx.problems)
    return "<h2 id=\"problems\">Problem list</h2>" + _table(
        ("Condition", "Clinical status", "Verification", "Onset", "Recorded"), rows, "No conditions in the record.")


def _report_card(idx: _Index, res: Mapping[str, Any], images_by_study: Mapping[str, list[PlacedImage]]) -> str:
    title = cc_text(res.get("code")) or cc_text(res.get("type")) or res.get("description") or res.get("resourceType")
    parts = [f'<div class="card"><h3>{_e(title)}</h3><p class="muted">{_e(res_date(res))} '
             f'· {_e(res.get("status") or "")} · {_e(res.get("resourceType"))}/{_e(res.get("id"))}</p>']
    if res.get("conclusion"):
        parts.append(f"<p><strong>Conclusion:</strong> {_e(res['conclusion'])}</p>")
    for result in res.get("result") or []:
        obs = idx.get(result)
        if obs:
            v, u = quantity_text(obs)
            parts.append(f"<p>{_e(cc_text(obs.get('code')))}: {_e(v)} {_e(u)}</p>")
    atts = list(res.get("presentedForm") or [])
    atts += [c.get("attachment") for c in res.get("content") or [] if isinstance(c, Mapping)]
    for att in atts:
        if isinstance(att, Mapping) and (text := idx.attachment_text(att)) is not None:
            parts.append(f"<pre>{_e(text)}</pre>")
    for study_ref in res.get("imagingStudy") or []:
        study = idx.get(study_ref)
        if study:
            parts.append(f"<p>Study: {_study_line(study, images_by_study)}</p>")
    links = idx.doc_links(res)
    if links:
        parts.append("<p>Original: " + "; ".join(_link(d) for d in links) + "</p>")
    parts.append("</div>")
    return "".join(parts)


def _study_uid(study: Mapping[str, Any]) -> str:
    return uids.study_uid(study)


def _study_line(study: Mapping[str, Any], images_by_study: Mapping[str, list[PlacedImage]]) -> str:
    uid = _study_uid(study)
    placed = images_by_study.get(uid, [])
    modalities = sorted({cc_text(m) or str(m.get("code", "")) for s in study.get("series") or []
                         if isinstance(s, Mapping) and isinstance((m := s.get("modality")), Mapping)})
    desc = study.get("description") or ""
    folder = placed[0].relpath.rsplit("/", 2)[0] if placed else ""
    where = (f"images in <code>{_e(folder)}</code> ({len(placed)} file(s){_no_pixels(placed)})" if placed
             else "no images in this package")
    return (f"{_e(res_date(study))} {_e(desc)} [{_e(', '.join(modalities))}] - "
            f"{_e(study.get('numberOfSeries', len(study.get('series') or [])))} series, "
            f"{_e(study.get('numberOfInstances', ''))} instance(s); {where}")


def _labs(idx: _Index) -> str:
    rows = []
    for key in sorted(idx.labs, key=lambda k: idx.labs[k].title):
        lab = idx.labs[key]
        last = lab.latest
        v, u = quantity_text(last)
        ref = _first(last, "referenceRange.text")
        if not ref and isinstance(rr := _first(last, "referenceRange"), Mapping):
            ref = f"{(rr.get('low') or {}).get('value', '')}-{(rr.get('high') or {}).get('value', '')}"
        rows.append((_e(cc_text(last.get("code"))), _e(v), _e(u), _e(res_date(last)), _e(ref or ""),
                     _e(cc_text(_first(last, "interpretation"))), str(lab.count)))
    return "<h2 id=\"labs\">Laboratory and other results (latest value per test)</h2>" + _table(
        ("Test", "Value", "Unit", "Date", "Reference range", "Interpretation", "Values in record"), rows,
        "No results in the record.")


def _medications(idx: _Index) -> str:
    rows = []
    for row in _newest_first(idx.medications):
        med = row.med
        if not med and (m := idx.get(row.ref)):
            med = cc_text(m.get("code"))
        med = med or row.fallback
        rows.append((_e(med), row.status, row.date, row.dosage, row.kind))
    return "<h2 id=\"medications\">Medications</h2>" + _table(
        ("Medication", "Status", "Date", "Dosage", "Kind"), rows, "No medications in the record.")


def _allergies(idx: _Index) -> str:
    rows = idx.allergies
    return "<h2 id=\"allergies\">Allergies and intolerances</h2>" + _table(
        ("Substance", "Status", "Criticality", "Reactions", "Recorded"), rows, "No allergies in the record.")


def _notes(idx: _Index) -> str:
    rows = _newest_first(idx.notes)
    return "<h2 id=\"notes\">Clinical notes and documents</h2>" + _table(
        ("Date", "Title", "Kind", "Document"), rows, "No clinical notes in the record.")


def _imaging(idx: _Index, placed: Sequence[PlacedImage], images_by_study: Mapping[str, list[PlacedImage]]) -> str:
    reports = idx.radiology
    out = ["<h2 id=\"radiology\">Radiology reports</h2>"]
    out += [_report_card(idx, r, images_by_study) for r in sorted(reports, key=res_date, reverse=True)]
    if not reports:
        out.append('<p class="muted">No radiology reports in the record.</p>')
    rows = []
    described = set()
    for uid, row in _newest_first([(when, (uid, row)) for when, uid, row in idx.studies]):
        described.add(uid)
        rows.append(row)
    for uid, items in sorted(images_by_study.items()):
        if uid not in described:
            n_series = len({p.image.series_instance_uid for p in items})
            rows.append(("", "(images without an ImagingStudy)", "", "",
                         f"{n_series} / {len(items)}{_no_pixels(items)}", _e(placed_folder(items))))
    out.append("<h2 id=\"imaging\">Imaging studies</h2>")
    out.append(_table(("Date", "Description", "Series", "Instances", "Series / files in package", "Folder"), rows,
                      "No imaging studies in the record."))
    if placed:
        out.append('<p>Open <code>DICOMDIR</code> at the root of this package with any DICOM viewer.</p>')
    return "".join(out)


def _no_pixels(items: Sequence[PlacedImage]) -> str:
    """A warning when files of a study carry no Pixel Data: the consultant must not expect to see
    them in a viewer (a stripped copy, a structured report, a presentation state)."""
    n = sum(1 for p in items if uids.shows_nothing(p.image.sop_class_uid, p.image.pixels))
    if not n:
        return ""
    what = "none is an image" if n == len(items) else f"{n} of them not images"
    return f' <strong class="warn">({n} without pixel data: {what})</strong>'


def placed_folder(items: Sequence[PlacedImage]) -> str:
    return items[0].relpath.rsplit("/", 2)[0] if items else ""


def _gaps(gap_report: Mapping[str, Any]) -> str:
    out = ["<h2 id=\"gaps\">What is missing, and why</h2>"]
    score = gap_report.get("score")
    if isinstance(score, (int, float)):
        out.append(f"<p>Checklist <strong>{_e(gap_report.get('checklist_title') or gap_report.get('checklist') or '')}"
                   f"</strong>: completeness {round(100 * float(score))}%.</p>")
    rows = []
    for item in gap_report.get("items") or []:
        if not isinstance(item, Mapping):
            continue
        status = str(item.get("status") or "")
        gaps = [g for g in item.get("gaps") or [] if isinstance(g, Mapping)]
        gap_html = "".join(
            f"<li><strong>{_e(g.get('reason') or '')}</strong> {_e(g.get('detail') or '')}"
            + (f"<br><em>Next:</em> {_e(g.get('next_action'))}" if g.get("next_action") else "") + "</li>"
            for g in gaps)
        rows.append((_e(item.get("title") or item.get("id") or ""),
                     f'<span class="status-{escape(status, quote=True)}">{_e(status)}</span>',
                     _e(item.get("detail") or ""), f"<ul>{gap_html}</ul>" if gap_html else ""))
    out.append(_table(("Item", "Status", "Detail", "Gaps"), rows, "No checklist result."))
    return "".join(out)


def _sources(record: NormalizedRecord, sources: Sequence[SourceInfo]) -> str:
    rows = []
    quarantined: dict[int, int] = {}
    for q in record.quarantine:
        quarantined[q.source_id] = quarantined.get(q.source_id, 0) + 1
    for s in sorted(sources, key=lambda s: s.id):
        rows.append((str(s.id), _e(s.kind), _e(s.label), _e(s.organization or ""), _e(s.method),
                     _e(s.pulled_at or ""), str(quarantined.get(s.id, 0))))
    provenance = record.count("Provenance")
    out = ["<h2 id=\"sources\">Sources and provenance</h2>",
           _table(("#", "Kind", "Source", "Organization", "Method", "Data as of", "Items left out"), rows,
                  "No sources recorded."),
           f"<p>{provenance} Provenance resource(s) in <a href=\"fhir/bundle.json\">fhir/bundle.json</a> say which "
           "source each resource came from.</p>"]
    if record.quarantine:
        out.append("<details><summary>Items left out of the record, and why</summary>")
        out.append(_table(("Source", "Kind", "Item", "Reason"),
                          ((str(q.source_id), _e(q.kind), _e(q.key), _e(q.reason)) for q in record.quarantine), ""))
        out.append("</details>")
    if record.unresolved:
        out.append(f"<p>{len(record.unresolved)} reference(s) point to resources that were not received.</p>")
    return "".join(out)


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def render_summary(case: CaseInfo, record: NormalizedRecord, gap_report: Mapping[str, Any],
                   sources: Sequence[SourceInfo], placed: Sequence[PlacedImage], blobs: BlobStore,
                   timestamp: str) -> str:
    """summary.html: the consultant's clinical summary, one self-contained page."""
    images_by_study: dict[str, list[PlacedImage]] = {}
    for p in placed:
        images_by_study.setdefault(p.image.study_instance_uid, []).append(p)
    idx = _Index(record, blobs, images_by_study)
    pathology = sorted(idx.pathology, key=res_date, reverse=True)
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("patient", "Patient"), ("gaps", "Gaps"), ("problems", "Problems"), ("pathology", "Pathology"),
        ("radiology", "Radiology"), ("imaging", "Imaging"), ("labs", "Labs"), ("medications", "Medications"),
        ("allergies", "Allergies"), ("notes", "Notes"), ("sources", "Sources")))
    body = [
        f"<h1>Second-opinion record</h1><p class=\"muted\">Case {_e(case.id)} · assembled {_e(timestamp)} by "
        f"{_e(TOOL_NAME)} {_e(__version__)}</p><nav>{nav}</nav>",
        _patient(record, case),
        _gaps(gap_report),
        _problems(idx),
        "<h2 id=\"pathology\">Pathology reports</h2>",
        "".join(_report_card(idx, r, images_by_study) for r in pathology)
        or '<p class="muted">No pathology reports in the record.</p>',
        _imaging(idx, placed, images_by_study),
        _labs(idx),
        _medications(idx),
        _allergies(idx),
        _notes(idx),
        _sources(record, sources),
    ]
    return _page(f"Second-opinion record - case {case.id}", "\n".join(body))


def render_index(case: CaseInfo, documents: Sequence[DocumentFile], n_images: int) -> str:
    """INDEX.HTM: the IHE PDI entry page, pointing at everything in the package."""
    docs = "".join(f"<li>{_link(d)}</li>" for d in documents) or "<li class=\"muted\">none</li>"
    body = (
        f"<h1>Second-opinion package</h1><p class=\"muted\">Case {_e(case.id)}</p>"
        "<ul>"
        '<li><a href="summary.html">Clinical summary</a> - start here</li>'
        '<li><a href="README.TXT">README.TXT</a> - what is in this package and how to check it</li>'
        '<li><a href="fhir/bundle.json">fhir/bundle.json</a> - the full record as a FHIR R4 document Bundle</li>'
        '<li><a href="fhir/gap-report.json">fhir/gap-report.json</a> - what is missing and why</li>'
        f'<li><a href="DICOMDIR">DICOMDIR</a> - {n_images} DICOM image file(s) under DICOM/; '
        "open with a DICOM viewer</li>"
        '<li><a href="IHE_XDM/SUBSET01/METADATA.XML">IHE_XDM/SUBSET01/METADATA.XML</a> - '
        "document metadata (IHE XDM)</li>"
        '<li><a href="manifest.json">manifest.json</a> - size and SHA-256 of every file</li>'
        f"</ul><h2>Original documents</h2><ul>{docs}</ul>"
    )
    return _page("Second-opinion package", body)


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
