"""Personal data written back into cleaned rows, where the run's role may read it (the
table's owner, or an operator granted SELECT on the table): never `succeeded`
(docs/architecture.md, "What the job refuses and what it reports").

- a deferred constraint trigger writes back at COMMIT, after the chunk's check, also one
  that defers again through another deferred trigger: each chunk makes deferred triggers
  fire before its check, and checks its rows again after the COMMIT;
- a write-back trigger created while the run runs (after its first chunk): the copy risks
  are read again at the end, recorded, and the run's rows checked after the fact;
- a trigger that also moves `cleaned_at`: the check follows the ids the chunk's statements
  touched, never a stamp;
- `run --reclean`'s check, the same ways;
- `verify` with `age_from = "updated_at"`: the cleaning moves `updated_at`, so a cleaned
  row's age is measured without it.

Each scenario runs as the owner and as an operator; no personal value (`MARK`) may reach
an outcome, a log line, the run record or the console script's output.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from structlog.testing import capture_logs

from dispatch_retention.pg import engines
from dispatch_retention.vocabulary import Chunk, Outcome
from tests.helpers import (
    DAY,
    MARK,
    STRIPPED,
    assert_no_marker,
    config_text,
    db_now,
    dispatch,
    granted_role,
    insert_rows,
    run_job,
    run_script,
    settings,
    snapshot,
    write_config,
)

# --- who runs: the table's owner, or an operator that may read the personal columns ------


@dataclass(frozen=True)
class Runner:
    """The role a run runs as: its engine and its URL (as a user passes it)."""

    name: str
    engine: Engine
    url: str


@pytest.fixture(params=["owner", "operator"])
def reader(request: pytest.FixtureRequest, engine: Engine, database_url: URL) -> Iterator[Runner]:
    """The table's owner (the test's administrator), or an operator: the run role of `db
    grants` with SELECT on the whole table (what `run --reclean` needs)."""
    if request.param == "owner":
        url = database_url.set(drivername="postgresql").render_as_string(hide_password=False)
        yield Runner("owner", engine, url)
        return
    with granted_role(engine, database_url, "run") as (name, url):
        with engine.begin() as conn:
            conn.execute(text(f"GRANT SELECT ON dispatches TO {name}"))
        role_engine = engines.make_engine(database_url.set(username=name))
        try:
            yield Runner("operator", role_engine, url)
        finally:
            role_engine.dispose()


def seed_due(engine: Engine, count: int = 30) -> None:
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, count + 1)])


def seed_written_back(engine: Engine, count: int = 10) -> None:
    """`count` cleaned dispatches whose personal data came back (for `run --reclean`)."""
    now = db_now(engine)
    cleaned = {**STRIPPED, "cleaned_at": now - 10 * DAY, "updated_at": now - 10 * DAY}
    rows = [dispatch(i, now - 500 * DAY) for i in range(1, count + 1)]
    insert_rows(
        engine, [{**r, **cleaned, "msisdn": r["msisdn"], "email": r["email"]} for r in rows]
    )


def ddl(engine: Engine, statements: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(statements))


def logged(logs: list[dict[str, Any]]) -> str:
    return json.dumps(logs, default=str)


def holding_data(engine: Engine) -> list[int]:
    """Cleaned rows that hold personal data (any column differs from what cleaning writes)."""
    return [
        i
        for i, r in snapshot(engine).items()
        if r["cleaned_at"] is not None and any(r[c] != v for c, v in STRIPPED.items())
    ]


def record_of(engine: Engine, outcome: Outcome) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT * FROM dispatch_retention.runs WHERE run_id = :r"), {"r": outcome.run_id}
        ).mappings()
        return dict(row.one())


def assert_loud(outcome: Outcome, logs: list[dict[str, Any]], *words: str) -> None:
    """Not `succeeded`: failed (exit 1), saying why, with no personal value anywhere."""
    assert outcome.status == "failed", (outcome.status, outcome.error)
    assert outcome.written_back_rows > 0
    for word in ("personal data again", *words):
        assert word in (outcome.error or ""), outcome.error
    assert any(e["event"] == "rows_written_back" for e in logs)
    (failed,) = [e for e in logs if e["event"] == "run_failed"]
    assert failed["written_back_rows"] == outcome.written_back_rows
    assert_no_marker(outcome.error or "", logged(logs))


# --- item 3: deferred constraint triggers write back at COMMIT -------------------------------

#: What cleaning writes in each column, as SQL.
STRIPPED_SQL = {"msisdn": "NULL", "email": "NULL", "app_token": "NULL", "content": "'{}'::jsonb"}


def deferred_restore(column: str, *, shift: str | None = None) -> str:
    """A constraint trigger, deferred to COMMIT, that puts `column` back as it was when the
    cleaning stripped it (and moves `cleaned_at` by `shift`, when given)."""
    stripped = STRIPPED_SQL[column]
    stamp = f", cleaned_at = cleaned_at + interval '{shift}'" if shift else ""
    return f"""
