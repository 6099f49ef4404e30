"""The target table's shape (`rule.shape.Shape`) read from the catalog once when the job
connects.

Besides the columns, `read()` takes what decides whether the job can clean the table at
all (`target.column_problems` refuses what it cannot): how each column may be written
(generated, identity, a domain whose constraints PostgreSQL checks on every write), the
tables below it (inheritance children and partitions: an UPDATE of the target updates their
rows, but sets only the target's columns, so a child's own column is never stripped) and
its rules on UPDATE (PostgreSQL refuses the job's data-modifying WITH on such a table),
its unique indexes (a `clean.replace` value written into every row of one, or NULL into
one whose NULLs are NOT DISTINCT, would violate it at the second row), and its CHECK and
exclusion constraints (`target.constraint_problems` tells which refuse what cleaning
writes).

`read()` reads the catalog only (no row).
"""

from __future__ import annotations

from sqlalchemy import Connection, TextClause, text

from dispatch_retention.rule.shape import (
    KINDS,
    Below,
    ColumnShape,
    Constraint,
    Kind,
    Rule,
    Shape,
    Unique,
)

_READ = text(
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS sql_type, "
    "t.oid AS type_oid, t.typname, t.typtype, n.nspname AS type_schema, "
    "NOT a.attnotnull AS nullable, "
    "a.attgenerated <> '' AS generated, a.attidentity AS identity, "
    "ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid "
    "ORDER BY e.enumsortorder) AS labels "
    "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
    "JOIN pg_namespace n ON n.oid = t.typnamespace "
    "WHERE a.attrelid = :oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
)


#: Every table below the target (pg_inherits holds inheritance children and partitions
#: alike), with its own columns (those its parents in the tree lack: the table that adds a
#: column names it, not each table below that inherits it), its NOT NULL columns and those
#: an UPDATE may not set. Catalog only: a role that may not use a child's schema sees it.
_BELOW = text(
    "WITH RECURSIVE tree(relid, level) AS ("
    "SELECT CAST(:oid AS oid), 0 "
    "UNION SELECT i.inhrelid, tree.level + 1 FROM pg_inherits i "
    "JOIN tree ON i.inhparent = tree.relid), "
    "below AS (SELECT relid, min(level) AS level FROM tree WHERE level > 0 GROUP BY relid), "
    "cols AS (SELECT a.attrelid, a.attnum, CAST(a.attname AS text) AS name, a.attnotnull, "
    "a.attgenerated <> '' OR a.attidentity = 'a' AS unsettable, "
    "NOT EXISTS (SELECT FROM pg_inherits i JOIN pg_attribute p ON p.attrelid = i.inhparent "
    "WHERE i.inhrelid = a.attrelid AND i.inhparent IN (SELECT relid FROM tree) "
    "AND p.attname = a.attname AND p.attnum > 0 AND NOT p.attisdropped) AS own "
    "FROM pg_attribute a JOIN below ON below.relid = a.attrelid "
    "WHERE a.attnum > 0 AND NOT a.attisdropped) "
    "SELECT format('%I.%I', n.nspname, c.relname) AS relation, "
    "ARRAY(SELECT name FROM cols WHERE attrelid = c.oid AND own ORDER BY attnum) AS own, "
    "ARRAY(SELECT name FROM cols WHERE attrelid = c.oid AND attnotnull ORDER BY attnum) "
    "AS not_null, "
    "ARRAY(SELECT name FROM cols WHERE attrelid = c.oid AND unsettable ORDER BY attnum) "
    "AS unsettable "
    "FROM below JOIN pg_class c ON c.oid = below.relid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace ORDER BY below.level, relation"
)

#: The target's own rules on UPDATE (ev_type 2), not disabled ones: rules of the tables
#: below it do not fire on an UPDATE of the target (`risks.copy_risks` lists these too).
RULES = text(
    "SELECT rulename AS name, is_instead, CAST(ev_qual AS text) <> '<>' AS conditional "
    "FROM pg_rewrite WHERE ev_class = CAST(:t AS regclass) AND ev_type = '2' "
    "AND rulename <> '_RETURN' AND ev_enabled <> 'D' ORDER BY rulename"
)


#: The target and every table below it, each once, with its depth.
_TREE = (
    "WITH RECURSIVE tree(relid, level) AS ("
    "SELECT CAST(:oid AS oid), 0 "
    "UNION SELECT i.inhrelid, tree.level + 1 FROM pg_inherits i "
    "JOIN tree ON i.inhparent = tree.relid) "
)


def _unique_query(nulls_not_distinct: bool) -> TextClause:
    """The plain, whole unique indexes of the target and of every table below it; whether
    their NULLs are NOT DISTINCT where the server has the notion (PostgreSQL 15+)."""
    flag = "x.indnullsnotdistinct" if nulls_not_distinct else "false"
    return text(
        _TREE + "SELECT format('%I.%I', n.nspname, c.relname) AS relation, "
        "quote_ident(ic.relname) AS index, "
        "ARRAY(SELECT CAST(a.attname AS text) "
        "FROM unnest(x.indkey) WITH ORDINALITY k(attnum, o) "
        "JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum ORDER BY k.o) "
        f"AS columns, {flag} AS nulls_not_distinct "
        "FROM (SELECT relid, min(level) AS level FROM tree GROUP BY relid) t "
        "JOIN pg_index x ON x.indrelid = t.relid JOIN pg_class c ON c.oid = x.indrelid "
        "JOIN pg_class ic ON ic.oid = x.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE x.indisunique AND x.indpred IS NULL AND x.indexprs IS NULL "
        "ORDER BY t.level, relation, index"
    )


