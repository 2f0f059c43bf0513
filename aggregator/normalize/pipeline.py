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

Memory: each resource is held as compact facts (:class:`~aggregator.normalize.facts.Facts`) and
its body lives in a scratch spool; steps that need a body load it, and the changes the global
steps decide (reference rewrites, attachment paths, superseded links, ids) are applied in one
final pass that writes the Bundle to a file entry by entry (see :class:`NormalizedRecord`).

Pure and deterministic: inputs are sorted, ids are UUID-5 of stable inputs, times come from the
pulls, never from the clock. The one side effect is storing inline attachment bytes in the
content-addressed blob store (idempotent), so the package writer finds every document there.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from aggregator.blobs import BlobStore
from aggregator.ledger import LedgerEntry
from aggregator.model import BundleWriter, CaseInfo, NormalizedRecord, Quarantined, SourceInfo, new_bundle_path
from aggregator.normalize import dicom, ids
from aggregator.normalize.dedup import Context, apply_patch, deduplicate, link_superseded
from aggregator.normalize.documents import ATTACHMENT_TYPES, KIND_BINARY, Documents
from aggregator.normalize.facts import facts_of
from aggregator.normalize.identity import Candidate, from_instances, from_item, merged_patient, reconcile
from aggregator.normalize.parse import KIND_RESOURCE, Item, Spool, load_resources
from aggregator.normalize.provenance import EPOCH, instant, source_provenance
from aggregator.normalize.references import Resolver, reference_nodes, resolve_loaded, rewrite
from aggregator.normalize.references import targets as ref_targets

log = logging.getLogger(__name__)

ANOTHER_PATIENT = "another patient"
#: types whose missing subject means "the case's patient" (loose documents from a download)
SUBJECT_TYPES = frozenset({"DocumentReference", "DiagnosticReport", "Media", "Composition", "Observation",
                           "Condition", "Procedure"})
PATIENT_FIELDS = ("subject", "patient")


def normalize(case: CaseInfo, sources: Sequence[SourceInfo], entries: Iterable[LedgerEntry],
              blobs: BlobStore, *, workdir: str | None = None) -> NormalizedRecord:
    """Build the case's normalized record from the ``done`` ledger rows of all its sources.

    Resource bodies are spooled to an unlinked scratch file (in ``workdir``, else TMPDIR) and
    the bundle is written to a file entry by entry, so memory does not grow with the record
    beyond a few compact facts per resource."""
    spool = Spool(workdir)
    try:
        return _normalize(case, sources, entries, blobs, spool, workdir)
    finally:
        spool.close()


