"""Per-case sync schedules (cron + time zone + optional webhook) and the history of syncs.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sync_schedules",
        sa.Column("case_id", sa.String(100), sa.ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("cron", sa.String(120), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("next_due_at", TS, nullable=False),
        sa.Column("last_slot_at", TS),
        sa.Column("runs", sa.Integer, nullable=False),
        sa.Column("webhook_url", sa.String(2000)),
        sa.Column("webhook_secret_env", sa.String(200)),
        sa.Column("webhook_secret_file", sa.String(1000)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.String(100), sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("trigger", sa.String(20), nullable=False),
        sa.Column("scheduled_for", TS),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("changes", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("ledger_mark", sa.Integer, nullable=False),
        sa.Column("webhooks", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sync_runs")
    op.drop_table("sync_schedules")
