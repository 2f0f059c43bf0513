"""normalize(): the case's raw items -> one FHIR R4 ``collection`` Bundle and its side lists.

Order of the steps, and why:

1. parse + validate every resource (invalid/unsupported -> quarantine), read DICOM headers
   (broken -> quarantine);
2. identity first, because "another patient" decides what may enter the record at all;
3. DICOM studies become ImagingStudy items, so that de-duplication can merge them with the
   FHIR copies of the same StudyInstanceUID;
4. de-duplication on items that carry their final ids (UUID-5 of source + ledger key), so a
   dropped duplicate's id can simply be aliased to its winner and references follow;
5. references, documents, superseded-version links, Provenance, then the sorted Bundle.

Memory stays flat as the record grows: each resource is a row of a scratch SQLite database
(:mod:`.scratch`: its facts, references, match keys and every decision about it) and its body
lives in a scratch spool; the steps are queries and scans over those rows, and load a resource
into Python only while they look at it. The changes the global steps decide (reference rewrites,
attachment paths, superseded links, ids) are applied in one final pass that writes the Bundle to
a file entry by entry in (type, id) order (see :class:`NormalizedRecord`). What stays in memory
is bounded by the number of patients, sources, studies and documents, not of resources.

Pure and deterministic: inputs are sorted, ids are UUID-5 of stable inputs, times come from the
pulls, never from the clock. The one side effect is storing inline attachment bytes in the
content-addressed blob store (idempotent), so the package writer finds every document there.
"""

from __future__ import annotations

import heapq
import logging
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from aggregator.blobs import BlobStore
from aggregator.ledger import LedgerEntry
from aggregator.model import (
    BundleWriter,
    CaseInfo,
    DocumentFile,
    NormalizedRecord,
    Quarantined,
    SourceInfo,
    new_bundle_path,
)
from aggregator.normalize import dicom, ids
from aggregator.normalize.dedup import MERGED_INTO, Context, Outcome, apply_patch, deduplicate, link_superseded
from aggregator.normalize.documents import ATTACHMENT_TYPES, KIND_BINARY, Documents, attachments_of
from aggregator.normalize.facts import facts_of
from aggregator.normalize.identity import Candidate, Identity, from_instances, from_item, merged_patient, reconcile
from aggregator.normalize.loader import Loader
from aggregator.normalize.parse import KIND_RESOURCE, load_resources
from aggregator.normalize.provenance import EPOCH, MergeProvenances, instant, merge_provenance, source_provenance
from aggregator.normalize.references import TARGETS, Resolver, rewrite, targets, targets_of
from aggregator.normalize.scratch import DROPPED, EXCLUDED, ITEM_COLS_I, KEPT, LOADED, PATIENT, Item, Scratch, Spool

log = logging.getLogger(__name__)

ANOTHER_PATIENT = "another patient"
NOT_CHOSEN = "several patients in the sources: none chosen yet"
#: ``meta.tag`` on a resource normalization attached to the case's patient without evidence
UNVERIFIED_TAG = {"system": "urn:aggregator:identity", "code": "unverified",
                  "display": "patient identity not verified: the item states no patient"}
#: types whose missing subject means "the case's patient" (loose documents from a download)
SUBJECT_TYPES = frozenset({"DocumentReference", "DiagnosticReport", "Media", "Composition", "Observation",
                           "Condition", "Procedure"})
PATIENT_FIELDS = ("subject", "patient")


def normalize(case: CaseInfo, sources: Sequence[SourceInfo], entries: Iterable[LedgerEntry],
              blobs: BlobStore, *, workdir: str | None = None) -> NormalizedRecord:
    """Build the case's normalized record from the ``done`` ledger rows of all its sources.

    Resource bodies are spooled to an unlinked scratch file and their facts kept in a scratch
    SQLite database (both in ``workdir``, else TMPDIR), and the bundle is written to a file entry
    by entry, so memory does not grow with the record."""
    spool = Spool(workdir)
    try:
        scratch = Scratch(workdir)
        try:
            return _normalize(case, sources, entries, blobs, spool, scratch, workdir)
        finally:
            scratch.close()
    finally:
        spool.close()


