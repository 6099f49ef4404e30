"""The live scenario: what a run costs the application around it, and its streaming replica.

    python -m bench.live --rows 1000000 --turns 5 --load-s 60 --json PATH
    make bench-live

Its own primary and streaming replica, made here in a temporary directory with the
machine's PostgreSQL binaries (`initdb`, then `pg_basebackup -R` from that primary, never
from the shared server; `tests/matrix/servers.py`), on loopback ports, fsync on, removed
afterwards. On the primary a backlog template (`scenarios.build_template`) that carries the
run role's grants and the replica lag function (`db grants --purpose run`: the job runs as
that role, as it ships).

Each turn, per settings variant (`VARIANTS`, taken in turns: a, b, c, a, b, c, ...): a fresh
copy of the template, the replica caught up, a CHECKPOINT; then the application's load for
`--load-s` seconds without the job (`off`), then the same load while the job runs (`on`),
repeated on new copies until the `on` phase has lasted `--load-s` too. The load is open loop
(`Workload`): each kind of operation arrives at a fixed mean rate (Poisson, seeded), on a
connection of its own, and its latency counts from when it was due to start, so a stalled
client is not hidden. The kinds: new dispatches, recent ones moving scheduled -> transmitted
-> delivered, late delivery receipts on old (due) rows, reads of a member's latest 50
dispatches on the primary and on the replica. Errors are counted by kind (lock timeout,
deadlock, conflict with recovery on the replica, other).

Sampled every 100 ms: the replica's lag as bytes of WAL not replayed and as a delay
(`throttle.LagClock`, the job's own measure: PostgreSQL's `replay_lag` goes stale while
idle). Reported per variant: each kind's p50, p99 and max with and without the run (the
ratio of p99s per turn, its median and spread), errors, the run's time against the single
UPDATE over every due row under the same load (`--bound-turns` turns of it), the chunks'
p99, WAL bytes per cleaned row, checkpoints, the replica's worst lag, the job's peak RSS,
and the slowest operations with what the run was doing when they were due (`stalls`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import func, literal, select, update
from tests.matrix import servers

from dispatch_retention import config
from dispatch_retention.checks import db_grants
from dispatch_retention.rule import dispatch_table, policy
from dispatch_retention.run.throttle import Lag, LagClock

from .jobs import find_job_bin, run_job
from .scenarios import build_template, due_expr
from .server import REPO, Server, log, sql

#: The primary's and the replica's settings: fsync and full-page writes on (what a live
#: database pays), checkpoints logged (their times are read back from the log).
SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c log_checkpoints=on -c max_wal_size=1GB "
    "-c log_line_prefix='%m [%p] ' -c log_timezone=UTC"
)
#: The settings variants the report compares: [clean] keys of the shipped config replaced.
VARIANTS: dict[str, dict[str, str]] = {
    "defaults": {},
    "half": {"max_busy_fraction": "0.5", "max_replica_lag_s": "2"},
    "half_short": {"max_busy_fraction": "0.5", "target_chunk_ms": "50", "max_replica_lag_s": "2"},
    "quarter": {"max_busy_fraction": "0.25", "max_replica_lag_s": "2"},
    "quarter_short": {
        "max_busy_fraction": "0.25",
        "target_chunk_ms": "50",
        "max_replica_lag_s": "2",
    },
}
KINDS = ("insert", "progress", "late_receipt", "member_read", "replica_read")
#: Kinds that never touch a due row: their p99 ratio is what the targets bound.
UNTOUCHED = ("insert", "progress", "member_read", "replica_read")
RUN_ROLE = "bench_live_run"
TEMPLATE = "live_template"


# --- the application's load --------------------------------------------------------------


@dataclass
class Sample:
    due: float  # wall time the operation was due to start
    ms: float  # from then to its end
    error: str | None = None


class Workload:
    """The application: one thread and connection per kind, each at a mean `rate` per second
    (Poisson arrivals from a seeded generator), latency counted from the due time."""

    def __init__(self, primary: str, replica: str, rate: float, seed: int, ids: dict[str, Any]):
        self.primary, self.replica, self.rate, self.seed = primary, replica, rate, seed
        self.ids = ids  # next_id, due_ids, members
        self.samples: dict[str, list[Sample]] = {k: [] for k in KINDS}
        self.recent: list[int] = []  # inserted ids, for `progress`
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(kind, i), daemon=True)
            for i, kind in enumerate(KINDS)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _loop(self, kind: str, n: int) -> None:
        rng = random.Random(self.seed * 31 + n)
        url = self.replica if kind == "replica_read" else self.primary
        with psycopg.connect(url, autocommit=True, application_name=f"app_{kind}") as conn:
            conn.execute("SET lock_timeout = '5s'")
            op = self._operation(kind, conn, rng)
            due = time.time()
            while not self.stop.is_set():
                due += rng.expovariate(self.rate)
                wait = due - time.time()
                if wait > 0 and self.stop.wait(wait):
                    return
                error = None
                try:
                    op()
                except psycopg.Error as exc:
                    error = _error_kind(exc)
                self.samples[kind].append(Sample(due, (time.time() - due) * 1000, error))

    def _operation(
        self, kind: str, conn: psycopg.Connection[Any], rng: random.Random
    ) -> Callable[[], None]:
        ids = self.ids

        def insert() -> None:
            with self.lock:
                new = ids["next_id"]
                ids["next_id"] += 1
            member = rng.choice(ids["members"])
            conn.execute(
                "INSERT INTO dispatches (id, type, content, member_id, msisdn, email, app_token,"
                " transmission_status, delivery_status, created_at, updated_at, scheduled_at)"
                " VALUES (%s, 'sms', '{\"body\": \"hello\"}', %s, '+4700000000',"
                " 'app@example.invalid', 'token', 'scheduled', 'pending', now(), now(), now())",
                (new, member),
            )
            with self.lock:
                self.recent.append(new)
                del self.recent[:-2000]

        def progress() -> None:
            with self.lock:
                if not self.recent:
                    return
                row = rng.choice(self.recent)
            if rng.random() < 0.5:
                conn.execute(
                    "UPDATE dispatches SET transmission_status = 'transmitted',"
                    " transmitted_at = now(), updated_at = now() WHERE id = %s",
                    (row,),
                )
            else:
                conn.execute(
                    "UPDATE dispatches SET delivery_status = 'delivered',"
                    " external_delivery_status = 'delivered', delivered_at = now(),"
                    " updated_at = now() WHERE id = %s",
                    (row,),
                )

        def late_receipt() -> None:
            conn.execute(
                "UPDATE dispatches SET external_delivery_status = 'delivered' WHERE id = %s",
                (rng.choice(ids["due_ids"]),),
            )

        def member_read() -> None:
            conn.execute(
                "SELECT id, type, delivery_status, created_at FROM dispatches"
                " WHERE member_id = %s ORDER BY created_at DESC LIMIT 50",
                (rng.choice(ids["members"]),),
            ).fetchall()

        return {
            "insert": insert,
            "progress": progress,
            "late_receipt": late_receipt,
            "member_read": member_read,
            "replica_read": member_read,
        }[kind]


def _error_kind(exc: psycopg.Error) -> str:
    state = exc.sqlstate or ""
    if state == "55P03":
        return "lock_timeout"
    if state == "40P01":
        return "deadlock"
    if state == "40001" or "recovery" in str(exc):
        return "recovery_conflict"
    return f"other_{state or type(exc).__name__}"


# --- the replica's lag, and the machine ---------------------------------------------------


class LagSampler:
    """Every 100 ms: bytes of WAL the replica has not replayed, and the delay that is: the
    larger of the time since the first WAL position it has not replayed was seen
    (`LagClock`, the job's measure) and the distance over the replay rate of the last second
    (PostgreSQL's own `replay_lag` goes stale while idle)."""

    def __init__(self, admin_url: str) -> None:
        self.url = admin_url
        self.samples: list[tuple[float, int, float]] = []  # (wall time, bytes, seconds)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        clock = LagClock()
        replays: list[tuple[float, int]] = []  # (monotonic, replayed position) of the last second
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.wait(0.1):
                row = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'),"
                    " (SELECT pg_wal_lsn_diff(min(replay_lsn), '0/0') FROM pg_stat_replication"
                    "  WHERE state = 'streaming'),"
                    " (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming')"
                ).fetchone()
                assert row is not None
                wal, replayed, standbys = int(row[0]), row[1], int(row[2])
                lag = Lag(standbys, 0, wal, None if replayed is None else int(replayed), None, 0)
                now = time.monotonic()
                seconds = clock.lag_s(lag, now)
                if lag.replayed_bytes is not None:
                    replays.append((now, lag.replayed_bytes))
                    del replays[:-11]
                    span = replays[-1][0] - replays[0][0]
                    rate = (replays[-1][1] - replays[0][1]) / span if span > 0 else 0
                    if lag.behind_bytes and rate > 0:
                        seconds = max(seconds, lag.behind_bytes / rate)
                self.samples.append((time.time(), lag.behind_bytes, seconds))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)

    def worst(self, start: float, end: float) -> dict[str, float]:
        inside = [(b, s) for t, b, s in self.samples if start <= t < end]
        if not inside:
            return {"bytes": 0, "s": 0.0}
        return {"bytes": max(b for b, _ in inside), "s": round(max(s for _, s in inside), 3)}


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the machine so far (/proc/stat)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# --- one invocation ----------------------------------------------------------------------


