"""Run and chunk records (docs/auditor.md), and the queries behind `audit list` / `show`.

A run record is inserted when a run starts (status `running`), updated with its plan (the
cutoffs from the database clock, due and held counts), and closed with its final status. A
chunk record is inserted by `record_chunk()` inside the chunk's own transaction, so a chunk
and its record commit or roll back together. Run totals are never stored: they are the sums
of the committed chunk records, so they cannot disagree with them. The dispatches a chunk
cleaned are recoverable: ids from `first_id` to `last_id` whose `cleaned_at` equals the
chunk's `cleaned_at`.

Records hold ids, counts, timestamps, policy names and the config text; never a dispatch's
content, msisdn, email or app_token.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from datetime import date
from importlib.metadata import version
from typing import Any, TypeVar

import structlog
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    case,
    cast,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    update,
)
from tenacity import RetryCallState

from . import db, retry
from .chain import head
from .config import Clean, Settings
from .errors import TooLongForTrail
from .planning import Plan
from .risks import Risk
from .schema import AuditTables, fitted, over_bound, read_bounded, shown
from .vocabulary import Chunk, Options, Outcome, Status, Stop

T = TypeVar("T")
log = structlog.get_logger("dispatch_retention")

TRIGGER_ENV = "DISPATCH_RETENTION_TRIGGER"
TRIGGERS = ("cron", "manual")


def trigger() -> str:
    """`cron` when the CronJob says so (DISPATCH_RETENTION_TRIGGER=cron), else `manual`."""
    value = os.environ.get(TRIGGER_ENV, "manual").strip().lower()
    return value if value in TRIGGERS else "manual"


def tool_version() -> str:
    return version("dispatch-retention")


class RunRecord:
    """The audit record of one run; also the cleaner's chunk recorder.

    Its own writes (start, plan, close, marking dead runs abandoned) are bounded as a
    chunk's are: `clean.lock_timeout_ms` and `statement_timeout_ms` in each transaction,
    the same retries, a backoff that a stop signal ends, and none past the run's deadline.
    A lock held on the runs table therefore cannot keep a run alive past its budget."""

    def __init__(
        self,
        engine: Engine,
        tables: AuditTables,
        run_id: str,
        *,
        clean: Clean | None = None,
        stop: Stop | None = None,
        deadline: float | None = None,
    ) -> None:
        self.engine, self.tables, self.run_id = engine, tables, run_id
        self.clean, self.stop, self.deadline = clean or Clean(), stop or Stop(), deadline
        # Built once: a chunk's record then costs no statement building, only its values.
        self._insert_chunk = insert(tables.chunks).values(run_id=run_id)

    def start(
        self,
        settings: Settings,
        options: Options,
        shard: str | None = None,
        copy_risks: Sequence[Risk] = (),
    ) -> None:
        runs = self.tables.runs
        texts = {
            "trigger": trigger(),
            "host": socket.gethostname(),
            "tool_version": tool_version(),
            "target_table": settings.target.table,
            "shard": shard,
            "config_path": settings.path,
            "config_sha256": settings.sha256,
            "config_text": settings.text,
        }
        long = over_bound("runs", texts)
        if long is not None:  # refused here, by name, rather than by the table's CHECK
            column, limit, size = long
            raise TooLongForTrail(f"the run record's {column}", size, limit)
        self._bounded(
            "writing the run record",
            lambda conn: conn.execute(
                insert(runs).values(
                    run_id=self.run_id,
                    status=Status.RUNNING.value,
                    started_at=func.now(),
                    db_user=literal_column("current_user"),
                    options={
                        "chunk_size": options.chunk_size or settings.clean.chunk_size,
                        "max_rows": options.max_rows,
                        "max_runtime_s": options.max_runtime_s,
                        "reclean": options.reclean,  # a reclean chunk needs it (0006)
                    },
                    copy_risks=[r.as_dict() for r in copy_risks],
                    **texts,
                )
            ),
        )

    def planned(self, plan: Plan) -> None:
        self._update(
            planned_at=plan.rules.now,
            policies=plan.as_dict()["policies"],
            due_rows=plan.due_rows,
            held_rows=plan.held_rows,
            waiting_grace_rows=plan.waiting_grace_rows,
        )

    def record_chunk(self, conn: Connection, chunk: Chunk) -> None:
        """Called inside the chunk's transaction, after its UPDATE and before its COMMIT."""
        conn.execute(
            self._insert_chunk,
            {
                "seq": chunk.seq,
                "first_id": chunk.first_id,
                "last_id": chunk.last_id,
                "rows": chunk.rows,
                "cleaned_at": chunk.cleaned_at,
                "by_policy": chunk.by_policy,
                "skipped_locked": chunk.skipped_locked,
                "kind": chunk.kind,
            },
        )

    def chunk_committed(self, seq: int) -> bool:
        """Whether chunk `seq` committed (for a COMMIT whose outcome is unknown)."""
        chunks = self.tables.chunks
        with self.engine.connect() as conn:
            found = conn.execute(
                select(chunks.c.seq).where(chunks.c.run_id == self.run_id, chunks.c.seq == seq)
            ).first()
        return found is not None

    def status(self) -> str | None:
        runs = self.tables.runs
        query = select(runs.c.status).where(runs.c.run_id == self.run_id)
        return self._bounded("reading the run record", lambda c: c.execute(query).scalar())

    def finish(self, outcome: Outcome, copy_risks_at_end: Sequence[Risk] | None = None) -> bool:
        """Close the record (a fresh pooled connection, so a lost one does not matter): a
        record still `running`, or one another run marked `abandoned` while this one was in
        fact alive (it lost its lock connection). Returns whether it was closed. Its texts
        are the job's own words, cut to what the trail keeps (`schema.fitted`), never
        refused; `copy_risks_at_end`, the copy risks read again at the end, only the close
        may write (0007)."""
        stopped_by = outcome.stopped_by or (f"signal {outcome.signum}" if outcome.signum else None)
        at_end = {}
        if copy_risks_at_end is not None:
            at_end["copy_risks_at_end"] = [r.as_dict() for r in copy_risks_at_end]
        return self._update(
            open_only=True,
            status=outcome.status.value,
            finished_at=func.now(),
            stopped_by=fitted("runs", "stopped_by", stopped_by),
            error=fitted("runs", "error", outcome.error),
            remaining_due_rows=outcome.remaining_due_rows,
            remaining_reason=fitted("runs", "remaining_reason", outcome.remaining_reason),
            **at_end,
        )

    def chain_head(self) -> str:
        """The trail's hash chain head (`chain.head`), for the run_finished log line: a copy
        that lives outside the database."""
        return self._bounded("reading the chain head", lambda c: head(c, self.tables)[1])

    def _update(self, *, open_only: bool = False, **values: Any) -> bool:
        runs = self.tables.runs
        query = update(runs).where(runs.c.run_id == self.run_id)
        if open_only:
            query = query.where(runs.c.status.in_((Status.RUNNING.value, Status.ABANDONED.value)))
        return self._bounded(
            "updating the run record",
            lambda conn: bool(conn.execute(query.values(**values)).rowcount),
        )

    def mark_abandoned(self, target_table: str, shard: str | None = None) -> list[str]:
        """`mark_abandoned()` in a write of its own, bounded like the others."""
        return self._bounded(
            "marking dead runs abandoned",
            lambda conn: mark_abandoned(conn, self.tables, target_table, shard),
        )

    def _bounded(self, what: str, body: Callable[[Connection], T]) -> T:
        """`body` in one transaction under a chunk's timeouts, retried like a chunk."""
        clean = self.clean

        def attempt() -> T:
            with self.engine.begin() as conn:
                db.set_local(
                    conn,
                    **db.timeouts(
                        lock_timeout_ms=clean.lock_timeout_ms,
                        statement_timeout_ms=clean.statement_timeout_ms,
                    ),
                )
                return body(conn)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "record_retry",
                run_id=self.run_id,
                what=what,
                attempt=state.attempt_number,
                reason=retry.reason(exc) if exc else None,
                error=db.describe_error(exc) if exc else None,
            )

        return retry.call(
            attempt,
            clean,
            what,
            sleep=self.stop.sleep,
            before_sleep=before_sleep,
            deadline=self.deadline,
        )


