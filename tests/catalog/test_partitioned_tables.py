"""`db check` on a partitioned dispatches table (README "Real tables").

The table as a Rails or Django app partitions it: `PARTITION BY RANGE (created_at)`, primary
key `(id, created_at)`, a partition per year for the old rows and per month for this year,
the app's own indexes on the parent. PostgreSQL refuses CREATE INDEX CONCURRENTLY on a
partitioned table, so the advice is the documented three steps (an index ON ONLY the
parent, one built CONCURRENTLY per partition, ATTACH PARTITION each); every statement `db
check` prints is run here on the server, after which `db check` reports the indexes present.
Vacuum is reported per partition, the parent holding no rows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import text as sql
from sqlalchemy.exc import DBAPIError

from dispatch_retention.catalog import indexes
from dispatch_retention.checks import db_check
from dispatch_retention.checks.db_check import Finding
from dispatch_retention.run import job
from dispatch_retention.vocabulary import Request, Stop
from tests.helpers import db_now, remaining_due, seed_series, settings

STATEMENT = re.compile(r"(?:DROP|CREATE|ALTER) INDEX [^;]*;")
POLICY_INDEXES = [
    "dispatches_retention_transmission_status_idx",
    "dispatches_retention_type_idx",
    "dispatches_retention_age_idx",
]


def month(year: int, m: int) -> str:
    return f"{year + (m - 1) // 12}-{(m - 1) % 12 + 1:02d}-01"


def partition(engine: Engine, name: str, lo: str, hi: str, *, attach: bool = False) -> None:
    """A partition of dispatches for [lo, hi): made as PARTITION OF, or (`attach`) made on
    its own, then attached, as a monthly job of the app would."""
    with engine.begin() as conn:
        if attach:
            conn.execute(sql(f"CREATE TABLE {name} (LIKE dispatches INCLUDING DEFAULTS)"))
            conn.execute(
                sql(
                    f"ALTER TABLE dispatches ATTACH PARTITION {name} "
                    f"FOR VALUES FROM ('{lo}') TO ('{hi}')"
                )
            )
        else:
            conn.execute(
                sql(
                    f"CREATE TABLE {name} PARTITION OF dispatches "
                    f"FOR VALUES FROM ('{lo}') TO ('{hi}')"
                )
            )


@pytest.fixture
def partitioned(engine: Engine) -> Iterator[list[str]]:
    """The test database's dispatches table, partitioned by created_at: a partition per
    year for the three years before this one, one per month of this year; the app's own
    indexes (member, msisdn, `(created_at) WHERE cleaned_at IS NULL`), none of the job's.
    Yields the partitions' names."""
    year = db_now(engine).year
    with engine.begin() as conn:
        conn.execute(sql("ALTER TABLE dispatches RENAME TO dispatches_plain"))
        conn.execute(
            sql(
                "CREATE TABLE dispatches (LIKE dispatches_plain INCLUDING DEFAULTS) "
                "PARTITION BY RANGE (created_at)"
            )
        )
        conn.execute(sql("ALTER SEQUENCE dispatches_id_seq OWNED BY dispatches.id"))
        conn.execute(sql("DROP TABLE dispatches_plain"))
        conn.execute(sql("ALTER TABLE dispatches ADD PRIMARY KEY (id, created_at)"))
        conn.execute(sql("CREATE INDEX dispatches_member_id_idx ON dispatches (member_id)"))
        conn.execute(sql("CREATE INDEX dispatches_msisdn_idx ON dispatches (msisdn)"))
        conn.execute(
            sql(
                "CREATE INDEX dispatches_retention_due_idx ON dispatches (created_at) "
                "WHERE cleaned_at IS NULL"
            )
        )
    names = []
    for y in range(year - 3, year):
        names.append(f"dispatches_{y}")
        partition(engine, names[-1], f"{y}-01-01", f"{y + 1}-01-01")
    for m in range(1, 13):
        names.append(f"dispatches_{year}_{m:02d}")
        partition(engine, names[-1], month(year, m), month(year, m + 1))
    yield names


def index_findings(engine: Engine) -> list[Finding]:
    with engine.connect() as conn, conn.begin():
        return [f for f in db_check.check(conn, settings()) if f.check == "index"]


