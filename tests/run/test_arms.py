"""Finding due rows through the policies' arms (`policy.arms`) and their indexes.

The choice between a window by ids and a sparse window through the arms is a pure function
(`Windows.sparse`); the statements' plans are read with EXPLAIN on a real PostgreSQL (with
the policy indexes, no statement scans the table); the sparse path cleans exactly the due
rows; `db check` prints the statements that create the indexes. The arms themselves are
checked against the oracle in test_policy.py and, spread over sparse ids, in
test_cleaner.py's Hypothesis property.
"""

from __future__ import annotations

from itertools import pairwise
from math import floor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from sqlalchemy import Engine
from sqlalchemy import text as sql
from sqlalchemy.dialects import postgresql
from structlog.testing import capture_logs

from dispatch_retention.catalog import indexes
from dispatch_retention.checks import db_check
from dispatch_retention.pg import engines
from dispatch_retention.rule import policy
from dispatch_retention.run import job, planning
from dispatch_retention.run.statements import BLOCK_IDS, Statements
from dispatch_retention.run.windows import Windows
from dispatch_retention.trail.audit_tables import AuditTables
from dispatch_retention.vocabulary import Request, Stop
from tests.helpers import (
    AUDIT_SCHEMA,
    TABLE,
    assert_consistent,
    remaining_due,
    seed_series,
    settings,
)
from tests.strategies import block_maps

# --- Windows.sparse: pure ----------------------------------------------------------------


def test_a_dense_window_goes_by_ids() -> None:
    """Half the ids due (a first backlog): reading the window's rows is the cheap way."""
    windows = Windows(((0, 5_000), (1, 5_000)), arm_rows=10_000)
    assert windows.estimate(0, 2 * BLOCK_IDS) == 10_000
    assert not windows.sparse(0, 2 * BLOCK_IDS)


def test_scattered_rows_go_through_the_arms() -> None:
    """Ten due rows per 10,000 ids: the window reads its due rows, not a million rows."""
    blocks = tuple((b, 10) for b in range(100))
    windows = Windows(blocks, arm_rows=1_000)
    assert windows.estimate(0, 100 * BLOCK_IDS) == 1_000
    assert windows.sparse(0, 100 * BLOCK_IDS)


def test_huge_arms_make_a_sparse_window_go_by_ids() -> None:
    """Reading every arm's index entries for each window costs more than the window itself
    when the arms are huge (a sparse corner of a big backlog)."""
    blocks = tuple((b, 10) for b in range(100))
    assert not Windows(blocks, arm_rows=500_000_000).sparse(0, 100 * BLOCK_IDS)


def test_a_window_inside_one_block_goes_by_ids() -> None:
    """At most 10,000 rows to read: cheaper than any index walk, however few are due."""
    windows = Windows(((0, 1),), arm_rows=1)
    assert not windows.sparse(0, BLOCK_IDS)
    assert Windows(((0, 1), (1, 1)), arm_rows=2).sparse(0, 2 * BLOCK_IDS)


def test_a_block_is_walked_to_its_end_whatever_the_plan_counted() -> None:
    """Pinned small windows inside a block keep walking it after the block's planned rows
    are cleaned (rows that became due since the plan lie there too); only an empty window's
    lookup of the next due row (`resume_at`) or the block's end moves to the next block."""
    windows = Windows(((0, 3), (5, 2)))
    windows.advance(8)
    assert (windows.lo, windows.i) == (8, 0)
    windows.advance(16)
    assert (windows.lo, windows.i) == (16, 0)
    windows.advance(BLOCK_IDS)  # an empty window found no further due row in block 0
    assert (windows.lo, windows.i) == (5 * BLOCK_IDS, 1)
    windows.advance(6 * BLOCK_IDS)
    assert windows.done


@hsettings(max_examples=300, deadline=None)
@given(
    blocks=block_maps(),
    size=st.integers(1, 30_000),
    arm_rows=st.one_of(st.none(), st.integers(0, 3_000_000)),
)
def test_windows_cover_every_due_block_once_and_never_a_gap(
    blocks: tuple[tuple[int, int], ...], size: int, arm_rows: int | None
) -> None:
    """Walking the windows: they follow each other without overlap, cover every due block
    whole, span the ids between two due blocks only when they go through the policies'
    arms (which do not read those ids), and hold `size` due rows by the
    plan's counts (at most; at least unless the due blocks end there; one id at least, so
    the walk always moves on)."""
    windows = Windows(blocks, arm_rows)
    due_ids = {b for b, _ in blocks}
    run_ends = {(b + 1) * BLOCK_IDS for b in due_ids if b + 1 not in due_ids}
    covered: list[tuple[int, int]] = []
    while not windows.done:
        lo, hi = windows.peek(size)
        assert hi > lo
        rows = windows.estimate(lo, hi)
        assert rows <= size + 1 or hi - lo == 1
        if hi not in run_ends:  # full, unless the due blocks end there
            assert rows >= size - 2, (lo, hi, rows)
        spans_gap = any(
            b not in due_ids for b in range(floor(lo / BLOCK_IDS), floor((hi - 1) / BLOCK_IDS))
        )
        assert not spans_gap or windows.sparse(lo, hi), (lo, hi)  # the arms skip the gap
        covered.append((lo, hi))
        windows.advance(hi)
        assert len(covered) < 100_000
    for (_, hi), (lo, _) in pairwise(covered):
        assert lo >= hi  # forward, no overlap
    for b, _ in blocks:  # every id of a due block lies in one window
        start, end = b * BLOCK_IDS, (b + 1) * BLOCK_IDS
        inside = sum(min(hi, end) - max(lo, start) for lo, hi in covered if lo < end and hi > start)
        assert inside == BLOCK_IDS, b


