"""The audit trail: a chunk and its record commit or roll back together; a killed run is
marked abandoned and the next one finishes.
"""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import pytest
from sqlalchemy import Engine, text

from dispatch_retention.run import job
from dispatch_retention.trail import run_record
from dispatch_retention.vocabulary import Hooks, Options, Request, Stop
from tests.helpers import (
    DAY,
    as_json_lines,
    assert_no_half_cleaned_row,
    cleaned_count,
    db_now,
    dispatch,
    insert_rows,
    read_until_first_chunk,
    run_records,
    script,
    seed_series,
    settings,
    snapshot,
    spawn,
)
from tests.trail.harness import (
    BACKLOG,
    SCHEMA,
    assert_chunks_account_for_every_cleaned_row,
    chunk_records,
    every_tenth_young,
    wait_for_lock_release,
)

# --- 1. atomicity ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failing", [pytest.param(1, id="first-chunk"), pytest.param(3, id="third-chunk")]
)
def test_failure_before_commit_leaves_neither_rows_nor_chunk_record(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """A failure after a chunk's UPDATE and audit insert rolls back both; totals stay exact."""
    now = db_now(engine)
    insert_rows(
        engine,
        (
            dispatch(
                i,
                now - (5 * DAY if i % 4 == 0 else 500 * DAY),
                type=("sms", "email", "push")[i % 3],
                transmission_status="failed" if i % 5 == 0 else "transmitted",
            )
            for i in range(1, 41)
        ),
    )
    inserted_in_transaction: list[tuple[int, int]] = []
    original = run_record.RunRecord.record_chunk

    def spy(record: run_record.RunRecord, conn: Any, chunk: Any) -> None:
        original(record, conn, chunk)
        seen = conn.execute(
            text(f"SELECT count(*) FROM {SCHEMA}.chunks WHERE run_id = :r AND seq = :s"),
            {"r": record.run_id, "s": chunk.seq},
        ).scalar_one()
        inserted_in_transaction.append((chunk.seq, seen))

    def fail(seq: int) -> None:
        if seq == failing:
            raise RuntimeError("injected after the UPDATE and the audit insert")

    monkeypatch.setattr(run_record.RunRecord, "record_chunk", spy)
    s = settings()
    before = snapshot(engine)
    outcome = job.run(
        engine, s, Request(Options(chunk_size=5)), stop=Stop(), hooks=Hooks(fail_in_chunk=fail)
    )

    assert outcome.status == "failed"
    assert (failing, 1) in inserted_in_transaction  # the audit row existed inside the chunk
    assert run_records(engine)[outcome.run_id]["status"] == "failed"
    chunks = chunk_records(engine, outcome.run_id)
    assert [c["seq"] for c in chunks] == list(range(1, failing))
    after = snapshot(engine)
    window = range(1 + 5 * (failing - 1), 1 + 5 * failing)  # chunk N's id window
    assert all(after[i] == before[i] for i in window), "the failed chunk's rows changed"
    assert sum(c["rows"] for c in chunks) == cleaned_count(engine) == outcome.rows_cleaned
    assert_chunks_account_for_every_cleaned_row(engine)

    monkeypatch.undo()
    rerun = job.run(engine, s, Request(Options(chunk_size=7)), stop=Stop())
    assert rerun.status == "succeeded"
    for run_id, run in run_records(engine).items():
        assert sum(c["rows"] for c in chunk_records(engine, run_id)) == (
            outcome.rows_cleaned if run_id == outcome.run_id else rerun.rows_cleaned
        ), run["status"]
    assert cleaned_count(engine) == sum(1 for i in before if i % 4) == 30
    assert_chunks_account_for_every_cleaned_row(engine)
    assert_no_half_cleaned_row(snapshot(engine))


# --- 2. a killed run -------------------------------------------------------------------------


def test_sigkilled_run_is_marked_abandoned_and_the_next_run_finishes(
    engine: Engine, base: list[str]
) -> None:
    """SIGKILL mid-run leaves `running`; the next run marks it abandoned and cleans the rest."""
    due, _ = seed_series(engine, range(1, BACKLOG + 1), every_tenth_young, mixed=True)
    proc = spawn(
        *base, "run", "--chunk-size", "10", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        seen = read_until_first_chunk(proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed = seen[0]["run_id"]
    wait_for_lock_release(engine)

    assert run_records(engine)[killed]["status"] == "running"
    committed = sum(c["rows"] for c in chunk_records(engine, killed))
    assert 0 < committed < len(due), "the kill arrived after the run had finished"
    assert cleaned_count(engine) == committed
    assert_no_half_cleaned_row(snapshot(engine))

    nxt = script(*base, "run")
    assert nxt.returncode == 0, nxt.stderr
    logged = as_json_lines(nxt.stderr)
    [abandoned] = [e for e in logged if e["event"] == "runs_abandoned"]
    assert abandoned["run_ids"] == [killed]
    finished = logged[-1]
    assert (finished["event"], finished["remaining_due_rows"]) == ("run_finished", 0)

    shown = script(*base, "audit", "show", killed, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (record["status"], record["rows_cleaned"]) == ("abandoned", committed)
    assert record["finished_at"] is not None and "killed" in record["error"]
    assert run_records(engine)[finished["run_id"]]["status"] == "succeeded"
    assert cleaned_count(engine) == len(due)
    assert_no_half_cleaned_row(snapshot(engine))
    assert_chunks_account_for_every_cleaned_row(engine)
