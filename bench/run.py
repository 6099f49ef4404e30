#!/usr/bin/env python3
"""Benchmark the retention job against the single-statement bound (issue 5).

    python bench/run.py --rows N --scenario backlog|nightly|sparse|idle|all --json PATH

One process run, per scenario:

1. a template database is seeded with synthetic dispatches (`synthetic.seed()` into an
   unlogged staging table, then copied in id order into the real table, which gets its
   production-like indexes from `schema.create_dispatches()` and the job's own from
   `indexes.create()` afterwards), shaped for the
   scenario, VACUUM ANALYZEd and CHECKPOINTed;
2. every contender gets its own copy (`CREATE DATABASE ... TEMPLATE`), a CHECKPOINT, and is
   measured alone on it; the copy is dropped before the next contender starts:
     (a) bound     one UPDATE over every due row (the physical bound);
     (b) job       `dispatch-retention run --yes` as a real subprocess, shipped config;
     (c) skiplock  the textbook loop: UPDATE ... WHERE id IN (SELECT id ... ORDER BY id
                   LIMIT n FOR UPDATE SKIP LOCKED), commit per chunk, until 0 rows;
     (d) naive     select the due ids, one UPDATE per row, commit per 1000, on a sample
                   (first --naive-sample due rows), the rate extrapolated to all due rows;
     (e) shards    with --shards N: N job processes at once, `run --shard I/N` each;
3. each contender's cleaned rows are counted on its copy and compared with (a);
4. with --repeat N, (a), (b) and (e) run N times each, taking turns (a, b, e, a, b, e, ...),
   each on a fresh copy, and the run of median time stands for the contender. One run of
   the bound varies by up to 10 % on a shared 2-vCPU machine (checkpoints, the page cache),
   more than the margins the targets ask about.

Scenario shapes (all derived before the copy, so every contender sees identical data):
  backlog  the first run: everything past its window is due (about 60 % of the table with
           the shipped policies);
  nightly  everything that was due `D` days ago is already cleaned, so only the rows that
           came due since are left at the young end; D is chosen to leave --nightly-fraction
           of the table due (one day of the synthetic data's two years is 0.14 %);
  sparse   everything due is cleaned except about --sparse-rows rows scattered over the old
           ids (unsettled stragglers, released holds);
  idle     everything due is already cleaned: nothing to do.

Stable counts: the cutoffs move with the clock while the bench runs, so rows whose age falls
within --margin-hours after a cutoff are moved (all their timestamps together) to the end of
that margin. No row comes due while the bench runs, and every contender must clean exactly
the same rows.

Databases are created on the server of --database-url, else $BENCH_DATABASE_URL, else
$TEST_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/postgres, and all of them are
dropped at the end, also on an error or SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("backlog", "nightly", "sparse", "idle")
CONTENDERS = {
    "a": "bound",
    "b": "job",
    "c": "skiplock",
    "d": "naive",
    "e": "shards",
}
#: with --repeat N these run N times each, taking turns; (c) and (d) run once
REPEATED = ("a", "b", "e")
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TIMESTAMP_COLUMNS = ("created_at", "updated_at", "scheduled_at", "transmitted_at", "delivered_at")

try:
    import psycopg
    from sqlalchemy import (
        BigInteger,
        ColumnElement,
        DateTime,
        Engine,
        Table,
        and_,
        case,
        cast,
        create_engine,
        func,
        insert,
        literal,
        not_,
        null,
        or_,
        select,
        text,
        update,
    )
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.dialects.postgresql import JSONB
    from sqlalchemy.engine import URL
    from sqlalchemy.pool import NullPool
    from sqlalchemy.schema import CreateSchema, CreateTable, DropTable

    from dispatch_retention import config, db, errors, indexes, policy, schema, synthetic
except ImportError as exc:  # pragma: no cover - a usage problem, not a bug
    sys.exit(
        f"bench/run.py needs the project's environment ({exc}).\n"
        "Run it as `.venv/bin/python bench/run.py ...` or `make bench`."
    )

PG_DIALECT = postgresql.dialect()


# --- small helpers ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sql(stmt: Any) -> str:
    """Compile a Core statement or expression to PostgreSQL text with literal values."""
    return str(stmt.compile(dialect=PG_DIALECT, compile_kwargs={"literal_binds": True}))


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def chunk_stats(ms: list[float]) -> dict[str, Any]:
    return {
        "count": len(ms),
        "p50_ms": _r(percentile(ms, 50)),
        "p95_ms": _r(percentile(ms, 95)),
        "max_ms": _r(max(ms) if ms else None),
        "sum_ms": _r(sum(ms)),
    }


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) arrived: unwind so that the databases are dropped.

    A KeyboardInterrupt, so that psycopg cancels the query in progress on the server."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# --- the server ------------------------------------------------------------------------------


class Server:
    """Admin access to the server, and the databases this run created (dropped at the end)."""

    def __init__(self, raw_url: str) -> None:
        try:
            self.url: URL = db.parse_url(raw_url)  # the job's own rules for a database URL
        except errors.DatabaseUrlError as exc:
            raise SystemExit(f"--database-url: {exc}") from None
        self.created: list[str] = []
        self.admin = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with self.admin.connect() as conn:
            self.version_num = int(conn.execute(text("SHOW server_version_num")).scalar_one())
            self.version = str(conn.execute(text("SHOW server_version")).scalar_one())
            self.settings = {
                name: str(conn.execute(text(f"SHOW {name}")).scalar_one())
                for name in (
                    "shared_buffers",
                    "max_wal_size",
                    "wal_compression",
                    "full_page_writes",
                    "synchronous_commit",
                    "checkpoint_timeout",
                )
            }

    def sa_url(self, database: str) -> URL:
        return self.url.set(database=database)

    def libpq_url(self, database: str, *, hide_password: bool = False) -> str:
        url = self.url.set(drivername="postgresql", database=database)
        return url.render_as_string(hide_password=hide_password)

    def engine(self, database: str, **kwargs: Any) -> Engine:
        return create_engine(self.sa_url(database), poolclass=NullPool, **kwargs)

    def connect(self, database: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.libpq_url(database), application_name="dispatch-bench")

    def create_database(self, name: str, template: str | None = None) -> None:
        stmt = f"CREATE DATABASE {quote_ident(name)}"
        if template:
            stmt += f" TEMPLATE {quote_ident(template)}"
            if self.version_num >= 150000:
                # Copy the files (two checkpoints) instead of writing the whole template
                # through the WAL, which WAL_LOG (the PG 15 default) would do.
                stmt += " STRATEGY FILE_COPY"
        self.created.append(name)
        with self.admin.connect() as conn:
            conn.execute(text(stmt))

    def drop_database(self, name: str) -> None:
        force = " WITH (FORCE)" if self.version_num >= 130000 else ""
        with self.admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {quote_ident(name)}{force}"))
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in reversed(list(self.created)):
            try:
                self.drop_database(name)
            except Exception as exc:  # keep dropping the others
                log(f"could not drop database {name}: {exc}")

    def checkpoint(self) -> None:
        try:
            with self.admin.connect() as conn:
                conn.execute(text("CHECKPOINT"))
        except Exception as exc:
            log(f"CHECKPOINT failed ({type(exc).__name__}): WAL counts include earlier work")

    def wait_no_backends(self, database: str, timeout_s: float = 10.0) -> None:
        """Until every backend of `database` has exited (and so flushed its WAL stats)."""
        deadline = time.monotonic() + timeout_s
        with self.admin.connect() as conn:
            while time.monotonic() < deadline:
                n = conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"),
                    {"d": database},
                ).scalar_one()
                if not n:
                    return
                time.sleep(0.05)

    def activity(self) -> dict[str, int]:
        """Rows written per database so far: a proxy for other people's work on the server,
        which the cluster-wide WAL figures would include."""
        with self.admin.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT datname, tup_inserted + tup_updated + tup_deleted "
                    "FROM pg_stat_database WHERE datname IS NOT NULL"
                )
            ).all()
        return {str(name): int(n) for name, n in rows}

    def wal_position(self) -> dict[str, Any]:
        with self.admin.connect() as conn:
            lsn = conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()
            stats: dict[str, Any] = {"lsn": lsn}
            if self.version_num >= 140000:
                row = conn.execute(
                    text("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal")
                ).one()
                stats.update(records=int(row[0]), fpi=int(row[1]), bytes=int(row[2]))
            stats["checkpoints"] = int(
                conn.execute(
                    text("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
                ).scalar_one()
            )
            return stats

    def wal_diff(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        with self.admin.connect() as conn:
            diff = conn.execute(
                text("SELECT pg_wal_lsn_diff(CAST(:a AS pg_lsn), CAST(:b AS pg_lsn))"),
                {"a": after["lsn"], "b": before["lsn"]},
            ).scalar_one()
        out: dict[str, Any] = {
            "bytes": int(diff),
            "checkpoints": after["checkpoints"] - before["checkpoints"],
        }
        if "records" in before:
            out["records"] = after["records"] - before["records"]
            out["fpi"] = after["fpi"] - before["fpi"]
        return out


# --- statements ------------------------------------------------------------------------------


def clean_values(settings: config.Settings, table: Table) -> dict[str, Any]:
    """What a clean sets (as the job does): listed columns to NULL or their JSON replacement."""
    values: dict[str, Any] = {}
    for column in settings.clean.columns:
        if column in settings.clean.replace:
            value = settings.clean.replace[column]
            values[column] = (
                cast(literal(json.dumps(value)), JSONB) if column == "content" else literal(value)
            )
        else:
            values[column] = null()
    return values


def due_expr(settings: config.Settings, table: Any, now: datetime) -> ColumnElement[bool]:
    return policy.due(table, policy.rules(settings, now))


def db_now(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT now()").fetchone()
    conn.rollback()
    assert row is not None
    value = row[0]
    assert isinstance(value, datetime)
    return value


# --- scenarios -------------------------------------------------------------------------------


@dataclass
class Template:
    scenario: str
    name: str
    rows: int
    due_rows: int
    table_bytes: int
    build_s: float
    shape: dict[str, Any] = field(default_factory=dict)


def build_template(
    server: Server, name: str, settings: config.Settings, scenario: str, args: argparse.Namespace
) -> Template:
    t_start = time.monotonic()
    server.create_database(name)
    engine = server.engine(name)
    target = settings.target
    table = schema.dispatches_table(target)
    staging = schema.dispatches_table(config.Target(table="bench_seed"))
    shape: dict[str, Any] = {}
    try:
        with engine.begin() as conn:
            ddl = str(CreateTable(staging).compile(dialect=PG_DIALECT))
            conn.exec_driver_sql(ddl.replace("CREATE TABLE", "CREATE UNLOGGED TABLE", 1))
            t0 = conn.execute(select(func.now())).scalar_one()
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
            schema.create_dispatches(conn, target)
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
                values = clean_values(settings, table)
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
            now = conn.execute(select(func.now())).scalar_one()
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


def sql_table(table: Table) -> str:
    return PG_DIALECT.identifier_preparer.format_table(table)


# --- contenders ------------------------------------------------------------------------------


@dataclass
class Result:
    key: str
    name: str
    rows: int = 0
    seconds: float = 0.0
    chunk_ms: list[float] = field(default_factory=list)
    extrapolated: bool = False
    sample_rows: int | None = None
    peak_rss_mb: float | None = None
    wal: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    verified_rows: int | None = None
    still_due: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.seconds if self.rows and self.seconds > 0 else None

    def as_dict(self, bound: Result | None) -> dict[str, Any]:
        wal_bytes = self.wal.get("bytes")
        per = self.sample_rows if self.extrapolated else self.rows
        out: dict[str, Any] = {
            "key": self.key,
            "name": self.name,
            "rows": self.rows,
            "seconds": _r(self.seconds, 3),
            "rows_per_s": _r(self.rows_per_s),
            "ratio_to_bound": ratio(bound, self),
            "chunks": chunk_stats(self.chunk_ms),
            "peak_rss_mb": _r(self.peak_rss_mb),
            "wal_bytes": wal_bytes,
            "wal_bytes_per_row": _r(wal_bytes / per) if wal_bytes is not None and per else None,
            "wal_fpi_per_row": _r(self.wal["fpi"] / per, 2) if "fpi" in self.wal and per else None,
            "wal_records_per_row": (
                _r(self.wal["records"] / per, 2) if "records" in self.wal and per else None
            ),
            "checkpoints_during_run": self.wal.get("checkpoints"),
            "wal_disturbed": bool(
                self.wal.get("other_databases_created")
                or self.wal.get("other_databases_rows_written")
            ),
            "wal_other_activity": {
                "databases_created": self.wal.get("other_databases_created"),
                "rows_written": self.wal.get("other_databases_rows_written"),
            },
            "extrapolated": self.extrapolated,
            "sample_rows": self.sample_rows,
            "verified_rows": self.verified_rows,
            "still_due_after": self.still_due,
            "problems": self.problems,
        }
        out.update(self.detail)
        return out


def median_run(measured: list[Result]) -> Result:
    """The run of median time stands for a repeated contender; the others are kept beside it.

    Every run's problems count (each run is verified on its own copy), and the chunk
    figures also give the worst chunk of any run."""
    chosen = sorted(measured, key=lambda r: r.seconds)[(len(measured) - 1) // 2]
    if len(measured) > 1:
        chosen.detail["repeats"] = {
            "runs": len(measured),
            "seconds": [_r(r.seconds, 3) for r in measured],
            "chunk_max_ms_all_runs": _r(max(max(r.chunk_ms, default=0.0) for r in measured)),
            "chunk_p95_ms_each_run": [chunk_stats(r.chunk_ms)["p95_ms"] for r in measured],
        }
        for i, run in enumerate(measured):
            if run is not chosen:
                chosen.problems.extend(f"run {i + 1}: {problem}" for problem in run.problems)
    return chosen


def ratio(bound: Result | None, other: Result, seconds: float | None = None) -> float | None:
    """Throughput relative to the bound: its time over ours (rows are equal when verified)."""
    mine = other.seconds if seconds is None else seconds
    if bound is None or bound.seconds <= 0 or mine <= 0:
        return None
    return round(bound.seconds / mine, 3)


class Bench:
    def __init__(self, server: Server, settings: config.Settings, args: argparse.Namespace) -> None:
        self.server, self.settings, self.args = server, settings, args
        self.table = schema.dispatches_table(settings.target)
        self.values = clean_values(settings, self.table) | {
            "cleaned_at": func.now(),
            "updated_at": func.now(),
        }
        self.job_bin = find_job_bin(args.job_bin)
        self.job_has_db = job_has_command(self.job_bin, "db")
        self.procs: list[subprocess.Popen[bytes]] = []  # running job processes

    # One contender on one fresh copy.
    def measure(self, tpl: Template, key: str, run: Callable[[str, Result], None]) -> Result:
        result = Result(key=key, name=CONTENDERS[key])
        copy = f"{tpl.name[:-4]}_{key}"  # ..._tpl -> ..._a
        log(f"{tpl.scenario}: ({key}) {result.name}: copying the template")
        self.server.create_database(copy, template=tpl.name)
        try:
            if key in ("b", "e") and self.job_has_db:
                self._job(copy, "db", "upgrade", check=True)
            self.server.checkpoint()
            with self.server.connect(copy) as conn:
                started_db = db_now(conn)
            before, activity = self.server.wal_position(), self.server.activity()
            log(f"{tpl.scenario}: ({key}) {result.name}: running")
            run(copy, result)
            self.server.wait_no_backends(copy)
            result.wal = self.server.wal_diff(before, self.server.wal_position())
            after = self.server.activity()
            result.wal["other_databases_created"] = len(set(after) - set(activity) - {copy})
            result.wal["other_databases_rows_written"] = sum(
                n - activity.get(name, 0) for name, n in after.items() if name != copy
            )
            self._verify(copy, started_db, result)
        finally:
            self.server.drop_database(copy)
        return result

    def _verify(self, copy: str, started: datetime, result: Result) -> None:
        table = self.table
        with self.server.engine(copy).connect() as conn:
            now = conn.execute(select(func.now())).scalar_one()
            cleaned, still_due = conn.execute(
                select(
                    func.count().filter(table.c.cleaned_at >= started),
                    func.count().filter(due_expr(self.settings, table, now)),
                )
            ).one()
        result.verified_rows, result.still_due = int(cleaned), int(still_due)
        expected = result.sample_rows if result.extrapolated else result.rows
        if cleaned != expected:
            result.problems.append(f"reported {expected} rows but {cleaned} rows were cleaned")

    # (a) one UPDATE over everything due
    def bound(self, copy: str, result: Result) -> None:
        with self.server.connect(copy) as conn:
            now = db_now(conn)
            stmt = sql(
                update(self.table)
                .where(due_expr(self.settings, self.table, now))
                .values(self.values)
            )
            t0 = time.perf_counter()
            cur = conn.execute(stmt, prepare=False)
            conn.commit()
            result.seconds = time.perf_counter() - t0
            result.rows = cur.rowcount
            result.chunk_ms = [result.seconds * 1000]

    # (b) the real job
    def job(self, copy: str, result: Result) -> None:
        out = self._job(copy, "run", "--yes", *shlex.split(self.args.job_args))
        result.peak_rss_mb = out["peak_rss_mb"]
        result.seconds = out["wall_s"]
        rows, chunk_ms = job_outcome(out, result.problems)
        result.rows, result.chunk_ms = rows, chunk_ms
        result.detail["job"] = job_breakdown(out, out["events"], chunk_ms)

    # (e) N job processes at once, one per shard (`run --shard I/N`)
    def shards(self, copy: str, result: Result) -> None:
        n = self.args.shards
        outs: list[dict[str, Any] | BaseException | None] = [None] * n

        def one(i: int) -> None:
            try:
                outs[i] = self._job(
                    copy, "run", "--yes", "--shard", f"{i}/{n}", *shlex.split(self.args.job_args)
                )
            except BaseException as exc:  # reported below
                outs[i] = exc

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # short joins, so that a signal still reaches this thread
                t.join(0.2)
        result.seconds = time.perf_counter() - t0
        per_shard = []
        for i, out in enumerate(outs):
            if not isinstance(out, dict):
                result.problems.append(f"shard {i}/{n}: {out!r}")
                continue
            rows, chunk_ms = job_outcome(out, result.problems, f"shard {i}/{n}: ")
            result.rows += rows
            result.chunk_ms += chunk_ms
            result.peak_rss_mb = max(result.peak_rss_mb or 0.0, out["peak_rss_mb"])
            detail = job_breakdown(out, out["events"], chunk_ms)
            detail.pop("chunk_series", None)
            per_shard.append(
                {"shard": f"{i}/{n}", "rows": rows, "wall_s": _r(out["wall_s"], 3)} | detail
            )
        result.detail["shards"] = per_shard

    def _job(self, copy: str, *command: str, check: bool = False) -> dict[str, Any]:
        argv = [
            str(self.job_bin),
            "--config",
            str(self.args.config),
            "--log-format",
            "json",
            "--database-url",
            self.server.libpq_url(copy),
            *command,
        ]
        ignored = ("DATABASE_URL", "DATABASE_URL_FILE", "JOB_COMPLETION_INDEX", "JOB_COMPLETIONS")
        env = {k: v for k, v in os.environ.items() if k not in ignored}
        with tempfile.TemporaryFile() as stdout:
            spawned = time.perf_counter()
            spawned_wall = time.time()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.PIPE,
                env=env,
                cwd=REPO,
            )
            self.procs.append(proc)
            assert proc.stderr is not None
            lines = proc.stderr.read().decode("utf-8", "replace").splitlines()
            # wait4 gives this child's own rusage: ru_maxrss is its peak RSS (KiB on Linux).
            _pid, status, usage = os.wait4(proc.pid, 0)
            ended = time.perf_counter()
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.procs.remove(proc)
        events = []
        for line in lines:
            with suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        out = {
            "returncode": proc.returncode,
            "wall_s": ended - spawned,
            "spawned_at": spawned_wall,
            "peak_rss_mb": usage.ru_maxrss / 1024
            if sys.platform != "darwin"
            else usage.ru_maxrss / 2**20,
            "cpu_user_s": usage.ru_utime,
            "cpu_sys_s": usage.ru_stime,
            "events": events,
            "stderr_tail": " | ".join(line for line in lines[-3:])[:600],
        }
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({proc.returncode}): {out['stderr_tail']}"
            )
        return out

    # (c) the textbook SKIP LOCKED loop
    def skiplock(self, copy: str, result: Result) -> None:
        table = self.table
        size = self.args.chunk_size or self.settings.clean.chunk_size
        with self.server.connect(copy) as conn:
            now = db_now(conn)
            pick = (
                select(table.c.id)
                .where(due_expr(self.settings, table, now))
                .order_by(table.c.id)
                .limit(size)
                .with_for_update(skip_locked=True)
            )
            stmt = sql(
                update(table).where(table.c.id.in_(pick.scalar_subquery())).values(self.values)
            )
            t0 = time.perf_counter()
            last_empty_ms = None
            while True:
                c0 = time.perf_counter()
                n = conn.execute(stmt).rowcount
                conn.commit()
                ms = (time.perf_counter() - c0) * 1000
                if n <= 0:
                    last_empty_ms = ms
                    break
                result.rows += n
                result.chunk_ms.append(ms)
            result.seconds = time.perf_counter() - t0
        result.detail["chunk_size"] = size
        result.detail["final_empty_chunk_ms"] = _r(last_empty_ms)

    # (d) the naive per-row loop, on a sample
    def naive(self, copy: str, result: Result, due_rows: int) -> None:
        table = self.table
        sample = self.args.naive_sample
        per_commit = self.args.naive_commit
        with self.server.connect(copy) as conn:
            now = db_now(conn)
            pick = sql(
                select(table.c.id)
                .where(due_expr(self.settings, table, now))
                .order_by(table.c.id)
                .limit(sample)
            )
            # One row by its id (a psycopg placeholder; the SET part is compiled literally).
            marker = 987_654_321_987_654_321
            one = sql(
                update(table)
                .where(table.c.id == literal(marker, BigInteger), table.c.cleaned_at.is_(None))
                .values(self.values)
            ).replace("%", "%%")
            assert one.count(str(marker)) == 1
            one = one.replace(str(marker), "%s")
            t0 = time.perf_counter()
            ids = [row[0] for row in conn.execute(pick)]
            done = 0
            c0 = time.perf_counter()
            for i, dispatch_id in enumerate(ids, 1):
                done += conn.execute(one, (dispatch_id,)).rowcount
                if i % per_commit == 0:
                    conn.commit()
                    result.chunk_ms.append((time.perf_counter() - c0) * 1000)
                    c0 = time.perf_counter()
            conn.commit()
            if len(ids) % per_commit:
                result.chunk_ms.append((time.perf_counter() - c0) * 1000)
            elapsed = time.perf_counter() - t0
        result.extrapolated = True
        result.sample_rows = done
        result.detail["sample_seconds"] = _r(elapsed, 3)
        result.detail["commit_every"] = per_commit
        if done:
            result.rows = due_rows
            result.seconds = elapsed * due_rows / done
        else:
            result.rows, result.seconds = 0, elapsed


def job_outcome(
    out: dict[str, Any], problems: list[str], prefix: str = ""
) -> tuple[int, list[float]]:
    """Rows cleaned and chunk times from a job's log events; problems noted."""
    events = out["events"]
    finished = next((e for e in events if e.get("event") == "run_finished"), None)
    if out["returncode"] != 0 or finished is None or finished.get("status") != "succeeded":
        problems.append(f"{prefix}job exited {out['returncode']}: {out['stderr_tail']}")
    chunks = [e for e in events if e.get("event") == "chunk_committed"]
    chunk_rows = sum(int(e["rows"]) for e in chunks)
    rows = int(finished["rows_cleaned"]) if finished else chunk_rows
    if finished and chunk_rows != rows:
        problems.append(f"{prefix}chunk_committed rows do not add up to rows_cleaned")
    return rows, [float(e["ms"]) for e in chunks]


