"""The run's writer of the trail: run and chunk records (docs/auditor.md), and the chain's
head (`head`) a run reports when it closes.

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
from importlib.metadata import version
from typing import Any, TypeVar

import structlog
from sqlalchemy import (
    Connection,
    Engine,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    update,
)
from tenacity import RetryCallState

from dispatch_retention.catalog.risks import Risk
from dispatch_retention.config import Clean, Settings
from dispatch_retention.errors import TooLongForTrail
from dispatch_retention.pg import diagnosis, engines, retry
from dispatch_retention.rule.plans import Plan
from dispatch_retention.trail.audit_tables import AuditTables, fitted, over_bound
from dispatch_retention.vocabulary import Chunk, Options, Outcome, Status, Stop

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
        are the job's own words, cut to what the trail keeps (`audit_tables.fitted`), never
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
        """The trail's hash chain head (`head`), for the run_finished log line: a copy
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
                engines.set_local(
                    conn,
                    **engines.timeouts(
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
                error=diagnosis.describe_error(exc) if exc else None,
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


def head(conn: Connection, tables: AuditTables) -> tuple[int, str]:
    """The chain's newest (seq, hash), as `events_head` holds it."""
    h = tables.events_head
    seq, digest = conn.execute(select(h.c.seq, h.c.hash)).one()
    return int(seq), str(digest)
