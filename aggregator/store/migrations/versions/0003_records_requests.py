"""Records requests (right-of-access letters) and their lines, tracked until the records arrive.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "records_requests",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("case_id", sa.String(100), sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("institution", sa.String(300), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("sent_on", sa.String(10)),
        sa.Column("channel", sa.String(40)),
        sa.Column("closed_at", TS),
    )
    op.create_table(
        "records_request_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(40), sa.ForeignKey("records_requests.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("gap_keys", sa.Text, nullable=False),
        sa.Column("item_id", sa.String(100), nullable=False),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("received_at", TS),
    )


def downgrade() -> None:
    op.drop_table("records_request_items")
    op.drop_table("records_requests")
