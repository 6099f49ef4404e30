"""SQLAlchemy Core tables: the Messaging API's dispatches table and the job's own tables.

The dispatches table belongs to the Messaging API; the job never creates, alters or drops it
in production. `dispatches_table()` describes it (its name comes from the config) so that
statements can be built; `create_dispatches()` exists for the tests, the demo and the
benchmarks only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    case,
    cast,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ENUM, JSON, JSONB, TIMESTAMP, UUID
from sqlalchemy.schema import CreateSchema
from sqlalchemy.types import NullType, TypeEngine

from . import trail_catalog
from .config import DEFAULT_AUDIT_SCHEMA, MAX_CONFIG_BYTES, Settings, Target
from .shape import ColumnShape


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


# --- the job's own tables (docs/auditor.md), in their own schema --------------------------
# They hold ids, counts, timestamps, policy names and the config: never a dispatch's content,
# msisdn, email or app_token. Created and migrated by `db upgrade` (Alembic, migrations/).

ALEMBIC_VERSION_TABLE = "dispatch_retention_alembic_version"
#: The audit schema's view of the dispatches without their personal data (`facts.py`): what
#: the read-only role counts through. `db grants --purpose read-only` prints the SQL that
#: makes it; `db upgrade` never touches it.
FACTS_VIEW = "dispatch_facts"
#: Its column that is true where any personal column holds data (each has `has_<column>`).
HOLDS_COLUMN = "holds_personal_data"
#: The unique index that keeps one active legal hold per member.
ONE_ACTIVE_HOLD = "legal_holds_one_active_per_member"
#: The most bytes each text of the trail may hold (UTF-8; a document: its JSON text), so that
#: no row can make the trail unreadable (a 60 MB hold reason once took `hold list` to 680 MB).
#: Migration 0007 makes each a CHECK constraint, `<table>_<column>_bounded`, from a frozen
#: copy that tests/test_migrations.py holds equal to this one; the job's writers check what
#: a user gives against it first (`over_bound`), so that a user gets exit 2 naming the limit.
WORD_BYTES = 32  # a status, a kind, a trigger, a shard
NAME_BYTES = 64  # a PostgreSQL role (NAMEDATALEN - 1 bytes)
HASH_BYTES = 64  # a SHA-256 in hexadecimal
WHO_BYTES = 256  # who asked (`--by`), a host, a version, an event's subject
TEXT_BYTES = 4096  # a hold's reason, a run's error, a path
DOCUMENT_BYTES = 65536  # a run's options, plan and copy risks; a chunk's counts (as 0006)
TEXT_BOUNDS: Mapping[str, Mapping[str, int]] = {
    "runs": {
        "status": WORD_BYTES, "trigger": WORD_BYTES, "host": WHO_BYTES,
        "tool_version": WHO_BYTES, "db_user": NAME_BYTES, "target_table": 512,
        "shard": WORD_BYTES, "options": DOCUMENT_BYTES, "config_path": TEXT_BYTES,
        "config_sha256": HASH_BYTES, "config_text": MAX_CONFIG_BYTES,
        "policies": DOCUMENT_BYTES, "stopped_by": WHO_BYTES, "error": TEXT_BYTES,
        "remaining_reason": TEXT_BYTES, "copy_risks": DOCUMENT_BYTES,
        "copy_risks_at_end": DOCUMENT_BYTES,
    },
    "chunks": {"by_policy": DOCUMENT_BYTES, "kind": WORD_BYTES},
    "legal_holds": {
        "reason": TEXT_BYTES, "created_by": NAME_BYTES, "requested_by": WHO_BYTES,
        # `--by` and the releasing role, which the database adds (0006)
        "released_by": 2 * WHO_BYTES,
    },
    "events": {
        "kind": WORD_BYTES, "subject": WHO_BYTES, "prev_hash": HASH_BYTES, "hash": HASH_BYTES,
        # the JSON of a row as bounded above (a run's, with its config, is the longest)
        "body": 16 * 1024 * 1024,
    },
    "events_head": {"hash": HASH_BYTES},
}  # fmt: skip


def bound_name(table: str, column: str) -> str:
    """The CHECK constraint that bounds `table.column` (migration 0007)."""
    return f"{table}_{column}_bounded"


def over_bound(table: str, values: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """The first of `values` (texts) longer than its column holds: (column, limit, bytes)."""
    for column, value in values.items():
        limit = TEXT_BOUNDS[table][column]
        if isinstance(value, str) and len(value.encode("utf-8", "surrogatepass")) > limit:
            return column, limit, len(value.encode("utf-8", "surrogatepass"))
    return None


#: What a text cut to its bound ends with (`fitted`, and the readers' `shown`).
CUT = " [cut]"


def fitted(table: str, column: str, value: str | None) -> str | None:
    """`value` cut to what its column holds, ending with `CUT`: for the job's own words (a
    run's error), which are recorded whole or cut, never refused."""
    limit = TEXT_BOUNDS[table][column]
    if value is None or len(value.encode("utf-8", "surrogatepass")) <= limit:
        return value
    room = limit - len(CUT)
    return value.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore") + CUT


#: The key of a value's size in bytes, next to it in a row `read_bounded` reads.
SIZE = "__bytes"


