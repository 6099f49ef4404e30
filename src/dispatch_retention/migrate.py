"""`db upgrade` and the schema-version check that `run` makes before it touches anything.

Alembic manages the job's own tables (runs, chunks, legal_holds) in the audit schema, with a
version table of its own name (`dispatch_retention_alembic_version`) in that schema.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.schema import CreateSchema

from .schema import ALEMBIC_VERSION_TABLE


class SchemaNotReady(Exception):
    """The audit schema is missing or behind: `db upgrade` must run first (exit 2)."""


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "dispatch_retention:migrations")
    return cfg


def head() -> str:
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(conn: Connection, schema: str) -> str | None:
    if not inspect(conn).has_table(ALEMBIC_VERSION_TABLE, schema=schema):
        return None
    context = MigrationContext.configure(
        conn, opts={"version_table": ALEMBIC_VERSION_TABLE, "version_table_schema": schema}
    )
    return context.get_current_revision()


def upgrade(engine: Engine, schema: str) -> tuple[str | None, str]:
    """Create the schema if needed and migrate it to head; return (before, after)."""
    with engine.begin() as conn:
        conn.execute(CreateSchema(schema, if_not_exists=True))
        before = current(conn, schema)
        cfg = _config()
        cfg.attributes["connection"] = conn
        cfg.attributes["schema"] = schema
        command.upgrade(cfg, "head")
        return before, head()


def require_current(conn: Connection, schema: str) -> None:
    found, wanted = current(conn, schema), head()
    if found is None:
        raise SchemaNotReady(
            f"the audit schema {schema!r} has no tables yet: run `dispatch-retention db upgrade`"
            " (with a role that may create them) before the first run"
        )
    if found != wanted:
        raise SchemaNotReady(
            f"the audit schema {schema!r} is at revision {found}, this version needs {wanted}:"
            " run `dispatch-retention db upgrade`"
        )
