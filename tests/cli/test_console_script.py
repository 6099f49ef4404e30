"""The installed console script in real subprocesses (its stderr is not a terminal: JSON logs),
signals, and `demo` end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.cli.harness import (
    EXPECTED_PLAN,
    INVALID_CONFIGS,
    PASSWORD,
    UNREACHABLE,
    plan_table,
    seed,
)
from tests.helpers import (
    MARK,
    SCRIPT,
    assert_no_half_cleaned_row,
    config_text,
    invoke,
    json_lines,
    read_until_first_chunk,
    script,
    seed_series,
    snapshot,
    spawn,
    write_config,
)

# --- 3. the console script in a real subprocess ----------------------------------------------


def test_subprocess_dry_run_prints_plan_and_logs_json(
    engine: Engine, secret_url: str, config_file: Path
) -> None:
    """A real dry run: exit 0, plan on stdout, JSON events with one run_id on stderr."""
    seed(engine)
    before = snapshot(engine)
    proc = script("--config", str(config_file), "--database-url", secret_url, "run", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert plan_table(proc.stdout) == EXPECTED_PLAN
    events = json_lines(proc.stderr)
    assert [e["event"] for e in events] == ["run_started", "plan", "run_finished"]
    assert len({e["run_id"] for e in events}) == 1
    assert (True, str(config_file)) == (events[0]["dry_run"], events[0]["config"])
    assert (events[1]["due_rows"], events[2]["status"]) == (4, "planned")
    assert before == snapshot(engine)
    for stream in (proc.stdout, proc.stderr):
        assert MARK not in stream
        assert PASSWORD not in stream


def test_subprocess_run_cleans_and_logs_every_chunk(
    engine: Engine, secret_url: str, config_file: Path
) -> None:
    """A real run: exit 0, result on stdout, run_started/plan/chunk_committed/run_finished."""
    due = seed(engine)
    before = snapshot(engine)
    proc = script(
        "--config", str(config_file), "--database-url", secret_url, "run", "--chunk-size", "2"
    )
    assert proc.returncode == 0, proc.stderr
    assert ": succeeded" in proc.stdout
    events = json_lines(proc.stderr)
    names = [e["event"] for e in events]
    assert names[:2] == ["run_started", "plan"]
    assert names[-2:] == ["recount", "run_finished"]  # the end count decides the status
    assert {"chunk_committed"} == set(names[2:-2])
    assert len({e["run_id"] for e in events}) == 1
    assert f"Run {events[0]['run_id']}: succeeded" in proc.stdout
    chunks = [e for e in events if e["event"] == "chunk_committed"]
    assert 4 == sum(c["rows"] for c in chunks) == events[-1]["rows_cleaned"]
    assert (events[-1]["remaining_due_rows"], events[-1]["status"]) == (0, "succeeded")
    assert due == assert_no_half_cleaned_row(snapshot(engine), before=before)
    for stream in (proc.stdout, proc.stderr):
        assert MARK not in stream
        assert PASSWORD not in stream


@pytest.mark.parametrize(
    ("text", "key"), [p for p in INVALID_CONFIGS if p.id in ("unknown-key", "not-toml")]
)
def test_subprocess_invalid_config_exits_2_naming_file_and_key(
    tmp_path: Path, text: str, key: str
) -> None:
    """An invalid config: exit 2 before connecting; stderr names file and key, no traceback."""
    cfg = write_config(tmp_path / "broken.toml", text)
    proc = script("--config", str(cfg), "--database-url", UNREACHABLE, "run", "--yes")
    assert proc.returncode == 2, proc.stderr
    assert f"Error: invalid configuration: {cfg}: " in proc.stderr
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout
    assert proc.stdout == ""


def test_subprocess_malformed_url_shows_no_traceback_and_no_password(config_file: Path) -> None:
    """`postgresql://user:PASSWORD/db` (host forgotten) exits 2 without echoing the password."""
    url = f"postgresql://postgres:{PASSWORD}/x"
    proc = script("--config", str(config_file), "--database-url", url, "run", "--dry-run")
    assert PASSWORD not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2


# --- 4. signals ------------------------------------------------------------------------------

BACKLOG = 10_000


@pytest.mark.parametrize(
    ("signum", "code"),
    [
        pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
        pytest.param(signal.SIGINT, 130, id="SIGINT"),
    ],
)
def test_signal_stops_after_the_chunk_in_progress(
    engine: Engine,
    upgraded: str,
    tmp_path: Path,
    signum: signal.Signals,
    code: int,
) -> None:
    """A signal mid-run: exit 128+n, `run_interrupted`, no half-cleaned row; a rerun finishes."""
    seed_series(engine, range(1, BACKLOG + 1), mixed=True)
    before = snapshot(engine)
    # a short pause between chunks leaves the signal plenty of chunks to interrupt
    slow = write_config(tmp_path / "slow.toml", config_text(clean="pause_between_chunks_ms = 5"))
    args = ["--config", str(slow), "--database-url", upgraded]
    proc = spawn(*args, "run", "--chunk-size", "50", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = read_until_first_chunk(proc)
        proc.send_signal(signum)
        stdout, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    events = seen + json_lines(rest)
    assert code == proc.returncode, (seen, rest)
    last = events[-1]
    assert ("run_interrupted", int(signum), "interrupted") == (
        last["event"],
        last["signal"],
        last["status"],
    )
    assert len({e["run_id"] for e in events}) == 1
    assert f"Run {last['run_id']}: interrupted" in stdout
    cleaned = assert_no_half_cleaned_row(snapshot(engine), before=before)
    chunk_rows = sum(e["rows"] for e in events if e["event"] == "chunk_committed")
    assert len(cleaned) == chunk_rows == last["rows_cleaned"]
    assert 0 < len(cleaned) < BACKLOG, "the signal arrived after the run had finished"
    # a stopped run does not linger to count: what is left is not claimed (never planned
    # minus cleaned)
    assert last["remaining_due_rows"] is None
    assert MARK not in stdout + rest
    shown = invoke(*args, "audit", "show", last["run_id"], "--format", "json")
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert ("interrupted", len(cleaned)) == (record["status"], record["rows_cleaned"])

    finish = script(*args, "run", "--chunk-size", "5000")
    assert finish.returncode == 0, finish.stderr
    done = json_lines(finish.stderr)[-1]
    assert (done["event"], done["remaining_due_rows"]) == ("run_finished", 0)
    assert len(assert_no_half_cleaned_row(snapshot(engine), before=before)) == BACKLOG


@pytest.mark.db  # the demo starts an embedded PostgreSQL of its own
def test_the_demo_runs_end_to_end_with_a_clean_screen() -> None:
    """`demo` (what `make demo` runs) seeds, runs, verifies (the table and the trail's chain)
    and exits 0, and prints no warning or traceback for a newcomer to wonder about
    (pgserver's RuntimeDirWarning included)."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    proc = subprocess.run(
        [str(SCRIPT), "demo", "--rows", "1000"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "== dispatch-retention verify ==" in proc.stdout
    assert "== dispatch-retention audit verify ==" in proc.stdout
    assert "OK: every hash recomputed" in proc.stdout
    for stream in (proc.stdout, proc.stderr):
        assert "Warning" not in stream and "Traceback" not in stream, stream
