"""legal_holds: requested_by; the database stamps who placed a hold and when, and keeps it

- `created_at` and `created_by` come from the server (the transaction's time, the role that
  inserts); what the client says (`hold add --by`) is kept as `requested_by`;
- a hold is inserted active; a release happens once, stamped with the server's time (so
  never before the hold), and changes nothing but `released_at` and `released_by`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: What a hold is placed with: never changed.
PLACED_WITH = ("hold_id", "member_id", "reason", "created_at", "created_by", "requested_by")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _refuse(message: str, constraint: str) -> str:
    return (
        f"RAISE EXCEPTION '{message}' USING ERRCODE = 'integrity_constraint_violation', "
        f"CONSTRAINT = '{constraint}'"
    )


def upgrade(schema: str) -> None:
    s = _quoted(schema)
    op.add_column("legal_holds", sa.Column("requested_by", sa.Text), schema=schema)
    op.execute(f"UPDATE {s}.legal_holds SET requested_by = created_by")  # as they were
    changed = " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in PLACED_WITH)
    op.execute(
        f"""
CREATE FUNCTION {s}.legal_holds_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    IF NEW.released_at IS NOT NULL OR NEW.released_by IS NOT NULL THEN
      {_refuse("a hold is placed active", "legal_holds_placed_active")};
    END IF;
    NEW.requested_by := coalesce(NEW.requested_by, NEW.created_by);
    NEW.created_by := current_user;
    NEW.created_at := now();
    RETURN NEW;
  END IF;
  IF OLD.released_at IS NOT NULL THEN
    {_refuse("a hold is released once, and then never changes", "legal_holds_released_once")};
  END IF;
  IF NEW.released_at IS NULL OR {changed} THEN
    {_refuse("a hold changes only by its release", "legal_holds_placed_immutable")};
  END IF;
  NEW.released_at := now();
  RETURN NEW;
END $$;

CREATE TRIGGER legal_holds_guard BEFORE INSERT OR UPDATE ON {s}.legal_holds
  FOR EACH ROW EXECUTE FUNCTION {s}.legal_holds_guard();
"""
    )


def downgrade(schema: str) -> None:
    s = _quoted(schema)
    op.execute(f"DROP TRIGGER legal_holds_guard ON {s}.legal_holds")
    op.execute(f"DROP FUNCTION {s}.legal_holds_guard()")
    op.drop_column("legal_holds", "requested_by", schema=schema)
