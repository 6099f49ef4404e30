"""CONTRACT section 7: `run` never says `succeeded` while a due row keeps its personal data.

Each test sets the table up as a real application would (a trigger, a policy, a view, a
second connection writing while the run cleans, ids at the ends of bigint) and checks that
the run's status and its end count say what the table holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, event, func, select, text
from structlog.testing import capture_logs

from dispatch_retention import job, policy
from dispatch_retention.config import Settings
from dispatch_retention.statements import MAX_ID, MIN_ID
from dispatch_retention.vocabulary import Chunk, Hooks, Options, Outcome, Request, Stop, exit_code

from .helpers import (
    DAY,
    MARK,
    TABLE,
    as_json_lines,
    assert_no_marker,
    config_text,
    db_now,
    dispatch,
    insert_rows,
    run_script,
    settings,
    snapshot,
    write_config,
)
from .oracle import is_due


def run(engine: Engine, s: Settings, **kwargs: Any) -> Outcome:
    on_chunk = kwargs.pop("on_chunk", None)
    return job.run(
        engine, s, Request(Options(**kwargs)), stop=Stop(), hooks=Hooks(on_chunk=on_chunk)
    )


def due_now(engine: Engine, s: Settings, outcome: Outcome) -> int:
    """A fresh count of due rows at the run's own cutoffs (the oracle over the table)."""
    assert outcome.plan is not None
    now = outcome.plan.rules.now
    return sum(1 for row in snapshot(engine).values() if is_due(row, s, now))


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
        outcome = run(engine, settings(), chunk_size=10)
    assert outcome.status == "failed"
    assert outcome.missed_rows > 0
    assert "app_keep_emails" in (outcome.error or "")
    assert "left as they were" in (outcome.error or "")
    missed = [e for e in logs if e["event"] == "rows_not_cleaned"]
    assert missed and missed[0]["missed"] == outcome.missed_rows
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


# --- rows that become due while the run cleans -----------------------------------------------


def unsettled(engine: Engine, ids: range) -> None:
    """SMS, transmitted, delivery pending, 100 days old: past the sms policy's 90 days but
    inside the in-flight grace (not due until delivered)."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 100 * DAY, delivery_status="pending") for i in ids])


def deliver(engine: Engine, ids: range) -> None:
    """A late delivery receipt: the dispatches settle (and so become due)."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE dispatches SET delivery_status = 'delivered' WHERE id = ANY(:ids)"),
            {"ids": list(ids)},
        )


def test_rows_that_become_due_mid_run_are_cleaned_not_passed_over(engine: Engine) -> None:
    """2,000 unsettled rows turn delivered after the first chunk (some ahead of the walk in
    its own block, some behind it, some in blocks the plan never saw): the run cleans them
    all and says `succeeded` with a fresh count of 0, never a planned total."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 1_001)])
    unsettled(engine, range(1_001, 2_001))  # the rest of block 0: ahead of the walk
    unsettled(engine, range(50_001, 51_001))  # a block the plan holds no due row in
    flipped = False

    def receipts(chunk: Chunk) -> None:
        nonlocal flipped
        if not flipped:
            flipped = True
            deliver(engine, range(1_001, 2_001))
            deliver(engine, range(50_001, 51_001))

    with capture_logs() as logs:
        outcome = run(engine, settings(), chunk_size=250, on_chunk=receipts)
    assert flipped
    assert (outcome.status, outcome.remaining_due_rows) == ("succeeded", 0)
    assert outcome.rows_cleaned == 3_000
    assert due_now(engine, settings(), outcome) == 0
    assert any(e["event"] == "catching_up" for e in logs)


def test_rows_that_keep_becoming_due_leave_the_run_incomplete_and_counted(
    engine: Engine,
) -> None:
    """Receipts keep arriving behind the walk, during the catch-up too: the run ends
    `incomplete`, reason became_due_during_run, with the exact count left (not planned
    minus cleaned), and exit code 0."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(100_001, 100_101)])
    unsettled(engine, range(1, 101))  # block 0
    unsettled(engine, range(50_001, 50_101))  # block 5
    # chunks 1-2 walk block 10; receipts for block 5 arrive after chunk 1 (the catch-up
    # walk takes them); those for block 0 after chunk 3, the catch-up's first, in block 5:
    # behind it
    batches = {1: range(50_001, 50_101), 3: range(1, 101)}

    def receipts(chunk: Chunk) -> None:
        if chunk.seq in batches:
            deliver(engine, batches.pop(chunk.seq))

    outcome = run(engine, settings(), chunk_size=60, on_chunk=receipts)
    assert not batches
    assert outcome.status == "incomplete"
    assert outcome.remaining_reason == "became_due_during_run"
    assert outcome.remaining_due_rows == due_now(engine, settings(), outcome) > 0
    assert exit_code(outcome) == 0