def read_bounded(table: Table, *names: str) -> list[ColumnElement[Any]]:
    """The columns `names` of a trail table as its readers select them: a text longer than
    its bound (a row written before migration 0007) cut to that many characters, a longer
    document left out, each with its size (`SIZE`), so that no row takes more memory than
    the bounds allow; `shown()` marks what was cut."""
    out: list[ColumnElement[Any]] = []
    for name in names:
        column = table.c[name]
        limit = TEXT_BOUNDS.get(table.name, {}).get(name)
        if limit is None:
            out.append(column)
            continue
        document = isinstance(column.type, JSONB)
        size = func.octet_length(cast(column, Text) if document else column)
        value = case((size <= limit, column), else_=None if document else func.left(column, limit))
        out += [value.label(name), size.label(name + SIZE)]
    return out


def shown(table: str, row: Mapping[Any, Any]) -> dict[str, Any]:
    """A row `read_bounded` read, each value past its bound marked: a text ends with how
    long it is in all, a document is said to be left out."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key.endswith(SIZE):
            continue
        size, limit = row.get(key + SIZE), TEXT_BOUNDS.get(table, {}).get(key)
        if size is not None and limit is not None and size > limit:
            value = (
                f"[not shown: {size} bytes of JSON, more than the {limit} the trail keeps]"
                if value is None
                else f"{value}{CUT[:-1]}: {size} bytes in all]"
            )
        out[key] = value
    return out


class AuditTables:
    """The runs, chunks, legal_holds and events tables in the configured audit schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.metadata = MetaData(schema=schema)
        self.runs = Table(
            "runs",
            self.metadata,
            Column("run_id", UUID(as_uuid=False), primary_key=True),
            Column("status", Text, nullable=False),
            Column("started_at", DateTime(timezone=True), nullable=False),
            Column("finished_at", DateTime(timezone=True)),
            Column("trigger", Text, nullable=False),
            Column("host", Text, nullable=False),
            Column("tool_version", Text, nullable=False),
            Column("db_user", Text, nullable=False),
            Column("target_table", Text, nullable=False),
            Column("shard", Text),
            Column("options", JSONB, nullable=False),
            Column("config_path", Text, nullable=False),
            Column("config_sha256", Text, nullable=False),
            Column("config_text", Text, nullable=False),
            Column("planned_at", DateTime(timezone=True)),
            Column("policies", JSONB),
            Column("due_rows", BigInteger),
            Column("held_rows", BigInteger),
            Column("waiting_grace_rows", BigInteger),
            Column("stopped_by", Text),
            Column("error", Text),
            Column("remaining_due_rows", BigInteger),
            Column("remaining_reason", Text),
            Column("copy_risks", JSONB),
            # the copy risks read again at the run's end, written by its close (0007)
            Column("copy_risks_at_end", JSONB),
        )
        self.chunks = Table(
            "chunks",
            self.metadata,
            Column("run_id", UUID(as_uuid=False), ForeignKey(self.runs.c.run_id), primary_key=True),
            Column("seq", Integer, primary_key=True),
            Column("first_id", BigInteger, nullable=False),
            Column("last_id", BigInteger, nullable=False),
            Column("rows", Integer, nullable=False),
            Column("cleaned_at", DateTime(timezone=True), nullable=False),
            Column("by_policy", JSONB, nullable=False),
            Column("skipped_locked", Boolean, nullable=False),
            Column("kind", Text, nullable=False, server_default="clean"),
            # the chunk's transaction (xid8, read as its text), set by the database (0008)
            Column("xact", Text),
        )
        self.holds = Table(
            "legal_holds",
            self.metadata,
            Column("hold_id", BigInteger, Identity(), primary_key=True),
            Column("member_id", BigInteger, nullable=False),
            Column("reason", Text, nullable=False),
            Column("created_at", DateTime(timezone=True), nullable=False),
            Column("created_by", Text, nullable=False),
            Column("requested_by", Text),
            Column("released_at", DateTime(timezone=True)),
            Column("released_by", Text),
            Index(
                ONE_ACTIVE_HOLD,
                "member_id",
                unique=True,
                postgresql_where=text("released_at IS NULL"),
            ),
        )
        # Written only by the database's triggers (migration 0005): the trail's hash chain.
        self.events = Table(
            "events",
            self.metadata,
            Column("seq", BigInteger, primary_key=True),
            Column("kind", Text, nullable=False),
            Column("subject", Text, nullable=False),
            Column("recorded_at", DateTime(timezone=True), nullable=False),
            Column("body", Text, nullable=False),
            Column("prev_hash", Text, nullable=False),
            Column("hash", Text, nullable=False),
        )
        self.events_head = Table(
            "events_head",
            self.metadata,
            Column("only_row", Boolean, primary_key=True),
            Column("seq", BigInteger, nullable=False),
            Column("hash", Text, nullable=False),
        )


#: The names an error message may show of the job's own: its default schema, the version
#: table, the read-only view, the trail's tables, their columns and indexes (`AuditTables`),
#: the functions, triggers and constraints the migrations make (`trail_catalog.EXPECTED`),
#: and the names the guards raise their refusals under (`trail_catalog.RAISED`).
#: tests/test_one_source.py holds them to a migrated schema's catalog.
AUDIT_NAMES = frozenset(
    {
        DEFAULT_AUDIT_SCHEMA,
        ALEMBIC_VERSION_TABLE,
        FACTS_VIEW,
        HOLDS_COLUMN,
        *(
            name
            for table in AuditTables(DEFAULT_AUDIT_SCHEMA).metadata.tables.values()
            for name in (
                table.name,
                *table.c.keys(),
                *(str(index.name) for index in table.indexes),
            )
        ),
        *trail_catalog.object_names(),
        *trail_catalog.RAISED,
    }
)
