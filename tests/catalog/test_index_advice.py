"""`db check`'s index advice matches what the plan reads.

An index serves a policy's arm only where the plan can read it alone: the policy's keys and
then the age as its leading columns, partial on exactly `cleaned_at IS NULL`, and every
column the arm's scan reads in it (`indexes.arm_columns`). A production-like `(created_at)
WHERE cleaned_at IS NULL` index (`dispatch_table.due_index`) does not, so `db check` asks for all
three policy indexes; once its advice is followed, EXPLAIN shows the plan's arm scans
reading exactly the advised indexes (index-only), and `db check` asks for nothing more.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg.types.json import Jsonb
from sqlalchemy import Column, Engine
from sqlalchemy import text as sql
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import visitors

from dispatch_retention.catalog import indexes
from dispatch_retention.checks import db_check
from dispatch_retention.checks.db_check import AFTER_BUILDING, Finding
from dispatch_retention.config import Settings
from dispatch_retention.pg import engines
from dispatch_retention.rule import policy
from dispatch_retention.run import planning
from dispatch_retention.run.statements import Statements
from dispatch_retention.trail.audit_tables import AuditTables
from tests.helpers import AUDIT_SCHEMA, TABLE, seed_series, settings

DUE_INDEX = "dispatches_retention_due_idx"  # dispatch_table.due_index(), in the test template
#: the policy indexes of the default settings, in binding order (failed-sends, sms, default)
ADVISED = [
    "dispatches_retention_transmission_status_idx",
    "dispatches_retention_type_idx",
    "dispatches_retention_age_idx",
]
STATEMENT = re.compile(r"(?:DROP|CREATE|ALTER) INDEX [^;]*;")
SCAN = re.compile(
    r"(Index Only Scan|Index Scan|Seq Scan)(?: Backward)? (?:using (\S+) )?on dispatches\b"
    r"|(Bitmap Index Scan) on (dispatches_\S+)"
)
#: where the arms' scans begin in an EXPLAIN of the plan or of a sparse window's UPDATE
ARMS = 'Subquery Scan on "*SELECT* 1"'


def index_findings(engine: Engine, s: Settings | None = None) -> list[Finding]:
    with engine.connect() as conn, conn.begin():
        return [f for f in db_check.check(conn, s or settings()) if f.check == "index"]


def follow(engine: Engine, findings: list[Finding]) -> list[str]:
    """Run every statement the findings advise, one by one, as an operator would."""
    statements = [st for f in findings for st in STATEMENT.findall(f.message)]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.execute(sql(statement))
    return statements


def drop(engine: Engine, *names: str) -> None:
    with engine.begin() as conn:
        for name in names:
            conn.execute(sql(f'DROP INDEX IF EXISTS "{name}"'))


def vacuum_analyze(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sql("VACUUM ANALYZE dispatches"))


def explain(conn: Any, statement: Any, **params: Any) -> str:
    compiled = statement.params(**params).compile(
        dialect=postgresql.dialect(), compile_kwargs={"render_postcompile": True}
    )
    values = {k: Jsonb(v) if isinstance(v, dict) else v for k, v in compiled.params.items()}
    return "\n".join(conn.exec_driver_sql(f"EXPLAIN {compiled.string}", values).scalars())


def arm_scans(engine: Engine, s: Settings, *, force: bool = False) -> list[list[tuple[str, str]]]:
    """The scans of dispatches in the plan's read of the arms (with and without the holds'
    join) and in a sparse window's candidates, set up as a run sets them up (`force`: with
    the job's index-scan settings even where the plan would not take them)."""
    with engine.begin() as conn:
        if not planning.read_through_indexes(conn, s) and force:
            engines.set_local(conn, **engines.INDEX_SCANS)
        r = policy.rules(s, engines.database_now(conn))
        holds = AuditTables(AUDIT_SCHEMA).holds
        stmts = Statements(s, r, holds)
        plans = [
            explain(conn, stmts.plan_scan(holds)),
            explain(conn, stmts.plan_scan(None)),
            explain(conn, stmts.indexed_update, lo=0, last=10**9),
        ]
    return [scans(plan[plan.index(ARMS) :]) for plan in plans]


def scans(plan: str) -> list[tuple[str, str]]:
    """(kind, index) of each scan of dispatches in an EXPLAIN, in order, but for the
    primary key's (a sparse window's UPDATE may fetch its rows by id)."""
    found = []
    for match in SCAN.finditer(plan):
        kind, name, bitmap, bitmap_index = match.groups()
        found.append((kind, name or "") if kind else (bitmap, bitmap_index))
    return [scan for scan in found if scan[1] != "dispatches_pkey"]