def job_breakdown(
    out: dict[str, Any], events: list[dict[str, Any]], chunk_times: list[float]
) -> dict[str, Any]:
    """Where the job's wall time went, from its own log timestamps."""

    def at(name: str) -> float | None:
        for e in events:
            if e.get("event") == name and e.get("timestamp"):
                with suppress(ValueError):
                    return datetime.fromisoformat(str(e["timestamp"])).timestamp()
        return None

    started, planned = at("run_started"), at("plan")
    finished = at("run_finished") or at("run_failed") or at("run_interrupted")
    spawned = out["spawned_at"]
    end = spawned + out["wall_s"]
    chunk_ms = sum(chunk_times)
    detail: dict[str, Any] = {
        "returncode": out["returncode"],
        "cpu_user_s": _r(out["cpu_user_s"], 2),
        "cpu_sys_s": _r(out["cpu_sys_s"], 2),
        "startup_s": _r(started - spawned, 3) if started else None,
        "plan_s": _r(planned - started, 3) if started and planned else None,
        "clean_s": _r(finished - planned, 3) if planned and finished else None,
        "chunks_s": _r(chunk_ms / 1000, 3),
        "between_chunks_s": (
            _r((finished - planned) - chunk_ms / 1000, 3) if planned and finished else None
        ),
        "exit_s": _r(end - finished, 3) if finished else None,
        "in_run_s": _r(finished - started, 3) if started and finished else None,
        "skipped_locked_chunks": sum(
            1 for e in events if e.get("event") == "chunk_committed" and e.get("skipped_locked")
        ),
    }
    chunks = [e for e in events if e.get("event") == "chunk_committed"]
    sizes = [int(e["chunk_size"]) for e in chunks if "chunk_size" in e]
    if sizes:  # the id window of each chunk (adaptive when clean.target_chunk_ms is set)
        detail["window_ids"] = {"first": sizes[0], "min": min(sizes), "max": max(sizes)}
    if chunks:
        detail["rows_per_chunk_max"] = max(int(e["rows"]) for e in chunks)
        # every chunk: [ms, rows, id window] (the window is null before adaptive sizing)
        detail["chunk_series"] = [
            [float(e["ms"]), int(e["rows"]), e.get("chunk_size")] for e in chunks
        ]
    plan = next((e for e in events if e.get("event") == "plan"), None)
    if plan:
        detail["planned_due_rows"] = plan.get("due_rows")
    return detail


