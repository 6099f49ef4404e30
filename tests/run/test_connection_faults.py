"""Fault injection: connections terminated mid-chunk and mid-COMMIT, the run lock's connection
lost, a server restart, and a COMMIT that landed although its connection broke.

The server restart and the COMMIT-that-landed tests run on a throwaway embedded server that
this module starts itself (`pgserver`), never on the shared one.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy import text as sql
from sqlalchemy.engine import URL

from dispatch_retention.config import Target
from dispatch_retention.demo.synthetic import create_dispatches
from dispatch_retention.pg import engines
from dispatch_retention.trail import migrate
from tests.faults import (
    PROBE_APP,
    backends,
    every_fifth_young,
    finish_work,
    in_chunk_update,
    in_commit,
    make_config,
    run_id_of,
    slow,
    terminate,
    wait_backend,
)
from tests.helpers import (
    AUDIT_SCHEMA,
    Job,
    assert_consistent,
    remaining_due,
    run_records,
    run_script,
    seed_series,
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
        return engines.parse_url(self.server.get_uri(database))

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