CREATE FUNCTION app_restore() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.{column} IS NOT DISTINCT FROM {stripped}
     AND OLD.{column} IS DISTINCT FROM {stripped} THEN
    UPDATE dispatches SET {column} = OLD.{column}{stamp} WHERE id = NEW.id;
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER app_restore AFTER UPDATE ON dispatches
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION app_restore();
"""


#: A deferred trigger that, when it fires, defers again: it queues the old msisdn in an
#: outbox whose own deferred trigger writes it back at COMMIT (SET CONSTRAINTS ALL IMMEDIATE
#: before the check fires the first; the second still waits for COMMIT).
REDEFER = """
CREATE TABLE app_outbox (id bigint, msisdn text);
GRANT SELECT, INSERT ON app_outbox TO PUBLIC;
CREATE FUNCTION app_queue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.msisdn IS NULL AND OLD.msisdn IS NOT NULL THEN
    SET CONSTRAINTS ALL DEFERRED;
    INSERT INTO app_outbox VALUES (OLD.id, OLD.msisdn);
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER app_queue AFTER UPDATE ON dispatches
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION app_queue();
CREATE FUNCTION app_deliver() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE dispatches SET msisdn = NEW.msisdn WHERE id = NEW.id;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER app_deliver AFTER INSERT ON app_outbox
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION app_deliver();
"""

DEFERRED = [
    pytest.param(deferred_restore("msisdn"), id="msisdn"),
    pytest.param(deferred_restore("email"), id="email"),
    pytest.param(deferred_restore("content"), id="content"),
    pytest.param(deferred_restore("app_token"), id="app_token"),
    pytest.param(deferred_restore("msisdn", shift="-1 hour"), id="msisdn-and-stamp-moved"),
    pytest.param(REDEFER, id="defers-again"),
]


@pytest.mark.parametrize("trigger", DEFERRED)
def test_a_deferred_trigger_writing_back_at_commit_fails_the_run(
    engine: Engine, reader: Runner, trigger: str
) -> None:
    """A constraint trigger deferred to COMMIT (or one that defers again when made to fire)
    writes a personal column back: the run fails with the count, never `succeeded`."""
    seed_due(engine)
    ddl(engine, trigger)
    with capture_logs() as logs:
        outcome = run_job(reader.engine, settings(), chunk_size=10)
    assert_loud(outcome, logs, "writes it back")
    assert record_of(engine, outcome)["status"] == "failed"
    # what the audit trail claims cleaned is what holds no data, but for the rows the last
    # chunk committed before its check after COMMIT saw them written back
    assert len(holding_data(engine)) <= outcome.written_back_rows


def test_a_write_back_after_commit_is_said_as_such(engine: Engine, reader: Runner) -> None:
    """The trigger that defers again writes back after the chunk committed: the outcome says
    so (the chunk is in the trail, its rows hold data), and names the triggers."""
    seed_due(engine)
    ddl(engine, REDEFER)
    with capture_logs() as logs:
        outcome = run_job(reader.engine, settings(), chunk_size=10)
    assert_loud(outcome, logs, "after their chunk committed", "app_queue", "run --reclean")
    # the first chunk committed, then its rows were found written back: the run stopped
    assert outcome.chunks == 1
    assert outcome.written_back_rows == outcome.rows_cleaned == len(holding_data(engine)) > 0
    (event,) = [e for e in logs if e["event"] == "rows_written_back"]
    assert (event["rows"], event["after_commit"]) == (outcome.rows_cleaned, True)


def test_the_console_script_exits_1_on_a_write_back_at_commit(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Through the console script: exit 1, `run_failed` says why, and neither the output
    nor the run record nor its events hold a personal value."""
    seed_due(engine)
    ddl(engine, REDEFER)
    config = write_config(tmp_path / "r.toml", config_text())
    job = run_script(url_string, config, "run", "--yes", "--chunk-size", "10")
    assert job.returncode == 1, job.stderr
    assert "personal data again" in job.last("run_failed")["error"]
    with engine.connect() as conn:
        trail = conn.execute(
            text("SELECT string_agg(body, '') FROM dispatch_retention.events")
        ).scalar_one()
    assert_no_marker(job.stdout, job.stderr, trail)