def test_a_budget_stop_counts_what_is_left_at_the_end(engine: Engine) -> None:
    """--max-rows: `incomplete`, reason max_rows, and `remaining_due_rows` is a count of the
    table at the run's cutoffs."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 101)])
    outcome = run(engine, settings(), max_rows=30, chunk_size=10)
    assert (outcome.status, outcome.stopped_by, outcome.remaining_reason) == (
        "incomplete",
        "max_rows",
        "max_rows",
    )
    assert outcome.remaining_due_rows == due_now(engine, settings(), outcome) == 70


# --- ids at the ends of bigint ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_due_rows_at_the_bigint_limits_are_cleaned(engine: Engine, chunk_size: int | None) -> None:
    """Due rows at -9223372036854775808 and 9223372036854775807 (and next to them): windows
    clamp at the type's limits instead of failing every run with NumericValueOutOfRange."""
    now = db_now(engine)
    ids = [MIN_ID, MIN_ID + 1, -1, 0, 1, MAX_ID - 1, MAX_ID]
    insert_rows(engine, [dispatch(i, now - 500 * DAY, member_id=7) for i in ids])
    outcome = run(engine, settings(), chunk_size=chunk_size)
    assert (outcome.status, outcome.error) == ("succeeded", None)
    assert outcome.rows_cleaned == len(ids)
    assert all(row["cleaned_at"] is not None for row in snapshot(engine).values())


def test_a_shard_at_the_bigint_limits_cleans_its_rows(engine: Engine) -> None:
    """Shards of the id space reach its ends too."""
    from dispatch_retention.shard import Shard

    now = db_now(engine)
    ids = [MIN_ID, MAX_ID]
    insert_rows(engine, [dispatch(i, now - 500 * DAY, member_id=7) for i in ids])
    cleaned = 0
    for index in range(3):
        outcome = job.run(engine, settings(), Request(shard=Shard(index, 3)), stop=Stop())
        assert outcome.status == "succeeded", outcome.error
        cleaned += outcome.rows_cleaned
    assert cleaned == 2


# --- targets that would hide rows ------------------------------------------------------------


