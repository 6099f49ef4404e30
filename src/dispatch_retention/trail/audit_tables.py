"""The job's own tables as SQLAlchemy Core describes them (`AuditTables`), the bounds of their
texts, and the names of the trail's objects (`AUDIT_NAMES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    case,
    cast,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from dispatch_retention.config import DEFAULT_AUDIT_SCHEMA, MAX_CONFIG_BYTES
from dispatch_retention.pg import diagnosis
from dispatch_retention.trail import objects, replica_lag

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
#: copy that tests/trail/test_migrations.py holds equal to this one; the job's writers check what
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
#: the functions, triggers and constraints the migrations make (`objects.EXPECTED`),
#: and the names the guards raise their refusals under (`objects.RAISED`).
#: tests/unit/test_one_source.py holds them to a migrated schema's catalog.
AUDIT_NAMES = frozenset(
    {
        DEFAULT_AUDIT_SCHEMA,
        ALEMBIC_VERSION_TABLE,
        FACTS_VIEW,
        HOLDS_COLUMN,
        replica_lag.FUNCTION,
        *(
            name
            for table in AuditTables(DEFAULT_AUDIT_SCHEMA).metadata.tables.values()
            for name in (
                table.name,
                *table.c.keys(),
                *(str(index.name) for index in table.indexes),
            )
        ),
        *objects.object_names(),
        *objects.RAISED,
    }
)

# The trail's names may be shown in an error message (`diagnosis.describe_error`): they are
# made known where they are defined, so every process that reaches the trail knows them.
diagnosis.know(*AUDIT_NAMES)
