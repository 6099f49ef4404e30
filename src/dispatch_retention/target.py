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
from dataclasses import dataclass

from sqlalchemy import Connection, text

from . import db
from .config import Settings, Target
from .errors import TargetRefused

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
        return f"{self.schema}.{self.name}"


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
    qualified = f"{row['nspname']}.{row['relname']}"
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


def pinned(settings: Settings, resolved: ResolvedTarget) -> Settings:
    """The settings with the target named by its resolved schema and name, so that every
    statement, the run lock and the audit trail refer to the table itself."""
    target = Target.model_construct(table=resolved.qualified)
    return dataclasses.replace(settings, target=target)


def unreadable_columns(conn: Connection, settings: Settings) -> list[str]:
    """The personal columns (`clean.columns`) this role may not read: it can then not tell
    whether a cleaned row holds personal data again (the run role of `db grants`)."""
    query = text("SELECT has_column_privilege(CAST(:t AS regclass), :c, 'SELECT')")
    return [
        c
        for c in settings.clean.columns
        if not conn.execute(query, {"t": settings.target.regclass, "c": c}).scalar()
    ]


def resolve_settings(conn: Connection, settings: Settings) -> Settings:
    """`resolve()` then `pinned()`: what every command does when it connects. The target's
    names, and the audit schema's, may be shown in error messages from then on."""
    resolved = resolve(conn, settings.target)
    db.know(resolved.schema, resolved.name, settings.audit.schema_, *settings.clean.keep)
    return pinned(settings, resolved)
