"""Fault injection: SIGTERM, SIGINT and SIGKILL at every point of a run; the job as PID 1.

Every test runs the installed console script as a real subprocess against a real
PostgreSQL, breaks something at a known point, checks `helpers.assert_consistent()` and has a
following run finish the work (`faults.finish_work()`).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine
from sqlalchemy import text as sql

from tests.faults import (
    SIGNALS,
    assert_interrupted,
    every_fifth_young,
    finish_work,
    first_window,
    in_chunk_update,
    make_config,
    run_id_of,
    slow,
    wait_backend,
    wait_no_backends,
)
from tests.helpers import Job, assert_consistent, remaining_due, run_records, seed_series

# --- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_while_planning_waits_on_a_table_lock(
    probe: Engine, url_string: str, tmp_path: Path, plain_config: Path, signum: int
) -> None:
    """A signal while the plan waits for a locked table cancels the wait: 128+N, no writes."""
    due, _ = seed_series(probe, range(1, 301))
    patient = make_config(tmp_path, clean="lock_timeout_ms = 30000")
    with probe.connect() as holder:
        holder.execute(sql("LOCK TABLE dispatches IN ACCESS EXCLUSIVE MODE"))
        job = Job(url_string, patient, "run", "--yes")
        wait_backend(probe, job, lambda b: b["wait_event_type"] == "Lock")
        signalled = time.monotonic()
        job.send(signum)
        job.finish(40)
        stopped_within = time.monotonic() - signalled
        holder.rollback()
    record = assert_interrupted(job, probe, signum)
    # a wait the signal did not cancel lasts the 30 s lock_timeout; 10 s leaves the exit
    # (the run record's write, the interpreter's end) room on two busy cores
    assert stopped_within < 10, stopped_within
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
    paused = make_config(tmp_path, clean="pause_between_chunks_ms = 30000")
    job = Job(url_string, paused, "run", "--yes", "--chunk-size", "200")
    job.wait_for("chunk_committed", seq=1)
    signalled = time.monotonic()
    job.send(signum)
    job.finish(40)
    stopped_within = time.monotonic() - signalled
    # a pause the signal did not wake lasts 30 s; 10 s leaves the exit (the run record's
    # write, the interpreter's end) room on two busy cores
    assert stopped_within < 10, stopped_within
    assert_stopped_after_chunk_1(job, probe, signum, due, url_string, plain_config)


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_right_after_start_touches_nothing(
    probe: Engine, url_string: str, plain_config: Path, signum: int
) -> None:
    """A signal as soon as the console script's first handlers are in place (it is still
    importing, before any connection): the process ends at once with 128+N, and nothing,
    not even a run record, is written."""
    due, _ = seed_series(probe, range(1, 201))
    job = Job(url_string, plain_config, "run", "--yes")
    wait_for_early_handlers(job.proc.pid)
    job.send(signum)
    rc = job.finish(20)
    assert rc == 128 + signum, job.stderr
    assert job.events("chunk_committed") == []
    assert run_records(probe) == {}
    assert assert_consistent(probe, due) == set()
    finish_work(url_string, probe, due, plain_config)


def wait_for_early_handlers(pid: int, timeout: float = 10) -> None:
    """Until the process catches SIGTERM and SIGINT (entry.py installs both first, before
    its imports; /proc's SigCgt, bit N-1 for signal N). Python catches SIGINT from its own
    start, so SIGTERM's bit is the one that tells; the SIGINT handler follows it at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as status:
            caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt"))
        if caught >> (signal.SIGTERM - 1) & 1:
            time.sleep(0.005)  # the SIGINT handler, the next statement; the imports take longer
            return
        time.sleep(0.001)
    raise AssertionError("the console script never installed its signal handlers")


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
