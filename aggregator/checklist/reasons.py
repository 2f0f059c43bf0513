"""Why a gap exists, from the ledger and the sources, and what a navigator should do about it.

A gap report that only says "missing" leaves the navigator guessing. The ledger knows better: a
Binary that answered 403, a study the PACS refused with 0xA702, a source never pulled. This
module indexes the failed rows once and answers, for a gap, the most specific reason:

1. a failure of exactly the bytes the record points at (the attachment URL, the study's SOP
   instances, the study UID);
2. what the data itself shows (only a summary, a preliminary report, images not retrieved) -
   decided by the engine;
3. a failure of a whole query for the resource types the item needs, at a source;
4. a source that has not been pulled yet (pending);
5. otherwise: not found at any source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aggregator.ledger import LedgerEntry
from aggregator.model import SourceInfo

NOT_FOUND = "not-found"
ACCESS_DENIED = "access-denied"
NOT_FOUND_AT_SOURCE = "not-found-at-source"
RETRIEVAL_FAILED = "retrieval-failed"
PENDING = "pending"
SUMMARY_ONLY = "summary-only"
IMAGES_NOT_RETRIEVED = "images-not-retrieved"
IDENTITY_CONFLICT = "identity-conflict"
OUTDATED = "outdated"
"""The data exists, but all of it is older than the item's window (the gap names the newest date)."""
SEVERAL_PATIENTS = "several-patients"
"""Nothing pins the case's patient and the sources hold more than one person: none was chosen."""
IDENTITY_UNVERIFIED = "identity-unverified"
"""The case's patient has neither a name nor a birth date anywhere: nothing confirms who it is."""
REASONS = (NOT_FOUND, ACCESS_DENIED, NOT_FOUND_AT_SOURCE, RETRIEVAL_FAILED, PENDING, SUMMARY_ONLY,
           IMAGES_NOT_RETRIEVED, IDENTITY_CONFLICT, OUTDATED, SEVERAL_PATIENTS, IDENTITY_UNVERIFIED)

#: which connector kinds can deliver FHIR data / DICOM instances
FHIR_KINDS = frozenset({"media", "fhir", "fhir-bulk"})
IMAGE_KINDS = frozenset({"media", "dimse", "dicomweb"})

_TYPE_IN_KEY = re.compile(r"(?:^|[/:?])([A-Z][A-Za-z]+)(?:[/?]|$)")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
# DIMSE statuses that mean "not allowed" rather than "broken"
_DIMSE_DENIED = frozenset({"0x0124", "0x0122"})


@dataclass(frozen=True)
class Reason:
    code: str
    detail: str
    source_id: int | None = None
    key: str | None = None


def classify_failure(entry: LedgerEntry) -> Reason:
    """The gap reason one failed ledger row stands for (HTTP and DIMSE statuses)."""
    status = (entry.status or "").strip()
    text = (entry.reason or "").strip()
    low = text.lower()
    shown = f"{'status ' + status + ': ' if status else ''}{text}".strip() or "no error text"
    if status in ("401", "403") or status.lower() in _DIMSE_DENIED or "forbidden" in low or "access denied" in low:
        return Reason(ACCESS_DENIED, f"access denied ({shown})", entry.source_id, entry.key)
    if status in ("404", "410") or low.startswith("not found"):
        return Reason(NOT_FOUND_AT_SOURCE, f"the source says it does not exist ({shown})", entry.source_id, entry.key)
    if status == "202" or "in progress" in low or "pending" in low:
        return Reason(PENDING, f"still being prepared by the source ({shown})", entry.source_id, entry.key)
    return Reason(RETRIEVAL_FAILED, f"retrieval failed ({shown})", entry.source_id, entry.key)


