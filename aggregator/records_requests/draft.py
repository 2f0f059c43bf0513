"""What to ask each institution for: the open gaps of a report, grouped by holder and worded.

A records clerk finds items by kind, date and accession number, not by FHIR ids or reason codes,
so each line names the document or images, the date, the accession when the record has one, and
what is wrong with what was received ("not only the summary"). Each open gap becomes exactly one
line, keyed so that a later gap report can tell whether it is still open (:func:`gap_key`).
Identity gaps are not things an institution can send: they are returned as ``not_requestable``
with the reason, never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregator.checklist import reasons as R

#: reasons a records request cannot fix (the navigator settles who the patient is)
NOT_REQUESTABLE = frozenset({R.IDENTITY_CONFLICT, R.SEVERAL_PATIENTS, R.IDENTITY_UNVERIFIED})
UNKNOWN_HOLDER = "the institution that holds these records"

_ACCESSION = re.compile(r"accession ([^\s,;)]+)")
_WINDOW_START = re.compile(r"window (\d{4}-\d{2}-\d{2}) to")
_IMAGING_ABOUT = re.compile(r"^the (?:imaging|radiology) report of (\d{4}-\d{2}-\d{2}) \((.+)\)$")
_LAST_PERIOD = re.compile(r"\s+(?:of|from|in) the last \d+ (?:days?|weeks?|months?|years?)$")
_OPEN = ("missing", "partial")


@dataclass(frozen=True)
class Line:
    """One thing to ask for: the gap it comes from and the words for the clerk."""

    keys: tuple[str, ...]
    """Stable identities of the gaps it asks for (``item|subject|resource|component``): two
    gaps about the same received resource (the biopsy and its specimen, both pointing at one
    summary-only report) are one line for the clerk."""
    item_id: str
    reason: str
    text: str
    format: str
    """The electronic format asked for: ``DICOM`` for images, else PDF / FHIR / C-CDA."""


@dataclass
class Plan:
    """Lines per institution, plus the open gaps no letter can ask for."""

    by_institution: dict[str, list[Line]] = field(default_factory=dict)
    not_requestable: list[dict[str, str]] = field(default_factory=list)


def gap_key(item_id: str, gap: Mapping[str, Any]) -> str:
    """The same gap in two reports has the same key (subject, resource and component are ids)."""
    return "|".join([item_id, str(gap.get("subject") or ""), str(gap.get("resource") or ""),
                     str(gap.get("component") or "")])


def open_gap_keys(report: Mapping[str, Any]) -> set[str]:
    return {gap_key(i["id"], g) for i in report.get("items", []) if i.get("status") in _OPEN
            for g in i.get("gaps", [])}


def plan_requests(report: Mapping[str, Any], requests: Mapping[str, str],
                  accessions: Mapping[str, str] | None = None) -> Plan:
    """Group the report's open gaps by holder and word each one.

    ``requests``: checklist item id (or ``id:component``) -> what the checklist asks for
    ("full surgical pathology report"); ``accessions``: resource ref -> accession number.
    """
    acc = accessions or {}
    out = Plan()
    for item in report.get("items", []):
        if item.get("status") not in _OPEN:
            continue
        about = {s["ref"]: s.get("about", "") for s in item.get("subjects", []) if "ref" in s}
        for gap in item.get("gaps", []):
            if gap["reason"] in NOT_REQUESTABLE:
                out.not_requestable.append({"item": item["id"], "reason": gap["reason"],
                                            "why": "the patient's identity is settled by the navigator, "
                                                   "not by a records request"})
                continue
            holder = gap.get("holder") or UNKNOWN_HOLDER
            lines = out.by_institution.setdefault(holder, [])
            key = gap_key(item["id"], gap)
            twin = _twin(lines, item["id"], gap)
            if twin is not None:
                idx, prev = twin
                # the specimen names the report best (its accession); else keep the first wording
                subject = str(gap.get("subject") or "")
                text = prev.text
                if subject.startswith("Specimen/"):
                    what = requests.get(item["id"]) or item.get("title", item["id"]).lower()
                    text = word(gap, what, about.get(subject, ""), acc)
                lines[idx] = Line((*prev.keys, key), prev.item_id, prev.reason, text, prev.format)
                continue
            what = requests.get(f"{item['id']}:{gap.get('component')}") or requests.get(item["id"]) \
                or item.get("title", item["id"]).lower()
            lines.append(Line((key,), item["id"], gap["reason"],
                              word(gap, what, about.get(str(gap.get("subject") or ""), ""), acc),
                              "DICOM" if _images(gap) else "PDF, FHIR or C-CDA"))
    return out


def _twin(lines: list[Line], item_id: str, gap: Mapping[str, Any]) -> tuple[int, Line] | None:
    """A line already asking for the same received resource of the same item for the same reason."""
    res = gap.get("resource")
    if not res:
        return None
    for i, ln in enumerate(lines):
        if ln.item_id == item_id and ln.reason == gap["reason"] and any(
                k.split("|")[2] == res for k in ln.keys):
            return i, ln
    return None


def _accession(gap: Mapping[str, Any], acc: Mapping[str, str]) -> str:
    for ref in (gap.get("subject"), gap.get("resource")):
        if isinstance(ref, str) and acc.get(ref):
            return acc[ref]
    m = _ACCESSION.search(str(gap.get("detail") or ""))
    return m.group(1) if m else ""


def _images(gap: Mapping[str, Any]) -> bool:
    """The gap is about images: not retrieved, or a study whose retrieval failed or was refused."""
    return gap["reason"] == R.IMAGES_NOT_RETRIEVED or str(gap.get("resource") or "").startswith("ImagingStudy/")


def word(gap: Mapping[str, Any], what: str, about: str, acc: Mapping[str, str]) -> str:
    """One line of the letter, in a records clerk's words."""
    reason = gap["reason"]
    accession = _accession(gap, acc)
    about = about.replace("the specimen of ", "the specimen collected on ", 1)
    tail = (f", accession {accession}" if about.endswith(")") else f" (accession {accession})") if accession else ""
    of = f" for {about}" if about else ""
    if _images(gap):
        m = _IMAGING_ABOUT.match(about)
        study = f"the {m.group(2)} study of {m.group(1)}" if m else (about or "the imaging study")
        tail = f", accession {accession}" if accession else ""
        rest = ", not only the radiology report" if reason == R.IMAGES_NOT_RETRIEVED else ""
        return f"the images (DICOM) of {study}{tail}{rest}"
    if reason == R.OUTDATED:
        m = _WINDOW_START.search(str(gap.get("detail") or ""))
        base = _LAST_PERIOD.sub("", what)
        base = base if base.endswith("s") else f"{base} results"
        return f"all {base} since {m.group(1)}" if m else f"the most recent {base}"
    if reason == R.SUMMARY_ONLY:
        return f"the {what}{of}{tail}, not only the summary"
    return f"the {what}{of}{tail}"


def formats(lines: Iterable[Line]) -> list[str]:
    """The formats a letter asks for, in a fixed order."""
    wanted = {ln.format for ln in lines}
    out = []
    if any(f != "DICOM" for f in wanted):
        out.append("reports and notes as PDF, or as FHIR or C-CDA where your system offers it")
    if "DICOM" in wanted:
        out.append("images as DICOM files (a CD/DVD or secure download), not only the radiology report")
    return out
