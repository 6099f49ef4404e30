"""A run ends `succeeded` only when a count at its end, at its own cutoffs, finds no due row:
rows that become due during a run, budgets, ids at the ends of bigint, and the property
that status and `remaining_due_rows` equal a fresh count of the table.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, func, select, text
from structlog.testing import capture_logs

from dispatch_retention.rule import policy
from dispatch_retention.run import job
from dispatch_retention.run.statements import MAX_ID, MIN_ID
from dispatch_retention.vocabulary import Chunk, Request, Stop, exit_code
from tests.helpers import (
    DAY,
    TABLE,
    db_now,
    dispatch,
    due_now,
    insert_rows,
    run_job,
    seed_series,
    settings,
    snapshot,
)
from tests.strategies import app_rows

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
    seed_series(engine, range(1, 1_001))
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
        outcome = run_job(engine, settings(), chunk_size=250, on_chunk=receipts)
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
    seed_series(engine, range(100_001, 100_101))
    unsettled(engine, range(1, 101))  # block 0
    unsettled(engine, range(50_001, 50_101))  # block 5
    # chunks 1-2 walk block 10; receipts for block 5 arrive after chunk 1 (the catch-up
    # walk takes them); those for block 0 after chunk 3, the catch-up's first, in block 5:
    # behind it
    batches = {1: range(50_001, 50_101), 3: range(1, 101)}

    def receipts(chunk: Chunk) -> None:
        if chunk.seq in batches:
            deliver(engine, batches.pop(chunk.seq))

    outcome = run_job(engine, settings(), chunk_size=60, on_chunk=receipts)
    assert not batches
    assert outcome.status == "incomplete"
    assert outcome.remaining_reason == "became_due_during_run"
    assert outcome.remaining_due_rows == due_now(engine, settings(), outcome) > 0
    assert exit_code(outcome) == 0


def test_a_budget_stop_counts_what_is_left_at_the_end(engine: Engine) -> None:
    """--max-rows: `incomplete`, reason max_rows, and `remaining_due_rows` is a count of the
    table at the run's cutoffs."""
    seed_series(engine, range(1, 101))
    outcome = run_job(engine, settings(), max_rows=30, chunk_size=10)
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
    outcome = run_job(engine, settings(), chunk_size=chunk_size)
    assert (outcome.status, outcome.error) == ("succeeded", None)
    assert outcome.rows_cleaned == len(ids)
    assert all(row["cleaned_at"] is not None for row in snapshot(engine).values())


def test_a_shard_at_the_bigint_limits_cleans_its_rows(engine: Engine) -> None:
    """Shards of the id space reach its ends too."""
    from dispatch_retention.rule.shard import Shard

    now = db_now(engine)
    ids = [MIN_ID, MAX_ID]
    insert_rows(engine, [dispatch(i, now - 500 * DAY, member_id=7) for i in ids])
    cleaned = 0
    for index in range(3):
        outcome = job.run(engine, settings(), Request(shard=Shard(index, 3)), stop=Stop())
        assert outcome.status == "succeeded", outcome.error
        cleaned += outcome.rows_cleaned
    assert cleaned == 2


# --- the property: status and end count agree with the table ---------------------------------


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
    outcome = run_job(engine, s, chunk_size=chunk_size, on_chunk=receipts)
    assert outcome.status in ("succeeded", "incomplete"), outcome.error
    fresh = due_now(engine, s, outcome)
    assert outcome.remaining_due_rows == fresh
    assert (outcome.status == "succeeded") == (fresh == 0)
    with engine.connect() as conn:  # the rule in SQL agrees with the oracle
        r = policy.rules(s, outcome.plan.rules.now) if outcome.plan else None
        assert r is not None
        in_sql = conn.execute(select(func.count()).where(policy.due(TABLE, r))).scalar_one()
    assert in_sql == fresh
