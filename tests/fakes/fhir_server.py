"""A small local FHIR R4 server (stdlib ``ThreadingHTTPServer`` on 127.0.0.1) for tests and bench.

It serves generated data for faults and sizes the recordings cannot show: 429 storms with
Retry-After, truncated bodies, connection resets, ``next``-link loops, a concurrency probe,
and Bulk Data exports of any number of NDJSON lines generated on the fly (never held whole).
Data: per patient, one Patient, ``n_obs`` Observations (each citing a Practitioner that only a
read by id returns, for hydration), one DocumentReference whose attachment is ``Binary/doc-<p>``
with its SHA-1 ``hash``. Every answer carries a ``Date`` header (the server's clock).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

OLD = "2020-01-01T00:00:00.000Z"
PDF = b"%PDF-1.4\n% fake attachment for tests\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"


def now_instant(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class FakeFhirServer:
    def __init__(self, patients: int = 1, n_obs: int = 120, export_lines: int | None = None,
                 delay: float = 0.0, obs_size: int = 0, token: str | None = None) -> None:
        #: when set, every FHIR request except /metadata needs ``Authorization: Bearer <token>``
        self.token = token
        #: the server's clock: ``Date`` headers, lastUpdated of changes, transactionTime. Tests
        #: set it to move time forward between pulls without waiting.
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.lock = threading.Lock()
        self.resources: dict[str, dict[str, Any]] = {}
        self.binaries: dict[str, bytes] = {}
        self.export_lines = export_lines
        self.delay = delay
        self.faults: list[tuple[re.Pattern[str], str, Any]] = []
        self.log: list[tuple[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.jobs: dict[str, dict[str, Any]] = {}
        self.deleted_jobs: list[str] = []
        filler = "x" * obs_size
        for p in range(patients):
            pid = f"p{p}"
            self._put({"resourceType": "Patient", "id": pid, "name": [{"family": f"Fam{p}", "given": ["Giv"]}],
                       "birthDate": "1950-01-01", "identifier": [{"system": "urn:mrn", "value": f"MRN{p}"}]})
            self._put({"resourceType": "Practitioner", "id": f"pr{p}", "name": [{"family": "Doc"}]})
            for i in range(n_obs):
                obs = {"resourceType": "Observation", "id": f"o{p}-{i}", "status": "final",
                       "subject": {"reference": f"Patient/{pid}"},
                       "performer": [{"reference": f"Practitioner/pr{p}"}],
                       "code": {"text": "glucose"}, "valueQuantity": {"value": i}}
                if filler:
                    obs["note"] = [{"text": filler}]
                self._put(obs)
            data = PDF + pid.encode()
            self.binaries[f"doc-{pid}"] = data
            self._put({"resourceType": "DocumentReference", "id": f"d{p}", "status": "current",
                       "subject": {"reference": f"Patient/{pid}"},
                       "content": [{"attachment": {"contentType": "application/pdf", "url": f"Binary/doc-{pid}",
                                                   "hash": base64.b64encode(hashlib.sha1(data).digest()).decode()}}]})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # -- data ----------------------------------------------------------------------------

    def _put(self, res: dict[str, Any], when: str = OLD) -> None:
        old = self.resources.get(f"{res['resourceType']}/{res['id']}")
        version = int(old["meta"]["versionId"]) + 1 if old else 1
        res["meta"] = {"versionId": str(version), "lastUpdated": when}
        self.resources[f"{res['resourceType']}/{res['id']}"] = res

    def update(self, key: str, **fields: Any) -> None:
        """Change a resource now (new versionId and lastUpdated), as a clinician would."""
        with self.lock:
            res = dict(self.resources[key])
            res.update(fields)
            self._put(res, now_instant(self.clock()))

    def patient_resources(self, pid: str, rtype: str | None = None, since: str | None = None) -> list[dict[str, Any]]:
        out = []
        for key, res in self.resources.items():
            if rtype and res["resourceType"] != rtype:
                continue
            if res["resourceType"] == "Practitioner":
                continue
            if key != f"Patient/{pid}" and (res.get("subject") or {}).get("reference") != f"Patient/{pid}":
                continue
            if since and res["meta"]["lastUpdated"] < since.replace("Z", ".000Z"):
                continue
            out.append(res)
        return out

    # -- faults --------------------------------------------------------------------------

    def inject(self, path_regex: str, kind: str, arg: Any = None, times: int = 1) -> None:
        """Next ``times`` requests whose path+query match get ``kind``: status | truncate | reset | loop."""
        for _ in range(times):
            self.faults.append((re.compile(path_regex), kind, arg))

    def _take_fault(self, target: str) -> tuple[str, Any] | None:
        with self.lock:
            for i, (rx, kind, arg) in enumerate(self.faults):
                if rx.search(target):
                    del self.faults[i]
                    return kind, arg
        return None

    # -- server --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"

    def __enter__(self) -> FakeFhirServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: with Nagle on, every answer would
            # stall ~40 ms on the client's delayed ACK and hide what the client itself costs.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def date_time_string(self, timestamp: float | None = None) -> str:
                return formatdate(server.clock().timestamp(), usegmt=True)

            def do_POST(self) -> None:
                """The OAuth token endpoint (``/oauth/token``): grants ``server.token`` unless
                the requested scope is in ``server.refused_scopes`` (403, as servers refuse
                a SMART version they do not speak)."""
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                server.log.append(("POST", self.path))
                if self.path != "/oauth/token" or form.get("grant_type") != "client_credentials":
                    self._oo(404, "not-found", "Not found")
                    return
                scope = form.get("scope", "")
                server.token_scopes.append(scope)
                if scope in server.refused_scopes:
                    self._send(403, json.dumps({"error": "invalid_scope",
                                                "error_description": "scope not allowed"}).encode(),
                               "application/json")
                    return
                self._send(200, json.dumps({"access_token": server.token or "tok", "token_type": "Bearer",
                                            "expires_in": 3600, "scope": scope}).encode(), "application/json")

            def do_DELETE(self) -> None:
                server.log.append(("DELETE", self.path))
                job = self.path.rsplit("/", 1)[-1]
                server.deleted_jobs.append(job)
                self._send(202, b"Accepted", "text/plain")

            def do_GET(self) -> None:
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.log.append(("GET", self.path))
                    if server.delay:
                        time.sleep(server.delay)
                    self._get()
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status: int, body: bytes, ctype: str = "application/fhir+json",
                      headers: dict[str, str] | None = None, declared: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(declared if declared is not None else len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(obj).encode(), headers=headers)

            def _oo(self, status: int, code: str, text: str) -> None:
                self._json({"resourceType": "OperationOutcome",
                            "issue": [{"severity": "error", "code": code, "details": {"text": text}}]}, status)

            def _get(self) -> None:
                parts = urlsplit(self.path)
                q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                path = parts.path
                fault = server._take_fault(self.path)
                if fault:
                    kind, arg = fault
                    if kind == "status":
                        status, retry_after = arg if isinstance(arg, tuple) else (arg, None)
                        hdrs = {"Retry-After": str(retry_after)} if retry_after is not None else {}
                        body = json.dumps({"resourceType": "OperationOutcome", "issue": [
                            {"severity": "error", "code": "throttled", "details": {"text": "slow down"}}]})
                        self._send(status, body.encode(), headers=hdrs)
                        return
                    if kind == "reset":  # RST instead of an answer
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.close_connection = True
                        self.connection.close()
                        return
                    if kind == "truncate":  # promises more bytes than it sends, then hangs up
                        self._send(200, b'{"resourceType": "Bundle", "type": "sea', declared=5000)
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    if kind == "badjson":  # a complete HTTP answer whose JSON is cut short
                        self._send(200, b'{"resourceType": "Bundle", "type": "sea')
                        return
                    if kind == "slowbody":  # headers at once, the body ``arg`` seconds later
                        self.send_response(200)
                        self.send_header("Content-Type", "application/pdf")
                        self.send_header("Content-Length", str(len(PDF)))
                        self.end_headers()
                        self.wfile.flush()
                        time.sleep(float(arg))
                        self.wfile.write(PDF)
                        return
                if not path.startswith("/fhir"):
                    self._oo(404, "not-found", "Not found")
                    return
                path = path[len("/fhir"):]
                if server.token and path not in ("/metadata", "/.well-known/smart-configuration") and \
                        self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._oo(401, "login", "Unauthorized")
                    return
                if path == "/metadata":
                    self._json(server.capability())
                    return
                if path == "/.well-known/smart-configuration" and server.smart_configuration is not None:
                    self._send(200, json.dumps(server.smart_configuration).encode(), "application/json")
                    return
                if path == "/Patient" and q.get("_summary") == "count":
                    total = sum(1 for k in server.resources if k.startswith("Patient/"))
                    self._json({"resourceType": "Bundle", "type": "searchset", "total": total})
                    return
                m = re.fullmatch(r"/Patient/([^/]+)/\$everything", path)
                if m:
                    self._page(f"/fhir/Patient/{m.group(1)}/$everything",
                               server.patient_resources(m.group(1), since=q.get("_since")), q, fault)
                    return
                m = re.fullmatch(r"/Binary/([^/]+)", path)
                if m and m.group(1) in server.binaries:
                    self._send(200, server.binaries[m.group(1)], "application/pdf")
                    return
                m = re.fullmatch(r"/(Patient|Group)/([^/]+)/\$export", path)
                if m:
                    if m.group(1) not in server.export_levels:
                        self._oo(404, "not-supported", f"{m.group(1)}-level export is not supported")
                        return
                    if m.group(1) == "Group" and m.group(2) not in server.groups:
                        self._oo(404, "not-found", "Group not found")
                        return
                    job_id = f"job{len(server.jobs) + 1}"
                    pids = server.groups[m.group(2)] if m.group(1) == "Group" else [m.group(2)]
                    types = q["_type"].split(",") if q.get("_type") else ["Patient", "Observation"]
                    server.jobs[job_id] = {"pids": pids, "polls": 0, "since": q.get("_since"), "types": types}
                    self._send(202, b"", headers={"Content-Location": f"{server.url}/bulkstatus/{job_id}"})
                    return
                m = re.fullmatch(r"/bulkstatus/([^/]+)", path)
                if m:
                    job = server.jobs[m.group(1)]
                    job["polls"] += 1
                    if job["polls"] <= server.export_polls:
                        self._send(202, b"", headers={"Retry-After": str(server.export_retry_after),
                                                      "X-Progress": "50%"})
                        return
                    files = [{"type": t, "url": f"{server.url}/bulkfiles/{m.group(1)}-{t}.ndjson"}
                             for t in job["types"]]
                    self._json({"transactionTime": now_instant(server.clock()), "request": "x",
                                "requiresAccessToken": True, "output": files, "error": []})
                    return
                m = re.fullmatch(r"/bulkfiles/([^/]+)-([A-Za-z]+)\.ndjson", path)
                if m:
                    job = server.jobs[m.group(1)]
                    self._ndjson(job["pids"], m.group(2), job["since"])
                    return
                m = re.fullmatch(r"/([A-Za-z]+)/([^/]+)", path)
                if m:
                    res = server.resources.get(f"{m.group(1)}/{m.group(2)}")
                    if res is None:
                        self._oo(404, "not-found", "Not found")
                    elif self.headers.get("If-None-Match") == f'W/"{res["meta"]["versionId"]}"':
                        self._send(304, b"", headers={"ETag": f'W/"{res["meta"]["versionId"]}"'})
                    else:
                        self._json(res, headers={"ETag": f'W/"{res["meta"]["versionId"]}"'})
                    return
                m = re.fullmatch(r"/([A-Za-z]+)", path)
                if m:
                    pid = q.get("patient") or q.get("subject") or q.get("_id")
                    since = q.get("_lastUpdated", "")[2:] or None
                    self._page(f"/fhir/{m.group(1)}", server.patient_resources(pid or "", m.group(1), since), q, fault)
                    return
                self._oo(404, "not-found", "Not found")

            def _page(self, path: str, items: list[dict[str, Any]], q: dict[str, str], fault: Any) -> None:
                count = int(q.get("_count", "50"))
                offset = int(q.get("_offset", "0"))
                page = items[offset: offset + count]
                rest = {k: v for k, v in q.items() if k not in ("_offset",)}
                query = "&".join(f"{k}={v}" for k, v in rest.items())
                links = [{"relation": "self", "url": f"http://{self.headers['Host']}{self.path}"}]
                if offset + count < len(items):
                    links.append({"relation": "next",
                                  "url": f"http://{self.headers['Host']}{path}?{query}&_offset={offset + count}"})
                if server.loop_links:
                    links = [{"relation": "next", "url": f"http://{self.headers['Host']}{self.path}"}]
                self._json({"resourceType": "Bundle", "type": "searchset", "link": links,
                            "entry": [{"fullUrl": f"{server.url}/{r['resourceType']}/{r['id']}", "resource": r,
                                       "search": {"mode": "match"}} for r in page]})

            def _ndjson(self, pids: list[str], rtype: str, since: str | None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for pid in pids:
                    for block in server.ndjson_blocks(pid, rtype, since):
                        self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

        return Handler

    loop_links = False
    #: served at ``.well-known/smart-configuration`` when set (see :meth:`smart`)
    smart_configuration: dict[str, Any] | None = None
    #: scopes the token endpoint refuses, and the scopes it was asked for
    refused_scopes: frozenset[str] = frozenset()

    @property
    def token_scopes(self) -> list[str]:
        return self.__dict__.setdefault("_token_scopes", [])

    def smart(self, capabilities: list[str], scopes: list[str]) -> None:
        """Advertise SMART (``capabilities`` like ``permission-v2``) with a token endpoint."""
        self.smart_configuration = {
            "token_endpoint": f"http://127.0.0.1:{self.httpd.server_address[1]}/oauth/token",
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
            "grant_types_supported": ["client_credentials"], "capabilities": capabilities,
            "scopes_supported": scopes}
    #: where $export is served (and declared in /metadata)
    export_levels: tuple[str, ...] = ("Patient", "Group")
    #: status polls answered "in progress" (202) before the manifest, and their Retry-After
    export_polls: int = 1
    export_retry_after: int = 1

    @property
    def groups(self) -> dict[str, list[str]]:
        """One group, ``all``, holding every patient."""
        return {"all": sorted(k.split("/", 1)[1] for k in self.resources if k.startswith("Patient/"))}

    def ndjson_blocks(self, pid: str, rtype: str = "Observation", since: str | None = None) -> Iterator[bytes]:
        """Export lines of one type for one patient: the stored resources changed after
        ``since``, or for Observation ``export_lines`` generated ones (never all in memory)."""
        if self.export_lines is None or rtype != "Observation":
            lines = [json.dumps(r).encode() + b"\n" for r in self.patient_resources(pid, rtype, since)]
            yield b"".join(lines)
            return
        buf: list[bytes] = []
        for i in range(self.export_lines):
            buf.append(json.dumps({"resourceType": "Observation", "id": f"x{i}", "status": "final",
                                   "subject": {"reference": f"Patient/{pid}"}, "code": {"text": "t"},
                                   "meta": {"versionId": "1", "lastUpdated": OLD},
                                   "valueQuantity": {"value": i}}).encode() + b"\n")
            if len(buf) >= 1000:
                yield b"".join(buf)
                buf = []
        if buf:
            yield b"".join(buf)

    def capability(self) -> dict[str, Any]:
        types = sorted({r["resourceType"] for r in self.resources.values()})
        return {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
                "software": {"name": "fake-fhir", "version": "1"},
                "rest": [{"mode": "server",
                          "operation": [{"name": "everything"}],
                          "resource": [{"type": t, "searchParam": [{"name": "patient"}, {"name": "_lastUpdated"},
                                                                   {"name": "_id"}],
                                        "operation": [{"name": "export"}] if t in self.export_levels else []}
                                       for t in [*types, "Group"]]}]}
