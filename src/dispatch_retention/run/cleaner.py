"""The chunk loop: strips personal data from due dispatches, one committed chunk at a time.

What it never touches: a row that is not due under `policy.due()` as of the `now` read from
the database clock when the run planned; any column but those in `clean.columns`,
`cleaned_at` and `updated_at`; any row whose `cleaned_at` is set. It never deletes a row.

Transactions: planning is one READ ONLY transaction. Each chunk is one transaction, begun in
`_transaction()` and nowhere else: one UPDATE ... RETURNING over an id window, then the
sweep of the same window (`Statements.swept_range` / `swept_indexed`: the due rows left
there are recounted, locked and cleaned, and a due row that the UPDATE left alone is
counted in `Chunk.missed`), the chunk's audit record (when a recorder is given) and
COMMIT. Nothing spans two chunks. A chunk with missed rows commits what it did clean, then
fails the run.

The write-back check (`check_write_back`: something fires on UPDATE and the role may read
the personal columns) follows the ids the chunk's statements cleaned (RETURNING), never a
stamp: a trigger may move `cleaned_at` as it writes back. Before COMMIT it makes deferred
constraint triggers fire (`SET CONSTRAINTS ALL IMMEDIATE`) and reads those rows: any
holding personal data rolls the chunk back and fails the run. A trigger can still defer
again and write back at COMMIT, so once committed the same rows are read again, in one
statement by their ids: any holding personal data fails the run (the chunk is in the
trail, its rows for `run --reclean`).

When the walk is done, the run counts what is still due at its own cutoffs (`recount`, a
read-only plan); rows that became due while it ran get one more walk; only a count of zero
is `succeeded`. Otherwise the run is `incomplete` with the count and the reason
(`Outcome.remaining_due_rows`, `remaining_reason`).

Why it is safe to interrupt: a chunk commits whole or not at all, and every row it cleaned
carries that transaction's `now()` in `cleaned_at`; a later run simply finds the rows that
are still due. A signal during a chunk is noted and honoured after the commit; a signal
while planning cancels the query (nothing has been written yet).

Windows walk the primary key forward over the id blocks the plan found due rows in
(`windows.Windows`): no window is visited twice, blocks without due rows are never read,
an empty window jumps to the next due row of its block (`Statements.next_due`),
and memory holds the plan's block list and one chunk's per-policy counts. A window first
runs as a plain range UPDATE under a short lock wait (as fast as one statement over the
whole table); a sparse window (few due rows over many ids, `Windows.sparse`) instead takes
its candidates from the policies' arms through their indexes, so it reads its due rows and
not every row between them. Only when a window hits a row the application holds locked is
it redone with `FOR UPDATE SKIP LOCKED`, leaving the locked rows for the next run. Its size
(due rows) adapts to `clean.target_chunk_ms` (`sizing.py`), unless `--chunk-size` pins it;
a pinned size also caps the window's ids, so a chunk never holds more rows than that.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from typing import Any

import structlog
from sqlalchemy import CompoundSelect, Connection, Engine, Select, Table
from sqlalchemy.exc import DBAPIError
from tenacity import RetryCallState

from dispatch_retention.config import Clean, Settings
from dispatch_retention.pg import diagnosis, engines, retry
from dispatch_retention.rule.plans import Plan, row_budget
from dispatch_retention.rule.shard import Shard
from dispatch_retention.run import pacing, sizing
from dispatch_retention.run.statements import FIRE_DEFERRED, Statements, ids_params, window_params
from dispatch_retention.run.throttle import Throttle, Verdict
from dispatch_retention.run.windows import Windows
from dispatch_retention.vocabulary import (
    Chunk,
    Interrupted,
    Options,
    Outcome,
    Recorder,
    Recount,
    Remaining,
    Status,
    Stop,
)

log = structlog.get_logger("dispatch_retention")


# --- the chunk loop ---------------------------------------------------------------------


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
        before_chunk: Callable[[], None] | None = None,
        fail_in_chunk: Callable[[int], None] | None = None,
        recount: Recount | None = None,
        skipped_by: Callable[[], str] | None = None,
        check_write_back: bool = False,
    ) -> None:
        self.engine, self.settings, self.plan = engine, settings, plan
        self.options, self.stop, self.outcome, self.log = options, stop, outcome, log
        self.stmts = Statements(settings, plan.rules, holds, shard, ids=check_write_back)
        self.shard = shard
        self.recorder, self.on_chunk = recorder, on_chunk
        self.before_chunk = before_chunk  # proves the run lock is still held
        self.fail_in_chunk = fail_in_chunk  # tests: raise inside chunk N, before COMMIT
        self.recount = recount  # the end count; None: trust the walk (unit tests only)
        self.skipped_by = skipped_by  # names the triggers and rules that may skip rows
        #: a trigger or rule fires on UPDATE and the role may read the personal columns:
        #: each chunk checks that what it cleaned holds no personal data, before its COMMIT
        #: and after it
        self.check_write_back = check_write_back
        self.skipped_locked_rows = False
        self.size = options.chunk_size or settings.clean.chunk_size
        self.recent: list[tuple[int, float]] = []  # (rows, ms) of the last chunks
        self.windows: Windows | None = None
        self.rest_ms = 0.0  # after the last committed chunk (`pacing.rest_ms`)
        self.walk_started = time.monotonic()  # for the estimate of the time left
        self.caught_up_rows = 0  # due rows the end count found, walked once more
        #: waits before a chunk while a standby lags (`clean.max_replica_lag_s`)
        self.throttle = (
            Throttle(engine, settings, stop=stop, log=self.log)
            if settings.clean.max_replica_lag_s > 0
            else None
        )

    def run(self) -> None:
        """Walk the plan's due blocks; then count what is still due and, where rows became
        due while the walk ran, walk once more; end `succeeded` only on a count of zero."""
        outcome = self.outcome
        self.walk_started = time.monotonic()
        if not self._walk(self.plan):
            return
        if self.recount is None:
            outcome.status = Status.SUCCEEDED
            return
        left = self.recount()
        if left.due_rows and not self._stopped():
            self.log.info("catching_up", due_rows=left.due_rows, due_blocks=len(left.blocks))
            self.caught_up_rows = left.due_rows
            if not self._walk(left):
                return
            left = self.recount()
        self._ended(left.due_rows)

    def _walk(self, plan: Plan) -> bool:
        """Clean the plan's blocks; False when the run ended on the way (a signal, a budget
        or a chunk whose sweep found rows left alone), with the outcome set."""
        outcome = self.outcome
        arm_rows = plan.arm_rows if plan.through_indexes else None
        windows = self.windows = Windows(plan.blocks, arm_rows)
        self.skipped_locked_rows = False  # of this walk: what the end count's reason says
        while not windows.done:
            if self._stopped():
                return self._stop_here()
            if self.throttle is not None and not self._caught_up(self.throttle):
                return False
            if self.before_chunk is not None:
                self.before_chunk()
            left = self._rows_left()
            lo, hi = windows.peek(self.size if left is None else min(self.size, left))
            for cap in (self.options.chunk_size, left):  # rows <= ids: a hard upper bound
                if cap is not None:
                    hi = min(hi, lo + cap)
            chunk = self._clean_window(outcome.chunks + 1, lo, hi)
            resume = chunk.last_id + 1 if chunk.resume_at is None else chunk.resume_at
            windows.advance(resume)
            if chunk.rows:
                self._committed(chunk)
                if self.check_write_back:
                    chunk = replace(chunk, written_back=self._held_after_commit(chunk))
                    if chunk.written_back:
                        self._left_alone(chunk, Left.WRITTEN_BACK_AT_COMMIT)
                        return False
            if chunk.missed:
                self._left_alone(chunk, Left.MISSED)
                return False
            if chunk.written_back:
                self._left_alone(chunk, Left.WRITTEN_BACK)
                return False
            if chunk.rows and self.rest_ms and not windows.done:  # between chunks only
                self._pause(self.rest_ms / 1000)
        if self.stop.requested:  # arrived during the last chunk, which committed
            return self._stop_here()
        return True

    def _caught_up(self, throttle: Throttle) -> bool:
        """Wait while a standby lags too far; False when the run ended on the way (a stop,
        `--max-runtime`, or a wait past `clean.max_throttle_wait_s`)."""
        verdict = throttle.wait(self.options.deadline(self.outcome.started))
        self.outcome.replica_wait_s = round(throttle.waited_s, 3)
        if verdict is Verdict.GO:
            return True
        return self._stop_here(
            Remaining.REPLICA_LAG.value if verdict is Verdict.WAITED_TOO_LONG else None
        )

    def _rows_left(self) -> int | None:
        budget = self._row_budget()
        return None if budget is None else budget - self.outcome.rows_cleaned

    def _stopped(self) -> bool:
        """A signal, or a row or time budget used up."""
        left = self._rows_left()
        deadline = self.options.deadline(self.outcome.started)
        return (
            self.stop.requested
            or (left is not None and left <= 0)
            or (deadline is not None and time.monotonic() >= deadline)
        )

    def _stop_here(self, reason: str | None = None) -> bool:
        """End the run where the walk stands: interrupted by a signal, else incomplete on
        `reason` or a budget (with the count of what is left, when a recount is possible)."""
        outcome = self.outcome
        if self.stop.requested:
            outcome.status, outcome.signum = Status.INTERRUPTED, self.stop.signum
            return False
        left = self._rows_left()
        outcome.stopped_by = reason or (
            self._row_budget_name()
            if left is not None and left <= 0
            else Remaining.MAX_RUNTIME.value
        )
        if self.recount is None:
            outcome.status = Status.INCOMPLETE
        else:
            self._ended(self.recount().due_rows)
        return False

    def _ended(self, remaining: int) -> None:
        """The end count decides: `succeeded` at zero, else `incomplete` with the reason."""
        outcome = self.outcome
        outcome.remaining_due_rows = remaining
        if remaining == 0:
            outcome.status = Status.SUCCEEDED
            return
        reasons = [outcome.stopped_by] if outcome.stopped_by else []
        if self.skipped_locked_rows:
            reasons.append(Remaining.LOCKED_BY_APPLICATION.value)
        if not reasons:
            reasons.append(Remaining.BECAME_DUE_DURING_RUN.value)
        outcome.status, outcome.remaining_reason = Status.INCOMPLETE, ",".join(reasons)

    def _left_alone(self, chunk: Chunk, left: Left) -> None:
        """The cleaning UPDATE did not do its work on some rows of the chunk, and the run
        fails, loudly, naming what fires on UPDATE: a sweep locked due rows that it left as
        they were (`MISSED`: the chunk committed what it did clean), rows it cleaned held
        personal data again before COMMIT (`WRITTEN_BACK`: the chunk rolled back, so nothing
        claims them cleaned), or after it (`WRITTEN_BACK_AT_COMMIT`: the chunk is in the
        trail, and `run --reclean` strips the rows again)."""
        outcome = self.outcome
        names = self.skipped_by() if self.skipped_by is not None else "unknown"
        where = f"with ids in [{chunk.first_id}, {chunk.last_id}]"
        fields: dict[str, object] = {}
        if left is Left.MISSED:
            count, event = chunk.missed, "rows_not_cleaned"
            outcome.missed_rows += count
            what = (
                f"{count} due rows {where} were left as they were by the cleaning UPDATE: a "
                f"trigger or rule on the table skipped them (on UPDATE: {names})"
            )
        else:
            count, event = chunk.written_back, "rows_written_back"
            outcome.written_back_rows += count
            after_commit = fields["after_commit"] = left is Left.WRITTEN_BACK_AT_COMMIT
            what = written_back_text(count, where, names, after_commit=after_commit)
            if not after_commit:
                what += "; the chunk was rolled back"
        outcome.status, outcome.error = Status.FAILED, f"{what}; `db check` lists them"
        self.log.error(
            event,
            seq=chunk.seq,
            first_id=chunk.first_id,
            last_id=chunk.last_id,
            rows=count,
            on_update=names,
            **fields,
        )

    def _hold_came_first(self, conn: Connection, params: dict[str, int]) -> bool:
        """Whether a hold committed between this chunk's cleaning statement and its event
        holds a member whose rows the chunk cleaned: the hold is then before the chunk in
        the chain (commit order), so the chunk must not stand. It is rolled back and its
        window done again, which the hold now keeps the member's rows out of."""
        if self.stmts.held_since is None:
            return False
        late = int(conn.execute(self.stmts.held_since, params).scalar_one())
        if late:
            self.log.warning("hold_placed_during_chunk", rows=late, first_id=params["lo"])
        return late > 0

    def _held_after_commit(self, chunk: Chunk) -> int:
        """How many rows of the committed chunk hold personal data (one read by its ids):
        a trigger deferred to COMMIT, or one that deferred again, wrote it back."""
        return held_after_commit(
            self.engine,
            self.stmts.written_back,
            chunk.ids,
            self.settings.clean,
            f"checking chunk {chunk.seq} after its COMMIT",
            stop=self.stop,
            deadline=self.options.deadline(self.outcome.started),
        )

    def _committed(self, chunk: Chunk) -> None:
        outcome, clean = self.outcome, self.settings.clean
        outcome.chunks += 1
        outcome.rows_cleaned += chunk.rows
        outcome.by_policy.update(chunk.by_policy)
        planned = self._planned()
        walking = time.monotonic() - self.walk_started
        left = max(planned - outcome.rows_cleaned, 0)
        self.rest_ms = pacing.rest_ms(
            chunk.elapsed_ms,
            pause_ms=clean.pause_between_chunks_ms,
            busy_fraction=clean.max_busy_fraction,
        )
        self.log.info(
            "chunk_committed",
            **chunk.logged(),
            ms=round(chunk.elapsed_ms, 1),
            sweep_ms=round(chunk.sweep_ms, 1),
            rest_ms=round(self.rest_ms, 1),
            cleaned_so_far=outcome.rows_cleaned,
            planned=planned,
            eta_s=round(left * walking / outcome.rows_cleaned, 1) if outcome.rows_cleaned else None,
            chunk_size=self.size,
            skipped_locked=chunk.skipped_locked,
            via="arms" if chunk.indexed else "ids",
        )
        self.recent.append((chunk.rows, chunk.elapsed_ms))
        del self.recent[: -sizing.WINDOW]
        self.size = sizing.next_size(
            self.size,
            self.recent,
            target_ms=0 if self.options.chunk_size else clean.target_chunk_ms,  # pinned
            floor=min(clean.min_chunk_size, self.size),
            ceiling=max(clean.max_chunk_size, self.size),
        )
        if self.on_chunk:
            self.on_chunk(chunk)

    def _planned(self) -> int:
        """The rows this run means to clean: the plan's due rows (and those of a catch-up
        walk), or a smaller row budget."""
        due = self.plan.due_rows + self.caught_up_rows
        budget = self._row_budget()
        return due if budget is None else min(due, budget)

    def _row_budget_name(self) -> str:
        """Which row budget is the smaller: `--max-rows` or `guard.max_rows_per_run`."""
        return row_budget(self.options, self.settings.guard)[1] or Remaining.MAX_ROWS.value

    def _row_budget(self) -> int | None:
        return row_budget(self.options, self.settings.guard)[0]

    def _pause(self, seconds: float) -> None:
        """Breathing room between chunks; a stop signal ends it (the loop then stops), and
        it never outlasts `--max-runtime`."""
        deadline = self.options.deadline(self.outcome.started)
        if deadline is not None:
            seconds = min(seconds, max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Interrupted):
            self.stop.sleep(seconds)

    # -- one window, with retries ---------------------------------------------------------

    def _clean_window(self, seq: int, lo: int, hi: int) -> Chunk:
        """Clean [lo, hi) in one transaction, retrying what a retry can fix (tenacity).

        Retried, with bounded exponential backoff: a lost connection or a server going
        away (after checking through the audit record whether an interrupted COMMIT
        landed), a lock timeout (someone holds the table), a statement timeout (with a
        window shrunk to a quarter). Anything else fails at once. A stop signal during
        the backoff ends the run at once, and retries stop when `--max-runtime` is spent.
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
                self.log.warning("commit_not_landed", seq=seq)
                raise unknown.cause from None

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            assert isinstance(exc, DBAPIError)
            if diagnosis.is_statement_timeout(exc):
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
                error=diagnosis.describe_error(exc),
                sleep_s=round(state.upcoming_sleep, 2),
            )

        return retry.call(
            attempt,
            clean,
            f"chunk {seq}",
            sleep=self.stop.sleep,
            before_sleep=before_sleep,
            deadline=self.options.deadline(self.outcome.started),
        )

    def _attempt(self, seq: int, lo: int, hi: int) -> Chunk:
        t0 = time.monotonic()
        sparse = self.windows is not None and self.windows.sparse(lo, hi)
        attempt = Attempt.INDEXED if sparse else Attempt.RANGE
        try:
            chunk = self._transaction(attempt, seq, lo, hi)
        except DBAPIError as exc:
            if not diagnosis.is_lock_timeout(exc):
                raise
            # A row (or the table) is locked by someone else: redo this window without
            # waiting for locked rows; a table lock still waits up to lock_timeout.
            chunk = self._transaction(attempt.skipping_locked(), seq, lo, hi)
            self.skipped_locked_rows = True
        return replace(chunk, elapsed_ms=(time.monotonic() - t0) * 1000)

    def _transaction(self, attempt: Attempt, seq: int, lo: int, hi: int) -> Chunk:
        """The one place a chunk's transaction begins and ends."""
        params = window_params(lo, hi)
        statements = attempt.statements(self.stmts)
        lock_ms, indexed = attempt.lock_wait_ms(self.settings.clean), attempt.indexed
        with self.engine.connect() as conn:
            transaction = conn.begin()
            engines.set_local(
                conn,
                **engines.timeouts(
                    lock_timeout_ms=lock_ms,
                    statement_timeout_ms=self.settings.clean.statement_timeout_ms,
                ),
                **engines.COMMIT_WITHOUT_WAITING_FOR_DISK,
                **(engines.INDEX_SCANS if indexed else {}),
            )
            by_policy: Counter[str] = Counter()
            cleaned_at, missed, ids = None, 0, list[int]()
            sweep_ms = 0.0  # the recount of the window (every statement after the UPDATE)
            for n, statement in enumerate(statements):
                locked, cleaned, began = None, 0, time.monotonic()
                for name, rows, stamp, *returned in conn.execute(statement, params):
                    if name is None:  # a sweep: how many due rows it locked
                        locked = int(rows)
                        continue
                    by_policy[name] += int(rows)
                    cleaned += int(rows)
                    cleaned_at = stamp
                    if returned:  # the ids it cleaned (`Statements.ids`)
                        ids.extend(returned[0])
                if locked is not None:
                    missed += max(locked - cleaned, 0)
                if n or len(statements) == 1:
                    sweep_ms += (time.monotonic() - began) * 1000
            chunk = Chunk(
                seq=seq,
                first_id=params["lo"],
                last_id=params["last"],
                rows=sum(by_policy.values()),
                by_policy=dict(by_policy),
                cleaned_at=cleaned_at,
                elapsed_ms=0.0,
                sweep_ms=sweep_ms,
                skipped_locked=attempt.skips_locked,
                indexed=indexed,
                missed=missed,
                ids=tuple(ids),
            )
            if chunk.rows and self.check_write_back:
                conn.execute(FIRE_DEFERRED)  # deferred triggers write back now, not at COMMIT
                again = int(
                    conn.execute(self.stmts.written_back, ids_params(chunk.ids)).scalar_one()
                )
                if again:
                    transaction.rollback()
                    return replace(chunk, rows=0, by_policy={}, written_back=again)
            if chunk.rows and self.recorder is not None:
                self.recorder.record_chunk(conn, chunk)
                if self._hold_came_first(conn, params):
                    transaction.rollback()
                    return replace(chunk, rows=0, by_policy={}, missed=0, resume_at=lo)
            if self.fail_in_chunk is not None:
                self.fail_in_chunk(seq)
            if not chunk.rows:
                end = hi if self.windows is None or self.windows.done else self.windows.block_end()
                if hi < end and not missed:
                    found = conn.execute(self.stmts.next_due, window_params(hi, end)).scalar()
                    chunk = replace(chunk, resume_at=end if found is None else int(found))
                transaction.rollback()
                return chunk
            try:
                transaction.commit()
            except DBAPIError as exc:
                if diagnosis.is_transient(exc):
                    raise _CommitUnknown(chunk, exc) from exc
                raise
            return chunk


