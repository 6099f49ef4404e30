"""`run --reclean`: strip again the cleaned dispatches whose personal data was written back.

A plain run never touches a row whose `cleaned_at` is set. When `verify` reports
`written_back_rows` (a trigger or the application put personal data back into cleaned rows),
an operator fixes the cause (`db check` lists the triggers and rules) and runs `run
--reclean`, which after the normal walk finds those rows (`policy.written_back`, members
under an active legal hold excepted) and strips them again, in committed chunks of its own
(`kind = 'reclean'` in the audit trail, counted apart from the rows cleaned).

Finding them means reading the personal columns (whether they hold a value): the role needs
SELECT on them, which the run role of `db grants` does not have; `require_rights()` refuses
(exit 2) before anything is touched.

Transactions: each chunk locks up to `size` written-back rows past the last id it saw (SKIP
LOCKED: a row the application holds is left for the next reclean), strips them (the columns
of `clean.columns`, and `updated_at`; `cleaned_at` keeps the time of the first cleaning),
makes deferred constraint triggers fire (`SET CONSTRAINTS ALL IMMEDIATE`), checks by their
ids that none of them holds personal data afterwards (a trigger that writes back again: the
chunk rolls back and the run fails with the count), writes its audit record and commits;
then it reads the same ids again (a trigger that deferred again writes back at COMMIT: the
run fails with the count, as a chunk of the walk does). A stop signal is honoured between
chunks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import structlog
from sqlalchemy import Connection, Engine, Table, and_, any_, func, not_, select, true, update

from dispatch_retention.catalog import target
from dispatch_retention.config import Settings
from dispatch_retention.errors import RecleanRefused
from dispatch_retention.pg import engines
from dispatch_retention.rule import policy
from dispatch_retention.rule.dispatch_table import target_table
from dispatch_retention.rule.shard import Shard
from dispatch_retention.run import statements
from dispatch_retention.run.cleaner import held_after_commit, written_back_text
from dispatch_retention.vocabulary import Chunk, Outcome, Recorder, Status, Stop

log = structlog.get_logger("dispatch_retention")


def require_rights(conn: Connection, settings: Settings) -> None:
    """Raise `RecleanRefused` naming the columns the role cannot read but must, to find
    written-back rows."""
    missing = target.unreadable_columns(conn, settings)
    if missing:
        raise RecleanRefused(settings.target.table, missing)


class Recleaner:
    """The chunks of one reclean pass, after the run's walk."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        rules: policy.Rules,
        *,
        outcome: Outcome,
        stop: Stop,
        size: int,
        holds: Table | None = None,
        shard: Shard | None = None,
        recorder: Recorder | None = None,
        log: structlog.typing.FilteringBoundLogger = log,
        before_chunk: Callable[[], None] | None = None,
        skipped_by: Callable[[], str] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.engine, self.settings, self.outcome, self.stop = engine, settings, outcome, stop
        self.size, self.recorder, self.log, self.before_chunk = size, recorder, log, before_chunk
        self.skipped_by, self.deadline = skipped_by, deadline  # names what fires on UPDATE
        table = self.table = target_table(settings)
        scope = shard.predicate(table) if shard else true()
        found = and_(policy.written_back(table, settings), scope)
        if holds is not None:
            found = and_(found, not_(policy.held(table, holds)))
        self.found = found
        self.credit = policy.credit(table, rules)
        self.values = {**policy.cleaned_values(settings, table), "updated_at": func.now()}
        # by the ids a chunk locked, bound as one array (`statements.ids_params`)
        self.strip = (
            update(table)
            .where(table.c.id == any_(statements.ids_param()))
            .values(self.values)
            .returning(self.credit)
        )
        self.check = statements.written_back(table, settings)

    def run(self) -> bool:
        """Reclean every written-back row; False when the run ended on the way (a stop
        signal, or rows a trigger wrote back again), with the outcome set."""
        after: int | None = None
        while True:
            if self.stop.requested:
                self.outcome.status, self.outcome.signum = Status.INTERRUPTED, self.stop.signum
                return False
            if self.before_chunk is not None:
                self.before_chunk()
            chunk, after = self._chunk(self.outcome.chunks + 1, after)
            if chunk is None:
                return True
            if chunk.rows:
                self.outcome.chunks += 1
                self.outcome.rows_recleaned += chunk.rows
                self.log.info("chunk_committed", **chunk.logged(), kind=chunk.kind)
                again = held_after_commit(
                    self.engine,
                    self.check,
                    chunk.ids,
                    self.settings.clean,
                    f"checking reclean chunk {chunk.seq} after its COMMIT",
                    stop=self.stop,
                    deadline=self.deadline,
                )
                if again:
                    self._written_back(chunk, again, after_commit=True)
                    return False
            if chunk.written_back:
                self._written_back(chunk, chunk.written_back, after_commit=False)
                return False

    def _written_back(self, chunk: Chunk, count: int, *, after_commit: bool) -> None:
        """Rows stripped again held personal data again, before COMMIT (the chunk rolled
        back) or after it: the run fails, in the words of the walk's own check."""
        names = self.skipped_by() if self.skipped_by is not None else "unknown"
        where = f"with ids in [{chunk.first_id}, {chunk.last_id}]"
        what = written_back_text(count, where, names, after_commit=after_commit)
        if not after_commit:
            what += "; the chunk was rolled back"
        self.outcome.written_back_rows += count
        self.outcome.status = Status.FAILED
        self.outcome.error = f"{what}; `db check` lists them"
        self.log.error(
            "rows_written_back",
            seq=chunk.seq,
            first_id=chunk.first_id,
            last_id=chunk.last_id,
            rows=count,
            on_update=names,
            after_commit=after_commit,
            kind=chunk.kind,
        )

    def _chunk(self, seq: int, after: int | None) -> tuple[Chunk | None, int | None]:
        table = self.table
        with self.engine.connect() as conn, conn.begin() as transaction:
            clean = self.settings.clean
            engines.set_local(
                conn,
                **engines.timeouts(
                    lock_timeout_ms=clean.lock_timeout_ms,
                    statement_timeout_ms=clean.statement_timeout_ms,
                ),
            )
            beyond = true() if after is None else table.c.id > after
            ids = list(
                conn.execute(
                    select(table.c.id)
                    .where(beyond, self.found)
                    .order_by(table.c.id)
                    .limit(self.size)
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            if not ids:
                return None, after
            by_policy = Counter(conn.execute(self.strip, statements.ids_params(ids)).scalars())
            conn.execute(statements.FIRE_DEFERRED)  # deferred triggers write back now
            still = conn.execute(self.check, statements.ids_params(ids)).scalar_one()
            stamp = conn.execute(select(func.now())).scalar_one()
            chunk = Chunk(
                seq=seq,
                first_id=ids[0],
                last_id=ids[-1],
                rows=sum(by_policy.values()),
                by_policy={str(k): v for k, v in by_policy.items()},
                cleaned_at=stamp,
                elapsed_ms=0.0,
                skipped_locked=True,
                written_back=int(still),
                kind="reclean",
                ids=tuple(ids),
            )
            if still:  # written back at once: nothing achieved, nothing to record
                transaction.rollback()
                return replace(chunk, rows=0, by_policy={}), ids[-1]
            if chunk.rows and self.recorder is not None:
                self.recorder.record_chunk(conn, chunk)
            transaction.commit()
            return chunk, ids[-1]