def test_row_level_security_that_hides_rows_is_refused_with_exit_2(
    engine: Engine, run_role: tuple[str, str], tmp_path: Path
) -> None:
    """RLS hiding half the rows from the run role: `run`, `run --dry-run` and `db check`
    exit 2 naming row-level security and BYPASSRLS, touching nothing; with BYPASSRLS the
    run cleans every due row."""
    role, url = run_role
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 21)])
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatches ENABLE ROW LEVEL SECURITY"))
        conn.execute(text(f"CREATE POLICY half ON dispatches TO {role} USING (id % 2 = 0)"))
    config = write_config(tmp_path / "r.toml", config_text())
    for args in (("run", "--yes"), ("run", "--dry-run"), ("db", "check")):
        refused = run_script(url, config, *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert "row-level security" in refused.stderr and "BYPASSRLS" in refused.stderr
    assert all(row["cleaned_at"] is None for row in snapshot(engine).values())
    with engine.begin() as conn:
        conn.execute(text(f"ALTER ROLE {role} BYPASSRLS"))
    done = run_script(url, config, "run", "--yes")
    assert done.returncode == 0, done.stderr
    assert done.last("run_finished")["rows_cleaned"] == 20


def test_a_view_as_the_target_is_refused_and_names_resolve_to_one_target(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """A soft-delete view over the table is refused (exit 2, naming the view); the table
    named with or without its schema is one target in the audit trail."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 11)])
    with engine.begin() as conn:
        conn.execute(
            text("CREATE VIEW live_dispatches AS SELECT * FROM dispatches WHERE id % 2 = 0")
        )
    view = write_config(
        tmp_path / "v.toml",
        config_text().replace("[clean]", '[target]\ntable = "live_dispatches"\n[clean]'),
    )
    for args in (("run", "--yes"), ("run", "--dry-run"), ("verify",), ("db", "check")):
        refused = run_script(url_string, view, *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert "is a view, not a table" in refused.stderr
    plain = write_config(tmp_path / "p.toml", config_text())
    qualified = write_config(
        tmp_path / "q.toml",
        config_text().replace("[clean]", '[target]\ntable = "public.dispatches"\n[clean]'),
    )
    for config in (plain, qualified):
        done = run_script(url_string, config, "run", "--yes")
        assert done.returncode == 0, done.stderr
    with engine.connect() as conn:
        targets = conn.execute(text("SELECT DISTINCT target_table FROM dispatch_retention.runs"))
        assert [t for (t,) in targets] == ["public.dispatches"]


# --- the property: status and end count agree with the table ---------------------------------


@st.composite
def app_rows(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "age": draw(st.sampled_from([10, 100, 200, 500])),
        "delivery_status": draw(st.sampled_from(["delivered", "pending", "failed"])),
        "type": draw(st.sampled_from(["sms", "email", "push"])),
        "block": draw(st.integers(0, 3)),
    }


@hsettings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(app_rows(), min_size=1, max_size=40),
    flips=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 39)), max_size=12),
    chunk_size=st.sampled_from([None, 2, 7]),
)
def test_status_and_remaining_rows_equal_a_fresh_count(
    engine: Engine,
    specs: list[dict[str, Any]],
    flips: list[tuple[int, int]],
    chunk_size: int | None,
) -> None:
    """For generated tables and delivery receipts arriving after chunk N of a run, the run's
    status and `remaining_due_rows` equal a fresh count of due rows at its cutoffs (0 for
    `succeeded`)."""
    with engine.begin() as conn:
        conn.execute(delete(TABLE))
    now = db_now(engine)
    rows = [
        dispatch(
            spec["block"] * 10_000 + i,
            now - spec["age"] * DAY,
            type=spec["type"],
            delivery_status=spec["delivery_status"],
        )
        for i, spec in enumerate(specs, start=1)
    ]
    insert_rows(engine, rows)
    ids = [r["id"] for r in rows]
    pending = {n: [ids[k % len(ids)] for seq, k in flips if seq == n] for n in range(1, 7)}

    def receipts(chunk: Chunk) -> None:
        for n in range(1, chunk.seq + 1):
            if pending.get(n):
                deliver(engine, pending.pop(n))  # type: ignore[arg-type]

    s = settings()
    outcome = run(engine, s, chunk_size=chunk_size, on_chunk=receipts)
    assert outcome.status in ("succeeded", "incomplete"), outcome.error
    fresh = due_now(engine, s, outcome)
    assert outcome.remaining_due_rows == fresh
    assert (outcome.status == "succeeded") == (fresh == 0)
    with engine.connect() as conn:  # the rule in SQL agrees with the oracle
        r = policy.rules(s, outcome.plan.rules.now) if outcome.plan else None
        assert r is not None
        in_sql = conn.execute(select(func.count()).where(policy.due(TABLE, r))).scalar_one()
    assert in_sql == fresh


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
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 11)])
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


def test_written_back_rows_are_verify_anomalies_and_reclean_strips_them(
    engine: Engine, url_string: str, run_role: tuple[str, str], tmp_path: Path
) -> None:
    """A BEFORE trigger writes app_token back for pushes: the run role cannot see it (it
    may not read the columns) and logs write_back_unchecked; `verify` reports them
    (written_back_rows, and violations: exit 5); `run --reclean` as the run role is refused
    (exit 2, it cannot read the columns); with the trigger still there it fails (exit 1);
    once the trigger is gone it strips them again, counted apart (rows_recleaned, chunks of
    kind reclean), and `verify` is OK."""
    now = db_now(engine)
    insert_rows(
        engine,
        [dispatch(i, now - 500 * DAY, type="push" if i % 2 else "sms") for i in range(1, 21)],
    )
    with engine.begin() as conn:
        conn.execute(text(WRITE_BACK))
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
    assert "--reclean" in refused.stderr and "app_token" in refused.stderr

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
    outcome = run(engine, settings())
    assert (outcome.status, outcome.rows_cleaned, outcome.rows_recleaned) == ("succeeded", 0, 0)
    assert snapshot(engine) == before


def test_a_role_that_can_read_the_columns_fails_a_run_whose_rows_are_written_back(
    engine: Engine,
) -> None:
    """Run by a role that may read the personal columns (the owner), a chunk whose cleaned
    rows hold personal data again right after the UPDATE rolls back, and the run fails
    naming the trigger: never `succeeded` while it can see the data."""
    now = db_now(engine)
    insert_rows(
        engine,
        [dispatch(i, now - 500 * DAY, type="push" if i % 2 else "sms") for i in range(1, 21)],
    )
    with engine.begin() as conn:
        conn.execute(text(WRITE_BACK))
    with capture_logs() as logs:
        outcome = run(engine, settings(), chunk_size=5)
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
        outcome = run(engine, s, **kwargs)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return outcome, seen.count("cleaned"), seen.count("locked")


def test_windows_are_swept_only_where_something_can_leave_a_row(engine: Engine) -> None:
    """Without a trigger or rule on UPDATE a plain UPDATE cleans every row it matches: no
    sweep (the end count still decides the status); with one, every chunk sweeps."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 31)])
    plain, windows, swept = sweeps(engine, settings(), chunk_size=10)
    assert (plain.status, plain.rows_cleaned, swept) == ("succeeded", 30, 0)
    assert windows >= plain.chunks >= 3
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(31, 61)])
    with engine.begin() as conn:
        conn.execute(text(COPY_OLD))
    watched, windows, swept = sweeps(engine, settings(), chunk_size=10)
    assert (watched.status, watched.rows_cleaned) == ("succeeded", 30)
    assert swept == windows >= watched.chunks >= 3


def test_a_trigger_created_during_the_run_is_caught_by_the_catch_up_sweep(
    engine: Engine,
) -> None:
    """A trigger that skips e-mails, created after the first chunk (the run saw none when
    it began, so its windows were not swept): the end count finds the rows, the catch-up
    walk sweeps them, and the run fails naming the trigger (never `succeeded`)."""
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

    outcome = run(engine, settings(), chunk_size=10, on_chunk=deploy)
    assert outcome.status == "failed"
    assert "trigger app_keep_emails" in (outcome.error or "")
