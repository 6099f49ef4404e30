"""The target table as the database knows it, resolved once when the job connects.

The config names the table (`dispatches` or `schema.dispatches`); the database decides what
that name is. `resolve()` reads the catalog once and refuses, before anything is read or
written, whatever would let the job report success while rows escape it (docs/architecture.md,
"What the job refuses and what it reports"):

- anything but a table or a partitioned table (a view can hide rows, a foreign table lives
  elsewhere, a materialized view is a copy): `TargetRefused`, exit 2;
- row-level security that applies to the job's role: PostgreSQL would silently filter rows
  out of every statement. The job's sessions also run with `row_security = off`
  (`engines.make_engine`), so that if RLS applies after all, the server raises instead of
  filtering;
- a table the config does not fit, or that the job cannot clean whole (`table_problems`,
  each naming the column, key, child table or rule and the fix, and listed by `db check`):
  a personal column that cannot take what cleaning writes (NOT NULL, here or in a table
  below; a domain that refuses it; generated; identity GENERATED ALWAYS), an `id` the chunk
  windows cannot walk (not an integer, or NULL-able), an inheritance child with columns of
  its own that are neither stripped nor kept (the UPDATE of the target sets only the
  target's columns, so nothing would ever strip or check them), a rule on UPDATE
  (PostgreSQL refuses the cleaning statement, a data-modifying WITH, on such a table), a
  unique index over columns cleaning sets to one `clean.replace` value (or to NULL, where
  its NULLs are NOT DISTINCT), and a CHECK or exclusion constraint that refuses what
  cleaning writes (`constraint_problems`: decided on what cleaning writes alone where the
  constraint reads nothing else; where it reads a kept column too, only the rows can tell,
  and `db check` warns naming it).

The resolved schema and name identify the target from then on (the run lock, the audit
trail, every statement), so `dispatches` and `public.dispatches` are one target.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, distinct, func, select, text, true
from sqlalchemy.exc import DBAPIError

from dispatch_retention.catalog import describe
from dispatch_retention.config import API_WORDS, KEPT_COLUMNS, Settings, Target
from dispatch_retention.errors import TargetRefused
from dispatch_retention.names import quoted_name
from dispatch_retention.pg import diagnosis
from dispatch_retention.rule.dispatch_table import target_table
from dispatch_retention.rule.policy import SETTLED_COLUMNS, stored
from dispatch_retention.rule.shape import ColumnShape, Constraint, Shape

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
    table's column types (`describe.read`) that the statements bind values as."""
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
    names, and the audit schema's, may be shown in error messages from then on. A table
    the job cannot clean as configured (`table_problems`) is refused (`TargetRefused`, exit
    2), unless `refuse` is False (`db check`, which lists the problems instead)."""
    resolved = resolve(conn, settings.target)
    table = describe.read(conn, resolved.oid)
    diagnosis.know(resolved.schema, resolved.name, settings.audit.schema_, *settings.clean.keep)
    diagnosis.know(*table.columns)
    diagnosis.know(*(c.name for c in table.constraints))  # a chunk that violates one names it
    if refuse:
        problems = table_problems(conn, settings, table, resolved.qualified)
        errors = [p for p in problems if p.level == "error"]
        if errors:
            raise TargetRefused(resolved.qualified, errors[0].message)
    return pinned(settings, resolved, table)


@dataclass(frozen=True)
class Problem:
    """Why the job cannot clean the table as configured: `run` refuses it (exit 2) with
    `message`, `db check` lists it as an error of its `check`."""

    check: str  # "key" | "rule" | "columns" | "column classification"
    message: str
    #: "warn": what only the rows can tell (a constraint that reads kept columns too): not
    #: refused, listed by `db check` as a warning, and a run it fails names it
    level: Literal["error", "warn"] = "error"


def table_problems(
    conn: Connection, settings: Settings, table: Shape, qualified: str
) -> list[Problem]:
    """`column_problems`, then what only the server can tell: whether each personal column
    whose type is a domain takes what cleaning writes (`domain_problems`), and whether the
    table's CHECK and exclusion constraints do (`constraint_problems`, over the columns
    that passed both). `qualified` is the target as the messages name it."""
    fitting = [c for c in settings.clean.columns if not _strippable(settings, table, c)]
    refused = domain_problems(conn, settings, table, fitting)
    writable = [c for c in fitting if c not in refused]
    return (
        column_problems(settings, table, qualified)
        + [Problem("columns", message) for message in refused.values()]
        + constraint_problems(conn, settings, table, writable)
    )


def read_columns(settings: Settings) -> list[str]:
    """What `run` reads of the table, and all the read-only role may read of it: every kept
    column plus member_id (for holds), never the personal data it strips (member_id is read
    even when it is stripped: the hold check needs it)."""
    return sorted(set(KEPT_COLUMNS) | {"member_id"})


def column_problems(settings: Settings, table: Shape, qualified: str) -> list[Problem]:
    """What depends on the table, checked as soon as the job connects, each naming its
    column (key, child table, rule) and the fix: an `id` the chunk windows can walk
    (`_key`); no rule on UPDATE (`_rules`); every column of `clean.columns` exists and can
    take what cleaning writes (NULL, or a `clean.replace` value of its type), in the target
    and in every table below it; the API's words can be stored in each status column the
    rule or a policy reads (text, an enum with those labels, or `[target.codes]` of the
    column's kind); every column of a table below the target is the target's or classified
    (`_children`). Pure: `table_problems` adds what only the server can tell."""
    problems = _key(table, qualified) + _rules(table, qualified)
    problems += [
        Problem("columns", p)
        for c in settings.clean.columns
        for p in _strippable(settings, table, c) + _settable_below(settings, table, c, qualified)
    ]
    used = set(SETTLED_COLUMNS) | {key for p in settings.policies for key in p.where}
    codes = settings.target.codes
    for column in sorted(used | set(codes)):
        shaped = table.columns.get(column)
        if shaped is None:
            continue  # `db check` lists missing columns; statements then fail on them
        mapping = codes.get(column)
        found = _words_fit(settings, shaped) if mapping is None else _codes_fit(shaped, mapping)
        problems += [Problem("columns", p) for p in found]
    return problems + _unique(settings, table, qualified) + _children(settings, table, qualified)


def _unique(settings: Settings, table: Shape, qualified: str) -> list[Problem]:
    """A unique index every column of which cleaning sets to its `clean.replace` value, or
    one whose NULLs are NOT DISTINCT every column of which cleaning sets (to NULL or a
    replacement): the second row cleaned would hold the same key, so every run would fail.
    Elsewhere NULL is not counted (NULLs are distinct in a unique index by default)."""
    cleaned = {c for c in settings.clean.columns if c in table.columns}
    replaced = {c for c in cleaned if c in settings.clean.replace}
    problems = []
    for u in table.unique:
        columns = set(u.columns)
        if not u.columns or not columns <= cleaned:
            continue
        if columns <= replaced:
            sets = "which cleaning sets to the same clean.replace value in every row"
            which = "it" if len(u.columns) == 1 else "one of them"
            fix = f"Strip {which} to NULL (take its value out of clean.replace)"
        elif u.nulls_not_distinct:
            sets = (
                "NULLS NOT DISTINCT, which cleaning sets to NULL or to the same clean.replace "
                "value in every row"
            )
            fix = "Make it NULLS DISTINCT (the default: a NULL then equals no other NULL)"
        else:
            continue
        problems.append(
            Problem(
                "columns",
                f"the unique index {u.index} of {u.relation} is over {', '.join(u.columns)}, "
                f"{sets}: the second row cleaned would violate it. {fix}, "
                "or make the index partial (... WHERE cleaned_at IS NULL) or hold a column "
                "cleaning keeps"
                + ("" if u.relation == qualified else f" ({u.relation} is below {qualified})"),
            )
        )
    return problems


#: The integer types the chunk windows walk (`shape` kind "integer").
_KEY_TYPES = "smallint, integer or bigint"


def _key(table: Shape, qualified: str) -> list[Problem]:
    """`id` is what the chunk windows walk (`id BETWEEN lo AND hi`), what the audit trail's
    chunks and `audit verify` refer to: an integer no row lacks. A missing `id` is the
    `columns` check's (statements fail on it)."""
    key = table.columns.get("id")
    if key is None:
        return []
    if key.kind != "integer":
        return [
            Problem(
                "key",
                f"id is {key.sql_type}: the job walks {qualified} in windows of integer ids "
                f"(its chunks and their audit records refer to them), so id must be "
                f"{_KEY_TYPES}; a table keyed by another type is not supported",
            )
        ]
    if key.nullable:
        return [
            Problem(
                "key",
                f"id may be NULL (it is not the primary key nor NOT NULL): a row without an "
                f"id is in no window of ids, so the job would never clean it; make it NOT "
                f"NULL (ALTER TABLE {qualified} ALTER COLUMN id SET NOT NULL)",
            )
        ]
    return []


def _rules(table: Shape, qualified: str) -> list[Problem]:
    """A rule on UPDATE (of any kind, acknowledged or not): PostgreSQL rewrites the UPDATE
    through it, and refuses that for the job's cleaning statement (a data-modifying WITH,
    SQLSTATE 0A000); the one kind it accepts (an unconditional DO INSTEAD of one statement
    with RETURNING) replaces the cleaning, so its rows stay as they were. Rule names are
    printed as the catalog holds them."""
    return [
        Problem(
            "rule",
            f"rule {rule.name} ({rule.kind}) fires on UPDATE of {qualified}: PostgreSQL "
            "refuses the job's cleaning statement (an UPDATE in a WITH query) on a table with "
            "such a rule, or the rule replaces it, so no run could clean the table, "
            "acknowledged or not. Do what the rule does in a trigger (AFTER UPDATE ... FOR "
            "EACH ROW: a copy risk the job lists), then drop the rule (DROP RULE "
            f"{quoted_name(rule.name)} ON {qualified}), or disable it (ALTER TABLE "
            f"{qualified} DISABLE RULE {quoted_name(rule.name)})",
        )
        for rule in table.rules
    ]


def _children(settings: Settings, table: Shape, qualified: str) -> list[Problem]:
    """The columns of a table below the target that the target lacks (an inheritance child's
    own, at any depth: a partition has none), unless `clean.keep` keeps them: the UPDATE of
    the target sets only the target's columns, so nothing would strip or check them."""
    problems = []
    for below in table.below:
        unclassified = settings.unclassified(below.own)
        if unclassified:
            problems.append(
                Problem(
                    "column classification",
                    f"{below.relation} inherits from {qualified} and has columns of its own, "
                    f"neither stripped nor kept: {', '.join(unclassified)}. Cleaning "
                    f"{qualified} sets only its own columns, so nothing would strip or check "
                    f"these. If one holds personal data, add it to {qualified} (ALTER TABLE "
                    f"{qualified} ADD COLUMN <name> <its type>: the child's column merges into "
                    "it) and list it in clean.columns; otherwise list it in clean.keep with "
                    "the reason it stays",
                )
            )
    return problems


def _settable_below(settings: Settings, table: Shape, name: str, qualified: str) -> list[str]:
    """A personal column of the target that a table below it holds NOT NULL (where cleaning
    writes NULL), or may not have set (generated, identity GENERATED ALWAYS): the UPDATE
    fails on that table's rows."""
    column = table.columns.get(name)
    if column is None:
        return []
    problems = []
    for below in table.below:
        if name in below.unsettable:
            problems.append(
                f"{name} cannot be set in {below.relation}, a table below {qualified} "
                "(generated, or an identity GENERATED ALWAYS there), but clean.columns strips "
                "it: take it out of clean.columns, or make it a plain column there"
            )
        elif name in below.not_null and column.nullable and name not in settings.clean.replace:
            problems.append(
                f"{name} is NOT NULL in {below.relation}, a table below {qualified}, but "
                f"clean.columns sets it to NULL: give clean.replace a value of its type for "
                f"it, or drop that NOT NULL (ALTER TABLE {below.relation} ALTER COLUMN {name} "
                "DROP NOT NULL)"
            )
    return problems


#: What cleaning writes, passed through a domain's input function by the domain's oid (no
#: name to look up: the role may not use the domain's schema); it raises where the domain
#: refuses the value (NULL, or the replacement's text), as the cleaning UPDATE would.
_DOMAIN_TAKES = text("SELECT domain_in(CAST(:value AS cstring), CAST(:domain AS oid), -1) IS NULL")

#: SQLSTATE classes of errors that say nothing about the value (the connection, a timeout,
#: resources, the server itself): raised as they are, not taken for a domain's refusal.
_NOT_ABOUT_THE_VALUE = ("08", "40", "53", "54", "55", "57", "58", "XX")


def domain_problems(
    conn: Connection, settings: Settings, table: Shape, columns: list[str]
) -> dict[str, str]:
    """Of `columns` (personal columns that exist and whose kind takes what cleaning writes),
    those whose type is a domain that refuses it, each with the message saying so: a NOT
    NULL or a CHECK (also one inherited from a domain it is based on) that refuses NULL, or
    the `clean.replace` value. Asks the server, each in a savepoint (read-only: it writes
    nothing); what the server says is never shown."""
    problems = {}
    for name in columns:
        column = table.columns[name]
        if column.domain is None:
            continue
        value = settings.clean.replace.get(name)
        try:
            with conn.begin_nested():
                conn.execute(_DOMAIN_TAKES, {"value": value, "domain": column.domain})
        except DBAPIError as exc:
            state = diagnosis.sqlstate(exc)
            if state is None or state.startswith(_NOT_ABOUT_THE_VALUE):
                raise
            problems[name] = _refused_by_domain(name, column, value)
    return problems


def _refused_by_domain(name: str, column: ColumnShape, value: Any) -> str:
    if value is None:
        return (
            f"{name} is of the domain {column.sql_type}, which refuses NULL (its NOT NULL or "
            "a CHECK), but clean.columns sets it to NULL: give clean.replace a value the "
            "domain accepts for it"
        )
    return (
        f"clean.replace.{name}: {value!r} is refused by the domain {column.sql_type} of "
        f"{name} (its NOT NULL or a CHECK): give a value the domain accepts"
    )


#: The columns cleaning stamps with the transaction's `now()` besides the personal ones
#: (`statements.Statements`).
STAMPED = ("cleaned_at", "updated_at")

#: SQLSTATE classes with which evaluating a constraint on what cleaning writes says the
#: cleaning UPDATE would fail too: a data exception (a value its type or a function in the
#: expression refuses), an integrity violation, an exception a function raises.
_REFUSES = ("22", "23", "P0")


def constraint_problems(
    conn: Connection, settings: Settings, table: Shape, writable: list[str]
) -> list[Problem]:
    """The CHECK and exclusion constraints (of the target and the tables below it) that
    refuse what cleaning writes into `writable` (personal columns that take it) and the
    stamps (`STAMPED`). A constraint over a personal column already refused is left to that
    refusal. Decided where a constraint reads only columns cleaning writes: the server
    evaluates it on what cleaning writes, in a savepoint (`_evaluate`). Where it reads a
    column cleaning keeps as well, or the whole row or an expression the catalog does not
    break down, only the rows can tell, and reading them all on connecting is too costly:
    a warning naming it (the run that meets a refusing row fails naming it, `diagnosis.know`),
    but for a CHECK that reads of what cleaning writes only `updated_at` (which every
    update of the application stamps with its `now()` as well). So is a NOT VALID CHECK
    over kept columns only: rows older than it were never checked, and cleaning rewrites
    them."""
    written: dict[str, Any] = {c: _written(settings, table, c) for c in writable}
    stamped = [c for c in STAMPED if c in table.columns]
    cleaned = {c for c in settings.clean.columns if c in table.columns}
    problems = []
    for constraint in table.constraints:
        if set(constraint.columns) & (cleaned - set(writable)):
            continue  # its column is refused already
        if constraint.kind == "check":
            problems += _check(conn, constraint, written, stamped)
        else:
            problems += _exclusion(conn, constraint, written, stamped)
    return problems


def _written(settings: Settings, table: Shape, name: str) -> Any:
    """What cleaning writes into the personal column `name`, as JSON for
    `jsonb_to_record` (`policy.cleaned_values` writes it): None for NULL, a replacement as
    itself, or as its JSON text in a text column when it is not a string."""
    value = settings.clean.replace.get(name)
    if value is not None and table.columns[name].kind == "text" and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return value


def _check(
    conn: Connection, constraint: Constraint, written: Mapping[str, Any], stamped: list[str]
) -> list[Problem]:
    """A CHECK: decided on what cleaning writes where it reads nothing else; where it reads
    nothing cleaning writes, it holds for every row it held for (validated)."""
    touched = constraint.reads & (set(written) | set(stamped))
    name = quoted_name(constraint.name)
    if not touched:
        if constraint.validated:
            return []  # every row holds it, and cleaning changes nothing it reads
        return [
            _warning(
                f"the CHECK constraint {name} of {constraint.relation} is NOT VALID: rows "
                "written before it were never checked, and cleaning rewrites every row it "
                "cleans, so a row that fails it fails the run (exit 1, naming it). Validate "
                f"it (ALTER TABLE {constraint.relation} VALIDATE CONSTRAINT {name}) to know "
                "that no row does"
            )
        ]
    if constraint.reads - touched:
        if touched == {"updated_at"}:
            return []  # `updated_at >= created_at`: the application's own updates stamp it so
        return [_depends_on_rows("CHECK constraint", constraint, touched)]
    outcome = _evaluate(conn, constraint, f"({constraint.expression})", written, stamped)
    if outcome in ("false", "raises"):
        return [
            Problem(
                "columns",
                f"the CHECK constraint {name} of {constraint.relation} refuses what cleaning "
                f"writes ({_what(constraint, written)}), so every run would fail on its first "
                f"row. Give clean.replace values it accepts, or change it to accept them "
                f"(ALTER TABLE {constraint.relation} DROP CONSTRAINT {name}, then ADD it "
                "again accepting them)",
            )
        ]
    if outcome in ("true", "null"):
        return []  # NULL passes a CHECK
    return [_not_evaluated("CHECK constraint", constraint, outcome)]


def _exclusion(
    conn: Connection, constraint: Constraint, written: Mapping[str, Any], stamped: list[str]
) -> list[Problem]:
    """An exclusion constraint: two cleaned rows conflict where each of its operators holds
    between what cleaning writes and itself. NULL never conflicts (PostgreSQL takes the
    operators as strict), so a column of it cleaning sets to NULL makes it hold."""
    if any(c in written and written[c] is None for c in constraint.columns):
        return []
    touched = constraint.reads & (set(written) | set(stamped))
    if not touched:
        return []  # cleaning changes nothing it reads
    if "" in constraint.columns or constraint.reads - touched:
        return [_depends_on_rows("exclusion constraint", constraint, touched)]
    holds = " AND ".join(
        f"({q} {op} {q})" for q, op in zip(constraint.quoted, constraint.operators, strict=True)
    )
    outcome = _evaluate(conn, constraint, holds, written, stamped)
    if outcome in ("true", "raises"):
        name = quoted_name(constraint.name)
        return [
            Problem(
                "columns",
                f"the exclusion constraint {name} of {constraint.relation} is over "
                f"{', '.join(constraint.columns)}, which cleaning sets to the same values in "
                f"every row ({_what(constraint, written)}), and its operators hold between "
                "them: the second row cleaned would violate it. Strip one of them to NULL "
                "(take it out of clean.replace: NULLs never conflict), or make the "
                "constraint partial (... WHERE (cleaned_at IS NULL))",
            )
        ]
    if outcome in ("false", "null"):
        return []  # an operator that does not hold between equal cleaned values
    return [_not_evaluated("exclusion constraint", constraint, outcome)]


def _evaluate(
    conn: Connection,
    constraint: Constraint,
    expression: str,
    written: Mapping[str, Any],
    stamped: list[str],
) -> str:
    """`expression` (over the constraint's columns, all of which cleaning writes) evaluated
    by the server on what cleaning writes, in a savepoint (read-only: it writes nothing,
    whatever a function in it does is rolled back): "true", "false", "null", "raises"
    where it raises as the cleaning UPDATE would (`_REFUSES`), else the SQLSTATE it raised
    (a type or function this role may not use: the job cannot tell). The expression and
    the names are the catalog's (the owner's DDL, deparsed by the server), passed through
    as SQL text; they are never printed."""
    typed = zip(constraint.quoted, constraint.types, strict=True)
    columns = dict(zip(constraint.columns, typed, strict=True))  # each once
    defined = ", ".join(f"{q} {t}" for q, t in columns.values())
    query = text(
        f"SELECT {_escaped(expression)} FROM jsonb_to_record(CAST(:row AS jsonb) || coalesce(("
        "SELECT jsonb_object_agg(s, now()) FROM unnest(CAST(:stamped AS text[])) s), '{}')"
        f") AS r({_escaped(defined)})"
    )
    row = {c: written[c] for c in columns if c in written}
    try:
        with conn.begin_nested():
            value = conn.execute(
                query, {"row": json.dumps(row), "stamped": [c for c in stamped if c in columns]}
            ).scalar()
    except DBAPIError as exc:
        state = diagnosis.sqlstate(exc)
        if state is None or state.startswith(_NOT_ABOUT_THE_VALUE):
            raise
        return "raises" if state.startswith(_REFUSES) else state
    return "null" if value is None else "true" if value else "false"


def _escaped(catalog: str) -> str:
    """SQL text from the catalog with each colon escaped, so that SQLAlchemy takes none of
    it for a bind parameter (`'a:b'`, `x::text`); its `%` it doubles itself."""
    return catalog.replace(":", "\\:")


def _what(constraint: Constraint, written: Mapping[str, Any]) -> str:
    """What cleaning writes into the constraint's columns, in words: `msisdn NULL, email
    clean.replace.email, cleaned_at now()` (never a value: a replacement is the config's,
    but the columns name it)."""
    parts = []
    for c in constraint.columns:
        if c in written:
            parts.append(f"{c} NULL" if written[c] is None else f"{c} clean.replace.{c}")
        elif c in STAMPED:
            parts.append(f"{c} now()")
    return ", ".join(parts)


def _depends_on_rows(what: str, constraint: Constraint, touched: frozenset[str]) -> Problem:
    kept = sorted(constraint.reads - touched - {""})
    also = f"what the row holds in {', '.join(kept)}" if kept else "the whole row"
    return _warning(
        f"the {what} {quoted_name(constraint.name)} of {constraint.relation} reads "
        f"{', '.join(sorted(touched))}, which cleaning writes, and {also}: whether it takes "
        "what cleaning writes depends on each row, which the job does not read on "
        "connecting. A run whose cleaning it refuses fails on that chunk naming it (exit 1); "
        "make sure it takes NULL or the clean.replace values whatever the rest of the row "
        "holds"
    )


def _not_evaluated(what: str, constraint: Constraint, state: str) -> Problem:
    return _warning(
        f"the {what} {quoted_name(constraint.name)} of {constraint.relation} reads columns "
        f"cleaning writes, but the job could not evaluate it on what cleaning writes "
        f"(SQLSTATE {state}: a type or function in it this role may not use?). A run whose "
        "cleaning it refuses fails on that chunk naming it (exit 1)"
    )


def _warning(message: str) -> Problem:
    return Problem("columns", message, level="warn")


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
    if column.generated:
        return [
            f"{name} is a generated column (GENERATED ALWAYS AS ... STORED): PostgreSQL "
            "computes it and refuses to set it, so cleaning cannot strip it; take it out of "
            "clean.columns and strip the columns it is computed from (it follows them), and "
            "list it in clean.keep with that reason"
        ]
    if column.identity == "always":
        return [
            f"{name} is an identity column GENERATED ALWAYS: an UPDATE may only set it to "
            "DEFAULT, so cleaning cannot strip it; take it out of clean.columns (and list it "
            "in clean.keep with the reason it stays)"
        ]
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
