"""docs/architecture.md "What the job refuses": triggers and rules on UPDATE. A trigger
that skips rows fails the run naming it; copies are logged and recorded; written-back
personal data is seen by a role that may read it, reported by verify and cleaned again by
`run --reclean`; windows are swept only where something can leave a row as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from structlog.testing import capture_logs

from dispatch_retention.config import Settings
from dispatch_retention.vocabulary import Chunk, Outcome
from tests.helpers import (
    DAY,
    MARK,
    as_json_lines,
    assert_no_marker,
    config_text,
    db_now,
    dispatch,
    insert_rows,
    run_job,
    run_script,
    seed_series,
    settings,
    snapshot,
    write_config,
)

# --- a trigger that skips rows ---------------------------------------------------------------

SKIP_EMAILS = """
CREATE FUNCTION app_keep_emails() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.type = 'email' THEN RETURN NULL; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER app_keep_emails BEFORE UPDATE ON dispatches
  FOR EACH ROW EXECUTE FUNCTION app_keep_emails();
"""


def test_a_before_trigger_that_skips_rows_fails_the_run_naming_it(engine: Engine) -> None:
    """A BEFORE UPDATE trigger returning NULL for e-mails: the run fails (not `succeeded`)
    with the count of rows it left and the trigger's name; what it did clean is audited."""
    now = db_now(engine)
    insert_rows(
        engine,
        [dispatch(i, now - 500 * DAY, type="email" if i % 3 == 0 else "sms") for i in range(1, 31)],
    )
    with engine.begin() as conn:
        conn.execute(text(SKIP_EMAILS))
    with capture_logs() as logs:
        outcome = run_job(engine, settings(), chunk_size=10)
    assert outcome.status == "failed"
    assert outcome.missed_rows > 0
    assert "app_keep_emails" in (outcome.error or "")
    assert "left as they were" in (outcome.error or "")
    missed = [e for e in logs if e["event"] == "rows_not_cleaned"]
    assert missed and missed[0]["rows"] == outcome.missed_rows
    (failed,) = [e for e in logs if e["event"] == "run_failed"]
    assert failed["missed_rows"] == outcome.missed_rows
    after = snapshot(engine)
    assert all(after[i]["cleaned_at"] is None for i in after if after[i]["type"] == "email")
    assert outcome.rows_cleaned == sum(1 for r in after.values() if r["cleaned_at"] is not None)


