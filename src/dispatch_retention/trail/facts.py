"""The audit schema's view of the dispatches, which the read-only role counts through: it may
not read the personal columns (docs/auditor.md, "What each role can and cannot do": it
counts personal data and cannot read it).

`<audit schema>.dispatch_facts` (`audit_tables.FACTS_VIEW`) shows the columns the job reads
(`target.read_columns`: ids, type, statuses, timestamps, `cleaned_at`, `member_id` for legal
holds) but those of `clean.columns` (`shown_columns`: where `member_id` is stripped, a
column `held` says whether the row's member is under an active legal hold instead) and, for
each column of `clean.columns`, `has_<column>`: the column holds data, that is, differs from
what cleaning writes (`policy.personal_data`, the very predicate `verify` uses on the
table); `holds_personal_data` is any of them; `row_xact`, the transaction that last wrote
the row (its `xmin`), by which `audit verify` tells data a chunk's own transaction left in a
row from data written there later. Never a personal value.

The job never creates it. `db grants --purpose read-only` prints `statements()` (CREATE OR
REPLACE VIEW, and COMMENT ON VIEW with `built_from()`: the columns and the cleaned values it
was built for) for an administrator to run. The view belongs to whoever runs them and reads
the table with that role's rights and under that role's row-level security, not the
caller's.

`verify` counts through it when its role may not read a personal column (`source()`): the
view as a Table with the table's own names and types for the kept columns, so that every
predicate of `policy` applies to it unchanged and `policy.personal_data` takes its flags.
First, `check()` refuses a view that would not count what the table holds: missing or
unreadable (`NoFactsView`), built for another configuration or over another table
(`StaleFactsView`), owned by a role that may not read the personal columns or that row-level
security filters (`TargetRefused`). Row-level security that applies to `verify`'s own role is
refused before (`target.resolve`), whichever way it then reads. Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Boolean,
    ClauseElement,
    Column,
    ColumnElement,
    Connection,
    MetaData,
    Select,
    Table,
    Text,
    and_,
    cast,
    literal,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql.base import PGCompiler, PGDialect
from sqlalchemy.sql import sqltypes

from dispatch_retention.catalog.target import read_columns, unreadable_columns
from dispatch_retention.config import Settings, Target
from dispatch_retention.errors import ConfigError, NoFactsView, StaleFactsView, TargetRefused
from dispatch_retention.names import MAX_IDENTIFIER, quoted_name, quoted_table
from dispatch_retention.rule import policy
from dispatch_retention.rule.dispatch_table import dispatches_table, target_table
from dispatch_retention.trail.audit_tables import FACTS_VIEW, HOLDS_COLUMN, AuditTables

#: The hash of a view's definition as the server keeps it (`pg_get_viewdef`).
DEFINITION_SHA256 = "encode(sha256(convert_to(pg_get_viewdef({view}), 'UTF8')), 'hex')"
DO_TAG = "$dr_facts$"
#: The search_path under which that definition is read (`_names_whole`).
WHOLE_NAMES = "pg_catalog"
#: The version of what `built_from()` records: a view recorded otherwise is made again
#: (2: the view shows each row's `row_xact`).
FORMAT = 2
#: The view's column that names the transaction that last wrote the row (its `xmin`, as
#: text): `audit verify` tells a chunk's own transaction from a later writer by it.
ROW_XACT_COLUMN = "row_xact"
MADE_BY = "dispatch-retention db grants --purpose read-only"


class _ScriptCompiler(PGCompiler):
    """PostgreSQL's compiler, rendering a JSON value as its text (which the dialect cannot
    do by itself; `policy.cleaned_values` casts it to the column's type around it)."""

    def render_literal_value(self, value: Any, type_: Any) -> str:
        if isinstance(type_, sqltypes.JSON):
            value, type_ = json.dumps(value, ensure_ascii=False), sqltypes.Text()
        return str(super().render_literal_value(value, type_))  # type: ignore[no-untyped-call]


class _ScriptDialect(PGDialect):
    """PostgreSQL as psql reads a script, with no driver between: a literal doubles its
    quotes and nothing else. No `%%` (that is for a driver's `pyformat` placeholders; a
    script has none), and a backslash is itself, as under `standard_conforming_strings`,
    which `statements()` sets first."""

    statement_compiler = _ScriptCompiler
    default_paramstyle = "named"
    _backslash_escapes = False


