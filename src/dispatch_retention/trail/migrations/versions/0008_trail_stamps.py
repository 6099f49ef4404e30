"""trail stamps: times taken under the chain's lock, the writing role in each event, and guards
no session can skip (issue 23)

A third adversarial pass forged history that the guards and `audit verify` accepted:
- a hold inserted in a transaction opened before a run was stamped with that transaction's
  start (`now()`), so the trail said the job cleaned a member who was under hold: the stamps
  of a run's start and close and of a hold's placing and release are now the clock
  (`clock_timestamp()`) read after taking the chain's lock (`<table>_stamp`, a BEFORE
  trigger that runs as the trail's owner), and each such event's `at` is that stamp: the
  chain's order (commit order: the lock is held to COMMIT) and its times agree. A stamp
  earlier than the event before it, or later than the clock, is not taken as the event's
  time (its `at` is then the clock), so a row written with its stamp trigger off shows;
- an abandoned run was closed `succeeded` by its role: out of `abandoned` there is only a
  close as `failed` or `interrupted` (`runs_abandoned_closes`);
- `append_event(..., imported => true)` is refused once the chain holds a live event: only
  the upgrade that began the chain imports;
- the events name the role that wrote the row (`role`: the session's `SET ROLE`, else its
  user, which the server sets only to a role the session may become), beside the session's
  (`by`), so an honest `SET ROLE` and a forged name tell apart;
- every trigger of the trail is `ENABLE ALWAYS`: `session_replication_role = replica` no
  longer skips the guards and the events;
- a chunk knows its transaction: `chunks.xact` is `pg_current_xact_id()`, set by
  `chunks_stamp` whatever the writer gave, so `audit verify` can tell personal data that the
  chunk's own transaction left in its rows (a chunk recorded for a cleaning that did not
  happen) from data written there later. Chunks recorded before have none.

The events written from here are encoding version 2: version 1's object with `role` added
(`{"v": 2, "seq", "kind", "subject", "at", "by", "role", "imported", "fact", "prev"}`).
Events written before stay version 1 and verify as they are.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: Functions that run as their owner (as 0005's).
DEFINER = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC'"
FIXED = "SET search_path = pg_catalog, pg_temp"
#: The role the session writes as, read inside a SECURITY DEFINER function (whose own
#: `current_user` is its owner): the `role` setting is what SET ROLE set ('none': none), and
#: the server lets a session set it only to a role it is a member of.
WRITER = "coalesce(nullif(current_setting('role'), 'none'), session_user)"
#: The tables of the trail, and the tables whose rows carry a stamp.
TRAIL = ("runs", "chunks", "legal_holds", "events", "events_head")
#: How each trail table names its rows in `events.subject` (as 0005).
SUBJECTS = {
    "runs": "'run:' || NEW.run_id",
    "chunks": "'chunk:' || NEW.run_id || '/' || NEW.seq",
    "legal_holds": "'hold:' || NEW.hold_id",
}


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _refuse(message: str, constraint: str) -> str:
    return (
        f"RAISE EXCEPTION '{message}' USING ERRCODE = 'integrity_constraint_violation', "
        f"CONSTRAINT = '{constraint}'"
    )


def _append_event(s: str) -> str:
    return f"""
CREATE FUNCTION {s}.append_event(
  kind text, subject text, fact jsonb, imported boolean, stamped timestamptz)
RETURNS void LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
  head record;
  before timestamptz;
  at timestamptz;
  body text;
  digest text;
BEGIN
  SELECT seq, hash INTO STRICT head FROM {s}.events_head FOR UPDATE;
  IF imported AND EXISTS (
       SELECT FROM {s}.events e WHERE NOT coalesce((e.body::jsonb ->> 'imported')::boolean, false))
  THEN
    {_refuse("only the upgrade that began the chain imports events", "events_imported_first")};
  END IF;
  SELECT recorded_at INTO before FROM {s}.events WHERE seq = head.seq;
  at := clock_timestamp();
  IF stamped IS NOT NULL AND stamped <= at AND (before IS NULL OR stamped >= before) THEN
    at := stamped;
  END IF;
  body := jsonb_build_object(
    'v', 2, 'seq', head.seq + 1, 'kind', kind, 'subject', subject, 'at', at,
    'by', session_user, 'role', {WRITER},
    'imported', imported, 'fact', fact, 'prev', head.hash)::text;
  digest := encode(sha256(convert_to(body, 'UTF8')), 'hex');
  INSERT INTO {s}.events (seq, kind, subject, recorded_at, body, prev_hash, hash)
    VALUES (head.seq + 1, kind, subject, at, body, head.hash, digest);
  UPDATE {s}.events_head SET seq = head.seq + 1, hash = digest;
END $$;
REVOKE ALL ON FUNCTION {s}.append_event(text, text, jsonb, boolean, timestamptz) FROM PUBLIC;

CREATE OR REPLACE FUNCTION {s}.append_event(kind text, subject text, fact jsonb, imported boolean)
RETURNS void LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  PERFORM {s}.append_event(kind, subject, fact, imported, NULL);
END $$;
"""


def _events(s: str) -> str:
    """The event triggers of 0005, handing each its row's stamp."""

    def append(kind: str, table: str, stamp: str = "NULL") -> str:
        return f"PERFORM {s}.append_event({kind}, {SUBJECTS[table]}, to_jsonb(NEW), false, {stamp})"

    abandoned = (
        "CASE WHEN OLD.status = 'running' AND NEW.status = 'abandoned' THEN 'run_abandoned' "
        "ELSE 'run_finished' END"
    )
    return f"""
CREATE OR REPLACE FUNCTION {s}.runs_event() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    {append("'run_started'", "runs", "NEW.started_at")};
  ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
    {append(abandoned, "runs", "NEW.finished_at")};
  ELSE
    {append("'run_planned'", "runs")};
  END IF;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION {s}.chunks_event() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  {append("'chunk_committed'", "chunks")};
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION {s}.legal_holds_event() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    {append("'hold_placed'", "legal_holds", "NEW.created_at")};
  ELSE
    {append("'hold_released'", "legal_holds", "NEW.released_at")};
  END IF;
  RETURN NULL;
END $$;
"""