def follow(engine: Engine, statements: list[str]) -> None:
    """Run statements one by one outside a transaction, as an operator pastes them."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.execute(sql(statement))


def advised(finding: Finding) -> list[str]:
    return STATEMENT.findall(finding.message)


def attached(engine: Engine, parent_index: str) -> dict[str, str]:
    """Per table below dispatches: the name of its index attached (at any depth) under
    `parent_index`."""
    with engine.connect() as conn:
        rows = conn.execute(
            sql(
                "SELECT CAST(indrelid AS regclass)::text, CAST(relid AS regclass)::text "
                "FROM pg_partition_tree(CAST(:index AS regclass)) t "
                "JOIN pg_index i ON i.indexrelid = t.relid WHERE t.level > 0"
            ),
            {"index": parent_index},
        ).all()
    return {str(table): str(index) for table, index in rows}


def test_the_advice_is_accepted_by_postgresql_and_then_satisfies_db_check(
    engine: Engine, partitioned: list[str]
) -> None:
    """Per policy index: CREATE INDEX ... ON ONLY the parent, CREATE INDEX CONCURRENTLY per
    partition, ATTACH PARTITION per partition, in that order and nothing else; PostgreSQL
    accepts every one (where CREATE INDEX CONCURRENTLY on the parent is refused), and db
    check then reports the three indexes present, valid on every partition."""
    seed_series(engine, range(1, 3_001), young=lambda i: i % 3 != 0, mixed=True)
    findings = index_findings(engine)
    assert [f.level for f in findings] == ["warn", "warn", "warn"]
    with pytest.raises(DBAPIError, match="cannot create index on partitioned table"):
        follow(engine, [indexes.statements(settings(table="public.dispatches"))[()]])
    for finding, name in zip(findings, POLICY_INDEXES, strict=True):
        statements = advised(finding)
        assert "public.dispatches is partitioned" in finding.message
        assert statements[0].startswith(f"CREATE INDEX {name} ON ONLY public.dispatches (")
        creates = [
            f"CREATE INDEX CONCURRENTLY {p}_{name[len('dispatches_') :]} ON public.{p} "
            for p in partitioned
        ]
        assert [s[: len(c)] for s, c in zip(statements[1:], creates, strict=False)] == creates
        attaches = [
            f"ALTER INDEX public.{name} ATTACH PARTITION public.{p}_{name[len('dispatches_') :]};"
            for p in partitioned
        ]
        assert statements[1 + len(partitioned) :] == attaches
    follow(engine, [s for f in findings for s in advised(f)])
    assert [f.level for f in index_findings(engine)] == ["ok", "ok", "ok"]
    for name in POLICY_INDEXES:
        assert set(attached(engine, name)) == set(partitioned)
    with engine.connect() as conn:
        assert indexes.complete(conn, settings())


def test_a_partition_attached_later_gets_its_index_from_postgresql(
    engine: Engine, partitioned: list[str]
) -> None:
    """Once the indexes exist, a partition made later (PARTITION OF, or made apart and then
    ATTACHed) gets a matching index built and attached by PostgreSQL itself: db check keeps
    reporting the indexes present and lists the new partitions' vacuum."""
    follow(engine, [s for f in index_findings(engine) for s in advised(f)])
    year = db_now(engine).year
    partition(
        engine, f"dispatches_{year + 1}", f"{year + 1}-01-01", f"{year + 2}-01-01", attach=True
    )
    partition(engine, f"dispatches_{year + 2}", f"{year + 2}-01-01", f"{year + 3}-01-01")
    with engine.connect() as conn, conn.begin():
        found = db_check.check(conn, settings())
    assert [f.level for f in found if f.check == "index"] == ["ok", "ok", "ok"]
    later = {f"public.dispatches_{year + 1}", f"public.dispatches_{year + 2}"}
    for name in POLICY_INDEXES:
        assert later <= {f"public.{t}" for t in attached(engine, name)}
    vacuumed = {f.message.split(":")[0] for f in found if f.check == "last vacuum"}
    assert vacuumed == {f"public.{p}" for p in partitioned} | later


def test_the_advice_resumes_where_it_stopped(engine: Engine, partitioned: list[str]) -> None:
    """Stopped half-way (the parent's index made, one partition's built and attached) and
    with a partition attached meanwhile (PostgreSQL built and attached its index): db check
    says how many partitions are done and prints only the steps still missing, which
    complete the index."""
    first = index_findings(engine)[0]
    statements = advised(first)
    n = len(partitioned)
    follow(engine, [statements[0], statements[1], statements[1 + n]])
    year = db_now(engine).year
    partition(
        engine, f"dispatches_{year + 1}", f"{year + 1}-01-01", f"{year + 2}-01-01", attach=True
    )
    resumed = index_findings(engine)[0]
    assert resumed.level == "warn"
    assert f"(2 of {n + 1} partitions have theirs attached already)" in resumed.message
    rest = advised(resumed)
    assert rest == [*statements[2 : 1 + n], *statements[2 + n :]]
    follow(engine, rest)
    assert index_findings(engine)[0].level == "ok"


