"""Content: whether a candidate carries the underlying data a target asks for, and if not, why.

Apart from the engine because it is the one place that knows what "the document itself" and
"the images" mean (a report's text or results, DICOM instances that match the study's counts);
the rules only ask it for a :class:`State`.
"""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.checklist import reasons as R
from aggregator.checklist.index import RecordIndex, Res, study_label
from aggregator.checklist.loader import Selector
from aggregator.normalize import stubs, uids

PENDING_STATUS = frozenset({"registered", "partial", "preliminary", "in-progress", "draft"})


@dataclass
class State:
    """Whether one candidate resource satisfies a target, and if not, why."""

    ok: bool
    code: str = ""
    detail: str = ""
    reason: R.Reason | None = None


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
