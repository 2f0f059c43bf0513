"""The ASGI application: routes, problems, hardening, and the job runner, wired together once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from aggregator import __version__
from aggregator.api import problems
from aggregator.api.auth import RateLimiter
from aggregator.api.jobs import JobRunner, default_runner
from aggregator.api.middleware import AccessLog, BodyLimit, SecurityHeaders
from aggregator.api.sessions import SessionStore
from aggregator.app import App

MiB = 1024 * 1024


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class ApiConfig:
    """Limits and options; each can be set from the environment (``AGGREGATOR_API_*``)."""

    max_body: int = 1 * MiB
    max_upload: int = 4096 * MiB
    rate_per_second: float = 50.0
    burst: int = 100
    cors_origins: list[str] = field(default_factory=list)
    job_workers: int = 2
    job_engine: str | None = None
    """``inprocess`` or ``queue``; None: ``AGGREGATOR_JOB_ENGINE``, else by database (see ``make_dispatcher``)."""

    @classmethod
    def from_env(cls) -> ApiConfig:
        origins = [o.strip() for o in os.environ.get("AGGREGATOR_API_CORS_ORIGINS", "").split(",") if o.strip()]
        return cls(max_body=_env_int("AGGREGATOR_API_MAX_BODY", 1 * MiB),
                   max_upload=_env_int("AGGREGATOR_API_MAX_UPLOAD", 4096 * MiB),
                   rate_per_second=float(_env_int("AGGREGATOR_API_RATE", 50)),
                   burst=_env_int("AGGREGATOR_API_BURST", 100),
                   cors_origins=origins,
                   job_workers=max(1, _env_int("AGGREGATOR_API_JOB_WORKERS", 2)))


def create_app(core: App, config: ApiConfig | None = None, runner: JobRunner | None = None) -> FastAPI:
    """The API for one open home. ``runner`` defaults to in-process threads (SQLite) or the queue (PostgreSQL)."""
    from aggregator.api.routes import (
        cases,
        endpoints,
        jobs,
        meta,
        packages,
        reports,
        requests,
        schedules,
        session,
        sources,
        users,
    )

    config = config or ApiConfig.from_env()
    job_runner = runner or default_runner(core, config.job_workers, config.job_engine)

    @contextlib.asynccontextmanager
    async def lifespan(_api: FastAPI) -> AsyncIterator[None]:
        yield
        job_runner.shutdown(wait=False)

    api = FastAPI(
        lifespan=lifespan,
        title="second-opinion-aggregator",
        version=__version__,
        description="Gather a patient's records, check them against a second-opinion checklist, package them. "
                    "Authenticate with `Authorization: Bearer TOKEN` (`aggregator token create USER`).",
        responses=problems.documented(400, 401, 413, 422, 429, 500),
    )
    api.state.core = core
    api.state.config = config
    api.state.limiter = RateLimiter(config.rate_per_second, config.burst)
    api.state.runner = job_runner
    api.state.sessions = SessionStore()
    problems.install(api)
    for module in (meta, session, users, endpoints, cases, sources, jobs, reports, packages, schedules, requests):
        api.include_router(module.router)
    if config.cors_origins:  # none unless configured
        from fastapi.middleware.cors import CORSMiddleware

        api.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)
    api.add_middleware(BodyLimit, limit=config.max_body, upload_limit=config.max_upload)
    api.add_middleware(SecurityHeaders)
    api.add_middleware(AccessLog)

    return api


def core_of(api: Any) -> App:
    return api.state.core  # type: ignore[no-any-return]
