"""The fault-injection harness: what tests/run/test_signals.py, test_connection_faults.py,
test_locks_and_budgets.py, test_bad_inputs.py and test_clock.py share (probing the job's
backends, slowing its chunks and COMMITs with test triggers, finishing the work after a
fault). Their fixtures (`probe`, `plain_config`) live in conftest.py.

Data are built so that due and not due are never ambiguous: due rows are 500 days old,
young rows 1 day old (`helpers.seed_series`). Slow chunks and slow COMMITs come from test
triggers on the test database (`slow()`), never from sleeps in the job.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import text as sql

from dispatch_retention.pg import engines
from tests.helpers import (
    AUDIT_SCHEMA,
    DEFAULT_POLICIES,
    Job,
    assert_consistent,
    config_text,
    remaining_due,
    run_records,
    run_script,
    write_config,
)

SIGNALS = [
    pytest.param(signal.SIGTERM, id="SIGTERM"),
    pytest.param(signal.SIGINT, id="SIGINT"),
]
PROBE_APP = "dr-test-probe"  # the tests' own connections: no fault is ever aimed at them
UNREACHABLE = "postgresql://x@127.0.0.1:1/x"  # nothing listens on port 1


def every_fifth_young(row_id: int) -> bool:
    return row_id % 5 == 0


# --- fixtures and helpers --------------------------------------------------------------------


def make_config(
    directory: Path,
    name: str = "retention.toml",
    *,
    clean: str = "",
    guard: str = "",
    policies: str = DEFAULT_POLICIES,
) -> Path:
    return write_config(directory / name, config_text(clean, guard, policies))


def finish_work(url: str, engine: Engine, due: set[int], config_path: Path) -> Job:
    """A following normal run cleans whatever is still due; `verify` then exits 0."""
    slow(engine, chunk=0, commit=0)
    job = run_script(url, config_path, "run", "--yes")
    assert job.returncode == 0, job.stderr
    finished = job.last("run_finished")
    assert (finished["status"], finished["remaining_due_rows"]) == ("succeeded", 0)
    assert assert_consistent(engine, due) == due
    assert remaining_due(engine, due) == 0
    check = run_script(url, config_path, "verify", "--format", "json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["ok"] is True
    return job


def assert_interrupted(job: Job, engine: Engine, signum: int, context: str = "") -> dict[str, Any]:
    """Exit 128+N, an `interrupted` run record and a `run_interrupted` event that agree."""
    assert job.returncode == 128 + signum, f"{context}\n{job.stderr}"
    run_id = job.last("run_started")["run_id"]
    ended = job.last("run_interrupted")
    assert (ended["run_id"], ended["signal"], ended["status"]) == (run_id, signum, "interrupted")
    record = run_records(engine)[run_id]
    assert (record["status"], record["stopped_by"]) == ("interrupted", f"signal {signum}"), context
    logged = sum(e["rows"] for e in job.events("chunk_committed"))
    assert record["audited_rows"] == logged == ended["rows_cleaned"], context
    return record


def run_id_of(job: Job) -> str:
    return str(job.last("run_started")["run_id"])


def first_window(engine: Engine, run_id: str, due: set[int]) -> set[int]:
    """The due ids inside the id window of the run's chunk 1 (from its audit record)."""
    with engine.connect() as conn:
        first_id, last_id = conn.execute(
            sql(
                f"SELECT first_id, last_id FROM {AUDIT_SCHEMA}.chunks WHERE run_id = :r AND seq = 1"
            ),
            {"r": run_id},
        ).one()
    return {i for i in due if first_id <= i <= last_id}


# What the job's connections are doing, seen from pg_stat_activity.
BACKENDS = """
SELECT a.pid, a.state, a.wait_event_type, a.wait_event, a.query,
       EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory'
               AND l.granted) AS holds_run_lock
FROM pg_stat_activity a
WHERE a.application_name = :app AND a.datname = current_database()
"""


def backends(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sql(BACKENDS), {"app": engines.APPLICATION_NAME}).mappings()
        return [dict(r) for r in rows]


