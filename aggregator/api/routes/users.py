"""Users and their API tokens (admin only); every change is audited as a change of access."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from aggregator import accounts, audit
from aggregator.api.auth import Caller, audited, require
from aggregator.api.problems import documented

router = APIRouter(tags=["users"], responses=documented(400, 403, 404, 409, 422))


class UserIn(BaseModel):
    name: str = Field(max_length=100)
    role: Literal["admin", "navigator", "consultant"]
    password: str | None = Field(default=None, max_length=1000, description="For browser sign-in; optional")


class TokenIn(BaseModel):
    expires: str = Field(default="90d", max_length=20, description="90m, 12h, 30d, 2w or 'never'")


@router.get("/users", summary="List users")
def users(request: Request, principal: Caller) -> list[dict[str, Any]]:
    core = require(request, principal, "users", audit.READ, "user-list")
    return accounts.list_users(core.db)


@router.post("/users", status_code=201, summary="Add a user")
def add(request: Request, body: UserIn, principal: Caller) -> JSONResponse:
    core = require(request, principal, "users", audit.CREATE, "user")
    data = accounts.add_user(core.db, body.name, body.role, body.password)
    audited(request, principal, audit.CREATE, "user", entity={"user": data["name"]}, access_change=True)
    return JSONResponse(data, status_code=201)


@router.post("/users/{name}/tokens", status_code=201, summary="Create a token for a user (shown once)")
def create_token(request: Request, name: str, principal: Caller, body: TokenIn | None = None) -> dict[str, Any]:
    core = require(request, principal, "users", audit.CREATE, "token")
    data = accounts.create_token(core.db, name, accounts.parse_duration((body or TokenIn()).expires))
    audited(request, principal, audit.CREATE, "token", entity={"user": data["user"], "token": data["id"]},
            access_change=True)
    return data


@router.post("/tokens/{token_id}/revoke", summary="Revoke a token at once")
def revoke(request: Request, token_id: str, principal: Caller) -> dict[str, Any]:
    core = require(request, principal, "users", audit.UPDATE, "token")
    data = accounts.revoke_token(core.db, token_id)
    audited(request, principal, audit.UPDATE, "token", entity={"token": token_id}, access_change=True)
    return data
