"""Tables: endpoints, cases, sources, pulls, ledger items, cursors; users, tokens, assignments, audit.

The schema is created and evolved only by Alembic migrations (``migrations/versions``); these
classes describe it for the ORM. Types are chosen to behave the same on SQLite and PostgreSQL
(JSON, timezone-aware timestamps stored as UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Endpoint(Base):
    """A place records come from: a FHIR server, a PACS. Holds no secrets, only where to find them."""

    __tablename__ = "endpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Case(Base):
    """One patient's second-opinion request."""

    __tablename__ = "cases"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    checklist: Mapped[str] = mapped_column(String(200))
    patient_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    birth_date: Mapped[str | None] = mapped_column(String(10), nullable=True)
    case_date: Mapped[str | None] = mapped_column(String(10), nullable=True)
    question: Mapped[str | None] = mapped_column(Text, nullable=True)
    """What the consultant is asked, in the navigator's words; first thing on the summary page."""
    status: Mapped[str] = mapped_column(String(20), default="open")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sources: Mapped[list[Source]] = relationship(back_populates="case", order_by="Source.id")


class Source(Base):
    """Where one case's records come from: an endpoint plus the patient's id there, or a media path."""

    __tablename__ = "sources"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[int | None] = mapped_column(ForeignKey("endpoints.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(40))
    patient_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    label: Mapped[str] = mapped_column(String(300), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    case: Mapped[Case] = relationship(back_populates="sources")
    endpoint: Mapped[Endpoint | None] = relationship()


class Pull(Base):
    """One run of a connector for one source. ``deadline`` bounds how long it may stay running."""

    __tablename__ = "pulls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(20), default="running")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    method: Mapped[str] = mapped_column(String(40), default="")
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """The process that ran it (``KIND:HOST:PID``)."""


class LedgerItem(Base):
    """Every item a pull attempted: fetched (done), failed or skipped, and why."""

    __tablename__ = "ledger_items"
    __table_args__ = (UniqueConstraint("source_id", "kind", "key", name="uq_ledger_source_kind_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"), index=True)
    pull_id: Mapped[int | None] = mapped_column(ForeignKey("pulls.id", ondelete="SET NULL"), nullable=True)
    kind: Mapped[str] = mapped_column(String(20))
    key: Mapped[str] = mapped_column(String(1000))
    state: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str | None] = mapped_column(String(40), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    content_type: Mapped[str | None] = mapped_column(String(200), nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Cursor(Base):
    """Incremental state of one source and stream (e.g. a resource type), committed with its data."""

    __tablename__ = "cursors"
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True)
    stream: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class User(Base):
    """A person who uses the service: admin, navigator or consultant."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """An API token: only a SHA-256 of its secret is kept; the secret is shown once."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class CaseAssignment(Base):
    """A consultant may see an assigned case (its gap report, summary and package) and no other."""

    __tablename__ = "case_assignments"
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEventRow(Base):
    """One entry of the append-only, hash-chained audit log (see :mod:`aggregator.audit`)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recorded: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(1))
    what: Mapped[str] = mapped_column(String(100))
    case_id: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    outcome: Mapped[str] = mapped_column(String(2))
    body: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class RecordsRequest(Base):
    """A right-of-access letter to one institution for one case, and where it stands."""

    __tablename__ = "records_requests"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    institution: Mapped[str] = mapped_column(String(300))
    state: Mapped[str] = mapped_column(String(20), default="draft")
    """draft, sent, acknowledged, partially-received, received (every line filled), closed (by the
    navigator). Overdue is not a state: it follows from the due date and today."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_on: Mapped[str | None] = mapped_column(String(10), nullable=True)
    channel: Mapped[str | None] = mapped_column(String(40), nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    jurisdiction: Mapped[str | None] = mapped_column(String(40), nullable=True)
    """The rule the letter was drafted under (see :mod:`aggregator.records_requests.rules`); None
    for requests drafted before rules were kept, which follow the rule in force now."""
    due_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    extension_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reminder_days: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """Follow-up points, days after sending, comma-separated."""
    acknowledged_on: Mapped[str | None] = mapped_column(String(10), nullable=True)
    extended_on: Mapped[str | None] = mapped_column(String(10), nullable=True)
    """The day the institution said it takes its extension (the due date moves by extension_days)."""
    followed_up_on: Mapped[str | None] = mapped_column(String(10), nullable=True)
    items: Mapped[list[RecordsRequestItem]] = relationship(order_by="RecordsRequestItem.id",
                                                          cascade="all, delete-orphan")


class RecordsRequestItem(Base):
    """One line of a request: the gap it asks for, and whether a later check found it filled."""

    __tablename__ = "records_request_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("records_requests.id", ondelete="CASCADE"), index=True)
    gap_keys: Mapped[str] = mapped_column(Text)
    """The gap keys this line asks for, one per line (see :func:`aggregator.records_requests.draft.gap_key`)."""
    item_id: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(String(40))
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="requested")
    """requested, received (a record now fills the gap), or resolved (the gap went away without one)."""
    received_at: Mapped[datetime | None] = mapped_column(nullable=True)
    filled_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The references of what filled the gap, one per line."""
    received_how: Mapped[str | None] = mapped_column(String(20), nullable=True)
    """check (a pull or upload filled it, seen by the checklist) or navigator (marked by hand)."""


class JobRow(Base):
    """A pull or package build: queued, running (with a lease and heartbeats), then final.

    The row, not a process's memory, is what the API and ``aggregator job`` show, so a job
    outlives the process that queued it and the one that ran it (see :mod:`aggregator.jobs.records`).
    """

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(20), index=True)
    """queued, running, then done, partial, failed or cancelled."""
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actor: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Who asked (for the audit entries the task writes); never shown in the job's JSON."""
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Per source label: items done, expected, and the connector's last note."""
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    run_after: Mapped[datetime | None] = mapped_column(nullable=True)
    """A retry waits until then (backoff)."""
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """Random per claim: heartbeats and the final write count only with the current lease."""
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    queue_job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """Procrastinate's job id when the job runs on workers (PostgreSQL)."""


class SyncSchedule(Base):
    """When a case is synced on its own: a cron expression read in a time zone, and an optional webhook.

    ``next_due_at`` (UTC) is the next time the cron names; a sync is due once the clock passes
    it. ``runs`` counts claims and changes: a runner claims a due schedule by moving ``next_due_at`` on
    with ``WHERE runs = <the count it read>``, so two runners that saw the same due schedule
    cannot both run it. The webhook's secret is never stored: only the name of the
    environment variable or the path of the file that holds it.
    """

    __tablename__ = "sync_schedules"
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True)
    cron: Mapped[str] = mapped_column(String(120))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    next_due_at: Mapped[datetime] = mapped_column()
    last_slot_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """The cron time the last claimed run stood for (missed times in between run once, as this one)."""
    runs: Mapped[int] = mapped_column(Integer, default=0)
    webhook_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    webhook_secret_env: Mapped[str | None] = mapped_column(String(200), nullable=True)
    webhook_secret_file: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SyncRun(Base):
    """One sync of one case and what it changed (new items by type, gaps filled and new, failed sources)."""

    __tablename__ = "sync_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    trigger: Mapped[str] = mapped_column(String(20))
    """schedule (``sync --due`` or a worker) or manual (``sync``)."""
    scheduled_for: Mapped[datetime | None] = mapped_column(nullable=True)
    state: Mapped[str] = mapped_column(String(20))
    """done, partial (a source failed) or failed (the check could not run); written once, at the end,
    so that no sync is ever left "running" by a process that died."""
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    changes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    ledger_mark: Mapped[int] = mapped_column(Integer, default=0)
    """The case's highest ledger row id of fetched items when this sync ended: the next sync's
    "new" items are the rows above it (rows are upserted, so a re-fetched item keeps its id)."""
    webhooks: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Per target (case, global): delivered or not, HTTP status, attempts; never the URL's secret parts."""
