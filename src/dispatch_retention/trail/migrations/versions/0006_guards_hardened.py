"""guards hardened: what a red-team pass of issue 17 got past the guards of 0003 and 0004

- every guard runs with `search_path = pg_catalog, pg_temp`: a role's own temporary type
  named `text` no longer changes what a guard compares (it let the run role rewrite what a
  running run started with);
- runs: a run is changed by the role that runs it; another role may only mark a running run
  abandoned (status, finished_at, error); an abandoned run never runs again; `finished_at`
  is the server's time of the status change; counts are never negative; the JSON documents
  (`options`, `policies`, `copy_risks`) are flat, bounded records (depth, numbers, size),
  and `config_text` at most 4 MiB (a config file is at most 1 MiB), so that no row can make the
  trail unreadable;
- chunks: `first_id <= last_id`, `rows > 0`, `cleaned_at` is the transaction's time, a
  cleaning chunk's `by_policy` (whole, non-negative counts) adds up to its `rows`, a reclean
  chunk belongs to a run started with `--reclean` and holds at most the ids of its window
  and the run's chunk size; the run's row is read FOR SHARE, so a chunk waits for an
  abandoning that has not committed yet, and is then refused;
- runs: what a run started with and its plan are compared as their own types (not as text,
  which the session's time zone shapes); a plan is written whole, with a `planned_at` within
  the run;
- legal holds: `hold_id` is always the server's; a release names the releasing role as the
  server knows it (`released_by` ends `(db role ROLE)`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: What a run started with (`RunRecord.start`): set once, by the INSERT (as in 0003).
STARTED_WITH = (
    "run_id", "started_at", "trigger", "host", "tool_version", "db_user", "target_table",
    "shard", "options", "config_path", "config_sha256", "config_text", "copy_risks",
)  # fmt: skip
#: The plan (`RunRecord.planned`): written once.
PLANNED = ("planned_at", "policies", "due_rows", "held_rows", "waiting_grace_rows")
#: What a hold is placed with: never changed (as in 0004).
PLACED_WITH = ("hold_id", "member_id", "reason", "created_at", "created_by", "requested_by")
FIXED = "SET search_path = pg_catalog, pg_temp"
#: The job reads a config file of at most 1 MiB (`config.MAX_CONFIG_BYTES`): room to spare.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _changed(columns: tuple[str, ...]) -> str:
    """Compared as their own types (0003 compared their text, which the session's TimeZone
    and DateStyle shape: a custom zone printed two instants a day apart alike)."""
    return " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in columns)


def _refuse(message: str, constraint: str) -> str:
    return (
        f"RAISE EXCEPTION '{message}' USING ERRCODE = 'integrity_constraint_violation', "
        f"CONSTRAINT = '{constraint}'"
    )


def _record_ok(doc: str) -> str:
    """`doc` (a jsonb expression) is NULL or a small record of records: nothing below its
    second level, no number past 10^15 (which a reader would have to take as a big integer),
    at most 64 KiB of text."""
    return (
        f"({doc} IS NULL OR (octet_length({doc}::text) <= 65536"
        f" AND NOT jsonb_path_exists({doc}, '$.**{{3 to last}}')"
        f" AND NOT jsonb_path_exists({doc}, "
        """'$.** ? (@.type() == "number" && (@ > 1e15 || @ < -1e15))')))"""
    )


def upgrade(schema: str) -> None:
    s = _quoted(schema)
    # what another role's UPDATE leaves as it was: it only marks the run abandoned (status,
    # finished_at, error); what the run started with is checked for every role
    others = (*PLANNED, "stopped_by", "remaining_due_rows", "remaining_reason")
    op.execute(
        f"""
