"""Fault injection (issue 4): the job is broken on purpose and must stay safe.

Every test runs the installed console script as a real subprocess (no shell in between)
against a real PostgreSQL, breaks something at a known point of the run, then checks the
invariants of `helpers.assert_consistent()`: no dispatch is half cleaned, only due
dispatches are cleaned, and the audit trail accounts for every cleaned row exactly once.
Finally a following normal run must finish the work (`finish_work()`: nothing due is left
and `verify` agrees).

Data are built so that due and not due are never ambiguous: due rows are 500 days old,
young rows 1 day old (`helpers.seed_series`). Slow chunks and slow COMMITs come from test
triggers on the test database (`slow()`), never from sleeps in the job.

The server restart and the COMMIT-that-landed tests run on a throwaway embedded server that
this module starts itself (`pgserver`), never on the shared one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psutil
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine
from sqlalchemy import text as sql
from sqlalchemy.engine import URL

from dispatch_retention import config, db, migrate
from dispatch_retention.cli import cli
from dispatch_retention.config import Target
from dispatch_retention.schema import create_dispatches

from .helpers import (
    AUDIT_SCHEMA,
    DEFAULT_POLICIES,
    Job,
    assert_consistent,
    config_text,
    dispatch,
    insert_rows,
    remaining_due,
    run_records,
    run_script,
    script_env,
    seed_series,
    snapshot,
    write_config,
)
from .oracle import is_due

SIGNALS = [
    pytest.param(signal.SIGTERM, id="SIGTERM"),
    pytest.param(signal.SIGINT, id="SIGINT"),
]
PROBE_APP = "dr-test-probe"  # the tests' own connections: no fault is ever aimed at them
UNREACHABLE = "postgresql://x@127.0.0.1:1/x"  # nothing listens on port 1
DAY = timedelta(days=1)


def every_fifth_young(row_id: int) -> bool:
    return row_id % 5 == 0


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test() -> Iterator[None]:
    yield
    Job.reap()


@pytest.fixture
def probe(database_url: URL) -> Iterator[Engine]:
    """The test's own engine (another application_name than the job's)."""
    engine = create_engine(
        database_url, pool_pre_ping=True, connect_args={"application_name": PROBE_APP}
    )
    yield engine
    engine.dispose()


def make_config(
    directory: Path,
    name: str = "retention.toml",
    *,
    clean: str = "",
    guard: str = "",
    policies: str = DEFAULT_POLICIES,
) -> Path:
    return write_config(directory / name, config_text(clean, guard, policies))


@pytest.fixture
def plain_config(tmp_path: Path) -> Path:
    """The config of a following normal run: defaults and DEFAULT_POLICIES."""
    return make_config(tmp_path, "plain.toml")


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
        rows = conn.execute(sql(BACKENDS), {"app": db.APPLICATION_NAME}).mappings()
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
    # A deferred constraint trigger runs inside COMMIT: sleep there once per transaction.
    """CREATE FUNCTION dr_test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF current_setting('dr_test.slept', true) IS DISTINCT FROM 'yes' THEN
           PERFORM set_config('dr_test.slept', 'yes', true);
           PERFORM pg_sleep((SELECT commit_sleep FROM dr_test_knobs));
         END IF;
         RETURN NULL;
       END $$""",
    """CREATE CONSTRAINT TRIGGER dr_test_slow_commit AFTER UPDATE ON dispatches
       DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION dr_test_slow_commit()""",
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


# --- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_while_planning_waits_on_a_table_lock(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path, signum: int
) -> None:
    """A signal while the plan waits for a locked table cancels the wait: 128+N, no writes."""
    due, _ = seed_series(probe, range(1, 301))
    with probe.connect() as holder:
        holder.execute(sql("LOCK TABLE dispatches IN ACCESS EXCLUSIVE MODE"))
        job = Job(url_string, plain_config, "run", "--yes")
        wait_backend(probe, job, lambda b: b["wait_event_type"] == "Lock")
        signalled = time.monotonic()
        job.send(signum)
        job.finish(20)
        stopped_within = time.monotonic() - signalled
        holder.rollback()
    record = assert_interrupted(job, probe, signum)
    assert stopped_within < 5
    assert (record["planned_at"], record["audited_rows"]) == (None, 0)
    assert assert_consistent(probe, due) == set()
    finish_work(url_string, probe, due, plain_config)


def assert_stopped_after_chunk_1(
    job: Job, probe: Engine, signum: int, due: set[int], url: str, config: Path
) -> None:
    """Interrupted with exactly chunk 1 committed and audited; a normal run then finishes."""
    record = assert_interrupted(job, probe, signum)
    chunk_1 = first_window(probe, run_id_of(job), due)
    assert (record["chunks"], record["audited_rows"]) == (1, len(chunk_1))
    assert 0 < len(chunk_1) < len(due)
    assert assert_consistent(probe, due) == chunk_1
    finish_work(url, probe, due, config)


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_inside_a_chunk_commits_that_chunk_then_stops(
    probe: Engine, url_string: str, plain_config: Path, signum: int
) -> None:
    """A signal during a chunk's UPDATE: that chunk commits whole, then the run stops."""
    due, _ = seed_series(probe, range(1, 2001), young=every_fifth_young)
    slow(probe, chunk=0.5)
    job = Job(url_string, plain_config, "run", "--yes", "--chunk-size", "200")
    wait_backend(probe, job, in_chunk_update)  # chunk 1 (ids 1-200) is in flight
    job.send(signum)
    job.finish(20)
    assert_stopped_after_chunk_1(job, probe, signum, due, url_string, plain_config)


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_between_chunks_stops_at_once(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path, signum: int
) -> None:
    """A signal during the pause between chunks wakes the pause and stops the run."""
    due, _ = seed_series(probe, range(1, 2001), young=every_fifth_young)
    paused = make_config(tmp_path, clean="pause_between_chunks_ms = 3000")
    job = Job(url_string, paused, "run", "--yes", "--chunk-size", "200")
    job.wait_for("chunk_committed", seq=1)
    signalled = time.monotonic()
    job.send(signum)
    job.finish(20)
    assert time.monotonic() - signalled < 2  # not the 3 s pause
    assert_stopped_after_chunk_1(job, probe, signum, due, url_string, plain_config)


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_right_after_start_touches_nothing(
    probe: Engine, url_string: str, plain_config: Path, signum: int
) -> None:
    """A signal 50 ms after the process starts (still importing, before any connection):
    the process ends by that signal, and nothing, not even a run record, is written."""
    due, _ = seed_series(probe, range(1, 201))
    job = Job(url_string, plain_config, "run", "--yes")
    time.sleep(0.05)
    job.send(signum)
    rc = job.finish(20)
    assert rc in (-signum, 128 + signum), job.stderr
    assert job.events("chunk_committed") == []
    assert all(r["status"] == "interrupted" for r in run_records(probe).values())
    assert assert_consistent(probe, due) == set()
    finish_work(url_string, probe, due, plain_config)


