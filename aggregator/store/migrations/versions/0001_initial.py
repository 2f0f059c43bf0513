"""Initial schema: endpoints, cases, sources, pulls, ledger items, cursors.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "endpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "cases",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("checklist", sa.String(200), nullable=False),
        sa.Column("patient_name", sa.String(200)),
        sa.Column("birth_date", sa.String(10)),
        sa.Column("case_date", sa.String(10)),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "sources",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.String(100), sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("endpoint_id", sa.Integer, sa.ForeignKey("endpoints.id")),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("patient_id", sa.String(200)),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("label", sa.String(300), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_sources_case_id", "sources", ["case_id"])
    op.create_table(
        "pulls",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source_id", sa.Integer, sa.ForeignKey("sources.id", ondelete="CASCADE"), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("method", sa.String(40), nullable=False),
        sa.Column("counts", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_pulls_source_id", "pulls", ["source_id"])
    op.create_table(
        "ledger_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source_id", sa.Integer, sa.ForeignKey("sources.id", ondelete="CASCADE"), nullable=False),
        sa.Column("pull_id", sa.Integer, sa.ForeignKey("pulls.id", ondelete="SET NULL")),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("key", sa.String(1000), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("status", sa.String(40)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("size", sa.Integer),
        sa.Column("content_type", sa.String(200)),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("source_id", "kind", "key", name="uq_ledger_source_kind_key"),
    )
    op.create_index("ix_ledger_items_source_id", "ledger_items", ["source_id"])
    op.create_table(
        "cursors",
        sa.Column("source_id", sa.Integer, sa.ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("stream", sa.String(100), primary_key=True),
        sa.Column("value", sa.JSON, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )


def downgrade() -> None:
    for table in ("cursors", "ledger_items", "pulls", "sources", "cases", "endpoints"):
        op.drop_table(table)
