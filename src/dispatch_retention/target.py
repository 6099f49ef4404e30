"""The target table as the database knows it, resolved once when the job connects.

The config names the table (`dispatches` or `schema.dispatches`); the database decides what
that name is. `resolve()` reads the catalog once and refuses, before anything is read or
written, whatever would let the job report success while rows escape it (README "What the
job refuses and what it reports"):

- anything but a table or a partitioned table (a view can hide rows, a foreign table lives
  elsewhere, a materialized view is a copy): `TargetRefused`, exit 2;
- row-level security that applies to the job's role: PostgreSQL would silently filter rows
  out of every statement. The job's sessions also run with `row_security = off`
  (`db.make_engine`), so that if RLS applies after all, the server raises instead of
  filtering.

The resolved schema and name identify the target from then on (the run lock, the audit
trail, every statement), so `dispatches` and `public.dispatches` are one target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, distinct, func, select, text, true

from . import db, shape
from .config import KEPT_COLUMNS, Settings, Target
from .errors import TargetRefused
from .names import quoted_name
from .policy import stored
from .schema import target_table
from .shape import ColumnShape, Shape

#: pg_class.relkind values the job accepts, and names for the ones it refuses.
ACCEPTED_KINDS = {"r": "table", "p": "partitioned table"}
REFUSED_KINDS = {
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
    "S": "sequence",
    "i": "index",
    "I": "partitioned index",
    "c": "composite type",
    "t": "TOAST table",
}

_RESOLVE = text(
    "SELECT c.oid, n.nspname, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity, "
    "pg_has_role(c.relowner, 'USAGE') AS owner, "
    "(SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user) "
    "AS bypass, current_user AS role "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = to_regclass(:name)"
)


@dataclass(frozen=True)
class ResolvedTarget:
    oid: int
    schema: str
    name: str
    kind: str

    @property
    def qualified(self) -> str:
        """`schema.name`, each part quoted where it must be (`"Messaging"."Dispatches"`)."""
        return quoted_name(self.schema, self.name)


def resolve(conn: Connection, target: Target) -> ResolvedTarget:
    """The table the config names, or `TargetRefused` with the reason."""
    row = conn.execute(_RESOLVE, {"name": target.regclass}).mappings().first()
    if row is None:
        raise TargetRefused(
            target.table,
            "no such table (or its schema is not visible to this role): "
            "check target.table and the role's USAGE on the schema",
        )
    kind = str(row["relkind"])
    qualified = quoted_name(str(row["nspname"]), str(row["relname"]))
    if kind not in ACCEPTED_KINDS:
        what = REFUSED_KINDS.get(kind, f"relation of kind {kind!r}")
        raise TargetRefused(
            qualified,
            f"is a {what}, not a table: rows it does not show would keep their personal data. "
            "Name the table itself in target.table",
        )
    exempt = row["bypass"] or (row["owner"] and not row["relforcerowsecurity"])
    if row["relrowsecurity"] and not exempt:
        role = row["role"]
        raise TargetRefused(
            qualified,
            f"row-level security is enabled and applies to role {role}: it would hide rows "
            f"from the job, whose reports would then miss them. Grant the role BYPASSRLS "
            f"(ALTER ROLE {role} BYPASSRLS), or run the job as the table's owner "
            "(without FORCE ROW LEVEL SECURITY)",
        )
    return ResolvedTarget(int(row["oid"]), str(row["nspname"]), str(row["relname"]), kind)


def pinned(settings: Settings, resolved: ResolvedTarget, table: Shape | None = None) -> Settings:
    """The settings with the target named by its resolved schema and name, so that every
    statement, the run lock and the audit trail refer to the table itself, and with the
    table's column types (`shape.read`) that the statements bind values as."""
    target = settings.target.model_copy(update={"table": resolved.qualified})  # unvalidated:
    # the catalog's spelling may hold capitals a config name may not
    return dataclasses.replace(settings, target=target, shape=table or settings.shape)


def unreadable_columns(conn: Connection, settings: Settings) -> list[str]:
    """The personal columns (`clean.columns`) this role may not read: it can then not tell
    whether a cleaned row holds personal data again (the run role of `db grants`)."""
    query = text("SELECT has_column_privilege(CAST(:t AS regclass), :c, 'SELECT')")
    return [
        c
        for c in settings.clean.columns
        if not conn.execute(query, {"t": settings.target.regclass, "c": c}).scalar()
    ]


def resolve_settings(conn: Connection, settings: Settings, *, refuse: bool = True) -> Settings:
    """`resolve()` then `pinned()`: what every command does when it connects. The target's
    names, and the audit schema's, may be shown in error messages from then on. A config
    that does not fit the table's columns (`column_problems`) is refused (`TargetRefused`,
    exit 2), unless `refuse` is False (`db check`, which lists the problems instead)."""
    resolved = resolve(conn, settings.target)
    table = shape.read(conn, resolved.oid)
    db.know(resolved.schema, resolved.name, settings.audit.schema_, *settings.clean.keep)
    db.know(*table.columns)
    problems = column_problems(settings, table)
    if problems and refuse:
        raise TargetRefused(resolved.qualified, problems[0])
    return pinned(settings, resolved, table)


