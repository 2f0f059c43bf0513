"""DIMSE connector: C-ECHO, C-FIND, C-GET and C-MOVE against a PACS.

Flow of a pull: C-FIND the patient's studies (PatientID + IssuerOfPatientID), enumerate each
study's series and instances so the expected count is known, then retrieve only what the
ledger does not have yet - the whole study when nothing is stored, otherwise series or
individual instances. Every instance is stored as received (no decode), one ledger row per SOP
Instance UID; instances the archive fails to send become ``failed`` rows with the DIMSE status.
With ``study_hints`` (report to study, ``aggregator.jobs.hints``) each hint is also queried at
STUDY level and its matches join the list; unmatched hints become ``query`` gaps.

Speed and memory: every association (C-ECHO, the capability probe of ``endpoint check``,
queries and retrieves) runs on :class:`~connectors.dimse_link.DimseLink`, one thread reading
PDUs straight off a TCP_NODELAY socket with an unlimited maximum PDU, never decoding an
instance; association PDUs are :mod:`connectors.acse`'s and identifiers
:mod:`connectors.dicom_identifier`'s, so the connector imports neither pydicom (~11 MiB) nor
pynetdicom. pynetdicom is the tests' peer only.

Parallel series: a study of several series (SERIES-level C-FIND, one round trip) is retrieved
series by series, each on its own association, up to ``max_associations`` at once (default 4:
Orthanc's ``DicomThreadsCount``), all feeding one background writer whose queue bounds memory
(:mod:`connectors.parallel`). One series' failure becomes ``failed`` rows for its instances;
an archive that turns an association away for now leaves fewer lanes, never more than it takes.

``cancel()`` (from another thread, e.g. a job being cancelled) sends C-CANCEL-RQ on every
running query or retrieve and stops the pull before its next series or study.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from aggregator.errors import (
    AccessDenied,
    ConfigError,
    ConnectorError,
    ProtocolError,
    TransientConnectorError,
    UsageError,
)
from connectors.base import (
    KIND_DICOM,
    CheckResult,
    Connector,
    ConnectorConfig,
    Cursor,
    PatientRef,
    Progress,
    Sink,
    checkpoints,
    option,
)
from connectors.dicom_identifier import decode_identifier, encode_identifier, patient_key_problem
from connectors.dicom_stream import (
    NO_CRITERIA,
    BackgroundWriter,
    SpoolBuffer,
    StudyHint,
    StudyMatch,
    classify_status,
    file_meta,
    parse_hints,
    patient_studies,
    record_failure,
    record_hint_gap,
    select_hinted,
    store_instance,
)
from connectors.dimse_link import (
    VERIFICATION,
    AssociationAborted,
    AssociationRejected,
    DimseLink,
    PeerProtocolError,
)
from connectors.parallel import LockedProgress, TurnedAway, run_units

if TYPE_CHECKING:
    from connectors.storescp import StorageSCP

log = logging.getLogger(__name__)

#: an identifier's attributes by keyword (see :mod:`connectors.dicom_identifier`)
Keys = dict[str, Any]

#: Maximum PDU we accept: 0 means "no limit", so the archive sends its largest PDUs.
MAX_PDU = 0

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"

#: Transfer syntax UIDs (PS3.6 Annex A); spelled out so a retrieve never imports pydicom.
ImplicitVRLittleEndian = "1.2.840.10008.1.2"
ExplicitVRLittleEndian = "1.2.840.10008.1.2.1"
DeflatedExplicitVRLittleEndian = "1.2.840.10008.1.2.1.99"
ExplicitVRBigEndian = "1.2.840.10008.1.2.2"
JPEGBaseline8Bit = "1.2.840.10008.1.2.4.50"
JPEGExtended12Bit = "1.2.840.10008.1.2.4.51"
JPEGLosslessP14 = "1.2.840.10008.1.2.4.57"
JPEGLosslessSV1 = "1.2.840.10008.1.2.4.70"
JPEGLSLossless = "1.2.840.10008.1.2.4.80"
JPEGLSNearLossless = "1.2.840.10008.1.2.4.81"
JPEG2000Lossless = "1.2.840.10008.1.2.4.90"
JPEG2000 = "1.2.840.10008.1.2.4.91"
RLELossless = "1.2.840.10008.1.2.5"

#: Every transfer syntax gets its own presentation context, so the archive can send each
#: instance in the syntax it stores it in: the acceptor picks ONE syntax per context, and an
#: archive that got [explicit, implicit] in one context transcodes implicit files to explicit.
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
COMPRESSED = [
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLosslessP14,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
    DeflatedExplicitVRLittleEndian,
    "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101",  # MPEG2
    "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103",  # MPEG-4
]
CONTEXTS_PER_CLASS = len(UNCOMPRESSED) + len(COMPRESSED)
MAX_CONTEXTS = 128

#: Storage classes proposed when the archive cannot tell us which classes a study holds.
COMMON_STORAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
]

CANCEL_STATUS = 0xFE00

#: DIMSE failure statuses that mean "you are not allowed", not "try again".
REFUSED_STATUSES = {0x0122, 0x0124, 0xA701, 0xA702, 0xA801, 0xA900}

@dataclass
class DimseConfig(ConnectorConfig):
    host: str = option(help="The archive's host.")
    port: int = option(help="The archive's port.")
    called_ae: str = option(help="The archive's AE title.")
    calling_ae: str = option("AGGREGATOR", help="Our AE title.")
    retrieve: str = option("get", help="C-GET or C-MOVE.", choices=("get", "move"))
    move_ae: str | None = option(None, help="AE title C-MOVE sends to (our storage SCP).")
    store_port: int | None = option(None, help="Port of our storage SCP for C-MOVE.")
    store_host: str = option("127.0.0.1", help="Address our storage SCP binds to.")
    acse_timeout: float = option(30, help="Association timeout in seconds.")
    dimse_timeout: float = option(120, help="DIMSE response timeout in seconds.", aliases=("timeout",))
    network_timeout: float = option(60, help="Network idle timeout in seconds.", aliases=("timeout",))
    max_associations: int = option(4, help="Associations retrieving a study's series at once (C-GET/C-MOVE); "
                                   "fewer when the archive turns one away for now.")
    modalities: str | None = option(None, help="Only these modalities, e.g. CT,MR.")
    date_from: str | None = option(None, help="Only studies on or after YYYYMMDD.")
    date_to: str | None = option(None, help="Only studies on or before YYYYMMDD.")
    #: Report-to-study hints from the case's FHIR data (``aggregator.jobs.hints``): each is also
    #: queried at STUDY level and its matches retrieved; see ``dicom_stream.select_hinted``.
    study_hints: list[dict[str, Any]] | None = option(None, help="Set by the pull runner.", cli=False)

    def __post_init__(self) -> None:
        if self.retrieve not in ("get", "move"):
            raise ConfigError("retrieve must be 'get' or 'move'", item="retrieve")
        if self.retrieve == "move" and not self.store_port:
            raise ConfigError("C-MOVE needs --store-port for the built-in storage SCP", item="store_port")
        for name in ("called_ae", "calling_ae", "move_ae"):
            value = getattr(self, name)
            if value is not None and not (0 < len(value.strip()) <= 16):
                raise ConfigError("an AE title has 1 to 16 characters", item=name)
        if not (0 < int(self.port) < 65536):
            raise ConfigError("port must be 1-65535", item="port")
        if int(self.max_associations) < 1:
            raise ConfigError("max_associations must be at least 1", item="max_associations")


# --- what the archive told us -------------------------------------------------------------------


@dataclass
class InstanceInfo:
    sop_uid: str
    sop_class_uid: str
    series_uid: str


@dataclass
class StudyInfo:
    study_uid: str
    count: int | None
    sop_classes: list[str] = field(default_factory=list)
    instances: dict[str, InstanceInfo] = field(default_factory=dict)
    series: dict[str, list[str]] = field(default_factory=dict)
    enumerated: bool = False
    #: the study's series and their instance counts (SERIES-level C-FIND), for retrieving
    #: them in parallel before the instances are enumerated
    series_counts: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class _Unit:
    """One retrieve request: a study, a series, or a list of instances (IMAGE level)."""

    level: str
    series_uid: str | None
    sops: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()


@dataclass
class _Retrieval:
    """Book-keeping for one study: what we expect, what arrived; sink calls go through ``writer``."""

    sink: Sink
    progress: Progress
    study: StudyInfo
    writer: BackgroundWriter | None = None
    received: set[str] = field(default_factory=set)
    final_status: str = "0xA702"
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: why a unit that failed did (its error), by series UID (None: the whole study) ...
    failed_series: dict[str | None, ConnectorError] = field(default_factory=dict)
    #: ... and by SOP Instance UID for IMAGE-level units
    failed_sops: dict[str, ConnectorError] = field(default_factory=dict)

    def missing_reason(self, sop_uid: str) -> tuple[str, str | int | None]:
        """Reason and status for an instance that did not arrive: its unit's error when it failed."""
        info = self.study.instances.get(sop_uid)
        err = self.failed_sops.get(sop_uid)
        if err is None and info is not None:
            err = self.failed_series.get(info.series_uid)
        if err is None:
            err = self.failed_series.get(None)
        if err is not None:
            return f"its retrieve failed: {err.message}", err.status
        return "the archive did not send this instance", self.final_status

    def run(self, job: Callable[[], None], size: int = 0) -> None:
        if self.writer is not None:
            self.writer.submit(job, size)
        else:
            job()

    def fail(self, sop_uid: str, reason: str, status: int | str | None) -> None:
        info = self.study.instances.get(sop_uid)
        meta = {"study_uid": self.study.study_uid, "series_uid": info.series_uid if info else None}
        self.run(lambda: record_failure(self.sink, sop_uid, reason, status, meta))

    def on_instance(self, sop_class: str, sop_uid: str, ts: str, source_ae: str, data: SpoolBuffer) -> int:
        """Frame and store one received dataset; return the C-STORE status to answer with."""
        info = self.study.instances.get(sop_uid)
        meta = {"study_uid": self.study.study_uid, "series_uid": info.series_uid if info else None,
                "sop_class_uid": sop_class, "transfer_syntax": ts}
        with self.lock:
            if sop_uid in self.received or self.sink.is_done(KIND_DICOM, sop_uid):
                self.received.add(sop_uid)
                data.close()
                self.progress.advance(1)
                return 0x0000  # duplicate delivery: collapse onto the stored copy
            self.received.add(sop_uid)
            header = file_meta(sop_class, sop_uid, ts, source_ae)

            def job() -> None:
                try:
                    store_instance(self.sink, itertools.chain((header,), data.iter_chunks()),
                                   sop_uid=sop_uid, meta=meta)
                finally:
                    data.close()

            self.run(job, data.size)
            self.progress.advance(1)
        return 0x0000


