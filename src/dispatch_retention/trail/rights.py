"""The rights each purpose of `db grants` gives, as data: what `db check --purpose` compares a
role with, and what a command checks before it writes anything (`require`), so that a role
without a right it needs stops with exit 2 naming the right and the purpose that gives it,
never with a permission error from deep inside a run (which Kubernetes would retry).

Purposes (docs/security.md, "The roles"):
- `run`: the CronJob;
- `read-only`: `verify`, `report`, dry runs and the audit commands, counting personal data
  through the audit schema's view, never reading it;
- `holds`: placing and releasing legal holds;
- `operator`: the person doing a manual run (`db check`, a dry run, `run`, `verify`, `audit
  list/show/verify`): `run`'s rights and `read-only`'s;
- `reclean`: `run --reclean`, which must read the personal columns to find rows that hold
  data again: `run`'s rights and SELECT on `clean.columns`.

`checks/db_grants.py` prints the statements that give these rights; tests apply them and
hold `missing()` empty for each purpose (tests/checks/test_purposes.py).
"""

from __future__ import annotations

from collections.abc import Sequence
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

#: What a command that only reads needs (`reads`): `holds`, the legal holds (`hold list`);
#: `trail`, the audit tables (`audit list/show/verify`, `verify`); `plan`, those and the
#: table's columns a dry run plans with. Every purpose but `holds` gives `trail` and `plan`.
Reads = Literal["holds", "trail", "plan"]


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
        personal = _columns(settings, "SELECT", settings.clean.columns)
        return _unique([*needed(settings, "run"), *personal])
    out = _base(settings)
    if purpose == "run":
        out += [
            *_columns(settings, "SELECT", target.read_columns(settings)),
            *_columns(settings, "UPDATE", [*settings.clean.columns, "cleaned_at", "updated_at"]),
            *_audit(settings, "runs", "SELECT", "INSERT", "UPDATE"),
            *_audit(settings, "chunks", "SELECT", "INSERT"),
            *_audit(settings, "legal_holds", "SELECT"),
        ]
    elif purpose == "read-only":
        schema = settings.audit.schema_
        out += [
            *_columns(settings, "SELECT", facts.shown_columns(settings)),
            Right("SELECT", "view", quoted_name(schema, FACTS_VIEW), schema=quoted_name(schema)),
            *_audit(settings, "runs", "SELECT"),
            *_audit(settings, "chunks", "SELECT"),
            *_audit(settings, "legal_holds", "SELECT"),
        ]
    else:
        holds = quoted_name(settings.audit.schema_, "legal_holds")
        in_audit = quoted_name(settings.audit.schema_)
        out += [
            *_audit(settings, "legal_holds", "SELECT", "INSERT"),
            Right("UPDATE", "column", holds, "released_at", in_audit),
            Right("UPDATE", "column", holds, "released_by", in_audit),
        ]
    return out


def reads(settings: Settings, what: Reads) -> list[Right]:
    """The rights a command that only reads `what` needs (every one of them given by the
    `read-only` purpose, and but for `holds` by `run`: tests hold it)."""
    tables = ["legal_holds"] if what == "holds" else ["runs", "chunks", "legal_holds"]
    out = _base(settings) + [r for t in tables for r in _audit(settings, t, "SELECT")]
    if what == "plan":
        out += _columns(settings, "SELECT", facts.shown_columns(settings))
    return out


def _base(settings: Settings) -> list[Right]:
    """What every purpose needs: to look into both schemas and read the trail's version and
    chain."""
    return [
        Right("USAGE", "schema", quoted_name(settings.target.schema_name or "public")),
        Right("USAGE", "schema", quoted_name(settings.audit.schema_)),
        *_audit(settings, ALEMBIC_VERSION_TABLE, "SELECT"),
        *_audit(settings, "events", "SELECT"),
        *_audit(settings, "events_head", "SELECT"),
    ]


def _audit(settings: Settings, name: str, *privileges: str) -> list[Right]:
    """`privileges` on the audit schema's table `name`."""
    schema = settings.audit.schema_
    return [
        Right(p, "table", quoted_name(schema, name), schema=quoted_name(schema)) for p in privileges
    ]


def _columns(settings: Settings, privilege: str, names: Sequence[str]) -> list[Right]:
    """`privilege` on each of the target's columns `names`."""
    table = quoted_name(*settings.target.parts)
    in_target = quoted_name(settings.target.schema_name or "public")
    return [Right(privilege, "column", table, c, in_target) for c in names]


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


def missing(
    conn: Connection, settings: Settings, purpose: Purpose, only: Reads | None = None
) -> list[Right]:
    """The rights of `purpose` (with `only`, those of `reads(only)`) the current role lacks.
    A table, column or schema that does not exist is not a right to ask for: the command that
    needs it says so (a column the config names that the table lacks, an audit schema not yet
    made), unless the role may not look into its schema, which is then the right it lacks."""
    wanted = needed(settings, purpose) if only is None else reads(settings, only)
    return [r for r in wanted if _visible(conn, r) and not has(conn, r)]


def _visible(conn: Connection, right: Right) -> bool:
    """The object exists, or it sits in a schema the role may not use (it cannot tell)."""
    if right.schema is not None:
        usage = Right("USAGE", "schema", right.schema)
        if _exists(conn, usage) and not has(conn, usage):
            return True
    return _exists(conn, right)


def require(
    conn: Connection, settings: Settings, purpose: Purpose, only: Reads | None = None
) -> None:
    """Raise `MissingRights` (exit 2) when the current role lacks a right of `purpose`, or
    with `only` one of `reads(only)`, naming `purpose` as what gives it."""
    lacking = missing(conn, settings, purpose, only)
    if lacking:
        role = shown_name(str(conn.execute(text("SELECT current_user")).scalar()))
        raise MissingRights(role, [shown_name(str(r)) for r in lacking], purpose)
