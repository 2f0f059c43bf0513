"""Persistent jobs: pulls and packages that survive the process that queued or ran them.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("case_id", sa.String(100), sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("state", sa.String(20), nullable=False, index=True),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("actor", sa.JSON, nullable=False),
        sa.Column("result", sa.JSON, nullable=False),
        sa.Column("progress", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("heartbeat_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("run_after", TS),
        sa.Column("worker", sa.String(200)),
        sa.Column("lease", sa.String(32)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("queue_job_id", sa.BigInteger),
    )
    # which job and which process ran each pull: a job's per-source view, and the proof from the
    # ledger that no case was pulled by two workers at once
    with op.batch_alter_table("pulls") as batch:
        batch.add_column(sa.Column("job_id", sa.String(32), index=True))
        batch.add_column(sa.Column("worker", sa.String(200)))


def downgrade() -> None:
    with op.batch_alter_table("pulls") as batch:
        batch.drop_column("worker")
        batch.drop_column("job_id")
    op.drop_table("jobs")