def find_job_bin(given: Path | None = None) -> Path:
    """--job-bin, else the `dispatch-retention` beside this Python, else the one on PATH."""
    if given is not None:
        if not given.exists():
            raise SystemExit(f"--job-bin: {given} does not exist")
        return given.absolute()
    beside = Path(sys.executable).with_name("dispatch-retention")
    if beside.exists():
        return beside
    found = shutil.which("dispatch-retention")
    if not found:
        raise SystemExit("dispatch-retention is not installed in this environment")
    return Path(found)


def job_install(job_bin: Path) -> dict[str, Any]:
    """The interpreter the job runs on and how the job is installed in it (a wheel, as the
    image has it, or an editable development install), read off that interpreter."""
    first = job_bin.read_bytes().split(b"\n", 1)[0]
    if not first.startswith(b"#!"):
        return {"bin": str(job_bin)}
    python = first[2:].decode().strip()
    probe = (
        "import json, os, platform, sys, importlib.metadata as m\n"
        "d = m.distribution('dispatch-retention')\n"
        "url = json.loads(d.read_text('direct_url.json') or '{}')\n"
        "print(json.dumps({'python': platform.python_version(),"
        " 'executable': os.path.realpath(sys.executable),"
        " 'editable': bool(url.get('dir_info', {}).get('editable'))}))"
    )
    out = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, check=False, cwd=REPO
    )
    info: dict[str, Any] = {"bin": str(job_bin)}
    with suppress(ValueError):
        found = json.loads(out.stdout)
        info.update(
            python=found["python"],
            executable=found["executable"],
            install="editable" if found["editable"] else "wheel",
        )
    return info