@pytest.fixture
def production_like(engine: Engine) -> Engine:
    """The test table as a production table comes: its own indexes (among them the
    `(created_at) WHERE cleaned_at IS NULL` one), none of the job's; 30,000 rows of mixed
    types and statuses, one in twenty due, vacuumed and analysed."""
    drop(engine, *ADVISED)
    seed_series(engine, range(1, 30_001), young=lambda i: i % 20 != 0, mixed=True)
    vacuum_analyze(engine)
    return engine


def test_the_due_index_serves_no_arm_so_all_three_are_advised(production_like: Engine) -> None:
    """`(created_at) WHERE cleaned_at IS NULL` lacks the id and the columns the plan reads:
    `db check` asks for every policy index, the age-only one included, and says why the
    due index does not count."""
    findings = index_findings(production_like)
    assert [f.level for f in findings] == ["warn", "warn", "warn"]
    advised = [re.findall(r"CREATE INDEX CONCURRENTLY (\S+)", f.message) for f in findings]
    assert advised == [[name] for name in ADVISED]
    assert [DUE_INDEX in f.message for f in findings] == [False, False, True]
    # what makes them work: a VACUUM (ANALYZE) after them, by the owner, one at a time
    assert all(f.message.endswith(AFTER_BUILDING) for f in findings)
    assert "VACUUM (ANALYZE)" in AFTER_BUILDING and "one statement at a time" in AFTER_BUILDING
    assert (
        f"public.{DUE_INDEX} finds them but lacks delivery_status, id, member_id, "
        "scheduled_at, transmission_status, type: the plan would read each row from the "
        "table too, so it does not count."
    ) in findings[2].message


def test_after_the_advice_the_arm_scans_read_the_advised_indexes_alone(
    production_like: Engine,
) -> None:
    """With the due index and the two keyed policy indexes only, the age-only arm is read
    through the due index and then the table; after `db check`'s advice is followed, every
    arm scan of the plan and of a sparse window is an index-only scan of the index advised
    for it, and `db check` reports every index present."""
    engine, s = production_like, settings()
    follow(engine, index_findings(engine)[:2])  # what the old judgement asked for
    vacuum_analyze(engine)
    before = arm_scans(engine, s, force=True)[0]
    assert before[:2] == [("Index Only Scan", name) for name in ADVISED[:2]], before
    assert before[2][1] == DUE_INDEX and before[2][0] != "Index Only Scan", before
    assert not indexes_complete(engine, s)

    follow(engine, index_findings(engine))
    vacuum_analyze(engine)
    findings = index_findings(engine)
    assert [f.level for f in findings] == ["ok", "ok", "ok"]
    assert [f.message.split(" read through CREATE INDEX ")[1].split()[0] for f in findings] == (
        ADVISED
    )
    plan_with_holds, plan_without, sparse_window = arm_scans(engine, s)
    expected = [("Index Only Scan", name) for name in ADVISED]
    assert plan_with_holds == expected
    assert plan_without == expected
    assert sparse_window == expected


def indexes_complete(engine: Engine, s: Settings) -> bool:
    with engine.connect() as conn:
        return indexes.complete(conn, s)


AGE_INCLUDE = "INCLUDE (delivery_status, member_id, scheduled_at, transmission_status, type)"


@pytest.mark.parametrize(
    ("definition", "serves"),
    [
        pytest.param(f"(created_at, id) {AGE_INCLUDE} WHERE cleaned_at IS NULL", True, id="job-s"),
        pytest.param(
            "(created_at, id, type, transmission_status, delivery_status, member_id, "
            "scheduled_at) WHERE cleaned_at IS NULL",
            True,
            id="covered-by-key-columns",
        ),
        pytest.param(
            "(created_at) INCLUDE (id, delivery_status, member_id, scheduled_at, "
            "transmission_status, type) WHERE (cleaned_at IS NULL)",
            True,
            id="id-included",
        ),
        pytest.param("(created_at) WHERE cleaned_at IS NULL", False, id="due-index"),
        pytest.param(f"(created_at) {AGE_INCLUDE} WHERE cleaned_at IS NULL", False, id="no-id"),
        pytest.param(
            "(created_at, id) INCLUDE (delivery_status, member_id, scheduled_at, type) "
            "WHERE cleaned_at IS NULL",
            False,
            id="a-status-missing",
        ),
        pytest.param(f"(created_at, id) {AGE_INCLUDE}", False, id="not-partial"),
        pytest.param(
            f"(created_at, id) {AGE_INCLUDE} WHERE cleaned_at IS NULL AND type = 'sms'",
            False,
            id="narrower-predicate",
        ),
        pytest.param(
            f"(created_at, id) {AGE_INCLUDE} WHERE cleaned_at IS NOT NULL",
            False,
            id="other-predicate",
        ),
        pytest.param(
            f"(id, created_at) {AGE_INCLUDE} WHERE cleaned_at IS NULL", False, id="id-first"
        ),
    ],
)
def test_which_index_serves_the_age_only_arm(engine: Engine, definition: str, serves: bool) -> None:
    """An index serves the age-only arm when it leads with the age, is partial on exactly
    `cleaned_at IS NULL` and holds every column the arm reads (key or included)."""
    drop(engine, ADVISED[2], DUE_INDEX)
    with engine.begin() as conn:
        conn.execute(sql(f"CREATE INDEX candidate ON dispatches {definition}"))
    default = index_findings(engine)[2]
    assert default.level == ("ok" if serves else "warn"), default.message
    assert ("read through CREATE INDEX candidate " in default.message) == serves


