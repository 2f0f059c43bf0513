"""Webhooks after a sync: a real HTTP server on a loopback socket receives them.

The receiver answers 503 (with ``Retry-After``) first, then 200: the delivery is retried through
the shared HTTP client with the same delivery id, signed anew, and each signature is checked here
with ``hmac`` directly (not with our own verifier). The body must hold ids, counts and links and
nothing of the patient.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.errors import UsageError
from aggregator.jobs import webhooks
from aggregator.jobs.schedule import run_due, set_schedule
from aggregator.jobs.sync import list_syncs

SECRET = "s3cret-for-the-test-only-7f3a"


class Receiver:
    """Records every request; answers from a script of statuses (the last one repeats)."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.got: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.got.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                  "at": time.monotonic()})
                status, headers = outer.script[min(len(outer.got) - 1, len(outer.script) - 1)]
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()


def _mac_ok(secret: str, body: bytes, header: str) -> bool:
    fields = dict(p.split("=", 1) for p in header.split(","))
    want = hmac.new(secret.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, fields["v1"]) and abs(time.time() - int(fields["t"])) < 120


def test_signed_webhook_retried_after_503_and_free_of_phi(tmp_path: Path, receivers: list[Receiver],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures import generate_download

    monkeypatch.delenv("AGGREGATOR_WEBHOOK_URL", raising=False)
    monkeypatch.setenv("AGGREGATOR_PUBLIC_URL", "https://records.example.org")
    case_hook = Receiver([(503, {"Retry-After": "1"}), (200, {})])
    receivers.append(case_hook)
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n")

    info = generate_download(tmp_path / "dl", variant="no-recent-labs")
    app = App.open(tmp_path / "home")
    create_case(app, "c-7", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, "c-7", media=str(tmp_path / "dl"))
    set_schedule(app, "c-7", "0 6 * * *", webhook_url=case_hook.url + "/hooks/sync?key=abc",
                 webhook_secret_file=str(secret_file), now=datetime(2026, 1, 1, tzinfo=UTC))

    (result,) = run_due(app, now=datetime(2026, 1, 1, 6, 0, tzinfo=UTC))
    (delivery,) = result["webhooks"]
    assert delivery["target"] == "case" and delivery["delivered"] is True
    assert delivery["status"] == 200 and delivery["attempts"] == 2
    assert "abc" not in json.dumps(result)  # the URL (and its query) is not in the sync's record

    first, second = case_hook.got
    assert second["at"] - first["at"] >= 0.9  # Retry-After: 1 was honoured
    assert first["path"] == "/hooks/sync?key=abc"
    assert first["body"] == second["body"]
    assert first["headers"]["X-Aggregator-Delivery"] == second["headers"]["X-Aggregator-Delivery"]
    for req in (first, second):
        assert req["headers"]["Content-Type"] == "application/json"
        assert req["headers"]["X-Aggregator-Event"] == "sync.completed"
        assert _mac_ok(SECRET, req["body"], req["headers"]["X-Aggregator-Signature"])
        assert not _mac_ok("another secret", req["body"], req["headers"]["X-Aggregator-Signature"])
        assert not _mac_ok(SECRET, req["body"] + b" ", req["headers"]["X-Aggregator-Signature"])
    # our verifier agrees, and refuses an old timestamp
    sig = second["headers"]["X-Aggregator-Signature"]
    assert webhooks.verify_signature(SECRET.encode(), second["body"], sig)
    assert not webhooks.verify_signature(SECRET.encode(), second["body"], sig, now=time.time() + 3600)

    body = json.loads(second["body"])
    assert body["case"] == "c-7" and body["sync"] == result["id"] and body["event"] == "sync.completed"
    assert body["counts"]["new_resources"] == result["new_resources"]
    assert body["counts"]["new_gaps"] == len(result["new_gaps"]) and "lab-results" in body["new_gaps"]
    assert body["links"]["sync"] == f"https://records.example.org/cases/c-7/syncs/{result['id']}"
    raw = second["body"].decode()
    for phi in (info.patient_name, info.patient_family, info.patient_given, info.birth_date, info.mrn,
                info.patient_id):
        assert phi not in raw, phi
    assert set(body) == {"event", "case", "sync", "trigger", "state", "scheduled_for", "started_at", "finished_at",
                         "score", "counts", "filled", "new_gaps", "failed_sources", "reminders_due", "links"}

    # the delivery is kept with the sync
    assert list_syncs(app, "c-7")[0]["webhooks"] == result["webhooks"]
    app.close()


def test_global_webhook_from_the_environment_and_a_failing_one(tmp_path: Path, receivers: list[Receiver],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ok, broken = Receiver([(200, {})]), Receiver([(500, {})])
    receivers += [ok, broken]
    monkeypatch.setenv("AGGREGATOR_WEBHOOK_URL", ok.url + "/all")
    monkeypatch.setenv("AGGREGATOR_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("CASE_HOOK_SECRET", "case-secret-xyz")
    app = App.open(tmp_path / "home")
    create_case(app, "c1", "oncology", case_date="2026-01-15")
    set_schedule(app, "c1", "0 6 * * *", webhook_url=broken.url, webhook_secret_env="CASE_HOOK_SECRET",
                 now=datetime(2026, 1, 1, tzinfo=UTC))

    (result,) = run_due(app, now=datetime(2026, 1, 1, 6, 0, tzinfo=UTC))
    assert result["state"] == "done"  # a webhook that fails does not fail the sync
    by = {d["target"]: d for d in result["webhooks"]}
    assert by["global"]["delivered"] is True and by["global"]["attempts"] == 1
    assert by["case"]["delivered"] is False and by["case"]["status"] == 500
    assert by["case"]["attempts"] == 1  # a 500 is not retried blindly (429/502/503/504 are)
    assert "HTTP 500" in by["case"]["error"]
    assert _mac_ok(SECRET, ok.got[0]["body"], ok.got[0]["headers"]["X-Aggregator-Signature"])
    assert _mac_ok("case-secret-xyz", broken.got[0]["body"], broken.got[0]["headers"]["X-Aggregator-Signature"])

    # a secret that cannot be read: said on the sync, nothing sent
    monkeypatch.delenv("CASE_HOOK_SECRET")
    (again,) = run_due(app, now=datetime(2026, 1, 2, 6, 0, tzinfo=UTC))
    case_delivery = next(d for d in again["webhooks"] if d["target"] == "case")
    assert case_delivery["delivered"] is False and "CASE_HOOK_SECRET" in case_delivery["error"]
    assert len(broken.got) == 1
    app.close()


def test_webhook_settings_are_checked(tmp_path: Path) -> None:
    app = App.open(tmp_path / "home")
    create_case(app, "c1", "oncology")
    for kwargs in ({"webhook_url": "ftp://example.org/x", "webhook_secret_env": "X"},
                   {"webhook_url": "https://user:pw@example.org/x", "webhook_secret_env": "X"},
                   {"webhook_url": "https://example.org/x"},
                   {"webhook_url": "https://example.org/x", "webhook_secret_env": "X", "webhook_secret_file": "/f"},
                   {"webhook_secret_env": "X"},
                   {"webhook_url": "https://example.org/x", "webhook_secret_env": "not a name"}):
        with pytest.raises(UsageError):
            set_schedule(app, "c1", "0 6 * * *", **kwargs)
    app.close()


def test_sync_surfaces_due_records_request_follow_ups_and_its_webhook_announces_them(
        tmp_path: Path, receivers: list[Receiver], monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: follow-up reminders come due on their day; the sync lists them and the webhook
    carries the request ids and dates (not the institution, not the patient)."""
    from datetime import date, timedelta

    from aggregator.jobs.pull import pull_case
    from aggregator.jobs.sync import sync_case
    from aggregator.pipeline import check_case
    from aggregator.records_requests import draft_requests, mark_sent
    from fixtures.generate import generate_download

    hook = Receiver([(200, {})])
    receivers.append(hook)
    monkeypatch.setenv("AGGREGATOR_WEBHOOK_URL", hook.url + "/all")
    monkeypatch.setenv("AGGREGATOR_WEBHOOK_SECRET", SECRET)
    info = generate_download(tmp_path / "dl", variant="no-images")
    app = App.open(tmp_path / "home")
    create_case(app, "c", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(tmp_path / "dl"))
    pull_case(app, "c")
    report, cr = check_case(app, "c")
    (letter,) = draft_requests(app, "c", report, cr, send_to="Records desk")["drafted"]
    mark_sent(app, letter["id"], date.today() - timedelta(days=12), "fax")  # day 10 is past, day 25 is not

    result = sync_case(app, "c")
    (due,) = result["reminders_due"]
    assert (due["request"], due["day"], due["outstanding"]) == (letter["id"], 10, 2)
    body = json.loads(hook.got[0]["body"])
    assert body["counts"]["reminders_due"] == 1
    assert body["reminders_due"] == [{k: due[k] for k in ("request", "kind", "on", "due_on")}]
    raw = hook.got[0]["body"].decode()
    for secret in (letter["institution"], info.patient_name, info.birth_date):
        assert secret not in raw
    app.close()
