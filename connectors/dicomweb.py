"""DICOMweb connector: QIDO-RS to find a patient's studies, WADO-RS to retrieve them.

WADO-RS answers are ``multipart/related`` streams of Part 10 files. They are parsed while they
arrive (never held whole in memory) and each part is handed to the sink as received. The SOP
Instance UID of a part is read from its File Meta group only, so no instance is decoded.
Every request goes through the shared :class:`connectors.http.HttpClient`, as the FHIR
connectors' do: (connect, read) timeouts, retries of 429/502-504 and dropped connections after
``Retry-After``, statuses classified in one place (401 auth, 403 access denied, 404 not found),
and query values (PatientIDs) masked wherever a URL is logged or reported.

A study of several series (QIDO-RS lists them with their counts) is retrieved with one WADO-RS
request per series, up to ``concurrency`` at once, each holding the endpoint's slot until its
body is read (:mod:`connectors.parallel`); a failed series fails only its instances.

Report to study: with ``study_hints`` (from the case's FHIR reports, see
``aggregator.jobs.hints``) each hint is also looked up with QIDO-RS, by StudyInstanceUID, accession
number or date + modality, and its matches are retrieved with the patient's studies; the rule
for studies filed under another PatientID is in ``dicom_stream.select_hinted``.
"""

from __future__ import annotations

import http.client
import logging
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import requests
import urllib3

from aggregator.errors import ConfigError, ConnectorError, ProtocolError, TransientConnectorError, UsageError
from connectors.base import (
    KIND_DICOM,
    CheckResult,
    Connector,
    ConnectorConfig,
    Cursor,
    PatientRef,
    Progress,
    Sink,
    option,
)
from connectors.dicom_identifier import patient_key_problem
from connectors.dicom_stream import (
    NO_CRITERIA,
    BackgroundWriter,
    SpoolBuffer,
    StudyHint,
    StudyMatch,
    parse_hints,
    patient_studies,
    record_failure,
    record_hint_gap,
    select_hinted,
    split_part10,
)
from connectors.http import AuthStrategy, HttpClient, StaticAuth, mask_url
from connectors.parallel import LockedProgress, run_units
from connectors.secrets import read_secret

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
#: Receive block. Parts hold views of the blocks until written, so a block lives as long as its
#: last part waits for the writer: 1 MiB blocks cost ~1.5 MiB more peak RSS on a 1 GB study
#: than 256 KiB ones, at the same speed.
READ_CHUNK = 256 * 1024
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class DicomwebConfig(ConnectorConfig):
    url: str = option(help="FHIR base URL (or DICOMweb root).")
    auth: str = option("none", help="How to authenticate.", choices=("none", "bearer", "basic"))
    token_env: str | None = option(None, help="Environment variable holding a bearer token.")
    token_file: str | None = option(None, help="File holding a bearer token.")
    username: str | None = option(None, help="Basic-auth user.")
    password_env: str | None = option(None, help="Environment variable holding the basic-auth password.")
    password_file: str | None = option(None, help="File holding the basic-auth password.")
    timeout: float = option(120, help="Read timeout in seconds.")
    concurrency: int = option(4, help="Requests in flight at once (WADO-RS: a study's series in parallel).")
    modalities: str | None = option(None, help="Only these modalities, e.g. CT,MR.")
    date_from: str | None = option(None, help="Only studies on or after YYYYMMDD.")
    date_to: str | None = option(None, help="Only studies on or before YYYYMMDD.")
    #: Report-to-study hints from the case's FHIR data (``aggregator.jobs.hints``): each is also
    #: queried with QIDO-RS and its matches retrieved; see ``dicom_stream.select_hinted``.
    study_hints: list[dict[str, Any]] | None = option(None, help="Set by the pull runner.", cli=False)

    def __post_init__(self) -> None:
        if self.auth not in ("none", "bearer", "basic"):
            raise ConfigError("auth must be none, bearer or basic", item="auth")
        if not re.match(r"^https?://", self.url or ""):
            raise ConfigError("url must start with http:// or https://", item="url")
        if int(self.concurrency) < 1:
            raise ConfigError("concurrency must be at least 1", item="concurrency")


