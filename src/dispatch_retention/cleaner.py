"""The chunk loop: strips personal data from due dispatches, one committed chunk at a time.

What it never touches: a row that is not due under `policy.due()` as of the `now` read from
the database clock when the run planned; any column but those in `clean.columns`,
`cleaned_at` and `updated_at`; any row whose `cleaned_at` is set. It never deletes a row.

Transactions: planning is one READ ONLY transaction. Each chunk is one transaction, begun in
`_clean_window()` and nowhere else: one UPDATE ... RETURNING over an id window, the chunk's
audit record (when a recorder is given) and COMMIT. Nothing spans two chunks.

Why it is safe to interrupt: a chunk commits whole or not at all, and every row it cleaned
carries that transaction's `now()` in `cleaned_at`; a later run simply finds the rows that
are still due. A signal during a chunk is noted and honoured after the commit; a signal
while planning cancels the query (nothing has been written yet).

Windows walk the primary key forward from the lowest due id to the highest: no window is
visited twice, memory holds one chunk's RETURNING at most, and after an empty window the
loop jumps to the next due id instead of crawling through rows that cannot be due. A window
first runs as a plain range UPDATE under a short lock wait (as fast as one statement over the
whole table); only when that hits a row the application holds locked is it redone with
`FOR UPDATE SKIP LOCKED`, leaving the locked rows for the next run.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

import structlog
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    func,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.exc import DBAPIError
from tenacity import RetryCallState

from . import db, policy, retry, sizing
from .config import Settings
from .schema import dispatches_table
from .shard import Shard

log = structlog.get_logger("dispatch_retention")


# --- what a run plans and what it did --------------------------------------------------------


@dataclass(frozen=True)
class PolicyPlan:
    name: str
    retention_days: int
    cutoff: datetime
    grace_cutoff: datetime
    due_rows: int


@dataclass(frozen=True)
class Plan:
    rules: policy.Rules
    policies: tuple[PolicyPlan, ...]
    held_rows: int
    waiting_grace_rows: int
    min_due_id: int | None
    max_due_id: int | None

    @property
    def due_rows(self) -> int:
        return sum(p.due_rows for p in self.policies)

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.rules.now.isoformat(),
            "due_rows": self.due_rows,
            "held_rows": self.held_rows,
            "waiting_grace_rows": self.waiting_grace_rows,
            "policies": [
                {
                    "name": p.name,
                    "retention_days": p.retention_days,
                    "cutoff": p.cutoff.isoformat(),
                    "grace_cutoff": p.grace_cutoff.isoformat(),
                    "due_rows": p.due_rows,
                }
                for p in self.policies
            ],
        }


@dataclass(frozen=True)
class Chunk:
    seq: int
    first_id: int
    last_id: int
    rows: int
    by_policy: dict[str, int]
    cleaned_at: datetime | None
    elapsed_ms: float
    skipped_locked: bool


@dataclass
class Outcome:
    """How a run ended. `status` is one of the run statuses of CONTRACT section 6."""

    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)  # --max-runtime counts from here
    status: str = "running"
    plan: Plan | None = None
    rows_cleaned: int = 0
    by_policy: Counter[str] = field(default_factory=Counter)
    chunks: int = 0
    signum: int | None = None
    error: str | None = None
    stopped_by: str | None = None

    @property
    def remaining_rows(self) -> int | None:
        return None if self.plan is None else max(self.plan.due_rows - self.rows_cleaned, 0)


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    chunk_size: int | None = None
    max_rows: int | None = None
    max_runtime_s: float | None = None


class Recorder(Protocol):
    """Writes a chunk's audit record inside the chunk's own transaction."""

    def record_chunk(self, conn: Connection, chunk: Chunk) -> None: ...

    def chunk_committed(self, seq: int) -> bool: ...


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived while the job was waiting on the server (no write in flight).

    Subclassing KeyboardInterrupt makes psycopg cancel the query on the server."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Stop:
    """Set by a signal handler; honoured between chunks, or at once while only reading."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._interruptible = False

    def request(self, signum: int) -> None:
        self.signum = signum
        if self._interruptible:
            self._interruptible = False
            raise Interrupted(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def sleep(self, seconds: float) -> None:
        """Sleep, but end it at once with `Interrupted` when a stop signal arrives."""
        deadline = time.monotonic() + seconds
        while self.signum is None and time.monotonic() < deadline:
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """While inside, a signal raises `Interrupted` at once (for read-only work)."""
        if self.signum is not None:
            raise Interrupted(self.signum)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False


# --- statements ------------------------------------------------------------------------------


class Statements:
    """The run's statements, built once from the rules (builders; the loop executes them)."""

    def __init__(
        self,
        settings: Settings,
        rules: policy.Rules,
        holds: Table | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.table = table = dispatches_table(settings.target)
        self.rules, self.holds = rules, holds
        self.scope = shard.predicate(table) if shard else true()
        self.due = and_(policy.due(table, rules, holds), self.scope)
        self.credit = policy.credit(table, rules)
        lo, hi = bindparam("lo", type_=BigInteger), bindparam("hi", type_=BigInteger)
        window = and_(table.c.id >= lo, table.c.id < hi)
        values: dict[str, Any] = dict(policy.cleaned_values(settings))
        values["cleaned_at"] = func.now()
        values["updated_at"] = func.now()
        returning = (table.c.id, self.credit, table.c.cleaned_at)
        self.range_update: Update = (
            update(table).where(window, self.due).values(values).returning(*returning)
        )
        locked_free = select(table.c.id).where(window, self.due).with_for_update(skip_locked=True)
        self.skip_locked_update: Update = (
            update(table)
            .where(table.c.id.in_(locked_free.scalar_subquery()), self.due)
            .values(values)
            .returning(*returning)
        )
        self.next_due_id: Select[Any] = select(func.min(table.c.id)).where(
            table.c.id >= lo, table.c.id <= hi, self.due
        )

    def plan_counts(self) -> Select[Any]:
        """Per binding policy and hold state: rows past their window, lowest and highest id."""
        table, r = self.table, self.rules
        held = policy.held(table, self.holds) if self.holds is not None else literal(False)
        return (
            select(
                self.credit,
                held.label("held"),
                func.count().label("rows"),
                func.min(table.c.id),
                func.max(table.c.id),
            )
            .where(table.c.cleaned_at.is_(None), policy.past_window(table, r), self.scope)
            .group_by(self.credit, held)
        )

    def waiting_count(self) -> Select[Any]:
        return select(func.count()).where(policy.waiting_grace(self.table, self.rules), self.scope)


# --- the run ---------------------------------------------------------------------------------


def database_now(conn: Connection) -> datetime:
    """The database clock: the one source of `now` for the whole run."""
    value = conn.execute(select(func.now())).scalar_one()
    assert isinstance(value, datetime)
    return value


def make_plan(
    conn: Connection,
    settings: Settings,
    holds: Table | None = None,
    shard: Shard | None = None,
) -> Plan:
    """Read-only: cutoffs from the database clock and what is due under them."""
    db.read_only(conn)
    db.set_local_timeouts(
        conn,
        lock_timeout_ms=settings.clean.lock_timeout_ms,
        statement_timeout_ms=settings.clean.plan_timeout_ms,
    )
    rules = policy.rules(settings, database_now(conn))
    stmts = Statements(settings, rules, holds, shard)
    due: Counter[str] = Counter()
    held_rows = 0
    lows: list[int] = []
    highs: list[int] = []
    for name, is_held, rows, low, high in conn.execute(stmts.plan_counts()):
        if is_held:
            held_rows += rows
        else:
            due[name] += rows
            lows.append(low)
            highs.append(high)
    waiting = conn.execute(stmts.waiting_count()).scalar_one()
    return Plan(
        rules=rules,
        policies=tuple(
            PolicyPlan(
                name=c.policy.name,
                retention_days=c.policy.retention_days,
                cutoff=c.settled,
                grace_cutoff=c.unsettled,
                due_rows=due[c.policy.name],
            )
            for c in rules.cutoffs
        ),
        held_rows=held_rows,
        waiting_grace_rows=waiting,
        min_due_id=min(lows) if lows else None,
        max_due_id=max(highs) if highs else None,
    )


class Cleaner:
    """Runs the chunks of one planned run."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        plan: Plan,
        *,
        options: Options,
        stop: Stop,
        outcome: Outcome,
        log: structlog.typing.FilteringBoundLogger = log,
        holds: Table | None = None,
        shard: Shard | None = None,
        recorder: Recorder | None = None,
        on_chunk: Callable[[Chunk], None] | None = None,
        fail_in_chunk: Callable[[int], None] | None = None,
    ) -> None:
        self.engine, self.settings, self.plan = engine, settings, plan
        self.options, self.stop, self.outcome, self.log = options, stop, outcome, log
        self.stmts = Statements(settings, plan.rules, holds, shard)
        self.shard = shard
        self.recorder, self.on_chunk = recorder, on_chunk
        self.fail_in_chunk = fail_in_chunk  # tests: raise inside chunk N, before COMMIT
        self.size = options.chunk_size or settings.clean.chunk_size
        self.recent_ms: list[float] = []

    def run(self) -> None:
        plan, outcome, clean = self.plan, self.outcome, self.settings.clean
        if plan.min_due_id is None or plan.max_due_id is None:
            outcome.status = "succeeded"
            return
        budget = self._row_budget()
        lo, last = self._align(plan.min_due_id), plan.max_due_id
        while lo <= last:
            if self.stop.requested:
                outcome.status, outcome.signum = "interrupted", self.stop.signum
                return
            left = None if budget is None else budget - outcome.rows_cleaned
            if left is not None and left <= 0:
                outcome.status, outcome.stopped_by = "incomplete", "max_rows"
                return
            if (
                self.options.max_runtime_s is not None
                and time.monotonic() - outcome.started >= self.options.max_runtime_s
            ):
                outcome.status, outcome.stopped_by = "incomplete", "max_runtime"
                return
            hi = self._window_end(lo, last, left)
            chunk = self._clean_window(outcome.chunks + 1, lo, hi)
            if chunk.rows:
                self._committed(chunk)
                lo = self._align(chunk.last_id + 1)
                if clean.pause_between_chunks_ms:
                    self._pause(clean.pause_between_chunks_ms / 1000)
            else:
                lo = self._align(self._next_due_id(chunk.last_id + 1, last))
        if self.stop.requested:  # arrived during the last chunk, which committed
            outcome.status, outcome.signum = "interrupted", self.stop.signum
            return
        outcome.status = "succeeded"

    def _window_end(self, lo: int, last: int, left: int | None) -> int:
        size = self.size if left is None else min(self.size, left)
        hi = min(lo + size, last + 1)
        return min(hi, self.shard.stripe_end(lo)) if self.shard else hi

    def _align(self, lo: int) -> int:
        return self.shard.align(lo) if self.shard else lo

    def _committed(self, chunk: Chunk) -> None:
        outcome, clean = self.outcome, self.settings.clean
        outcome.chunks += 1
        outcome.rows_cleaned += chunk.rows
        outcome.by_policy.update(chunk.by_policy)
        self.log.info(
            "chunk_committed",
            seq=chunk.seq,
            first_id=chunk.first_id,
            last_id=chunk.last_id,
            rows=chunk.rows,
            by_policy=chunk.by_policy,
            ms=round(chunk.elapsed_ms, 1),
            chunk_size=self.size,
            skipped_locked=chunk.skipped_locked,
        )
        self.recent_ms.append(chunk.elapsed_ms)
        del self.recent_ms[: -sizing.WINDOW]
        self.size = sizing.next_size(
            self.size,
            self.recent_ms,
            target_ms=0 if self.options.chunk_size else clean.target_chunk_ms,  # pinned
            floor=min(clean.min_chunk_size, self.size),
            ceiling=max(clean.max_chunk_size, self.size),
        )
        if self.on_chunk:
            self.on_chunk(chunk)

    def _row_budget(self) -> int | None:
        limits = [n for n in (self.options.max_rows, self.settings.guard.max_rows_per_run) if n]
        return min(limits) if limits else None

    def _next_due_id(self, start: int, last: int) -> int:
        """After an empty window: the next id that is still due (or past the end)."""
        if start > last:
            return start
        with self.engine.connect() as conn, self.stop.interruptible():
            found = conn.execute(self.stmts.next_due_id, {"lo": start, "hi": last}).scalar()
        return last + 1 if found is None else int(found)

    def _pause(self, seconds: float) -> None:
        """Breathing room between chunks; a stop signal ends it (the loop then stops)."""
        with contextlib.suppress(Interrupted):
            self.stop.sleep(seconds)

    # -- one window, with retries ---------------------------------------------------------

    def _clean_window(self, seq: int, lo: int, hi: int) -> Chunk:
        """Clean [lo, hi) in one transaction, retrying what a retry can fix (tenacity).

        Retried, with bounded exponential backoff: a lost connection or a server going
        away (after checking through the audit record whether an interrupted COMMIT
        landed), a lock timeout (someone holds the table), a statement timeout (with a
        window shrunk to a quarter). Anything else fails at once. A stop signal during
        the backoff ends the run at once.
        """
        clean = self.settings.clean
        window = {"hi": hi}

        def attempt() -> Chunk:
            try:
                return self._attempt(seq, lo, window["hi"])
            except _CommitUnknown as unknown:
                if self.recorder is not None and self.recorder.chunk_committed(seq):
                    self.log.warning("commit_confirmed", seq=seq)
                    return unknown.chunk
                raise unknown.cause from None

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            assert isinstance(exc, DBAPIError)
            if db.is_statement_timeout(exc):
                self.size = sizing.next_size(
                    self.size, [], target_ms=0, floor=1, ceiling=self.size, timed_out=True
                )
                window["hi"] = min(window["hi"], lo + self.size)
            self.log.warning(
                "chunk_retry",
                seq=seq,
                attempt=state.attempt_number,
                of=clean.max_retries + 1,
                reason=retry.reason(exc),
                error=db.describe_error(exc),
                sleep_s=round(state.upcoming_sleep, 2),
            )

        try:
            return retry.retrying(clean, sleep=self.stop.sleep, before_sleep=before_sleep)(attempt)
        except DBAPIError as exc:
            if not retry.retryable(exc):
                raise
            raise retry.exhausted(exc, clean, f"chunk {seq}") from None

    def _attempt(self, seq: int, lo: int, hi: int) -> Chunk:
        clean = self.settings.clean
        t0 = time.monotonic()
        try:
            chunk = self._transaction(
                self.stmts.range_update, seq, lo, hi, min(clean.row_lock_wait_ms,
                clean.lock_timeout_ms), False,
            )  # fmt: skip
        except DBAPIError as exc:
            if not db.is_lock_timeout(exc):
                raise
            # A row (or the table) is locked by someone else: redo this window without
            # waiting for locked rows; a table lock still waits up to lock_timeout.
            chunk = self._transaction(
                self.stmts.skip_locked_update, seq, lo, hi, clean.lock_timeout_ms, True
            )
        return replace(chunk, elapsed_ms=(time.monotonic() - t0) * 1000)

    def _transaction(
        self, statement: Update, seq: int, lo: int, hi: int, lock_ms: int, skipped_locked: bool
    ) -> Chunk:
        """The one place a chunk's transaction begins and ends."""
        with self.engine.connect() as conn:
            transaction = conn.begin()
            db.set_local_timeouts(
                conn,
                lock_timeout_ms=lock_ms,
                statement_timeout_ms=self.settings.clean.statement_timeout_ms,
            )
            by_policy: Counter[str] = Counter()
            cleaned_at = None
            for _id, name, stamp in conn.execute(statement, {"lo": lo, "hi": hi}):
                by_policy[name] += 1
                cleaned_at = stamp
            chunk = Chunk(
                seq=seq,
                first_id=lo,
                last_id=hi - 1,
                rows=by_policy.total(),
                by_policy=dict(by_policy),
                cleaned_at=cleaned_at,
                elapsed_ms=0.0,
                skipped_locked=skipped_locked,
            )
            if chunk.rows and self.recorder is not None:
                self.recorder.record_chunk(conn, chunk)
            if self.fail_in_chunk is not None:
                self.fail_in_chunk(seq)
            if not chunk.rows:
                transaction.rollback()
                return chunk
            try:
                transaction.commit()
            except DBAPIError as exc:
                if db.is_transient(exc):
                    raise _CommitUnknown(chunk, exc) from exc
                raise
            return chunk


class _CommitUnknown(Exception):
    """The connection broke during COMMIT: the chunk may or may not have landed."""

    def __init__(self, chunk: Chunk, cause: DBAPIError) -> None:
        super().__init__("commit outcome unknown")
        self.chunk, self.cause = chunk, cause
