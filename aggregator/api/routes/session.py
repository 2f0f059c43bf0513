"""Sign in and out of a browser session (for the web pages; scripts use bearer tokens)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from aggregator import accounts, audit
from aggregator.api import sessions
from aggregator.api.auth import client_address
from aggregator.api.problems import documented
from aggregator.errors import AuthenticationRequired

router = APIRouter(tags=["session"], responses=documented(401, 422))


class SignIn(BaseModel):
    user: str = Field(max_length=100)
    password: str = Field(max_length=1000)


@router.post("/session", summary="Sign in with a password: sets an HttpOnly session cookie, returns the CSRF token")
def sign_in(request: Request, body: SignIn) -> JSONResponse:
    state = request.app.state
    address = client_address(request)
    state.limiter.take("addr:" + address)  # every attempt costs, so guessing is slow
    principal = accounts.check_password(state.core.db, body.user, body.password)
    who = audit.Actor(body.user if principal else "anonymous", address=address,
                      role=principal.role if principal else None)
    if principal is None:
        audit.record(state.core.db, who, audit.EXECUTE, "sign-in", outcome=audit.DENIED, detail="wrong credentials")
        raise AuthenticationRequired("wrong user name or password")
    sid, csrf = state.sessions.create(principal)
    audit.record(state.core.db, who, audit.EXECUTE, "sign-in")
    data: dict[str, Any] = {"user": principal.name, "role": principal.role, "csrf_token": csrf}
    resp = JSONResponse(data)
    resp.set_cookie(sessions.COOKIE, sid, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                    max_age=int(sessions.LIFETIME), path="/")
    return resp


@router.delete("/session", status_code=204, summary="Sign out (ends the browser session)")
def sign_out(request: Request) -> Response:
    sid = request.cookies.get(sessions.COOKIE)
    if sid:
        request.app.state.sessions.end(sid)
    resp = Response(status_code=204)
    resp.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="strict")
    return resp
