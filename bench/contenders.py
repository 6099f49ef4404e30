"""The contenders, each measured alone on its own copy of a scenario's template.

Every contender gets its own copy (`CREATE DATABASE ... TEMPLATE`), a CHECKPOINT, and is
measured alone on it; the copy is dropped before the next contender starts:
  (a) bound     one UPDATE over every due row (the physical bound);
  (b) job       `dispatch-retention run --yes` as a real subprocess, shipped config;
  (e) shards    with --shards N: N job processes at once, `run --shard I/N` each;
  (f) unchained (b) with the audit trail's hash chain triggers turned off on its copy: what
                the chain costs a run is (b) against (f) (not a way to run the job);
  (c) skiplock  the textbook loop: UPDATE ... WHERE id IN (SELECT id ... ORDER BY id
                LIMIT n FOR UPDATE SKIP LOCKED), commit per chunk, until 0 rows;
  (d) naive     select the due ids, one UPDATE per row, commit per 1000, on a sample
                (first --naive-sample due rows), the rate extrapolated to all due rows.
Each contender's cleaned rows are counted on its copy and compared with (a). With
--repeat N, the contenders whose spec `repeats` run N times each, taking turns (a, b, e,
a, b, e, ...), each on a fresh copy, and the run of median time stands for the contender:
one run of the bound varies from run to run on a shared machine (checkpoints, the page
cache) by more than the margins the targets ask about.

The contenders write what the job writes (`policy.cleaned_values()`, `cleaned_at` and
`updated_at` set to `now()`) to the rows the job's rule finds due (`policy.due()`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, func, literal, select, update

from dispatch_retention import config
from dispatch_retention.pg import engines
from dispatch_retention.rule import dispatch_table, policy

from .jobs import find_job_bin, job_breakdown, job_has_command, job_outcome, run_job
from .report import Result, _r, median_run, ratio
from .scenarios import Template, build_template, due_expr
from .server import QUOTE, Server, log, sql


class Bench:
    """One bench run's server, settings and options, and the job processes running now."""

    def __init__(self, server: Server, settings: config.Settings, args: argparse.Namespace) -> None:
        self.server, self.settings, self.args = server, settings, args
        self.table = dispatch_table.dispatches_table(settings.target)
        self.values = policy.cleaned_values(settings) | {
            "cleaned_at": func.now(),
            "updated_at": func.now(),
        }
        self.job_bin = find_job_bin(args.job_bin)
        self.job_has_db = job_has_command(self.job_bin, "db")
        self.procs: list[subprocess.Popen[bytes]] = []  # running job processes

    def measure(self, tpl: Template, spec: Contender, due_rows: int) -> Result:
        """One contender on one fresh copy."""
        key = spec.key
        result = Result(key=key, name=spec.name)
        copy = f"{tpl.name[:-4]}_{key}"  # ..._tpl -> ..._a
        log(f"{tpl.scenario}: ({key}) {result.name}: copying the template")
        self.server.create_database(copy, template=tpl.name)
        try:
            if spec.runs_job and self.job_has_db:
                self.job(copy, "db", "upgrade", check=True)
            self.server.checkpoint()
            started_db = self.server.now(copy)
            before, activity = self.server.wal_position(), self.server.activity()
            log(f"{tpl.scenario}: ({key}) {result.name}: running")
            spec.run(self, copy, result, due_rows)
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
            now = engines.database_now(conn)
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

    def job(self, copy: str, *command: str, check: bool = False) -> dict[str, Any]:
        """The job on `copy` as a subprocess (`jobs.run_job`), killed if the bench stops."""
        return run_job(
            self.job_bin,
            self.args.config,
            self.server.libpq_url(copy),
            command,
            self.procs,
            check=check,
        )


# --- the contenders --------------------------------------------------------------------------


def bound(bench: Bench, copy: str, result: Result, _due_rows: int) -> None:
    """(a) one UPDATE over everything due."""
    now = bench.server.now(copy)
    stmt = sql(
        update(bench.table).where(due_expr(bench.settings, bench.table, now)).values(bench.values)
    )
    with bench.server.connect(copy) as conn:
        t0 = time.perf_counter()
        cur = conn.execute(stmt, prepare=False)
        conn.commit()
        result.seconds = time.perf_counter() - t0
        result.rows = cur.rowcount
        result.chunk_ms = [result.seconds * 1000]


def job(bench: Bench, copy: str, result: Result, _due_rows: int) -> None:
    """(b) the real job."""
    out = bench.job(copy, "run", "--yes", *shlex.split(bench.args.job_args))
    result.peak_rss_mb = out["peak_rss_mb"]
    result.seconds = out["wall_s"]
    rows, chunk_ms = job_outcome(out, result.problems)
    result.rows, result.chunk_ms = rows, chunk_ms
    result.detail["job"] = job_breakdown(out, out["events"], chunk_ms)


