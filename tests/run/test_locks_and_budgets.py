"""Fault injection: table and row locks, timeouts, guards and row and time budgets."""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy import text as sql

from tests.faults import (
    every_fifth_young,
    finish_work,
    first_window,
    in_chunk_update,
    make_config,
    run_id_of,
    slow,
    wait_backend,
)
from tests.helpers import (
    Job,
    assert_consistent,
    remaining_due,
    run_records,
    run_script,
    seed_series,
    snapshot,
)

# --- locks and timeouts ----------------------------------------------------------------------

IMPATIENT = "lock_timeout_ms = 200\nmax_retries = 2\nretry_max_wait_s = 0.2"


def test_table_locked_before_the_run_fails_it_with_a_lock_timeout(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """ACCESS EXCLUSIVE held by another session from the start: bounded retries, then
    failed / exit 1 with the lock timeout as the reason; nothing cleaned."""
    due, _ = seed_series(probe, range(1, 1001), young=every_fifth_young)
    impatient = make_config(tmp_path, clean=IMPATIENT)
    with probe.connect() as holder:
        holder.execute(sql("SET application_name = 'schema-migration'"))
        holder.execute(sql("LOCK TABLE dispatches IN ACCESS EXCLUSIVE MODE"))
        pid = holder.execute(sql("SELECT pg_backend_pid()")).scalar()
        job = run_script(url_string, impatient, "run", "--yes", timeout=20)
        holder.rollback()
    assert job.returncode == 1, job.stderr
    record = run_records(probe)[run_id_of(job)]
    assert record["status"] == "failed"
    assert "lock timeout" in record["error"]
    assert "lock timeout" in job.last("run_failed")["error"]
    # named as exit 3 names the run lock's holder: pid, role, since; its application (any
    # client's text) in the log only, never in the append-only trail
    said = f"the table is locked by pid {pid} (role postgres, AccessExclusiveLock, since "
    assert said in record["error"] and said in job.last("run_failed")["error"]
    assert "schema-migration" not in record["error"]
    (held,) = job.last("table_locked_by")["holders"]
    assert (held["pid"], held["application_name"]) == (pid, "schema-migration")
    assert assert_consistent(probe, due) == set()
    finish_work(url_string, probe, due, plain_config)


def test_table_locked_mid_run_fails_it_with_a_lock_timeout(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """ACCESS EXCLUSIVE taken between chunks (an ALTER TABLE, say): the next chunk retries
    twice, then the run fails with the lock timeout; chunk 1 stays, nothing partial."""
    due, _ = seed_series(probe, range(1, 1001), young=every_fifth_young)
    impatient = make_config(tmp_path, clean=IMPATIENT + "\npause_between_chunks_ms = 1000")
    with probe.connect() as holder:
        job = Job(url_string, impatient, "run", "--yes", "--chunk-size", "200")
        job.wait_for("chunk_committed", seq=1)
        holder.execute(sql("LOCK TABLE dispatches IN ACCESS EXCLUSIVE MODE"))
        job.finish(20)
        holder.rollback()
    assert job.returncode == 1, job.stderr
    retries = job.events("chunk_retry")
    assert [(r["seq"], r["attempt"]) for r in retries] == [(2, 1), (2, 2)]
    assert all(r["reason"].startswith("lock timeout") for r in retries)
    record = run_records(probe)[run_id_of(job)]
    assert record["status"] == "failed"
    assert "lock timeout" in record["error"]
    assert "lock timeout" in job.last("run_failed")["error"]
    chunk_1 = first_window(probe, run_id_of(job), due)
    assert (record["chunks"], record["audited_rows"]) == (1, len(chunk_1))
    assert 0 < len(chunk_1) < len(due)
    assert assert_consistent(probe, due) == chunk_1
    finish_work(url_string, probe, due, plain_config)


def test_table_lock_queued_behind_a_chunk_never_hangs_the_run(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """ACCESS EXCLUSIVE requested while chunk 2's UPDATE runs, so it is granted the moment
    that chunk ends: whatever the job reads or writes next times out like a chunk would
    (bounded retries, failed, exit 1), it never waits forever."""
    due, _ = seed_series(probe, range(1, 1001), young=lambda i: 200 < i <= 400)
    slow(probe, chunk=0.5)
    impatient = make_config(tmp_path, clean=IMPATIENT)
    job = Job(url_string, impatient, "run", "--yes", "--chunk-size", "200")
    job.wait_for("chunk_committed", seq=1)
    wait_backend(probe, job, in_chunk_update)  # chunk 2
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:  # queued behind chunk 2's UPDATE, granted when its transaction ends
        with probe.connect() as holder:
            holder.execute(sql("LOCK TABLE dispatches IN ACCESS EXCLUSIVE MODE"))
            locked.set()
            release.wait(60)
            holder.rollback()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        rc = job.finish(8)  # a lock timeout of 200 ms and two retries need about 1 s
    finally:
        release.set()
        holder.join()
    assert rc == 1, job.stderr
    assert "lock timeout" in job.last("run_failed")["error"]
    assert run_records(probe)[run_id_of(job)]["status"] == "failed"
    assert_consistent(probe, due)
    finish_work(url_string, probe, due, plain_config)


def test_tiny_statement_timeout_rolls_chunks_back_and_fails_the_run(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """statement_timeout_ms = 50: every chunk is cancelled and rolled back, the window
    shrinks, retries run out, and the run fails with the statement timeout as the reason.
    (The run's own record writes, a trigger appending each to the trail's hash chain, take
    a few milliseconds: they fit in 50, the chunks never do.)"""
    due, _ = seed_series(probe, range(1, 2001), young=every_fifth_young)
    slow(probe, chunk=0.3)  # so that even a shrunken window outlasts 50 ms
    tiny = make_config(tmp_path, clean="statement_timeout_ms = 50\n" + IMPATIENT)
    job = run_script(url_string, tiny, "run", "--yes", "--chunk-size", "1000")
    assert job.returncode == 1, job.stderr
    retries = job.events("chunk_retry")
    assert [r["reason"] for r in retries] == ["statement timeout"] * 2
    record = run_records(probe)[run_id_of(job)]
    assert record["status"] == "failed"
    assert "statement timeout" in record["error"]
    assert "statement timeout" in job.last("run_failed")["error"]
    assert (record["chunks"], record["audited_rows"]) == (0, 0)
    assert assert_consistent(probe, due) == set()
    finish_work(url_string, probe, due, plain_config)


def test_rows_locked_by_another_session_are_skipped_without_waiting(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """Due rows held FOR UPDATE elsewhere are skipped at once (the lock wait is 10 s), they
    are the only due rows left, and the next run cleans them."""
    due, _ = seed_series(probe, range(1, 2001), young=every_fifth_young)
    held = [7, 333, 1001, 1502, 1999]
    patient = make_config(tmp_path, clean="lock_timeout_ms = 10000")
    with probe.connect() as holder:
        holder.execute(
            sql("SELECT id FROM dispatches WHERE id = ANY(:ids) FOR UPDATE"), {"ids": held}
        )
        job = run_script(url_string, patient, "run", "--yes", "--chunk-size", "200")
        holder.rollback()
    assert job.returncode == 0, job.stderr
    planned, finished = job.last("plan"), job.last("run_finished")
    took = datetime.fromisoformat(finished["timestamp"]) - datetime.fromisoformat(
        planned["timestamp"]
    )
    assert took < timedelta(seconds=2), f"the run waited on locked rows ({took})"
    # never `succeeded` while due rows keep their data: incomplete (exit 0), counted, why
    assert (finished["status"], finished["remaining_due_rows"]) == ("incomplete", len(held))
    assert finished["remaining_reason"] == "locked_by_application"
    assert any(e["skipped_locked"] for e in job.events("chunk_committed"))
    assert assert_consistent(probe, due) == due - set(held)
    assert remaining_due(probe, due) == len(held)
    following = finish_work(url_string, probe, due, plain_config)
    assert following.last("run_finished")["rows_cleaned"] == len(held)


# --- guards and budgets ----------------------------------------------------------------------


def test_refuse_above_rows_writes_nothing_and_force_proceeds(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """A plan over guard.refuse_above_rows: exit 4, status refused, not a row changed;
    with --force the same run cleans everything."""
    due, _ = seed_series(probe, range(1, 626), young=every_fifth_young)
    guarded = make_config(tmp_path, guard="refuse_above_rows = 100")
    before = snapshot(probe)
    refused = run_script(url_string, guarded, "run", "--yes")
    assert refused.returncode == 4, refused.stderr
    assert snapshot(probe) == before
    record = run_records(probe)[run_id_of(refused)]
    assert (record["status"], record["chunks"], record["due_rows"]) == ("refused", 0, len(due))
    assert "refuse_above_rows" in record["error"]
    assert refused.last("run_finished")["status"] == "refused"
    assert refused.events("chunk_committed") == []

    forced = run_script(url_string, guarded, "run", "--yes", "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.last("run_finished")["rows_cleaned"] == len(due)
    assert assert_consistent(probe, due) == due
    finish_work(url_string, probe, due, plain_config)


@pytest.mark.parametrize(
    ("guard", "args", "stopped_by"),
    [
        pytest.param("", ("--max-rows", "1000"), "max_rows", id="max-rows-option"),
        pytest.param(
            "max_rows_per_run = 1000", (), "max_rows_per_run", id="guard-max-rows-per-run"
        ),
        pytest.param(
            "max_rows_per_run = 5000", ("--max-rows", "1000"), "max_rows", id="smaller-wins"
        ),
    ],
)
def test_row_budget_cleans_exactly_that_many_then_the_next_run_carries_on(
    probe: Engine,
    url_string: str,
    tmp_path: Path,
    plain_config: Path,
    guard: str,
    args: tuple[str, ...],
    stopped_by: str,
) -> None:
    """A row budget of 1000 on 3000 due rows: exactly 1000 cleaned, exit 0, incomplete,
    remaining_due_rows 2000 in the log, `stopped_by` naming the budget that stopped it
    (--max-rows or guard.max_rows_per_run); the next run cleans the other 2000."""
    due, _ = seed_series(probe, range(1, 3751), young=every_fifth_young)
    budget = make_config(tmp_path, guard=guard)
    job = run_script(url_string, budget, "run", "--yes", "--chunk-size", "300", *args)
    assert job.returncode == 0, job.stderr
    finished = job.last("run_finished")
    assert (finished["status"], finished["stopped_by"]) == ("incomplete", stopped_by)
    assert (finished["rows_cleaned"], finished["remaining_due_rows"]) == (1000, 2000)
    record = run_records(probe)[run_id_of(job)]
    assert (record["status"], record["audited_rows"]) == ("incomplete", 1000)
    assert len(assert_consistent(probe, due)) == 1000
    following = finish_work(url_string, probe, due, plain_config)
    assert following.last("run_finished")["rows_cleaned"] == 2000


def test_runtime_budget_stops_cleanly_and_the_next_run_carries_on(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """--max-runtime 1 with a 300 ms pause between chunks: exit 0, incomplete after about a
    second, the log says what remains; the next run finishes."""
    due, _ = seed_series(probe, range(1, 3001), young=every_fifth_young)
    paused = make_config(tmp_path, clean="pause_between_chunks_ms = 300")
    job = run_script(
        url_string, paused, "run", "--yes", "--chunk-size", "100", "--max-runtime", "1"
    )
    assert job.returncode == 0, job.stderr
    finished = job.last("run_finished")
    assert (finished["status"], finished["stopped_by"]) == ("incomplete", "max_runtime")
    cleaned = assert_consistent(probe, due)
    assert 0 < len(cleaned) < len(due)
    assert finished["rows_cleaned"] == len(cleaned)
    assert finished["remaining_due_rows"] == len(due) - len(cleaned)
    took = datetime.fromisoformat(finished["timestamp"]) - datetime.fromisoformat(
        job.last("run_started")["timestamp"]  # the budget counts from the start, plan included
    )
    assert timedelta(seconds=1) <= took < timedelta(seconds=2.5), took
    assert finished["chunks"] >= 2
    assert run_records(probe)[run_id_of(job)]["status"] == "incomplete"
    finish_work(url_string, probe, due, plain_config)


# --- the runtime budget bounds waiting too ---------------------------------------------------

#: docs/operations.md: a run ends within max_runtime + one chunk (+ the final record write);
#: one chunk blocked by a table lock is two lock waits (the range UPDATE, then its
#: SKIP LOCKED redo). The slack covers the interpreter's start and the record writes on two
#: busy cores. The bounds stay safe with it: what they catch, a run that sits out the shipped
#: retries' backoff (0.5 + 1 + 2 + 4 + 8 = 15.5 s) instead of its budget, ends at least
#: 15.5 s past the budget, and every bound below is under 10 s.
PATIENT = "lock_timeout_ms = 500"  # the shipped retries: 5, backoff up to 30 s
SLACK_S = 6.0


def test_max_runtime_bounds_a_run_blocked_by_a_table_lock_from_the_start(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """ACCESS EXCLUSIVE held from the start, `--max-runtime 2`, the shipped retries (their
    backoff alone is 15.5 s): planning stops retrying when the budget is spent; failed,
    exit 1, the reason names the lock and the budget; nothing cleaned."""
    due, _ = seed_series(probe, range(1, 501), young=every_fifth_young)
    config = make_config(tmp_path, clean=PATIENT)
    with probe.connect() as holder:
        holder.execute(sql("LOCK TABLE dispatches IN ACCESS EXCLUSIVE MODE"))
        job = run_script(url_string, config, "run", "--yes", "--max-runtime", "2", timeout=40)
        holder.rollback()
    assert job.returncode == 1, job.stderr
    assert job.elapsed is not None and job.elapsed < 2 + 2 * 0.5 + SLACK_S, job.elapsed
    error = job.last("run_failed")["error"]
    assert "lock timeout" in error and "--max-runtime is spent" in error
    assert run_records(probe)[run_id_of(job)]["status"] == "failed"
    assert assert_consistent(probe, due) == set()
    finish_work(url_string, probe, due, plain_config)


def test_max_runtime_bounds_chunk_retries_under_a_table_lock_taken_mid_run(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """EXCLUSIVE (reads pass, writes wait) taken after chunk 1, `--max-runtime 3`: the
    chunk's retries stop when the budget is spent instead of after their backoff; chunk 1
    stays; the run ends within the documented bound."""
    due, _ = seed_series(probe, range(1, 1001), young=every_fifth_young)
    config = make_config(tmp_path, clean=PATIENT + "\npause_between_chunks_ms = 300")
    with probe.connect() as holder:
        job = Job(url_string, config, "run", "--yes", "--chunk-size", "100", "--max-runtime", "3")
        job.wait_for("chunk_committed", seq=1)
        holder.execute(sql("LOCK TABLE dispatches IN EXCLUSIVE MODE"))
        job.finish(40)
        holder.rollback()
    assert job.returncode == 1, job.stderr
    assert job.elapsed is not None and job.elapsed < 3 + 2 * 0.5 + SLACK_S, job.elapsed
    failed = job.last("run_failed")
    assert "--max-runtime is spent" in failed["error"]
    record = run_records(probe)[run_id_of(job)]
    assert record["status"] == "failed"
    assert record["audited_rows"] == len(assert_consistent(probe, due)) > 0
    finish_work(url_string, probe, due, plain_config)


def test_a_lock_on_the_runs_table_cannot_hold_a_run_past_its_budget(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """The run's own audit writes wait no longer than a chunk's: with the runs table locked,
    `--max-runtime 2` fails the run in about that time, naming the record write; no row is
    touched before the run is recorded."""
    due, _ = seed_series(probe, range(1, 201), young=every_fifth_young)
    config = make_config(tmp_path, clean=PATIENT)
    with probe.connect() as holder:
        holder.execute(sql("LOCK TABLE dispatch_retention.runs IN ACCESS EXCLUSIVE MODE"))
        job = run_script(url_string, config, "run", "--yes", "--max-runtime", "2", timeout=40)
        holder.rollback()
    assert job.returncode == 1, job.stderr
    assert job.elapsed is not None and job.elapsed < 2 + 0.5 + SLACK_S, job.elapsed
    error = job.last("run_failed")["error"]
    assert "run record" in error or "dead runs" in error, error
    assert "--max-runtime is spent" in error
    assert assert_consistent(probe, due) == set()
    finish_work(url_string, probe, due, plain_config)


def test_sigterm_while_a_record_write_waits_ends_the_run_at_once(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """No budget, the runs table locked: the record write retries; SIGTERM during its
    backoff ends the run with 143 within a lock wait, not after the retries."""
    due, _ = seed_series(probe, range(1, 201), young=every_fifth_young)
    config = make_config(tmp_path, clean=PATIENT)
    with probe.connect() as holder:
        holder.execute(sql("LOCK TABLE dispatch_retention.runs IN ACCESS EXCLUSIVE MODE"))
        job = Job(url_string, config, "run", "--yes")
        job.wait_for("record_retry", timeout=20)
        signalled = time.monotonic()
        job.send(signal.SIGTERM)
        job.finish(20)
        ended_after = time.monotonic() - signalled
        holder.rollback()
    assert job.returncode == 143, job.stderr
    assert ended_after < 0.5 + SLACK_S, ended_after
    assert assert_consistent(probe, due) == set()
    finish_work(url_string, probe, due, plain_config)