def written_back_text(count: int, where: str, names: str, *, after_commit: bool) -> str:
    """The failure's words for rows that held personal data again right after they were
    cleaned (before COMMIT) or once their chunk committed."""
    if not after_commit:
        return (
            f"{count} rows {where} held personal data again right after the cleaning UPDATE: "
            f"a trigger or rule writes it back (on UPDATE: {names})"
        )
    return (
        f"{count} rows {where} held personal data again after their chunk committed: a "
        f"trigger deferred to COMMIT (or another session) writes it back (on UPDATE: {names}); "
        "`run --reclean` strips them again once that is fixed"
    )


def held_after_commit(
    engine: Engine,
    check: Select[Any],
    ids: tuple[int, ...],
    clean: Clean,
    what: str,
    *,
    stop: Stop,
    deadline: float | None,
) -> int:
    """How many rows of a committed chunk (its `ids`) hold personal data now (`check`,
    `statements.written_back`): one read by their ids, in a transaction of its own, retried
    like a chunk."""

    def attempt() -> int:
        with engine.connect() as conn, conn.begin():
            engines.set_local(
                conn,
                **engines.timeouts(
                    lock_timeout_ms=clean.lock_timeout_ms,
                    statement_timeout_ms=clean.statement_timeout_ms,
                ),
            )
            return int(conn.execute(check, ids_params(ids)).scalar_one())

    return retry.call(attempt, clean, what, sleep=stop.sleep, deadline=deadline)