def test_estimate_counts_part_of_a_block_in_proportion() -> None:
    windows = Windows(((2, 1_000),), arm_rows=1_000)
    start = 2 * BLOCK_IDS
    assert windows.estimate(start, start + BLOCK_IDS // 4) == 250
    assert windows.estimate(0, start) == 0


# --- on PostgreSQL -----------------------------------------------------------------------


def explain(conn: Any, statement: Any, **params: Any) -> str:
    compiled = statement.params(**params).compile(
        dialect=postgresql.dialect(), compile_kwargs={"render_postcompile": True}
    )
    values = {k: Jsonb(v) if isinstance(v, dict) else v for k, v in compiled.params.items()}
    lines = conn.exec_driver_sql(f"EXPLAIN {compiled.string}", values).scalars().all()
    return "\n".join(lines)


def without_indexes(engine: Engine, s: Any) -> None:
    """Drop the policy indexes the test template has, and the supporting `due_index()`."""
    names = [ix.name for ix in indexes.policy_indexes(TABLE, s).values()]
    with engine.begin() as conn:
        for name in [*names, "dispatches_retention_due_idx"]:
            conn.execute(sql(f'DROP INDEX IF EXISTS "{name}"'))


def with_indexes(engine: Engine, s: Any) -> None:
    with engine.begin() as conn:
        indexes.create(conn, s)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sql("VACUUM ANALYZE dispatches"))


def plans(engine: Engine, s: Any) -> list[str]:
    """EXPLAIN of the plan and a sparse window's UPDATE, set up as a run sets them up."""
    with engine.begin() as conn:
        planning.read_through_indexes(conn, s)
        r = policy.rules(s, engines.database_now(conn))
        holds = AuditTables(AUDIT_SCHEMA).holds
        stmts = Statements(s, r, holds)
        return [
            explain(conn, st, lo=0, last=10**9)
            for st in (
                stmts.plan_scan(holds),
                stmts.plan_scan(None),
                stmts.indexed_update,
                stmts.swept_indexed,
            )
        ]


def test_plan_and_sparse_chunks_read_the_policy_indexes_not_the_table(engine: Engine) -> None:
    """With the policy indexes, the plan's arms and a sparse window's candidates are index
    ranges (index-only where the visibility map allows): no sequential scan of the table.
    Without them, the plan does scan it (so the check can tell)."""
    s = settings()
    seed_series(engine, range(1, 5_001), young=lambda i: i % 50 != 0)
    names = [ix.name for ix in indexes.policy_indexes(TABLE, s).values()]
    without_indexes(engine, s)
    assert "Seq Scan on dispatches" in plans(engine, s)[0]
    with_indexes(engine, s)
    for plan in plans(engine, s):
        assert "Seq Scan on dispatches" not in plan, plan
        # which index serves which arm is the planner's choice on so small a table
        assert any(name in plan for name in names), plan


def test_the_plan_counts_in_memory_for_its_transaction_only(engine: Engine) -> None:
    """`count_in_memory` raises work_mem for the plan's transaction, never lowers it, and
    it ends with the transaction."""
    with engine.connect() as conn:
        before = conn.execute(sql("SHOW work_mem")).scalar_one()
        conn.rollback()
        with conn.begin():
            engines.count_in_memory(conn)
            assert conn.execute(sql("SHOW work_mem")).scalar_one() == engines.PLAN_WORK_MEM
        assert conn.execute(sql("SHOW work_mem")).scalar_one() == before
        conn.rollback()
        with conn.begin():
            conn.execute(sql("SET LOCAL work_mem = '256MB'"))
            engines.count_in_memory(conn)
            assert conn.execute(sql("SHOW work_mem")).scalar_one() == "256MB"