class DicomwebConnector(Connector):
    kind: ClassVar[str] = "dicomweb"
    config_type: ClassVar[type[ConnectorConfig]] = DicomwebConfig

    def __init__(self, config: ConnectorConfig) -> None:
        if not isinstance(config, DicomwebConfig):
            raise ConfigError("DicomwebConnector needs a DicomwebConfig")
        super().__init__(config)
        self.cfg: DicomwebConfig = config
        self.base = config.url.rstrip("/")
        auth: AuthStrategy | None = None
        if config.auth == "bearer":
            auth = StaticAuth.bearer(read_secret(env=config.token_env, file=config.token_file, what="token"))
        elif config.auth == "basic":
            if not config.username:
                raise ConfigError("basic auth needs --username", item="username")
            auth = StaticAuth.basic(config.username, read_secret(env=config.password_env, file=config.password_file,
                                                                 what="password"))
        # Studies are retrieved one after another, a study's series up to ``concurrency`` at once.
        self.client = HttpClient(self.base, auth=auth, concurrency=int(config.concurrency),
                                 timeout=float(config.timeout), connect_timeout=CONNECT_TIMEOUT)
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        # WADO-RS bodies are read straight from the socket (see response_blocks): no gzip.
        self.client.session.headers["Accept-Encoding"] = "identity"

    def close(self) -> None:
        self.client.close()

    def cancel(self) -> None:
        """Stop the running pull from another thread: every request ends at its next instance.

        What was stored stays stored (and in the ledger); the pull ends with a
        :class:`TransientConnectorError` saying it was cancelled.
        """
        self._cancel.set()

    def _check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise TransientConnectorError("the pull was cancelled", item=mask_url(self.base), status="cancelled")

    # -- HTTP ------------------------------------------------------------------------------

    def _get(self, path: str, *, params: Mapping[str, str] | None = None, accept: str = "application/dicom+json",
             stream: bool = False) -> requests.Response:
        return self.client.request("GET", self.base + path, params=params, headers={"Accept": accept},
                                   stream=stream)

    def _qido(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        resp = self._get(path, params=params)
        if resp.status_code == 204 or not resp.content.strip():
            return []
        try:
            data = resp.json()
        except ValueError as exc:
            raise ProtocolError("QIDO-RS answer is not JSON", item=mask_url(resp.url)) from exc
        if not isinstance(data, list):
            raise ProtocolError("QIDO-RS answer is not a JSON array", item=mask_url(resp.url))
        return [d for d in data if isinstance(d, dict)]

    # -- check / pull ----------------------------------------------------------------------

    def check(self) -> CheckResult:
        found = self._qido("/studies", {"limit": "1"})
        return CheckResult(True, {"url": self.base, "qido": True, "studies_seen": len(found)})

    def pull(self, patient: PatientRef, since: Cursor | None, sink: Sink, progress: Progress) -> Cursor:
        hints = parse_hints(self.cfg.study_hints)
        if not patient.id and not hints:
            raise UsageError("a DICOMweb pull needs the patient's PatientID at this archive (or study hints)")
        problem = patient_key_problem(patient.id, patient.issuer)
        if problem:
            raise UsageError(problem)
        done_before: dict[str, int] = dict((since or {}).get("studies", {}).get("studies", {}))
        studies = self._find_studies(patient, sink) if patient.id else []
        if hints:
            studies += self._find_hinted(patient, hints, {uid for uid, _ in studies}, sink)
        return self._retrieve_studies(studies, done_before, since, sink, progress)

    def _find_studies(self, patient: PatientRef, sink: Sink) -> list[tuple[str, int | None]]:
        """(StudyInstanceUID, instance count) of the patient's studies, issuer and filters applied.

        Other patients' studies are left out, and reported where the PatientID alone cannot
        tell (:func:`~connectors.dicom_stream.patient_studies`).
        """
        assert patient.id
        params = {"PatientID": patient.id, "includefield": HINT_FIELDS}
        if patient.issuer:
            params["IssuerOfPatientID"] = patient.issuer
        if self.cfg.date_from or self.cfg.date_to:
            params["StudyDate"] = "-".join((d or "").replace("-", "") for d in (self.cfg.date_from, self.cfg.date_to))
        matches = [_study_match(item) for item in self._qido("/studies", params)]
        return [(m.study_uid, m.count) for m in patient_studies(matches, patient, self.cfg.modalities, sink)]

    def _find_hinted(self, patient: PatientRef, hints: list[StudyHint], known: set[str],
                     sink: Sink) -> list[tuple[str, int | None]]:
        """Studies named by report hints (one QIDO-RS query each); unmatched hints become gaps."""
        out: list[tuple[str, int | None]] = []
        for hint in hints:
            how = hint.criterion(patient.id)
            if how is None:
                record_hint_gap(sink, hint, *NO_CRITERIA)
                continue
            params = {"includefield": HINT_FIELDS}
            if how == "uid":
                params["StudyInstanceUID"] = hint.study_uid or ""
            elif how == "accession":
                params["AccessionNumber"] = hint.accession or ""
            else:
                params.update(PatientID=patient.id or "", StudyDate=hint.date or "",
                              ModalitiesInStudy=hint.modality or "")
            matches = [_study_match(item) for item in self._qido("/studies", params)]
            taken, reason, status = select_hinted(hint, how, [m for m in matches if m.study_uid], patient)
            if not taken:
                record_hint_gap(sink, hint, reason or "no match", status or "not-found")
                continue
            for m in taken:
                log.info("study hint %s matched study %s on %s", hint.ref, m.study_uid, how)
                if m.study_uid not in known:
                    known.add(m.study_uid)
                    out.append((m.study_uid, m.count))
        return out

    def _retrieve_studies(self, studies: list[tuple[str, int | None]], done_before: dict[str, int],
                          since: Cursor | None, sink: Sink, progress: Progress) -> Cursor:
        todo = [(uid, count) for uid, count in studies if not (count is not None and done_before.get(uid) == count)]
        progress = LockedProgress(progress)  # the requests of a study's series advance it at once
        progress.set_total(sum(c or 0 for _, c in todo) or None)
        sink.set_method("WADO-RS")
        sink.is_done(KIND_DICOM, "")  # the ledger's done set is loaded here, not raced for by the requests
        complete = dict(done_before)
        with BackgroundWriter() as writer:
            for uid, count in todo:
                self._check_cancelled()
                got: set[str] = set()
                members: dict[str, str] = {}
                failed: dict[str | None, ConnectorError] = {}
                if since is None:
                    # first pull: the whole study at once (its series in parallel when there are
                    # several); enumerate only if some did not come
                    series = self._series_of(uid, count) if self.cfg.concurrency > 1 and count != 1 else []
                    units: list[tuple[str, str | None]] = [(f"/studies/{quote(uid)}", None)]
                    if len(series) > 1:
                        units = [(f"/studies/{quote(uid)}/series/{quote(s)}", s) for s in series]
                    failed = self._run_units(units, uid, members, sink, progress, got, writer)
                    writer.drain()
                    if count is None or len(got) < count:
                        members = self._enumerate(uid)
                else:
                    members = self._enumerate(uid)
                    failed = self._retrieve_missing(uid, members, sink, progress, got, writer)
                writer.drain()
                for sop, series_uid in members.items():
                    if sop not in got and not sink.is_done(KIND_DICOM, sop):
                        err = failed.get(sop) or failed.get(series_uid) or failed.get(None)
                        reason, status = (f"its retrieve failed: {err.message}", _status_text(err)) if err else \
                            ("WADO-RS did not return this instance", "missing")
                        record_failure(sink, sop, reason, status, {"study_uid": uid, "series_uid": series_uid})
                if members and all(sink.is_done(KIND_DICOM, s) for s in members):
                    complete[uid] = len(members)
                elif not members and count is not None and len(got) >= count:
                    complete[uid] = count
        return {"studies": {"studies": complete}}

    def _series_of(self, study_uid: str, count: int | None) -> list[str]:
        """The study's series (QIDO-RS), largest first, or [] when they cannot be listed.

        A listing whose counts do not add up to the study's is not trusted (the study is then
        retrieved whole, as one request): a series it left out would never be asked for.
        """
        try:
            found = self._qido(f"/studies/{quote(study_uid)}/series", {"includefield": "00201209"})
        except ConnectorError as exc:
            log.info("no series listing for study %s (%s): retrieved whole", study_uid, exc.message)
            return []
        sizes: dict[str, int | None] = {}
        for item in found:
            uid, n = _value(item, "0020000E"), _value(item, "00201209")
            if uid:
                sizes[uid] = int(n) if n and n.isdigit() else None
        known = [n for n in sizes.values() if n is not None]
        if count is not None and len(known) == len(sizes) and sum(known) != count:
            return []
        return sorted(sizes, key=lambda s: -(sizes[s] or 0))

    def _run_units(self, units: list[tuple[str, str | None]], study_uid: str, members: Mapping[str, str],
                   sink: Sink, progress: Progress, got: set[str],
                   writer: BackgroundWriter) -> dict[str | None, ConnectorError]:
        """GET each WADO-RS path, up to ``concurrency`` at once; the errors by unit key.

        A unit's key is its series UID (an instance's SOP UID for single instances; None for
        the whole study). A failed unit's instances become ``failed`` rows with its error and
        the others are kept; when every unit failed, the first error ends the pull as a
        whole-study request always did.
        """
        def work(unit: tuple[str, str | None]) -> None:
            with self.client.slots.hold():  # the cap counts the whole body, not just the headers
                self._retrieve(unit[0], study_uid, members, sink, progress, got, writer)

        errors = run_units(units, work, lanes=self.cfg.concurrency, stop=self._cancel, name="wado")
        self._check_cancelled()
        failed = [(u, e) for u, e in zip(units, errors, strict=True) if e is not None]
        for _, err in failed:
            if not isinstance(err, ConnectorError):
                raise err  # our own fault, not the archive's: never recorded as an item failure
        if failed and len(failed) == len(units):
            raise failed[0][1]
        out: dict[str | None, ConnectorError] = {}
        for (path, key), err in failed:
            assert isinstance(err, ConnectorError)
            log.warning("WADO-RS %s failed: %s", path, err.message)
            out[key] = err
        return out

    def _retrieve_missing(self, uid: str, members: Mapping[str, str], sink: Sink, progress: Progress,
                          got: set[str], writer: BackgroundWriter) -> dict[str | None, ConnectorError]:
        """Fetch what the ledger lacks: the study (its series in parallel), whole series, or single instances."""
        missing = [s for s in members if not sink.is_done(KIND_DICOM, s)]
        progress.advance(len(members) - len(missing))
        if not missing:
            return {}
        by_series: dict[str, list[str]] = {}
        for sop in missing:
            by_series.setdefault(members[sop], []).append(sop)
        units: list[tuple[str, str | None]] = []
        if len(missing) == len(members) and (len(by_series) == 1 or self.cfg.concurrency == 1):
            units.append((f"/studies/{quote(uid)}", None))
        else:
            for series, sops in by_series.items():
                base = f"/studies/{quote(uid)}/series/{quote(series)}"
                if len(sops) == sum(1 for s in members.values() if s == series):
                    units.append((base, series))
                else:
                    units += [(f"{base}/instances/{quote(sop)}", sop) for sop in sops]
        return self._run_units(units, uid, members, sink, progress, got, writer)

    def _enumerate(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID -> Series Instance UID for one study (QIDO series, then instances)."""
        members: dict[str, str] = {}
        for series in self._qido(f"/studies/{quote(study_uid)}/series", {}):
            series_uid = _value(series, "0020000E")
            if not series_uid:
                continue
            for inst in self._qido(f"/studies/{quote(study_uid)}/series/{quote(series_uid)}/instances", {}):
                sop = _value(inst, "00080018")
                if sop:
                    members[sop] = series_uid
        return members

    def _retrieve(self, path: str, study_uid: str, members: Mapping[str, str], sink: Sink, progress: Progress,
                  got: set[str], writer: BackgroundWriter) -> None:
        try:
            self._retrieve_once(path, study_uid, members, sink, progress, got, writer, trust_lengths=True)
        except FramingMismatch:
            # a server whose part lengths are wrong: read again by delimiters only; the parts
            # already stored are skipped
            log.warning("WADO-RS part lengths of study %s do not match its framing; reading again", study_uid)
            self._retrieve_once(path, study_uid, members, sink, progress, got, writer, trust_lengths=False)

    def _retrieve_once(self, path: str, study_uid: str, members: Mapping[str, str], sink: Sink, progress: Progress,
                       got: set[str], writer: BackgroundWriter, *, trust_lengths: bool) -> None:
        resp = self._get(path, accept=ACCEPT_DICOM, stream=True)
        try:
            boundary = _boundary(resp.headers.get("Content-Type", ""), mask_url(resp.url))
            for headers, part in iter_multipart_blocks(response_blocks(resp), boundary, trust_lengths=trust_lengths):
                self._store_part(part, headers, study_uid, members, sink, progress, got, writer)
        except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                OSError) as exc:
            raise TransientConnectorError(f"WADO-RS stream broke off: {type(exc).__name__}",
                                          item=study_uid) from exc
        finally:
            resp.close()

    def _store_part(self, part: SpoolBuffer, headers: Mapping[str, str], study_uid: str,
                    members: Mapping[str, str], sink: Sink, progress: Progress, got: set[str],
                    writer: BackgroundWriter) -> None:
        ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        try:
            _, ts, sop, sop_class = _meta_of(part.head(4096))
        except (ValueError, struct.error):
            part.close()
            raise ProtocolError(f"a WADO-RS part ({ctype}) is not a DICOM Part 10 file", item=study_uid) from None
        if not sop:
            part.close()
            raise ProtocolError("a WADO-RS part has no MediaStorageSOPInstanceUID", item=study_uid)
        if self._cancel.is_set():
            part.close()
            self._check_cancelled()
        with self._lock:
            seen = sop in got or sink.is_done(KIND_DICOM, sop)
            got.add(sop)
        if seen:
            part.close()
            progress.advance(1)
            return
        meta = {"study_uid": study_uid, "series_uid": members.get(sop), "sop_class_uid": sop_class,
                "transfer_syntax": ts}

        def job() -> None:
            try:
                sink.dicom(sop, part.iter_chunks(), meta=meta)  # type: ignore[arg-type]
            finally:
                part.close()

        writer.submit(job, part.size)
        progress.advance(1)


# --- multipart/related streaming ----------------------------------------------------------------
#
# Where the time of a WADO-RS retrieve went (cProfile, 300 x 512 KiB study): each byte was copied
# three times in Python (``buf += chunk``, ``buf[:n]``, ``bytes(...)``) on top of urllib3's own
# copy, and the writer thread hashing/writing behind it had to compete with those copies for the
# two cores Orthanc also needs. Now every block is read straight into a fresh buffer
# (``readinto``), the boundary is found with ``bytearray.find`` over the whole block, and a part's
# data are memoryview slices of those blocks: no copy between the socket and the blob store's
# hash and ``write``. Only the few bytes that might begin a delimiter at the end of a block (and a
# header section cut by a block end) are carried into the next block.

#: Largest header section of one part we accept (hostile or broken peers).
MAX_PART_HEADERS = 64 * 1024

#: ``next_block(carry)``: a new buffer that starts with ``carry`` followed by freshly received
#: bytes, with its used length; None at the end of the body.
NextBlock = Callable[[bytes], "tuple[bytearray, int] | None"]


def _boundary(content_type: str, where: str) -> bytes:
    if not content_type.lower().startswith("multipart/related"):
        raise ProtocolError(f"WADO-RS answered {content_type.split(';')[0] or 'no content type'}, "
                            "not multipart/related", item=where)
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    if not m:
        raise ProtocolError("multipart/related answer without a boundary", item=where)
    return m.group(1).encode("latin-1")


def response_blocks(resp: requests.Response, block: int = READ_CHUNK) -> NextBlock:
    """Blocks of a streamed response body, read into buffers we own.

    ``http.client``'s ``readinto`` (urllib3's ``_fp``) fills our buffer straight from the socket,
    handling Content-Length, chunked and read-to-close bodies alike; urllib3's own ``readinto``
    would read into a temporary ``bytes`` and copy it. The fallback (a body that urllib3 must
    decode, or another urllib3 layout) uses ``raw.read`` with one copy.
    """
    raw = resp.raw
    fp = getattr(raw, "_fp", None)
    encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
    direct = getattr(fp, "readinto", None) if fp is not None and not encoded else None

    def next_block(carry: bytes) -> tuple[bytearray, int] | None:
        start = len(carry)
        buf = bytearray(start + block)
        buf[:start] = carry
        if direct is not None:
            n = direct(memoryview(buf)[start:])
        else:
            data = raw.read(block, decode_content=True)
            n = len(data)
            buf[start : start + n] = data
        if not n:
            return None
        return buf, start + n

    return next_block


def chunk_blocks(chunks: Iterable[bytes]) -> NextBlock:
    """Blocks from an iterable of byte strings (tests, recorded bodies)."""
    it = iter(chunks)

    def next_block(carry: bytes) -> tuple[bytearray, int] | None:
        for chunk in it:
            if chunk:
                buf = bytearray(carry)
                buf += chunk
                return buf, len(buf)
        return None

    return next_block


def iter_multipart(chunks: Iterable[bytes], boundary: bytes) -> Iterator[tuple[dict[str, str], SpoolBuffer]]:
    """Yield (headers, part) for each part of a multipart body given as byte chunks."""
    return iter_multipart_blocks(chunk_blocks(chunks), boundary)


class FramingMismatch(ProtocolError):
    """A part's Content-Length does not end where its delimiter begins."""


def iter_multipart_blocks(next_block: NextBlock, boundary: bytes, *,
                          trust_lengths: bool = True) -> Iterator[tuple[dict[str, str], SpoolBuffer]]:
    """Yield (headers, part) for each part of a multipart body, block by block.

    A part holds memoryviews of the blocks (spilled to a temporary file past ``SPILL_BYTES``),
    so memory stays at the parts not yet written plus one block: the body is never held whole.
    Blocks are never reused, so a part handed to another thread stays valid.

    Where a part gives its ``Content-Length`` (Orthanc and dcm4chee do), its bytes are taken by
    count and only the delimiter after them is checked, instead of searching every byte of the
    image for the boundary (a tenth of a retrieve's CPU). A length that does not end at a
    delimiter raises :class:`FramingMismatch`; the caller can then read the body again with
    ``trust_lengths=False``, which relies on the delimiters alone.
    """
    delim = b"\r\n--" + boundary
    dl = len(delim)
    carry = b"\r\n"  # the first delimiter has no leading CRLF
    state = "preamble"
    part: SpoolBuffer | None = None
    headers: dict[str, str] = {}
    remaining: int | None = None  # bytes of the current part still to come, when it said so
    while True:
        got = next_block(carry)
        if got is None:
            if state == "headers":
                raise ProtocolError("multipart part headers are truncated")
            raise ProtocolError("multipart body ended without its closing delimiter")
        buf, end = got
        view = memoryview(buf)
        pos = 0
        while True:
            if state == "headers":
                e = buf.find(b"\r\n\r\n", pos, end)
                if e < 0:
                    if end - pos > MAX_PART_HEADERS:
                        raise ProtocolError("a multipart part has an oversized header section")
                    break
                headers = {}
                for line in bytes(view[pos:e]).decode("latin-1").split("\r\n"):
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                pos = e + 4
                part = SpoolBuffer()
                state = "body"
                length = headers.get("content-length", "")
                remaining = int(length) if trust_lengths and length.isdigit() and len(length) < 16 else None
                continue
            if remaining is not None:
                take = min(remaining, end - pos)
                if take and part is not None:
                    part.write(view[pos : pos + take])
                pos += take
                remaining -= take
                if remaining or end - pos < dl:
                    break  # more of the part, or the whole delimiter, is still to come
                if view[pos : pos + dl] != delim:
                    raise FramingMismatch("a multipart part's Content-Length does not end at a delimiter")
                i = pos
            else:
                i = buf.find(delim, pos, end)
            if i < 0:
                # keep what could be the start of a delimiter for the next block
                safe = max(pos, end - dl + 1)
                if part is not None and safe > pos:
                    part.write(view[pos:safe])
                pos = safe
                break
            if part is not None and i > pos:
                part.write(view[pos:i])
            pos = i
            if i + dl + 2 > end:
                break  # need the two bytes after the delimiter: "--" closes the body
            if part is not None:
                yield headers, part
                part = None
            if buf[i + dl : i + dl + 2] == b"--":
                return
            pos = i + dl
            state = "headers"
            remaining = None
        carry = bytes(view[pos:end])


# --- DICOM JSON / File Meta helpers -------------------------------------------------------------


def _values(item: Mapping[str, Any], tag: str) -> list[str]:
    el = item.get(tag)
    if not isinstance(el, dict):
        return []
    vals = el.get("Value") or []
    return [str(v) if not isinstance(v, dict) else str(v.get("Alphabetic", "")) for v in vals]


def _value(item: Mapping[str, Any], tag: str) -> str | None:
    vals = _values(item, tag)
    return vals[0] if vals else None


#: Study attributes a hint query asks for: issuer, count, modalities, name, birth date, accession, date.
HINT_FIELDS = "00100021,00201208,00080061,00100010,00100030,00080050,00080020"


def _study_match(item: Mapping[str, Any]) -> StudyMatch:
    """What a QIDO-RS study answer says about a study and its patient."""
    count = _value(item, "00201208")
    return StudyMatch(
        study_uid=_value(item, "0020000D") or "",
        patient_id=_value(item, "00100020") or "",
        issuer=(_value(item, "00100021") or "").strip(),
        name=_value(item, "00100010") or "",
        birth_date=_value(item, "00100030") or "",
        accession=(_value(item, "00080050") or "").strip(),
        date=_value(item, "00080020") or "",
        modalities=frozenset(v.strip().upper() for v in _values(item, "00080061")),
        count=int(count) if count and count.isdigit() else None,
    )


def _meta_of(head: bytes) -> tuple[int, str, str, str]:
    """(dataset offset, transfer syntax, SOP Instance UID, SOP Class UID) from a File Meta group."""
    offset, ts = split_part10(head)
    sop = sop_class = ""
    pos = 132
    while pos + 8 <= min(offset, len(head)):
        _group, elem = struct.unpack_from("<HH", head, pos)
        vr = head[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        value = head[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        if elem == 0x0003:
            sop = value
        elif elem == 0x0002:
            sop_class = value
        pos = start + length
    return offset, ts, sop, sop_class


def _status_text(err: ConnectorError) -> str | None:
    """An HTTP status as the ledger shows it ("500"), not as a DIMSE code."""
    return None if err.status is None else str(err.status)
