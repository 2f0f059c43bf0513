"""Records requests: the rule each one is held to, acknowledgment, extension, follow-ups, and what filled each line.

Revision ID: 0006
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("records_requests") as b:
        b.add_column(sa.Column("jurisdiction", sa.String(40)))
        b.add_column(sa.Column("due_days", sa.Integer))
        b.add_column(sa.Column("extension_days", sa.Integer))
        b.add_column(sa.Column("reminder_days", sa.String(200)))
        b.add_column(sa.Column("acknowledged_on", sa.String(10)))
        b.add_column(sa.Column("extended_on", sa.String(10)))
        b.add_column(sa.Column("followed_up_on", sa.String(10)))
    with op.batch_alter_table("records_request_items") as b:
        b.add_column(sa.Column("filled_by", sa.Text))
        b.add_column(sa.Column("received_how", sa.String(20)))


def downgrade() -> None:
    with op.batch_alter_table("records_request_items") as b:
        b.drop_column("received_how")
        b.drop_column("filled_by")
    with op.batch_alter_table("records_requests") as b:
        for name in ("followed_up_on", "extended_on", "acknowledged_on", "reminder_days", "extension_days",
                     "due_days", "jurisdiction"):
            b.drop_column(name)
