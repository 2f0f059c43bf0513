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

Pure and deterministic: inputs are sorted, ids are UUID-5 of stable inputs, times come from the
pulls, never from the clock. The one side effect is storing inline attachment bytes in the
content-addressed blob store (idempotent), so the package writer finds every document there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from aggregator.blobs import BlobStore
from aggregator.ledger import LedgerEntry
from aggregator.model import CaseInfo, NormalizedRecord, Quarantined, SourceInfo
from aggregator.normalize import dicom, ids
from aggregator.normalize.dedup import Context, deduplicate, link_superseded
from aggregator.normalize.documents import KIND_BINARY, Documents
from aggregator.normalize.identity import Candidate, from_instances, from_item, merged_patient, reconcile
from aggregator.normalize.parse import KIND_RESOURCE, Item, load_resources
from aggregator.normalize.provenance import EPOCH, instant, source_provenance
from aggregator.normalize.references import Resolver, rewrite
from aggregator.normalize.references import targets as ref_targets

ANOTHER_PATIENT = "another patient"
#: types whose missing subject means "the case's patient" (loose documents from a download)
SUBJECT_TYPES = frozenset({"DocumentReference", "DiagnosticReport", "Media", "Composition", "Observation",
                           "Condition", "Procedure"})
PATIENT_FIELDS = ("subject", "patient")


def normalize(case: CaseInfo, sources: Sequence[SourceInfo], entries: Iterable[LedgerEntry],
              blobs: BlobStore) -> NormalizedRecord:
    """Build the case's normalized record from the ``done`` ledger rows of all its sources."""
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

    items = load_resources(resource_rows(), blobs, q)
    rows = sorted(side_rows, key=lambda e: (e.source_id, e.kind, e.key))
    instances = dicom.read_instances(rows, blobs, q)
    resolver = Resolver(items, srcmap)
    pid = ids.patient_id(case.id)
    purn = ids.urn(pid)

    # -- identity -----------------------------------------------------------------------------
    patients = [it for it in items if it.rtype == "Patient"]
    cands = {id(it): from_item(it) for it in patients}
    for it in items:
        for fld in PATIENT_FIELDS:
            ref = it.data.get(fld)
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                t = resolver.resolve(it, ref["reference"])
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
    patient_item = Item(base.source_id if base else 0, base.key if base else "patient", dict(base.meta) if base else {},
                        patient, "Patient", pid, new_id=pid)

    kept: list[Item] = []
    for it in items:
        if it.rtype == "Patient":
            continue
        if _belongs_to(it, resolver, others):
            q(Quarantined(it.source_id, KIND_RESOURCE, it.key, ANOTHER_PATIENT))
            continue
        it.new_id = ids.item_id(it.source_id, KIND_RESOURCE, it.key)
        kept.append(it)

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
        st = Item(sid, f"dicom-study:{uid}", {"derived": "dicom"}, dicom.build_study(uid, group, purn),
                  "ImagingStudy", ids.study_id(uid), new_id=ids.study_id(uid),
                  extra_sources={i.source_id for i in group} - {sid})
        study_items[uid] = st
        kept.append(st)

    # -- de-duplication -----------------------------------------------------------------------
    docs = Documents([e for e in rows if e.kind == KIND_BINARY], items, srcmap, blobs)

    def target_id(it: Item, ref: str) -> str | None:
        t = resolver.resolve(it, ref)
        return t.new_id or None if isinstance(t, Item) else None

    outcome = deduplicate(kept, Context(srcmap, target_id, docs.digest,
                                        references=lambda it: ref_targets(it, resolver)))
    dropped = set()
    for lo, win, reason in sorted(outcome.dropped, key=lambda x: (x[0].source_id, x[0].key)):
        dropped.add(id(lo))
        lo.new_id = win.new_id
        win.extra_sources |= {lo.source_id} | lo.extra_sources
        if not lo.meta.get("derived"):
            q(Quarantined(lo.source_id, KIND_RESOURCE, lo.key, reason))
        lo.refs = None  # not rewritten: its cached reference targets are no longer needed
    final = [it for it in kept if id(it) not in dropped]
    for inst in dup_instances:
        st = study_items[inst.study_uid]
        q(Quarantined(inst.source_id, dicom.KIND_DICOM, inst.key, f"duplicate of ImagingStudy/{st.new_id}"))

    # -- references ---------------------------------------------------------------------------
    known = {purn, ids.urn(dicom.ENDPOINT_ID)} | {ids.urn(s.new_id) for s in study_items.values()}
    unresolved: list[dict[str, Any]] = []
    for it in [patient_item, *final]:
        if it.rtype in SUBJECT_TYPES and not it.data.get("subject"):
            it.data["subject"] = {"reference": purn}
        rewrite(it, resolver, known, unresolved)
    # the lookup indexes are the largest thing normalization holds besides the bundle itself
    resolver.release()

    # -- documents ----------------------------------------------------------------------------
    for it in final:
        docs.attach(it)
    for e in rows:
        if e.kind == KIND_BINARY and (e.source_id, e.key) not in docs.used:
            loose = _loose_document(e, purn)
            final.append(loose)
            docs.attach(loose)
    documents = docs.finish(final)

    # -- links, endpoint, provenance ------------------------------------------------------------
    recorded = _recorded_times(sources, newest)
    extra: list[dict[str, Any]] = []
    for old, new in sorted(outcome.superseded, key=lambda x: (x[0].new_id, x[1].new_id)):
        prov = link_superseded(old, new, recorded.get(new.source_id, EPOCH))
        if prov is not None:
            extra.append(prov)
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
    for src in sorted(sources, key=lambda s: s.id):
        prov = source_provenance(src, targets.get(src.id, ()), recorded.get(src.id, EPOCH))
        if prov is not None:
            extra.append(prov)

    resources: list[dict[str, Any]] = []
    for it in final:
        it.data["id"] = it.new_id
        if it.rid and not it.meta.get("derived"):
            meta = it.data.setdefault("meta", {})
            if isinstance(meta, dict) and not meta.get("source"):
                meta["source"] = f"urn:aggregator:source:{it.source_id}#{it.rtype}/{it.rid}"
        resources.append(it.data)
    resources.extend(extra)
    resources.sort(key=lambda r: (str(r["resourceType"]), str(r["id"])))
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": ids.urn(r["id"]), "resource": r} for r in [patient, *resources]]}
    quarantine.sort(key=lambda x: (x.source_id, x.kind, x.key, x.reason))
    unresolved.sort(key=lambda u: (u["source_id"], u["from"], u["path"], u["reference"]))
    return NormalizedRecord(bundle=bundle, documents=documents, images=images, quarantine=quarantine,
                            unresolved=unresolved, conflicts=identity.conflicts, patient_ref=f"Patient/{pid}")


