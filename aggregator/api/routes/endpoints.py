"""Endpoints (FHIR servers, PACS): admin creates; admin and navigators list and check.

The body of a create is validated against the connector kind's own JSON Schema, derived from
its ``config_type`` by :mod:`aggregator.connector_options`, so an installed third-party kind is
configurable here without touching the core.
"""

from __future__ import annotations

from typing import Any

import jsonschema
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from aggregator import audit
from aggregator.api.auth import Caller, audited, require
from aggregator.api.problems import documented
from aggregator.cases import add_endpoint, check_endpoint, list_endpoints
from aggregator.connector_options import NOT_ENDPOINTS, config_from_options, endpoint_kinds, json_schema
from aggregator.errors import NotFound, UsageError

router = APIRouter(tags=["endpoints"], responses=documented(400, 403, 404, 409, 422))


class EndpointIn(BaseModel):
    name: str = Field(max_length=100, description="Unique name, e.g. 'hospital-a'")
    kind: str = Field(max_length=40, description="Connector kind: see GET /endpoint-kinds")
    config: dict[str, Any] = Field(default_factory=dict, description="The kind's options (its JSON Schema)")


@router.get("/endpoint-kinds", summary="Installed connector kinds and each one's config JSON Schema")
def kinds(request: Request, principal: Caller) -> dict[str, Any]:
    require(request, principal, "endpoints:read", audit.READ, "endpoint-kinds")
    return {kind: json_schema(kind, specs) for kind, specs in sorted(endpoint_kinds().items())}


@router.get("/endpoints", summary="List endpoints (same JSON as `endpoint list --json`)")
def endpoints(request: Request, principal: Caller) -> list[dict[str, Any]]:
    core = require(request, principal, "endpoints:read", audit.READ, "endpoint-list")
    return list_endpoints(core)


@router.post("/endpoints", status_code=201, summary="Define an endpoint (admin)")
def create(request: Request, body: EndpointIn, principal: Caller) -> JSONResponse:
    core = require(request, principal, "endpoints:write", audit.CREATE, "endpoint")
    all_kinds = endpoint_kinds()
    if body.kind in NOT_ENDPOINTS:
        raise UsageError(f"{body.kind} sources are added to a case, not as endpoints")
    if body.kind not in all_kinds:
        raise NotFound(f"no connector of kind {body.kind!r} is installed")
    specs = all_kinds[body.kind]
    try:
        jsonschema.validate(body.config, json_schema(body.kind, specs))
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "config"
        raise UsageError(f"invalid endpoint config at {where}: {exc.validator} {exc.validator_value!r}") from None
    config = config_from_options(body.kind, specs, body.config)
    data = add_endpoint(core, body.name, body.kind, config)
    audited(request, principal, audit.CREATE, "endpoint", entity={"endpoint": body.name})
    return JSONResponse(data, status_code=201, headers={"Location": f"/endpoints/{body.name}"})


@router.post("/endpoints/{name}/check", summary="Test connectivity and authentication")
def check(request: Request, name: str, principal: Caller) -> dict[str, Any]:
    core = require(request, principal, "endpoints:read", audit.EXECUTE, "endpoint-check")
    return check_endpoint(core, name)
