"""Packages: build (a job), list, download (a streamed zip with Content-Length and ETag),
verify, and the package's summary page for the consultant.

Each build writes ``<case folder>/packages/<id>.zip`` (owner-only, like every file of a case)
and a small ``<id>.json`` beside it with its size, SHA-256 (the ETag) and completeness.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from aggregator import audit
from aggregator.api.auth import Caller, actor, audited, guard
from aggregator.api.middleware import PAGE_CSP
from aggregator.api.problems import documented
from aggregator.api.routes.jobs import job_view
from aggregator.app import App
from aggregator.errors import NotFound
from aggregator.jobs.tasks import PACKAGES_FOLDER

router = APIRouter(tags=["packages"], responses=documented(403, 404, 409, 422))
ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
FOLDER = PACKAGES_FOLDER


def _folder(core: App, case: str) -> Path:
    return core.case_dir(case) / FOLDER


def _meta(core: App, case: str, package_id: str) -> tuple[Path, dict[str, Any]]:
    missing = NotFound(f"case {case!r} has no package {package_id!r}")
    if not ID_RE.match(package_id):
        raise missing
    folder = _folder(core, case)
    try:
        meta = json.loads((folder / f"{package_id}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise missing from None
    path = folder / f"{package_id}.zip"
    if not path.is_file():
        raise missing
    return path, meta


@router.post("/cases/{case}/packages", status_code=202, summary="Build the consultant package (a job)")
def build(request: Request, case: str, principal: Caller) -> JSONResponse:
    core = guard(request, principal, case, "package:build", audit.CREATE, "package")
    who = actor(request, principal)
    job = request.app.state.runner.submit("package", case, owner=principal.name, params={}, actor=who)
    audit.record(core.db, who, audit.CREATE, "package-request", case_id=case, entity={"job": job.id})
    return JSONResponse(job_view(core, job), status_code=202, headers={"Location": f"/jobs/{job.id}"})


@router.get("/cases/{case}/packages", summary="The case's packages, newest last")
def packages(request: Request, case: str, principal: Caller) -> list[dict[str, Any]]:
    core = guard(request, principal, case, "package:read", audit.READ, "package-list")
    out = []
    for meta_file in sorted(_folder(core, case).glob("*.json")):
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (meta_file.with_suffix(".zip")).is_file():
            out.append(meta)
    audited(request, principal, audit.READ, "package-list", case_id=case)
    return out


@router.get("/cases/{case}/packages/{package_id}", summary="Download the package zip",
            responses={200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
                       304: {"description": "Not Modified"}})
def download(request: Request, case: str, package_id: str, principal: Caller) -> Response:
    core = guard(request, principal, case, "package:read", audit.READ, "package")
    path, meta = _meta(core, case, package_id)
    etag = f'"{meta["sha256"]}"'
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    audited(request, principal, audit.READ, "package", case_id=case, entity={"package": package_id})
    # FileResponse streams the file in blocks and sets Content-Length from its size
    return FileResponse(path, media_type="application/zip", filename=f"package-{case}-{package_id}.zip",
                        headers={"ETag": etag}, stat_result=path.stat())


@router.post("/cases/{case}/packages/{package_id}/verify", summary="Check every file against the manifest")
def verify(request: Request, case: str, package_id: str, principal: Caller) -> dict[str, Any]:
    from aggregator.package import verify_package

    core = guard(request, principal, case, "package:read", audit.READ, "package-verify")
    path, _ = _meta(core, case, package_id)
    problems = verify_package(path)
    audited(request, principal, audit.READ, "package-verify", case_id=case, entity={"package": package_id})
    return {"package": package_id, "ok": not problems, "problems": [{"file": f, "problem": p} for f, p in problems]}


@router.get("/cases/{case}/packages/{package_id}/summary", summary="The package's clinical summary page",
            responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}})
def summary(request: Request, case: str, package_id: str, principal: Caller) -> Response:
    core = guard(request, principal, case, "summary", audit.READ, "summary")
    path, _ = _meta(core, case, package_id)
    with zipfile.ZipFile(path) as zf:
        try:
            page = zf.read("summary.html")
        except KeyError:
            raise NotFound(f"package {package_id!r} has no summary page") from None
    audited(request, principal, audit.READ, "summary", case_id=case, entity={"package": package_id})
    return Response(page, media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": PAGE_CSP})
