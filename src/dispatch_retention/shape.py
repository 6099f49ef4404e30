"""The target table's columns as the catalog describes them, read once when the job connects.

Application frameworks make the dispatches table their own way: statuses as PostgreSQL enum
types or integer codes, `content` as `json` or `text`, timestamps without time zone, extra
personal columns (README "Real tables"). The job builds its statements on the table's real
types (`schema.target_table`), so that values are bound as the column's type (an enum label
as the enum, a cutoff as a plain timestamp where the column has no time zone) and compared
in it (`json` as `jsonb`, which has equality).

`read()` is one catalog query; `Shape` is plain data, so the policy core stays pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Connection, text

Kind = Literal["text", "enum", "integer", "json", "jsonb", "timestamptz", "timestamp", "other"]

_KINDS: Mapping[str, Kind] = {
    "text": "text",
    "varchar": "text",
    "bpchar": "text",
    "citext": "text",
    "int2": "integer",
    "int4": "integer",
    "int8": "integer",
    "json": "json",
    "jsonb": "jsonb",
    "timestamptz": "timestamptz",
    "timestamp": "timestamp",
}


@dataclass(frozen=True)
class ColumnShape:
    name: str
    #: the type as PostgreSQL writes it (`format_type`): `character varying(255)`, ...
    sql_type: str
    kind: Kind
    nullable: bool
    #: an enum's type name, its schema and its labels in their order
    enum_name: str | None = None
    enum_schema: str | None = None
    labels: tuple[str, ...] = ()
    #: int2 / int4 / int8, for the integer kind
    type_name: str = ""

    @property
    def precision(self) -> int | None:
        """A timestamp's fractional digits when fewer than PostgreSQL's six (`timestamp(0)`,
        what Laravel's `timestamps()` makes): it rounds what it stores."""
        found = re.match(r"timestamp\((\d)\)", self.sql_type)
        return int(found.group(1)) if found else None


@dataclass(frozen=True)
class Shape:
    columns: Mapping[str, ColumnShape] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def kind(self, name: str) -> Kind | None:
        column = self.columns.get(name)
        return column.kind if column else None


_READ = text(
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS sql_type, "
    "t.typname, t.typtype, n.nspname AS type_schema, NOT a.attnotnull AS nullable, "
    "ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid "
    "ORDER BY e.enumsortorder) AS labels "
    "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
    "JOIN pg_namespace n ON n.oid = t.typnamespace "
    "WHERE a.attrelid = :oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
)


def read(conn: Connection, oid: int) -> Shape:
    """The columns of the relation `oid` (a domain is read as what it is; an array or any
    other type is `other`: the job then only ever writes NULL or a replacement into it)."""
    columns = {}
    for row in conn.execute(_READ, {"oid": oid}).mappings():
        is_enum = row["typtype"] == "e"
        kind: Kind = "enum" if is_enum else _KINDS.get(str(row["typname"]), "other")
        columns[str(row["attname"])] = ColumnShape(
            name=str(row["attname"]),
            sql_type=str(row["sql_type"]),
            kind=kind,
            nullable=bool(row["nullable"]),
            enum_name=str(row["typname"]) if is_enum else None,
            enum_schema=str(row["type_schema"]) if is_enum else None,
            labels=tuple(row["labels"]) if is_enum else (),
            type_name=str(row["typname"]),
        )
    return Shape(columns)