def _normalize(case: CaseInfo, sources: Sequence[SourceInfo], entries: Iterable[LedgerEntry],
               blobs: BlobStore, spool: Spool, scratch: Scratch, workdir: str | None) -> NormalizedRecord:
    """The steps in order (see the module docstring), one function each, timed per phase."""
    srcmap = {s.id: s for s in sources}
    pid = ids.patient_id(case.id)
    run = _Run(case, sources, srcmap, blobs, spool, scratch, Resolver(scratch, srcmap), [], pid, ids.urn(pid))

    clock = PhaseClock("load")
    side_rows = _load(run, entries)
    clock.mark("resolve")
    rows, instances = _resolve(run, side_rows)
    clock.mark("identity")
    patient = _identity(run, instances)
    clock.mark("dicom")
    by_sop, dup_instances, study_lids = _studies(run, instances, patient.mine)
    clock.mark("dedup")
    docs, outcome = _deduplicate(run, rows, dup_instances)
    known = {run.purn, ids.urn(dicom.ENDPOINT_ID)} | {ids.urn(ids.study_id(uid)) for uid in study_lids}
    clock.mark("documents")
    documents, unverified = _documents(run, docs, rows)
    patient.facts["unverified"] = sorted(unverified, key=lambda u: (u["source_id"], u["file"], u["resource"]))
    clock.mark("provenance")
    recorded = _recorded_times(case, sources, scratch)
    extra = _superseded_links(run, outcome.superseded, recorded)
    del outcome
    images = sorted((dicom.image_ref(i) for i in by_sop.values()),
                    key=lambda r: (r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid))
    if images:
        extra.append(dicom.endpoint())
    members = patient.members
    member_sources = {c.source_id for c in patient.identity.members}
    if len(members) > 1:
        extra.append(merge_provenance(pid, [(c.item.source_id, c.item.key, c.item.ref) for c in members
                                            if c.item is not None], recorded.get(members[0].source_id, EPOCH)))
    merges = MergeProvenances(scratch, recorded)
    kept = _kept(scratch, patient.base, by_sop.values(), rows, documents)
    provenances = [(ids.provenance_id(src.id), src) for src in sorted(sources, key=lambda s: s.id)
                   if src.id in member_sources or _has_targets(scratch, src.id)]

    clock.mark("write")
    writer, unresolved = _write(run, patient.item, extra, provenances, merges, member_sources, recorded, known,
                                docs, workdir)
    quarantine = run.quarantine
    quarantine.sort(key=lambda x: (x.source_id, x.kind, x.key, x.reason))
    clock.mark("")
    log.info("normalize: %d quarantined; seconds per phase: %s", len(quarantine), clock.summary())
    record = NormalizedRecord(documents=documents, images=images, quarantine=quarantine, unresolved=unresolved,
                              conflicts=patient.identity.conflicts + patient.facts.pop("conflicts"),
                              patient_ref=f"Patient/{pid}", writer=writer, source_times=recorded, kept=kept)
    record.identity = patient.facts
    record.notes = dicom.pixel_notes(by_sop.values())
    return record


@dataclass
class _Run:
    """What every step of one normalization shares: its inputs, the scratch stores, the reference
    resolver, the quarantine being collected, and the case patient's bundle id."""

    case: CaseInfo
    sources: Sequence[SourceInfo]
    srcmap: dict[int, SourceInfo]
    blobs: BlobStore
    spool: Spool
    scratch: Scratch
    resolver: Resolver
    quarantine: list[Quarantined]
    pid: str
    purn: str

    def q(self, item: Quarantined) -> None:
        self.quarantine.append(item)

    def view(self, lid: int) -> Item:
        return Item(self.scratch.row(lid), self.scratch, self.spool)