class DimseConnector(Connector):
    """Query/retrieve one DICOM archive over DIMSE."""

    kind: ClassVar[str] = "dimse"
    config_type: ClassVar[type[ConnectorConfig]] = DimseConfig
    #: told to cancel, the pull ends by itself (C-CANCEL-RQ, then the peer's Cancel status);
    #: a caller's progress must not raise in the middle of a C-GET, which would abort it
    stops_itself_on_cancel: ClassVar[bool] = True

    def __init__(self, config: ConnectorConfig) -> None:
        if not isinstance(config, DimseConfig):
            raise ConfigError("DimseConnector needs a DimseConfig")
        super().__init__(config)
        self.cfg: DimseConfig = config
        self._cancel = threading.Event()

    # -- check -----------------------------------------------------------------------------

    def check(self) -> CheckResult:
        """C-ECHO, then probe which C-FIND/C-GET/C-MOVE models and levels the archive accepts."""
        details: dict[str, Any] = {"host": self.cfg.host, "port": self.cfg.port, "called_ae": self.cfg.called_ae}
        t0 = time.perf_counter()
        link = self._open_link([(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
        code: int | None = None
        try:
            try:
                code = link.echo()
            except KeyError:
                details["echo_error"] = "the archive does not accept the Verification SOP class"
            except AssociationAborted as exc:
                details["echo_error"] = str(exc)
        finally:
            link.release()
        details["echo"] = code == 0
        details["echo_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        if code != 0:
            details["echo_status"] = None if code is None else f"0x{code:04X}"
            return CheckResult(False, details)

        probe = [(m, UNCOMPRESSED) for m in (PATIENT_ROOT_FIND, STUDY_ROOT_FIND, STUDY_ROOT_GET, STUDY_ROOT_MOVE)]
        prober = _Prober(self, probe)
        try:
            accepted = {ab for ab, _ in prober.link.accepted.values()}
            details["find"] = {lvl: prober.run(self._probe_find, lvl) for lvl in ("PATIENT", "STUDY", "SERIES", "IMAGE")
                               if STUDY_ROOT_FIND in accepted or lvl == "PATIENT"}
            details["get"] = {lvl: prober.run(self._probe_get, lvl) for lvl in ("STUDY", "SERIES", "IMAGE")} \
                if STUDY_ROOT_GET in accepted else {}
            details["move"] = {lvl: prober.run(self._probe_move, lvl) for lvl in ("STUDY", "SERIES", "IMAGE")} \
                if STUDY_ROOT_MOVE in accepted else {}
        finally:
            prober.link.release()
        works = {"get": any(details["get"].values()), "move": any(details["move"].values())}
        details["retrieve_works"] = works
        return CheckResult(bool(works[self.cfg.retrieve]), details)

    def _probe_find(self, link: DimseLink, level: str) -> bool:
        ds = _query(level, StudyInstanceUID="2.25.1" if level != "PATIENT" else None)
        model = PATIENT_ROOT_FIND if level == "PATIENT" else STUDY_ROOT_FIND
        if level == "PATIENT":
            ds["PatientID"] = "AGGREGATOR-PROBE-NO-SUCH-ID"
        try:
            cid_ts = link.context_for(model)
        except KeyError:
            return False
        for code, _ in link.find(model, encode_identifier(ds, cid_ts[1])):
            st = classify_status(code)
            if not (st.ok or st.pending):
                return False
        return True

    def _probe_get(self, link: DimseLink, level: str) -> bool:
        return self._probe_retrieve(link, "get", level)

    def _probe_move(self, link: DimseLink, level: str) -> bool:
        return self._probe_retrieve(link, "move", level)

    def _probe_retrieve(self, link: DimseLink, op: str, level: str) -> bool:
        """A retrieve of a UID that does not exist: allowed archives answer success/0 sub-ops."""
        ds = _query(level, StudyInstanceUID="2.25.1")
        if level in ("SERIES", "IMAGE"):
            ds["SeriesInstanceUID"] = "2.25.1.1"
        if level == "IMAGE":
            ds["SOPInstanceUID"] = "2.25.1.2"
        model = STUDY_ROOT_GET if op == "get" else STUDY_ROOT_MOVE
        try:
            _, ts = link.context_for(model)
        except KeyError:
            return False
        code, _, _ = link.retrieve("C-GET" if op == "get" else "C-MOVE", model, encode_identifier(ds, ts),
                                   _refuse_store, self.cfg.move_ae or self.cfg.calling_ae)
        return not (code in REFUSED_STATUSES or 0xA800 <= code <= 0xA8FF)

    def cancel(self) -> None:
        """Cancel the running pull from another thread: C-CANCEL-RQ on every association, nothing after.

        The pull then ends with a :class:`TransientConnectorError` saying it was cancelled;
        what was stored before stays stored (and in the ledger).
        """
        self._cancel.set()

    def _check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise TransientConnectorError("the pull was cancelled", item=self.cfg.called_ae, status="0xFE00")

    # -- pull ------------------------------------------------------------------------------

    def pull(self, patient: PatientRef, since: Cursor | None, sink: Sink, progress: Progress) -> Cursor:
        """Find the patient's studies, then retrieve each (see the module docstring).

        First pull of a source (no cursor): each study is retrieved whole at once, and its
        instances are enumerated afterwards only when fewer arrived than the study-level count
        announced (to name the missing ones). Instances already in the ledger are still skipped
        when they arrive. Later pulls (a cursor exists): enumerate first and fetch only the
        missing series or instances. The complete studies are checkpointed after each study
        (and an empty checkpoint with the first rows), so a pull resumed after an interruption
        skips those studies and fetches only the instances the ledger does not have.
        """
        hints = parse_hints(self.cfg.study_hints)
        if not patient.id and not hints:
            raise UsageError("a DIMSE pull needs the patient's PatientID at this archive (or study hints)")
        problem = patient_key_problem(patient.id, patient.issuer)
        if problem:
            raise UsageError(problem)
        started = time.monotonic()
        done_before: dict[str, int] = {}
        # the last finished pull's complete studies, then those of interrupted pulls since
        for value in [(since or {}).get("studies") or {}, *checkpoints(since, "studies")]:
            studies_done = value.get("studies") if isinstance(value, dict) else None
            if isinstance(studies_done, dict):
                done_before.update(studies_done)
        found = self._find_studies(patient, sink) if patient.id else []
        if hints:
            found += self._find_hinted(patient, hints, {s.study_uid for s in found}, sink)
        studies = [s for s in found if not (s.count is not None and done_before.get(s.study_uid) == s.count)]
        progress = LockedProgress(progress)  # lanes of a parallel retrieve advance it at once
        progress.set_total(sum(s.count or 0 for s in studies) or None)
        sink.set_method("C-GET" if self.cfg.retrieve == "get" else "C-MOVE")
        complete = dict(done_before)
        # from the first batch of rows on, a resumed pull has a cursor: it enumerates a study
        # and fetches only what the ledger lacks, instead of the whole study again
        sink.checkpoint({"studies": {"studies": dict(complete)}})
        sink.is_done(KIND_DICOM, "")  # the ledger's done set is loaded here, not raced for by lanes
        optimistic = {s.study_uid for s in studies if since is None and (
            self.cfg.retrieve == "move" or 0 < len(s.sop_classes) <= _classes_per_association())}
        if self._lanes() > 1:
            self._find_series([s for s in studies if s.study_uid in optimistic and (s.count is None or s.count > 1)])
        with BackgroundWriter() as writer:
            for study in studies:
                self._check_cancelled()
                retrieval = _Retrieval(sink, progress, study, writer)
                if study.study_uid in optimistic:
                    self._retrieve_then_verify(study, retrieval)
                else:
                    self._enumerate(study)
                    missing = [uid for uid in study.instances if not sink.is_done(KIND_DICOM, uid)]
                    progress.advance(len(study.instances) - len(missing))
                    if missing:
                        self._retrieve_study(study, missing, retrieval)
                writer.drain()
                if study.enumerated:
                    for sop in study.instances:
                        if sop not in retrieval.received and not sink.is_done(KIND_DICOM, sop):
                            retrieval.fail(sop, *retrieval.missing_reason(sop))
                    writer.drain()
                    if all(sink.is_done(KIND_DICOM, u) for u in study.instances):
                        complete[study.study_uid] = len(study.instances)
                elif study.count is not None and len(retrieval.received) >= study.count:
                    complete[study.study_uid] = study.count
                sink.checkpoint({"studies": {"studies": dict(complete)}})
        self._check_cancelled()
        log.info("dimse pull: %d studies, %.1fs", len(studies), time.monotonic() - started)
        return {"studies": {"studies": complete}}

    def _retrieve_then_verify(self, study: StudyInfo, retrieval: _Retrieval) -> None:
        """Retrieve the whole study; enumerate its instances only if fewer arrived than announced.

        The IMAGE-level C-FIND costs the archive about as much as sending the study, so it is
        skipped when the study-level count already shows that everything came. A study of
        several series (known from :meth:`_find_series`) is retrieved series by series over
        up to ``max_associations`` associations at once.
        """
        classes = tuple(study.sop_classes)
        if self._lanes() > 1 and len(study.series_counts) > 1:
            by_size = sorted(study.series_counts, key=lambda s: -(study.series_counts[s] or 0))
            units = [_Unit("SERIES", series_uid, (), classes) for series_uid in by_size]
        else:
            units = [_Unit("STUDY", None, (), classes)]
        self._run_units(study, units, retrieval)
        if study.count is None or len(retrieval.received) < study.count:
            try:
                self._enumerate(study)
            except ConnectorError as exc:
                if retrieval.failed_series:
                    # a series failed and its instances cannot be named: the pull fails, not silently
                    raise next(iter(retrieval.failed_series.values())) from exc
                log.info("instance enumeration not available for %s: %s", study.study_uid, exc.message)

    def _lanes(self) -> int:
        return max(1, int(self.cfg.max_associations))

    def _find_series(self, studies: Sequence[StudyInfo]) -> None:
        """Each study's series with their instance counts: one SERIES-level C-FIND per study.

        Costs one association and a round trip per study; a study found to hold several series
        is then retrieved series by series in parallel. An archive that does not answer at
        SERIES level only loses the parallelism (the study is retrieved whole, as before).
        """
        if not studies:
            return
        try:
            link = self._open_link([(STUDY_ROOT_FIND, UNCOMPRESSED)])
        except ConnectorError as exc:
            log.info("no SERIES-level query (%s): studies are retrieved whole", exc.message)
            return
        ok = False
        try:
            for study in studies:
                sq = _query("SERIES", StudyInstanceUID=study.study_uid, SeriesInstanceUID="",
                            NumberOfSeriesRelatedInstances="")
                counts = {str(ds.get("SeriesInstanceUID") or ""): _int(ds.get("NumberOfSeriesRelatedInstances"))
                          for ds in _find(link, sq, STUDY_ROOT_FIND)}
                counts.pop("", None)
                known = [c for c in counts.values() if c is not None]
                if study.count is None or len(known) < len(counts) or sum(known) == study.count:
                    study.series_counts = counts  # else the answer is incomplete: retrieve the study whole
            ok = True
        except ConnectorError as exc:
            log.info("SERIES-level query failed (%s): studies are retrieved whole", exc.message)
        finally:
            link.release() if ok else link.abort()

    def _find_studies(self, patient: PatientRef, sink: Sink) -> list[StudyInfo]:
        """The patient's studies (PATIENT then STUDY level C-FIND), issuer and filters applied.

        Other patients' studies are left out, and reported where the PatientID alone cannot
        tell (:func:`~connectors.dicom_stream.patient_studies`).
        """
        link = self._open_link([(STUDY_ROOT_FIND, UNCOMPRESSED), (PATIENT_ROOT_FIND, UNCOMPRESSED)])
        ok = False
        try:
            accepted = {ab for ab, _ in link.accepted.values()}
            if STUDY_ROOT_FIND not in accepted:
                raise AccessDenied("the archive does not accept Study Root C-FIND", item=self.cfg.called_ae)
            if PATIENT_ROOT_FIND in accepted:
                pq = _query("PATIENT", PatientID=patient.id, IssuerOfPatientID=patient.issuer or "")
                n_patients = sum(1 for ds in _find(link, pq, PATIENT_ROOT_FIND) if _issuer_matches(ds, patient.issuer))
                log.debug("patient-level C-FIND: %d match(es)", n_patients)
            sq = _query("STUDY", PatientID=patient.id, IssuerOfPatientID=patient.issuer or "",
                        StudyInstanceUID="", StudyDate=_date_range(self.cfg.date_from, self.cfg.date_to),
                        ModalitiesInStudy="", NumberOfStudyRelatedInstances="", SOPClassesInStudy="",
                        PatientName="", PatientBirthDate="")
            matches = [_study_match(ds) for ds in _find(link, sq, STUDY_ROOT_FIND)]
            ok = True
        finally:
            link.release() if ok else link.abort()
        return [StudyInfo(m.study_uid, m.count, sop_classes=list(m.sop_classes))
                for m in patient_studies(matches, patient, self.cfg.modalities, sink)]

    def _find_hinted(self, patient: PatientRef, hints: Sequence[StudyHint], known: set[str],
                     sink: Sink) -> list[StudyInfo]:
        """Studies named by report hints that the PatientID query did not already find.

        One STUDY-level C-FIND per hint on one association; unmatched hints become ``query``
        gaps (see the rule in ``dicom_stream``). Demographics are returned by the query so a
        match under another PatientID can be checked against the patient.
        """
        link = self._open_link([(STUDY_ROOT_FIND, UNCOMPRESSED)])
        ok = False
        out: list[StudyInfo] = []
        try:
            for hint in hints:
                how = hint.criterion(patient.id)
                if how is None:
                    record_hint_gap(sink, hint, *NO_CRITERIA)
                    continue
                keys: dict[str, Any] = {
                    "StudyInstanceUID": hint.study_uid if how == "uid" else "",
                    "AccessionNumber": hint.accession if how == "accession" else "",
                    "PatientID": patient.id if how == "date+modality" else "",
                    "StudyDate": hint.date if how == "date+modality" else "",
                    "ModalitiesInStudy": hint.modality if how == "date+modality" else "",
                    "IssuerOfPatientID": "", "PatientName": "", "PatientBirthDate": "",
                    "NumberOfStudyRelatedInstances": "", "SOPClassesInStudy": "",
                }
                matches = [_study_match(ds) for ds in _find(link, _query("STUDY", **keys), STUDY_ROOT_FIND)]
                taken, reason, status = select_hinted(hint, how, [m for m in matches if m.study_uid], patient)
                if not taken:
                    record_hint_gap(sink, hint, reason or "no match", status or "not-found")
                    continue
                for m in taken:
                    log.info("study hint %s matched study %s on %s", hint.ref, m.study_uid, how)
                    if m.study_uid not in known:
                        known.add(m.study_uid)
                        out.append(StudyInfo(m.study_uid, m.count, sop_classes=list(m.sop_classes)))
            ok = True
        finally:
            link.release() if ok else link.abort()
        return out

    def _enumerate(self, study: StudyInfo) -> None:
        """Instances of a study in one IMAGE-level C-FIND keyed by StudyInstanceUID (own association)."""
        link = self._open_link([(STUDY_ROOT_FIND, UNCOMPRESSED)])
        ok = False
        try:
            iq = _query("IMAGE", StudyInstanceUID=study.study_uid, SeriesInstanceUID="", SOPInstanceUID="",
                        SOPClassUID="")
            found: dict[str, InstanceInfo] = {}
            for ds in _find(link, iq, STUDY_ROOT_FIND):
                sop = str(ds.get("SOPInstanceUID", "") or "")
                if sop:
                    found[sop] = InstanceInfo(sop, str(ds.get("SOPClassUID", "") or ""),
                                              str(ds.get("SeriesInstanceUID", "") or ""))
            ok = True
        finally:
            link.release() if ok else link.abort()
        for sop, info in found.items():
            study.instances[sop] = info
            study.series.setdefault(info.series_uid, []).append(sop)
        study.enumerated = True

    # -- retrieve --------------------------------------------------------------------------

    def _retrieve_study(self, study: StudyInfo, missing: list[str], retrieval: _Retrieval) -> None:
        """Retrieve what is missing: the study (or its series in parallel), whole series, or lists of instances."""
        units: list[_Unit] = []
        if len(missing) == len(study.instances):
            if self._lanes() > 1 and len(study.series) > 1:
                units += [_Unit("SERIES", series_uid, tuple(sops)) for series_uid, sops in study.series.items()]
            else:
                units.append(_Unit("STUDY", None, tuple(missing)))
        else:
            missing_set = set(missing)
            for series_uid, sops in study.series.items():
                todo = [s for s in sops if s in missing_set]
                if not todo:
                    continue
                if len(todo) == len(sops):
                    units.append(_Unit("SERIES", series_uid, tuple(todo)))
                else:
                    for i in range(0, len(todo), 200):
                        units.append(_Unit("IMAGE", series_uid, tuple(todo[i : i + 200])))
        if self.cfg.retrieve == "move":
            self._run_units(study, units, retrieval)
            return
        planned: list[_Unit] = []
        for unit in units:
            classes = sorted({study.instances[s].sop_class_uid for s in unit.sops if s in study.instances} - {""})
            batches = _class_batches(classes or study.sop_classes or COMMON_STORAGE_CLASSES)
            if len(batches) == 1:
                planned.append(_Unit(unit.level, unit.series_uid, unit.sops, tuple(batches[0])))
                continue
            # too many SOP classes for one association (128 contexts): instance lists per class group
            for n, batch in enumerate(batches):
                by_series: dict[str, list[str]] = {}
                for sop in unit.sops:
                    info = study.instances[sop]
                    if info.sop_class_uid in batch or (n == 0 and not info.sop_class_uid):
                        by_series.setdefault(info.series_uid, []).append(sop)
                for series, items in by_series.items():
                    for i in range(0, len(items), 200):
                        planned.append(_Unit("IMAGE", series, tuple(items[i : i + 200]), tuple(batch)))
        self._run_units(study, planned, retrieval)

    def _run_units(self, study: StudyInfo, units: Sequence[_Unit], retrieval: _Retrieval) -> None:
        """Run the retrieve units over up to ``max_associations`` associations at once.

        A unit that fails (its association aborted, a failure status with nothing sent) is
        remembered with its error, so its instances become ``failed`` ledger rows with that
        reason while the other units' instances are kept; only when every unit failed does the
        study's first error end the pull, as a single whole-study retrieve always did. A cancel
        (``cancel()`` or the job's) ends every association and the pull.
        """
        def work(unit: _Unit) -> None:
            try:
                self._retrieve_unit(study, unit, retrieval)
            except TransientConnectorError as exc:
                if isinstance(exc.__cause__, AssociationRejected) and exc.__cause__.transient:
                    raise TurnedAway(exc) from exc
                raise

        lanes = min(self._lanes(), len(units))
        if self.cfg.retrieve == "move":
            with self._storage_scp(retrieval):
                errors = run_units(units, work, lanes=lanes, stop=self._cancel, name="dimse-move")
        else:
            errors = run_units(units, work, lanes=lanes, stop=self._cancel, name="dimse-get")
        self._check_cancelled()
        failed = [(u, e) for u, e in zip(units, errors, strict=True) if e is not None]
        for _, err in failed:
            if not isinstance(err, ConnectorError):
                raise err  # our own fault, not the archive's: never recorded as an item failure
        if failed and len(failed) == len(units):
            raise failed[0][1]
        for unit, err in failed:
            assert isinstance(err, ConnectorError)
            log.warning("retrieve of %s %s of study %s failed: %s", unit.level.lower(), unit.series_uid or "",
                        study.study_uid, err.message)
            if unit.level == "IMAGE":
                retrieval.failed_sops.update((sop, err) for sop in unit.sops)
            else:
                retrieval.failed_series[unit.series_uid] = err

    def _retrieve_unit(self, study: StudyInfo, unit: _Unit, retrieval: _Retrieval) -> None:
        ds = _query(unit.level, StudyInstanceUID=study.study_uid)
        if unit.level in ("SERIES", "IMAGE") and unit.series_uid:
            ds["SeriesInstanceUID"] = unit.series_uid
        if unit.level == "IMAGE":
            ds["SOPInstanceUID"] = list(unit.sops) if len(unit.sops) > 1 else unit.sops[0]
        if self.cfg.retrieve == "get":
            self._c_get(ds, list(unit.classes) or COMMON_STORAGE_CLASSES, retrieval)
        else:
            self._c_move(ds, retrieval)

    def _link(self) -> DimseLink:
        return DimseLink(self.cfg.host, int(self.cfg.port), calling_ae=self.cfg.calling_ae,
                         called_ae=self.cfg.called_ae, connect_timeout=self.cfg.network_timeout,
                         acse_timeout=self.cfg.acse_timeout, dimse_timeout=self.cfg.dimse_timeout,
                         cancel_event=self._cancel)

    def _open_link(self, contexts: Sequence[tuple[str, Sequence[str]]], roles: Sequence[str] = ()) -> DimseLink:
        """A lean association for a retrieve (see :class:`DimseLink`), errors translated."""
        link = self._link()
        where = f"{self.cfg.called_ae}@{self.cfg.host}:{self.cfg.port}"
        try:
            link.associate(contexts, roles)
        except AssociationRejected as exc:
            fields = f"result/source/reason {exc.result}/{exc.source}/{exc.reason}"
            if exc.transient:
                raise TransientConnectorError(f"the archive turned the association away for now ({fields})",
                                              item=where) from exc
            raise AccessDenied(
                f"the archive rejected the association ({fields}); it must know calling "
                f"AE title {self.cfg.calling_ae!r} (and our host) and answer to {self.cfg.called_ae!r}",
                item=where) from exc
        except AssociationAborted as exc:
            raise TransientConnectorError(f"association failed: {exc.message}", item=where) from exc
        except PeerProtocolError as exc:
            raise ProtocolError(f"association failed: {exc.message}", item=where) from exc
        except ValueError as exc:
            raise ConfigError(f"cannot build the association request: {exc}", item=where) from exc
        return link

    def _c_get(self, ds: Keys, classes: list[str], retrieval: _Retrieval) -> None:
        contexts: list[tuple[str, Sequence[str]]] = [(STUDY_ROOT_GET, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        for c in classes:
            contexts.extend((c, [ts]) for ts in (*UNCOMPRESSED, *COMPRESSED))
        link = self._open_link(contexts, classes)
        self._retrieve_on(link, "C-GET", STUDY_ROOT_GET, ds, retrieval, None)

    def _storage_scp(self, retrieval: _Retrieval) -> StorageSCP:
        """Our storage SCP for a study's C-MOVEs: one listener, whatever number of associations."""
        from connectors.storescp import StorageSCP

        dest = self.cfg.move_ae or self.cfg.calling_ae
        return StorageSCP(ae_title=dest, host=self.cfg.store_host, port=int(self.cfg.store_port or 0),
                          handler=retrieval.on_instance, allowed_calling_ae=self.cfg.called_ae,
                          acse_timeout=self.cfg.acse_timeout, dimse_timeout=self.cfg.dimse_timeout,
                          network_timeout=self.cfg.network_timeout)

    def _c_move(self, ds: Keys, retrieval: _Retrieval) -> None:
        """One C-MOVE association; the study's storage SCP (see :meth:`_run_units`) is listening."""
        dest = self.cfg.move_ae or self.cfg.calling_ae
        link = self._open_link([(STUDY_ROOT_MOVE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
        self._retrieve_on(link, "C-MOVE", STUDY_ROOT_MOVE, ds, retrieval, dest)

    def _retrieve_on(self, link: DimseLink, op: str, model: str, ds: Keys, retrieval: _Retrieval,
                     dest: str | None) -> None:
        study_uid = retrieval.study.study_uid
        ok = False
        sent_here = [0]  # instances this C-GET brought (C-MOVE's arrive at the SCP: the study's count)

        def on_instance(sop_class: str, sop_uid: str, ts: str, source_ae: str, data: SpoolBuffer) -> int:
            sent_here[0] += 1
            return retrieval.on_instance(sop_class, sop_uid, ts, source_ae, data)

        try:
            try:
                _, ts = link.context_for(model)
            except KeyError:
                raise AccessDenied(f"the archive does not accept {op} (Study Root)", item=study_uid) from None
            try:
                identifier = encode_identifier(ds, ts)
            except ValueError as exc:
                raise ProtocolError(f"cannot encode the {op} identifier", item=study_uid) from exc
            try:
                final, data, rsp_ts = link.retrieve(op, model, identifier, on_instance, dest)
            except AssociationAborted as exc:
                raise TransientConnectorError(f"{op} interrupted: {exc.message}", item=study_uid) from exc
            except PeerProtocolError as exc:
                raise ProtocolError(f"{op} interrupted: {exc.message}", item=study_uid) from exc
            if final == CANCEL_STATUS and self._cancel.is_set():
                ok = True  # the association itself is fine: release it
                raise TransientConnectorError(f"{op} was cancelled", item=study_uid, status="0xFE00")
            failed_ds = None
            if data:
                try:
                    failed_ds = decode_identifier(data, rsp_ts)
                except ValueError:
                    log.warning("%s final identifier of study %s could not be decoded", op, study_uid)
            self._conclude(final, failed_ds, retrieval, op,
                           sent_here[0] if op == "C-GET" else len(retrieval.received))
            ok = True
        finally:
            if ok:
                link.release()
            else:
                link.abort()

    def _conclude(self, final: int, identifier: Keys | None, retrieval: _Retrieval, op: str, received: int) -> None:
        """Classify the final C-GET/C-MOVE status; record failed SOP instances with it.

        ``received`` is how many instances this retrieve brought: a failure status with none
        is the retrieve's failure, with some it is a partial success.
        """
        study_uid = retrieval.study.study_uid
        failed_list: list[str] = []
        if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
            value = identifier["FailedSOPInstanceUIDList"]
            failed_list = [str(v) for v in ([value] if isinstance(value, str) else list(value)) if v]
        st = classify_status(final)
        if op == "C-MOVE" and not st.ok and not received and (final == 0xA801 or not failed_list):
            # 0xA801 is "move destination unknown"; Orthanc and others answer a bare 0xC000
            dest = self.cfg.move_ae or self.cfg.calling_ae
            raise AccessDenied(
                f"the archive refused the C-MOVE (status {st.hex}): it must know move destination AE "
                f"{dest!r} at host {self.cfg.store_host} port {self.cfg.store_port}",
                item=study_uid, status=st.hex)
        if final in REFUSED_STATUSES and not received:
            raise AccessDenied(f"the archive refused the {op} (status {st.hex})", item=study_uid, status=st.hex)
        if not st.ok or st.category == "Warning":
            retrieval.final_status = st.hex
        for sop in failed_list:
            with retrieval.lock:
                if sop in retrieval.received:
                    continue
                retrieval.received.add(sop)  # recorded: not reported again as "not sent"
            retrieval.fail(sop, f"the archive reported this instance failed in {op}", st.hex)
        if st.category == "Warning":
            log.warning("%s of study %s completed with warning %s", op, study_uid, st.hex)
        elif not st.ok and not received:
            raise ConnectorError(f"{op} failed (status {st.hex})", item=study_uid, status=st.hex)


# --- helpers ----------------------------------------------------------------------------------


class _Prober:
    """One association for the capability probe, reopened when a probe ends it (abort, timeout)."""

    def __init__(self, connector: DimseConnector, contexts: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.connector, self.contexts = connector, contexts
        self.link = connector._open_link(contexts)

    def run(self, probe: Callable[[DimseLink, str], bool], level: str) -> bool:
        if self.link.sock is None:
            self.link = self.connector._open_link(self.contexts)
        try:
            return probe(self.link, level)
        except (AssociationAborted, PeerProtocolError, ValueError) as exc:
            log.info("probe at %s level failed: %s", level, exc)
            self.link.abort()
            return False


def _refuse_store(sop_class: str, sop_uid: str, ts: str, source_ae: str, data: SpoolBuffer) -> int:
    """A probe retrieves nothing: a C-STORE arriving anyway is refused (out of resources)."""
    data.close()
    return 0xA700


def _query(level: str, **keys: Any) -> Keys:
    """An identifier's attributes; ``None`` values are left out (empty ones are return keys)."""
    ds: Keys = {"QueryRetrieveLevel": level}
    ds.update((k, v) for k, v in keys.items() if v is not None)
    return ds


def _find(link: DimseLink, ds: Keys, model: str) -> Iterator[Keys]:
    """Yield the identifiers of a C-FIND; errors become connector errors (without the query)."""
    level = str(ds["QueryRetrieveLevel"])
    try:
        _, ts = link.context_for(model)
    except KeyError:
        raise AccessDenied("the archive does not accept this C-FIND model", item=level) from None
    try:
        identifier = encode_identifier(ds, ts)
    except ValueError as exc:
        raise ProtocolError("cannot encode the C-FIND identifier", item=level) from exc
    try:
        for code, data in link.find(model, identifier):
            st = classify_status(code)
            if st.pending:
                if data:
                    try:
                        yield decode_identifier(data, ts)
                    except ValueError as exc:
                        raise ProtocolError("a C-FIND response could not be decoded", item=level) from exc
                continue
            if st.category == "Cancel":
                raise TransientConnectorError(f"C-FIND at {level} level was cancelled", item=level, status=st.hex)
            if not st.ok:
                cls = AccessDenied if st.code in REFUSED_STATUSES else ConnectorError
                raise cls(f"C-FIND at {level} level failed (status {st.hex})", item=level, status=st.hex)
    except AssociationAborted as exc:
        raise TransientConnectorError(f"C-FIND interrupted: {exc.message}", item=level) from exc
    except PeerProtocolError as exc:
        raise ProtocolError(f"C-FIND interrupted: {exc.message}", item=level) from exc


def _study_match(ds: Keys) -> StudyMatch:
    """What a STUDY-level C-FIND answer says about a study and its patient."""
    return StudyMatch(
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        issuer=str(ds.get("IssuerOfPatientID", "") or "").strip(),
        name=str(ds.get("PatientName", "") or ""),
        birth_date=str(ds.get("PatientBirthDate", "") or ""),
        accession=str(ds.get("AccessionNumber", "") or "").strip(),
        date=str(ds.get("StudyDate", "") or ""),
        modalities=frozenset(_modalities(ds.get("ModalitiesInStudy"))),
        count=_int(ds.get("NumberOfStudyRelatedInstances")),
        sop_classes=tuple(sorted(_modalities_raw(ds.get("SOPClassesInStudy")))),
    )


def _issuer_matches(ds: Keys, issuer: str | None) -> bool:
    """With an issuer given, a different non-empty IssuerOfPatientID means another patient."""
    if not issuer:
        return True
    got = str(ds.get("IssuerOfPatientID", "") or "").strip()
    return got == issuer.strip()


def _date_range(date_from: str | None, date_to: str | None) -> str:
    if not date_from and not date_to:
        return ""
    clean = [(d or "").replace("-", "") for d in (date_from, date_to)]
    return f"{clean[0]}-{clean[1]}"


def _modalities(value: Any) -> set[str]:
    if not value:
        return set()
    if isinstance(value, str):
        parts = value.replace(",", "\\").split("\\")
    else:
        parts = [str(v) for v in value]
    return {p.strip().upper() for p in parts if p.strip()}


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _classes_per_association() -> int:
    return max(1, (MAX_CONTEXTS - 1) // CONTEXTS_PER_CLASS)


def _class_batches(classes: list[str]) -> list[list[str]]:
    """Split SOP classes so each association stays within the 128 presentation contexts."""
    per = _classes_per_association()
    return [classes[i : i + per] for i in range(0, len(classes), per)]


def _modalities_raw(value: Any) -> set[str]:
    """A multi-valued UI/CS element as a set of stripped strings."""
    if not value:
        return set()
    parts = value.split("\\") if isinstance(value, str) else [str(v) for v in value]
    return {p.strip() for p in parts if p.strip()}
