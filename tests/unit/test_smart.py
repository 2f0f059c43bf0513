"""Auth strategies: SMART Backend Services (recorded Medplum token exchange), client credentials,
bearer, token caching and the single refresh on 401."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import cast
from urllib.parse import parse_qs

import jwt
import pytest
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from responses.registries import OrderedRegistry

from aggregator.errors import AccessDenied, AuthError, ConfigError
from connectors.base import NullProgress, PatientRef
from connectors.fhir_rest import FhirConfig, FhirConnector
from connectors.smart import SmartBackendAuth
from tests.fakes.recordings import load, register, register_one
from tests.support import make_sink

BASE = "http://127.0.0.1:8103/fhir/R4"
TOKEN_URL = "http://127.0.0.1:8103/oauth2/token"
A = "ba5e1362-5dbd-47e6-bc4d-d19d1d1e8075"


def write_key(tmp_path: Path, alg: str) -> tuple[str, object]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS384" else \
        ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path = tmp_path / f"{alg}.pem"
    path.write_bytes(pem)
    return str(path), key.public_key()


def smart(tmp_path: Path, alg: str = "RS384", **kw: object) -> tuple[FhirConnector, object]:
    path, public = write_key(tmp_path, alg)
    cfg = FhirConfig(url=BASE, auth="smart-backend", client_id="my-client", private_key=path, kid="k1", alg=alg,
                     **kw)  # type: ignore[arg-type]
    return FhirConnector(cfg), public


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_backend_token_discovered_signed_and_cached(recordings: Path, tmp_path: Path, alg: str) -> None:
    c, public = smart(tmp_path, alg)
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        register(rsps, recordings / "capabilities", "fhir-well-known")
        register(rsps, recordings / "smart-backend", "private-key-jwt")
        read = load(recordings / "smart-backend", "Patient-read")[0]
        register_one(rsps, read)
        register_one(rsps, read)
        assert c.client.get_json(f"Patient/{A}")[0]["id"] == A
        assert c.client.get_json(f"Patient/{A}")[0]["id"] == A
        form = parse_qs(str(rsps.calls[1].request.body))
        auth_headers = [rsps.calls[i].request.headers.get("Authorization") for i in (0, 1, 2, 3)]
    assert cast(SmartBackendAuth, c.client.auth).fetches == 1  # cached: one token for both reads
    assert auth_headers[0] is None and auth_headers[1] is None  # discovery and token request carry no token
    assert auth_headers[2] == auth_headers[3] == "Bearer <redacted>"
    assert form["grant_type"] == ["client_credentials"] and form["scope"] == ["system/*.read"]
    assert form["client_assertion_type"] == ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
    assertion = form["client_assertion"][0]
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == alg and header["kid"] == "k1"
    claims = jwt.decode(assertion, public, algorithms=[alg], audience=TOKEN_URL)  # type: ignore[arg-type]
    assert claims["iss"] == claims["sub"] == "my-client"
    assert 0 < claims["exp"] - claims["iat"] <= 300 and claims["jti"]


def test_each_assertion_has_a_new_jti(tmp_path: Path) -> None:
    path, _ = write_key(tmp_path, "RS384")
    auth = SmartBackendAuth(TOKEN_URL, "c", Path(path).read_bytes(), kid="k", alg="RS384", scope="s",
                            poster=lambda *a: {})
    first, second = (jwt.decode(auth.assertion(), options={"verify_signature": False}) for _ in range(2))
    assert first["jti"] != second["jti"]


def test_wrongly_signed_assertion_is_an_auth_error(recordings: Path, tmp_path: Path) -> None:
    c, _ = smart(tmp_path, token_url=TOKEN_URL)
    with responses.RequestsMock() as rsps:
        register(rsps, recordings / "smart-backend", "wrongly-signed")
        with pytest.raises(AuthError, match="invalid_request: Invalid client assertion signature"):
            c.client.auth.headers()


def test_check_with_smart_reports_auth_ok(recordings: Path, tmp_path: Path) -> None:
    c, _ = smart(tmp_path, token_url=TOKEN_URL)
    searchset = load(recordings / "patient-match", "MRN")[0]["response"]["body"]  # a real Medplum searchset
    with responses.RequestsMock() as rsps:
        register(rsps, recordings / "capabilities", "metadata")
        register(rsps, recordings / "smart-backend", "private-key-jwt")
        rsps.add("GET", f"{BASE}/Patient", json=searchset, content_type="application/fhir+json")
        result = c.check()
        probe = rsps.calls[-1].request
    assert result.ok and result.details["auth_ok"] and result.details["auth"] == "smart-backend"
    # the token was proven on the FHIR server itself, with a request that reads no patient
    assert probe.url == f"{BASE}/Patient?_summary=count" and probe.headers["Authorization"].startswith("Bearer ")


def test_check_in_bearer_mode_reports_a_refused_token(recordings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorded Medplum 401 for an invalid token, answered to the check's probe."""
    unauthorized = load(recordings / "errors", "invalid-token")[0]["response"]
    monkeypatch.setenv("FHIR_TOKEN", "expired")
    c = FhirConnector(FhirConfig(url=BASE, auth="bearer", token_env="FHIR_TOKEN"))
    with responses.RequestsMock() as rsps:
        register(rsps, recordings / "capabilities", "metadata")
        rsps.add("GET", f"{BASE}/Patient", json=unauthorized["body"], status=unauthorized["status"])
        result = c.check()
    assert not result.ok
    assert result.details["auth_ok"] is False and result.details["status"] == 401
    assert "login: Unauthorized" in result.details["error"] and "expired" not in json.dumps(result.details)
    assert result.details["fhirVersion"] == "4.0.1"  # what /metadata said is still reported