#: The status columns the rule itself reads (whether a dispatch is settled).
RULE_COLUMNS = ("transmission_status", "delivery_status")


def read_columns(settings: Settings) -> list[str]:
    """What `run` reads of the table, and all the read-only role may read of it: every kept
    column plus member_id (for holds), never the personal data it strips (member_id is read
    even when it is stripped: the hold check needs it)."""
    return sorted(set(KEPT_COLUMNS) | {"member_id"})


def column_problems(settings: Settings, table: Shape) -> list[str]:
    """What depends on the table, checked as soon as the job connects, each naming its
    column and the fix: every column of `clean.columns` exists and can take what cleaning
    writes (NULL, or a `clean.replace` value of its type); the API's words can be stored in
    each status column the rule or a policy reads (text, an enum with those labels, or
    `[target.codes]` of the column's kind)."""
    problems = [p for c in settings.clean.columns for p in _strippable(settings, table, c)]
    used = set(RULE_COLUMNS) | {key for p in settings.policies for key in p.where}
    codes = settings.target.codes
    for column in sorted(used | set(codes)):
        shaped = table.columns.get(column)
        if shaped is None:
            continue  # `db check` lists missing columns; statements then fail on them
        mapping = codes.get(column)
        problems += _words_fit(settings, shaped) if mapping is None else _codes_fit(shaped, mapping)
    return problems


#: A `clean.replace` value each column kind can take, as JSON types.
_REPLACEABLE: Mapping[str, tuple[type, ...]] = {
    "text": (str, dict, list, int, float, bool),  # non-strings are written as their JSON text
    "json": (dict, list, str, int, float, bool),
    "jsonb": (dict, list, str, int, float, bool),
    "integer": (int,),
    "enum": (str,),
    "other": (str,),
}


def _strippable(settings: Settings, table: Shape, name: str) -> list[str]:
    column = table.columns.get(name)
    if column is None:
        return [f"clean.columns names {name}, which the table does not have"]
    if name not in settings.clean.replace:
        if column.nullable:
            return []
        return [
            f"{name} is NOT NULL ({column.sql_type}) but clean.columns sets it to NULL: give "
            "clean.replace a value of its type for it"
        ]
    value = settings.clean.replace[name]
    allowed = _REPLACEABLE.get(column.kind, ())
    if not isinstance(value, allowed) or (isinstance(value, bool) and column.kind == "integer"):
        return [f"clean.replace.{name}: {value!r} does not fit {name} ({column.sql_type})"]
    if column.kind == "enum" and value not in column.labels:
        return [f"clean.replace.{name}: {value!r} is not a label of {column.sql_type}"]
    return []


def _words_fit(settings: Settings, column: ColumnShape) -> list[str]:
    if column.kind == "integer":
        return [
            f"{column.name} is {column.sql_type}: say which code stands for each of the API's "
            f"words in [target.codes] ({column.name} = {{ ... }})"
        ]
    if column.kind != "enum":
        return []
    words = {w for p in settings.policies for w in p.where.get(column.name, ())}
    missing = sorted(w for w in words if w not in column.labels)
    if not missing:
        return []
    return [
        f"{column.name}: a policy names {', '.join(missing)}, which the enum "
        f"{column.enum_name} ({', '.join(column.labels)}) has no label for; map the words "
        "to its labels in [target.codes]"
    ]


def _codes_fit(column: ColumnShape, mapping: Mapping[str, Any]) -> list[str]:
    values = list(mapping.values())
    integers = all(isinstance(v, int) for v in values)
    if column.kind == "integer" and not integers:
        return [f"{column.name} is {column.sql_type}: its [target.codes] must be integers"]
    if column.kind in ("text", "enum") and integers:
        return [
            f"{column.name} is {column.sql_type}: its [target.codes] must be its text values "
            "or labels, not integers"
        ]
    unknown = sorted(str(v) for v in values if v not in column.labels)
    if column.kind == "enum" and unknown:
        return [
            f"{column.name}: [target.codes] names {', '.join(unknown)}, not labels of the "
            f"enum {column.enum_name} ({', '.join(column.labels)})"
        ]
    return []


#: The API's words of each status column (the free-text external status has none).
API_WORDS: Mapping[str, tuple[str, ...]] = {
    "type": ("sms", "email", "push"),
    "transmission_status": ("scheduled", "transmitted", "failed"),
    "delivery_status": ("pending", "delivered", "failed"),
}


def unmapped_values(conn: Connection, settings: Settings) -> dict[str, int]:
    """How many distinct values in each status column stand for none of the API's words
    (through `[target.codes]`, an enum's labels, or the words themselves): a status the
    application added, which the rule treats as unknown, so unsettled. Counted, never read:
    an application may have put anything there (an address). Reads the table: the caller
    bounds it with a statement timeout."""
    table = target_table(settings)
    found: dict[str, int] = {}
    for name, words in API_WORDS.items():
        if name not in table.c:
            continue
        column = table.c[name]
        known = stored(column, words)
        query = select(func.count(distinct(column))).where(
            column.is_not(None), column.not_in(known) if known else true()
        )
        count = int(conn.execute(query).scalar_one())
        if count:
            found[name] = count
    return found