def mark_abandoned(
    conn: Connection, tables: AuditTables, target_table: str, shard: str | None = None
) -> list[str]:
    """Runs still `running` that our locks prove dead: for a whole run every run of the
    target; for a shard its own earlier runs and any whole run. A record names the target
    as its run spelled it (earlier versions: as configured, `dispatches`), so the names are
    compared as the tables they resolve to."""
    runs = tables.runs
    scope = true() if shard is None else or_(runs.c.shard.is_(None), runs.c.shard == shard)
    same_target = or_(
        runs.c.target_table == target_table,
        func.to_regclass(runs.c.target_table) == func.to_regclass(target_table),
    )
    rows = conn.execute(
        update(runs)
        .where(runs.c.status == Status.RUNNING.value, same_target, scope)
        .values(
            status=Status.ABANDONED.value,
            finished_at=func.now(),
            error="the process ended without closing its record (killed?); marked by the next run",
        )
        .returning(runs.c.run_id)
    )
    return [str(r) for r in rows.scalars()]


# --- reading the trail -----------------------------------------------------------------------
# The readers take a bounded amount of memory per run: texts are read at most to their
# bounds (`schema.read_bounded`: a longer one, written before migration 0007, is cut and
# marked), and the runs of `audit list` a batch at a time. A recorded document of an
# unexpected shape (an imported row, an owner's write) is shown as far as it is readable,
# and what is not is named in `unreadable`, never a traceback.