def _belongs_to(it: Item, resolver: Resolver, others: set[int]) -> bool:
    """True when the item's subject/patient is a Patient that is not the case's patient."""
    for fld in PATIENT_FIELDS:
        ref = it.data.get(fld)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            t = resolver.resolve(it, ref["reference"])
            if isinstance(t, Item) and id(t) in others:
                return True
    return False


def _loose_document(e: LedgerEntry, purn: str) -> Item:
    """A binary no resource points at (a loose file): described by a minimal DocumentReference
    rather than dropped; Provenance still names its source."""
    title = str(e.meta.get("file") or e.key).rsplit("/", 1)[-1]
    rid = ids.item_id(e.source_id, KIND_BINARY, e.key)
    att: dict[str, Any] = {"contentType": e.content_type or "application/octet-stream", "url": e.key}
    if title:
        att["title"] = title
    data = {"resourceType": "DocumentReference", "id": rid, "status": "current",
            "subject": {"reference": purn}, "content": [{"attachment": att}]}
    return Item(e.source_id, e.key, dict(e.meta), data, "DocumentReference", "", new_id=rid)


def _recorded_times(sources: Sequence[SourceInfo], newest: dict[int, Any]) -> dict[int, str]:
    """Pull time per source; without one, the newest ledger row of the source (still stable)."""
    out: dict[int, str] = {}
    for s in sources:
        t = instant(s.pulled_at) or instant(newest.get(s.id))
        if t:
            out[s.id] = t
    return out


__all__ = ["Candidate", "normalize"]