class _Patient(NamedTuple):
    """The identity step's outcome."""

    identity: Identity
    facts: dict[str, Any]
    members: list[Candidate]
    """The case patient's FHIR Patients (DICOM-only candidates left out), the first the base."""
    base: Item | None
    item: Item
    """The merged Patient, already in the scratch database and the resolver."""
    mine: set[tuple[int, str]]
    """(source, key) of the DICOM instances of the case patient."""


def _load(run: _Run, entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """Parse and validate every resource into the scratch stores (invalid ones to the quarantine).
    Returns the other (side) rows: DICOM instances, files."""
    side_rows: list[LedgerEntry] = []

    def resource_rows() -> Iterator[LedgerEntry]:
        """Resource rows go on to the (streaming) loader; only the few others are kept."""
        for e in entries:
            if e.state != "done":
                continue
            if e.kind == KIND_RESOURCE:
                yield e
            else:
                side_rows.append(e)

    load_resources(resource_rows(), run.blobs, run.q,
                   Loader(run.q, run.spool, run.scratch, run.resolver, run.srcmap).take)
    return side_rows


def _resolve(run: _Run, side_rows: list[LedgerEntry]) -> tuple[list[LedgerEntry], list[dicom.Instance]]:
    """Resolve every loaded reference once and read the DICOM headers. Returns the side rows,
    sorted, and the DICOM instances."""
    scratch, resolver = run.scratch, run.resolver
    scratch.finish_load()
    resolver.settle_absolute()
    resolver.resolve_loaded()  # every reference resolved once, from the strings the workers extracted
    rows = sorted(side_rows, key=lambda e: (e.source_id, e.kind, e.key))
    return rows, dicom.read_instances(rows, run.blobs, run.q)


def _identity(run: _Run, instances: list[dicom.Instance]) -> _Patient:
    """Decide who the case patient is; quarantine what belongs to another patient; add the merged
    Patient."""
    scratch, spool, db, q, pid = run.scratch, run.spool, run.scratch.db, run.q, run.pid
    patients = [Item(r, scratch, spool) for r in scratch.rows("lookup = 1 AND rtype = 'Patient'")]
    cands = {it.lid: from_item(it) for it in patients}
    for target, n in db.execute("SELECT target, count(*) FROM ref WHERE pos < 0 AND target IN "
                                "(SELECT lid FROM item WHERE lookup = 1 AND rtype = 'Patient') GROUP BY target"):
        cands[target].refs += n
    pins = {s.id: s.patient_id for s in run.sources if s.patient_id}
    identity = reconcile(run.case, [*cands.values(), *from_instances(instances)], pins)
    away = NOT_CHOSEN if identity.several else ANOTHER_PATIENT
    members = [c for c in identity.members if c.item is not None]
    base = members[0].item if members else None
    for c in members:
        assert c.item is not None
        scratch.put(c.item.lid, new_id=pid)
        if c.item is not base:
            q(Quarantined(c.item.source_id, KIND_RESOURCE, c.item.key, f"{MERGED_INTO} Patient/{pid}",
                          f"Patient/{pid}"))
    for c in identity.others:
        if c.item is not None:
            q(Quarantined(c.item.source_id, KIND_RESOURCE, c.item.key, away))
        for inst in c.instances:
            q(Quarantined(inst.source_id, dicom.KIND_DICOM, inst.key, away))
    _exclude_others(scratch, [c.item.lid for c in identity.others if c.item is not None], q, away)
    facts = identity_facts(run.case, identity)
    mine = {(inst.source_id, inst.key) for c in identity.members for inst in c.instances}
    patient = merged_patient(pid, run.case, identity.members)
    patient_item = run.view(scratch.add_made(base.source_id if base else 0, base.key if base else "patient",
                                             base.meta if base else {}, facts_of(patient),
                                             spool.append(orjson.dumps(patient)), pid, PATIENT))
    run.resolver.add(patient_item, patient)
    return _Patient(identity, facts, members, base, patient_item, mine)


def _studies(run: _Run, instances: list[dicom.Instance], mine: set[tuple[int, str]]
             ) -> tuple[dict[str, dicom.Instance], list[dicom.Instance], dict[str, int]]:
    """The case patient's DICOM instances, one per SOP Instance UID, as ImagingStudy items.
    Returns the instances by SOP UID, the repeated copies, and each study's scratch row."""
    by_sop: dict[str, dicom.Instance] = {}
    dup_instances: list[dicom.Instance] = []
    for inst in instances:
        if (inst.source_id, inst.key) not in mine:
            continue
        if inst.sop_uid in by_sop:
            dup_instances.append(inst)
        else:
            by_sop[inst.sop_uid] = inst
    studies: dict[str, list[dicom.Instance]] = {}
    for inst in by_sop.values():
        studies.setdefault(inst.study_uid, []).append(inst)
    study_lids: dict[str, int] = {}
    scratch = run.scratch
    for uid in sorted(studies):
        group = studies[uid]
        sid = min(i.source_id for i in group)
        study = dicom.build_study(uid, group, run.purn)
        lid = scratch.add_made(sid, f"dicom-study:{uid}", {"derived": "dicom"}, facts_of(study),
                               run.spool.append(orjson.dumps(study)), ids.study_id(uid), KEPT)
        scratch.add_sources(lid, sorted({i.source_id for i in group} - {sid}))
        run.resolver.add(run.view(lid), study)
        study_lids[uid] = lid
    return by_sop, dup_instances, study_lids


def _deduplicate(run: _Run, rows: list[LedgerEntry], dup_instances: list[dicom.Instance]
                 ) -> tuple[Documents, Outcome]:
    """Drop the copies of the same thing: each dropped copy is quarantined as merged into its
    survivor, takes the survivor's id (references follow) and gives it its sources."""
    scratch, db, q = run.scratch, run.scratch.db, run.q
    docs = Documents([e for e in rows if e.kind == KIND_BINARY], run.srcmap, run.blobs, scratch, run.spool)
    outcome = deduplicate(Context(scratch, run.spool, docs.digest, run.resolver))
    # every dropped copy that was pulled (made items have no ledger row) is in the ledger as
    # "merged into <survivor>"; the survivor's merge Provenance names it (see merge_provenances)
    for sid, key, reason, survivor in db.execute(
            "SELECT lo.sid, lo.key, d.reason, w.rtype || '/' || w.new_id FROM drop_ d JOIN item lo ON lo.lid = d.lid "
            "JOIN item w ON w.lid = d.win WHERE lo.lookup = 1"):
        q(Quarantined(sid, KIND_RESOURCE, key, reason, survivor))
    # a dropped copy's id becomes its winner's (references follow), its sources the winner's too
    db.execute("INSERT OR IGNORE INTO xsrc(lid, sid) SELECT d.win, lo.sid FROM drop_ d JOIN item lo ON lo.lid = d.lid")
    db.execute("INSERT OR IGNORE INTO xsrc(lid, sid) SELECT d.win, x.sid FROM drop_ d JOIN xsrc x ON x.lid = d.lid")
    db.execute("UPDATE item SET state = ?, new_id = w.new_id FROM drop_ d JOIN item w ON w.lid = d.win "
               "WHERE item.lid = d.lid", (DROPPED,))
    for inst in dup_instances:
        st_id = ids.study_id(inst.study_uid)
        q(Quarantined(inst.source_id, dicom.KIND_DICOM, inst.key, f"{MERGED_INTO} ImagingStudy/{st_id}",
                      f"ImagingStudy/{st_id}"))
    return docs, outcome


def _documents(run: _Run, docs: Documents, rows: list[LedgerEntry]
               ) -> tuple[list[DocumentFile], list[dict[str, Any]]]:
    """Every kept resource's attachments and every loose file to the package's documents.
    Returns the documents and the unverified ones (they name no patient)."""
    scratch, spool = run.scratch, run.spool
    kinds = sorted(ATTACHMENT_TYPES)
    with_attachments = array("q", scratch.lids(
        "SELECT lid FROM item WHERE state = ? AND rtype IN (SELECT value FROM json_each(?)) ORDER BY ord",
        (KEPT, orjson.dumps(kinds).decode())))
    for lid in with_attachments:
        it = run.view(lid)
        docs.attach(it, it.body())
    del with_attachments
    _hold_excluded_bytes(scratch, spool, docs, run.q)
    unverified = _unverified_documents(scratch, spool)
    for e in rows:
        if e.kind == KIND_BINARY and (e.source_id, e.key) not in docs.used:
            loose = _loose_document(e, run.purn, scratch, spool, run.resolver)
            docs.attach(loose, loose.body())
            unverified.append(_unverified(loose))
    return docs.finish(), unverified


def _superseded_links(run: _Run, superseded: Iterable[tuple[int, int]], recorded: dict[int, str]
                      ) -> list[dict[str, Any]]:
    """Link each superseded version to its successor (patching both); returns the Provenances made."""
    scratch = run.scratch
    extra: list[dict[str, Any]] = []
    for old_lid, new_lid in sorted(superseded, key=lambda x: (_new_id(scratch, x[0]), _new_id(scratch, x[1]))):
        old, new = run.view(old_lid), run.view(new_lid)  # fresh: an earlier link may have patched them
        prov = link_superseded(old, new, recorded.get(new.source_id, EPOCH))
        for it in (old, new):
            if it.patch is not None:
                scratch.put(it.lid, patch=orjson.dumps(it.patch))
        if prov is not None:
            extra.append(prov)
    return extra


def _write(run: _Run, patient_item: Item, extra: list[dict[str, Any]], provenances: list[tuple[str, SourceInfo]],
           merges: MergeProvenances, member_sources: set[int], recorded: dict[int, str], known: set[str],
           docs: Documents, workdir: str | None) -> tuple[BundleWriter, list[dict[str, Any]]]:
    """The bundle, written entry by entry in (type, id) order, the Patient first. Returns the
    closed writer and the references that could not be resolved, sorted."""
    scratch, spool, db, pid = run.scratch, run.spool, run.scratch.db, run.pid
    db.execute("CREATE INDEX item_out ON item(state, rtype, new_id, ord)")
    extras: list[tuple[str, str, Any]] = [(str(r["resourceType"]), str(r["id"]), r) for r in extra]
    extras += [("Provenance", prid, src) for prid, src in provenances]
    extras.sort(key=lambda x: (x[0], x[1]))
    unresolved: list[dict[str, Any]] = []
    writer = BundleWriter(new_bundle_path(workdir))
    try:
        body = patient_item.body()
        rewrite(patient_item, body, targets_of(scratch, patient_item.lid), known, unresolved)
        writer.add(body)
        final = ((Item(r[:-1], scratch, spool), r[-1]) for r in db.execute(_FINAL, (KEPT,)))
        merged = heapq.merge(((it.rtype, it.new_id, (it, packed)) for it, packed in final), extras,
                             merges, key=lambda x: (x[0], x[1]))
        for _rtype, _rid, obj in merged:
            if isinstance(obj, tuple):
                writer.add(_finished(obj[0], targets(obj[1]), known, unresolved, docs, run.purn))
            elif isinstance(obj, SourceInfo):
                writer.add_parts("Provenance", _provenance_entry(
                    obj, _targets(scratch, obj.id, pid if obj.id in member_sources else None),
                    recorded.get(obj.id, EPOCH)))
            else:
                writer.add(obj)
    finally:
        writer.close()
    unresolved.sort(key=lambda u: (u["source_id"], u["from"], u["path"], u["reference"]))
    return writer, unresolved


def identity_facts(case: CaseInfo, identity: Identity) -> dict[str, Any]:
    """What the identity item needs to know, without names (ids, sources and counts only).

    * ``chosen``: a case patient was established (False when several persons and no pin);
    * ``pinned``: by the typed demographics or a source's ``--patient-id``;
    * ``anonymous``: no candidate of the cluster has a name or a birth date (and none was typed),
      so nothing confirms who it is;
    * ``compared``: the documents whose own demographics agreed with the case's patient;
    * ``several``: the persons found, each as its Patients / DICOM patients with counts;
    * ``conflicts``: one per document about another patient (its values go to reports only).
    """
    several = [[{"resource": c.label, "source_id": c.source_id, "count": c.count,
                 "kind": "dicom" if c.item is None else (c.document or "fhir")} for c in group]
               for group in identity.several]
    conflicts: list[dict[str, Any]] = []
    for c in identity.others:
        if c.document and c.item is not None and not identity.several:
            shown = [n.display for n in c.names[:1]] + ([f"born {c.birth_date}"] if c.birth_date else [])
            case_says = [v for v in (case.patient_name, f"born {case.birth_date}" if case.birth_date else "") if v]
            conflicts.append({"field": "patient", "values": [", ".join(shown) or "no name or birth date",
                                                             ", ".join(case_says) or "the case's patient"],
                              "sources": [c.source_id], "resources": [c.label], "file": c.item.file,
                              "document": c.document})
    typed = bool(case.patient_name or case.birth_date)
    return {"chosen": bool(identity.members), "pinned": identity.pinned,
            "anonymous": bool(identity.members) and not typed and all(c.anonymous for c in identity.members),
            "compared": sorted({c.item.file for c in identity.members if c.document and c.item is not None}),
            "several": several, "conflicts": conflicts}


def _hold_excluded_bytes(scratch: Scratch, spool: Spool, docs: Documents, q: Any) -> None:
    """The bytes behind an excluded document stay out too: marked used, so that they do not come
    back as a loose document of the case's patient, and quarantined with the document's reason."""
    kinds = orjson.dumps(sorted(ATTACHMENT_TYPES)).decode()
    for row in scratch.rows("state = ? AND rtype IN (SELECT value FROM json_each(?))", (EXCLUDED, kinds)):
        it = Item(row, scratch, spool)
        before = set(docs.used)
        for i, att in enumerate(attachments_of(it.rtype, it.body())):
            docs.blob_for(it, i, att)
        for sid, key in sorted(docs.used - before):
            if not key.startswith("resource:"):
                q(Quarantined(sid, KIND_BINARY, key, f"attachment of excluded {it.ref}"))


def _unverified_documents(scratch: Scratch, spool: Spool) -> list[dict[str, Any]]:
    """Kept documents that name no patient at all: attached to the case's patient, unverified."""
    kinds = orjson.dumps(sorted(ATTACHMENT_TYPES)).decode()
    return [_unverified(Item(row, scratch, spool)) for row in scratch.rows(
        "state = ? AND rtype IN (SELECT value FROM json_each(?)) AND NOT EXISTS "
        "(SELECT 1 FROM ref r WHERE r.lid = item.lid AND r.pos < 0)", (KEPT, kinds))]


def _unverified(it: Item) -> dict[str, Any]:
    return {"source_id": it.source_id, "resource": f"{it.rtype}/{it.new_id}", "file": it.file or it.key}


def _exclude_others(scratch: Scratch, others: list[int], q: Any, reason: str = ANOTHER_PATIENT) -> None:
    """Settle who stays: Patients leave the pool (the merged one stands for them), resources whose
    subject/patient is another patient are quarantined, every other loaded resource is kept
    under its bundle id."""
    db = scratch.db
    db.execute("CREATE TABLE excl(lid INTEGER PRIMARY KEY)")
    db.executemany("INSERT OR IGNORE INTO excl(lid) SELECT DISTINCT lid FROM ref WHERE pos < 0 AND target = ?",
                   ((lid,) for lid in others))
    for sid, key in db.execute("SELECT i.sid, i.key FROM item i JOIN excl e ON e.lid = i.lid "
                               "WHERE i.rtype != 'Patient' ORDER BY i.ord"):
        q(Quarantined(sid, KIND_RESOURCE, key, reason))
    db.execute("UPDATE item SET state = ? WHERE lookup = 1 AND (rtype = 'Patient' OR lid IN (SELECT lid FROM excl))",
               (EXCLUDED,))
    db.execute("UPDATE item SET state = ?, new_id = uid WHERE lookup = 1 AND state = ?", (KEPT, LOADED))


def _kept(scratch: Scratch, patient: Item | None, images: Iterable[dicom.Instance], side_rows: list[LedgerEntry],
          documents: Sequence[DocumentFile]) -> dict[tuple[int, str, str], int]:
    """Pulled items the record keeps, per (source, kind, resource type): resources in the bundle
    (the Patient the merged one was built on among them), DICOM instances, documents whose bytes
    are in the package. Counted from the outcome, not derived from the quarantine, so that
    ``aggregator reconcile`` can tell when an item has no fate or two."""
    kept: dict[tuple[int, str, str], int] = {}
    for sid, rtype, n in scratch.db.execute("SELECT sid, rtype, count(*) FROM item WHERE lookup = 1 AND state = ? "
                                            "GROUP BY sid, rtype", (KEPT,)):
        kept[(int(sid), KIND_RESOURCE, str(rtype))] = int(n)
    if patient is not None:
        k = (patient.source_id, KIND_RESOURCE, "Patient")
        kept[k] = kept.get(k, 0) + 1
    for inst in images:
        k = (inst.source_id, dicom.KIND_DICOM, "")
        kept[k] = kept.get(k, 0) + 1
    packaged = {d.sha256 for d in documents}
    for e in side_rows:
        if e.kind == KIND_BINARY and e.sha256 in packaged:
            k = (e.source_id, KIND_BINARY, "")
            kept[k] = kept.get(k, 0) + 1
    return kept


def _new_id(scratch: Scratch, lid: int) -> str:
    return str(scratch.db.execute("SELECT new_id FROM item WHERE lid = ?", (lid,)).fetchone()[0])


_TARGETS = ("SELECT new_id FROM item WHERE state = ?3 AND sid = ?1 UNION SELECT i.new_id FROM xsrc x "
            "JOIN item i ON i.lid = x.lid WHERE x.sid = ?1 AND i.state = ?3 UNION SELECT ?2 WHERE ?2 IS NOT NULL "
            "ORDER BY 1")


def _has_targets(scratch: Scratch, sid: int) -> bool:
    return scratch.db.execute("SELECT 1 FROM item WHERE state = ?2 AND sid = ?1 UNION ALL SELECT 1 FROM xsrc x "
                              "JOIN item i ON i.lid = x.lid WHERE x.sid = ?1 AND i.state = ?2 LIMIT 1",
                              (sid, KEPT)).fetchone() is not None


def _targets(scratch: Scratch, sid: int, patient_id: str | None) -> Iterator[str]:
    """The bundle ids a source's Provenance targets, sorted: its kept resources, the merged ones it
    contributed to, and the Patient when one of its Patients (or DICOM patients) was merged."""
    for (rid,) in scratch.db.execute(_TARGETS, (sid, patient_id, KEPT)):
        yield str(rid)


#: the kept items in bundle order, each with its references' targets
_FINAL = (f"SELECT {ITEM_COLS_I}, {TARGETS} FROM item i WHERE i.state = ? "  # noqa: S608
          "ORDER BY i.rtype, i.new_id, i.ord")


def _finished(it: Item, refs: list[str | None], known: set[str], unresolved: list[dict[str, Any]],
              docs: Documents, purn: str) -> dict[str, Any]:
    """The bundle form of a kept item: every change decided by the global steps applied to its
    body in one place (references, subject, attachments, superseded links, id, meta.source)."""
    body = it.body()
    rewrite(it, body, refs, known, unresolved)
    if it.rtype in SUBJECT_TYPES and not body.get("subject"):
        body["subject"] = {"reference": purn}
        meta = body.setdefault("meta", {})
        if isinstance(meta, dict):
            meta["tag"] = [*(meta.get("tag") or []), UNVERIFIED_TAG]
    docs.apply(it, body)
    apply_patch(it, body)
    body["id"] = it.new_id
    if it.rid and not it.derived:
        meta = body.setdefault("meta", {})
        if isinstance(meta, dict) and not meta.get("source"):
            meta["source"] = f"urn:aggregator:source:{it.source_id}#{it.rtype}/{it.rid}"
    return body


def _provenance_entry(src: SourceInfo, targets: Iterator[str], recorded: str) -> Iterator[bytes]:
    """The bundle entry of a source's Provenance, as pieces of bytes: it targets every resource of
    the source, and as one object that list would be the largest of a large record."""
    first = next(targets)
    prov = source_provenance(src, [first], recorded)
    assert prov is not None
    one = orjson.dumps(prov["target"])
    text = orjson.dumps({"fullUrl": ids.urn(prov["id"]), "resource": prov})
    head, sep, tail = text.partition(b'"target":' + one)
    assert sep
    yield head + b'"target":[{"reference":"urn:uuid:%s"}' % first.encode()
    batch: list[bytes] = []
    for rid in targets:
        batch.append(b',{"reference":"urn:uuid:%s"}' % rid.encode())
        if len(batch) >= 1024:
            yield b"".join(batch)
            batch = []
    yield b"".join(batch) + b"]" + tail


class PhaseClock:
    """Wall time per normalization phase, for the log (where a large record's time goes)."""

    def __init__(self, first: str) -> None:
        self._name, self._start = first, time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, next_phase: str) -> None:
        now = time.perf_counter()
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + now - self._start
        self._name, self._start = next_phase, now

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())


