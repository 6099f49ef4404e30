"""SQLAlchemy Core tables: the Messaging API's dispatches table and the job's own tables.

The dispatches table belongs to the Messaging API; the job never creates, alters or drops it
in production. `dispatches_table()` describes it (its name comes from the config) so that
statements can be built; `create_dispatches()` exists for the tests, the demo and the
benchmarks only.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Index,
    MetaData,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.schema import CreateSchema

from .config import Target


def dispatches_table(target: Target, metadata: MetaData | None = None) -> Table:
    """The dispatches table as the seed model documents it (CONTRACT section 2)."""
    return Table(
        target.table_name,
        metadata or MetaData(),
        Column("id", BigInteger, primary_key=True),
        Column("type", Text, nullable=False),
        Column("content", JSONB),
        Column("member_id", BigInteger),
        Column("msisdn", Text),
        Column("email", Text),
        Column("app_token", Text),
        Column("transmission_status", Text),
        Column("delivery_status", Text),
        Column("external_delivery_status", Text),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True)),
        Column("scheduled_at", DateTime(timezone=True)),
        Column("transmitted_at", DateTime(timezone=True)),
        Column("delivered_at", DateTime(timezone=True)),
        Column("cleaned_at", DateTime(timezone=True)),
        schema=target.schema_name,
    )


def due_index(table: Table) -> Index:
    """The partial index that lets the job find not-yet-cleaned rows by age without a scan."""
    return Index(
        f"{table.name}_retention_due_idx",
        table.c.created_at,
        postgresql_where=table.c.cleaned_at.is_(None),
    )


def create_dispatches(conn: Connection, target: Target) -> Table:
    """Create the dispatches table with production-like indexes (tests, demo, benchmarks)."""
    table = dispatches_table(target)
    if target.schema_name:
        conn.execute(CreateSchema(target.schema_name, if_not_exists=True))
    table.create(conn, checkfirst=True)
    for index in (
        Index(f"{table.name}_member_id_idx", table.c.member_id),
        Index(f"{table.name}_msisdn_idx", table.c.msisdn),
        due_index(table),
    ):
        index.create(conn, checkfirst=True)
    return table