def _normalize(case: CaseInfo, sources: Sequence[SourceInfo], entries: Iterable[LedgerEntry],
               blobs: BlobStore, spool: Spool, workdir: str | None) -> NormalizedRecord:
    srcmap = {s.id: s for s in sources}
    quarantine: list[Quarantined] = []
    q = quarantine.append
    side_rows: list[LedgerEntry] = []
    newest: dict[int, Any] = {}

    def resource_rows() -> Iterator[LedgerEntry]:
        """Resource rows go on to the (streaming) loader; only the few others are kept."""
        for e in entries:
            if e.state != "done":
                continue
            t = e.updated_at
            if t is not None and (e.source_id not in newest or t > newest[e.source_id]):
                newest[e.source_id] = t
            if e.kind == KIND_RESOURCE:
                yield e
            else:
                side_rows.append(e)

    clock = PhaseClock("load")
    items = load_resources(resource_rows(), blobs, q, spool)
    rows = sorted(side_rows, key=lambda e: (e.source_id, e.kind, e.key))
    instances = dicom.read_instances(rows, blobs, q)
    resolver = Resolver(items, srcmap)
    for it in items:  # every reference resolved once, from the strings the workers extracted
        resolve_loaded(it, resolver)
    pid = ids.patient_id(case.id)
    purn = ids.urn(pid)

    clock.mark("identity")
    # -- identity -----------------------------------------------------------------------------
    patients = [it for it in items if it.rtype == "Patient"]
    cands = {id(it): from_item(it) for it in patients}
    for it in items:
        for ref in it.facts.patient_refs or ():
            t = resolver.resolve(it, ref)
            if isinstance(t, Item) and id(t) in cands:
                cands[id(t)].refs += 1
    identity = reconcile(case, [*cands.values(), *from_instances(instances)])
    members = [c for c in identity.members if c.item is not None]
    base = members[0].item if members else None
    for c in members:
        assert c.item is not None
        c.item.new_id = pid
        if c.item is not base:
            q(Quarantined(c.item.source_id, KIND_RESOURCE, c.item.key, f"duplicate of Patient/{pid}"))
    others = {id(c.item) for c in identity.others if c.item is not None}
    for c in identity.others:
        if c.item is not None:
            q(Quarantined(c.item.source_id, KIND_RESOURCE, c.item.key, ANOTHER_PATIENT))
        for inst in c.instances:
            q(Quarantined(inst.source_id, dicom.KIND_DICOM, inst.key, ANOTHER_PATIENT))
    mine = {(inst.source_id, inst.key) for c in identity.members for inst in c.instances}
    patient = merged_patient(pid, case, identity.members)
    patient_item = Item(base.source_id if base else 0, base.key if base else "patient", base.meta if base else {},
                        facts_of(patient), spool, patient, new_id=pid)
    del patient

    kept: list[Item] = []
    for it in items:
        belongs = _belongs_to(it, resolver, others)
        it.facts.patient_refs = None  # identity is settled: the strings are not needed any more
        if it.rtype == "Patient":
            continue
        if belongs:
            q(Quarantined(it.source_id, KIND_RESOURCE, it.key, ANOTHER_PATIENT))
            continue
        it.new_id = ids.item_id(it.source_id, KIND_RESOURCE, it.key)
        kept.append(it)

    clock.mark("dicom")
    # -- DICOM -> ImagingStudy ------------------------------------------------------------------
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
    study_items: dict[str, Item] = {}
    for uid in sorted(studies):
        group = studies[uid]
        sid = min(i.source_id for i in group)
        study = dicom.build_study(uid, group, purn)
        st = Item(sid, f"dicom-study:{uid}", {"derived": "dicom"}, facts_of(study), spool, study,
                  new_id=ids.study_id(uid), extra_sources=frozenset({i.source_id for i in group} - {sid}))
        study_items[uid] = st
        kept.append(st)

    clock.mark("dedup")
    # -- de-duplication -----------------------------------------------------------------------
    docs = Documents([e for e in rows if e.kind == KIND_BINARY], items, srcmap, blobs)
    del items

    def references(it: Item) -> tuple[Any, ...]:
        if it.refs is None:
            if it.facts.refs is not None:
                resolve_loaded(it, resolver)
            else:
                ref_targets(it, reference_nodes(it.body(), []), resolver)
        return it.refs or ()

    outcome = deduplicate(kept, Context(srcmap, docs.digest, references))
    dropped = set()
    for lo, win, reason in sorted(outcome.dropped, key=lambda x: (x[0].source_id, x[0].key)):
        dropped.add(id(lo))
        lo.new_id = win.new_id
        win.extra_sources = win.extra_sources | {lo.source_id} | lo.extra_sources
        if not lo.derived:
            q(Quarantined(lo.source_id, KIND_RESOURCE, lo.key, reason))
        lo.refs = lo.chash = None  # not written: its cached reference targets are no longer needed
    final = [it for it in kept if id(it) not in dropped]
    del kept
    for inst in dup_instances:
        st = study_items[inst.study_uid]
        q(Quarantined(inst.source_id, dicom.KIND_DICOM, inst.key, f"duplicate of ImagingStudy/{st.new_id}"))

    clock.mark("references")
    # -- references: resolve what de-duplication did not, then drop the lookup indexes ---------
    known = {purn, ids.urn(dicom.ENDPOINT_ID)} | {ids.urn(s.new_id) for s in study_items.values()}
    for it in [patient_item, *final]:
        it.chash = None
        references(it)
    # the lookup indexes are the largest thing normalization holds besides the facts
    resolver.release()

    clock.mark("documents")
    # -- documents ----------------------------------------------------------------------------
    for it in final:
        if it.rtype in ATTACHMENT_TYPES:
            docs.attach(it, it.body())
    for e in rows:
        if e.kind == KIND_BINARY and (e.source_id, e.key) not in docs.used:
            loose = _loose_document(e, purn, spool)
            final.append(loose)
            docs.attach(loose, loose.body())
    documents = docs.finish()

    clock.mark("provenance")
    # -- links, endpoint, provenance ------------------------------------------------------------
    recorded = _recorded_times(sources, newest)
    extra: list[dict[str, Any]] = []
    for old, new in sorted(outcome.superseded, key=lambda x: (x[0].new_id, x[1].new_id)):
        prov = link_superseded(old, new, recorded.get(new.source_id, EPOCH))
        if prov is not None:
            extra.append(prov)
    del outcome
    images = sorted((dicom.image_ref(i) for i in by_sop.values()),
                    key=lambda r: (r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid))
    if images:
        extra.append(dicom.endpoint())
    targets: dict[int, set[str]] = {}
    for it in final:
        for sid in {it.source_id} | it.extra_sources:
            targets.setdefault(sid, set()).add(it.new_id)
    for c in identity.members:
        targets.setdefault(c.source_id, set()).add(pid)
    provenances: list[tuple[str, SourceInfo]] = []
    for src in sorted(sources, key=lambda s: s.id):
        if targets.get(src.id):
            provenances.append((ids.provenance_id(src.id), src))

    clock.mark("write")
    # -- the bundle, written entry by entry in (type, id) order, the Patient first -------------
    final.sort(key=lambda it: (it.rtype, it.new_id))
    extras: list[tuple[str, str, Any]] = [(str(r["resourceType"]), str(r["id"]), r) for r in extra]
    extras += [("Provenance", prid, src) for prid, src in provenances]
    extras.sort(key=lambda x: (x[0], x[1]))
    unresolved: list[dict[str, Any]] = []
    writer = BundleWriter(new_bundle_path(workdir))
    try:
        body = patient_item.body()
        rewrite(patient_item, body, known, unresolved)
        writer.add(body)
        merged = heapq.merge(((it.rtype, it.new_id, it) for it in final), extras, key=lambda x: (x[0], x[1]))
        for _rtype, _rid, obj in merged:
            if isinstance(obj, Item):
                writer.add(_finished(obj, known, unresolved, docs, purn))
            elif isinstance(obj, SourceInfo):
                src_targets = targets.pop(obj.id)
                writer.add_raw("Provenance", _provenance_entry(obj, src_targets, recorded.get(obj.id, EPOCH)))
            else:
                writer.add(obj)
    finally:
        writer.close()
    quarantine.sort(key=lambda x: (x.source_id, x.kind, x.key, x.reason))
    unresolved.sort(key=lambda u: (u["source_id"], u["from"], u["path"], u["reference"]))
    clock.mark("")
    log.info("normalize: %d quarantined; seconds per phase: %s", len(quarantine), clock.summary())
    return NormalizedRecord(documents=documents, images=images, quarantine=quarantine, unresolved=unresolved,
                            conflicts=identity.conflicts, patient_ref=f"Patient/{pid}", writer=writer)