def wait_backend(
    engine: Engine, job: Job, want: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    """The first connection of the job that matches `want` (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for backend in backends(engine):
            if want(backend):
                return backend
        if job.proc.poll() is not None:
            raise AssertionError(f"the job ended ({job.proc.returncode}) first:\n{job.stderr}")
        time.sleep(0.005)
    raise AssertionError(f"no matching backend within {timeout}s: {backends(engine)}")


def wait_no_backends(engine: Engine, timeout: float = 20) -> None:
    """Until the server has cleaned up after a dead job (its backends exited)."""
    deadline = time.monotonic() + timeout
    while backends(engine):
        assert time.monotonic() < deadline, f"job backends still there: {backends(engine)}"
        time.sleep(0.05)


def in_chunk_update(backend: dict[str, Any]) -> bool:
    """A chunk's UPDATE running (planning and the audit never update the dispatches)."""
    return backend["state"] == "active" and "UPDATE public.dispatches " in backend["query"]


def in_commit(backend: dict[str, Any]) -> bool:
    """A chunk's COMMIT held up in the slow deferred trigger (no other COMMIT sleeps)."""
    return (
        backend["state"] == "active"
        and backend["query"].strip().upper() == "COMMIT"
        and backend["wait_event"] == "PgSleep"
    )


def terminate(engine: Engine, pid: int) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(sql("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar())


# Test triggers that make a chunk's UPDATE, or its COMMIT, take a while: a fault can then be
# aimed at a chunk in flight. Their delays live in a table so a test can turn them off.
SLOW_TRIGGERS = [
    "CREATE TABLE dr_test_knobs (chunk_sleep float8 NOT NULL, commit_sleep float8 NOT NULL)",
    "INSERT INTO dr_test_knobs VALUES (0, 0)",
    """CREATE FUNCTION dr_test_slow_chunk() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN PERFORM pg_sleep((SELECT chunk_sleep FROM dr_test_knobs)); RETURN NULL; END $$""",
    """CREATE TRIGGER dr_test_slow_chunk BEFORE UPDATE ON dispatches
       FOR EACH STATEMENT EXECUTE FUNCTION dr_test_slow_chunk()""",
    # A deferred constraint trigger runs inside COMMIT: sleep there once per transaction. A
    # chunk that checks for write-back makes deferred triggers fire before its COMMIT (SET
    # CONSTRAINTS ALL IMMEDIATE), so the first defers again, through a queue whose own
    # deferred trigger sleeps inside COMMIT all the same.
    "CREATE TABLE dr_test_commit_queue (at timestamptz)",
    "GRANT SELECT, INSERT ON dr_test_knobs, dr_test_commit_queue TO PUBLIC",
    """CREATE FUNCTION dr_test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF current_setting('dr_test.slept', true) IS DISTINCT FROM 'yes' THEN
           PERFORM set_config('dr_test.slept', 'yes', true);
           SET CONSTRAINTS ALL DEFERRED;
           INSERT INTO dr_test_commit_queue VALUES (now());
         END IF;
         RETURN NULL;
       END $$""",
    """CREATE CONSTRAINT TRIGGER dr_test_slow_commit AFTER UPDATE ON dispatches
       DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION dr_test_slow_commit()""",
    """CREATE FUNCTION dr_test_sleep_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN PERFORM pg_sleep((SELECT commit_sleep FROM dr_test_knobs)); RETURN NULL; END $$""",
    """CREATE CONSTRAINT TRIGGER dr_test_sleep_at_commit AFTER INSERT ON dr_test_commit_queue
       DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION dr_test_sleep_at_commit()""",
]


def slow(engine: Engine, *, chunk: float = 0, commit: float = 0) -> None:
    """Each chunk's UPDATE sleeps `chunk` seconds, and its COMMIT `commit` seconds."""
    with engine.begin() as conn:
        if conn.execute(sql("SELECT to_regclass('dr_test_knobs')")).scalar() is None:
            if not chunk and not commit:
                return
            for statement in SLOW_TRIGGERS:
                conn.execute(sql(statement))
        conn.execute(
            sql("UPDATE dr_test_knobs SET chunk_sleep = :c, commit_sleep = :m"),
            {"c": chunk, "m": commit},
        )
