"""The rights each purpose of `db grants` gives, as data: what `db check --purpose` compares a
role with, and what a command checks before it writes anything (`require`), so that a role
without a right it needs stops with exit 2 naming the right and the purpose that gives it,
never with a permission error from deep inside a run (which Kubernetes would retry).

Purposes (docs/security.md, "The roles"):
- `run`: the CronJob;
- `read-only`: `verify`, dry runs and the audit commands, counting personal data through the
  audit schema's view, never reading it;
- `holds`: placing and releasing legal holds;
- `operator`: the person doing a manual run (`db check`, a dry run, `run`, `verify`, `audit
  list/show/verify`): `run`'s rights and `read-only`'s;
- `reclean`: `run --reclean`, which must read the personal columns to find rows that hold
  data again: `run`'s rights and SELECT on `clean.columns`.

`checks/db_grants.py` prints the statements that give these rights; tests apply them and
hold `missing()` empty for each purpose (tests/checks/test_purposes.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, text

from dispatch_retention.catalog import target
from dispatch_retention.config import Settings
from dispatch_retention.errors import MissingRights
from dispatch_retention.names import quoted_name
from dispatch_retention.printable import shown_name
from dispatch_retention.trail import facts
from dispatch_retention.trail.audit_tables import ALEMBIC_VERSION_TABLE, FACTS_VIEW

Purpose = Literal["run", "read-only", "holds", "operator", "reclean"]
PURPOSES: tuple[Purpose, ...] = ("run", "read-only", "holds", "operator", "reclean")


@dataclass(frozen=True)
class Right:
    """One privilege on one object (`kind`: schema, table, view or column of a table)."""

    privilege: str
    kind: str
    name: str  # quoted as SQL writes it
    column: str | None = None
    schema: str | None = None  # of a table, view or column: quoted (its USAGE comes first)

    def __str__(self) -> str:
        on = f"{self.privilege}({self.column})" if self.column else self.privilege
        return f"{on} on {self.kind} {self.name}"


def needed(settings: Settings, purpose: Purpose) -> list[Right]:
    """The rights `purpose` gives (and needs), in the order `db grants` grants them."""
    if purpose == "operator":
        return _unique([*needed(settings, "read-only"), *needed(settings, "run")])
    if purpose == "reclean":
        table = quoted_name(*settings.target.parts)
        in_target = quoted_name(settings.target.schema_name or "public")
        personal = [Right("SELECT", "column", table, c, in_target) for c in settings.clean.columns]
        return _unique([*needed(settings, "run"), *personal])
    schema = settings.audit.schema_
    table = quoted_name(*settings.target.parts)
    in_audit, in_target = quoted_name(schema), quoted_name(settings.target.schema_name or "public")

    def audit(name: str, *privileges: str) -> list[Right]:
        return [Right(p, "table", quoted_name(schema, name), schema=in_audit) for p in privileges]

    def columns(privilege: str, names: list[str]) -> list[Right]:
        return [Right(privilege, "column", table, c, in_target) for c in names]

    out = [
        Right("USAGE", "schema", quoted_name(settings.target.schema_name or "public")),
        Right("USAGE", "schema", quoted_name(schema)),
        *audit(ALEMBIC_VERSION_TABLE, "SELECT"),
        *audit("events", "SELECT"),
        *audit("events_head", "SELECT"),
    ]
    if purpose == "run":
        out += [
            *columns("SELECT", target.read_columns(settings)),
            *columns("UPDATE", [*settings.clean.columns, "cleaned_at", "updated_at"]),
            *audit("runs", "SELECT", "INSERT", "UPDATE"),
            *audit("chunks", "SELECT", "INSERT"),
            *audit("legal_holds", "SELECT"),
        ]
    elif purpose == "read-only":
        out += [
            *columns("SELECT", facts.shown_columns(settings)),
            Right("SELECT", "view", quoted_name(schema, FACTS_VIEW), schema=in_audit),
            *audit("runs", "SELECT"),
            *audit("chunks", "SELECT"),
            *audit("legal_holds", "SELECT"),
        ]
    else:
        holds = quoted_name(schema, "legal_holds")
        out += [
            *audit("legal_holds", "SELECT", "INSERT"),
            Right("UPDATE", "column", holds, "released_at", in_audit),
            Right("UPDATE", "column", holds, "released_by", in_audit),
        ]
    return out


def _unique(rights: list[Right]) -> list[Right]:
    return list(dict.fromkeys(rights))


_HAS = {
    # by oid: has_schema_privilege takes a schema's name as it is, not as SQL quotes it
    "schema": "SELECT has_schema_privilege(to_regnamespace(:name), :privilege)",
    "table": "SELECT has_table_privilege(:name, :privilege)",
    "view": "SELECT has_table_privilege(:name, :privilege)",
    "column": "SELECT has_column_privilege(:name, :column, :privilege)",
}


def has(conn: Connection, right: Right) -> bool:
    """Whether the current role holds `right` (directly, through a role it is a member of,
    or as the object's owner); an object that does not exist, or in a schema the role may not
    use (where looking it up would fail), is a right not held."""
    if right.schema is not None and not has(conn, Right("USAGE", "schema", right.schema)):
        return False
    if not _exists(conn, right):
        return False
    params = {"name": right.name, "privilege": right.privilege, "column": right.column}
    return bool(conn.execute(text(_HAS[right.kind]), params).scalar())


def _exists(conn: Connection, right: Right) -> bool:
    if right.kind == "schema":
        query = "SELECT to_regnamespace(:name) IS NOT NULL"
    elif right.column is None:
        query = "SELECT to_regclass(:name) IS NOT NULL"
    else:
        query = (
            "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass(:name) "
            "AND attname = :column AND attnum > 0 AND NOT attisdropped)"
        )
    return bool(conn.execute(text(query), {"name": right.name, "column": right.column}).scalar())


def missing(conn: Connection, settings: Settings, purpose: Purpose) -> list[Right]:
    """The rights of `purpose` the current role lacks. A table, column or schema that does
    not exist is not a right to ask for: the command that needs it says so (a column the
    config names that the table lacks, an audit schema not yet made), unless the role may not
    look into its schema, which is then the right it lacks."""
    return [r for r in needed(settings, purpose) if _visible(conn, r) and not has(conn, r)]


def _visible(conn: Connection, right: Right) -> bool:
    """The object exists, or it sits in a schema the role may not use (it cannot tell)."""
    if right.schema is not None:
        usage = Right("USAGE", "schema", right.schema)
        if _exists(conn, usage) and not has(conn, usage):
            return True
    return _exists(conn, right)


def require(conn: Connection, settings: Settings, purpose: Purpose) -> None:
    """Raise `MissingRights` (exit 2) when the current role lacks a right of `purpose`."""
    lacking = missing(conn, settings, purpose)
    if lacking:
        role = shown_name(str(conn.execute(text("SELECT current_user")).scalar()))
        raise MissingRights(role, [shown_name(str(r)) for r in lacking], purpose)
