"""guards: the database keeps the audit trail append-only, whatever role writes to it

Triggers owned by the migrating role (the job's own roles cannot drop or disable them):
- runs: inserted only as `running`, stamped by the server (`started_at`, `db_user`); what a
  run started with never changes; its plan is written once; a finished run (any status but
  `running`, or `abandoned`, which the run itself may still close) never changes;
- chunks: inserted only into a `running` run, by the role that runs it; never changed;
- runs, chunks and legal_holds: never deleted or truncated.

Each refusal names its rule as the error's constraint (`AUDIT_NAMES`), so the job's own
messages show it; the text is for a person at psql.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: What a run started with (`RunRecord.start`): set once, by the INSERT.
STARTED_WITH = (
    "run_id", "started_at", "trigger", "host", "tool_version", "db_user", "target_table",
    "shard", "options", "config_path", "config_sha256", "config_text", "copy_risks",
)  # fmt: skip
#: The plan (`RunRecord.planned`): written once.
PLANNED = ("planned_at", "policies", "due_rows", "held_rows", "waiting_grace_rows")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _changed(columns: tuple[str, ...]) -> str:
    return " OR ".join(f"NEW.{c}::text IS DISTINCT FROM OLD.{c}::text" for c in columns)


def _refuse(message: str, constraint: str) -> str:
    return (
        f"RAISE EXCEPTION '{message}' USING ERRCODE = 'integrity_constraint_violation', "
        f"CONSTRAINT = '{constraint}'"
    )


def upgrade(schema: str) -> None:
    s = _quoted(schema)
    op.execute(
        f"""
CREATE FUNCTION {s}.audit_trail_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'the audit trail is append-only: % is never deleted or truncated',
    TG_TABLE_NAME USING ERRCODE = 'integrity_constraint_violation',
    CONSTRAINT = 'audit_trail_append_only';
END $$;

CREATE FUNCTION {s}.runs_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    IF NEW.status <> 'running' OR NEW.finished_at IS NOT NULL OR NEW.planned_at IS NOT NULL THEN
      {_refuse("a run is recorded as running when it starts", "runs_start_running")};
    END IF;
    NEW.started_at := now();
    NEW.db_user := current_user;
    RETURN NEW;
  END IF;
  IF OLD.status NOT IN ('running', 'abandoned') THEN
    {_refuse("a finished run never changes", "runs_finished_immutable")};
  END IF;
  IF {_changed(STARTED_WITH)} THEN
    {_refuse("what a run started with never changes", "runs_start_immutable")};
  END IF;
  IF OLD.planned_at IS NOT NULL AND ({_changed(PLANNED)}) THEN
    {_refuse("the plan of a run is written once", "runs_plan_immutable")};
  END IF;
  RETURN NEW;
END $$;

CREATE FUNCTION {s}.chunks_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  run record;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    {_refuse("a chunk record never changes", "chunks_immutable")};
  END IF;
  SELECT status, db_user INTO run FROM {s}.runs WHERE run_id = NEW.run_id;
  IF NOT FOUND OR run.status <> 'running' OR run.db_user <> current_user THEN
    {
            _refuse(
                "chunks are added only to a running run, by the role that runs it",
                "chunks_of_a_running_run",
            )
        };
  END IF;
  RETURN NEW;
END $$;

CREATE TRIGGER runs_guard BEFORE INSERT OR UPDATE ON {s}.runs
  FOR EACH ROW EXECUTE FUNCTION {s}.runs_guard();
CREATE TRIGGER chunks_guard BEFORE INSERT OR UPDATE ON {s}.chunks
  FOR EACH ROW EXECUTE FUNCTION {s}.chunks_guard();
"""
    )
    for table in ("runs", "chunks", "legal_holds"):
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE DELETE ON {s}.{table} "
            f"FOR EACH ROW EXECUTE FUNCTION {s}.audit_trail_append_only();"
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {s}.{table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {s}.audit_trail_append_only();"
        )


def downgrade(schema: str) -> None:
    s = _quoted(schema)
    for table in ("runs", "chunks", "legal_holds"):
        op.execute(f"DROP TRIGGER {table}_append_only ON {s}.{table}")
        op.execute(f"DROP TRIGGER {table}_no_truncate ON {s}.{table}")
    op.execute(f"DROP TRIGGER chunks_guard ON {s}.chunks")
    op.execute(f"DROP TRIGGER runs_guard ON {s}.runs")
    op.execute(f"DROP FUNCTION {s}.chunks_guard()")
    op.execute(f"DROP FUNCTION {s}.runs_guard()")
    op.execute(f"DROP FUNCTION {s}.audit_trail_append_only()")