@pytest.mark.parametrize("indexed", [True, False], ids=["with-indexes", "without"])
def test_sparse_due_rows_are_cleaned_exactly(engine: Engine, indexed: bool) -> None:
    """One due row in 401 among 40,000. With the policy indexes every chunk takes the arms
    (logged as via=arms); without them, windows go by ids. Either way every due row is
    cleaned, nothing else, and the audit trail accounts for each."""
    s = settings()
    due, _young = seed_series(engine, range(1, 40_001), young=lambda i: i % 401 != 0)
    if indexed:
        with_indexes(engine, s)
    else:
        without_indexes(engine, s)
    with capture_logs() as logs:
        outcome = job.run(engine, s, Request(), stop=Stop())
    assert outcome.status == "succeeded", outcome.error
    assert outcome.plan is not None and outcome.plan.through_indexes == indexed
    chunks = [e for e in logs if e["event"] == "chunk_committed"]
    assert chunks and {e["via"] for e in chunks} == {"arms" if indexed else "ids"}
    assert outcome.rows_cleaned == len(due) == 99
    assert remaining_due(engine, due) == 0
    assert_consistent(engine, due)


def test_through_indexes_says_what_the_plan_reads_not_that_the_indexes_exist(
    engine: Engine, database_url: Any
) -> None:
    """The policy indexes exist, but the planner is kept from reading them (index and bitmap
    scans off for the database; a stale visibility map can steer it to an older index and
    a filter instead): the plan says `through_indexes: false` and the run goes by ids,
    still exact."""
    s = settings()
    due, _young = seed_series(engine, range(1, 20_001), young=lambda i: i % 401 != 0)
    with_indexes(engine, s)
    name = database_url.database
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sql(f'ALTER DATABASE "{name}" SET enable_indexscan = off'))
        conn.execute(sql(f'ALTER DATABASE "{name}" SET enable_indexonlyscan = off'))
        conn.execute(sql(f'ALTER DATABASE "{name}" SET enable_bitmapscan = off'))
    engine.dispose()  # new sessions take the database's settings
    try:
        with capture_logs() as logs:
            outcome = job.run(engine, s, Request(), stop=Stop())
    finally:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sql(f'ALTER DATABASE "{name}" RESET ALL'))
        engine.dispose()
    assert outcome.status == "succeeded", outcome.error
    assert outcome.plan is not None and outcome.plan.through_indexes is False
    assert "policy_indexes_missing" in [e["event"] for e in logs]
    assert {e["via"] for e in logs if e["event"] == "chunk_committed"} == {"ids"}
    assert remaining_due(engine, due) == 0


def test_a_plan_reads_through_only_scans_of_the_serving_indexes() -> None:
    serving = indexes.Serving(
        frozenset({"arm_a", "arm_b"}), frozenset({"dispatches"}), False,
        frozenset({"dispatches_created_at_idx", "dispatches_pkey"}),
    )  # fmt: skip
    node = {"Relation Name": "dispatches", "Node Type": "Index Only Scan", "Index Name": "arm_a"}
    bitmap = [
        {"Relation Name": "dispatches", "Node Type": "Bitmap Heap Scan"},
        {"Node Type": "Bitmap Index Scan", "Index Name": "arm_b"},
    ]
    older = {**node, "Index Name": "dispatches_created_at_idx", "Node Type": "Index Scan"}
    holds = {"Relation Name": "legal_holds", "Node Type": "Seq Scan"}
    holds_index = {"Node Type": "Bitmap Index Scan", "Index Name": "legal_holds_pkey"}
    assert planning.reads_through([node, {**node, "Index Name": "arm_b"}, holds], serving)
    assert planning.reads_through([node, *bitmap, holds_index], serving)
    assert not planning.reads_through([node, older], serving)
    assert not planning.reads_through([node, {"Relation Name": "dispatches",
                                              "Node Type": "Seq Scan"}], serving)  # fmt: skip
    assert not planning.reads_through([holds], serving)  # no scan of the table at all
    partitioned = indexes.Serving(frozenset({"arm_a"}), frozenset({"d", "d_2026"}), True)
    part = {"Relation Name": "d_2026", "Node Type": "Index Only Scan", "Index Name": "d_2026_x"}
    assert planning.reads_through([part], partitioned)


@pytest.mark.parametrize("age_from", ["created_at", "delivered_at"])
def test_db_check_prints_each_missing_index_and_is_quiet_once_created(
    engine: Engine, age_from: str
) -> None:
    """Each set of `where` keys gets a finding; a missing index comes with the exact
    CREATE INDEX CONCURRENTLY statement, which creates an index db check then accepts."""
    s = settings(clean=f'age_from = "{age_from}"')
    without_indexes(engine, settings())
    with engine.connect() as conn, conn.begin():
        findings = [f for f in db_check.check(conn, s) if f.check == "index"]
    # the advice names the table as the job resolved it (schema-qualified)
    statements = indexes.statements(
        settings(clean=f'age_from = "{age_from}"', table="public.dispatches")
    )
    assert len(findings) == len(statements) == 3  # failed-sends, sms, default
    for statement, finding in zip(statements.values(), findings, strict=True):
        assert finding.level == "warn" and statement in finding.message
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(sql(statement))
    with engine.connect() as conn, conn.begin():
        levels = [f.level for f in db_check.check(conn, s) if f.check == "index"]
    assert levels == ["ok", "ok", "ok"]
