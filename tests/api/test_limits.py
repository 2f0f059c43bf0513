"""The API's limits (issue 13): rate, body size, CORS, and when the gap report is computed again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator.api.app import ApiConfig
from tests.api.conftest import Api, make_api


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    api = make_api(tmp_path / "home", None, ApiConfig(rate_per_second=0.5, burst=3))
    with api.client as c:
        codes = [c.get("/me", headers=api.h("navigator")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get("/me", headers=api.h("navigator"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"] == "application/problem+json"
        assert c.get("/me", headers=api.h("admin")).status_code == 200  # per token
    api.core.close()


def test_body_limits(tmp_path: Path) -> None:
    api = make_api(tmp_path / "home", None, ApiConfig(max_body=1000, max_upload=5000, rate_per_second=1000,
                                                      burst=1000))
    with api.client as c:
        nav = api.h("navigator")
        big = {"case": "c1", "checklist": "oncology", "patient_name": "x" * 2000}
        assert c.post("/cases", headers=nav, json=big).status_code == 413
        assert c.post("/cases", headers=nav, json={"case": "c1", "checklist": "oncology"}).status_code == 201
        up = {**nav, "Content-Type": "application/zip"}
        assert c.post("/cases/c1/sources/media", headers=up, content=b"P" * 6000).status_code == 413

        def chunks() -> Any:  # no Content-Length: counted as it arrives
            for _ in range(12):
                yield b"K" * 500

        r = c.post("/cases/c1/sources/media", headers=up, content=chunks())
        assert r.status_code == 413, r.text
        assert list((api.core.case_dir("c1") / "uploads").iterdir()) == []  # partial upload removed
        assert c.get("/cases/c1/sources", headers=nav).json() == []
    api.core.close()


def test_no_cors_unless_configured(tmp_path: Path) -> None:
    origin = {"Origin": "https://pages.example"}
    api = make_api(tmp_path / "a", None)
    with api.client as c:
        r = c.get("/health", headers=origin)
        assert "access-control-allow-origin" not in r.headers
        assert c.options("/cases", headers={**origin, "Access-Control-Request-Method": "GET"}).status_code == 405
    api.core.close()
    api = make_api(tmp_path / "b", None, ApiConfig(cors_origins=["https://pages.example"], rate_per_second=1000,
                                                   burst=1000))
    with api.client as c:
        assert c.get("/health", headers=origin).headers["access-control-allow-origin"] == "https://pages.example"
    api.core.close()


def test_gap_report_is_recomputed_only_when_its_inputs_change(api: Api, media_zip: tuple[Path, Any]) -> None:
    from fixtures.generate import generate_zip

    c, nav = api.client, api.h("navigator")
    assert c.post("/cases", headers=nav, json={"case": "c1", "checklist": "oncology"}).status_code == 201
    up = {**nav, "Content-Type": "application/zip"}
    assert c.post("/cases/c1/sources/media", headers=up, content=media_zip[0].read_bytes()).status_code == 201
    assert api.wait(c.post("/cases/c1/pulls", headers=nav).json()["id"])["state"] in ("done", "partial")
    computed = [c.get("/cases/c1/gap-report", headers=nav).headers["x-report-computed"] for _ in range(3)]
    assert computed == ["true", "false", "false"]
    # a new source and its pull change the ledger: the next read computes again, once
    other = generate_zip(media_zip[0].with_name("other.zip"), variant="no-recent-labs", seed="other")
    assert c.post("/cases/c1/sources/media", headers=up, content=other.root.read_bytes()).status_code == 201
    assert [c.get("/cases/c1/gap-report", headers=nav).headers["x-report-computed"] for _ in range(2)] == [
        "true", "false"]
    assert api.wait(c.post("/cases/c1/pulls", headers=nav).json()["id"])["state"] in ("done", "partial")
    assert [c.get("/cases/c1/gap-report", headers=nav).headers["x-report-computed"] for _ in range(2)] == [
        "true", "false"]
