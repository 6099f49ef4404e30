"""One run at a time: a run exits 3 while another holds the target's lock."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from sqlalchemy import Engine, text

from dispatch_retention.run.lock import RunLock
from tests.helpers import (
    as_json_lines,
    assert_no_half_cleaned_row,
    cleaned_count,
    config_text,
    run_job,
    run_records,
    script,
    seed_series,
    settings,
    snapshot,
    spawn,
    write_config,
)
from tests.trail.harness import (
    BACKLOG,
    WHOLE_TARGET,
    assert_chunks_account_for_every_cleaned_row,
    chunk_records,
    every_tenth_young,
)

# --- 3. one run at a time --------------------------------------------------------------------


def test_run_exits_3_while_the_lock_is_held_touching_nothing(
    engine: Engine, base: list[str]
) -> None:
    """A run finding the target's lock held exits 3, writes no record, logs the holder."""
    seed_series(engine, range(1, 51), every_tenth_young, mixed=True)
    before = snapshot(engine)
    with RunLock(engine, WHOLE_TARGET) as lock:
        assert lock.acquired
        assert lock.conn is not None
        holder_pid = lock.conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        lock.conn.commit()
        proc = script(*base, "run", "--yes")
    assert proc.returncode == 3, proc.stderr
    logged = as_json_lines(proc.stderr)
    locked = next(e for e in logged if e["event"] == "run_locked")
    [holder] = locked["holder"]
    assert (holder["pid"], holder["application_name"]) == (holder_pid, "dispatch-retention")
    assert logged[-1]["status"] == "locked"
    assert run_records(engine) == {}
    assert chunk_records(engine) == []
    assert snapshot(engine) == before


def test_two_concurrent_runs_one_proceeds_the_other_exits_3(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Two real processes started together: one cleans, the other exits 3 having done nothing."""
    seed_series(engine, range(1, BACKLOG + 1), every_tenth_young, mixed=True)
    # A pause between chunks keeps the winner busy for seconds (a stop signal cuts it short).
    slow = write_config(tmp_path / "slow.toml", config_text(clean="pause_between_chunks_ms = 5"))
    base = ["--config", str(slow), "--database-url", url_string]
    logs = [tmp_path / "a.err", tmp_path / "b.err"]
    procs = []
    for log in logs:
        with log.open("w") as err:
            procs.append(
                spawn(*base, "run", "--chunk-size", "10", stdout=subprocess.DEVNULL, stderr=err)
            )
    try:
        deadline = time.monotonic() + 30
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = 1 - loser
        assert procs[loser].returncode == 3, logs[loser].read_text()
        while "chunk_committed" not in logs[winner].read_text() and time.monotonic() < deadline:
            time.sleep(0.02)  # stop the winner once it has cleaned something
        assert procs[winner].poll() is None, "the other run finished before the race was over"
        procs[winner].send_signal(signal.SIGTERM)
        assert procs[winner].wait(timeout=30) == 143
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    won, lost = as_json_lines(logs[winner].read_text()), as_json_lines(logs[loser].read_text())
    [locked] = [e for e in lost if e["event"] == "run_locked"]
    [holder] = locked["holder"]  # the winner's lock connection, named by pid and application
    assert holder["pid"] > 0 and holder["application_name"] == "dispatch-retention"
    assert "chunk_committed" not in {e["event"] for e in lost}
    runs = run_records(engine)
    assert list(runs) == [won[0]["run_id"]]  # the loser left no record
    assert lost[0]["run_id"] != won[0]["run_id"]
    assert runs[won[0]["run_id"]]["status"] == "interrupted"
    chunk_rows = sum(e["rows"] for e in won if e["event"] == "chunk_committed")
    assert 0 < chunk_rows == cleaned_count(engine)
    assert_chunks_account_for_every_cleaned_row(engine)
    assert_no_half_cleaned_row(snapshot(engine))


#: The advisory locks any session of the database holds.
ADVISORY_LOCKS = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def test_after_a_run_no_pooled_session_holds_the_run_lock(engine: Engine) -> None:
    """A run in-process, on an engine whose pool keeps its connections: once it is done,
    no session holds an advisory lock (the lock's own session ended)."""
    seed_series(engine, range(1, 51), every_tenth_young, mixed=True)
    assert run_job(engine, settings(), chunk_size=10).status.value == "succeeded"
    with engine.connect() as conn:
        assert conn.execute(ADVISORY_LOCKS).scalar_one() == 0


def test_the_run_lock_ends_with_its_session_even_where_the_unlock_fails(engine: Engine) -> None:
    """The lock's connection is invalidated on leaving, not returned to the pool: an unlock
    that did not happen (here: skipped, as when its statement fails) leaves no lock behind
    in a pooled session."""
    with RunLock(engine, WHOLE_TARGET) as lock:
        assert lock.acquired
        lock.held = []  # nothing is unlocked on leaving
    with engine.connect() as conn:
        assert conn.execute(ADVISORY_LOCKS).scalar_one() == 0
