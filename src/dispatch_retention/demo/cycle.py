"""The whole cycle on an embedded PostgreSQL (the optional `pgserver` package).

`make demo` and `dispatch-retention demo`: start a throwaway server in a temporary
directory, create the dispatches table, seed synthetic dispatches, then hand over to the
normal `run` path (dry-run first, then the real run). Nothing here touches a real database.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Engine, func, select

from dispatch_retention import render
from dispatch_retention.catalog import indexes
from dispatch_retention.checks import audit_verify
from dispatch_retention.checks.verify import verify
from dispatch_retention.config import Settings
from dispatch_retention.demo.synthetic import create_dispatches, seed
from dispatch_retention.errors import EmbeddedUnavailable
from dispatch_retention.pg import engines
from dispatch_retention.run import job
from dispatch_retention.trail import holds, listing, migrate
from dispatch_retention.trail.audit_tables import AuditTables
from dispatch_retention.vocabulary import Options, Outcome, Request, Stop


@contextlib.contextmanager
def embedded_server(data_dir: Path | None = None) -> Iterator[str]:
    """Yield the postgresql:// URL of a private server; stop it on exit."""
    # pgserver's platformdirs warns on import where no login session set XDG_RUNTIME_DIR (a
    # container, CI): nothing a user can act on, so a newcomer's first screen stays clean.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            import pgserver
        except ImportError:
            raise EmbeddedUnavailable(
                "the embedded PostgreSQL needs the 'embedded' extra: "
                "pip install 'dispatch-retention[embedded]'"
            ) from None
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dr-demo-")))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()


def prepare(engine: Engine, settings: Settings, rows: int) -> int:
    """Create the table and its indexes, seed `rows` dispatches; return the row count."""
    with engine.begin() as conn:
        table = create_dispatches(conn, settings.target)
        indexes.create(conn, settings)
        now = conn.execute(select(func.now())).scalar_one()
        seed(conn, table, rows=rows, now=now, members=max(rows // 20, 10))
        conn.exec_driver_sql("ANALYZE")
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def cycle(settings: Settings, rows: int, *, stop: Stop, echo: Callable[[str], None]) -> Outcome:
    """Seed, upgrade, hold one member, dry-run, run, verify, show the audit trail and check
    its hash chain."""
    tables = AuditTables(settings.audit.schema_)
    with embedded_server() as url:
        engine = engines.make_engine(engines.parse_url(url))
        try:
            echo(f"Seeding {rows} synthetic dispatches into an embedded PostgreSQL ...")
            total = prepare(engine, settings, rows)
            migrate.upgrade(engine, tables.schema)
            with engine.begin() as conn:
                holds.add(conn, tables, 7, "demo: case DEMO-1 (litigation)", "demo")
            echo(f"{total} dispatches in {settings.target.table}; member 7 is under legal hold.")
            echo(
                "\n== dispatch-retention hold list ==\n"
                + render.holds(_holds(engine, tables), "table")
            )
            planned = job.run(engine, settings, Request(Options(dry_run=True)), stop=stop)
            if planned.plan is None:
                return planned
            echo("\n== dispatch-retention run --dry-run ==\n" + render.plan_text(planned.plan))
            outcome = job.run(engine, settings, Request(), stop=stop)
            echo("\n== dispatch-retention run ==\n" + render.outcome_text(outcome))
            with engine.connect() as conn, conn.begin():
                report = verify(conn, settings, tables)
            echo("\n== dispatch-retention verify ==\n" + render.verify_text(report))
            with engine.connect() as conn:
                runs = listing.list_runs(conn, tables)
            echo("\n== dispatch-retention audit list ==\n" + render.runs(runs, "table"))
            with engine.connect() as conn, conn.begin():
                trail = audit_verify.check(conn, settings, tables)
            echo("\n== dispatch-retention audit verify ==\n" + render.chain_text(trail))
            return outcome
        finally:
            engine.dispose()


def _holds(engine: Engine, tables: AuditTables) -> list[dict[str, object]]:
    with engine.connect() as conn:
        return holds.list_holds(conn, tables)
