"""The whole cycle on an embedded PostgreSQL (the optional `pgserver` package).

`make demo` and `dispatch-retention demo`: start a throwaway server in a temporary
directory, create the dispatches table, seed synthetic dispatches, then hand over to the
normal `run` path (dry-run first, then the real run). Nothing here touches a real database.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, func, select

from .config import Settings
from .schema import create_dispatches
from .synthetic import seed


class EmbeddedUnavailable(Exception):
    """pgserver is not installed (pip install 'dispatch-retention[embedded]')."""


@contextlib.contextmanager
def embedded_server(data_dir: Path | None = None) -> Iterator[str]:
    """Yield the postgresql:// URL of a private server; stop it on exit."""
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
        server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()


def prepare(engine: Engine, settings: Settings, rows: int) -> int:
    """Create the table and its indexes, seed `rows` dispatches; return the row count."""
    with engine.begin() as conn:
        table = create_dispatches(conn, settings.target)
        now = conn.execute(select(func.now())).scalar_one()
        seed(conn, table, rows=rows, now=now)
        conn.exec_driver_sql("ANALYZE")
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())