def _types_of(entry: LedgerEntry) -> frozenset[str]:
    """Resource types a failed row may have held; ``*`` when it could be anything."""
    if entry.kind == "dicom":
        return frozenset({"DICOM"})
    if entry.kind == "binary":
        return frozenset({"Binary"})
    rt = entry.meta.get("resourceType") if isinstance(entry.meta, dict) else None
    if isinstance(rt, str) and rt:
        return frozenset({rt})
    key = entry.key
    if entry.kind == "file":
        if isinstance(entry.meta, dict) and entry.meta.get("member") == "rejected":
            # An archive member refused for its path or type (zip slip, duplicate or conflicting
            # name, link, device): its content was never a candidate, so it explains no gap.
            # It stays in the ledger and in the report's list of files not read.
            return frozenset()
        return _file_types(key)
    if "$everything" in key or "$export" in key:
        return frozenset({"*"})
    if _UID.match(key):
        return frozenset({"DICOM"})
    found = {m.group(1) for m in _TYPE_IN_KEY.finditer(key.split("?", 1)[0].replace("query:", "/"))}
    found |= {m.group(1) for m in _TYPE_IN_KEY.finditer(key.replace("query:", "/"))} if not found else set()
    if entry.kind == "query" and found & {"Study", "Series", "Instance", "STUDY", "SERIES"}:
        found.add("DICOM")
    return frozenset(found) if found else frozenset({"*"})


def _rejected_member(entry: LedgerEntry) -> bool:
    return entry.kind == "file" and isinstance(entry.meta, dict) and entry.meta.get("member") == "rejected"


#: ledger kinds whose skipped rows are written by normalization, not by a pull
_NOT_PULL_SKIPS = frozenset({"quarantine"})

_DOC_TYPES = frozenset({"Binary", "DocumentReference", "DiagnosticReport", "Composition"})


def _file_types(key: str) -> frozenset[str]:
    """What an unreadable input file could have been, from its name."""
    # Keys of items inside a file carry a fragment (#/entry/3/resource, #L12): drop it first.
    name = key.removeprefix("file:").split("#", 1)[0].rsplit("/", 1)[-1].lower()
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext in ("json", "ndjson"):
        return frozenset({"*fhir"})
    if ext in ("pdf", "txt", "xml", "rtf", "html", "htm", "doc", "docx", "jpg", "jpeg", "png", "tif", "tiff"):
        return _DOC_TYPES
    if ext in ("dcm", "dicom", "") or name == "dicomdir" or name.isdigit():
        return frozenset({"DICOM"})
    return frozenset({"*"})