@pytest.mark.slow
def test_signals_at_random_moments_never_leave_partial_work(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """SIGTERM and SIGINT at random moments of many runs (planning, chunks, pauses)."""
    seed = int(os.environ.get("FAULT_SEED", "4"))
    rnd = random.Random(seed)
    due, _ = seed_series(probe, range(1, 40_001), young=every_fifth_young)
    paused = make_config(tmp_path, clean="pause_between_chunks_ms = 100")
    for iteration in range(8):
        signum = (signal.SIGTERM, signal.SIGINT)[iteration % 2]
        job = Job(url_string, paused, "run", "--yes", "--chunk-size", "300")
        job.wait_for("run_started")
        delay = rnd.uniform(0, 0.08) if rnd.random() < 0.4 else rnd.uniform(0.08, 1.2)
        time.sleep(delay)
        job.send(signum)
        job.finish(30)
        context = f"FAULT_SEED={seed} iteration {iteration}: {signum!r} {delay:.3f}s in"
        assert_interrupted(job, probe, signum, context)
        assert_consistent(probe, due)
    assert remaining_due(probe, due) > 0  # every run was stopped before the end
    finish_work(url_string, probe, due, plain_config)


def test_sigkill_mid_chunk_rolls_it_back_and_the_next_run_marks_it_abandoned(
    probe: Engine, url_string: str, plain_config: Path
) -> None:
    """SIGKILL during chunk 2: chunk 1 stays, chunk 2 is gone whole, the record is abandoned."""
    due, _ = seed_series(probe, range(1, 2001), young=every_fifth_young)
    slow(probe, chunk=0.5)
    job = Job(url_string, plain_config, "run", "--yes", "--chunk-size", "200")
    job.wait_for("chunk_committed", seq=1)
    wait_backend(probe, job, in_chunk_update)
    job.send(signal.SIGKILL)
    assert job.finish(10) == -signal.SIGKILL
    wait_no_backends(probe)
    run_id = run_id_of(job)
    record = run_records(probe)[run_id]
    chunk_1 = first_window(probe, run_id, due)
    assert (record["status"], record["chunks"]) == ("running", 1)
    assert record["audited_rows"] == len(chunk_1) > 0
    assert assert_consistent(probe, due) == chunk_1

    following = finish_work(url_string, probe, due, plain_config)
    assert following.last("runs_abandoned")["run_ids"] == [run_id]
    assert run_records(probe)[run_id]["status"] == "abandoned"


def test_sigterm_reaches_the_job_as_pid_1(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """As PID 1 of a PID namespace (a container without init), SIGTERM still stops the run."""
    due, _ = seed_series(probe, range(1, 2001), young=every_fifth_young)
    paused = make_config(tmp_path, clean="pause_between_chunks_ms = 3000")
    job = Job(
        url_string,
        paused,
        "run",
        "--yes",
        "--chunk-size",
        "200",
        prefix=["unshare", "--pid", "--fork", "--kill-child"],
    )
    job.wait_for("chunk_committed", seq=1)
    pid_1 = psutil.Process(job.proc.pid).children()[0]
    pid_1.send_signal(signal.SIGTERM)
    job.finish(20)
    assert_interrupted(job, probe, signal.SIGTERM)
    finish_work(url_string, probe, due, plain_config)


def test_sigterm_during_startup_as_pid_1_is_not_lost(
    probe: Engine, url_string: str, plain_config: Path
) -> None:
    """SIGTERM while the job (PID 1 of its namespace) is still importing: it never cleans.

    The first ~30 ms belong to the Python interpreter itself, before any code of ours can
    install a handler (a PID 1 ignores a signal without one); the signal is sent once that
    is over, while the heavy imports (~300 ms) are still running."""
    due, _ = seed_series(probe, range(1, 201))
    job = Job(
        url_string,
        plain_config,
        "run",
        "--yes",
        prefix=["unshare", "--pid", "--fork", "--kill-child"],
    )
    deadline = time.monotonic() + 5
    while not (children := psutil.Process(job.proc.pid).children()):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(0.1)  # past the interpreter's own start-up, inside our imports
    children[0].send_signal(signal.SIGTERM)  # long before run_started
    rc = job.finish(30)
    cleaned = assert_consistent(probe, due)
    assert (rc, cleaned) in ((128 + signal.SIGTERM, set()), (-signal.SIGTERM, set())), (
        f"exit {rc}, {len(cleaned)} rows cleaned after SIGTERM"
    )


# --- pg_terminate_backend --------------------------------------------------------------------


def test_terminated_connection_during_a_chunk_is_retried(
    probe: Engine, url_string: str, plain_config: Path
) -> None:
    """pg_terminate_backend of the chunk's connection mid-UPDATE: rolled back, retried, done."""
    due, _ = seed_series(probe, range(1, 1201), young=every_fifth_young)
    slow(probe, chunk=0.3)
    job = Job(url_string, plain_config, "run", "--yes", "--chunk-size", "200")
    job.wait_for("chunk_committed", seq=1)
    victim = wait_backend(probe, job, lambda b: in_chunk_update(b) and not b["holds_run_lock"])
    assert terminate(probe, victim["pid"])
    slow(probe, chunk=0)  # the retry and the rest at full speed
    assert job.finish(60) == 0, job.stderr
    retry = job.last("chunk_retry")
    assert (retry["seq"], retry["attempt"], retry["reason"]) == (2, 1, "connection lost")
    finished = job.last("run_finished")
    assert (finished["status"], finished["rows_cleaned"]) == ("succeeded", len(due))
    assert run_records(probe)[run_id_of(job)]["audited_rows"] == len(due)
    assert assert_consistent(probe, due) == due
    finish_work(url_string, probe, due, plain_config)


def test_terminated_connection_during_commit_is_checked_then_retried(
    probe: Engine, url_string: str, plain_config: Path
) -> None:
    """pg_terminate_backend while COMMIT runs: the chunk did not land, the audit check says
    so, and the chunk is retried (never counted twice)."""
    due, _ = seed_series(probe, range(1, 601), young=every_fifth_young)
    slow(probe, commit=0.5)
    job = Job(url_string, plain_config, "run", "--yes", "--chunk-size", "200")
    victim = wait_backend(probe, job, in_commit)
    assert terminate(probe, victim["pid"])
    assert job.finish(60) == 0, job.stderr
    retry = job.last("chunk_retry")
    assert (retry["seq"], retry["reason"]) == (1, "connection lost")
    assert retry["error"].startswith("AdminShutdown")
    assert job.events("commit_confirmed") == []
    finished = job.last("run_finished")
    assert (finished["status"], finished["rows_cleaned"]) == ("succeeded", len(due))
    assert run_records(probe)[run_id_of(job)]["audited_rows"] == len(due)
    assert assert_consistent(probe, due) == due
    finish_work(url_string, probe, due, plain_config)


def test_terminating_every_connection_ends_in_success_or_a_clean_failure(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """All the job's connections (its lock's too) terminated again and again mid-run."""
    due, _ = seed_series(probe, range(1, 3001), young=every_fifth_young)
    quick_retry = make_config(
        tmp_path, clean="pause_between_chunks_ms = 100\nretry_max_wait_s = 0.5"
    )
    job = Job(url_string, quick_retry, "run", "--yes", "--chunk-size", "200")
    job.wait_for("chunk_committed", seq=2)
    for _ in range(3):
        for backend in backends(probe):
            terminate(probe, backend["pid"])
        time.sleep(0.3)
    rc = job.finish(60)
    record = run_records(probe)[run_id_of(job)]
    if rc == 0:
        assert record["status"] == "succeeded"
        assert job.last("run_finished")["status"] == "succeeded"
    else:
        assert rc == 1, job.stderr
        assert record["status"] == "failed" and record["error"]
        assert "internal error" not in record["error"]
        assert job.last("run_failed")["error"] == record["error"]
    logged = sum(e["rows"] for e in job.events("chunk_committed"))
    assert record["audited_rows"] == logged
    assert_consistent(probe, due)
    finish_work(url_string, probe, due, plain_config)


def test_a_run_that_lost_its_lock_connection_does_not_run_beside_another(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path
) -> None:
    """After the lock connection of a run is terminated, no second run cleans beside it:
    the second exits 3, or the first stops (failed) instead of working on unlocked."""
    due, _ = seed_series(probe, range(1, 2001), young=every_fifth_young)
    paused = make_config(tmp_path, clean="pause_between_chunks_ms = 400")
    first = Job(url_string, paused, "run", "--yes", "--chunk-size", "200")
    first.wait_for("chunk_committed", seq=1)
    lock = wait_backend(probe, first, lambda b: b["holds_run_lock"])
    assert terminate(probe, lock["pid"])
    second = run_script(url_string, plain_config, "run", "--yes", "--chunk-size", "200")
    first.finish(60)
    assert_consistent(probe, due)
    first_record = run_records(probe)[run_id_of(first)]
    assert second.returncode == 3 or first_record["status"] == "failed", (
        f"second run exit {second.returncode} beside a live first run "
        f"(marked {second.events('runs_abandoned')}), first ended {first_record['status']}"
    )


# --- a throwaway server: a restart, and a COMMIT that landed although the connection broke ----


class Throwaway:
    """An embedded PostgreSQL (pgserver) in a temporary directory, only for this module."""

    def __init__(self, directory: Path) -> None:
        import pgserver

        self.directory = directory
        self.server = pgserver.get_server(directory / "data", cleanup_mode="delete")
        self.socket_dir = self._socket_dir()
        self.databases = itertools.count()

    def _socket_dir(self) -> str:
        from sqlalchemy.engine import make_url

        host = make_url(self.server.get_uri()).query["host"]
        return host if isinstance(host, str) else host[0]

    def url(self, database: str) -> URL:
        return db.parse_url(self.server.get_uri(database))

    def pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        self.pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        log = str(self.server.log)
        self.pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", log, "start")

    def admin(self) -> Engine:
        return create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT", pool_pre_ping=True)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        self.server.cleanup()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def throwaway() -> Iterator[Throwaway]:
    server = Throwaway(Path(tempfile.mkdtemp(prefix="dr-throwaway-")))
    yield server
    server.close()


@pytest.fixture
def throwaway_db(throwaway: Throwaway) -> Iterator[tuple[str, Engine]]:
    """A database on the throwaway server with the dispatches table and the audit schema."""
    name = f"dr_fault_{next(throwaway.databases)}"
    admin = throwaway.admin()
    with admin.connect() as conn:
        conn.execute(sql(f'CREATE DATABASE "{name}"'))
    url = throwaway.url(name)
    engine = create_engine(url, pool_pre_ping=True, connect_args={"application_name": PROBE_APP})
    with engine.begin() as conn:
        create_dispatches(conn, Target())
    migrate.upgrade(engine, AUDIT_SCHEMA)
    yield url.set(drivername="postgresql").render_as_string(hide_password=False), engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_server_restart_mid_run_is_retried(
    throwaway: Throwaway, throwaway_db: tuple[str, Engine], tmp_path: Path, plain_config: Path
) -> None:
    """The server stops (fast) and comes back 1.5 s later mid-run: the run retries the chunk
    with backoff and finishes, or fails cleanly; nothing partial either way."""
    url, engine = throwaway_db
    due, _ = seed_series(engine, range(1, 3001), young=every_fifth_young)
    patient = make_config(
        tmp_path, clean="pause_between_chunks_ms = 200\nmax_retries = 8\nretry_max_wait_s = 1"
    )
    job = Job(url, patient, "run", "--yes", "--chunk-size", "200")
    job.wait_for("chunk_committed", seq=2)
    engine.dispose()
    throwaway.stop()
    time.sleep(1.5)
    throwaway.start()
    rc = job.finish(90)
    # The restart is noticed either by the next chunk or, first, by the check that the run
    # lock (a session lock on its own connection) is still held: both retry with backoff.
    retries = job.events("chunk_retry") + job.events("lock_retry")
    assert retries, f"the run did not notice the restart:\n{job.stderr}"
    assert {r["reason"] for r in job.events("chunk_retry")} <= {"connection lost"}
    record = run_records(engine)[run_id_of(job)]
    if rc == 0:
        assert record["status"] == "succeeded"
        assert remaining_due(engine, due) == 0
    else:
        assert rc == 1, job.stderr
        assert record["status"] == "failed" and "connection lost" in record["error"]
    assert record["audited_rows"] == sum(e["rows"] for e in job.events("chunk_committed"))
    assert_consistent(engine, due)
    finish_work(url, engine, due, plain_config)


# The first chunk's COMMIT waits for a synchronous standby that never comes (it has already
# committed locally): terminating the backend then breaks the connection after the COMMIT
# landed, the one case where replaying the chunk blindly would count it twice.
SYNC_REP_ONCE = [
    "CREATE TABLE dr_test_sync_rep_once (done boolean)",
    """CREATE FUNCTION dr_test_sync_rep_once() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF NOT EXISTS (SELECT FROM dr_test_sync_rep_once) THEN
           INSERT INTO dr_test_sync_rep_once VALUES (true);
           PERFORM set_config('synchronous_commit', 'on', true);
         END IF;
         RETURN NULL;
       END $$""",
    """CREATE TRIGGER dr_test_sync_rep_once AFTER UPDATE ON dispatches
       FOR EACH STATEMENT EXECUTE FUNCTION dr_test_sync_rep_once()""",
]


def test_commit_that_landed_although_the_connection_broke_is_confirmed_not_replayed(
    throwaway: Throwaway, throwaway_db: tuple[str, Engine], plain_config: Path
) -> None:
    """The connection breaks after chunk 1's COMMIT landed: the job finds the chunk's audit
    record, counts the chunk once and goes on; audit and log agree."""
    url, engine = throwaway_db
    due, _ = seed_series(engine, range(1, 601), young=every_fifth_young)
    with engine.begin() as conn:
        for statement in SYNC_REP_ONCE:
            conn.execute(sql(statement))
        name = conn.execute(sql("SELECT current_database()")).scalar_one()
        conn.execute(sql(f'ALTER DATABASE "{name}" SET synchronous_commit = local'))
    admin = throwaway.admin()
    with admin.connect() as conn:
        conn.execute(sql("ALTER SYSTEM SET synchronous_standby_names = 'dr_test_nobody'"))
        conn.execute(sql("SELECT pg_reload_conf()"))
    try:
        job = Job(url, plain_config, "run", "--yes", "--chunk-size", "200")
        victim = wait_backend(engine, job, lambda b: b["wait_event"] == "SyncRep")
        assert terminate(engine, victim["pid"])
        rc = job.finish(60)
    finally:
        with admin.connect() as conn:
            conn.execute(sql("ALTER SYSTEM RESET synchronous_standby_names"))
            conn.execute(sql("SELECT pg_reload_conf()"))
        admin.dispose()
    assert rc == 0, job.stderr
    assert job.last("commit_confirmed")["seq"] == 1
    assert [e["seq"] for e in job.events("chunk_committed")] == [1, 2, 3]
    finished = job.last("run_finished")
    assert (finished["status"], finished["rows_cleaned"]) == ("succeeded", len(due))
    assert run_records(engine)[run_id_of(job)]["audited_rows"] == len(due)
    assert assert_consistent(engine, due) == due
    finish_work(url, engine, due, plain_config)


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
        holder.execute(sql("LOCK TABLE dispatches IN ACCESS EXCLUSIVE MODE"))
        job = run_script(url_string, impatient, "run", "--yes", timeout=20)
        holder.rollback()
    assert job.returncode == 1, job.stderr
    record = run_records(probe)[run_id_of(job)]
    assert record["status"] == "failed"
    assert "lock timeout" in record["error"]
    assert "lock timeout" in job.last("run_failed")["error"]
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
    """statement_timeout_ms = 1: every chunk is cancelled and rolled back, the window
    shrinks, retries run out, and the run fails with the statement timeout as the reason."""
    due, _ = seed_series(probe, range(1, 2001), young=every_fifth_young)
    slow(probe, chunk=0.01)  # so that even a shrunken window outlasts 1 ms
    tiny = make_config(tmp_path, clean="statement_timeout_ms = 1\n" + IMPATIENT)
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
    ("guard", "args"),
    [
        pytest.param("", ("--max-rows", "1000"), id="max-rows-option"),
        pytest.param("max_rows_per_run = 1000", (), id="guard-max-rows-per-run"),
        pytest.param("max_rows_per_run = 5000", ("--max-rows", "1000"), id="smaller-wins"),
    ],
)
def test_row_budget_cleans_exactly_that_many_then_the_next_run_carries_on(
    probe: Engine,
    url_string: str,
    tmp_path: Path,
    plain_config: Path,
    guard: str,
    args: tuple[str, ...],
) -> None:
    """A row budget of 1000 on 3000 due rows: exactly 1000 cleaned, exit 0, incomplete,
    remaining_due_rows 2000 in the log; the next run cleans the other 2000."""
    due, _ = seed_series(probe, range(1, 3751), young=every_fifth_young)
    budget = make_config(tmp_path, guard=guard)
    job = run_script(url_string, budget, "run", "--yes", "--chunk-size", "300", *args)
    assert job.returncode == 0, job.stderr
    finished = job.last("run_finished")
    assert (finished["status"], finished["stopped_by"]) == ("incomplete", "max_rows")
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


# --- bad inputs ------------------------------------------------------------------------------

#: A valid config as data: the base every mutation starts from.
BASE_CONFIG: dict[str, Any] = {
    "target": {"table": "dispatches"},
    "clean": {
        "columns": ["content", "msisdn", "email", "app_token"],
        "replace": {"content": {}},
        "age_from": "created_at",
        "in_flight_grace_days": 30,
        "chunk_size": 5000,
        "lock_timeout_ms": 2000,
        "statement_timeout_ms": 60000,
        "pause_between_chunks_ms": 0,
        "max_retries": 5,
        "retry_max_wait_s": 30.0,
    },
    "guard": {"min_retention_days": 7, "max_rows_per_run": 0, "refuse_above_rows": 0},
    "audit": {"schema": "dispatch_retention"},
    "policy": [
        {"name": "failed-sends", "retention_days": 30, "where": {"transmission_status": "failed"}},
        {"name": "sms", "retention_days": 90, "where": {"type": ["sms", "push"]}},
        {"name": "default", "retention_days": 365},
    ],
}
INJECTIONS = [
    "dispatches; DROP TABLE dispatches; --",
    'x" OR "1"="1',
    "Robert'); DROP TABLE dispatch_retention.runs;--",
    "dispatches\x00",
    "Dispätches",
    "ディスパッチ",
    "public.dispatches",
    "pg_catalog.pg_authid",
    "a.b.c",
    "",
    " ",
    "$1",
    "${DATABASE_URL}",
    "%s%s%s",
    "0dispatches",
    "dispatches--",
    "x" * 64,
]
KNOWN_KEYS = sorted(
    {"table", "schema", "columns", "replace", "where", "name", "retention_days", "policy"}
    | set(BASE_CONFIG["clean"])
    | set(BASE_CONFIG["guard"])
)
TEXT_CHARS = st.characters(exclude_categories=["Cs"])  # any unicode but lone surrogates
SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, -5, 1, 6, 2**31, 2**62 + 1, 2**63 - 1, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(TEXT_CHARS, max_size=20),
    st.sampled_from(INJECTIONS),
    st.datetimes(timezones=st.just(UTC)),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def toml_value(value: Any) -> str:
    """A TOML inline value (the writer knows only what the strategies make)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def toml_document(document: dict[str, Any]) -> str:
    """Tables as [sections], the policies as [[policy]], anything else inline."""
    lines = [
        f"{json.dumps(k)} = {toml_value(v)}"
        for k, v in document.items()
        if not isinstance(v, dict) and not (k == "policy" and _tables(v))
    ]
    for key, value in document.items():
        if isinstance(value, dict):
            lines.append(f"\n[{json.dumps(key)}]")
            lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        elif key == "policy" and _tables(value):
            for entry in value:
                lines.append("\n[[policy]]")
                lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in entry.items())
    return "\n".join(lines) + "\n"


def _tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in a document, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    found: list[tuple[Any, Any]] = []
    for key, value in list(items):
        found.append((node, key))
        if isinstance(value, dict | list):
            found.extend(_slots(value))
    return found


@st.composite
def mutated_configs(draw: st.DrawFn) -> bytes:
    """A config file made wrong (or, by chance, still right) in one to three ways."""
    kind = draw(st.sampled_from(["structure", "structure", "text", "bytes", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"# nothing\n", b"[clean]\n", b"\xef\xbb\xbf"]))
    document = json.loads(json.dumps(BASE_CONFIG))
    for _ in range(draw(st.integers(1, 3))):
        container, key = draw(st.sampled_from(_slots(document)))
        operation = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if operation == "set":
            container[key] = draw(VALUES)
        elif operation == "delete":
            del container[key]
        else:
            tables = [c for c, _k in _slots(document) if isinstance(c, dict)] or [document]
            target = draw(st.sampled_from(tables))
            target[draw(st.sampled_from(KNOWN_KEYS) | st.text(min_size=1, max_size=8))] = draw(
                VALUES
            )
    text = toml_document(document)
    if kind == "text":
        lines = text.splitlines(keepends=True)
        at = draw(st.integers(0, len(text)))
        line = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["truncate", "insert", "duplicate-line", "append"]))
        if how == "truncate":
            text = text[:at]
        elif how == "insert":
            text = text[:at] + draw(st.text(TEXT_CHARS, max_size=10)) + text[at:]
        elif how == "duplicate-line":  # a duplicate key, or a duplicate [table]
            text = "".join([*lines[: line + 1], lines[line], *lines[line + 1 :]])
        else:
            text += draw(st.sampled_from(INJECTIONS))
    return text.encode("utf-8")


def invoke_run(config_path: Path, *args: str) -> Any:
    return CliRunner().invoke(
        cli,
        [
            "--config",
            str(config_path),
            "--database-url",
            UNREACHABLE,
            "--log-format",
            "json",
            "run",
            "--yes",
            *args,
        ],
    )


def assert_no_traceback(result: Any) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    assert "Traceback" not in result.output
    assert "internal_error" not in result.output


@hsettings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=mutated_configs())
@example(raw=b"")
@example(raw=b"\xff\xfe\x00garbage")
@example(raw=config_text().encode() + b"\n[clean]\nchunk_size = 10\n")  # a duplicate table
@example(raw=config_text(clean="chunk_size = 10\nchunk_size = 20").encode())  # duplicate key
@example(raw=config_text(clean="chunk_size = 99999999999999999999999").encode())
@example(raw=config_text(clean="chunk_size = -5").encode())
@example(raw=config_text(guard="min_retention_days = 400").encode())
@example(raw=b'[target]\ntable = "dispatches; DROP TABLE dispatches"\n' + DEFAULT_POLICIES.encode())
@example(raw=b'[audit]\nschema = "x\\"; DROP SCHEMA public; --"\n' + DEFAULT_POLICIES.encode())
@example(raw=config_text().encode())  # valid: tries to connect, exit 1
def test_mutated_config_files_exit_2_without_a_traceback(tmp_path: Path, raw: bytes) -> None:
    """Any mutated config file: exit 2 with a message naming the file, never a traceback;
    a mutation that happens to be valid gets as far as connecting (exit 1)."""
    path = tmp_path / "mutated.toml"
    path.write_bytes(raw)
    try:
        config.load(path)
        valid = True
    except config.ConfigError:
        valid = False
    event("valid config" if valid else "invalid config")
    result = invoke_run(path)
    assert_no_traceback(result)
    if valid:
        assert result.exit_code == 1, result.output
    else:
        assert result.exit_code == 2, result.output
        assert f"invalid configuration: {path}" in result.output


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--shard", "4/4"], id="shard-index-not-below-count"),
        pytest.param(["--shard", "-1/2"], id="shard-negative"),
        pytest.param(["--shard", "x"], id="shard-not-i-of-n"),
        pytest.param(["--shard", "1/0"], id="shard-zero-count"),
        pytest.param(["--shard", "0/2000"], id="shard-too-many"),
        pytest.param(["--shard", ""], id="shard-empty"),
        pytest.param(["--chunk-size", "0"], id="chunk-size-zero"),
        pytest.param(["--chunk-size", "-3"], id="chunk-size-negative"),
        pytest.param(["--chunk-size", "ten"], id="chunk-size-not-a-number"),
        pytest.param(["--chunk-size", "1000001"], id="chunk-size-too-big"),
        pytest.param(["--max-runtime", "-5"], id="max-runtime-negative"),
        pytest.param(["--max-runtime", "0"], id="max-runtime-zero"),
        pytest.param(["--max-runtime", "soon"], id="max-runtime-not-a-number"),
        pytest.param(["--max-rows", "0"], id="max-rows-zero"),
        pytest.param(["--max-rows", "1.5"], id="max-rows-not-an-integer"),
        pytest.param(["--no-such-option"], id="unknown-option"),
    ],
)
def test_malformed_run_arguments_exit_2(tmp_path: Path, args: list[str]) -> None:
    """Malformed `run` arguments: exit 2 before any connection, no traceback."""
    result = invoke_run(make_config(tmp_path), *args)
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output


def test_malformed_shard_from_the_environment_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken JOB_COMPLETION_INDEX / JOB_COMPLETIONS pair is bad usage too (exit 2)."""
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "7")
    monkeypatch.setenv("JOB_COMPLETIONS", "4")
    result = invoke_run(make_config(tmp_path))
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output


# --- the clock -------------------------------------------------------------------------------

# An LD_PRELOAD shim that moves the process's wall clock (clock_gettime(CLOCK_REALTIME),
# gettimeofday, time) by DR_CLOCK_SHIFT_S seconds: what faketime does, built here because
# faketime is not installed. The monotonic clock is left alone.
CLOCK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
static long shift(void) { const char *s = getenv("DR_CLOCK_SHIFT_S"); return s ? atol(s) : 0; }
int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += shift();
    return r;
}
int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    if (tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    return 0;
}
time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}
"""


@pytest.fixture(scope="module")
def clock_shim(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The shim, compiled; None where there is no C compiler (then only TZ shifts run)."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    directory = tmp_path_factory.mktemp("clock-shim")
    (directory / "shim.c").write_text(CLOCK_SHIM)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", "shim.so", "shim.c", "-ldl"],
        cwd=directory,
        check=True,
        capture_output=True,
    )
    return directory / "shim.so"


def near_cutoff_rows(anchor: datetime) -> list[dict[str, Any]]:
    """Rows around the sms (90 d) and default (365 d) cutoffs, minutes to days either side."""
    offsets = [timedelta(minutes=10), timedelta(hours=2), DAY, 4 * DAY, 6 * DAY]
    rows, ids = [], itertools.count(1)
    for kind, days in (("sms", 90), ("email", 365)):
        for offset in offsets:
            for sign in (-1, 1):
                created = anchor - days * DAY + sign * offset
                rows.append(dispatch(next(ids), created, type=kind))
    return rows


def reset(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """The table back to `rows` and an empty audit trail: an identical database again."""
    with engine.begin() as conn:
        conn.execute(sql(f"TRUNCATE dispatches, {AUDIT_SCHEMA}.chunks, {AUDIT_SCHEMA}.runs"))
    insert_rows(engine, rows)


def cleaned_ids(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        found = conn.execute(sql("SELECT id FROM dispatches WHERE cleaned_at IS NOT NULL"))
        return set(found.scalars())


def oracle_ids(rows: list[dict[str, Any]], config_path: Path, planned_at: datetime) -> set[int]:
    settings = config.load(config_path)
    return {r["id"] for r in rows if is_due(r, settings, planned_at)}


def test_shifted_process_clock_or_time_zone_changes_nothing(
    probe: Engine, url_string: str, plain_config: Path, clock_shim: Path | None
) -> None:
    """Identical databases cleaned by a process whose clock runs 5 days ahead or behind, or
    whose local time zone is UTC+14 or UTC-8: the same rows each time, the oracle's rows
    under the database clock's `now`."""
    with probe.connect() as conn:
        rows = near_cutoff_rows(conn.execute(sql("SELECT now()")).scalar_one())
    variants: dict[str, dict[str, str]] = {
        "utc": {"TZ": "UTC"},
        "kiritimati": {"TZ": "Pacific/Kiritimati"},
        "los-angeles": {"TZ": "America/Los_Angeles"},
    }
    if clock_shim is not None:
        for name, seconds in (("clock+5d", 5 * 86400), ("clock-5d", -5 * 86400)):
            variants[name] = {"LD_PRELOAD": str(clock_shim), "DR_CLOCK_SHIFT_S": str(seconds)}
    results: dict[str, set[int]] = {}
    for name, env in variants.items():
        reset(probe, rows)
        job = run_script(url_string, plain_config, "run", "--yes", env=script_env(**env))
        assert job.returncode == 0, f"{name}: {job.stderr}"
        if "DR_CLOCK_SHIFT_S" in env:  # the shim works: the log's own clock is shifted
            logged = datetime.fromisoformat(job.last("run_started")["timestamp"])
            shift = timedelta(seconds=int(env["DR_CLOCK_SHIFT_S"]))
            assert abs(logged - datetime.now(UTC) - shift) < timedelta(minutes=5), name
        planned_at = run_records(probe)[run_id_of(job)]["planned_at"]
        results[name] = cleaned_ids(probe)
        assert results[name] == oracle_ids(rows, plain_config, planned_at), name
    assert len({frozenset(r) for r in results.values()}) == 1, results
    assert 0 < len(results["utc"]) < len(rows)