@dataclass
class Cluster:
    primary: servers.Server
    replica: servers.Server
    server: Server  # the bench's admin access to the primary

    def url(self, database: str, *, replica: bool = False, role: str = "postgres") -> str:
        base = (self.replica if replica else self.primary).url
        host = base.split("@", 1)[1].rsplit("/", 1)[0]
        return f"postgresql://{role}@{host}/{database}"

    def caught_up(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*), coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(),"
                    " replay_lsn)), 0) FROM pg_stat_replication WHERE state = 'streaming'"
                ).fetchone()
                assert row is not None
                if row[0] >= 1 and row[1] == 0:
                    return
                time.sleep(0.1)
        raise RuntimeError("the replica did not catch up")

    def checkpoints(self, since: float) -> list[dict[str, float]]:
        """The checkpoints the primary's log says began at or after `since` (wall time)."""
        text = (self.primary.home / "data.log").read_text(errors="replace")
        found: list[dict[str, float]] = []
        for line in text.splitlines():
            hit = re.match(r"(\S+ \S+) \S+ \[\d+\] LOG:  checkpoint (starting|complete)", line)
            if not hit:
                continue
            # log_timezone is UTC (SERVER_OPTIONS)
            at = datetime.strptime(f"{hit[1]} +0000", "%Y-%m-%d %H:%M:%S.%f %z").timestamp()
            if hit[2] == "starting" and at >= since:
                found.append({"start": at})
            elif hit[2] == "complete" and found and "end" not in found[-1]:
                found[-1]["end"] = at
        return found