def unchained(bench: Bench, copy: str, result: Result, due_rows: int) -> None:
    """(f) the real job, its run and chunk records writing no event (the bench's admin
    turns the triggers of migration 0005 off on this copy)."""
    audit = QUOTE(bench.settings.audit.schema_)
    with bench.server.connect(copy) as conn:
        for table in ("runs", "chunks"):
            conn.execute(f"ALTER TABLE {audit}.{table} DISABLE TRIGGER {table}_event")
        conn.commit()
    job(bench, copy, result, due_rows)


def shards(bench: Bench, copy: str, result: Result, _due_rows: int) -> None:
    """(e) N job processes at once, one per shard (`run --shard I/N`)."""
    n = bench.args.shards
    outs: list[dict[str, Any] | BaseException | None] = [None] * n

    def one(i: int) -> None:
        try:
            outs[i] = bench.job(
                copy, "run", "--yes", "--shard", f"{i}/{n}", *shlex.split(bench.args.job_args)
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


def skiplock(bench: Bench, copy: str, result: Result, _due_rows: int) -> None:
    """(c) the textbook SKIP LOCKED loop."""
    table = bench.table
    size = bench.args.chunk_size or bench.settings.clean.chunk_size
    now = bench.server.now(copy)
    pick = (
        select(table.c.id)
        .where(due_expr(bench.settings, table, now))
        .order_by(table.c.id)
        .limit(size)
        .with_for_update(skip_locked=True)
    )
    stmt = sql(update(table).where(table.c.id.in_(pick.scalar_subquery())).values(bench.values))
    with bench.server.connect(copy) as conn:
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


def naive(bench: Bench, copy: str, result: Result, due_rows: int) -> None:
    """(d) the naive per-row loop, on a sample; its rate is extrapolated to `due_rows`."""
    table = bench.table
    sample = bench.args.naive_sample
    per_commit = bench.args.naive_commit
    now = bench.server.now(copy)
    pick = sql(
        select(table.c.id)
        .where(due_expr(bench.settings, table, now))
        .order_by(table.c.id)
        .limit(sample)
    )
    # One row by its id (a psycopg placeholder; the SET part is compiled literally).
    marker = 987_654_321_987_654_321
    one = sql(
        update(table)
        .where(table.c.id == literal(marker, BigInteger), table.c.cleaned_at.is_(None))
        .values(bench.values)
    ).replace("%", "%%")
    assert one.count(str(marker)) == 1
    one = one.replace(str(marker), "%s")
    with bench.server.connect(copy) as conn:
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


@dataclass(frozen=True)
class Contender:
    key: str  # the letter of --contenders and of the report
    name: str
    run: Callable[[Bench, str, Result, int], None]  # (bench, copy, result, due rows)
    repeats: bool  # with --repeat N: N runs, taking turns with the others; else one
    runs_job: bool  # the job's `db upgrade` runs on its copy first (not timed)


#: In the order they run in each round (and are reported in).
CONTENDERS = (
    Contender("a", "bound", bound, repeats=True, runs_job=False),
    Contender("b", "job", job, repeats=True, runs_job=True),
    Contender("e", "shards", shards, repeats=True, runs_job=True),
    Contender("f", "unchained", unchained, repeats=True, runs_job=True),
    Contender("c", "skiplock", skiplock, repeats=False, runs_job=False),
    Contender("d", "naive", naive, repeats=False, runs_job=False),
)
BY_KEY = {c.key: c for c in CONTENDERS}


def run_scenario(bench: Bench, scenario: str, prefix: str) -> dict[str, Any]:
    """Build the scenario's template, measure the chosen contenders on copies of it, drop it."""
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
        # The repeated ones take turns, --repeat times; the others run once, in the first round.
        for round_no in range(args.repeat):
            for key in args.contenders:
                spec = BY_KEY[key]
                if round_no and not spec.repeats:
                    continue
                # what (d) extrapolates to: the rows the bound cleaned, else the template's count
                due = runs["a"][0].rows if runs.get("a") else tpl.due_rows
                runs[key].append(bench.measure(tpl, spec, due))
    finally:
        bench.server.drop_database(name)
    results = {key: median_run(measured) for key, measured in runs.items() if measured}
    bound_result = results.get("a")
    for key, res in results.items():
        if res.rows != tpl.due_rows and not res.problems:
            res.problems.append(f"cleaned {res.rows} rows, the template had {tpl.due_rows} due")
        if bound_result is not None and key != "a" and res.rows != bound_result.rows:
            res.problems.append(f"cleaned {res.rows} rows, the bound cleaned {bound_result.rows}")
        if res.still_due and not res.extrapolated:
            res.problems.append(f"{res.still_due} rows still due afterwards")
    job_result = results.get("b")
    if job_result is not None and "job" in job_result.detail and bound_result is not None:
        in_run = job_result.detail["job"].get("in_run_s")
        job_result.detail["job"]["ratio_in_run"] = (
            ratio(bound_result, job_result, in_run) if in_run else None
        )
    contenders = [res.as_dict(bound_result) for res in results.values()]
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