# --- item 5: a trigger that moves cleaned_at as it writes back ------------------------------


def before_keep_token(stamp: str) -> str:
    return f"""
CREATE FUNCTION app_keep_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.app_token := OLD.app_token;
  NEW.cleaned_at := {stamp};
  RETURN NEW;
END $$;
CREATE TRIGGER app_keep_token BEFORE UPDATE ON dispatches
  FOR EACH ROW EXECUTE FUNCTION app_keep_token();
"""


@pytest.mark.parametrize(
    "stamp",
    [
        pytest.param("date_trunc('hour', NEW.cleaned_at)", id="truncated"),
        pytest.param("NEW.cleaned_at + interval '1 second'", id="forward"),
        pytest.param("NEW.cleaned_at - interval '1 second'", id="backward"),
        pytest.param("NEW.cleaned_at + interval '1 microsecond'", id="one-microsecond"),
        pytest.param("NULL", id="unset"),
    ],
)
def test_a_trigger_that_moves_the_stamp_as_it_writes_back_fails_the_run(
    engine: Engine, reader: Runner, stamp: str
) -> None:
    """A BEFORE trigger keeps app_token and moves cleaned_at: the check follows the ids the
    chunk's UPDATE touched, so the run fails, and no cleaned row holds data."""
    seed_due(engine)
    ddl(engine, before_keep_token(stamp))
    with capture_logs() as logs:
        outcome = run_job(reader.engine, settings(), chunk_size=10)
    assert_loud(outcome, logs, "app_keep_token")
    assert holding_data(engine) == []


# --- item 4: a write-back trigger created during the run ------------------------------------

WRITE_BACK_BEFORE = """
CREATE FUNCTION app_keep_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.app_token := OLD.app_token;
  RETURN NEW;
END $$;
CREATE TRIGGER app_keep_token BEFORE UPDATE ON dispatches
  FOR EACH ROW EXECUTE FUNCTION app_keep_token();
"""

APPEARING = [
    pytest.param(WRITE_BACK_BEFORE, "app_keep_token", id="before-trigger"),
    pytest.param(deferred_restore("email"), "app_restore", id="deferred-trigger"),
]


def deploy_after_first_chunk(engine: Engine, statements: str) -> Any:
    """An on_chunk hook: another session creates `statements` once the first chunk is in."""
    done: list[int] = []

    def deploy(chunk: Chunk) -> None:
        if not done:
            done.append(chunk.seq)
            ddl(engine, statements)

    return deploy


@pytest.mark.parametrize(("trigger", "name"), APPEARING)
def test_a_write_back_trigger_created_during_the_run_fails_it(
    engine: Engine, reader: Runner, trigger: str, name: str
) -> None:
    """No trigger when the run began (nothing to check), one created by another session
    after the first chunk: the run reads the copy risks again at its end, checks the rows it
    cleaned, and fails naming the trigger; the record says the risk appeared."""
    seed_due(engine)
    with capture_logs() as logs:
        outcome = run_job(
            reader.engine,
            settings(),
            chunk_size=10,
            on_chunk=deploy_after_first_chunk(engine, trigger),
        )
    assert_loud(outcome, logs, name, "appeared during the run")
    assert outcome.written_back_rows == len(holding_data(engine)) > 0
    record = record_of(engine, outcome)
    assert record["copy_risks"] == []  # what the run started with
    assert record["status"] == "failed" and name in record["error"]
    appeared = [e for e in logs if e["event"] == "copy_risk" and e.get("appeared_during_run")]
    assert [e["name"] for e in appeared] == [name]