#: The CHECK constraints of the target and of every table below it where they are declared
#: (`conislocal`: a child's copy of its parent's is the parent's), and their exclusion
#: constraints that are not partial, once (a partition's copy has a `conparentid`). Each
#: with its columns in its order (attnum 0, a whole-row reference or an expression, as
#: ''), their quoted names and types, a CHECK's expression, an exclusion constraint's
#: operators and the columns its index reads (its expressions' too: `pg_depend`).
_CONSTRAINTS = text(
    _TREE + "SELECT format('%I.%I', n.nspname, c.relname) AS relation, "
    "CAST(k.conname AS text) AS name, "
    "CASE k.contype WHEN 'c' THEN 'check' ELSE 'exclusion' END AS kind, "
    "k.convalidated AS validated, "
    "CASE k.contype WHEN 'c' THEN pg_get_expr(k.conbin, k.conrelid) ELSE '' END AS expression, "
    "ARRAY(SELECT coalesce(CAST(a.attname AS text), '') "
    "FROM unnest(k.conkey) WITH ORDINALITY u(attnum, o) LEFT JOIN pg_attribute a "
    "ON a.attrelid = k.conrelid AND a.attnum = u.attnum AND u.attnum > 0 ORDER BY u.o) "
    "AS columns, "
    "ARRAY(SELECT coalesce(quote_ident(a.attname), '') "
    "FROM unnest(k.conkey) WITH ORDINALITY u(attnum, o) LEFT JOIN pg_attribute a "
    "ON a.attrelid = k.conrelid AND a.attnum = u.attnum AND u.attnum > 0 ORDER BY u.o) "
    "AS quoted, "
    "ARRAY(SELECT coalesce(format_type(a.atttypid, a.atttypmod), '') "
    "FROM unnest(k.conkey) WITH ORDINALITY u(attnum, o) LEFT JOIN pg_attribute a "
    "ON a.attrelid = k.conrelid AND a.attnum = u.attnum AND u.attnum > 0 ORDER BY u.o) "
    "AS types, "
    "ARRAY(SELECT format('OPERATOR(%I.%s)', opn.nspname, op.oprname) "
    "FROM unnest(k.conexclop) WITH ORDINALITY e(opr, o) "
    "JOIN pg_operator op ON op.oid = e.opr "
    "JOIN pg_namespace opn ON opn.oid = op.oprnamespace ORDER BY e.o) AS operators, "
    "ARRAY(SELECT CAST(a.attname AS text) FROM pg_depend d JOIN pg_attribute a "
    "ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid "
    "WHERE d.classid = CAST('pg_class' AS regclass) AND d.objid = k.conindid "
    "AND d.refclassid = CAST('pg_class' AS regclass) AND d.refobjsubid > 0) AS indexed "
    "FROM (SELECT relid, min(level) AS level FROM tree GROUP BY relid) t "
    "JOIN pg_constraint k ON k.conrelid = t.relid JOIN pg_class c ON c.oid = k.conrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE (k.contype = 'c' AND k.conislocal) OR (k.contype = 'x' AND k.conparentid = 0 "
    "AND NOT EXISTS (SELECT FROM pg_index x WHERE x.indexrelid = k.conindid "
    "AND x.indpred IS NOT NULL)) "
    "ORDER BY t.level, relation, name"
)


def read(conn: Connection, oid: int) -> Shape:
    """The columns of the relation `oid` (a domain is read as what it is; an array or any
    other type is `other`: the job then only ever writes NULL or a replacement into it),
    the tables below it, its rules on UPDATE, unique indexes, CHECK and exclusion
    constraints."""
    columns = {}
    for row in conn.execute(_READ, {"oid": oid}).mappings():
        is_enum = row["typtype"] == "e"
        kind: Kind = "enum" if is_enum else KINDS.get(str(row["typname"]), "other")
        columns[str(row["attname"])] = ColumnShape(
            name=str(row["attname"]),
            sql_type=str(row["sql_type"]),
            kind=kind,
            nullable=bool(row["nullable"]),
            enum_name=str(row["typname"]) if is_enum else None,
            enum_schema=str(row["type_schema"]) if is_enum else None,
            labels=tuple(row["labels"]) if is_enum else (),
            type_name=str(row["typname"]),
            generated=bool(row["generated"]),
            identity={"a": "always", "d": "by default"}.get(str(row["identity"]), ""),
            domain=int(row["type_oid"]) if row["typtype"] == "d" else None,
        )
    below = tuple(
        Below(
            str(row["relation"]),
            tuple(row["own"]),
            tuple(row["not_null"]),
            tuple(row["unsettable"]),
        )
        for row in conn.execute(_BELOW, {"oid": oid}).mappings()
    )
    rules = tuple(
        Rule(str(r["name"]), bool(r["is_instead"]), bool(r["conditional"]))
        for r in conn.execute(RULES, {"t": str(oid)}).mappings()
    )
    version = conn.dialect.server_version_info or (0,)
    unique = tuple(
        Unique(
            str(r["relation"]), str(r["index"]), tuple(r["columns"]), bool(r["nulls_not_distinct"])
        )
        for r in conn.execute(_unique_query(version >= (15,)), {"oid": oid}).mappings()
    )
    constraints = tuple(
        Constraint(
            relation=str(r["relation"]),
            name=str(r["name"]),
            kind=str(r["kind"]),
            columns=tuple(r["columns"]),
            reads=frozenset(r["columns"]) | frozenset(r["indexed"]),
            quoted=tuple(r["quoted"]),
            types=tuple(r["types"]),
            expression=str(r["expression"]),
            operators=tuple(r["operators"]),
            validated=bool(r["validated"]),
        )
        for r in conn.execute(_CONSTRAINTS, {"oid": oid}).mappings()
    )
    return Shape(columns, below, rules, unique, constraints)