class LedgerIndex:
    """Failed rows of a case, indexed by key, study and resource type."""

    def __init__(self, ledger: Iterable[LedgerEntry], sources: Sequence[SourceInfo]) -> None:
        self.sources = {s.id: s for s in sources}
        self.failed: list[LedgerEntry] = []
        self.skipped: dict[int, list[dict[str, str]]] = {}
        """Source id -> items its pulls skipped (unsupported files...), with their reasons."""
        for e in ledger:
            if e.state == "failed":
                self.failed.append(e)
            # archive members refused for their path are not read either, and explain no gap
            # (see _types_of): listed with the skipped items so they show somewhere
            if (e.state == "skipped" and e.kind not in _NOT_PULL_SKIPS) or _rejected_member(e):
                self.skipped.setdefault(e.source_id, []).append(
                    {"kind": e.kind, "key": e.key, "reason": e.reason or "no reason recorded"})
        self.failed.sort(key=lambda e: (e.source_id, e.kind, e.key))
        for rows in self.skipped.values():
            rows.sort(key=lambda r: (r["kind"], r["key"]))
        self.by_key: dict[str, list[LedgerEntry]] = {}
        self.by_study: dict[str, list[LedgerEntry]] = {}
        for e in self.failed:
            self.by_key.setdefault(e.key, []).append(e)
            meta = e.meta if isinstance(e.meta, dict) else {}
            for k in ("study_uid", "StudyInstanceUID", "study"):
                v = meta.get(k)
                if isinstance(v, str) and v:
                    self.by_study.setdefault(v, []).append(e)

    def problems(self, source_id: int) -> list[dict[str, Any]]:
        """The source's failed queries, grouped by status and reason, for the navigator.

        A failed query is about the source, not one item: a refused export, a study hint with no
        match, a PatientID that names several people at an archive. Items whose rules look for
        what the query would have brought cite it as their reason; this list shows it even when
        no checklist item does (e.g. imaging studies the archive holds but we did not take).
        Reasons are written PHI-free by the connectors.
        """
        groups: dict[tuple[str, str], int] = {}
        for e in self.failed:
            if e.source_id == source_id and e.kind == "query":
                key = (e.status or "", e.reason or "")
                groups[key] = groups.get(key, 0) + 1
        return [{"status": st, "detail": reason, "count": n} for (st, reason), n in sorted(groups.items())]

    def skipped_items(self, source_id: int) -> list[dict[str, str]]:
        """What the source's pulls skipped (kind, key, reason): files the navigator may have to
        read or convert by hand. Quarantine rows (normalization's) are not pull-time skips."""
        return list(self.skipped.get(source_id, ()))

    # -- specific --------------------------------------------------------------------------

    def for_keys(self, keys: Iterable[str]) -> Reason | None:
        """A failure of exactly one of these items (attachment URLs, SOP UIDs...)."""
        hits: list[LedgerEntry] = []
        for key in sorted(set(keys)):
            if not key:
                continue
            hits += self.by_key.get(key, [])
            if not hits and "/" in key:
                # an absolute URL in the ledger vs a relative one in the record, or vice versa
                tail = "/".join(key.rstrip("/").split("/")[-2:])
                hits += [e for e in self.failed if e.key.rstrip("/").endswith("/" + tail) or e.key == tail]
        return _best(hits)

    def for_study(self, study_uid: str, sop_uids: Iterable[str] = ()) -> Reason | None:
        hits = list(self.by_study.get(study_uid, []))
        hits += self.by_key.get(study_uid, [])
        for sop in sop_uids:
            hits += self.by_key.get(sop, [])
        hits += [e for e in self.failed if e.kind == "query" and study_uid and study_uid in e.key]
        return _best(hits)

    # -- general ---------------------------------------------------------------------------

    def for_types(self, types: Iterable[str], *, images: bool = False) -> Reason | None:
        """A failure of a query or item of one of these resource types (or of anything)."""
        wanted = set(types) | ({"DICOM"} if images else set())
        hits = []
        for e in self.failed:
            got = _types_of(e)
            if "*" in got or got & wanted or ("*fhir" in got and not images and wanted - {"DICOM", "Binary"}):
                src = self.sources.get(e.source_id)
                if src is not None and not _can_deliver(src, images):
                    continue
                hits.append(e)
        return _best(hits)

    def pending_sources(self, *, images: bool = False) -> list[SourceInfo]:
        """Sources that could deliver this but have not been pulled yet."""
        return [s for s in sorted(self.sources.values(), key=lambda s: s.id)
                if not s.pulled_at and _can_deliver(s, images)]


def _can_deliver(src: SourceInfo, images: bool) -> bool:
    return src.kind in (IMAGE_KINDS if images else FHIR_KINDS) or src.kind not in (FHIR_KINDS | IMAGE_KINDS)


_PRIORITY = {ACCESS_DENIED: 0, NOT_FOUND_AT_SOURCE: 1, PENDING: 2, RETRIEVAL_FAILED: 3}


def _best(entries: list[LedgerEntry]) -> Reason | None:
    """The most telling failure: access denied before 404 before pending before other errors."""
    if not entries:
        return None
    reasons = [classify_failure(e) for e in entries]
    reasons.sort(key=lambda r: (_PRIORITY.get(r.code, 9), r.source_id or 0, r.key or ""))
    return reasons[0]


# --- next actions ---------------------------------------------------------------------------


def source_name(src: SourceInfo | None) -> str:
    if src is None:
        return "the treating facility"
    return src.organization or src.label or f"source {src.id}"


def names(sources: Sequence[SourceInfo]) -> str:
    return join_names(source_name(s) for s in sources)


def join_names(names_: Iterable[str]) -> str:
    """``A``, ``A or B``, ``A, B or C``: each name once, sorted; the treating facility when none."""
    unique = sorted({n for n in names_ if n})
    if not unique:
        return "the treating facility"
    if len(unique) == 1:
        return unique[0]
    return ", ".join(unique[:-1]) + " or " + unique[-1]