def test_a_sub_partitioned_table_is_indexed_level_by_level(
    engine: Engine, partitioned: list[str]
) -> None:
    """A partition that is itself partitioned (next year, by month) gets its own index ON
    ONLY, its partitions theirs CONCURRENTLY; the leaves are attached before it is, and
    PostgreSQL accepts it all."""
    year = db_now(engine).year
    with engine.begin() as conn:
        conn.execute(
            sql(
                f"CREATE TABLE dispatches_{year + 1} PARTITION OF dispatches FOR VALUES FROM "
                f"('{year + 1}-01-01') TO ('{year + 2}-01-01') PARTITION BY RANGE (created_at)"
            )
        )
    for m in (1, 2):
        partition_of = f"dispatches_{year + 1}"
        with engine.begin() as conn:
            conn.execute(
                sql(
                    f"CREATE TABLE {partition_of}_{m:02d} PARTITION OF {partition_of} FOR VALUES "
                    f"FROM ('{month(year + 1, m)}') TO ('{month(year + 1, m + 1)}')"
                )
            )
    statements = advised(index_findings(engine)[2])
    sub = f"dispatches_{year + 1}_retention_age_idx"
    assert f"CREATE INDEX {sub} ON ONLY public.dispatches_{year + 1} (" in " ".join(statements)
    attach_sub = f"ALTER INDEX public.dispatches_retention_age_idx ATTACH PARTITION public.{sub};"
    leaf = f"dispatches_{year + 1}_01_retention_age_idx"
    attach_leaf = f"ALTER INDEX public.{sub} ATTACH PARTITION public.{leaf};"
    assert statements.index(attach_leaf) < statements.index(attach_sub)
    follow(engine, [s for f in index_findings(engine) for s in advised(f)])
    assert [f.level for f in index_findings(engine)] == ["ok", "ok", "ok"]