def test_system_read_token_cannot_export(recordings: Path, tmp_path: Path) -> None:
    """Medplum refused $export to a system/*.read token (403). Its smart-configuration also
    advertises SMART v2, so a system/*.rs token is asked for once and the request sent again;
    the recorded 403 answers that too, and then it stands."""
    c, _ = smart(tmp_path, token_url=TOKEN_URL)
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        register(rsps, recordings / "smart-backend", "private-key-jwt")
        register(rsps, recordings / "smart-backend", "forbidden")
        register(rsps, recordings / "capabilities", "fhir-well-known")
        register(rsps, recordings / "smart-backend", "private-key-jwt")
        register(rsps, recordings / "smart-backend", "forbidden")
        with pytest.raises(AccessDenied, match="forbidden"):
            c.client.request("GET", "Patient/$export", params={"_type": "Patient,Condition"},
                             headers={"Prefer": "respond-async"})
        scopes = [parse_qs(str(call.request.body))["scope"] for call in rsps.calls if call.request.method == "POST"]
    assert scopes == [["system/*.read"], ["system/*.rs"]]
    assert cast(SmartBackendAuth, c.client.auth).scope == "system/*.rs"


def test_401_refreshes_the_token_once(recordings: Path, tmp_path: Path) -> None:
    c, _ = smart(tmp_path, token_url=TOKEN_URL)
    token = load(recordings / "smart-backend", "private-key-jwt")[0]
    unauthorized = load(recordings / "errors", "invalid-token")[0]
    read = load(recordings / "smart-backend", "Patient-read")[0]
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        for r in (token, unauthorized, token, read):  # expired token -> one refresh -> OK
            register_one(rsps, r)
        assert c.client.get_json(f"Patient/{A}")[0]["id"] == A
        for r in (unauthorized, token, unauthorized):  # still refused after the refresh -> AuthError
            register_one(rsps, r)
        with pytest.raises(AuthError, match="login: Unauthorized"):
            c.client.get_json(f"Patient/{A}")
    assert cast(SmartBackendAuth, c.client.auth).fetches == 3


def test_client_credentials_uses_basic_auth_and_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("FHIR_CLIENT_ID", "cid")
    c = FhirConnector(FhirConfig(url=BASE, auth="client-credentials", client_id_env="FHIR_CLIENT_ID",
                                 client_secret_file=str(secret), token_url=TOKEN_URL))
    with responses.RequestsMock() as rsps:
        rsps.add("POST", TOKEN_URL, json={"access_token": "tok", "token_type": "Bearer", "expires_in": 3600})
        assert c.client.auth.headers() == {"Authorization": "Bearer tok"}
        import base64

        assert rsps.calls[0].request.headers["Authorization"] == "Basic " + base64.b64encode(b"cid:s3cret").decode()


def test_bearer_from_env_and_missing_secrets_name_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_TOKEN", "abc")
    c = FhirConnector(FhirConfig(url=BASE, auth="bearer", token_env="FHIR_TOKEN"))
    assert c.client.auth.headers() == {"Authorization": "Bearer abc"}
    monkeypatch.delenv("FHIR_TOKEN")
    with pytest.raises(ConfigError, match="FHIR_TOKEN is not set"):
        _ = FhirConnector(FhirConfig(url=BASE, auth="bearer", token_env="FHIR_TOKEN")).client
    with pytest.raises(ConfigError, match="ES384 needs an EC P-384"):
        SmartBackendAuth(TOKEN_URL, "c", rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            kid=None, alg="ES384", scope="s", poster=lambda *a: {})


def test_smart_pull_end_to_end_sends_no_token_in_ledger(recordings: Path, tmp_path: Path) -> None:
    c, _ = smart(tmp_path, token_url=TOKEN_URL, strategy="crawl")
    h = make_sink(tmp_path, kind="fhir")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        register(rsps, recordings / "smart-backend", "private-key-jwt")
        rsps.add("GET", f"{BASE}/metadata", status=404)
        register(rsps, recordings / "smart-backend", "Patient-read")
        rsps.add("GET", re.compile(rf"{re.escape(BASE)}/[A-Za-z]+(\?.*)?$"),
            json={"resourceType": "Bundle", "type": "searchset", "link": []})
        c.pull(PatientRef(id=A), None, h.sink, NullProgress())
    rows = h.entries()
    assert [r.key for r in rows if r.kind == "resource"] == [f"Patient/{A}"]
    assert "redacted" not in json.dumps([r.meta for r in rows])


def test_token_url_discovered_at_the_server_root(recordings: Path, tmp_path: Path) -> None:
    """capabilities/0003: when the FHIR base has no .well-known, the server root's is used."""
    root = load(recordings / "capabilities", "root-well-known")[0]
    not_found = load(recordings / "errors", "not-found.json")[0]["response"]["body"]
    c, _ = smart(tmp_path)
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        rsps.add("GET", f"{BASE}/.well-known/smart-configuration", json=not_found, status=404)
        register_one(rsps, root)
        register(rsps, recordings / "smart-backend", "private-key-jwt")
        assert c.client.auth.headers()["Authorization"].startswith("Bearer ")
    assert cast(SmartBackendAuth, c.client.auth).token_url == TOKEN_URL