CREATE OR REPLACE FUNCTION {s}.runs_guard() RETURNS trigger LANGUAGE plpgsql {FIXED} AS $$
BEGIN
  IF NOT ({_record_ok("NEW.options")} AND {_record_ok("NEW.policies")}
          AND {_record_ok("NEW.copy_risks")})
     OR octet_length(NEW.config_text) > {MAX_CONFIG_BYTES} THEN
    {_refuse("a run record holds bounded, flat documents", "runs_documents_bounded")};
  END IF;
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
  IF NEW.status = 'running' AND OLD.status <> 'running' THEN
    {_refuse("an abandoned run never runs again", "runs_not_revived")};
  END IF;
  IF OLD.db_user <> current_user
     AND NOT (OLD.status = 'running' AND NEW.status = 'abandoned' AND NOT ({_changed(others)})) THEN
    {
            _refuse(
                "a run is changed by the role that runs it; another may only mark it abandoned",
                "runs_changed_by_their_role",
            )
        };
  END IF;
  IF {_changed(STARTED_WITH)} THEN
    {_refuse("what a run started with never changes", "runs_start_immutable")};
  END IF;
  IF OLD.planned_at IS NOT NULL AND ({_changed(PLANNED)}) THEN
    {_refuse("the plan of a run is written once", "runs_plan_immutable")};
  END IF;
  IF OLD.planned_at IS NULL AND ({_changed(PLANNED)})
     AND (NEW.planned_at IS NULL OR NEW.planned_at NOT BETWEEN OLD.started_at AND now()) THEN
    {
            _refuse(
                "a plan is written whole, once, with the time it was made during the run",
                "runs_plan_immutable",
            )
        };
  END IF;
  NEW.finished_at := CASE WHEN NEW.status IS DISTINCT FROM OLD.status THEN now()
                          ELSE OLD.finished_at END;
  RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION {s}.chunks_guard() RETURNS trigger LANGUAGE plpgsql {FIXED} AS $$
DECLARE
  run record;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    {_refuse("a chunk record never changes", "chunks_immutable")};
  END IF;
  -- FOR SHARE: an UPDATE marking the run abandoned that has not committed yet is waited
  -- for, so a chunk is never added to a run whose abandoning commits first
  SELECT status, db_user, options INTO run FROM {s}.runs WHERE run_id = NEW.run_id FOR SHARE;
  IF NOT FOUND OR run.status <> 'running' OR run.db_user <> current_user THEN
    {
            _refuse(
                "chunks are added only to a running run, by the role that runs it",
                "chunks_of_a_running_run",
            )
        };
  END IF;
  IF NEW.first_id > NEW.last_id OR NEW.rows <= 0 OR NEW.cleaned_at <> now()
     OR NOT {_record_ok("NEW.by_policy")}
     OR jsonb_typeof(NEW.by_policy) <> 'object'
     OR jsonb_path_exists(
          NEW.by_policy, '$.* ? (@.type() != "number" || @ < 0 || @ != @.floor())')
     OR (NEW.kind = 'clean' AND NEW.rows IS DISTINCT FROM (
           SELECT sum(value::numeric) FROM jsonb_each_text(NEW.by_policy)))
     OR (NEW.kind = 'reclean' AND (
           NEW.rows::numeric > NEW.last_id::numeric - NEW.first_id + 1
           OR (run.options ->> 'reclean') IS DISTINCT FROM 'true'
           OR NEW.rows > (run.options ->> 'chunk_size')::numeric))
  THEN
    {
            _refuse(
                "a chunk records the rows its own transaction cleaned in its window, now",
                "chunks_as_cleaned",
            )
        };
  END IF;
  RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION {s}.legal_holds_guard() RETURNS trigger LANGUAGE plpgsql {FIXED} AS $$
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
  IF NEW.released_at IS NULL OR {
            " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in PLACED_WITH)
        } THEN
    {_refuse("a hold changes only by its release", "legal_holds_placed_immutable")};
  END IF;
  NEW.released_at := now();
  NEW.released_by := regexp_replace(coalesce(NEW.released_by, ''), ' ?\\(db role [^)]*\\)$', '')
    || ' (db role ' || current_user || ')';
  RETURN NEW;
END $$;

ALTER FUNCTION {s}.audit_trail_append_only() {FIXED};
ALTER FUNCTION {s}.events_append_only() {FIXED};
ALTER TABLE {s}.legal_holds ALTER COLUMN hold_id SET GENERATED ALWAYS;
ALTER TABLE {s}.runs ADD CONSTRAINT runs_counts_not_negative CHECK (
  due_rows >= 0 AND held_rows >= 0 AND waiting_grace_rows >= 0 AND remaining_due_rows >= 0);
"""
    )


def downgrade(schema: str) -> None:
    """The constraint and the identity as they were; the guard functions keep their hardened
    bodies (stricter, never looser), and go with 0004's and 0003's downgrades."""
    s = _quoted(schema)
    op.execute(f"ALTER TABLE {s}.runs DROP CONSTRAINT runs_counts_not_negative")
    op.execute(f"ALTER TABLE {s}.legal_holds ALTER COLUMN hold_id SET GENERATED BY DEFAULT")
