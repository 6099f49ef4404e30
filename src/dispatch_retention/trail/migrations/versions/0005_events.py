"""events: the trail as one append-only hash chain, written by the database

Every write to the trail tables adds an event, through triggers owned by the migrating role
(SECURITY DEFINER: the job's own roles cannot write an event, nor call the function that
appends one):
- runs: INSERT is `run_started`; an UPDATE that moves a run from running to abandoned is
  `run_abandoned`, one that changes its status otherwise `run_finished`, any other (the
  plan written into a running run) `run_planned`;
- chunks: INSERT is `chunk_committed`, inside the chunk's own transaction;
- legal_holds: INSERT is `hold_placed`, UPDATE (the release) `hold_released`.

An event's `body` is its canonical encoding, version 1: the text of the JSON object
`{"v": 1, "seq", "kind", "subject", "at", "by", "imported", "fact", "prev"}` as PostgreSQL
writes a jsonb value, timestamps in UTC; `fact` is the row as it stands after the write
(`to_jsonb`), `prev` the previous event's hash (64 zeros before the first). `hash` is the
hex SHA-256 of the body's UTF-8 bytes, computed by the database. `events_head` holds the
newest (seq, hash); taking its row lock serializes the chain for the rest of the
transaction that appends (a chunk appends last, just before its COMMIT, so shards wait on
each other for that moment only).

Existing rows are seeded into the chain by this upgrade, oldest first, `imported` true.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

GENESIS = "0" * 64
#: How each trail table names its rows in `events.subject`.
SUBJECTS = {
    "runs": "'run:' || {r}.run_id",
    "chunks": "'chunk:' || {r}.run_id || '/' || {r}.seq",
    "legal_holds": "'hold:' || {r}.hold_id",
}
#: Functions that run as their owner: a fixed search_path, and UTC for every timestamp
#: they write into an event.
DEFINER = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC'"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def upgrade(schema: str) -> None:
    s = _quoted(schema)
    op.execute(
        f"""
CREATE TABLE {s}.events (
  seq bigint PRIMARY KEY,
  kind text NOT NULL CHECK (kind IN ('run_started', 'run_planned', 'run_finished',
    'run_abandoned', 'chunk_committed', 'hold_placed', 'hold_released')),
  subject text NOT NULL,
  recorded_at timestamptz NOT NULL,
  body text NOT NULL,
  prev_hash text NOT NULL,
  hash text NOT NULL UNIQUE
);
CREATE INDEX events_subject_idx ON {s}.events (subject, seq);
CREATE TABLE {s}.events_head (
  only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
  seq bigint NOT NULL,
  hash text NOT NULL
);
INSERT INTO {s}.events_head (seq, hash) VALUES (0, '{GENESIS}');

CREATE FUNCTION {s}.append_event(kind text, subject text, fact jsonb, imported boolean)
RETURNS void LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
  head record;
  body text;
  digest text;
BEGIN
  SELECT seq, hash INTO STRICT head FROM {s}.events_head FOR UPDATE;
  body := jsonb_build_object(
    'v', 1, 'seq', head.seq + 1, 'kind', kind, 'subject', subject, 'at', now(),
    'by', session_user, 'imported', imported, 'fact', fact, 'prev', head.hash)::text;
  digest := encode(sha256(convert_to(body, 'UTF8')), 'hex');
  INSERT INTO {s}.events (seq, kind, subject, recorded_at, body, prev_hash, hash)
    VALUES (head.seq + 1, kind, subject, now(), body, head.hash, digest);
  UPDATE {s}.events_head SET seq = head.seq + 1, hash = digest;
END $$;
REVOKE ALL ON FUNCTION {s}.append_event(text, text, jsonb, boolean) FROM PUBLIC;