SCRIPT = _ScriptDialect()  # type: ignore[no-untyped-call]


def script_sql(element: ClauseElement, **kw: Any) -> str:
    """`element` as SQL text with its values written out, for psql."""
    return str(element.compile(dialect=SCRIPT, compile_kwargs={"literal_binds": True, **kw}))


def view_name(settings: Settings) -> str:
    """The view, `schema.name` as a message shows it."""
    return quoted_name(settings.audit.schema_, FACTS_VIEW)


def flags(settings: Settings) -> dict[str, str]:
    """Each column of `clean.columns` and the view's flag for it, `has_<column>`; a flag
    name PostgreSQL would cut short is refused."""
    named = {column: f"has_{column}" for column in settings.clean.columns}
    for column, flag in named.items():
        if len(flag) > MAX_IDENTIFIER:
            raise ConfigError(
                settings.path,
                "clean.columns",
                f"{column}: the read-only view shows it as {flag}, longer than PostgreSQL's "
                f"{MAX_IDENTIFIER} characters: rename the column, or verify as a role that may "
                "read it",
            )
    return named


def shown_columns(settings: Settings) -> list[str]:
    """The table's columns the read-only role may read (its grants) and the view shows, in
    the seed model's order: the columns `run` reads (`target.read_columns`) but any of
    `clean.columns`. The one place that decides them: `member_id`, which `run` reads for
    the legal holds, is shown only while the config keeps it (`clean.keep`); stripped, it is
    personal data, and the view says instead whether the row's member is held
    (`HELD_COLUMN`)."""
    read = set(read_columns(settings)) - set(settings.clean.columns)
    return [c.name for c in dispatches_table(Target()).columns if c.name in read]


#: The view's column that is true where the row's member is under an active legal hold:
#: only where `member_id` is stripped, so that the view cannot show it.
HELD_COLUMN = "held"


def _shows_held(settings: Settings) -> bool:
    return "member_id" not in shown_columns(settings)


def view_columns(settings: Settings) -> list[ColumnElement[Any]]:
    """The view's columns: the columns the job reads, then `holds_personal_data`, then a flag
    per column of `clean.columns` in its order (so a column added at the end of
    `clean.columns` adds a column at the end, which CREATE OR REPLACE VIEW accepts)."""
    table = target_table(settings)
    holds = policy.personal_data(table, settings)
    held = [_held(table, settings).label(HELD_COLUMN)] if _shows_held(settings) else []
    return [
        *(table.c[c] for c in shown_columns(settings)),
        *held,
        policy.holds_personal_data(table, settings).label(HOLDS_COLUMN),
        *(holds[column].label(flag) for column, flag in flags(settings).items()),
        row_xact().label(ROW_XACT_COLUMN),
    ]


def row_xact() -> ColumnElement[str]:
    """The transaction that last wrote a row of the table (its `xmin`), as text: a SELECT
    of it must read that one table alone (the name is unqualified)."""
    return cast(literal_column("xmin"), Text)


def _held(table: Table, settings: Settings) -> ColumnElement[bool]:
    """`policy.held` as a column of the view: the script renders each column apart from
    its SELECT, so it names no column of the table inside (an EXISTS would not correlate).
    A hold's member_id is never NULL, so the IN is true or false."""
    holds = AuditTables(settings.audit.schema_).holds
    active = select(holds.c.member_id).where(policy.active(holds))
    return and_(table.c.member_id.is_not(None), table.c.member_id.in_(active))


def definition(settings: Settings) -> Select[Any]:
    """The view's query."""
    return select(*view_columns(settings)).select_from(target_table(settings))


def table(settings: Settings) -> Table:
    """The view as `verify` reads it: the kept columns with the table's own types (and its
    `[target.codes]`), and the flags, which `info["flags"]` names for `policy`."""
    model = target_table(settings)
    named = flags(settings)
    held = _shows_held(settings)
    return Table(
        FACTS_VIEW,
        MetaData(),
        *(Column(c, model.c[c].type, info=dict(model.c[c].info)) for c in shown_columns(settings)),
        *([Column(HELD_COLUMN, Boolean())] if held else []),
        Column(HOLDS_COLUMN, Boolean()),
        *(Column(flag, Boolean()) for flag in named.values()),
        Column(ROW_XACT_COLUMN, Text()),
        schema=settings.audit.schema_,
        info={"flags": named, **({"held": HELD_COLUMN} if held else {})},
    )