def settle(engine: Engine, query: Any, expected: Any) -> None:
    """Wait (up to 10 s) until `query` answers `expected`: statistics before PostgreSQL 15
    arrive through a collector, up to half a second late."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with engine.connect() as conn:  # a new transaction: a fresh statistics snapshot
            if conn.execute(query).scalar() == expected:
                return
        time.sleep(0.1)


def wait_for_statistics(engine: Engine, live: dict[str, int]) -> None:
    """PostgreSQL before 15 sends table statistics through a collector process, up to half
    a second late and one table at a time: wait until every partition shows its VACUUM and
    its own live tuples (`live`: partition -> rows)."""
    query = sql(
        "SELECT relname, n_live_tup, last_vacuum IS NOT NULL FROM pg_stat_user_tables "
        "WHERE relname = ANY(:names)"
    )
    expected = {name: (rows, True) for name, rows in live.items()}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with engine.connect() as conn:  # a new transaction: a fresh statistics snapshot
            rows = conn.execute(query, {"names": list(live)}).all()
        if {name: (tuples, vacuumed) for name, tuples, vacuumed in rows} == expected:
            return
        time.sleep(0.1)


def test_vacuum_and_tuples_are_reported_per_partition(
    engine: Engine, partitioned: list[str]
) -> None:
    """One `last vacuum` finding per partition, with its own live tuples and last vacuum;
    none for the parent, which holds no rows."""
    seed_series(engine, range(1, 2_001), young=lambda i: i % 2 == 0)
    inserted = sql("SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables")
    settle(engine, inserted, 2_000)  # else a late insert report adds to VACUUM's count
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sql("VACUUM ANALYZE dispatches"))
        counts = dict(
            conn.execute(
                sql("SELECT tableoid::regclass::text, count(*) FROM dispatches GROUP BY 1")
            ).all()
        )
    wait_for_statistics(engine, {p: counts.get(p, 0) for p in partitioned})
    with engine.connect() as conn, conn.begin():
        found = db_check.check(conn, settings())
    [summary] = [f for f in found if f.check == "autovacuum settings"]
    assert summary.message == (
        f"public.dispatches is partitioned: autovacuum visits its {len(partitioned)} leaf "
        "partitions, not it; server defaults on each"
    )
    vacuum = {
        f.message.split(": ", 1)[0]: f.message.split(": ", 1)[1]
        for f in found
        if f.check == "last vacuum"
    }
    assert set(vacuum) == {f"public.{p}" for p in partitioned}
    for name, said in vacuum.items():
        live = counts.get(name.removeprefix("public."), 0)
        assert said.startswith("last vacuum 2") and f"; {live} live, 0 dead tuples" in said, said
    assert sum(counts.values()) == 2_000


def test_a_run_on_a_partitioned_table_goes_through_the_advised_indexes(
    engine: Engine, partitioned: list[str]
) -> None:
    """After the advice is followed (the indexes, then VACUUM (ANALYZE) as it says) a run
    plans through the indexes and cleans exactly the due rows of every partition."""
    due, _young = seed_series(engine, range(1, 3_001), young=lambda i: i % 3 != 0, mixed=True)
    follow(engine, [s for f in index_findings(engine) for s in advised(f)])
    follow(engine, ["VACUUM (ANALYZE) dispatches"])
    outcome = job.run(engine, settings(), Request(), stop=Stop())
    assert outcome.status == "succeeded", outcome.error
    assert outcome.plan is not None and outcome.plan.through_indexes
    assert outcome.rows_cleaned == len(due)
    assert remaining_due(engine, due) == 0


def test_an_index_left_invalid_on_a_partition_is_dropped_and_rebuilt(
    engine: Engine, partitioned: list[str]
) -> None:
    """A concurrent build that failed on a partition leaves an invalid index of the job's
    name there: the advice drops it (concurrently) before building it again, and PostgreSQL
    accepts the whole sequence."""
    seed_series(engine, range(1, 101))  # all sms: a unique index on type cannot be built
    statements = advised(index_findings(engine)[2])
    with engine.connect() as conn:
        [leaf] = conn.execute(
            sql("SELECT tableoid::regclass::text FROM dispatches GROUP BY 1")
        ).scalars()
    name = f"{leaf}_retention_age_idx"
    with pytest.raises(DBAPIError, match="could not create unique index"):
        follow(engine, [f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON {leaf} (type)"])
    resumed = advised(index_findings(engine)[2])
    drop = f"DROP INDEX CONCURRENTLY public.{name};"
    at = statements.index(next(s for s in statements if f" {name} ON " in s))
    assert resumed == [*statements[:at], drop, *statements[at:]]
    follow(engine, resumed)
    assert index_findings(engine)[2].level == "ok"


def test_with_a_foreign_partition_the_parent_s_index_is_built_over_the_others(
    engine: Engine, partitioned: list[str]
) -> None:
    """A foreign partition holds no index, so attaching never makes the parent's index
    valid: the advice builds each other partition's index concurrently, then the parent's
    (not ONLY), which attaches them and skips the foreign one; db check is then satisfied.
    (PostgreSQL allows a foreign partition only where the table has no unique index.)"""
    year = db_now(engine).year
    with engine.begin() as conn:
        conn.execute(sql("ALTER TABLE dispatches DROP CONSTRAINT dispatches_pkey"))
        conn.execute(sql("CREATE FOREIGN DATA WRAPPER dr_test_fdw"))
        conn.execute(sql("CREATE SERVER dr_test_remote FOREIGN DATA WRAPPER dr_test_fdw"))
        conn.execute(
            sql(
                f"CREATE FOREIGN TABLE dispatches_{year + 1} PARTITION OF dispatches FOR VALUES "
                f"FROM ('{year + 1}-01-01') TO ('{year + 2}-01-01') SERVER dr_test_remote"
            )
        )
    findings = index_findings(engine)
    assert all(f"public.dispatches_{year + 1} is a foreign table" in f.message for f in findings)
    for finding, name in zip(findings, POLICY_INDEXES, strict=True):
        statements = advised(finding)
        assert len(statements) == len(partitioned) + 1
        assert all(" ON ONLY " not in s and " ATTACH " not in s for s in statements)
        assert statements[-1].startswith(f"CREATE INDEX {name} ON public.dispatches (")
    follow(engine, [s for f in findings for s in advised(f)])
    assert [f.level for f in index_findings(engine)] == ["ok", "ok", "ok"]
    for name in POLICY_INDEXES:
        built = attached(engine, name)
        assert set(built) == set(partitioned)
        assert all(index.endswith(name[len("dispatches") :]) for index in built.values())