def test_a_write_back_trigger_created_during_a_run_the_role_cannot_check(
    engine: Engine, run_role: tuple[str, str], database_url: URL
) -> None:
    """As the run role (it may not read the personal columns): the run cannot check the
    rows, so it ends `incomplete` with the reason, and the record names the trigger."""
    seed_due(engine)
    role_engine = engines.make_engine(database_url.set(username=run_role[0]))
    try:
        with capture_logs() as logs:
            outcome = run_job(
                role_engine,
                settings(),
                chunk_size=10,
                on_chunk=deploy_after_first_chunk(engine, WRITE_BACK_BEFORE),
            )
    finally:
        role_engine.dispose()
    assert outcome.status == "incomplete", (outcome.status, outcome.error)
    assert "copy_risks_appeared" in (outcome.remaining_reason or "")
    assert "app_keep_token" in (outcome.error or "")
    record = record_of(engine, outcome)
    assert (record["status"], record["remaining_reason"]) == ("incomplete", "copy_risks_appeared")
    assert "app_keep_token" in record["error"]
    assert any(e["event"] == "write_back_unchecked" for e in logs)
    assert_no_marker(outcome.error or "", logged(logs))


def test_a_publication_created_during_the_run_is_recorded(engine: Engine, reader: Runner) -> None:
    """A copy risk that cannot write back (a publication) created during the run: it is
    logged and recorded, and the run is not `succeeded` (its record's copy risks miss it)."""
    seed_due(engine)
    publication = f"app_pub_{uuid.uuid4().hex[:8]}"
    try:
        with capture_logs() as logs:
            outcome = run_job(
                reader.engine,
                settings(),
                chunk_size=10,
                on_chunk=deploy_after_first_chunk(
                    engine, f"CREATE PUBLICATION {publication} FOR TABLE dispatches"
                ),
            )
    finally:
        ddl(engine, f"DROP PUBLICATION IF EXISTS {publication}")
    assert (outcome.status, outcome.rows_cleaned) == ("incomplete", 30)
    assert outcome.remaining_reason == "copy_risks_appeared"
    assert f"publication {publication}" in (outcome.error or "")
    record = record_of(engine, outcome)
    assert publication in record["error"]
    assert record["copy_risks"] == []
    assert [r["name"] for r in record["copy_risks_at_end"]] == [publication]
    assert any(e["event"] == "copy_risk" and e.get("appeared_during_run") for e in logs)


def test_a_trigger_present_from_the_start_is_no_appearance(engine: Engine, reader: Runner) -> None:
    """A copy risk that was there when the run began is in its record: the run succeeds."""
    seed_due(engine)
    ddl(
        engine,
        "CREATE TABLE app_log (id bigint);"
        "CREATE FUNCTION app_log() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN RETURN NULL; END $$;"
        "CREATE TRIGGER app_log AFTER UPDATE ON dispatches"
        " FOR EACH ROW EXECUTE FUNCTION app_log();",
    )
    outcome = run_job(reader.engine, settings(), chunk_size=10)
    assert (outcome.status, outcome.rows_cleaned, outcome.error) == ("succeeded", 30, None)
    record = record_of(engine, outcome)
    assert record["copy_risks_at_end"] == record["copy_risks"] != []


# --- `run --reclean` -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trigger",
    [
        pytest.param(deferred_restore("msisdn"), id="deferred"),
        pytest.param(deferred_restore("msisdn", shift="1 second"), id="deferred-stamp-moved"),
        pytest.param(REDEFER, id="defers-again"),
        pytest.param(WRITE_BACK_BEFORE.replace("app_token", "msisdn"), id="before-commit"),
    ],
)
def test_reclean_fails_on_a_write_back_at_commit(
    engine: Engine, reader: Runner, trigger: str
) -> None:
    """`run --reclean` over written-back rows with a trigger that writes back at COMMIT (or
    defers again, or at once, before COMMIT): the run fails, never `succeeded`, and its last
    event counts the rows written back."""
    seed_written_back(engine)
    ddl(engine, trigger)
    with capture_logs() as logs:
        outcome = run_job(reader.engine, settings(), chunk_size=5, reclean=True)
    assert outcome.status == "failed", (outcome.status, outcome.error)
    assert "personal data again" in (outcome.error or "")
    assert "writes it back" in (outcome.error or "")
    (failed,) = [e for e in logs if e["event"] == "run_failed"]
    assert failed["written_back_rows"] == outcome.written_back_rows > 0
    assert_no_marker(outcome.error or "", logged(logs))


# --- item 14: verify with age_from = "updated_at" --------------------------------------------