def _events_0005(s: str) -> str:
    """The event triggers exactly as 0005 wrote them, for the downgrade (a frozen copy:
    tests/trail/test_migrations.py holds it equal to what an upgrade to 0007 makes)."""
    return f"""
CREATE OR REPLACE FUNCTION {s}.runs_event() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  PERFORM {s}.append_event(
    CASE
      WHEN TG_OP = 'INSERT' THEN 'run_started'
      WHEN OLD.status = 'running' AND NEW.status = 'abandoned' THEN 'run_abandoned'
      WHEN NEW.status IS DISTINCT FROM OLD.status THEN 'run_finished'
      ELSE 'run_planned'
    END,
    {SUBJECTS["runs"]}, to_jsonb(NEW), false);
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION {s}.chunks_event() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  PERFORM {s}.append_event(
    'chunk_committed', {SUBJECTS["chunks"]}, to_jsonb(NEW), false);
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION {s}.legal_holds_event() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  PERFORM {s}.append_event(
    CASE WHEN TG_OP = 'INSERT' THEN 'hold_placed' ELSE 'hold_released' END,
    {SUBJECTS["legal_holds"]}, to_jsonb(NEW), false);
  RETURN NULL;
END $$;
"""


def _stamps(s: str) -> str:
    """BEFORE triggers named to fire after each table's guard (triggers of one event fire in
    the order of their names): the chain's lock, then the clock."""
    lock = f"PERFORM FROM {s}.events_head FOR UPDATE"
    return f"""
CREATE FUNCTION {s}.runs_stamp() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    {lock};
    NEW.started_at := clock_timestamp();
  ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
    IF OLD.status = 'abandoned' AND NEW.status NOT IN ('failed', 'interrupted') THEN
      {
        _refuse(
            "an abandoned run is closed failed or interrupted, never otherwise",
            "runs_abandoned_closes",
        )
    };
    END IF;
    {lock};
    NEW.finished_at := clock_timestamp();
  END IF;
  RETURN NEW;
END $$;

CREATE FUNCTION {s}.chunks_stamp() RETURNS trigger LANGUAGE plpgsql {FIXED} AS $$
BEGIN
  NEW.xact := pg_current_xact_id();
  RETURN NEW;
END $$;

CREATE FUNCTION {s}.legal_holds_stamp() RETURNS trigger LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
  {lock};
  IF TG_OP = 'INSERT' THEN
    NEW.created_at := clock_timestamp();
  ELSE
    NEW.released_at := clock_timestamp();
  END IF;
  RETURN NEW;
END $$;
"""


def upgrade(schema: str) -> None:
    s = _quoted(schema)
    op.execute(f"ALTER TABLE {s}.chunks ADD COLUMN xact xid8")
    op.execute(_append_event(s))
    op.execute(_events(s))
    op.execute(_stamps(s))
    for table in ("runs", "legal_holds"):
        op.execute(
            f"CREATE TRIGGER {table}_stamp BEFORE INSERT OR UPDATE ON {s}.{table} "
            f"FOR EACH ROW EXECUTE FUNCTION {s}.{table}_stamp()"
        )
    op.execute(
        f"CREATE TRIGGER chunks_stamp BEFORE INSERT ON {s}.chunks "
        f"FOR EACH ROW EXECUTE FUNCTION {s}.chunks_stamp()"
    )
    _set_triggers(schema, "ENABLE ALWAYS")


def _set_triggers(schema: str, mode: str) -> None:
    """Every trigger of the trail's tables `ENABLE ALWAYS` (upgrade) or `ENABLE` (downgrade)."""
    literal = "'" + schema.replace("'", "''") + "'"
    names = ", ".join(f"'{t}'" for t in TRAIL)
    op.execute(
        f"""
DO $$
DECLARE
  t record;
BEGIN
  FOR t IN SELECT tgrelid::regclass AS tab, tgname FROM pg_trigger
           WHERE tgrelid IN (SELECT to_regclass(format('%I.%I', {literal}, n))
                             FROM unnest(ARRAY[{names}]) AS n)
             AND NOT tgisinternal ORDER BY 1, 2
  LOOP
    EXECUTE format('ALTER TABLE %s {mode} TRIGGER %I', t.tab, t.tgname);
  END LOOP;
END $$;
"""
    )


def downgrade(schema: str) -> None:
    """The triggers and functions as 0007 left them: events append through the 4-argument
    function again (its body calls nothing of 0008), stamped `now()` by the guards."""
    s = _quoted(schema)
    for table in ("runs", "chunks", "legal_holds"):
        op.execute(f"DROP TRIGGER {table}_stamp ON {s}.{table}")
        op.execute(f"DROP FUNCTION {s}.{table}_stamp()")
    _set_triggers(schema, "ENABLE")
    op.execute(
        f"""
CREATE OR REPLACE FUNCTION {s}.append_event(kind text, subject text, fact jsonb, imported boolean)
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
"""
    )
    op.execute(_events_0005(s))
    op.execute(f"DROP FUNCTION {s}.append_event(text, text, jsonb, boolean, timestamptz)")
    op.execute(f"ALTER TABLE {s}.chunks DROP COLUMN xact")