CREATE FUNCTION {s}.runs_event() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  PERFORM {s}.append_event(
    CASE
      WHEN TG_OP = 'INSERT' THEN 'run_started'
      WHEN OLD.status = 'running' AND NEW.status = 'abandoned' THEN 'run_abandoned'
      WHEN NEW.status IS DISTINCT FROM OLD.status THEN 'run_finished'
      ELSE 'run_planned'
    END,
    {SUBJECTS["runs"].format(r="NEW")}, to_jsonb(NEW), false);
  RETURN NULL;
END $$;

CREATE FUNCTION {s}.chunks_event() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  PERFORM {s}.append_event(
    'chunk_committed', {SUBJECTS["chunks"].format(r="NEW")}, to_jsonb(NEW), false);
  RETURN NULL;
END $$;

CREATE FUNCTION {s}.legal_holds_event() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  PERFORM {s}.append_event(
    CASE WHEN TG_OP = 'INSERT' THEN 'hold_placed' ELSE 'hold_released' END,
    {SUBJECTS["legal_holds"].format(r="NEW")}, to_jsonb(NEW), false);
  RETURN NULL;
END $$;

CREATE FUNCTION {s}.events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'the audit trail is append-only: an event is never changed or deleted'
    USING ERRCODE = 'integrity_constraint_violation', CONSTRAINT = 'audit_trail_append_only';
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON {s}.events
  FOR EACH ROW EXECUTE FUNCTION {s}.events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON {s}.events
  FOR EACH STATEMENT EXECUTE FUNCTION {s}.events_append_only();
CREATE TRIGGER events_head_no_truncate BEFORE DELETE OR TRUNCATE ON {s}.events_head
  FOR EACH STATEMENT EXECUTE FUNCTION {s}.events_append_only();
"""
    )
    _seed(s)
    for table in ("runs", "chunks", "legal_holds"):
        op.execute(
            f"CREATE TRIGGER {table}_event AFTER INSERT OR UPDATE ON {s}.{table} "
            f"FOR EACH ROW EXECUTE FUNCTION {s}.{table}_event();"
        )


def _seed(s: str) -> None:
    """One imported event per row already in the trail, in the order the rows were made."""
    run_kind = (
        "CASE r.status WHEN 'running' THEN 'run_started' WHEN 'abandoned' THEN 'run_abandoned' "
        "ELSE 'run_finished' END"
    )
    hold_kind = "CASE WHEN r.released_at IS NULL THEN 'hold_placed' ELSE 'hold_released' END"
    op.execute("SET LOCAL TimeZone = 'UTC'")
    op.execute(
        f"""
DO $$
DECLARE
  e record;
BEGIN
  FOR e IN
    SELECT * FROM (
      SELECT r.started_at AS at, 0 AS o, {run_kind} AS kind,
             {SUBJECTS["runs"].format(r="r")} AS subject, to_jsonb(r) AS fact
        FROM {s}.runs r
      UNION ALL
      SELECT r.cleaned_at, 1, 'chunk_committed', {SUBJECTS["chunks"].format(r="r")}, to_jsonb(r)
        FROM {s}.chunks r
      UNION ALL
      SELECT r.created_at, 2, {hold_kind}, {SUBJECTS["legal_holds"].format(r="r")}, to_jsonb(r)
        FROM {s}.legal_holds r
    ) rows ORDER BY at, o, subject
  LOOP
    PERFORM {s}.append_event(e.kind, e.subject, e.fact, true);
  END LOOP;
END $$;
"""
    )


def downgrade(schema: str) -> None:
    s = _quoted(schema)
    for table in ("runs", "chunks", "legal_holds"):
        op.execute(f"DROP TRIGGER {table}_event ON {s}.{table}")
        op.execute(f"DROP FUNCTION {s}.{table}_event()")
    op.execute(f"DROP TABLE {s}.events_head")
    op.execute(f"DROP TABLE {s}.events")
    op.execute(f"DROP FUNCTION {s}.events_append_only()")
    op.execute(f"DROP FUNCTION {s}.append_event(text, text, jsonb, boolean)")
