"""The target table's shape as plain data: its columns, the tables below it, its rules,
unique indexes and constraints, as the catalog describes them (`catalog.describe.read`).

Application frameworks make the dispatches table their own way: statuses as PostgreSQL enum
types or integer codes, `content` as `json` or `text`, timestamps without time zone, extra
personal columns (README "Real tables"). The job builds its statements on the table's real
types (`dispatch_table.target_table`), so that values are bound as the column's type (an enum label
as the enum, a cutoff as a plain timestamp where the column has no time zone) and compared
in it (`json` as `jsonb`, which has equality).

`Shape` is plain data, so the policy core stays pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["text", "enum", "integer", "json", "jsonb", "timestamptz", "timestamp", "other"]

KINDS: Mapping[str, Kind] = {
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
    #: GENERATED ALWAYS AS (...) STORED: PostgreSQL computes it, an UPDATE may not set it
    generated: bool = False
    #: an identity column: "always" (an UPDATE may only set DEFAULT), "by default" or ""
    identity: str = ""
    #: the oid of its type when that is a domain (whose NOT NULL and CHECKs apply to
    #: whatever cleaning writes: `target.domain_problems` asks the server)
    domain: int | None = None

    @property
    def precision(self) -> int | None:
        """A timestamp's fractional digits when fewer than PostgreSQL's six (`timestamp(0)`,
        what Laravel's `timestamps()` makes): it rounds what it stores."""
        found = re.match(r"timestamp\((\d)\)", self.sql_type)
        return int(found.group(1)) if found else None


@dataclass(frozen=True)
class Below:
    """A table below the target (an inheritance child, at any depth, or a partition)."""

    #: `schema.table`, each part quoted where it must be
    relation: str
    #: the columns it adds to its parents in the tree, in their order (a partition adds none)
    own: tuple[str, ...] = ()
    #: its NOT NULL columns (a child may add NOT NULL to a column it inherits)
    not_null: tuple[str, ...] = ()
    #: its columns an UPDATE may not set (generated, identity GENERATED ALWAYS)
    unsettable: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unique:
    """A UNIQUE index (a primary key or unique constraint among them) of the target or of a
    table below it, over plain columns and without a WHERE (a partial index may leave the
    cleaned rows out, an expression may tell them apart: neither is read)."""

    relation: str
    index: str
    columns: tuple[str, ...]
    #: NULLS NOT DISTINCT (PostgreSQL 15+): a NULL equals a NULL in it
    nulls_not_distinct: bool = False


@dataclass(frozen=True)
class Constraint:
    """A CHECK or an exclusion constraint of the target or of a table below it (a CHECK
    where it is declared, not where it is inherited; a partitioned table's exclusion
    constraint once, not per partition; a partial exclusion constraint is not read). NOT
    VALID ones too: they hold for every row written since, so for every row cleaned."""

    #: `schema.table`, each part quoted where it must be
    relation: str
    #: as the catalog holds it (unquoted)
    name: str
    #: "check" or "exclusion"
    kind: str
    #: its columns, in its order ("" for a whole-row reference, or an exclusion
    #: constraint's expression)
    columns: tuple[str, ...]
    #: every column it reads: its columns, and those its expressions read
    reads: frozenset[str] = frozenset()
    #: each column's name quoted where it must be, and its type (`format_type`)
    quoted: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    #: a CHECK's expression (`pg_get_expr`); never printed: it is the owner's text
    expression: str = ""
    #: an exclusion constraint's operator per column, `OPERATOR(schema.op)`
    operators: tuple[str, ...] = ()
    validated: bool = True


@dataclass(frozen=True)
class Rule:
    """A rule that fires on UPDATE of the target (not a disabled one)."""

    name: str
    instead: bool
    #: `WHERE ...`: it fires for some rows only
    conditional: bool

    @property
    def kind(self) -> str:
        """`DO ALSO` or `DO INSTEAD` (NOTHING among them), `conditional` when it is."""
        said = "DO INSTEAD" if self.instead else "DO ALSO"
        return f"conditional {said}" if self.conditional else said


@dataclass(frozen=True)
class Shape:
    columns: Mapping[str, ColumnShape] = field(default_factory=dict)
    #: the tables below the target, shallowest first
    below: tuple[Below, ...] = ()
    #: the rules on UPDATE of the target, by name
    rules: tuple[Rule, ...] = ()
    #: the unique indexes of the target and the tables below it
    unique: tuple[Unique, ...] = ()
    #: the CHECK and exclusion constraints of the target and the tables below it
    constraints: tuple[Constraint, ...] = ()

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def kind(self, name: str) -> Kind | None:
        column = self.columns.get(name)
        return column.kind if column else None
