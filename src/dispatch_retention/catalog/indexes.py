"""The indexes the job reads due rows through, and whether the database has them.

`policy.arms()` splits the due rows by binding policy; each arm is one index range on
(the policy's `where` keys, the age) among rows not yet cleaned. `policy_indexes()` defines
one index per distinct set of keys, covering what an arm's scan reads (`arm_columns()`), so
that a plan reads the index alone. `serving()` reads the catalog: which existing index
serves each set of keys, by the same rule the planner needs for an index-only scan (same
leading columns, same partial predicate, every column the scan reads in the index).
`advice()` gives the statements that build a missing one without blocking writes: one
CREATE INDEX CONCURRENTLY, or, on a partitioned table (which refuses CONCURRENTLY), an
invalid index ON ONLY the parent, one CREATE INDEX CONCURRENTLY per partition and an ALTER
INDEX ... ATTACH PARTITION per partition, which makes the parent's index valid once every
partition has its own. A run goes through the indexes only when every arm has one (`db
check` prints the advice); without them it reads the table, as fast as a sequential scan
allows. Read-only: this module creates nothing but in `create()` (tests, demo, benchmarks).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy import Connection, Index, MetaData, Table, text
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.schema import CreateIndex

from dispatch_retention.config import Settings
from dispatch_retention.names import MAX_IDENTIFIER, quoted_name
from dispatch_retention.rule.dispatch_table import dispatches_table
from dispatch_retention.rule.policy import SETTLED_COLUMNS, age

Keys = tuple[str, ...]
#: PostgreSQL as psql reads the statements `db check` prints: a driver's dialect would double
#: a `%` in a name for its placeholders (`names.quoted_name` quotes as this does).
_DIALECT = PGDialect(paramstyle="named")  # type: ignore[no-untyped-call]


def keys_of(settings: Settings) -> list[Keys]:
    """Each distinct set of `where` keys (sorted), in the order of the file."""
    return list(dict.fromkeys(tuple(sorted(p.where)) for p in settings.policies))


def arm_columns(settings: Settings) -> frozenset[str]:
    """The columns of the dispatches table that an arm's scan reads (`Statements.plan_scan`
    and a sparse window's candidates): the id (its block, the window's bounds), the member
    (the holds' join), the statuses and the schedule (settled, waiting), the age and
    `created_at` (the age falls back to it) and every policy's keys (an arm excludes the
    rows an earlier policy binds). `cleaned_at` is read only in the arm's `cleaned_at IS
    NULL`, which the indexes' predicate implies, so an index-only scan does without it."""
    return frozenset(
        {
            "id",
            "member_id",
            "scheduled_at",
            *SETTLED_COLUMNS,
            settings.clean.age_from,
            "created_at",
            *(k for p in settings.policies for k in p.where),
        }
    )


def index_name(table_name: str, keys: Keys) -> str:
    """The job's name for the index of `keys` on a table (or on one of its partitions)."""
    name = f"{table_name}_retention_{'_'.join(keys) or 'age'}_idx"
    if len(name) > MAX_IDENTIFIER:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_IDENTIFIER - 9]}_{digest}"
    return name


def policy_indexes(
    table: Table, settings: Settings, *, concurrently: bool = False
) -> dict[Keys, Index]:
    """Per set of keys: an index on (those keys, the age, id), partial on `cleaned_at IS
    NULL`, including the other columns an arm reads (`arm_columns()`) so that it is read
    alone (an index-only scan where the visibility map allows). The id lets a window's
    bounds be checked inside the index."""
    row_age = age(table, settings.clean.age_from)
    # an expression key serves no index-only scan: its columns are included as well
    keyed = {"created_at"} if settings.clean.age_from == "created_at" else set()
    indexes: dict[Keys, Index] = {}
    for keys in keys_of(settings):
        include = sorted(arm_columns(settings) - set(keys) - keyed - {"id"})
        indexes[keys] = Index(
            index_name(table.name, keys),
            *(table.c[k] for k in keys),
            row_age,
            table.c.id,
            postgresql_where=table.c.cleaned_at.is_(None),
            postgresql_include=include,
            postgresql_concurrently=concurrently,
        )
    return indexes


def statements(settings: Settings) -> dict[Keys, str]:
    """Per set of keys: the CREATE INDEX CONCURRENTLY statement (it does not block writes)
    on a table that is not partitioned (`advice()` reads which it is)."""
    table = dispatches_table(settings.target)
    return {
        keys: _create(index)
        for keys, index in policy_indexes(table, settings, concurrently=True).items()
    }


def create(conn: Connection, settings: Settings) -> None:
    """Create the indexes where missing (tests, demo, benchmarks; production runs the
    statements `db check` prints). On a partitioned table PostgreSQL builds them on every
    partition, blocking writes meanwhile."""
    for index in policy_indexes(dispatches_table(settings.target), settings).values():
        index.create(conn, checkfirst=True)


# --- the catalog ------------------------------------------------------------------------

#: The target and every table below it (partitions, inheritance children), parents first.
_TREE = text(
    "WITH RECURSIVE tree(relid, parent, level) AS ("
    "SELECT CAST(CAST(:t AS regclass) AS oid), CAST(NULL AS oid), 0 "
    "UNION ALL SELECT i.inhrelid, i.inhparent, tree.level + 1 FROM pg_inherits i "
    "JOIN tree ON i.inhparent = tree.relid) "
    "SELECT CAST(tree.relid AS bigint) AS oid, CAST(tree.parent AS bigint) AS parent, "
    "tree.level, c.relkind AS kind, n.nspname AS schema, c.relname AS name, "
    "format('%I.%I', n.nspname, c.relname) AS qualified "
    "FROM tree JOIN pg_class c ON c.oid = tree.relid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "ORDER BY tree.level, n.nspname, c.relname"
)

#: Every index of the relations of `_TREE`: its columns (a key or included column's name, or
#: the text of an expression), which of them are plain columns, its predicate, whether it
#: is valid and which index it is attached to (a partition's index to its parent's).
_INDEXES = text(
    "SELECT CAST(i.indrelid AS bigint) AS relid, CAST(i.indexrelid AS bigint) AS oid, "
    "c.relname AS name, i.indisvalid AS valid, i.indnkeyatts AS key_count, "
    "pg_get_indexdef(i.indexrelid) AS definition, "
    "ARRAY(SELECT COALESCE(a.attname, pg_get_indexdef(i.indexrelid, CAST(k.n AS int), true)) "
    "      FROM unnest(CAST(i.indkey AS int2[])) WITH ORDINALITY AS k(attnum, n) "
    "      LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
    "      ORDER BY k.n) AS columns, "
    "ARRAY(SELECT k.attnum <> 0 FROM unnest(CAST(i.indkey AS int2[])) WITH ORDINALITY "
    "      AS k(attnum, n) ORDER BY k.n) AS plain, "
    "pg_get_expr(i.indpred, i.indrelid) AS predicate, "
    "(SELECT CAST(h.inhparent AS bigint) FROM pg_inherits h WHERE h.inhrelid = i.indexrelid) "
    "AS attached_to "
    "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE i.indrelid = ANY(CAST(:relids AS oid[])) "
    "ORDER BY i.indnatts DESC, c.relname"
)


@dataclass(frozen=True)
class Relation:
    """A table of the target's tree: the target (`parent` None) or a table below it."""

    oid: int
    parent: int | None
    level: int
    kind: str  # pg_class.relkind: r table, p partitioned table, f foreign table
    schema: str
    name: str
    qualified: str

    @property
    def partitioned(self) -> bool:
        return self.kind == "p"


@dataclass(frozen=True)
class ExistingIndex:
    relid: int
    oid: int
    name: str
    valid: bool
    key_count: int
    definition: str
    columns: tuple[str, ...]
    plain: tuple[bool, ...]
    predicate: str
    attached_to: int | None


def tree(conn: Connection, settings: Settings) -> list[Relation]:
    """The target and every table below it, parents before children."""
    rows = conn.execute(_TREE, {"t": settings.target.regclass}).mappings()
    return [Relation(**r) for r in rows]


def _existing(conn: Connection, relations: Sequence[Relation]) -> list[ExistingIndex]:
    rows = conn.execute(_INDEXES, {"relids": [r.oid for r in relations]}).mappings()
    return [
        ExistingIndex(
            **{
                **r,
                "columns": tuple(r["columns"]),
                "plain": tuple(r["plain"]),
                "predicate": r["predicate"] or "",
            }
        )
        for r in rows
    ]


def _bare(sql: str) -> str:
    """SQL text without blanks, parentheses and identifier quotes, to compare shapes."""
    return re.sub(r'[\s()"]', "", sql)


def _by_age(settings: Settings, column: str) -> bool:
    age_from = settings.clean.age_from
    if age_from == "created_at":
        return column == "created_at"
    bare = _bare(column)  # COALESCE(age_from, created_at), a cast of age_from allowed
    start = f"COALESCE{age_from}"
    return bare.startswith(start) and bare[len(start) : len(start) + 1] in (",", ":")


def lacking(settings: Settings, keys: Keys, index: ExistingIndex) -> frozenset[str] | None:
    """The columns an arm's scan reads (`arm_columns()`) that `index` does not hold, as
    key or included columns; None when it does not lead to the arm at all (its leading key
    columns are not the keys, in any order, and then the age, or it is not partial on
    exactly `cleaned_at IS NULL`)."""
    n = len(keys)
    key_columns = index.columns[: index.key_count]
    if len(key_columns) <= n or _bare(index.predicate) != "cleaned_atISNULL":
        return None
    if set(key_columns[:n]) != set(keys) or not _by_age(settings, key_columns[n]):
        return None
    held = {c for c, plain in zip(index.columns, index.plain, strict=True) if plain}
    return arm_columns(settings) - held


def serves(settings: Settings, keys: Keys, index: ExistingIndex) -> bool:
    """Does `index` serve the arms of `keys` as the plan reads them: does it lead to the
    arm and hold every column the arm's scan reads, so that the scan can read it alone (an
    index-only scan)? Validity is the caller's."""
    return lacking(settings, keys, index) == frozenset()


def serving(conn: Connection, settings: Settings) -> dict[Keys, str | None]:
    """Per set of keys: the definition of a valid index on the target that serves its arms
    (`serves()`), or None. On a partitioned table that is the parent's index, valid once
    every partition has its own attached to it."""
    root = tree(conn, settings)[0]
    found = [i for i in _existing(conn, [root]) if i.valid]
    return {
        keys: next((i.definition for i in found if serves(settings, keys, i)), None)
        for keys in keys_of(settings)
    }


@dataclass(frozen=True)
class Serving:
    """The indexes the arms are read through: by name on the target, and the relations of its
    tree (a partition's own indexes have names of their own)."""

    names: frozenset[str]
    relations: frozenset[str]
    partitioned: bool
    #: the tree's other indexes (an older one the planner may take instead, with a filter)
    others: frozenset[str] = frozenset()


def serving_indexes(conn: Connection, settings: Settings) -> Serving | None:
    """The serving indexes, when every arm has one (`complete`); else None."""
    relations = tree(conn, settings)
    root = relations[0]
    every = _existing(conn, relations)
    found = [i for i in every if i.valid and i.relid == root.oid]
    names = []
    for keys in keys_of(settings):
        index = next((i for i in found if serves(settings, keys, i)), None)
        if index is None:
            return None
        names.append(index.name)
    attached = {i.name for i in every if i.attached_to is not None}  # partitions' own
    others = frozenset(i.name for i in every) - set(names) - attached
    return Serving(frozenset(names), frozenset(r.name for r in relations), root.partitioned, others)


def complete(conn: Connection, settings: Settings) -> bool:
    """Does every arm have its index (so a run may go through them)?"""
    return all(definition is not None for definition in serving(conn, settings).values())


# --- advice -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Advice:
    """For one set of keys: the index that serves its arms, or the statements to run, in
    order, to build one without blocking writes (and what is already under way)."""

    keys: Keys
    serving: str | None
    steps: tuple[str, ...] = ()
    #: the target is partitioned: `steps` build the index partition by partition
    partitioned: bool = False
    #: partitions (of `partitions`) whose index is already built and attached
    attached: int = 0
    partitions: int = 0
    #: a valid index that leads to the arm but lacks columns the scan reads, and those
    near: str | None = None
    lacks: tuple[str, ...] = ()
    #: foreign partitions (they hold no index: the parent's is then built, not attached)
    foreign: tuple[str, ...] = ()


def advice(conn: Connection, settings: Settings) -> list[Advice]:
    """Per set of keys, in the order of the file: the serving index, or how to build one."""
    relations = tree(conn, settings)
    root = relations[0]
    existing = _existing(conn, relations)
    on_root = [i for i in existing if i.relid == root.oid]
    out = []
    for keys in keys_of(settings):
        served = next((i for i in on_root if i.valid and serves(settings, keys, i)), None)
        if served is not None:
            out.append(Advice(keys, served.definition, partitioned=root.partitioned))
            continue
        if root.partitioned:
            found = _partitioned(settings, keys, relations, existing)
        else:
            found = Advice(keys, None, _plain(settings, keys, root, on_root))
        near = [(i, lacking(settings, keys, i)) for i in on_root if i.valid]
        near_by = next(((i, lacks) for i, lacks in near if lacks), None)
        if near_by is not None:
            index, lacks = near_by
            found = replace(
                found, near=_qualified(root.schema, index.name), lacks=tuple(sorted(lacks))
            )
        out.append(found)
    return out


def _table(settings: Settings, relation: Relation) -> Table:
    """The dispatches table's columns under the name of `relation` (a partition's)."""
    base = dispatches_table(settings.target)
    return base.to_metadata(MetaData(), schema=relation.schema, name=relation.name)


def _index(settings: Settings, keys: Keys, relation: Relation, *, concurrently: bool) -> Index:
    return policy_indexes(_table(settings, relation), settings, concurrently=concurrently)[keys]


def _create(index: Index, *, only: bool = False) -> str:
    sql = str(CreateIndex(index).compile(dialect=_DIALECT))
    if only:  # SQLAlchemy has no ON ONLY: the parent's index alone, built by attaching
        table = index.table
        assert table is not None
        on = f" ON {_DIALECT.identifier_preparer.format_table(table)} ("
        assert on in sql, sql
        sql = sql.replace(on, on.replace(" ON ", " ON ONLY ", 1), 1)
    return f"{sql};"


def _qualified(schema: str, name: str) -> str:
    return quoted_name(schema, name)


def _plain(
    settings: Settings, keys: Keys, root: Relation, on_root: Sequence[ExistingIndex]
) -> tuple[str, ...]:
    """CREATE INDEX CONCURRENTLY, after dropping what holds its name (an invalid index left
    by a CREATE INDEX CONCURRENTLY that failed, or an older shape that no longer serves)."""
    index = _index(settings, keys, root, concurrently=True)
    steps = []
    if any(i.name == index.name for i in on_root):
        steps.append(f"DROP INDEX CONCURRENTLY {_qualified(root.schema, str(index.name))};")
    steps.append(_create(index))
    return tuple(steps)


def _partitioned(
    settings: Settings,
    keys: Keys,
    relations: Sequence[Relation],
    existing: Sequence[ExistingIndex],
) -> Advice:
    """The documented way to index a partitioned table without blocking writes: an index ON
    ONLY each partitioned table (invalid until complete), CREATE INDEX CONCURRENTLY on each
    leaf partition, then ALTER INDEX ... ATTACH PARTITION from the leaves up; PostgreSQL
    marks each parent's index valid once all its partitions' indexes are attached. Where
    that is under way (an index of the job's name on a parent, partitions already
    attached), only the steps still missing; a partition attached later to a table whose
    index exists gets its index from PostgreSQL itself (ATTACH PARTITION builds it)."""
    by_relation: dict[int, list[ExistingIndex]] = {}
    for index in existing:
        by_relation.setdefault(index.relid, []).append(index)
    creates: list[str] = []
    attaches: list[tuple[int, str]] = []
    #: per relation: the oid of its index for these keys when one exists (None: to create)
    chosen: dict[int, int | None] = {}
    names: dict[int, str] = {}
    attached = partitions = 0
    for relation in relations:
        if relation.kind not in ("p", "r"):
            continue  # a foreign partition can hold no index
        on_it = by_relation.get(relation.oid, [])
        wanted = _index(settings, keys, relation, concurrently=not relation.partitioned)
        parent_index = chosen.get(relation.parent) if relation.parent is not None else None
        if relation.parent is not None:
            partitions += not relation.partitioned
            mine = next((i for i in on_it if parent_index and i.attached_to == parent_index), None)
            if mine is not None:  # attached already (by these steps, or by ATTACH PARTITION)
                chosen[relation.oid], names[relation.oid] = mine.oid, mine.name
                attached += not relation.partitioned
                continue
        same_name = next((i for i in on_it if i.name == wanted.name), None)
        own = _qualified(relation.schema, str(wanted.name))
        if (
            same_name is not None
            and serves(settings, keys, same_name)
            and (relation.partitioned or same_name.valid)
        ):
            chosen[relation.oid] = same_name.oid  # built already, to be attached
        else:
            if same_name is not None:
                drop = "DROP INDEX" if relation.partitioned else "DROP INDEX CONCURRENTLY"
                creates.append(f"{drop} {own};")
            creates.append(_create(wanted, only=relation.partitioned))
            chosen[relation.oid] = None
        names[relation.oid] = str(wanted.name)
        if relation.parent is not None:
            parent = next(r for r in relations if r.oid == relation.parent)
            target = _qualified(parent.schema, names[parent.oid])
            attaches.append((relation.level, f"ALTER INDEX {target} ATTACH PARTITION {own};"))
    # the leaves first: a parent's index is valid once all of its partitions' are attached
    ordered = [sql for _, sql in sorted(attaches, key=lambda a: -a[0])]
    steps = (*creates, *ordered)
    foreign = tuple(r.qualified for r in relations if r.kind == "f")
    if foreign and not any(
        i.name == names[relations[0].oid] for i in by_relation.get(relations[0].oid, [])
    ):
        # A foreign partition holds no index, so attaching never makes the parent's valid.
        # CREATE INDEX on the parent (not ONLY) does: it skips the foreign partition and
        # attaches the indexes built concurrently on the others (it builds none itself).
        root = _index(settings, keys, relations[0], concurrently=False)
        steps = (*(c for c in creates if " ON ONLY " not in c), _create(root))
    return Advice(
        keys,
        None,
        steps,
        partitioned=True,
        attached=attached,
        partitions=partitions,
        foreign=foreign,
    )
