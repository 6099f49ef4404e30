"""The Messaging API's dispatches table as SQLAlchemy Core describes it.

The dispatches table belongs to the Messaging API; the job never creates, alters or drops it
in production. `dispatches_table()` describes it as the Dispatch model documents it (its
name comes from the config) and `target_table()` with the real table's column types, so
that statements can be built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import ENUM, JSON, JSONB, TIMESTAMP
from sqlalchemy.types import NullType, TypeEngine

from dispatch_retention.config import Settings, Target
from dispatch_retention.rule.shape import ColumnShape


def dispatches_table(target: Target, metadata: MetaData | None = None) -> Table:
    """The dispatches table as the Messaging API's Dispatch model documents it."""
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


def target_table(settings: Settings, metadata: MetaData | None = None) -> Table:
    """The target table with its real column types once the job has connected
    (`Settings.shape`, read by `target.resolve_settings`), else the seed model's: every
    statement the job runs is built on this."""
    model = dispatches_table(settings.target, metadata)
    if settings.shape is None:
        return model
    columns = []
    for name, shaped in settings.shape.columns.items():
        seed = model.c.get(name)
        columns.append(
            Column(
                name,
                column_type(shaped),
                primary_key=bool(seed is not None and seed.primary_key),
                nullable=shaped.nullable,
                info=_stored(name, shaped, settings.target.codes),
            )
        )
    for seed_column in model.c:  # missing from the table: `db check` says so
        if seed_column.name not in settings.shape:
            columns.append(Column(seed_column.name, seed_column.type))
    return Table(
        settings.target.table_name,
        MetaData(),
        *columns,
        schema=settings.target.schema_name,
    )


def _stored(name: str, column: ColumnShape, codes: Mapping[str, Any]) -> dict[str, Any]:
    """How the API's words are stored in a status column (`Column.info`, read by
    `policy.stored`): through `[target.codes]`, and, for an enum, only as its labels."""
    info: dict[str, Any] = {}
    if name in codes:
        info["codes"] = dict(codes[name])
    if column.kind == "enum":
        info["labels"] = frozenset(column.labels)
    return info


def column_type(column: ColumnShape) -> TypeEngine[Any]:
    """The SQLAlchemy type that binds and compares values as the column's own type."""
    if column.kind == "enum":
        return ENUM(
            *column.labels, name=column.enum_name, schema=column.enum_schema, create_type=False
        )
    if column.kind == "integer":
        return {"int2": SmallInteger(), "int4": Integer()}.get(column.type_name, BigInteger())
    if column.kind == "jsonb":
        return JSONB()
    if column.kind == "json":
        return JSON()
    if column.kind in ("timestamptz", "timestamp"):
        # with its precision, so that a value cast to it is rounded as the column rounds it
        return TIMESTAMP(timezone=column.kind == "timestamptz", precision=column.precision)
    if column.kind == "text":
        return Text()
    return NullType()


def due_index(table: Table) -> Index:
    """The partial index that lets the job find not-yet-cleaned rows by age without a scan."""
    return Index(
        f"{table.name}_retention_due_idx",
        table.c.created_at,
        postgresql_where=table.c.cleaned_at.is_(None),
    )