def test_the_console_script_exits_1_when_a_trigger_skips_rows(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Through the console script: exit 1, `run_failed` names the trigger, and every
    following nightly run fails the same way (it never turns into exit 0)."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY, type="email") for i in range(1, 6)])
    with engine.begin() as conn:
        conn.execute(text(SKIP_EMAILS))
    config = write_config(tmp_path / "r.toml", config_text())
    for _night in range(2):
        job_ = run_script(url_string, config, "run", "--yes")
        assert job_.returncode == 1, job_.stderr
        failed = job_.last("run_failed")
        assert failed["status"] == "failed" and "app_keep_emails" in failed["error"]
        assert_no_marker(job_.stdout, job_.stderr)


# --- copies the cleaning UPDATE makes --------------------------------------------------------

COPY_OLD = """
CREATE TABLE dispatches_history (id bigint, msisdn text, content jsonb, changed_at timestamptz);
CREATE FUNCTION app_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO dispatches_history VALUES (OLD.id, OLD.msisdn, OLD.content, now());
  RETURN NEW;
END $$;
CREATE TRIGGER app_history AFTER UPDATE ON dispatches
  FOR EACH ROW EXECUTE FUNCTION app_history();
"""


def test_a_trigger_that_copies_old_rows_is_logged_once_and_recorded(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """An AFTER UPDATE trigger copying OLD into a history table: the run logs `copy_risk`
    once (a warning, naming the trigger) and keeps it in the run record; acknowledged in
    the config, it is logged with the reason instead."""
    seed_series(engine, range(1, 11))
    with engine.begin() as conn:
        conn.execute(text(COPY_OLD))
    config = write_config(tmp_path / "r.toml", config_text())
    done = run_script(url_string, config, "run", "--yes")
    assert done.returncode == 0, done.stderr
    risks = done.events("copy_risk")
    assert [(r["kind"], r["name"], r["when"], r["level"]) for r in risks] == [
        ("trigger", "app_history", "AFTER", "warning")
    ]
    with engine.connect() as conn:
        recorded = conn.execute(
            text("SELECT copy_risks FROM dispatch_retention.runs WHERE run_id = :r"),
            {"r": done.last("run_started")["run_id"]},
        ).scalar_one()
    assert [r["name"] for r in recorded] == ["app_history"]
    shown = run_script(url_string, config, "audit", "show", done.last("run_started")["run_id"])
    assert "trigger app_history (AFTER): not acknowledged" in shown.stdout
    assert_no_marker(done.stdout, done.stderr, str(recorded), shown.stdout)

    reviewed = write_config(
        tmp_path / "a.toml",
        config_text() + '\n[acknowledged]\napp_history = "history purged nightly (DPO-12)"\n',
    )
    again = run_script(url_string, reviewed, "run", "--yes")
    assert again.returncode == 0, again.stderr
    (risk,) = again.events("copy_risk")
    assert (risk["level"], risk["acknowledged"]) == ("info", "history purged nightly (DPO-12)")


# --- personal data written back, and --reclean ----------------------------------------------

WRITE_BACK = """
CREATE FUNCTION app_keep_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.type = 'push' THEN NEW.app_token := OLD.app_token; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER app_keep_token BEFORE UPDATE ON dispatches
  FOR EACH ROW EXECUTE FUNCTION app_keep_token();
"""


def seed_written_back_pushes(engine: Engine) -> None:
    """20 due dispatches, the odd ones pushes, and the BEFORE trigger (WRITE_BACK) that puts
    a push's app_token back as it is cleaned."""
    now = db_now(engine)
    insert_rows(
        engine,
        [dispatch(i, now - 500 * DAY, type="push" if i % 2 else "sms") for i in range(1, 21)],
    )
    with engine.begin() as conn:
        conn.execute(text(WRITE_BACK))


def test_written_back_rows_are_verify_anomalies_and_reclean_strips_them(
    engine: Engine, url_string: str, run_role: tuple[str, str], tmp_path: Path
) -> None:
    """A BEFORE trigger writes app_token back for pushes: the run role cannot see it (it
    may not read the columns) and logs write_back_unchecked; `verify` reports them
    (written_back_rows, and violations: exit 5); `run --reclean` as the run role is refused
    (exit 2, it lacks the reclean rights); with the trigger still there it fails (exit 1);
    once the trigger is gone it strips them again, counted apart (rows_recleaned, chunks of
    kind reclean), and `verify` is OK."""
    seed_written_back_pushes(engine)
    config = write_config(tmp_path / "r.toml", config_text())
    _role, role_url = run_role
    # the run role cannot read the personal columns: it cannot see the write-back, and says so
    first = run_script(role_url, config, "run", "--yes")
    assert first.returncode == 0, first.stderr
    assert [r["name"] for r in first.events("copy_risk")] == ["app_keep_token"]
    assert first.events("write_back_unchecked")
    check = run_script(url_string, config, "verify", "--format", "json")
    assert check.returncode == 5, check.stdout
    report = __import__("json").loads(check.stdout)
    assert report["anomalies"]["written_back_rows"] == 10

    refused = run_script(role_url, config, "run", "--yes", "--reclean")
    assert refused.returncode == 2, refused.stderr
    # it lacks what `db grants --purpose reclean` gives: SELECT on the personal columns
    assert "--purpose reclean" in refused.stderr
    assert "SELECT(app_token) on column dispatches" in refused.stderr

    again = run_script(url_string, config, "run", "--yes", "--reclean")
    assert again.returncode == 1, again.stderr
    assert "writes it back" in again.last("run_failed")["error"]
    assert again.last("run_failed")["rows_cleaned"] == 0
    assert "rows_recleaned" not in again.last("run_failed")

    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER app_keep_token ON dispatches"))
    fixed = run_script(url_string, config, "run", "--yes", "--reclean")
    assert fixed.returncode == 0, fixed.stderr
    finished = fixed.last("run_finished")
    assert (finished["rows_cleaned"], finished["rows_recleaned"]) == (0, 10)
    assert "cleaned again:    10" in fixed.stdout
    with engine.connect() as conn:
        kinds = conn.execute(
            text("SELECT kind, sum(rows) FROM dispatch_retention.chunks GROUP BY kind")
        ).all()
    assert dict(kinds) == {"clean": 20, "reclean": 10}  # the failed reclean recorded nothing
    ok = run_script(url_string, config, "verify")
    assert ok.returncode == 0, ok.stdout
    assert_no_marker(fixed.stdout, fixed.stderr, ok.stdout, again.stderr)


def test_a_plain_run_never_touches_a_cleaned_row(engine: Engine) -> None:
    """Without --reclean a written-back row stays as it is (only verify reports it)."""
    now = db_now(engine)
    insert_rows(
        engine, [dispatch(1, now - 500 * DAY, cleaned_at=now - DAY, content=None, msisdn="x")]
    )
    before = snapshot(engine)
    outcome = run_job(engine, settings())
    assert (outcome.status, outcome.rows_cleaned, outcome.rows_recleaned) == ("succeeded", 0, 0)
    assert snapshot(engine) == before


@pytest.mark.parametrize("stamp_type", [None, "timestamptz(0)"], ids=["timestamptz", "(0)"])
def test_a_role_that_can_read_the_columns_fails_a_run_whose_rows_are_written_back(
    engine: Engine, stamp_type: str | None
) -> None:
    """Run by a role that may read the personal columns (the owner), a chunk whose cleaned
    rows hold personal data again right after the UPDATE rolls back, and the run fails
    naming the trigger: never `succeeded` while it can see the data. Also where cleaned_at
    keeps whole seconds (it rounds the chunk's stamp: the check compares it as stored)."""
    seed_written_back_pushes(engine)
    if stamp_type:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE dispatches ALTER cleaned_at TYPE {stamp_type}"))
    with capture_logs() as logs:
        outcome = run_job(engine, settings(), chunk_size=5)
    assert outcome.status == "failed"
    assert "app_keep_token" in (outcome.error or "") and "again" in (outcome.error or "")
    assert any(e["event"] == "rows_written_back" for e in logs)
    after = snapshot(engine)
    written_back = [i for i, r in after.items() if r["cleaned_at"] and r["app_token"]]
    assert written_back == []  # the chunk that saw it rolled back: nothing claims them
    with engine.connect() as conn:
        audited = conn.execute(
            text("SELECT coalesce(sum(rows), 0) FROM dispatch_retention.chunks")
        ).scalar_one()
    assert audited == sum(1 for r in after.values() if r["cleaned_at"])


def sweeps(engine: Engine, s: Settings, **kwargs: Any) -> tuple[Outcome, int, int]:
    """Run, counting the windows' fast UPDATEs and their sweeps (lock, then clean)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        words = statement.split()
        seen.append(words[1] if words[:1] == ["WITH"] and len(words) > 1 else words[0])

    event.listen(engine, "before_cursor_execute", count)
    try:
        outcome = run_job(engine, s, **kwargs)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return outcome, seen.count("cleaned"), seen.count("locked")


def test_every_window_is_recounted_in_its_own_transaction(engine: Engine) -> None:
    """Each chunk recounts (sweeps) its window after its UPDATE, with or without a trigger
    on the table: one sweep per window transaction."""
    seed_series(engine, range(1, 31))
    plain, windows, swept = sweeps(engine, settings(), chunk_size=10)
    assert (plain.status, plain.rows_cleaned) == ("succeeded", 30)
    assert swept == windows >= plain.chunks >= 3
    seed_series(engine, range(31, 61))
    with engine.begin() as conn:
        conn.execute(text(COPY_OLD))
    watched, windows, swept = sweeps(engine, settings(), chunk_size=10)
    assert (watched.status, watched.rows_cleaned) == ("succeeded", 30)
    assert swept == windows >= watched.chunks >= 3


def test_a_trigger_created_during_the_run_is_caught_by_the_catch_up_sweep(
    engine: Engine,
) -> None:
    """A trigger that skips e-mails, created after the first chunk (the run saw none when
    it began): the next sweep finds the rows it left, and the run fails naming the trigger
    (re-read from the catalog; never `succeeded`)."""
    now = db_now(engine)
    insert_rows(
        engine,
        [dispatch(i, now - 500 * DAY, type="email" if i % 2 else "sms") for i in range(1, 41)],
    )
    created = False

    def deploy(chunk: Chunk) -> None:
        nonlocal created
        if not created:
            created = True
            with engine.begin() as conn:
                conn.execute(text(SKIP_EMAILS))

    outcome = run_job(engine, settings(), chunk_size=10, on_chunk=deploy)
    assert outcome.status == "failed"
    assert "trigger app_keep_emails" in (outcome.error or "")


def test_outputs_of_these_runs_hold_no_personal_data(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """The failure and incomplete paths log counts, ids and names, never a value."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY, type="email") for i in range(1, 4)])
    with engine.begin() as conn:
        conn.execute(text(SKIP_EMAILS))
    config = write_config(tmp_path / "r.toml", config_text())
    failed = run_script(url_string, config, "run", "--yes")
    assert failed.returncode == 1
    assert MARK not in failed.stdout + failed.stderr
    assert as_json_lines(failed.stderr)
