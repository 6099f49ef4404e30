"""The indexes the job reads due rows through, and whether the database has them.

`policy.arms()` splits the due rows by binding policy; each arm is one index range on
(the policy's `where` keys, the age) among rows not yet cleaned. `policy_indexes()` defines
one index per distinct set of keys, covering what an arm reads, so that a plan reads the
index alone. `serving()` reads the catalog: which existing index serves each set of keys.
A run goes through the indexes only when every arm has one (`db check` prints the CREATE
INDEX CONCURRENTLY statements for the missing ones); without them it reads the table, as
fast as a sequential scan allows.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import Connection, Index, Table, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex

from .config import Settings
from .policy import SETTLED_COLUMNS, age
from .schema import dispatches_table

MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1
Keys = tuple[str, ...]


def keys_of(settings: Settings) -> list[Keys]:
    """Each distinct set of `where` keys (sorted), in the order of the file."""
    return list(dict.fromkeys(tuple(sorted(p.where)) for p in settings.policies))


def policy_indexes(
    table: Table, settings: Settings, *, concurrently: bool = False
) -> dict[Keys, Index]:
    """Per set of keys: an index on (those keys, the age, id), partial on `cleaned_at IS
    NULL`, including the other columns an arm reads (statuses, schedule, member, every
    policy's keys) so that it is read alone (an index-only scan where the visibility map
    allows). The id lets a window's bounds be checked inside the index."""
    row_age = age(table, settings.clean.age_from)
    age_columns = {settings.clean.age_from, "created_at"}  # COALESCE(age_from, created_at)
    read = {"member_id", "scheduled_at", *SETTLED_COLUMNS, *age_columns}
    read |= {k for p in settings.policies for k in p.where}
    indexes: dict[Keys, Index] = {}
    for keys in keys_of(settings):
        name = f"{table.name}_retention_{'_'.join(keys) or 'age'}_idx"
        if len(name) > MAX_IDENTIFIER:
            digest = hashlib.sha256(name.encode()).hexdigest()[:8]
            name = f"{name[: MAX_IDENTIFIER - 9]}_{digest}"
        # an expression key serves no index-only scan: its columns are included as well
        keyed = {"created_at"} if settings.clean.age_from == "created_at" else set()
        include = sorted(read - set(keys) - keyed)
        indexes[keys] = Index(
            name,
            *(table.c[k] for k in keys),
            row_age,
            table.c.id,
            postgresql_where=table.c.cleaned_at.is_(None),
            postgresql_include=include,
            postgresql_concurrently=concurrently,
        )
    return indexes


def statements(settings: Settings) -> dict[Keys, str]:
    """Per set of keys: the CREATE INDEX CONCURRENTLY statement (it does not block writes)."""
    table = dispatches_table(settings.target)
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    return {
        keys: f"{CreateIndex(index).compile(dialect=dialect)};"
        for keys, index in policy_indexes(table, settings, concurrently=True).items()
    }


def create(conn: Connection, settings: Settings) -> None:
    """Create the indexes where missing (tests, demo, benchmarks; production runs the
    statements `db check` prints)."""
    for index in policy_indexes(dispatches_table(settings.target), settings).values():
        index.create(conn, checkfirst=True)


def serving(conn: Connection, settings: Settings) -> dict[Keys, str | None]:
    """Per set of keys: the definition of a valid index that serves its arms, or None.

    Any partial index on `cleaned_at IS NULL` whose leading columns are the keys (in any
    order) and then the age serves (the id after them, and the included columns, only make
    it faster)."""
    rows = (
        conn.execute(
            text(
                "SELECT pg_get_indexdef(i.indexrelid) AS definition, "
                "ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true) "
                "      FROM generate_series(1, i.indnkeyatts) AS k ORDER BY k) AS columns, "
                "pg_get_expr(i.indpred, i.indrelid) AS predicate "
                "FROM pg_index i WHERE i.indrelid = CAST(:table AS regclass) AND i.indisvalid "
                "ORDER BY i.indnatts DESC"
            ),
            {"table": settings.target.regclass},
        )
        .mappings()
        .all()
    )
    age_from = settings.clean.age_from

    def serves(keys: Keys, columns: list[str], predicate: str) -> bool:
        n = len(keys)
        if len(columns) <= n or "cleaned_at IS NULL" not in predicate:
            return False
        lead = columns[n]
        by_age = lead == age_from if age_from == "created_at" else f"COALESCE({age_from}," in lead
        return set(columns[:n]) == set(keys) and by_age

    return {
        keys: next(
            (
                str(r["definition"])
                for r in rows
                if serves(keys, list(r["columns"]), r["predicate"] or "")
            ),
            None,
        )
        for keys in keys_of(settings)
    }


def complete(conn: Connection, settings: Settings) -> bool:
    """Does every arm have its index (so a run may go through them)?"""
    return all(definition is not None for definition in serving(conn, settings).values())
