"""FHIR Bulk Data connector (kind ``fhir-bulk``): ``$export`` for one patient or a group.

Flow (https://hl7.org/fhir/uv/bulkdata/export.html): kick-off ``GET Patient/{id}/$export`` or
``Group/{id}/$export`` with ``Prefer: respond-async`` (never retried blindly: a retried kick-off
could start a second job), poll the ``Content-Location`` status URL honouring ``Retry-After``
and reporting ``X-Progress``, then stream every ``output`` NDJSON file line by line into the
sink (``iter_lines`` over a streamed response: a file is never held whole in memory), record
each ``error`` file line (OperationOutcome) in the ledger, and DELETE the job. Output files get
the token only when the manifest says ``requiresAccessToken``. A job the server fails (4xx/5xx
status answers that are not ``transient``) or whose files expired (410) is reported as such and
its types keep their old cursor. A group export is filtered to the patient: resources that
point only at other patients are counted per file in a ``skipped`` ledger row.

The cursor is the manifest's ``transactionTime`` per exported type, sent back as ``_since``.
Attachments and referenced resources are then fetched through the REST API like ``fhir``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
import requests

from aggregator.errors import ConfigError, ConnectorError, ProtocolError, RemoteNotFound, TransientConnectorError
from connectors.base import KIND_FILE, KIND_QUERY, ConnectorConfig, Cursor, PatientRef, Progress, Sink
from connectors.fhir_rest import SAFE_ID, FhirConfig, FhirConnector, PullState, iter_references, parse_instant
from connectors.http import mask_url, outcome_codes, outcome_text, parse_json_object, parse_retry_after

log = logging.getLogger(__name__)

#: Poll interval when the server sends no Retry-After (Medplum sends none): grows to this cap.
MAX_POLL_INTERVAL = 30.0
#: How many consecutive ``transient`` OperationOutcome answers a status poll may give.
MAX_TRANSIENT_POLLS = 10
#: How often one output file is re-requested after its stream broke.
FILE_ATTEMPTS = 3


@dataclass
class FhirBulkConfig(FhirConfig):
    group_id: str | None = None
    types: str | None = None  # comma-separated _type
    poll_max_seconds: float = 3600

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


class ExportFailed(ConnectorError):
    """The server failed or expired the export job (not our request's fault)."""


class FhirBulkConnector(FhirConnector):
    """``fhir-bulk``: Bulk Data ``$export`` plus REST hydration and attachments."""

    kind: ClassVar[str] = "fhir-bulk"
    config_type: ClassVar[type[ConnectorConfig]] = FhirBulkConfig
    config: FhirBulkConfig

    def __init__(self, config: ConnectorConfig) -> None:
        if not isinstance(config, FhirBulkConfig):
            raise ConfigError("FhirBulkConnector needs a FhirBulkConfig")
        super().__init__(config)

    def _strategy_name(self, caps: Any) -> str:
        return "$export"

    def pull(self, patient: PatientRef, since: Cursor | None, sink: Sink, progress: Progress) -> Cursor:
        state = PullState(self.config.url, dict(since or {}))
        pid = self.resolve_patient(patient, state)
        self.pull_resources(pid, state, sink, progress)
        self.hydrate(state, sink, progress)
        self.fetch_attachments(state, sink, progress)
        return state.new_cursor()

    # -- export --------------------------------------------------------------------------------

    def export_types(self) -> list[str] | None:
        return self.config.types.split(",") if self.config.types else None

    def pull_resources(self, pid: str, state: PullState, sink: Sink, progress: Progress) -> None:
        sink.set_method("$export")
        types = self.export_types()
        path = f"Group/{self.config.group_id}/$export" if self.config.group_id else f"Patient/{pid}/$export"
        params: list[tuple[str, str]] = []
        if types:
            params.append(("_type", ",".join(types)))
        since = state.min_since(types) if types else state.min_since()
        if since:
            params.append(("_since", since))
        status_url = self.kick_off(path, params, sink)
        try:
            manifest = self.wait(status_url, progress)
            when = parse_instant(manifest.get("transactionTime"))
            if when is None:
                raise ProtocolError("the export manifest has no valid transactionTime", item=mask_url(status_url))
            state.start = when  # the server's own cut-off: exactly what the next _since needs
            self.download(manifest, pid, state, sink, progress)
            state.covered_types |= set(types or [])
        except ConnectorError as exc:
            state.all_failed = True
            if not isinstance(exc, ExportFailed):
                sink.failed(KIND_QUERY, "query:$export", exc.message, status=exc.status)
            raise
        finally:
            self.delete_job(status_url)

    def kick_off(self, path: str, params: list[tuple[str, str]], sink: Sink) -> str:
        headers = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
        try:
            resp = self.client.request("GET", path, params=params, headers=headers, retry=False)
        except ConnectorError as exc:
            sink.failed(KIND_QUERY, "query:$export", f"export kick-off refused: {exc.message}", status=exc.status)
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
            time.sleep(wait)

    def delete_job(self, status_url: str) -> None:
        """Tell the server it may drop the job and its files (best effort, never fatal)."""
        try:
            self.client.request("DELETE", status_url, headers={"Accept": "application/json"},
                                ok_statuses=frozenset({404, 410})).close()
        except ConnectorError as exc:
            log.warning("could not delete export job %s: %s", mask_url(status_url), exc.message)

    # -- files ---------------------------------------------------------------------------------

    def download(self, manifest: dict[str, Any], pid: str, state: PullState, sink: Sink, progress: Progress) -> None:
        token = bool(manifest.get("requiresAccessToken"))
        expired = 0
        for item in manifest.get("output") or []:
            if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                continue
            rtype = str(item.get("type") or "")
            try:
                self._stream_output(item["url"], rtype, token, pid, state, sink, progress)
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

    def _lines(self, url: str, token: bool, skip: int) -> Any:
        """Yield (line number, bytes) of one NDJSON file; restarts after a broken stream."""
        attempt = 0
        done = skip
        while True:
            attempt += 1
            resp = self.client.request("GET", url, headers={"Accept": "application/fhir+ndjson"}, stream=True,
                                       send_auth=token)
            try:
                n = 0
                for line in resp.iter_lines(chunk_size=256 * 1024):
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
            finally:
                resp.close()

    def _stream_output(self, url: str, rtype: str, token: bool, pid: str, state: PullState, sink: Sink,
                       progress: Progress) -> None:
        other = 0
        bad = 0
        for n, line in self._lines(url, token, 0):
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
            if self.config.group_id and not belongs_to(res, pid):
                other += 1
                continue
            self.emit(res, state, sink)
            if n % 500 == 0:
                progress.advance(500)
        if other:
            sink.skipped(KIND_FILE, mask_url(url), f"{other} {rtype or 'resources'} of other group members")
        if bad:
            log.warning("%d malformed lines in a %s export file", bad, rtype)

    def _stream_errors(self, url: str, token: bool, sink: Sink) -> None:
        try:
            for n, line in self._lines(url, token, 0):
                if not line.strip():
                    continue
                text = outcome_text(line) or "unreadable OperationOutcome"
                sink.failed(KIND_QUERY, f"$export-error:{mask_url(url)}#{n}", text, status="export-error")
        except ConnectorError as exc:
            sink.failed(KIND_FILE, mask_url(url), f"export error file: {exc.message}", status=exc.status)


def belongs_to(res: dict[str, Any], pid: str) -> bool:
    """True for the patient's own resources and for resources that point at no patient at all."""
    if res.get("resourceType") == "Patient":
        return str(res.get("id")) == pid
    patients = {r.split("/", 1)[1] for r in iter_references(res) if r.startswith("Patient/")}
    return not patients or pid in patients


__all__ = ["ExportFailed", "FhirBulkConfig", "FhirBulkConnector", "belongs_to"]