def _finished(it: Item, known: set[str], unresolved: list[dict[str, Any]], docs: Documents,
              purn: str) -> dict[str, Any]:
    """The bundle form of a kept item: every change decided by the global steps applied to its
    body in one place (references, subject, attachments, superseded links, id, meta.source)."""
    body = it.body()
    rewrite(it, body, known, unresolved)
    if it.rtype in SUBJECT_TYPES and not body.get("subject"):
        body["subject"] = {"reference": purn}
    docs.apply(it, body)
    apply_patch(it, body)
    body["id"] = it.new_id
    if it.rid and not it.derived:
        meta = body.setdefault("meta", {})
        if isinstance(meta, dict) and not meta.get("source"):
            meta["source"] = f"urn:aggregator:source:{it.source_id}#{it.rtype}/{it.rid}"
    return body


def _provenance_entry(src: SourceInfo, targets: set[str], recorded: str) -> bytes:
    """The bundle entry of a source's Provenance, built as bytes: it targets every resource of the
    source, and as dicts that list would be the largest object of a large record."""
    refs = sorted(targets)
    prov = source_provenance(src, refs[:1], recorded)
    assert prov is not None
    one = orjson.dumps(prov["target"])
    text = orjson.dumps({"fullUrl": ids.urn(prov["id"]), "resource": prov})
    full = b"[" + b",".join(b'{"reference":"urn:uuid:%s"}' % r.encode() for r in refs) + b"]"
    head, sep, tail = text.partition(b'"target":' + one)
    assert sep
    return head + b'"target":' + full + tail


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


def _belongs_to(it: Item, resolver: Resolver, others: set[int]) -> bool:
    """True when the item's subject/patient is a Patient that is not the case's patient."""
    for ref in it.facts.patient_refs or ():
        t = resolver.resolve(it, ref)
        if isinstance(t, Item) and id(t) in others:
            return True
    return False


def _loose_document(e: LedgerEntry, purn: str, spool: Spool) -> Item:
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
    item = Item(e.source_id, e.key, dict(e.meta or {}), facts, spool, data, new_id=rid)
    item.refs = tuple(None for _ in reference_nodes(data, []))  # only its subject, already a bundle urn
    return item


def _recorded_times(sources: Sequence[SourceInfo], newest: dict[int, Any]) -> dict[int, str]:
    """Pull time per source; without one, the newest ledger row of the source (still stable)."""
    out: dict[int, str] = {}
    for s in sources:
        t = instant(s.pulled_at) or instant(newest.get(s.id))
        if t:
            out[s.id] = t
    return out


__all__ = ["Candidate", "normalize"]