def built_from(settings: Settings) -> dict[str, Any]:
    """What the view counts by, as its COMMENT records it: the columns it shows and the
    checked columns with the value cleaning writes into each (as `verify` reports them)."""
    return {
        "made_by": MADE_BY,
        "format": FORMAT,
        "columns": shown_columns(settings),
        "checked_columns": [
            {"column": c, "cleaned_value": v} for c, v in policy.checked_columns(settings)
        ],
    }


def statements(settings: Settings) -> list[str]:
    """The SQL that makes the view (or makes it again, the same way: CREATE OR REPLACE)
    and records what it was built from. Its values are written out (psql runs it) by
    SQLAlchemy's PostgreSQL compiler, quotes doubled; its names are quoted by its preparer."""
    view = quoted_name(settings.audit.schema_, FACTS_VIEW)
    record = json.dumps(built_from(settings), ensure_ascii=False)
    shown = ",\n".join(
        f"  {script_sql(column, within_columns_clause=True)}" for column in view_columns(settings)
    )
    table = quoted_table(target_table(settings))
    recorded = script_sql(literal(record, Text()))
    named = script_sql(literal(view, Text()))
    # The COMMENT records the definition as the server keeps it, hashed: a view replaced
    # since (a WHERE that hides rows, a flag that is always false) no longer matches it.
    body = (
        f" DECLARE previous text := current_setting('search_path'); "
        f"BEGIN PERFORM set_config('search_path', '{WHOLE_NAMES}', true); "
        f"EXECUTE format('COMMENT ON VIEW %s IS %L', {named}, "
        f"jsonb_set(CAST({recorded} AS jsonb), '{{definition_sha256}}', "
        f"to_jsonb({DEFINITION_SHA256.format(view=f'CAST({named} AS regclass)')}))::text); "
        f"PERFORM set_config('search_path', previous, true); END "
    )
    tag = dollar_tag(body)
    return [
        "SET standard_conforming_strings = on;",
        f"CREATE OR REPLACE VIEW {view} AS SELECT\n{shown}\nFROM {table};",
        f"DO {tag}{body}{tag};",
    ]


def dollar_tag(body: str) -> str:
    """A dollar-quote tag that does not occur in `body` (`$dr_facts$`, else `$dr_facts_1$`,
    ...): a name or a value in the body (a quoted audit schema may hold any character)
    can then never end the quote and add statements of its own."""
    tag, n = DO_TAG, 0
    while tag in body:
        n += 1
        tag = f"{DO_TAG[:-1]}_{n}$"
    return tag


def source(conn: Connection, settings: Settings) -> Table:
    """What `verify` reads: the target table when its role may read every column of
    `clean.columns`, else the view, once `check()` finds it fit."""
    unreadable = unreadable_columns(conn, settings)
    if not unreadable:
        return target_table(settings)
    check(conn, settings, unreadable)
    return table(settings)


_VIEW = text(
    "SELECT v.relkind, obj_description(v.oid, 'pg_class') AS built_from, o.rolname AS owner, "
    "has_table_privilege(v.oid, 'SELECT') AS readable, current_user AS role, "
    f"{DEFINITION_SHA256.format(view='v.oid')} AS definition_sha256, "
    "EXISTS (SELECT FROM pg_rewrite r JOIN pg_depend d ON d.objid = r.oid "
    "AND d.classid = CAST('pg_rewrite' AS regclass) WHERE r.ev_class = v.oid "
    "AND d.refclassid = CAST('pg_class' AS regclass) AND d.refobjid = t.oid) AS over_target, "
    "t.relrowsecurity AND NOT (o.rolsuper OR o.rolbypassrls "
    "OR (pg_has_role(o.oid, t.relowner, 'USAGE') AND NOT t.relforcerowsecurity)) AS filtered, "
    "ARRAY(SELECT c FROM unnest(CAST(:columns AS text[])) AS c "
    "WHERE NOT has_column_privilege(o.oid, t.oid, c, 'SELECT')) AS owner_lacks "
    "FROM pg_class t, pg_class v JOIN pg_roles o ON o.oid = v.relowner "
    "WHERE t.oid = CAST(:table AS regclass) AND v.oid = to_regclass(:view)"
)