#: What `audit list` shows of a run (all but its config and plan).
LISTED = (
    "run_id", "status", "trigger", "started_at", "finished_at", "due_rows", "held_rows",
    "waiting_grace_rows", "host", "shard", "tool_version", "db_user", "target_table",
    "planned_at", "config_path", "config_sha256", "options", "stopped_by", "error",
    "remaining_due_rows", "remaining_reason", "copy_risks",
)  # fmt: skip
#: A policy of a recorded plan: each field and the JSON type it has (`planning.Plan`);
#: `grace_cutoff` and `due_rows` are missing from the plans of earlier versions.
PLAN_FIELDS: dict[str, type] = {
    "name": str, "retention_days": int, "cutoff": str, "grace_cutoff": str, "due_rows": int,
}  # fmt: skip
PLAN_OPTIONAL = ("grace_cutoff", "due_rows")
#: A copy risk as recorded (`risks.Risk.as_dict`): each field and its JSON type.
RISK_FIELDS: dict[str, type] = {
    "kind": str, "name": str, "when": str, "detail": str, "acknowledged": str,
}  # fmt: skip
RISK_OPTIONAL = ("when", "detail", "acknowledged")
#: Names of unreadable parts listed one by one; past that, counted.
MAX_UNREADABLE = 20


def _totals(tables: AuditTables) -> Any:
    chunks = tables.chunks
    clean = chunks.c.kind == "clean"
    return (
        select(
            chunks.c.run_id,
            func.coalesce(func.sum(chunks.c.rows).filter(clean), 0).label("rows_cleaned"),
            func.coalesce(func.sum(chunks.c.rows).filter(~clean), 0).label("rows_recleaned"),
            func.count().label("chunks"),
        )
        .group_by(chunks.c.run_id)
        .subquery("totals")
    )


