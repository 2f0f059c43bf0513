"""Liveness and who-am-I."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from aggregator.api.auth import Caller

router = APIRouter(tags=["meta"])


@router.get("/health", summary="Liveness: a constant answer, no authentication")
def health() -> dict[str, Any]:
    return {"ok": True}


@router.get("/me", summary="The caller's user name and role")
def me(principal: Caller) -> dict[str, Any]:
    return {"user": principal.name, "role": principal.role, "token": principal.token_id}