@pytest.mark.parametrize(
    ("definition", "serves"),
    [
        pytest.param(
            "(type, COALESCE(delivered_at, created_at), id) INCLUDE (created_at, delivered_at, "
            "delivery_status, member_id, scheduled_at, transmission_status) "
            "WHERE cleaned_at IS NULL",
            True,
            id="job-s",
        ),
        pytest.param(
            "(type, COALESCE(delivered_at, created_at), id) INCLUDE (created_at, "
            "delivery_status, member_id, scheduled_at, transmission_status) "
            "WHERE cleaned_at IS NULL",
            False,
            id="age-column-only-in-the-expression",
        ),
        pytest.param(
            "(type, created_at, id) INCLUDE (delivered_at, delivery_status, member_id, "
            "scheduled_at, transmission_status) WHERE cleaned_at IS NULL",
            False,
            id="by-created-at",
        ),
        pytest.param(
            "(COALESCE(delivered_at, created_at), type, id) INCLUDE (created_at, delivered_at, "
            "delivery_status, member_id, scheduled_at, transmission_status) "
            "WHERE cleaned_at IS NULL",
            False,
            id="age-before-the-key",
        ),
    ],
)
def test_which_index_serves_a_keyed_arm_by_another_age(
    engine: Engine, definition: str, serves: bool
) -> None:
    """With `age_from = "delivered_at"` the age is an expression, which an index-only scan
    cannot return: the index must hold both of its columns besides."""
    s = settings(clean='age_from = "delivered_at"')
    drop(engine, *ADVISED, DUE_INDEX)
    with engine.begin() as conn:
        conn.execute(sql(f"CREATE INDEX candidate ON dispatches {definition}"))
    sms = index_findings(engine, s)[1]
    assert sms.level == ("ok" if serves else "warn"), sms.message


def test_an_older_index_under_the_job_s_name_is_dropped_then_rebuilt(engine: Engine) -> None:
    """An index under the job's name that no longer serves (an older shape, or one a failed
    CREATE INDEX CONCURRENTLY left invalid) would make the CREATE fail: the advice drops it
    first, both statements are accepted and `db check` is then satisfied."""
    drop(engine, ADVISED[2])
    with engine.begin() as conn:
        conn.execute(sql(f"CREATE INDEX {ADVISED[2]} ON dispatches (created_at, id)"))
    default = index_findings(engine)[2]
    assert default.level == "warn"
    assert STATEMENT.findall(default.message) == [
        f"DROP INDEX CONCURRENTLY public.{ADVISED[2]};",
        indexes.statements(settings(table="public.dispatches"))[()],
    ]
    follow(engine, [default])
    assert [f.level for f in index_findings(engine)] == ["ok", "ok", "ok"]


def test_arm_columns_are_the_columns_the_arm_scans_read() -> None:
    """`indexes.arm_columns` names exactly the dispatches columns that the plan's read of
    the arms and a sparse window's candidates refer to (`cleaned_at` aside: the indexes'
    predicate implies it)."""
    s = settings(
        policies="""
[[policy]]
name = "push"
retention_days = 10
where = { type = "push", delivery_status = "failed" }

[[policy]]
name = "default"
retention_days = 365
""",
        clean='age_from = "delivered_at"',
    )
    r = policy.rules(s, datetime(2025, 1, 1, tzinfo=UTC))
    holds = AuditTables(AUDIT_SCHEMA).holds
    stmts = Statements(s, r, holds)
    arm_reads = [
        *policy.arms(TABLE, r),
        *((c, policy.arm_past(TABLE, r, c)) for c in r.cutoffs),
        *((c, policy.arm_waiting(TABLE, r, c)) for c in r.cutoffs),
    ]

    def columns(*elements: Any) -> set[str]:
        return {
            e.name
            for element in elements
            for e in visitors.iterate(element)
            if isinstance(e, Column) and e.table.name == "dispatches"
        }

    read = columns(stmts.plan_scan(holds)) - {"cleaned_at"}
    assert read == (columns(*(expr for _, expr in arm_reads)) | {"id", "member_id"}) - {
        "cleaned_at"
    }
    assert read == set(indexes.arm_columns(s))
