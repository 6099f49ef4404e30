"""`db upgrade` and the schema-version check that `run` makes before it touches anything.

Alembic manages the job's own tables (runs, chunks, legal_holds) in the audit schema, with a
version table of its own name (`dispatch_retention_alembic_version`) in that schema. `run`
only reads that version table (plain SQL, no Alembic import on the hot path) and compares it
with `HEAD`, the newest revision in `migrations/versions` (a test keeps the two in step).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Connection, Engine, MetaData, Table, Text, inspect, select, text
from sqlalchemy.schema import CreateSchema

from dispatch_retention.errors import MissingPrivilege, SchemaNotReady
from dispatch_retention.trail.audit_tables import ALEMBIC_VERSION_TABLE

#: Every migration in order; `tests/trail/test_migrations.py` checks them against Alembic's own.
REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008")
#: The newest migration: what this version needs.
HEAD = REVISIONS[-1]


def alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "dispatch_retention.trail:migrations")
    return cfg


def current(conn: Connection, schema: str) -> str | None:
    """The revision recorded in the audit schema, or None when it has no tables yet."""
    if not inspect(conn).has_table(ALEMBIC_VERSION_TABLE, schema=schema):
        return None
    version = Table(ALEMBIC_VERSION_TABLE, MetaData(), Column("version_num", Text), schema=schema)
    return conn.execute(select(version.c.version_num)).scalar()


def _check(conn: Connection, schema: str, found: str | None) -> None:
    """Refuse a revision this version does not know (a newer image migrated the database)
    and job tables without their version table (their revision is unknown)."""
    # revisions are numbered "0001", "0002", ...: one past HEAD comes from a newer version
    if found is not None and found not in REVISIONS and found > HEAD:
        raise SchemaNotReady(schema, found, HEAD, state="newer")
    if found is None and inspect(conn).has_table("runs", schema=schema):
        raise SchemaNotReady(schema, None, HEAD, state="unversioned")


def upgrade(engine: Engine, schema: str) -> tuple[str | None, str]:
    """Create the schema if needed and migrate it to head; return (before, after).

    Asks only for the rights the work needs, and names one that is missing before trying:
    CREATE on the database only when the schema does not exist (docs/deploy.md creates it
    for the migrating role), CREATE on the schema only when there is something to migrate."""
    from alembic import command

    with engine.begin() as conn:
        _rights(conn, schema)
        if not conn.execute(_SCHEMA_EXISTS, {"s": schema}).scalar():
            conn.execute(CreateSchema(schema))
        before = current(conn, schema)
        _check(conn, schema, before)
        if before != HEAD:
            _require(conn, "CREATE", "schema", schema)
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        cfg.attributes["schema"] = schema
        command.upgrade(cfg, "head")
        return before, current(conn, schema) or HEAD


_SCHEMA_EXISTS = text("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = :s)")
_PRIVILEGE = {
    "database": "has_database_privilege(current_database(), :p)",
    "schema": "has_schema_privilege(:o, :p)",
}


def _rights(conn: Connection, schema: str) -> None:
    """USAGE on an existing schema, else CREATE on the database to make it."""
    if conn.execute(_SCHEMA_EXISTS, {"s": schema}).scalar():
        _require(conn, "USAGE", "schema", schema)
    else:
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        _require(conn, "CREATE", "database", database, schema=schema)


def _require(conn: Connection, right: str, kind: str, name: str, *, schema: str = "") -> None:
    query = text(f"SELECT {_PRIVILEGE[kind]}, current_user")
    allowed, role = conn.execute(query, {"o": name, "p": right}).one()
    if not allowed:
        raise MissingPrivilege(role, right, kind, name, creating_schema=schema)


def require_current(conn: Connection, schema: str) -> None:
    found = current(conn, schema)
    _check(conn, schema, found)
    if found is None:
        raise SchemaNotReady(schema, None, HEAD)
    if found != HEAD:
        raise SchemaNotReady(schema, found, HEAD)
