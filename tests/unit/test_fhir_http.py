"""The shared HTTP client: error classification, Retry-After, retries, limits, masking."""

from __future__ import annotations

import threading
import time
from email.utils import formatdate
from pathlib import Path

import pytest
import requests
import responses

from aggregator.errors import AccessDenied, AuthError, RemoteNotFound, TransientConnectorError
from connectors.http import (
    HttpClient,
    RateLimiter,
    RequestRejected,
    classify_response,
    mask_url,
    outcome_text,
    parse_retry_after,
)
from tests.fakes.fhir_server import FakeFhirServer
from tests.fakes.recordings import load, register_one

BASE = "http://127.0.0.1:8103/fhir/R4"


@pytest.fixture()
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Only the sleep itself is replaced; what we were asked to wait is recorded."""
    waits: list[float] = []
    monkeypatch.setattr("time.sleep", waits.append)
    return waits


def test_mask_url_hides_query_values() -> None:
    url = "http://h/fhir/Patient?family=Lakin&birthdate=1931-04-18&identifier=a|b"
    masked = mask_url(url)
    assert masked == "http://h/fhir/Patient?family=***&birthdate=***&identifier=***"


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None


EXPECTED = {
    "Patient-read-not-found": (RemoteNotFound, "not-found: Not found"),
    "Patient-read-invalid-id-not-found": (RemoteNotFound, "not-found: Not found"),
    "Patient-search-unknown-param": (RequestRejected, "invalid: Unknown search parameter: foo"),
    "Observation-search-invalid-date": (RequestRejected, "invalid: Invalid format for date search parameter"),
    "Patient-read-no-token": (AuthError, "login: Unauthorized"),
    "Patient-read-invalid-token": (AuthError, "login: Unauthorized"),
    "Patient-create-malformed-json": (RequestRejected, "invalid: Content could not be parsed"),
    "Patient-create-invalid-resource": (RequestRejected, "structure: Invalid date format"),
    "Patient-update-id-mismatch": (RequestRejected, "invalid: Incorrect resource ID"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_errors_are_classified(recordings: Path, name: str) -> None:
    (rec,) = load(recordings / "errors", name)
    cls, text = EXPECTED[name]
    with responses.RequestsMock() as rsps:
        register_one(rsps, rec)
        resp = requests.request(rec["request"]["method"], rec["request"]["url"], timeout=5)
    err = classify_response(resp)
    assert isinstance(err, cls) and err.status == rec["response"]["status"]
    assert text in err.message
    # never the request body (the malformed JSON, the invalid Patient)
    assert "Broken" not in err.message and "birthDate" not in err.message


def test_accepted_invalid_count_is_not_an_error(recordings: Path) -> None:
    (rec,) = load(recordings / "errors", "invalid-count-accepted")
    with responses.RequestsMock() as rsps:
        register_one(rsps, rec)
        bundle, _ = HttpClient(BASE).get_json(rec["request"]["url"])
    assert bundle["resourceType"] == "Bundle"


def test_outcome_text_keeps_code_and_details_but_not_diagnostics(recordings: Path) -> None:
    body = load(recordings / "bds-faults", "transient-error-status-poll01")[0]["response"]["body"]
    assert outcome_text(body) == "transient"
    echo = {"resourceType": "OperationOutcome", "issue": [
        {"code": "invalid", "details": {"text": "bad value " + "x" * 500}, "diagnostics": "family=Lakin"}]}
    text = outcome_text(echo) or ""
    assert "Lakin" not in text and len(text) < 230


def test_403_is_access_denied(recordings: Path) -> None:
    (rec,) = load(recordings / "smart-backend", "forbidden")
    with responses.RequestsMock() as rsps:
        register_one(rsps, rec)
        with pytest.raises(AccessDenied, match="forbidden: Forbidden"):
            HttpClient(BASE).request("GET", rec["request"]["url"])


def test_429_storm_honours_retry_after_then_succeeds(slept: list[float]) -> None:
    with FakeFhirServer(n_obs=3) as srv:
        srv.inject(r"/Patient/p0$", "status", (429, 3), times=3)
        res, _ = HttpClient(srv.url).get_json("Patient/p0")
    assert res["id"] == "p0"
    assert slept == [3.0, 3.0, 3.0]


def test_retry_after_http_date_is_honoured(slept: list[float]) -> None:
    when = formatdate(time.time() + 20, usegmt=True)
    with responses.RequestsMock() as rsps:
        rsps.add("GET", f"{BASE}/Patient/1", status=503, headers={"Retry-After": when})
        rsps.add("GET", f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
        HttpClient(BASE).get_json("Patient/1")
    assert len(slept) == 1 and 17 <= slept[0] <= 20


def test_endless_429_gives_a_transient_error(slept: list[float]) -> None:
    with FakeFhirServer(n_obs=1) as srv:
        srv.inject(r"/Patient/p0$", "status", (429, 1), times=10)
        with pytest.raises(TransientConnectorError) as err:
            HttpClient(srv.url, max_attempts=4).get_json("Patient/p0")
    assert err.value.status == 429 and len(slept) == 3


@pytest.mark.parametrize("fault", ["reset", "truncate", "badjson"])
def test_resets_and_truncated_bodies_are_retried(slept: list[float], fault: str) -> None:
    with FakeFhirServer(n_obs=2) as srv:
        srv.inject(r"/Observation", fault, times=2)
        client = HttpClient(srv.url)
        bundle, _ = client.get_json("Observation", params={"patient": "p0"})
    assert len(bundle["entry"]) == 2
    assert client.requests_sent == 3 and len(slept) == 2


def test_500_and_post_are_not_retried_blindly(slept: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        rsps.add("POST", f"{BASE}/Patient", status=503)
        rsps.add("GET", f"{BASE}/Patient/1", status=500)
        client = HttpClient(BASE)
        with pytest.raises(TransientConnectorError):
            client.request("POST", "Patient", data=b"{}")
        with pytest.raises(TransientConnectorError):
            client.request("GET", "Patient/1")
    assert client.requests_sent == 2 and slept == []


def test_concurrency_cap_holds_across_threads() -> None:
    with FakeFhirServer(n_obs=1, delay=0.05) as srv:
        client = HttpClient(srv.url, concurrency=2)
        threads = [threading.Thread(target=client.get_json, args=("Patient/p0",)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert srv.max_in_flight == 2


def test_concurrency_cap_covers_streamed_bodies() -> None:
    """A streamed download keeps its slot until the body is read, not just until the headers."""
    from connectors.fhir_rest import _spool

    with FakeFhirServer(n_obs=1) as srv:
        srv.inject(r"/Binary/doc-p0", "slowbody", 0.3, times=3)
        client = HttpClient(srv.url, concurrency=1)
        sizes: list[int] = []

        def download() -> None:
            f, _, _ = client.call("GET", "Binary/doc-p0", _spool, stream=True)
            assert f is not None
            sizes.append(len(f.read()))

        threads = [threading.Thread(target=download) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(sizes) == 3 and len(set(sizes)) == 1
    assert srv.max_in_flight == 1  # the server saw one transfer at a time


def test_stream_context_holds_the_slot_until_the_block_ends() -> None:
    with FakeFhirServer(n_obs=1) as srv:
        client = HttpClient(srv.url, concurrency=1)
        got: list[int] = []
        with client.stream("Binary/doc-p0") as resp:
            t = threading.Thread(target=lambda: got.append(len(client.request("GET", "metadata").content)))
            t.start()
            t.join(0.3)
            assert t.is_alive() and not got  # the other thread waits for the slot
            body = resp.content
        t.join(10)
    assert body.startswith(b"%PDF") and got


def test_rate_limiter_spaces_requests(slept: list[float]) -> None:
    limiter = RateLimiter(10)
    for _ in range(5):
        limiter.wait()
    assert len(slept) >= 3 and all(0 < s <= 0.41 for s in slept)


def test_token_goes_only_to_the_fhir_server() -> None:
    class Static:
        name = "bearer"

        def headers(self) -> dict[str, str]:
            return {"Authorization": "Bearer T"}

        def invalidate(self) -> None:
            pass

    with responses.RequestsMock() as rsps:
        rsps.add("GET", f"{BASE}/Binary/1", body=b"x")
        rsps.add("GET", "http://127.0.0.1:8103/storage/1", body=b"x")
        client = HttpClient(BASE, auth=Static())
        client.request("GET", "Binary/1")
        client.request("GET", "http://127.0.0.1:8103/storage/1")
        headers = [c.request.headers.get("Authorization") for c in rsps.calls]
    assert headers == ["Bearer T", None]