def verify_json(cfg: Path, url: str) -> tuple[int, dict[str, Any]]:
    job = run_script(url, cfg, "verify", "--format", "json")
    assert_no_marker(job.stdout, job.stderr)
    assert job.returncode in (0, 5), job.stderr
    return job.returncode, json.loads(job.stdout)


@pytest.fixture(params=["owner", "read-only"])
def verifier(request: pytest.FixtureRequest, engine: Engine, database_url: URL) -> Iterator[str]:
    """verify's URL: the table's owner, or the read-only role of `db grants` (it counts
    through the audit schema's view)."""
    if request.param == "owner":
        yield database_url.set(drivername="postgresql").render_as_string(hide_password=False)
        return
    s = settings(clean='age_from = "updated_at"')
    with granted_role(engine, database_url, "read-only", s) as (_name, url):
        yield url


@pytest.mark.parametrize(
    "written",
    [
        pytest.param({"msisdn": f"+47{MARK}1"}, id="msisdn"),
        pytest.param({"content": {"body": MARK}}, id="content"),
        pytest.param({"email": f"{MARK}@example.invalid", "updated_at": "now"}, id="and-touched"),
    ],
)
def test_verify_with_age_from_updated_at_counts_a_written_back_row(
    engine: Engine, verifier: str, tmp_path: Path, written: dict[str, Any]
) -> None:
    """age_from = updated_at: cleaning set updated_at to its own time, so the row looks
    young; data written back into it (by the application, which may touch updated_at too)
    is still a violation, its age measured from created_at."""
    now = db_now(engine)
    stamp = now - 2 * DAY
    cleaned = {**STRIPPED, "cleaned_at": stamp, "updated_at": stamp}
    back = {k: (now if v == "now" else v) for k, v in written.items()}
    insert_rows(
        engine,
        [
            dispatch(1, now - 500 * DAY, **{**cleaned, **back}),
            dispatch(2, now - 500 * DAY, **cleaned),
            dispatch(3, now - 5 * DAY, **{**cleaned, **back}),  # young: not past its window
        ],
    )
    cfg = write_config(tmp_path / "r.toml", config_text(clean='age_from = "updated_at"'))
    code, report = verify_json(cfg, verifier)
    assert (code, report["ok"], report["violations"]) == (5, False, [{"policy": "sms", "rows": 1}])
    assert report["anomalies"]["written_back_rows"] == 2


def test_verify_after_a_run_with_age_from_updated_at_sees_the_write_back(
    engine: Engine, verifier: str, tmp_path: Path
) -> None:
    """A run with age_from = updated_at cleans old rows; the application then writes an
    msisdn back: verify fails (exit 5) instead of calling the row young."""
    seed_due(engine, 5)
    s = settings(clean='age_from = "updated_at"')
    assert run_job(engine, s).status == "succeeded"
    ddl(engine, f"UPDATE dispatches SET msisdn = '+47{MARK}' WHERE id = 3")
    cfg = write_config(tmp_path / "r.toml", config_text(clean='age_from = "updated_at"'))
    code, report = verify_json(cfg, verifier)
    assert (code, report["violation_rows"]) == (5, 1)


@pytest.mark.parametrize("age_from", ["scheduled_at", "transmitted_at", "delivered_at"])
def test_verify_measures_a_cleaned_row_from_created_at_whatever_age_from_names(
    engine: Engine, url_string: str, tmp_path: Path, age_from: str
) -> None:
    """The neighbours of age_from = updated_at: whatever writes data back into an old cleaned
    dispatch may move the column age is measured from too; the row is still a violation,
    its age measured from created_at (the oldest a dispatch has)."""
    now = db_now(engine)
    stamp = now - 2 * DAY
    cleaned = {**STRIPPED, "cleaned_at": stamp, "updated_at": stamp}
    insert_rows(
        engine,
        [
            dispatch(1, now - 500 * DAY, **{**cleaned, "msisdn": f"+47{MARK}1", age_from: now}),
            dispatch(2, now - 500 * DAY, **{**cleaned, age_from: now}),
        ],
    )
    cfg = write_config(tmp_path / "r.toml", config_text(clean=f'age_from = "{age_from}"'))
    code, report = verify_json(cfg, url_string)
    assert (code, report["violations"]) == (5, [{"policy": "sms", "rows": 1}])
