"""One run at a time per target: a session-level advisory lock on a dedicated connection.

The lock lives as long as the server session, so a killed process releases it at once, and
holding it proves that no other run on the same target is alive. That needs a direct
connection or session pooling: a transaction-pooling PgBouncer hands the session to other
clients between transactions and breaks session locks. SQLAlchemy's pool would keep the
session too (`close()` returns the connection to it): the lock's connection is invalidated
instead, which ends its session, when the run is done or the connection fails.
"""

from __future__ import annotations

import contextlib
import hashlib
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from dispatch_retention.errors import LockLost, RetriesExhausted
from dispatch_retention.printable import shown_name

NAMESPACE = "dispatch-retention"


def lock_key(target_table: str, shard: str | None = None) -> int:
    """A stable signed 64-bit key from the (schema-qualified) target table and shard."""
    name = f"{NAMESPACE}:{target_table}" + (f"#shard:{shard}" if shard else "")
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def run_locks(target_table: str, shard: str | None) -> list[tuple[int, bool]]:
    """(key, shared) pairs: a whole run holds the target exclusively; a shard holds it
    shared (so shards run side by side but never beside a whole run) plus its own shard."""
    if shard is None:
        return [(lock_key(target_table), False)]
    return [(lock_key(target_table), True), (lock_key(target_table, shard), False)]


def _shown(name: str | None) -> str | None:
    return None if name is None else shown_name(name)


class RunLock:
    """`with RunLock(engine, run_locks(...)) as lock:` then check `lock.acquired`."""

    def __init__(self, engine: Engine, keys: list[tuple[int, bool]]) -> None:
        self.engine, self.keys = engine, keys
        self.conn: Connection | None = None
        self.held: list[tuple[int, bool]] = []
        self.blocked_on: int | None = None

    @property
    def acquired(self) -> bool:
        return self.blocked_on is None and len(self.held) == len(self.keys)

    def __enter__(self) -> RunLock:
        # A failure leaves self.conn None: ensure() retries. Autocommit: the locks are
        # session-level, and ensure()'s check before every chunk is then one round trip.
        self.conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        for key, shared in self.keys:
            function = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
            got = self.conn.execute(text(f"SELECT {function}(:k)"), {"k": key}).scalar()
            if not got:
                self.blocked_on = key
                break
            self.held.append((key, shared))
        self.conn.commit()  # ends SQLAlchemy's transaction; the locks belong to the session
        return self

    def ensure(self) -> None:
        """Before each chunk: prove the locks are still ours. If the lock connection died
        (terminated, network), reconnect and take them again; if someone else got them in
        between, raise `LockLost`: two runs must never clean side by side."""
        if self.conn is not None:
            try:
                self.conn.execute(text("SELECT 1"))
                self.conn.commit()
                return
            except DBAPIError:
                with contextlib.suppress(Exception):
                    self.conn.invalidate()  # its session, if it lives, ends with its locks
                    self.conn.close()
                self.conn = None
        self.held, self.blocked_on = [], None
        self.__enter__()
        if not self.acquired:
            raise LockLost("the run lock's connection was lost and another run holds the lock now")

    def holder(self, runs_table: str) -> list[dict[str, Any]]:
        """Who holds the lock we could not take: pid, application, role, client, since when
        (an ISO 8601 time, as every other time in the log), and whether that role may run
        the job at all (`may_run`: it may start a run record in `runs_table`, the audit
        schema's runs; the lock's key is computable, so any role can take it). The
        application and role names are the holder's to choose (`application_name`, a quoted
        role name): escaped and bounded (`printable.shown_name`)."""
        assert self.conn is not None
        if self.blocked_on is None:
            return []
        rows = (
            self.conn.execute(
                text(
                    "SELECT a.pid, a.application_name, host(a.client_addr) AS client_addr, "
                    "a.backend_start, a.usename, l.mode, "
                    "coalesce(has_table_privilege(a.usesysid, to_regclass(:runs), 'INSERT'), "
                    "false) AS may_run "
                    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database()) "
                    "AND l.classid = ((:k >> 32) & 4294967295)::bigint::oid "
                    "AND l.objid = (:k & 4294967295)::bigint::oid AND l.objsubid = 1 "
                    "AND a.pid <> pg_backend_pid()"
                ),
                {"k": self.blocked_on, "runs": runs_table},
            )
            .mappings()
            .all()
        )
        self.conn.commit()
        return [
            {
                **row,
                "application_name": _shown(row["application_name"]),
                "usename": _shown(row["usename"]),
                "backend_start": row["backend_start"] and row["backend_start"].isoformat(),
            }
            for row in rows
        ]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.conn is None:
            return
        # Unlocked, then the connection invalidated: its server session ends, which releases
        # every session lock even if the unlock failed (`close()` alone would return the
        # session to the pool, its locks with it).
        with contextlib.suppress(Exception):
            for key, shared in reversed(self.held):
                function = "pg_advisory_unlock_shared" if shared else "pg_advisory_unlock"
                self.conn.execute(text(f"SELECT {function}(:k)"), {"k": key})
            self.conn.commit()
        self.conn.invalidate()
        self.conn.close()


#: The table locks that a chunk's ROW EXCLUSIVE lock waits for.
BLOCKING_MODES = ("ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")


def table_holders(engine: Engine, regclass: str) -> list[dict[str, Any]]:
    """The other sessions holding a lock on the table `regclass` that a chunk waits for
    (`BLOCKING_MODES`: a `LOCK TABLE`, a DDL statement): pid, application, role, mode, and
    since when their transaction runs (null where this role may not see it). The names are
    the holder's to choose: escaped and bounded, as `RunLock.holder` shows them."""
    with engine.connect() as conn:
        rows = (
            conn.execute(
                text(
                    "SELECT a.pid, a.application_name, a.usename, l.mode, a.xact_start "
                    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'relation' AND l.granted "
                    "AND l.relation = to_regclass(:t) AND l.mode = ANY(:modes) "
                    "AND a.pid <> pg_backend_pid() ORDER BY a.pid"
                ),
                {"t": regclass, "modes": list(BLOCKING_MODES)},
            )
            .mappings()
            .all()
        )
    return [
        {
            "pid": row["pid"],
            "application_name": _shown(row["application_name"]),
            "usename": _shown(row["usename"]),
            "mode": row["mode"],
            "since": row["xact_start"] and row["xact_start"].isoformat(),
        }
        for row in rows
    ]


def named(holders: list[dict[str, Any]]) -> str:
    """The holders as the run's error names them: pid, role, lock mode, since. Not the
    application's name, which any client sets to any text: the error enters the append-only
    trail, so the name stays in the `table_locked_by` log event."""
    return (
        ", ".join(
            f"pid {h['pid']} (role {h['usename']}, {h['mode']}, since {h['since'] or 'unknown'})"
            for h in holders
        )
        + " (their applications: the table_locked_by event)"
    )


def with_holders(
    engine: Engine, regclass: str, exc: RetriesExhausted, log: Any
) -> RetriesExhausted:
    """A step that gave up on a lock timeout names the sessions holding the table locked,
    as a run locked out names the lock's holder (exit 3): pid, application, role, since
    (logged as `table_locked_by`). Anything else, or no holder left to see, as it was."""
    if not exc.lock_timeout:
        return exc
    try:
        holders = table_holders(engine, regclass)
    except DBAPIError:  # the look is a courtesy: the run fails for its own reason
        return exc
    if not holders:  # released between the timeout and the look
        return exc
    log.error("table_locked_by", holders=holders)
    return RetriesExhausted(f"{exc.reason}; the table is locked by {named(holders)}")