# --- composing reason texts -------------------------------------------------------------------

_SPACE = re.compile(r"\s+")


def _tokens(clause: str) -> tuple[str, ...]:
    return tuple(_SPACE.sub(" ", clause).strip().strip(".;:,").casefold().split(" "))


def _within(small: tuple[str, ...], big: tuple[str, ...]) -> bool:
    """Whether ``small`` is a run of whole words inside ``big``."""
    n = len(small)
    return any(big[i:i + n] == small for i in range(len(big) - n + 1))


def compose(parts: Iterable[str], sep: str = "; ", *, limit: int | None = None) -> str:
    """Reason texts joined into one, each clause once.

    Why: an item with three missing components used to read "not found at any source; not found
    at any source; not found at any source", and a detail composed from a state and a ledger
    failure could say the same thing twice. Parts are split into clauses at ``sep``; a clause
    whose words already appear (as a run of whole words, ignoring case and spacing) in an earlier
    clause is dropped, and an earlier clause that a later one contains is replaced by it. At most
    ``limit`` clauses are kept (in order of first appearance).
    """
    kept: list[tuple[tuple[str, ...], str]] = []
    for part in parts:
        for raw in str(part or "").split(sep.strip() or sep):
            clause = raw.strip()
            toks = _tokens(clause)
            if not clause or toks == ("",):
                continue
            if any(_within(toks, k) for k, _ in kept):
                continue
            wider = [i for i, (k, _) in enumerate(kept) if _within(k, toks)]
            if wider:
                kept[wider[0]] = (toks, clause)
                kept = [kc for i, kc in enumerate(kept) if i not in wider[1:]]
                continue
            kept.append((toks, clause))
    chosen = [c for _, c in kept]
    return sep.join(chosen[:limit] if limit is not None else chosen)


def next_action(code: str, request: str, about: str, where: str, detail: str = "", *,
                source_label: str = "", report_status: str = "") -> str:
    """One sentence a navigator can act on; names the institution and the item.

    ``report_status``: the status of a report that *was* received but is not final yet
    (preliminary, partial...); the next action is then to ask when the final one will be signed.
    """
    thing = f"the {request}{' for ' + about if about else ''}"
    if code == PENDING and report_status:
        return (f"The final report is pending at {where}: only a {report_status} version of {thing} was "
                f"received. Ask {where} when it will be signed, then pull again")
    if code == ACCESS_DENIED:
        return (f"Ask {where} to grant access to {thing} (the source refused it), "
                f"or request a copy directly from {where}")
    if code == NOT_FOUND_AT_SOURCE:
        return f"{where} says {thing} does not exist there; ask {where} where it is held and request it"
    if code == RETRIEVAL_FAILED:
        label = source_label or where
        return f"Pull {label} again; if it keeps failing, request {thing} from {where}"
    if code == PENDING:
        label = source_label or where
        return (f"Pull {label} (not retrieved yet) and re-run the check; "
                f"then request {thing} from {where} if still missing")
    if code == SUMMARY_ONLY:
        return f"Request {thing} from {where}: only a summary or metadata was received"
    if code == IMAGES_NOT_RETRIEVED:
        return f"Retrieve {thing} from {where} (PACS or a CD), then pull it as a source"
    if code == OUTDATED:
        return f"Ask {where} for recent results: {thing} (what was received is older than the window)"
    if code == IDENTITY_CONFLICT:
        return f"Confirm the patient's identity: {detail or 'demographics differ'} between {where}"
    if code == SEVERAL_PATIENTS:
        return (f"Pick the case's patient among those found in {where}: give the case the patient's name "
                "and birth date, or add the source with --patient-id, then re-run the check")
    if code == IDENTITY_UNVERIFIED:
        return (f"Confirm who the patient in {where} is: give the case the patient's name and birth date, "
                "then re-run the check")
    return f"Request {thing} from {where}"
