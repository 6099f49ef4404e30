"""bounds: every text and document of the trail has a size the database holds it to

One 60 MB hold reason, written once by the holds role and never deletable, took `audit
verify` to 310 MB and `hold list` to 680 MB. From here:
- each text and JSON column of the trail tables has a CHECK constraint `<table>_<column>_bounded`
  on its size in bytes (`BOUNDS`; a document: its JSON text), for every role that writes;
- the constraints are NOT VALID: the upgrade reads no row of a big trail, and rows written
  before stay as they are, readable (the readers stream them and cut what they print);
- a row that may still change (a running or abandoned run, an active hold) and already holds
  a longer text is named in that column's constraint as an exception (and its events in
  `events_body_bounded`), so that it can still be closed or released: its texts never change;
- runs: `copy_risks_at_end`, the copy risks read again at a run's end (a trigger that
  appeared during the run), written only by the run's own close, once, by its own role;
  like every column it is in the `run_finished` event's fact.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: The most bytes each column holds, frozen here (`schema.TEXT_BOUNDS` is the job's copy,
#: held equal by tests/trail/test_migrations.py).
BOUNDS: Mapping[str, Mapping[str, int]] = {
    "runs": {
        "status": 32, "trigger": 32, "host": 256, "tool_version": 256, "db_user": 64,
        "target_table": 512, "shard": 32, "options": 65536, "config_path": 4096,
        "config_sha256": 64, "config_text": 1048576, "policies": 65536, "stopped_by": 256,
        "error": 4096, "remaining_reason": 4096, "copy_risks": 65536,
        "copy_risks_at_end": 65536,
    },
    "chunks": {"by_policy": 65536, "kind": 32},
    "legal_holds": {"reason": 4096, "created_by": 64, "requested_by": 256, "released_by": 512},
    "events": {"kind": 32, "subject": 256, "prev_hash": 64, "hash": 64, "body": 16777216},
    "events_head": {"hash": 64},
}  # fmt: skip
#: The JSON columns: bounded on their text.
DOCUMENTS = ("options", "policies", "copy_risks", "copy_risks_at_end", "by_policy")
#: The rows of a table that may still change, by their key, and how events name them.
OPEN_ROWS = {
    "runs": ("run_id", "status IN ('running', 'abandoned')", "'run:' || run_id"),
    "legal_holds": ("hold_id", "released_at IS NULL", "'hold:' || hold_id"),
}
FIXED = "SET search_path = pg_catalog, pg_temp"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _size(column: str) -> str:
    return f"octet_length({column}::text)" if column in DOCUMENTS else f"octet_length({column})"


def _refuse(message: str, constraint: str) -> str:
    return (
        f"RAISE EXCEPTION '{message}' USING ERRCODE = 'integrity_constraint_violation', "
        f"CONSTRAINT = '{constraint}'"
    )


def _long_open_rows(s: str, table: str) -> tuple[dict[str, list[str]], list[str]]:
    """Of the rows that may still change, those over a bound: their keys per column, and
    the subjects of their events."""
    key, still_open, subject = OPEN_ROWS[table]
    columns = BOUNDS[table]
    over = " OR ".join(f"{_size(c)} > {n}" for c, n in columns.items())
    rows = op.get_bind().execute(
        sa.text(
            f"SELECT {key}::text, {subject}, "
            + ", ".join(f"{_size(c)} > {n}" for c, n in columns.items())
            + f" FROM {s}.{_quoted(table)} WHERE {still_open} AND ({over}) ORDER BY 1"
        )
    )
    keys: dict[str, list[str]] = {c: [] for c in columns}
    subjects = []
    for found, named, *longer in rows:
        subjects.append(named)
        for column, is_long in zip(columns, longer, strict=True):
            if is_long:
                keys[column].append(found)
    return keys, subjects


def _bound(s: str, table: str, column: str, limit: int, key: str, exempt: Sequence[str]) -> None:
    check = f"{_size(column)} <= {limit}"
    if exempt:
        check += f" OR {key} IN ({', '.join(_literal(k) for k in exempt)})"
    op.execute(
        f"ALTER TABLE {s}.{_quoted(table)} ADD CONSTRAINT {table}_{column}_bounded "
        f"CHECK ({check}) NOT VALID"
    )


def upgrade(schema: str) -> None:
    s = _quoted(schema)
    op.add_column("runs", sa.Column("copy_risks_at_end", JSONB), schema=schema)
    long_subjects: list[str] = []
    for table, columns in BOUNDS.items():
        keys: Mapping[str, Sequence[str]] = {}
        if table in OPEN_ROWS:
            keys, subjects = _long_open_rows(s, table)
            long_subjects += subjects
        for column, limit in columns.items():
            if (table, column) == ("events", "body"):
                _bound(s, table, column, limit, "subject", long_subjects)
            else:
                key = OPEN_ROWS[table][0] if table in OPEN_ROWS else ""
                _bound(s, table, column, limit, key, keys.get(column, ()))
    op.execute(
        f"""
CREATE FUNCTION {s}.runs_risks_at_end() RETURNS trigger LANGUAGE plpgsql {FIXED} AS $$
BEGIN
  IF (TG_OP = 'INSERT' AND NEW.copy_risks_at_end IS NOT NULL)
     OR (TG_OP = 'UPDATE' AND NEW.copy_risks_at_end IS DISTINCT FROM OLD.copy_risks_at_end
         AND (OLD.copy_risks_at_end IS NOT NULL OR OLD.db_user <> current_user
              OR NEW.status IS NOT DISTINCT FROM OLD.status
              OR NEW.status IN ('running', 'abandoned')))
     OR (NEW.copy_risks_at_end IS NOT NULL AND (
           jsonb_path_exists(NEW.copy_risks_at_end, '$.**{{3 to last}}')
           OR jsonb_path_exists(NEW.copy_risks_at_end,
                '$.** ? (@.type() == "number" && (@ > 1e15 || @ < -1e15))'))) THEN
    {
            _refuse(
                "the copy risks at the end of a run are a flat record its own close writes once",
                "runs_risks_at_end",
            )
        };
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER runs_risks_at_end BEFORE INSERT OR UPDATE ON {s}.runs
  FOR EACH ROW EXECUTE FUNCTION {s}.runs_risks_at_end();
"""
    )


def downgrade(schema: str) -> None:
    s = _quoted(schema)
    op.execute(f"DROP TRIGGER runs_risks_at_end ON {s}.runs")
    op.execute(f"DROP FUNCTION {s}.runs_risks_at_end()")
    for table, columns in BOUNDS.items():
        for column in columns:
            op.execute(f"ALTER TABLE {s}.{_quoted(table)} DROP CONSTRAINT {table}_{column}_bounded")
    op.drop_column("runs", "copy_risks_at_end", schema=schema)