def list_runs(
    conn: Connection, tables: AuditTables, *, since: date | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    runs, totals = tables.runs, _totals(tables)
    query = (
        select(
            *read_bounded(runs, *LISTED),
            func.coalesce(totals.c.rows_cleaned, 0).label("rows_cleaned"),
            func.coalesce(totals.c.rows_recleaned, 0).label("rows_recleaned"),
            func.coalesce(totals.c.chunks, 0).label("chunks"),
        )
        .select_from(runs.outerjoin(totals, totals.c.run_id == runs.c.run_id))
        .order_by(runs.c.started_at.desc())
        .limit(limit)
    )
    if since is not None:
        query = query.where(runs.c.started_at >= since)
    rows = conn.execute(query.execution_options(yield_per=100)).mappings()
    return [_run_dict(shown(runs.name, row)) for row in rows]


def show_run(conn: Connection, tables: AuditTables, run_id: str) -> dict[str, Any] | None:
    runs, chunks = tables.runs, tables.chunks
    row = (
        conn.execute(select(*read_bounded(runs, *runs.c.keys())).where(runs.c.run_id == run_id))
        .mappings()
        .first()
    )
    if row is None:
        return None
    run = shown(runs.name, row)
    clean = chunks.c.kind == "clean"
    stats = conn.execute(
        select(
            func.coalesce(func.sum(chunks.c.rows).filter(clean), 0),
            func.count(),
            func.min(chunks.c.cleaned_at),
            func.max(chunks.c.cleaned_at),
            func.coalesce(func.sum(chunks.c.rows).filter(~clean), 0),
        ).where(chunks.c.run_id == run_id)
    ).one()
    document = _run_dict(
        {
            **run,
            "rows_cleaned": int(stats[0]),
            "chunks": int(stats[1]),
            "rows_recleaned": int(stats[4]),
        }
    )
    document["first_chunk_at"], document["last_chunk_at"] = stats[2], stats[3]
    unreadable: list[str] = []
    document["policies"] = _plan(
        run["policies"], _cleaned_per_policy(conn, tables, run_id), unreadable
    )
    document["copy_risks"] = _risks("copy_risks", run["copy_risks"], unreadable)
    if run.get("copy_risks_at_end") is not None:
        document["copy_risks_at_end"] = _risks(
            "copy_risks_at_end", run["copy_risks_at_end"], unreadable
        )
    document["config_text"] = run["config_text"]
    if unreadable:
        document["unreadable"] = _listed(unreadable)
    return document


def _cleaned_per_policy(conn: Connection, tables: AuditTables, run_id: str) -> dict[str, int]:
    """Rows cleaned per policy name, summed over the run's cleaning chunks: counts that are
    whole numbers (as the guards of 0006 keep them) of records that are objects."""
    chunks = tables.chunks
    counts = case(
        (func.jsonb_typeof(chunks.c.by_policy) == "object", chunks.c.by_policy),
        else_=cast(literal_column("'{}'"), chunks.c.by_policy.type),
    )
    each = func.jsonb_each_text(counts).table_valued("key", "value").render_derived("p")
    whole = each.c.value.regexp_match("^[0-9]{1,15}$")
    return {
        str(name): int(rows)
        for name, rows in conn.execute(
            select(each.c.key, func.sum(cast(case((whole, each.c.value)), BigInteger)))
            .select_from(chunks.join(each, true()))
            .where(chunks.c.run_id == run_id, chunks.c.kind == "clean")
            .group_by(each.c.key)
        )
        if rows is not None
    }


def _plan(policies: Any, cleaned: dict[str, int], unreadable: list[str]) -> list[dict[str, Any]]:
    """The recorded plan's policies, each with the rows cleaned under it; a field missing or
    of another type is None, and named in `unreadable`."""
    if policies is None:
        return []
    if not isinstance(policies, list):
        unreadable.append(f"policies: {_what(policies)}, not a list of policies")
        return []
    out = []
    for n, policy in enumerate(policies):
        entry = _record(f"policies[{n}]", policy, PLAN_FIELDS, PLAN_OPTIONAL, unreadable)
        name = entry["name"]
        entry["rows_cleaned"] = int(cleaned.get(name, 0)) if isinstance(name, str) else 0
        out.append(entry)
    return out


def _risks(key: str, risks: Any, unreadable: list[str]) -> list[dict[str, Any]] | None:
    """The recorded copy risks, each field of another type None (and named in `unreadable`);
    None when not recorded (a run of an earlier version)."""
    if risks is None:
        return None
    if not isinstance(risks, list):
        unreadable.append(f"{key}: {_what(risks)}, not a list of copy risks")
        return []
    out = []
    for n, risk in enumerate(risks):
        entry = _record(f"{key}[{n}]", risk, RISK_FIELDS, RISK_OPTIONAL, unreadable)
        if isinstance(risk, dict):  # what a later version may add, as it is
            entry |= {k: v for k, v in risk.items() if k not in RISK_FIELDS}
        out.append(entry)
    return out


def _record(
    where: str,
    found: Any,
    fields: dict[str, type],
    optional: tuple[str, ...],
    unreadable: list[str],
) -> dict[str, Any]:
    """`found`'s `fields`, each of its JSON type or None (a number is never a bool)."""
    if not isinstance(found, dict):
        unreadable.append(f"{where}: {_what(found)}, not a record")
        return dict.fromkeys(fields)
    out: dict[str, Any] = {}
    for name, kind in fields.items():
        value = found.get(name)
        fits = isinstance(value, kind) and not isinstance(value, bool)
        if value is not None and not fits:
            unreadable.append(f"{where}.{name}: {_what(value)}, not {_KINDS[kind]}")
        elif value is None and name not in optional:
            unreadable.append(f"{where}.{name}: missing")
        out[name] = value if fits else None
    return out


_KINDS = {str: "a text", int: "a whole number"}


def _what(value: Any) -> str:
    """What a JSON value is, in words (never the value: an owner may have written anything)."""
    if isinstance(value, str) and value.startswith("[not shown:"):
        return value.strip("[]")
    kinds = {bool: "true or false", str: "a text", int: "a number", float: "a number"}
    kinds |= {list: "a list", dict: "a record", type(None): "null"}
    return kinds.get(type(value), "a value")


def _listed(found: list[str]) -> list[str]:
    if len(found) <= MAX_UNREADABLE:
        return found
    return [*found[:MAX_UNREADABLE], f"... and {len(found) - MAX_UNREADABLE} more"]


def _run_dict(row: Any) -> dict[str, Any]:
    out = {
        "run_id": str(row["run_id"]),
        "status": row["status"],
        "trigger": row["trigger"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "rows_cleaned": int(row["rows_cleaned"]),
        "rows_recleaned": int(row["rows_recleaned"]),
        "chunks": int(row["chunks"]),
        "due_rows": row["due_rows"],
        "held_rows": row["held_rows"],
        "waiting_grace_rows": row["waiting_grace_rows"],
        "host": row["host"],
        "shard": row["shard"],
        "tool_version": row["tool_version"],
        "db_user": row["db_user"],
        "target_table": row["target_table"],
        "planned_at": row["planned_at"],
        "config_path": row["config_path"],
        "config_sha256": row["config_sha256"],
        "options": row["options"],
        "stopped_by": row["stopped_by"],
        "error": row["error"],
        "remaining_due_rows": row["remaining_due_rows"],
        "remaining_reason": row["remaining_reason"],
        "copy_risks": row["copy_risks"],
    }
    return out
