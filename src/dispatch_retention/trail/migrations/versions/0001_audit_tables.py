"""runs, chunks and legal_holds

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade(schema: str) -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", UUID(as_uuid=False), primary_key=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("trigger", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("tool_version", sa.Text, nullable=False),
        sa.Column("db_user", sa.Text, nullable=False),
        sa.Column("target_table", sa.Text, nullable=False),
        sa.Column("shard", sa.Text),
        sa.Column("options", JSONB, nullable=False),
        sa.Column("config_path", sa.Text, nullable=False),
        sa.Column("config_sha256", sa.Text, nullable=False),
        sa.Column("config_text", sa.Text, nullable=False),
        sa.Column("planned_at", TS),
        sa.Column("policies", JSONB),
        sa.Column("due_rows", sa.BigInteger),
        sa.Column("held_rows", sa.BigInteger),
        sa.Column("waiting_grace_rows", sa.BigInteger),
        sa.Column("stopped_by", sa.Text),
        sa.Column("error", sa.Text),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'incomplete', 'interrupted', 'failed', "
            "'refused', 'abandoned', 'cancelled')",
            name="runs_status_known",
        ),
        schema=schema,
    )
    op.create_index("runs_started_at_idx", "runs", ["started_at"], schema=schema)
    op.create_table(
        "chunks",
        sa.Column(
            "run_id",
            UUID(as_uuid=False),
            sa.ForeignKey(f"{schema}.runs.run_id"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("first_id", sa.BigInteger, nullable=False),
        sa.Column("last_id", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("cleaned_at", TS, nullable=False),
        sa.Column("by_policy", JSONB, nullable=False),
        sa.Column("skipped_locked", sa.Boolean, nullable=False),
        schema=schema,
    )
    op.create_table(
        "legal_holds",
        sa.Column("hold_id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("member_id", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("released_at", TS),
        sa.Column("released_by", sa.Text),
        sa.CheckConstraint("length(btrim(reason)) > 0", name="legal_holds_reason_given"),
        schema=schema,
    )
    op.create_index(
        "legal_holds_one_active_per_member",
        "legal_holds",
        ["member_id"],
        unique=True,
        postgresql_where=sa.text("released_at IS NULL"),
        schema=schema,
    )


def downgrade(schema: str) -> None:
    op.drop_table("legal_holds", schema=schema)
    op.drop_table("chunks", schema=schema)
    op.drop_table("runs", schema=schema)
