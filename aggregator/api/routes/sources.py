"""A case's sources: endpoint sources, uploaded media (streamed to disk), list and remove.

An upload is the request body itself (a zip, or one file of the patient's download), written
to ``<case folder>/uploads/`` as it arrives, owner-only, and refused past the upload limit; a
partial file is removed. The client's file name is used for its extension alone (names of
downloads can carry PHI).
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from aggregator import audit
from aggregator.api.auth import Caller, audited, guard
from aggregator.api.problems import documented
from aggregator.cases import UPLOADS, add_source, list_sources, remove_source
from aggregator.errors import RequestTooLarge, UsageError
from aggregator.jobs import lock as case_lock
from aggregator.jobs.lock import CaseBusy

router = APIRouter(tags=["sources"], responses=documented(400, 403, 404, 409, 413, 422))
_EXT_RE = re.compile(r'filename="?[^";]*?(\.[A-Za-z0-9]{1,8})"?(?:;|$)')
ZIP_MAGIC = b"PK\x03\x04"


class SourceIn(BaseModel):
    endpoint: str = Field(max_length=100)
    patient_id: str | None = Field(default=None, max_length=200)
    patient_identifier: str | None = Field(default=None, max_length=400, description="SYSTEM|VALUE")
    issuer: str | None = Field(default=None, max_length=200)


@router.get("/cases/{case}/sources", summary="A case's sources (as `source list --json`)")
def sources(request: Request, case: str, principal: Caller) -> list[dict[str, Any]]:
    core = guard(request, principal, case, "sources", audit.READ, "source-list")
    rows = list_sources(core, case)
    audited(request, principal, audit.READ, "source-list", case_id=case)
    return rows


@router.post("/cases/{case}/sources", status_code=201, summary="Add an endpoint source")
def add(request: Request, case: str, body: SourceIn, principal: Caller) -> dict[str, Any]:
    core = guard(request, principal, case, "sources", audit.UPDATE, "source")
    data = add_source(core, case, endpoint=body.endpoint, patient_id=body.patient_id,
                      patient_identifier=body.patient_identifier, issuer=body.issuer)
    audited(request, principal, audit.UPDATE, "source", case_id=case, entity={"source": str(data["id"])})
    return data


def _extension(request: Request, head: bytes) -> str:
    if head.startswith(ZIP_MAGIC) or request.headers.get("content-type", "").startswith("application/zip"):
        return ".zip"
    m = _EXT_RE.search(request.headers.get("content-disposition", ""))
    return m.group(1).lower() if m else ".bin"


@router.post("/cases/{case}/sources/media", status_code=201, summary="Upload media (a zip or one file) as a source",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/zip": {"schema": {"type": "string", "format": "binary"}},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload(request: Request, case: str, principal: Caller) -> JSONResponse:
    core = await run_in_threadpool(guard, request, principal, case, "sources", audit.UPDATE, "source")
    limit = request.app.state.config.max_upload
    folder = core.case_dir(case) / UPLOADS
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    part = folder / f".{secrets.token_hex(8)}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    size, head = 0, b""
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge("the upload is over the size limit")
                if len(head) < 4:
                    head += chunk[:4]
                out.write(chunk)
        if size == 0:
            raise UsageError("the upload is empty")
        final = folder / f"upload-{secrets.token_hex(6)}{_extension(request, head)}"
        os.replace(part, final)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    try:
        data = await run_in_threadpool(add_source, core, case, media=str(final))
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    await run_in_threadpool(audited, request, principal, audit.UPDATE, "source", case_id=case,
                            entity={"source": str(data["id"]), "bytes": str(size)})
    return JSONResponse({**data, "bytes": size}, status_code=201,
                        headers={"Location": f"/cases/{case}/sources"})


@router.delete("/cases/{case}/sources/{source_id}", summary="Remove a source, its ledger and its upload")
def remove(request: Request, case: str, source_id: int, principal: Caller) -> dict[str, Any]:
    core = guard(request, principal, case, "sources", audit.DELETE, "source")
    lock = case_lock.try_lock(core, case)
    if lock is None:
        raise CaseBusy(f"case {case!r} is being pulled; cancel or wait for the pull first")
    try:
        data = remove_source(core, case, source_id)
    finally:
        lock.release()
    audited(request, principal, audit.DELETE, "source", case_id=case, entity={"source": str(source_id)})
    return data