def job_has_command(job_bin: Path, name: str) -> bool:
    out = subprocess.run(
        [str(job_bin), "--help"], capture_output=True, text=True, check=False, cwd=REPO
    ).stdout
    return any(line.split()[:1] == [name] for line in out.splitlines() if line.startswith("  "))


# --- the run ---------------------------------------------------------------------------------


def run_scenario(bench: Bench, scenario: str, prefix: str) -> dict[str, Any]:
    args = bench.args
    name = f"{prefix}_{scenario}_tpl"
    log(f"{scenario}: building the template ({args.rows} rows)")
    load0 = os.getloadavg()[0]
    tpl = build_template(bench.server, name, bench.settings, scenario, args)
    log(
        f"{scenario}: template ready in {tpl.build_s:.1f}s: {tpl.rows} rows, {tpl.due_rows} due, "
        f"{tpl.table_bytes / 2**20:.0f} MiB"
    )
    runs: dict[str, list[Result]] = {key: [] for key in args.contenders}
    try:
        # (a), (b) and (e) take turns, --repeat times; (c) and (d) run once, in the first round.
        for round_no in range(args.repeat):
            for key in args.contenders:
                if round_no and key not in REPEATED:
                    continue
                if key == "a":
                    runs[key].append(bench.measure(tpl, key, bench.bound))
                elif key == "b":
                    runs[key].append(bench.measure(tpl, key, bench.job))
                elif key == "c":
                    runs[key].append(bench.measure(tpl, key, bench.skiplock))
                elif key == "e":
                    runs[key].append(bench.measure(tpl, key, bench.shards))
                elif key == "d":
                    due = runs["a"][0].rows if runs.get("a") else tpl.due_rows
                    runs[key].append(
                        bench.measure(
                            tpl, key, lambda copy, res, due=due: bench.naive(copy, res, due)
                        )
                    )
    finally:
        bench.server.drop_database(name)
    results = {key: median_run(measured) for key, measured in runs.items() if measured}
    bound = results.get("a")
    for key, res in results.items():
        if res.rows != tpl.due_rows and not res.problems:
            res.problems.append(f"cleaned {res.rows} rows, the template had {tpl.due_rows} due")
        if bound is not None and key != "a" and res.rows != bound.rows:
            res.problems.append(f"cleaned {res.rows} rows, the bound cleaned {bound.rows}")
        if res.still_due and not res.extrapolated:
            res.problems.append(f"{res.still_due} rows still due afterwards")
    job = results.get("b")
    if job is not None and "job" in job.detail and bound is not None:
        in_run = job.detail["job"].get("in_run_s")
        job.detail["job"]["ratio_in_run"] = ratio(bound, job, in_run) if in_run else None
    contenders = [res.as_dict(bound) for res in results.values()]
    return {
        "scenario": scenario,
        "rows": tpl.rows,
        "due_rows": tpl.due_rows,
        "due_fraction": round(tpl.due_rows / tpl.rows, 5) if tpl.rows else None,
        "table_mib": round(tpl.table_bytes / 2**20, 1),
        "template_build_s": round(tpl.build_s, 1),
        "shape": tpl.shape,
        "loadavg_before": round(load0, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
        "contenders": contenders,
    }


def fmt(value: Any, spec: str = "", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    meta = report["bench"]
    print(
        f"\ndispatch-retention bench: {meta['rows']:,} rows, PostgreSQL {meta['server_version']}, "
        f"{meta['cpus']} CPUs, shared_buffers {meta['server_settings']['shared_buffers']}, "
        f"max_wal_size {meta['server_settings']['max_wal_size']}, "
        f"autovacuum on the table {meta['autovacuum']}"
    )
    job = meta.get("job", {})
    print(
        f"job: {job.get('bin')} (Python {job.get('python', '?')} at {job.get('executable', '?')},"
        f" {job.get('install', 'unknown')} install)"
    )
    header = (
        f"{'contender':<16}{'rows':>11}{'seconds':>10}{'rows/s':>10}{'x(a)':>7}"
        f"{'chunks':>8}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'RSS MB':>8}"
        f"{'WAL B/row':>10}{'FPI/row':>8}"
    )
    for sc in report["scenarios"]:
        shape = ", ".join(f"{k}={v}" for k, v in sc["shape"].items())
        print(
            f"\n== {sc['scenario']}: {sc['rows']:,} rows ({sc['table_mib']:,.0f} MiB), "
            f"{sc['due_rows']:,} due ({sc['due_fraction'] * 100:.2f} %); {shape}; "
            f"load {sc['loadavg_before']} -> {sc['loadavg_after']}"
        )
        print(header)
        print("-" * len(header))
        for c in sc["contenders"]:
            label = f"({c['key']}) {c['name']}" + ("*" if c["extrapolated"] else "")
            ch = c["chunks"]
            print(
                f"{label:<16}{c['rows']:>11,}{fmt(c['seconds'], '.2f'):>10}"
                f"{fmt(c['rows_per_s'], ',.0f'):>10}{fmt(c['ratio_to_bound'], '.2f'):>7}"
                f"{ch['count']:>8}{fmt(ch['p50_ms'], '.0f'):>9}{fmt(ch['p95_ms'], '.0f'):>9}"
                f"{fmt(ch['max_ms'], '.0f'):>9}{fmt(c['peak_rss_mb'], '.0f'):>8}"
                f"{fmt(c['wal_bytes_per_row'], ',.0f') + ('~' if c['wal_disturbed'] else ''):>10}"
                f"{fmt(c['wal_fpi_per_row'], '.2f'):>8}"
            )
        for c in sc["contenders"]:
            if c["key"] == "b" and "job" in c:
                j = c["job"]
                print(
                    f"   (b) time: startup {fmt(j['startup_s'], '.2f')}s, plan "
                    f"{fmt(j['plan_s'], '.2f')}s, chunks {fmt(j['chunks_s'], '.2f')}s, between "
                    f"chunks {fmt(j['between_chunks_s'], '.2f')}s, exit {fmt(j['exit_s'], '.2f')}s;"
                    f" in-run x(a) {fmt(j.get('ratio_in_run'), '.2f')}; job CPU "
                    f"{fmt(j['cpu_user_s'], '.1f')}s user + {fmt(j['cpu_sys_s'], '.1f')}s sys"
                )
                if "window_ids" in j:
                    w = j["window_ids"]
                    print(
                        f"   (b) id windows: first {w['first']:,}, min {w['min']:,}, max "
                        f"{w['max']:,}; most rows in one chunk {j['rows_per_chunk_max']:,}"
                    )
            if c["key"] == "e" and "shards" in c:
                parts = ", ".join(
                    f"{sh['shard']}: {sh['rows']:,} rows in {fmt(sh['wall_s'], '.2f')}s "
                    f"(plan {fmt(sh['plan_s'], '.2f')}s)"
                    for sh in c["shards"]
                )
                print(f"   (e) {parts}")
            if "repeats" in c:
                rep = c["repeats"]
                runs = ", ".join(fmt(x, ".2f") for x in rep["seconds"])
                p95s = ", ".join(fmt(x, ".0f") for x in rep["chunk_p95_ms_each_run"])
                worst = fmt(rep["chunk_max_ms_all_runs"], ".0f")
                print(
                    f"   ({c['key']}) {rep['runs']} runs: {runs} s (the median is shown); "
                    f"chunk p95 {p95s} ms, max of all runs {worst} ms"
                )
            if c["key"] == "c":
                print(f"   (c) final empty chunk {fmt(c.get('final_empty_chunk_ms'), '.0f')} ms")
            if c["key"] == "d":
                print(
                    f"   (d)* {c['sample_rows']:,} rows sampled in "
                    f"{fmt(c.get('sample_seconds'), '.2f')}s, extrapolated to {c['rows']:,}"
                )
        for c in sc["contenders"]:
            for problem in c["problems"]:
                print(f"   WARNING ({c['key']}) {c['name']}: {problem}")
    print(
        f"\nx(a): the bound's time over the contender's (throughput ratio). Chunk times: (a) the "
        f"one statement, (b) the job's chunk_committed ms, (c) measured per chunk, (d) per "
        f"{report['bench']['naive_commit']}-row commit. WAL is cluster-wide (pg_current_wal_lsn "
        f"diff); ~ marks a figure that other databases' writes during the run may inflate. "
        f"*: extrapolated from a sample. Total wall time {meta['wall_s']:.0f}s."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark dispatch-retention against the single-statement bound.",
    )
    p.add_argument("--rows", type=int, default=100_000, help="dispatches per scenario [100000]")
    p.add_argument(
        "--scenario", choices=(*SCENARIOS, "all"), default="all", help="which shape [all]"
    )
    p.add_argument("--json", dest="json_path", type=Path, help="write the results here as JSON")
    p.add_argument(
        "--database-url",
        help="server to create the bench databases on [$BENCH_DATABASE_URL, "
        f"$TEST_DATABASE_URL, {DEFAULT_URL}]",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=REPO / "config" / "retention.toml",
        help="the job's config [config/retention.toml]",
    )
    p.add_argument(
        "--contenders",
        default="abcd",
        help="which contenders, e.g. 'ab' [abcd]: a bound, b job, c skiplock, d naive, e shards",
    )
    p.add_argument(
        "--job-bin",
        type=Path,
        default=os.environ.get("BENCH_JOB_BIN") or None,
        help="the dispatch-retention executable to measure [$BENCH_JOB_BIN, else the one "
        "beside this Python]; `make bench` builds one as the image has it: a wheel and the "
        "locked dependencies in a virtualenv of its own",
    )
    p.add_argument(
        "--job-args",
        default="",
        help="extra arguments for `dispatch-retention run`, e.g. '--chunk-size 10000'",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=0,
        help="also run (e): N job processes at once, `run --shard I/N` each [off]",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run (a), (b) and (e) this many times each, taking turns, and report the run of "
        "median time (the others are listed beside it) [1]",
    )
    p.add_argument("--chunk-size", type=int, help="(c)'s chunk size [the config's chunk_size]")
    p.add_argument("--naive-sample", type=int, default=20_000, help="(d)'s sample rows [20000]")
    p.add_argument("--naive-commit", type=int, default=1000, help="(d) commits every N [1000]")
    p.add_argument("--sparse-rows", type=int, default=3000, help="due rows left in sparse [3000]")
    p.add_argument(
        "--nightly-fraction",
        type=float,
        default=0.01,
        help="share of the table due in nightly [0.01]",
    )
    p.add_argument(
        "--margin-hours",
        type=float,
        default=24.0,
        help="no row comes due within this long of the template's build [24]",
    )
    p.add_argument(
        "--autovacuum",
        choices=("on", "off"),
        default="off",
        help="autovacuum on the bench table [off: its timing is noise between contenders]",
    )
    args = p.parse_args(argv)
    p_contenders = args.contenders.lower()
    if args.shards and args.shards > 1 and "e" not in p_contenders:
        p_contenders += "e"
    args.contenders = [k for k in "abecd" if k in p_contenders]
    if "e" in args.contenders and (args.shards or 0) < 2:
        p.error("contender e needs --shards N (N >= 2)")
    if not args.contenders:
        p.error("--contenders: name at least one of a, b, c, d")
    if args.rows < 1000:
        p.error("--rows: at least 1000")
    if args.repeat < 1:
        p.error("--repeat: at least 1")
    args.config = args.config.absolute()
    args.database_url = (
        args.database_url
        or os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("TEST_DATABASE_URL")
        or DEFAULT_URL
    )
    return args


@contextmanager
def terminated_on_signals() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = config.load(args.config)
    except config.ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    server = Server(args.database_url)
    prefix = f"bench_{os.getpid()}"
    started = time.monotonic()
    report: dict[str, Any] = {
        "bench": {
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "rows": args.rows,
            "scenarios": scenarios,
            "contenders": {k: CONTENDERS[k] for k in args.contenders},
            "config": str(args.config),
            "job_args": args.job_args,
            "server": server.libpq_url("", hide_password=True),
            "server_version": server.version,
            "server_settings": server.settings,
            "autovacuum": args.autovacuum,
            "repeat": args.repeat,
            "naive_sample": args.naive_sample,
            "naive_commit": args.naive_commit,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "scenarios": [],
    }
    bench = Bench(server, settings, args)
    report["bench"]["job"] = job_install(bench.job_bin)
    failed: BaseException | None = None
    try:
        with terminated_on_signals():
            for scenario in scenarios:
                report["scenarios"].append(run_scenario(bench, scenario, prefix))
    except (Exception, KeyboardInterrupt) as exc:
        failed = exc
    finally:
        for proc in list(bench.procs):
            if proc.poll() is None:
                proc.kill()  # our own child, by its pid
                with suppress(ChildProcessError):
                    proc.wait()
        server.drop_all()
        server.admin.dispose()
    report["bench"]["wall_s"] = round(time.monotonic() - started, 1)
    if failed is not None:
        report["error"] = f"{type(failed).__name__}: {failed}"
    if report["scenarios"]:
        print_report(report)
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json_path}")
    if failed is not None:
        if isinstance(failed, KeyboardInterrupt):
            signum = failed.signum if isinstance(failed, Terminated) else signal.SIGINT
            log(f"stopped by signal {signum}; the bench databases were dropped")
            return 128 + signum
        log(f"failed: {report['error']}; the bench databases were dropped")
        raise failed
    problems = sum(len(c["problems"]) for s in report["scenarios"] for c in s["contenders"])
    if problems:
        log(f"{problems} problem(s): see the WARNING lines")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
