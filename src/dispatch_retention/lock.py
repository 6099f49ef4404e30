"""One run at a time per target: a session-level advisory lock on a dedicated connection.

The lock lives as long as the connection, so a killed process releases it at once, and
holding it proves that no other run on the same target is alive. That needs a direct
connection or session pooling: a transaction-pooling PgBouncer hands the session to other
clients between transactions and breaks session locks.
"""

from __future__ import annotations

import hashlib
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, text

NAMESPACE = "dispatch-retention"


def lock_key(target_table: str) -> int:
    """A stable signed 64-bit key from the (schema-qualified) target table name."""
    digest = hashlib.sha256(f"{NAMESPACE}:{target_table}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class RunLock:
    """`with RunLock(engine, key) as lock:` then check `lock.acquired`."""

    def __init__(self, engine: Engine, key: int) -> None:
        self.engine, self.key = engine, key
        self.conn: Connection | None = None
        self.acquired = False

    def __enter__(self) -> RunLock:
        self.conn = self.engine.connect()
        self.acquired = bool(
            self.conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
        )
        self.conn.commit()  # the lock is session-level: it outlives this transaction
        return self

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock: pid, application, client address, since when."""
        assert self.conn is not None
        row = (
            self.conn.execute(
                text(
                    "SELECT a.pid, a.application_name, host(a.client_addr) AS client_addr, "
                    "a.backend_start, a.usename "
                    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.classid = ((:k >> 32) & 4294967295)::bigint::oid "
                    "AND l.objid = (:k & 4294967295)::bigint::oid AND l.objsubid = 1 "
                    "LIMIT 1"
                ),
                {"k": self.key},
            )
            .mappings()
            .first()
        )
        self.conn.commit()
        return dict(row) if row else None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.conn is None:
            return
        try:
            if self.acquired:
                self.conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                self.conn.commit()
        except Exception:  # noqa: S110 - closing the connection releases the lock anyway
            pass
        finally:
            self.conn.close()