def check(conn: Connection, settings: Settings, unreadable: list[str]) -> None:
    """The view counts what the table holds, or the reason it cannot (see the module
    docstring); `unreadable` are the personal columns `verify`'s role may not read."""
    view, table_name = view_name(settings), settings.target.table
    regclass = quoted_name(settings.audit.schema_, FACTS_VIEW)
    params = {"columns": list(settings.clean.columns), "table": settings.target.regclass}
    with _names_whole(conn):
        row = conn.execute(_VIEW, {**params, "view": regclass}).mappings().first()
    if row is None:
        role = str(conn.execute(text("SELECT current_user")).scalar())
        raise NoFactsView(role, table_name, unreadable, view, f"there is no view {view}")
    role = str(row["role"])
    if row["relkind"] != "v":
        raise StaleFactsView(view, "is not a view", role)
    if not row["readable"]:
        raise NoFactsView(role, table_name, unreadable, view, f"may not read the view {view}")
    if not row["over_target"]:
        raise StaleFactsView(view, f"does not read {table_name}", role)
    stale = _differs(row["built_from"], built_from(settings))
    if stale:
        raise StaleFactsView(view, stale, role)
    if _recorded(row["built_from"]).get("definition_sha256") != row["definition_sha256"]:
        raise StaleFactsView(
            view, "was replaced since it was made: its definition is not the one it records", role
        )
    owner = str(row["owner"])
    if row["owner_lacks"]:
        lacks = ", ".join(row["owner_lacks"])
        raise TargetRefused(
            table_name,
            f"the view {view}, which role {role} counts through, belongs to role {owner}, "
            f"which may not read {lacks}: the view cannot tell whether they hold data. DROP "
            f"VIEW {view} and run the read-only grants of `db grants` as the table's owner",
        )
    if row["filtered"]:
        raise TargetRefused(
            table_name,
            f"row-level security is enabled and applies to role {owner}, which owns the view "
            f"{view} that role {role} counts through: it would hide rows from verify, whose "
            f"report would then miss them. Grant it BYPASSRLS (ALTER ROLE {owner} BYPASSRLS), "
            f"or make the view as the table's owner (DROP VIEW {view}, then the read-only "
            "grants of `db grants`; without FORCE ROW LEVEL SECURITY)",
        )


@contextmanager
def _names_whole(conn: Connection) -> Iterator[None]:
    """`pg_get_viewdef` leaves out the schema of a name the search_path finds: with only
    pg_catalog on it, every name is written whole, whoever asks (the grants script and
    `check()` alike)."""
    previous = conn.execute(text("SELECT current_setting('search_path')")).scalar_one()
    conn.execute(text(f"SELECT set_config('search_path', '{WHOLE_NAMES}', true)"))
    try:
        yield
    finally:
        conn.execute(text("SELECT set_config('search_path', :p, true)"), {"p": previous})


def _recorded(recorded: str | None) -> dict[str, Any]:
    try:
        found = json.loads(recorded) if recorded else None
    except ValueError:
        found = None
    return found if isinstance(found, dict) else {}


def _differs(recorded: str | None, expected: dict[str, Any]) -> str:
    """Why the view's record (its COMMENT) is not `expected`, or '' when it is."""
    found = _recorded(recorded)
    if found.get("made_by") != MADE_BY:
        return f"records nothing of what it was built from (it is not made by `{MADE_BY}`)"
    if found.get("format") != expected["format"] or found.get("columns") != expected["columns"]:
        return "was made by another version of dispatch-retention"
    made, wanted = found.get("checked_columns"), expected["checked_columns"]
    if made == wanted:
        return ""
    if not isinstance(made, list):
        return f"records nothing of what it was built from (it is not made by `{MADE_BY}`)"
    names = [c.get("column") if isinstance(c, dict) else None for c in made]
    if names != [c["column"] for c in wanted]:
        return (
            f"was built for clean.columns {', '.join(map(str, names)) or '(none)'}; the "
            f"configuration names {', '.join(c['column'] for c in wanted)}"
        )
    other = [w["column"] for m, w in zip(made, wanted, strict=True) if m != w]
    return (
        f"was built for other cleaned values of {', '.join(other)} (clean.replace has "
        "changed since)"
    )
