"""FHIR Bulk Data connector (kind ``fhir-bulk``): ``$export`` for one patient or a group.

Flow (https://hl7.org/fhir/uv/bulkdata/export.html): kick-off ``GET Patient/{id}/$export`` or
``Group/{id}/$export`` with ``Prefer: respond-async`` (never retried blindly: a retried kick-off
could start a second job), poll the ``Content-Location`` status URL honouring ``Retry-After``
and reporting ``X-Progress``, then stream every ``output`` NDJSON file line by line into the
sink (``iter_lines`` over a streamed response: a file is never held whole in memory), record
each ``error`` file line (OperationOutcome) in the ledger, and DELETE the job. Output files get
the token only when the manifest says ``requiresAccessToken``. A job the server fails (4xx/5xx
status answers that are not ``transient``) or whose files expired (410) is reported as such and
its types keep their old cursor.

A kick-off answered 429 or 503 started no job (the spec says so), so it is sent again after
``Retry-After``; nothing else about a kick-off is retried.

One patient, three ways: ``Patient/{id}/$export`` transfers only that patient's data and is
preferred whenever it is available (no group configured, or ``/metadata`` declares ``$export``
on Patient). A kick-off refused outright (404 "not served", 403 "not for this token"...) falls
back to the group export when ``group_id`` is set, else - or when the group is refused too -
to the REST API (``$everything`` or the crawl, as ``fhir`` pulls); a ``skipped`` ledger row
names what was used instead, and the pull's method says it. ``Group/{id}/$export`` carries every
member's data: each line is checked with :func:`connectors.fhir_rest.belongs_to` and other
members' lines are counted per file in one ``skipped`` ledger row (``lines_skipped``), so no
other patient's resource reaches the sink. Memory stays flat however long the file: lines
are handled one at a time and the connector keeps no per-resource set (see ``PullState``).

The cursor is the manifest's ``transactionTime`` per exported type, sent back as ``_since``.
Attachments and referenced resources are then fetched through the REST API like ``fhir``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
import requests

from aggregator.errors import (
    AccessDenied,
    ConfigError,
    ConnectorError,
    ProtocolError,
    RemoteNotFound,
    TransientConnectorError,
)
from connectors.base import KIND_FILE, KIND_QUERY, ConnectorConfig, Cursor, PatientRef, Progress, Sink, option
from connectors.fhir_rest import (
    COMPARTMENT,
    SAFE_ID,
    FhirConfig,
    FhirConnector,
    PullState,
    belongs_to,
    iter_references,
    parse_instant,
)
from connectors.http import (
    RequestRejected,
    mask_url,
    outcome_codes,
    outcome_text,
    parse_json_object,
    parse_retry_after,
)

log = logging.getLogger(__name__)

#: Poll interval when the server sends no Retry-After (Medplum sends none): grows to this cap.
MAX_POLL_INTERVAL = 30.0
#: How many consecutive ``transient`` OperationOutcome answers a status poll may give.
MAX_TRANSIENT_POLLS = 10
#: How often one output file is re-requested after its stream broke.
FILE_ATTEMPTS = 3
#: Bytes read from an export file at a time.
CHUNK = 256 * 1024
#: Kick-off answers that mean "not served here, or not to us" (no job started): in ``auto``
#: mode the next export level, then the REST API, is tried.
EXPORT_REFUSED = frozenset({400, 403, 404, 405, 501})
#: Kick-off answers after which the spec says no job exists: retried after Retry-After.
KICKOFF_RETRY = frozenset({429, 503})


@dataclass
class FhirBulkConfig(FhirConfig):
    group_id: str | None = option(None, help="Export a Group instead of one Patient.")
    types: str | None = option(None, help="Comma-separated _type list.")
    poll_max_seconds: float = option(3600, help="Give up polling an export after this many seconds.")
    #: auto: ``Patient/{id}/$export`` when no group is set or /metadata declares it, else the
    #: group; ``patient`` / ``group`` force one (``group`` needs ``group_id``)
    export_level: str = option("auto", help="Patient- or Group-level export.", choices=("auto", "patient", "group"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_id is not None and not SAFE_ID.match(self.group_id):
            raise ConfigError("group_id is not a valid FHIR id")
        if self.types is not None:
            names = [t.strip() for t in self.types.split(",") if t.strip()]
            if not names or not all(t.isalpha() and t[0].isupper() for t in names):
                raise ConfigError("types must be a comma-separated list of FHIR resource types")
            self.types = ",".join(names)
        if float(self.poll_max_seconds) <= 0:
            raise ConfigError("poll_max_seconds must be positive")
        if self.export_level not in ("auto", "patient", "group"):
            raise ConfigError("export_level must be auto, patient or group")
        if self.export_level == "group" and not self.group_id:
            raise ConfigError("export_level group needs group_id")


class ExportFailed(ConnectorError):
    """The server failed or expired the export job (not our request's fault)."""


class ExportCancelled(ExportFailed):
    """We cancelled the export (the pull's job was cancelled); the server was told with DELETE."""


class FhirBulkConnector(FhirConnector):
    """``fhir-bulk``: Bulk Data ``$export`` plus REST hydration and attachments."""

    kind: ClassVar[str] = "fhir-bulk"
    config_type: ClassVar[type[ConnectorConfig]] = FhirBulkConfig
    config: FhirBulkConfig

    def __init__(self, config: ConnectorConfig) -> None:
        if not isinstance(config, FhirBulkConfig):
            raise ConfigError("FhirBulkConnector needs a FhirBulkConfig")
        super().__init__(config)
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop waiting for the export, from another thread (a cancelled job).

        The wait between two status polls can last minutes (the server's ``Retry-After``); it
        ends at once, and the export job is deleted on the server (``DELETE`` on its status
        URL, which the Bulk Data spec defines as cancelling it). Downloads stop at their next
        progress step, through the job's own progress.
        """
        self._cancel.set()

    def _strategy_name(self, caps: Any) -> str:
        return "$export"

    def pull(self, patient: PatientRef, since: Cursor | None, sink: Sink, progress: Progress) -> Cursor:
        state = PullState(self.config.url, dict(since or {}))
        pid = self.resolve_patient(patient, state)
        state.patient_id = pid
        self.pull_resources(pid, state, sink, progress)
        self.hydrate(state, sink, progress)
        self.fetch_attachments(state, sink, progress)
        return state.new_cursor()

    # -- export --------------------------------------------------------------------------------

    def export_types(self) -> list[str] | None:
        return self.config.types.split(",") if self.config.types else None

    def patient_level(self) -> bool:
        """Whether to export ``Patient/{id}/$export`` rather than the configured group.

        A group export carries every member's data and is filtered here; a patient-level
        export transfers only this patient's. It is used when no group is configured, or when
        ``/metadata`` declares ``$export`` on the Patient type (Medplum declares it only on
        Group, so its group exports stay group exports)."""
        if not self.config.group_id or self.config.export_level == "patient":
            return True
        if self.config.export_level == "group":
            return False
        try:
            caps = self.capabilities()
        except ConnectorError:
            return False
        return "Patient" in caps.export_types

    def pull_resources(self, pid: str, state: PullState, sink: Sink, progress: Progress) -> None:
        types = self.export_types()
        state.planned = set(types) if types else set(COMPARTMENT) | {"Patient"}
        params: list[tuple[str, str]] = []
        if types:
            params.append(("_type", ",".join(types)))
        since = state.min_since(state.planned)
        if since:
            params.append(("_since", since))
        started = self.start_export(pid, params, sink)
        if started is None:
            # No export served for this patient: the REST API brings the same resources.
            state.planned = set()
            super().pull_resources(pid, state, sink, progress)
            return
        status_url, group = started
        sink.set_method("Group/$export" if group else "$export")
        try:
            manifest = self.wait(status_url, progress)
            when = parse_instant(manifest.get("transactionTime"))
            if when is None:
                raise ProtocolError("the export manifest has no valid transactionTime", item=mask_url(status_url))
            state.start = when  # the server's own cut-off: exactly what the next _since needs
            self.download(manifest, pid, state, sink, progress, strict=group)
            # Everything asked for up to transactionTime is in the manifest: a type without a
            # file had no data. Types whose file was lost are in failed_types and keep their cursor.
            state.covered_types |= state.planned
        except ConnectorError as exc:
            state.all_failed = True
            if not isinstance(exc, ExportFailed):
                sink.failed(KIND_QUERY, "query:$export", exc.message, status=exc.status)
            raise
        finally:
            self.delete_job(status_url)

    def export_levels(self, pid: str) -> list[tuple[str, bool]]:
        """Kick-off paths to try in order, each with "is a group export"."""
        gid = self.config.group_id
        group = [(f"Group/{gid}/$export", True)] if gid and self.config.export_level != "patient" else []
        if self.patient_level():
            return [(f"Patient/{pid}/$export", False), *group]
        return group

    def start_export(self, pid: str, params: list[tuple[str, str]], sink: Sink) -> tuple[str, bool] | None:
        """Kick off the first export level the server serves: (status URL, is a group export).

        In ``auto`` mode a level the server refuses outright (400, 403, 404, 405, 501: no job
        was created) gives way to the next - the group export when ``group_id`` is set - and
        when none is left, None tells the caller to pull through the REST API instead. Each
        refusal that was worked around is a ``skipped`` ledger row naming what was used, so
        the record says how it was gathered. Forced levels (``export_level``) are not
        replaced: their refusal is the pull's error."""
        levels = self.export_levels(pid)
        auto = self.config.export_level == "auto"
        for i, (path, group) in enumerate(levels):
            last = i == len(levels) - 1
            try:
                return self.kick_off(path, params, sink, record=not auto), group
            except (RequestRejected, RemoteNotFound, AccessDenied) as exc:
                if not auto or exc.status not in EXPORT_REFUSED:
                    if auto:
                        sink.failed(KIND_QUERY, "query:$export", f"export kick-off refused: {exc.message}",
                                    status=exc.status)
                    raise
                instead = "Group/$export" if not last else "the REST API"
                level = "Group/$export" if group else "Patient/$export"
                log.info("%s refused (HTTP %s); trying %s", level, exc.status, instead)
                sink.skipped(KIND_QUERY, f"query:{level}",
                             f"{level} not served here (HTTP {exc.status}); pulled with {instead} instead",
                             meta={"status": exc.status, "fallback": instead})
        return None  # only in auto mode: a forced level re-raised its refusal above

    def kick_off(self, path: str, params: list[tuple[str, str]], sink: Sink, *, record: bool = True) -> str:
        """Start the export job; returns its status URL.

        Retried only after 429 or 503 (honouring Retry-After): the Bulk Data spec says no job
        exists after those answers. Any other failure - a dropped connection included - is not
        retried, since a second kick-off could start a second job. ``record=False`` leaves a
        refusal out of the ledger (the caller has another way to try)."""
        headers = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
        try:
            resp = self.client.request("GET", path, params=params, headers=headers, retry_on=KICKOFF_RETRY)
        except ConnectorError as exc:
            if record or not isinstance(exc, RequestRejected | RemoteNotFound | AccessDenied):
                sink.failed(KIND_QUERY, "query:$export", f"export kick-off refused: {exc.message}",
                            status=exc.status)
            if isinstance(exc, TransientConnectorError):
                raise ExportFailed(f"export kick-off failed: {exc.message}", item=exc.item, status=exc.status)
            raise
        location = resp.headers.get("Content-Location")
        resp.close()
        if resp.status_code != 202 or not location:
            raise ProtocolError(f"export kick-off answered HTTP {resp.status_code} without a status URL",
                                item=mask_url(resp.url or path))
        log.info("export started; status at %s", mask_url(location))
        return self.client.url(location)

    def wait(self, status_url: str, progress: Progress) -> dict[str, Any]:
        """Poll until the manifest; Retry-After honoured, X-Progress reported, deadline kept."""
        deadline = time.monotonic() + float(self.config.poll_max_seconds)
        interval = 1.0
        transient = 0
        while True:
            if self._cancel.is_set():
                raise ExportCancelled("the export was cancelled", item=mask_url(status_url), status="cancelled")
            resp = self.client.request("GET", status_url, headers={"Accept": "application/json"},
                                       ok_statuses=frozenset(range(400, 600)))
            status = resp.status_code
            if status == 200:
                manifest = parse_json_object(resp)
                if not isinstance(manifest.get("output"), list):
                    raise ProtocolError("the export manifest has no output list", item=mask_url(status_url))
                return manifest
            if status == 202:
                resp.close()
                note = resp.headers.get("X-Progress")
                if note:
                    progress.message(f"export: {note[:100]}")
                transient = 0
                wait = parse_retry_after(resp.headers.get("Retry-After"))
                if wait is None:
                    wait, interval = interval, min(MAX_POLL_INTERVAL, interval * 2)
            else:
                body = resp.content
                reason = outcome_text(body) or f"HTTP {status}"
                if (status >= 500 or status == 429) and ("transient" in outcome_codes(body) or status in (429, 503)):
                    transient += 1
                    if transient > MAX_TRANSIENT_POLLS:
                        raise ExportFailed(f"export kept failing transiently: {reason}", item=mask_url(status_url),
                                           status=status)
                    log.info("export status poll: transient error (HTTP %s), polling again", status)
                    wait = parse_retry_after(resp.headers.get("Retry-After"))
                    if wait is None:
                        wait, interval = interval, min(MAX_POLL_INTERVAL, interval * 2)
                elif status in (404, 410):
                    raise ExportFailed(f"the export job expired or was removed (HTTP {status}: {reason})",
                                       item=mask_url(status_url), status=status)
                else:
                    raise ExportFailed(f"the server failed the export job (HTTP {status}: {reason})",
                                       item=mask_url(status_url), status=status)
            if time.monotonic() + wait > deadline:
                raise ExportFailed(f"the export did not finish within {self.config.poll_max_seconds:.0f} s",
                                   item=mask_url(status_url), status="timeout")
            if pause(wait, self._cancel):
                raise ExportCancelled("the export was cancelled", item=mask_url(status_url), status="cancelled")

    def delete_job(self, status_url: str) -> None:
        """Tell the server it may drop the job and its files (best effort, never fatal)."""
        try:
            self.client.request("DELETE", status_url, headers={"Accept": "application/json"},
                                ok_statuses=frozenset({404, 410})).close()
        except ConnectorError as exc:
            log.warning("could not delete export job %s: %s", mask_url(status_url), exc.message)

    # -- files ---------------------------------------------------------------------------------

    def download(self, manifest: dict[str, Any], pid: str | None, state: PullState, sink: Sink, progress: Progress,
                 *, strict: bool = True) -> None:
        """Stream every output file into the sink and record every error file.

        With ``pid``, only that patient's resources are taken (see :func:`belongs_to`; ``strict``
        for group exports); the others are counted per file in one ``skipped`` row."""
        token = bool(manifest.get("requiresAccessToken"))
        expired = 0
        for item in manifest.get("output") or []:
            if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                continue
            rtype = str(item.get("type") or "")
            try:
                self._stream_output(item["url"], rtype, token, pid, state, sink, progress, strict=strict)
            except ConnectorError as exc:
                state.failed_types.add(rtype)
                gone = isinstance(exc, RemoteNotFound)
                expired += gone
                sink.failed(KIND_FILE, mask_url(item["url"]),
                            f"{rtype} export file{' expired' if gone else ''}: {exc.message}", status=exc.status)
            else:
                state.covered_types.add(rtype)
        for item in manifest.get("error") or []:
            if isinstance(item, dict) and isinstance(item.get("url"), str):
                self._stream_errors(item["url"], token, sink)
        if expired:
            log.warning("%d export files had expired (HTTP 404/410)", expired)

    def _lines(self, url: str, token: bool) -> Iterator[tuple[int, bytes]]:
        """Yield (line number, bytes) of one NDJSON file; restarts after a broken stream.

        The body is read in 256 KiB chunks and split into lines as it arrives, so memory
        holds one chunk, never the file. The endpoint's concurrency slot is held until the
        file is read to the end. A restart skips the lines already yielded."""
        attempt = 0
        done = 0
        while True:
            attempt += 1
            try:
                with self.client.stream(url, headers={"Accept": "application/fhir+ndjson"}, send_auth=token) as resp:
                    n = 0
                    for line in iter_ndjson(resp):
                        n += 1
                        if n <= done:
                            continue
                        done = n
                        yield n, line
                return
            except requests.RequestException as exc:
                if attempt >= FILE_ATTEMPTS:
                    raise TransientConnectorError(f"download broke after line {done} ({type(exc).__name__})",
                                                  item=mask_url(url))
                log.info("export file stream broke after line %d; resuming", done)

    def _stream_output(self, url: str, rtype: str, token: bool, pid: str | None, state: PullState, sink: Sink,
                       progress: Progress, *, strict: bool = True) -> None:
        other = 0
        bad = 0
        taken = 0
        for n, line in self._lines(url, token):
            if not line.strip():
                continue
            try:
                res = orjson.loads(line)
            except orjson.JSONDecodeError:
                res = None
            if not isinstance(res, dict) or not res.get("resourceType"):
                bad += 1
                sink.failed(KIND_FILE, f"{mask_url(url)}#line{n}", "not a FHIR resource (malformed NDJSON line)",
                            status="invalid")
                continue
            try:
                refs = iter_references(res)
                mine = pid is None or belongs_to(res, pid, refs, strict=strict)
            except Exception as exc:  # an odd shape fails this line only (see emit_isolated)
                sink.failed(KIND_FILE, f"{mask_url(url)}#line{n}",
                            f"could not be read: unexpected {type(exc).__name__}", status="invalid")
                continue
            if not mine:
                other += 1
                continue
            if self.emit_isolated(res, state, sink, refs=refs):
                taken += 1
            if taken % 500 == 0:
                progress.advance(500)
        progress.advance(taken % 500)
        if other:
            who = "other group members" if strict else "other patients"
            sink.skipped(KIND_FILE, mask_url(url), f"{other} {rtype or 'resources'} of {who}",
                         meta={"lines_skipped": other})
        if bad:
            log.warning("%d malformed lines in a %s export file", bad, rtype)

    def _stream_errors(self, url: str, token: bool, sink: Sink) -> None:
        try:
            for n, line in self._lines(url, token):
                if not line.strip():
                    continue
                text = outcome_text(line) or "unreadable OperationOutcome"
                sink.failed(KIND_QUERY, f"$export-error:{mask_url(url)}#{n}", text, status="export-error")
        except ConnectorError as exc:
            sink.failed(KIND_FILE, mask_url(url), f"export error file: {exc.message}", status=exc.status)


def pause(seconds: float, cancel: threading.Event) -> bool:
    """Wait between two status polls, or less when ``cancel`` is set; True when it was.

    Looked up at call time, so tests can replace the wait as they replace ``time.sleep``.
    """
    return cancel.wait(seconds)


def iter_ndjson(resp: requests.Response) -> Iterator[bytes]:
    """Lines of a streamed body, split as chunks arrive (one partial line kept between chunks)."""
    rest = b""
    for chunk in resp.iter_content(CHUNK):
        if not chunk:
            continue
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


__all__ = ["ExportFailed", "FhirBulkConfig", "FhirBulkConnector", "belongs_to"]