def _loose_document(e: LedgerEntry, purn: str, scratch: Scratch, spool: Spool, resolver: Resolver) -> Item:
    """A binary no resource points at (a loose file): described by a minimal DocumentReference
    rather than dropped; Provenance still names its source."""
    title = str(e.meta.get("file") or e.key).rsplit("/", 1)[-1]
    rid = ids.item_id(e.source_id, KIND_BINARY, e.key)
    att: dict[str, Any] = {"contentType": e.content_type or "application/octet-stream", "url": e.key}
    if title:
        att["title"] = title
    data = {"resourceType": "DocumentReference", "id": rid, "status": "current",
            "subject": {"reference": purn}, "content": [{"attachment": att}]}
    facts = facts_of(data)
    facts.rid = ""
    lid = scratch.add_made(e.source_id, e.key, dict(e.meta or {}), facts, spool.append(orjson.dumps(data)), rid, KEPT)
    item = Item(scratch.row(lid), scratch, spool)
    resolver.add(item, data)  # only its subject, already a bundle urn
    return item


def _recorded_times(case: CaseInfo, sources: Sequence[SourceInfo], scratch: Scratch) -> dict[int, str]:
    """Each source's *data time*: the newest ``meta.lastUpdated`` among the resources it gave,
    else the case date (midnight UTC), else the epoch.

    Why not the pull's clock time: two homes that pull the same data at different moments must
    build byte-identical packages, and every id of the package derives from the record's
    digest, so no time in the record may come from a clock. The ledger and ``case show`` keep
    the real pull times.
    """
    newest = dict(scratch.db.execute("SELECT sid, MAX(updated) FROM item WHERE updated > 0 GROUP BY sid"))
    fallback = instant(f"{case.case_date}T00:00:00+00:00") if case.case_date else None
    out: dict[int, str] = {}
    for s in sources:
        t = newest.get(s.id)
        out[s.id] = (instant(datetime.fromtimestamp(t, UTC)) if t else None) or fallback or EPOCH
    return out


__all__ = ["Candidate", "normalize"]