def last_dst_start(now: datetime) -> datetime:
    """The most recent start of European summer time (last Sunday of March, 01:00 UTC) at
    least a week ago."""
    for year in (now.year, now.year - 1):
        day = datetime(year, 3, 31, 1, tzinfo=UTC)
        day -= timedelta(days=(day.weekday() + 1) % 7)
        if now - day > 8 * DAY:
            return day
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "asked_by",
    [
        pytest.param({"TZ": "Europe/Oslo"}, id="database-setting"),
        pytest.param({"TZ": "Europe/Oslo", "PGTZ": "Europe/Oslo"}, id="PGTZ"),
    ],
)
def test_non_utc_session_time_zone_across_a_dst_change_changes_nothing(
    probe: Engine, database_url: URL, url_string: str, tmp_path: Path, asked_by: dict[str, str]
) -> None:
    """The database (ALTER DATABASE ... SET timezone), the process's TZ and, in the second
    case, libpq's PGTZ ask for Europe/Oslo; the policy's cutoff falls on the other side of
    a DST change than `now`, where Oslo calendar days and 24-hour days differ by an hour:
    the job still cleans exactly the oracle's rows, computed in UTC."""
    oslo = ZoneInfo("Europe/Oslo")
    with probe.connect() as conn:
        now = conn.execute(sql("SELECT now()")).scalar_one()
    dst = last_dst_start(now)
    # A retention whose cutoff lies on the other side of the DST change than `now` does.
    # (Skip a day whose Oslo wall-clock cutoff falls into the skipped hour of the change.)
    base = (now - dst) // DAY
    for days in (base, base - 1, base - 2, base + 1):
        cutoff = now - days * DAY
        calendar_cutoff = (now.astimezone(oslo) - days * DAY).astimezone(UTC)  # wall clock
        if abs(calendar_cutoff - cutoff) == timedelta(hours=1):
            break
    assert abs(calendar_cutoff - cutoff) == timedelta(hours=1)
    policy = f'[[policy]]\nname = "dst"\nretention_days = {days}\n'
    config_path = make_config(tmp_path, "dst.toml", policies=policy)
    minutes = [-120, -61, -59, -45, -30, -15, -1, 1, 15, 30, 45, 59, 61, 120]
    instants = [cutoff + timedelta(minutes=m) for m in minutes]
    instants += [dst + timedelta(minutes=m) for m in minutes]
    rows = [dispatch(i, at) for i, at in enumerate(instants, start=1)]
    insert_rows(probe, rows)
    with probe.begin() as conn:
        conn.execute(
            sql(f"ALTER DATABASE \"{database_url.database}\" SET timezone = 'Europe/Oslo'")
        )
    plain = create_engine(database_url)  # a session that takes the database's setting
    with plain.connect() as conn:
        assert conn.execute(sql("SHOW timezone")).scalar_one() == "Europe/Oslo"
    plain.dispose()

    env = script_env(**asked_by)
    job = run_script(url_string, config_path, "run", "--yes", env=env)
    assert job.returncode == 0, job.stderr
    planned_at = run_records(probe)[run_id_of(job)]["planned_at"]
    expected = oracle_ids(rows, config_path, planned_at)
    assert cleaned_ids(probe) == expected
    between = {
        r["id"]
        for r in rows
        if min(cutoff, calendar_cutoff) <= r["created_at"] < max(cutoff, calendar_cutoff)
    }
    assert between, "no row lies in the hour that calendar-day arithmetic would shift"
    logged_cutoff = datetime.fromisoformat(job.last("plan")["policies"][0]["cutoff"])
    assert logged_cutoff == planned_at - days * DAY  # 24-hour days, not Oslo calendar days
