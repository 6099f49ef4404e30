"""The server the bench runs on: admin access, the databases one bench run creates, WAL counts.

Every database this module creates is remembered and dropped by `Server.drop_all()`, which
`__main__` calls at the end of a run, also on an error or a signal. It never drops a
database it did not create.

The statements the contenders run are compiled here to PostgreSQL text with literal values
(`sql()`), so that they reach the server as plain SQL without bound parameters.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from dispatch_retention import errors
from dispatch_retention.pg import engines
from dispatch_retention.trail import facts

REPO = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


#: SQL text with its values written out, as psql reads it (`facts.SCRIPT`, the job's own:
#: a JSON value as its text, quotes doubled, nothing else escaped); the contenders send it
#: without parameters.
PG_DIALECT = facts.SCRIPT
QUOTE = PG_DIALECT.identifier_preparer.quote_identifier  # always quoted, as CREATE DATABASE needs


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sql(stmt: Any) -> str:
    """Compile a Core statement or expression to PostgreSQL text with literal values."""
    return facts.script_sql(stmt)


class Server:
    """Admin access to the server, and the databases this run created (dropped at the end)."""

    def __init__(self, raw_url: str) -> None:
        try:
            self.url: URL = engines.parse_url(raw_url)  # the job's own rules for a database URL
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

    def now(self, database: str) -> datetime:
        """The database clock, read as the job reads it (`engines.database_now`)."""
        engine = self.engine(database)
        try:
            with engine.connect() as conn:
                now: datetime = engines.database_now(conn)
                return now
        finally:
            engine.dispose()

    def create_database(self, name: str, template: str | None = None) -> None:
        stmt = f"CREATE DATABASE {QUOTE(name)}"
        if template:
            stmt += f" TEMPLATE {QUOTE(template)}"
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
            conn.execute(text(f"DROP DATABASE IF EXISTS {QUOTE(name)}{force}"))
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