@contextmanager
def cluster(extra: str = "") -> Iterator[Cluster]:
    """The primary and its replica, with SERVER_OPTIONS and `extra` (`-c name=value ...`)."""
    binaries = _binaries()
    options = f"{SERVER_OPTIONS} {extra}".strip()
    with (
        servers.server(binaries, 0, options) as primary,
        servers.standby(binaries, primary, options) as replica,
    ):
        server = Server(primary.url)
        try:
            yield Cluster(primary, replica, server)
        finally:
            server.admin.dispose()


def _binaries() -> servers.Binaries:
    for source in servers.SOURCES[15]:
        if isinstance(source, servers.Installed) and source.available(Path()):
            return source.install(Path())
    raise SystemExit("bench.live needs the machine's PostgreSQL 15 (/usr/lib/postgresql/15)")


def variant_config(base: Path, changes: dict[str, str], into: Path) -> Path:
    """The shipped config with `changes` to its [clean] keys (each must be there)."""
    text = base.read_text()
    for key, value in changes.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if n != 1:
            raise SystemExit(f"{base}: no single `{key} = ` line to change")
    into.write_text(text)
    return into


def prepare_template(
    c: Cluster, settings: config.Settings, args: argparse.Namespace
) -> dict[str, Any]:
    tpl_args = argparse.Namespace(
        rows=args.rows, margin_hours=24.0, autovacuum="on", nightly_fraction=0.01, sparse_rows=0
    )
    tpl = build_template(c.server, TEMPLATE, settings, "backlog", tpl_args)
    job_bin = find_job_bin(args.job_bin)
    run_job(job_bin, args.config, c.url(TEMPLATE), ("db", "upgrade"), [], check=True)
    lagged = config.parse(
        variant_config(args.config, {"max_replica_lag_s": "2"}, args.work / "lag.toml").read_text()
    )
    with psycopg.connect(c.url(TEMPLATE), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {RUN_ROLE} LOGIN")
        for statement in [
            *db_grants.statements(settings, RUN_ROLE, "run"),
            *db_grants.lag_statements(lagged, RUN_ROLE),
        ]:
            conn.execute(statement.encode())
        table = dispatch_table.dispatches_table(settings.target)
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        due_ids = [
            r[0]
            for r in conn.execute(
                sql(
                    select(table.c.id)
                    .where(due_expr(settings, table, now))
                    .order_by(func.random())
                    .limit(5000)
                )
            )
        ]
        members = [r[0] for r in conn.execute(
            "SELECT DISTINCT member_id FROM dispatches WHERE member_id IS NOT NULL LIMIT 5000"
        )]  # fmt: skip
        next_id = conn.execute("SELECT max(id) + 1 FROM dispatches").fetchone()[0]  # type: ignore[index]
    c.server.checkpoint()
    return {
        "rows": tpl.rows,
        "due_rows": tpl.due_rows,
        "table_bytes": tpl.table_bytes,
        "build_s": round(tpl.build_s, 1),
        "ids": {"next_id": int(next_id), "due_ids": due_ids, "members": members},
    }


def fresh_copy(c: Cluster, name: str) -> None:
    c.server.create_database(name, TEMPLATE)
    c.caught_up()
    c.server.checkpoint()
    c.caught_up()
    time.sleep(1)


def drop_copy(c: Cluster, name: str) -> None:
    c.caught_up()
    c.server.wait_no_backends(name)
    c.server.drop_database(name)


def bound_statement(settings: config.Settings, now: datetime) -> str:
    table = dispatch_table.dispatches_table(settings.target)
    values: dict[str, Any] = policy.cleaned_values(settings)
    values["cleaned_at"] = values["updated_at"] = literal(now)
    return sql(update(table).where(due_expr(settings, table, now)).values(values))


def load_turn(
    c: Cluster,
    args: argparse.Namespace,
    ids: dict[str, Any],
    copy: str,
    seed: int,
    work: Callable[[], dict[str, Any]],
    off_s: float,
) -> dict[str, Any]:
    """The load on `copy`: `off_s` seconds without the work, then during `work()`."""
    ids = {**ids}
    load = Workload(c.url(copy), c.url(copy, replica=True), args.rate, seed, ids)
    lag = LagSampler(c.url("postgres"))
    load.start()
    time.sleep(2)  # connections made, first operations done: not counted
    off = (time.time(), cpu_busy())
    time.sleep(off_s)
    on = (time.time(), cpu_busy())
    wal_before = c.server.wal_position()
    done = work()
    ended = (time.time(), cpu_busy())
    wal_after = c.server.wal_position()
    load.close()
    lag.close()
    phases = {"off": (off[0], on[0]), "on": (on[0], ended[0])}
    out: dict[str, Any] = {"work": done, "phases": {}}
    for name, (start, end) in phases.items():
        cpu0, cpu1 = (off[1], on[1]) if name == "off" else (on[1], ended[1])
        out["phases"][name] = {
            "s": round(end - start, 2),
            "cpu_busy": round((cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1), 3),
            "lag": lag.worst(start, end),
            "kinds": {
                kind: [s for s in samples if start <= s.due < end]
                for kind, samples in load.samples.items()
            },
        }
    out["wal"] = c.server.wal_diff(wal_before, wal_after)
    out["checkpoints"] = [
        {k: round(v - on[0], 3) for k, v in cp.items()} for cp in c.checkpoints(on[0])
    ]
    out["on_started"] = on[0]
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def summarize_kinds(phase: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for kind, samples in phase["kinds"].items():
        ms = [s.ms for s in samples]
        errors: dict[str, int] = {}
        for s in samples:
            if s.error:
                errors[s.error] = errors.get(s.error, 0) + 1
        out[kind] = {
            "n": len(ms),
            "p50": pct(ms, 0.5),
            "p99": pct(ms, 0.99),
            "max": round(max(ms), 2) if ms else None,
            "errors": errors,
        }
    return out


def stalls(
    turn: dict[str, Any], events: list[dict[str, Any]], limit: int = 8
) -> list[dict[str, Any]]:
    """The slowest operations of the `on` phase, with what the run was doing when each was
    due: the chunk whose commit came next (or the plan, the end count), a checkpoint."""
    start = turn["on_started"]
    marks = []
    for e in events:
        with suppress(KeyError, ValueError):
            marks.append((datetime.fromisoformat(str(e["timestamp"])).timestamp(), e["event"]))
    marks.sort()
    slow = sorted(
        (
            (s.ms, kind, s.due)
            for kind, samples in turn["phases"]["on"]["kinds"].items()
            for s in samples
        ),
        reverse=True,
    )[:limit]
    out = []
    for ms, kind, due in slow:
        nxt = next((name for at, name in marks if at >= due), "after the run")
        chunk_no = sum(1 for at, name in marks if name == "chunk_committed" and at < due) + 1
        during = f"chunk {chunk_no}" if nxt == "chunk_committed" else f"before {nxt}"
        at_s = due - start
        in_checkpoint = any(
            cp["start"] <= at_s <= cp.get("end", float("inf")) for cp in turn["checkpoints"]
        )
        out.append(
            {
                "kind": kind,
                "ms": round(ms, 1),
                "at_s": round(at_s, 2),
                "during": during,
                "checkpoint": in_checkpoint,
            }
        )
    return out


def run_variant_turn(
    c: Cluster,
    args: argparse.Namespace,
    prepared: dict[str, Any],
    variant: str,
    config_path: Path,
    turn: int,
) -> dict[str, Any]:
    """One turn: segments of load on a fresh copy each, some seconds without the run and
    then during it, until both phases have lasted `--load-s` (the run repeated as needed)."""
    job_bin = find_job_bin(args.job_bin)
    segments: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    done = {"off": 0.0, "on": 0.0}
    expected = args.load_s / 2  # the first segment's share without the run
    while min(done.values()) < args.load_s:
        copy = f"live_{variant}_{turn}_{len(segments)}"
        fresh_copy(c, copy)
        url = c.url(copy, role=RUN_ROLE)

        def work(url: str = url) -> dict[str, Any]:
            return run_job(job_bin, config_path, url, ("run", "--yes"), [])

        off_s = max(1.0, min(args.load_s - done["off"], expected))
        try:
            seed = turn * 100 + len(segments)
            out = load_turn(c, args, prepared["ids"], copy, seed, work, off_s)
        finally:
            drop_copy(c, copy)
        job = out.pop("work")
        runs.append(job)
        segments.append(out)
        for name in done:
            done[name] += out["phases"][name]["s"]
        expected = max(out["phases"]["on"]["s"], 1.0)
    events = [e for job in runs for e in job["events"]]
    finished = [e for e in events if e.get("event") == "run_finished"]
    chunks = [float(e["ms"]) for e in events if e.get("event") == "chunk_committed"]
    rows = sum(int(e.get("rows_cleaned", 0)) for e in finished)
    wal = sum(int(seg["wal"]["bytes"]) for seg in segments)
    result: dict[str, Any] = {
        "turn": turn,
        "runs": len(runs),
        "returncode": max(job["returncode"] for job in runs),
        "status": sorted({str(e.get("status")) for e in finished} or {"none"}),
        "run_s": _median([job["wall_s"] for job in runs]),
        "rows_cleaned": rows,
        "chunks": len(chunks),
        "chunk_p99_ms": pct(chunks, 0.99),
        "replica_wait_s": round(sum(float(e.get("replica_wait_s", 0)) for e in finished), 3),
        "peak_rss_mb": round(max(job["peak_rss_mb"] for job in runs), 1),
        "wal_bytes_per_row": round(wal / rows, 1) if rows else None,
        "checkpoints_during_runs": sum(len(seg["checkpoints"]) for seg in segments),
        "stalls": sorted(
            (
                {**stall, "run": n + 1}
                for n, (seg, job) in enumerate(zip(segments, runs, strict=True))
                for stall in stalls(seg, job["events"])
            ),
            key=lambda stall: -float(stall["ms"]),
        )[:8],
        "phases": {name: merged(segments, name) for name in ("off", "on")},
    }
    bad = [job["stderr_tail"] for job in runs if job["returncode"] != 0]
    if bad:
        result["stderr_tail"] = bad[0]
    return result


def merged(segments: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One phase over a turn's segments: its seconds, the machine's busy share, the worst
    replica lag, each kind's figures over all its operations."""
    phases = [seg["phases"][name] for seg in segments]
    seconds = sum(p["s"] for p in phases)
    return {
        "s": round(seconds, 2),
        "cpu_busy": round(sum(p["cpu_busy"] * p["s"] for p in phases) / max(seconds, 1e-9), 3),
        "lag": {
            "bytes": max(p["lag"]["bytes"] for p in phases),
            "s": max(p["lag"]["s"] for p in phases),
        },
        "kinds": summarize_kinds(
            {"kinds": {k: [x for p in phases for x in p["kinds"][k]] for k in KINDS}}
        ),
    }


def run_bound_turn(
    c: Cluster,
    args: argparse.Namespace,
    prepared: dict[str, Any],
    settings: config.Settings,
    n: int,
) -> dict[str, Any]:
    copy = f"live_bound_{n}"
    fresh_copy(c, copy)

    def work() -> dict[str, Any]:
        with psycopg.connect(c.url(copy), autocommit=True) as conn:
            now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            began = time.perf_counter()
            rows = conn.execute(bound_statement(settings, now)).rowcount
            return {"s": time.perf_counter() - began, "rows": rows}

    try:
        out = load_turn(c, args, prepared["ids"], copy, 1000 + n, work, args.load_s / 2)
    finally:
        drop_copy(c, copy)
    return {"s": round(out["work"]["s"], 2), "rows": out["work"]["rows"]}


def summarize(turns: list[dict[str, Any]], bound_s: float | None) -> dict[str, Any]:
    """Per kind: the median over turns of p50/p99/max off and on, and of each turn's p99
    ratio (on / off), with the ratios' spread."""
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        per = [(t["phases"]["off"]["kinds"][kind], t["phases"]["on"]["kinds"][kind]) for t in turns]
        ratios = [on["p99"] / off["p99"] for off, on in per if on["p99"] and off["p99"]]
        errors: dict[str, int] = {}
        for _, on in per:
            for k, v in on["errors"].items():
                errors[k] = errors.get(k, 0) + v
        kinds[kind] = {
            "off_p50": _median([off["p50"] for off, _ in per]),
            "off_p99": _median([off["p99"] for off, _ in per]),
            "on_p50": _median([on["p50"] for _, on in per]),
            "on_p99": _median([on["p99"] for _, on in per]),
            "on_max": _median([on["max"] for _, on in per]),
            "p99_ratio": round(statistics.median(ratios), 2) if ratios else None,
            "p99_ratio_spread": [round(min(ratios), 2), round(max(ratios), 2)] if ratios else None,
            "on_errors": errors,
            "off_errors": sum(sum(off["errors"].values()) for off, _ in per),
        }
    run_s = _median([t["run_s"] for t in turns])
    return {
        "turns": len(turns),
        "kinds": kinds,
        "worst_untouched_p99_ratio": max((kinds[k]["p99_ratio"] or 0) for k in UNTOUCHED),
        "run_s": run_s,
        "throughput_vs_bound": round(bound_s / run_s, 3) if bound_s and run_s else None,
        "chunk_p99_ms": _median([t["chunk_p99_ms"] for t in turns]),
        "late_receipt_budget_ms": (
            round(kinds["late_receipt"]["off_p99"] + _median([t["chunk_p99_ms"] for t in turns]), 1)
            if kinds["late_receipt"]["off_p99"] is not None and turns[0]["chunk_p99_ms"]
            else None
        ),
        "wal_bytes_per_row": _median([t["wal_bytes_per_row"] for t in turns]),
        "replica_lag_on": {
            "bytes": max(t["phases"]["on"]["lag"]["bytes"] for t in turns),
            "s": max(t["phases"]["on"]["lag"]["s"] for t in turns),
        },
        "replica_lag_off": {
            "bytes": max(t["phases"]["off"]["lag"]["bytes"] for t in turns),
            "s": max(t["phases"]["off"]["lag"]["s"] for t in turns),
        },
        "cpu_busy_off": _median([t["phases"]["off"]["cpu_busy"] for t in turns]),
        "cpu_busy_on": _median([t["phases"]["on"]["cpu_busy"] for t in turns]),
        "peak_rss_mb": max(t["peak_rss_mb"] for t in turns),
        "statuses": sorted({status for t in turns for status in t["status"]}),
        "runs": sum(t["runs"] for t in turns),
    }


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def print_report(report: dict[str, Any]) -> None:
    b = report["bench"]
    print(
        f"live: {b['rows']} rows ({b['due_rows']} due), {b['turns']} turn(s) per variant, "
        f"load {b['rate']}/s per kind x {len(KINDS)} kinds, {b['load_s']} s per phase; "
        f"bound under load {report['bound_s']} s"
    )
    for name, v in report["variants"].items():
        print(
            f"\n[{name}] {VARIANTS[name] or 'the shipped config'}: run {v['run_s']} s, "
            f"{v['throughput_vs_bound']}x the bound; chunk p99 {v['chunk_p99_ms']} ms; "
            f"WAL {v['wal_bytes_per_row']} B/row; replica lag on {v['replica_lag_on']} "
            f"(off {v['replica_lag_off']}); cpu {v['cpu_busy_off']} -> {v['cpu_busy_on']}; "
            f"rss {v['peak_rss_mb']} MB; {v['statuses']}"
        )
        print(f"  {'kind':<13}{'p50 off':>9}{'p50 on':>9}{'p99 off':>9}{'p99 on':>9}"
              f"{'x p99':>7}  {'spread':<13}{'max on':>9}  errors")  # fmt: skip
        for kind, k in v["kinds"].items():
            spread = "-".join(str(x) for x in k["p99_ratio_spread"] or [])
            print(
                f"  {kind:<13}{k['off_p50']!s:>9}{k['on_p50']!s:>9}{k['off_p99']!s:>9}"
                f"{k['on_p99']!s:>9}{k['p99_ratio']!s:>7}  {spread:<13}{k['on_max']!s:>9}  "
                f"{k['on_errors'] or '-'} (off {k['off_errors']})"
            )
        print(f"  late receipts' budget (off p99 + chunk p99): {v['late_receipt_budget_ms']} ms")
        worst = max(v["turn_details"], key=_slowest)
        print(f"  slowest operations of turn {worst['turn']}:")
        for s in worst["stalls"]:
            print(
                f"    {s['kind']:<13}{s['ms']:>9} ms at {s['at_s']:>6} s of run {s['run']}, "
                f"{s['during']}"
                f"{', in a checkpoint' if s['checkpoint'] else ''}"
            )


def markdown(report: dict[str, Any]) -> str:
    """The live table of docs/performance.md: per variant, the run against the bound and
    each kind's p99 with and without it (median over the turns, the ratios' spread)."""
    lines = [
        "| settings | run s | x bound | chunk p99 ms | replica lag max s (off) | WAL B/row | "
        + " | ".join(f"{k} p99 ms off / on (x, spread)" for k in KINDS)
        + " |",
        "|---" * (6 + len(KINDS)) + "|",
    ]
    for name, v in report["variants"].items():
        changed = ", ".join(f"{k} = {x}" for k, x in VARIANTS[name].items()) or "defaults"
        cells = [
            f"`{name}`: {changed}",
            str(v["run_s"]),
            str(v["throughput_vs_bound"]),
            str(v["chunk_p99_ms"]),
            f"{v['replica_lag_on']['s']} ({v['replica_lag_off']['s']})",
            str(v["wal_bytes_per_row"]),
        ]
        for kind in KINDS:
            k = v["kinds"][kind]
            spread = "-".join(str(x) for x in k["p99_ratio_spread"] or [])
            cells.append(f"{k['off_p99']} / {k['on_p99']} ({k['p99_ratio']}x, {spread})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slowest(turn: dict[str, Any]) -> float:
    return max((float(s["ms"]) for s in turn["stalls"]), default=0.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--turns", type=int, default=5, help="turns per variant [5]")
    p.add_argument("--load-s", type=float, default=60, help="seconds of load without the run [60]")
    p.add_argument("--rate", type=float, default=40, help="operations per second per kind [40]")
    p.add_argument("--bound-turns", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"[{','.join(VARIANTS)}]")
    p.add_argument("--config", type=Path, default=REPO / "config" / "retention.toml")
    p.add_argument("--job-bin", type=Path, default=os.environ.get("BENCH_JOB_BIN") or None)
    p.add_argument(
        "--server-options",
        default="",
        help="more settings of both servers, as postgres takes them: '-c wal_compression=on'",
    )
    p.add_argument("--json", dest="json_path", type=Path)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}")
    if args.rows < 1000 or args.turns < 1 or args.load_s <= 0 or args.rate <= 0:
        p.error("--rows >= 1000, --turns >= 1, --load-s > 0, --rate > 0")
    args.config = args.config.absolute()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = config.load(args.config)
    started = time.monotonic()
    for swept in servers.sweep_stale():  # servers of a run that was killed
        log(f"removed {swept}, left by a bench or test run that was killed")
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped and removed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with (
        tempfile.TemporaryDirectory(prefix="dr-bench-live-") as work,
        cluster(args.server_options) as c,
    ):
        args.work = Path(work)
        log(f"primary {c.primary.url}, replica {c.replica.url}: building the template")
        prepared = prepare_template(c, settings, args)
        configs = {
            v: variant_config(args.config, VARIANTS[v], args.work / f"{v}.toml")
            for v in args.variants
        }
        bounds = []
        for n in range(args.bound_turns):
            log(f"bound under load, turn {n + 1}")
            bounds.append(run_bound_turn(c, args, prepared, settings, n))
        bound_s = _median([b["s"] for b in bounds])
        details: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
        for turn in range(args.turns):
            for v in args.variants:
                log(f"{v}, turn {turn + 1}/{args.turns}")
                details[v].append(run_variant_turn(c, args, prepared, v, configs[v], turn))
        report: dict[str, Any] = {
            "bench": {
                "command": " ".join(sys.argv),
                "rows": prepared["rows"],
                "due_rows": prepared["due_rows"],
                "table_bytes": prepared["table_bytes"],
                "turns": args.turns,
                "load_s": args.load_s,
                "rate": args.rate,
                "kinds": KINDS,
                "server_options": f"{SERVER_OPTIONS} {args.server_options}".strip(),
                "server_version": c.server.version,
                "cpus": os.cpu_count(),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            "bound": bounds,
            "bound_s": bound_s,
            "variants": {
                v: {**summarize(details[v], bound_s), "turn_details": details[v]}
                for v in args.variants
            },
        }
    report["bench"]["wall_s"] = round(time.monotonic() - started, 1)
    print_report(report)
    print("\n" + markdown(report))
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        log(f"wrote {args.json_path}")
    variants: dict[str, dict[str, Any]] = report["variants"]
    failed = [t for v in variants.values() for t in v["turn_details"] if t["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