class Left(Enum):
    """What a chunk's cleaning UPDATE failed to do (`Cleaner._left_alone`)."""

    MISSED = "missed"
    WRITTEN_BACK = "written back"
    WRITTEN_BACK_AT_COMMIT = "written back at commit"


class Attempt(Enum):
    """How a window is tried: by its ids or through the policies' arms (a sparse window),
    and with a short wait for row locks, or skipping the rows others hold locked."""

    RANGE = "range"
    INDEXED = "indexed"
    RANGE_SKIP_LOCKED = "range, skip locked"
    INDEXED_SKIP_LOCKED = "indexed, skip locked"

    @property
    def indexed(self) -> bool:
        return self in (Attempt.INDEXED, Attempt.INDEXED_SKIP_LOCKED)

    @property
    def skips_locked(self) -> bool:
        return self in (Attempt.RANGE_SKIP_LOCKED, Attempt.INDEXED_SKIP_LOCKED)

    def skipping_locked(self) -> Attempt:
        """The same window again, skipping locked rows (after a row lock timed out)."""
        return Attempt.INDEXED_SKIP_LOCKED if self.indexed else Attempt.RANGE_SKIP_LOCKED

    def statements(self, stmts: Statements) -> tuple[Select[Any] | CompoundSelect[Any], ...]:
        """The fast UPDATE, then the sweep (the window's recount); skipping locked rows, the sweep
        alone (it locks what it cleans, skipping what others hold)."""
        swept = stmts.swept_indexed if self.indexed else stmts.swept_range
        if self.skips_locked:
            return (swept,)
        fast = stmts.indexed_update if self.indexed else stmts.range_update
        return (fast, swept)

    def lock_wait_ms(self, clean: Clean) -> int:
        """A short wait for a row lock first (`row_lock_wait_ms`); skipping locked rows,
        only a table lock is waited for, up to `lock_timeout_ms`."""
        if self.skips_locked:
            return clean.lock_timeout_ms
        return min(clean.row_lock_wait_ms, clean.lock_timeout_ms)


class _CommitUnknown(Exception):
    """The connection broke during COMMIT: the chunk may or may not have landed."""

    def __init__(self, chunk: Chunk, cause: DBAPIError) -> None:
        super().__init__("commit outcome unknown")
        self.chunk, self.cause = chunk, cause
