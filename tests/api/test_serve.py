"""``aggregator serve`` starts a real uvicorn on loopback: OpenAPI, docs, headers, masked access log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

EXE = Path(sys.executable).with_name("aggregator")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_serve_runs_the_api_on_loopback(tmp_path: Path) -> None:
    if not EXE.exists():
        pytest.skip("the console script is not installed")
    port = _free_port()
    env = {**os.environ, "AGGREGATOR_HOME": str(tmp_path / "home")}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([str(EXE), "serve", "--port", str(port)], stdout=logf, stderr=subprocess.STDOUT,
                                env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    status, headers, body = _get(base + "/health")
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise AssertionError(log.read_text()) from None
                    time.sleep(0.2)
            assert status == 200 and json.loads(body) == {"ok": True}
            assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
            assert headers["referrer-policy"] == "no-referrer" and "default-src 'none'" in headers[
                "content-security-policy"]
            assert "access-control-allow-origin" not in headers and "server" not in headers
            status, _, body = _get(base + "/openapi.json")
            assert status == 200 and "/cases/{case}/pulls" in json.loads(body)["paths"]
            assert _get(base + "/docs")[0] == 200
            status, headers, body = _get(base + "/cases?name=Secret-Name")
            assert status == 401 and headers["content-type"] == "application/problem+json"
            assert headers["www-authenticate"].startswith("Bearer")
            problem = json.loads(body)
            assert problem["status"] == 401 and "Traceback" not in body.decode()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    text = log.read_text()
    assert '"GET /cases?<masked>" 401' in text and "Secret-Name" not in text
