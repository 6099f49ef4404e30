"""The template database of a scenario: seeded, shaped, VACUUMed, CHECKPOINTed.

A template is seeded with synthetic dispatches (`synthetic.seed()` into an unlogged staging
table, then copied in id order into the real table, which gets its production-like indexes
from `synthetic.create_dispatches()` and the job's own from `indexes.create()` afterwards),
shaped for the scenario, VACUUM ANALYZEd and CHECKPOINTed. Every contender then runs on its
own copy of it, so every contender sees identical data.

Scenario shapes:
  backlog  the first run: everything past its window is due (about 60 % of the table with
           the shipped policies);
  nightly  everything that was due `D` days ago is already cleaned, so only the rows that
           came due since are left at the young end; D is chosen to leave --nightly-fraction
           of the table due (one day of the synthetic data's two years is 0.14 %);
  sparse   everything due is cleaned except about --sparse-rows rows scattered over the old
           ids (unsettled stragglers, released holds);
  idle     everything due is already cleaned: nothing to do.

Earlier runs' work is done the way the job does it: an UPDATE in place writing
`policy.cleaned_values()`, then VACUUM, so that the heap and the indexes carry the free space
and growth it leaves.

Stable counts: the cutoffs move with the clock while the bench runs, so rows whose age falls
within --margin-hours after a cutoff are moved (all their timestamps together) to the end of
that margin. No row comes due while the bench runs, and every contender must clean exactly
the same rows.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Table,
    and_,
    case,
    cast,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.schema import CreateSchema, CreateTable, DropTable

from dispatch_retention import config
from dispatch_retention.catalog import indexes
from dispatch_retention.demo import synthetic
from dispatch_retention.pg import engines
from dispatch_retention.rule import dispatch_table, policy

from .server import PG_DIALECT, Server

SCENARIOS = ("backlog", "nightly", "sparse", "idle")
TIMESTAMP_COLUMNS = ("created_at", "updated_at", "scheduled_at", "transmitted_at", "delivered_at")


@dataclass
class Template:
    scenario: str
    name: str
    rows: int
    due_rows: int
    table_bytes: int
    build_s: float
    shape: dict[str, Any] = field(default_factory=dict)


def due_expr(settings: config.Settings, table: Table, now: datetime) -> ColumnElement[bool]:
    """The job's due rule as of `now` (no legal holds: the bench creates none)."""
    return policy.due(table, policy.rules(settings, now))


def sql_table(table: Table) -> str:
    return PG_DIALECT.identifier_preparer.format_table(table)


def build_template(
    server: Server, name: str, settings: config.Settings, scenario: str, args: argparse.Namespace
) -> Template:
    t_start = time.monotonic()
    server.create_database(name)
    engine = server.engine(name)
    target = settings.target
    table = dispatch_table.dispatches_table(target)
    staging = dispatch_table.dispatches_table(config.Target(table="bench_seed"))
    shape: dict[str, Any] = {}
    try:
        with engine.begin() as conn:
            ddl = str(CreateTable(staging).compile(dialect=PG_DIALECT))
            conn.exec_driver_sql(ddl.replace("CREATE TABLE", "CREATE UNLOGGED TABLE", 1))
            t0 = engines.database_now(conn)
            synthetic.seed(conn, staging, rows=args.rows, now=t0)

            # Keep every row's age clear of the cutoffs for --margin-hours (see the docstring).
            rules0 = policy.rules(settings, t0)
            margin = timedelta(hours=args.margin_hours)
            bounds = sorted(
                {c.settled for c in rules0.cutoffs} | {c.unsettled for c in rules0.cutoffs}
            )
            age = policy.age(staging, settings.clean.age_from)
            ts = DateTime(timezone=True)
            in_gap = [and_(age >= literal(b, ts), age < literal(b + margin, ts)) for b in bounds]
            delta = case(
                *(
                    (gap, literal(b + margin, ts) - age)
                    for gap, b in zip(in_gap, bounds, strict=True)
                )
            )
            shifted = conn.execute(
                update(staging)
                .where(or_(*in_gap))
                .values({c: staging.c[c] + delta for c in TIMESTAMP_COLUMNS})
            ).rowcount
            shape["rows_moved_off_cutoffs"] = shifted
            shape["margin_hours"] = args.margin_hours

            n_due, n_due_day_ago = conn.execute(
                select(
                    func.count().filter(due_expr(settings, staging, t0)),
                    func.count().filter(due_expr(settings, staging, t0 - timedelta(days=1))),
                )
            ).one()
            # Load the real table in id order, as the application wrote it, and build the
            # production-like indexes afterwards (the table exists: only the indexes are made).
            if target.schema_name:
                conn.execute(CreateSchema(target.schema_name, if_not_exists=True))
            table.create(conn)
            names = [c.name for c in table.columns]
            conn.execute(
                insert(table).from_select(
                    names, select(*(staging.c[n] for n in names)).order_by(staging.c.id)
                )
            )
            conn.execute(DropTable(staging))
            synthetic.create_dispatches(conn, target)
            indexes.create(conn, settings)

            # Earlier runs' work, done the way the job does it (UPDATE in place, then VACUUM),
            # so that the heap and the indexes carry the free space and growth it leaves.
            stamp = t0 - timedelta(hours=1)
            clean: ColumnElement[bool] | None = None
            if scenario == "nightly":
                per_day = max(n_due - n_due_day_ago, 1)
                days = min(max(1.0, args.nightly_fraction * args.rows / per_day), 300.0)
                stamp = t0 - timedelta(days=days)
                clean = due_expr(settings, table, stamp)
                shape.update(due_per_day=per_day, days_due=round(days, 2))
            elif scenario == "sparse":
                keep_below = int(min(1.0, args.sparse_rows / max(n_due, 1)) * 1_000_003)
                # a multiplicative hash of the id: deterministic, scattered over all ids
                keep = (cast(table.c.id, BigInteger) * 2654435761) % 1_000_003 < keep_below
                clean = and_(due_expr(settings, table, t0), not_(keep))
            elif scenario == "idle":
                clean = due_expr(settings, table, t0)
            if clean is not None:
                values: dict[str, Any] = policy.cleaned_values(settings)
                values["cleaned_at"] = values["updated_at"] = literal(stamp, ts)
                shape["rows_cleaned_before"] = conn.execute(
                    update(table).where(clean).values(values)
                ).rowcount
            if args.autovacuum == "off":
                conn.exec_driver_sql(
                    f"ALTER TABLE {sql_table(table)} SET (autovacuum_enabled = off, "
                    "toast.autovacuum_enabled = off)"
                )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {sql_table(table)}")
            now = engines.database_now(conn)
            due_rows = int(
                conn.execute(
                    select(func.count()).where(due_expr(settings, table, now))
                ).scalar_one()
            )
            rows = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
            size = int(
                conn.execute(
                    text("SELECT pg_total_relation_size(CAST(:t AS regclass))"),
                    {"t": sql_table(table)},
                ).scalar_one()
            )
    finally:
        engine.dispose()
    server.checkpoint()
    return Template(
        scenario=scenario,
        name=name,
        rows=rows,
        due_rows=due_rows,
        table_bytes=size,
        build_s=time.monotonic() - t_start,
        shape=shape,
    )
