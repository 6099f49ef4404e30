"""runs: remaining_due_rows, remaining_reason, copy_risks; chunks: kind (clean or reclean)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    # The count of due rows a run found left at its end, at its own cutoffs (NULL: not
    # counted, e.g. a run stopped by a signal), and why they are left.
    op.add_column("runs", sa.Column("remaining_due_rows", sa.BigInteger), schema=schema)
    op.add_column("runs", sa.Column("remaining_reason", sa.Text), schema=schema)
    # Triggers, rules, publications, replica identity that may copy personal data when the
    # run cleans (README "What the job refuses and what it reports"), as the run saw them.
    op.add_column("runs", sa.Column("copy_risks", JSONB), schema=schema)
    op.add_column(
        "chunks",
        sa.Column("kind", sa.Text, nullable=False, server_default="clean"),
        schema=schema,
    )
    op.create_check_constraint(
        "chunks_kind_known", "chunks", "kind IN ('clean', 'reclean')", schema=schema
    )


def downgrade(schema: str) -> None:
    op.drop_constraint("chunks_kind_known", "chunks", schema=schema)
    op.drop_column("chunks", "kind", schema=schema)
    op.drop_column("runs", "copy_risks", schema=schema)
    op.drop_column("runs", "remaining_reason", schema=schema)
    op.drop_column("runs", "remaining_due_rows", schema=schema)
