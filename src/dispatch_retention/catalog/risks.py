"""Copy risks: where the cleaning UPDATE can copy personal data to, or write it back from.

Stripping a row is only as good as what the database does around the UPDATE (docs/architecture.md,
"What the job refuses and what it reports"). Read from the catalog, never from a row, for the
resolved target table:

- triggers that fire on UPDATE (not the internal ones of foreign keys, not disabled ones):
  a BEFORE row trigger may skip the row (RETURN NULL) or put a personal value back, an AFTER
  trigger may copy the old row elsewhere (a history table); the row triggers of the tables
  below the target (partitions, inheritance children) count too, as their rows are updated;
- rules ON UPDATE (DO ALSO copies, DO INSTEAD replaces the UPDATE);
- publications that include the table (or a partition or ancestor of it) and publish
  updates: each cleaned row goes to the subscribers, whose copies live by their retention;
- a replica identity that carries personal data: `REPLICA IDENTITY FULL` (the WAL carries
  the old values of each cleaned row in full), or an index (`USING INDEX`, or the primary
  key under `DEFAULT`) holding a column of `clean.columns` (cleaning changes the key, so the
  WAL carries the old key, personal value and all). Like the others, listed whether or not
  a publication or a slot reads the table today: one can be added without the job knowing.

A reviewed risk is named in the config's `[acknowledged]` table (object name = reason; the
key for the replica identity, of the target and of every table below it, is
`replica_identity`) and carries that reason. `db check` reports
every risk, `run` logs them (`copy_risk`) and records them. Nothing here writes, and no
detail holds a row value: only object names and what they may do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, text

from dispatch_retention.catalog import describe
from dispatch_retention.config import Settings

#: The key of `[acknowledged]` for REPLICA IDENTITY FULL.
REPLICA_IDENTITY = "replica_identity"

# pg_trigger.tgtype bits (src/include/catalog/pg_trigger.h); UPDATE is 16
_ROW, _BEFORE, _INSTEAD = 1, 2, 64

#: The target and every table below it: partitions and inheritance children alike (both
#: are in pg_inherits, and an UPDATE of the target updates their rows too); `level` 0 is
#: the target itself.
_TREE = (
    "WITH RECURSIVE tree(relid, level) AS ("
    "SELECT CAST(CAST(:t AS regclass) AS oid), 0 "
    "UNION SELECT i.inhrelid, tree.level + 1 FROM pg_inherits i "
    "JOIN tree ON i.inhparent = tree.relid) "
)

# Row triggers of partitions fire when the target is updated; their statement triggers and
# the clones of the target's own row triggers (tgparentid <> 0) are not listed again.
_TRIGGERS = text(
    _TREE + "SELECT tg.tgname AS name, tg.tgtype AS tgtype, tree.level = 0 AS on_target, "
    "format('%I.%I', rn.nspname, c.relname) AS relation, "
    "format('%I.%I', fn.nspname, p.proname) AS function "
    "FROM pg_trigger tg JOIN tree ON tree.relid = tg.tgrelid "
    "JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace rn ON rn.oid = c.relnamespace "
    "JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace fn ON fn.oid = p.pronamespace "
    "WHERE NOT tg.tgisinternal AND tg.tgenabled <> 'D' AND (tg.tgtype & 16) <> 0 "
    "AND (tree.level = 0 OR (tg.tgparentid = 0 AND (tg.tgtype & 1) <> 0)) "
    "ORDER BY tree.level, relation, tg.tgname"
)

# pg_publication_tables expands FOR ALL TABLES and FOR TABLES IN SCHEMA, and lists either
# the partitions or the root of a partitioned table (publish_via_partition_root).
_PUBLICATIONS = text(
    _TREE + ", rels AS (SELECT relid FROM tree "
    "UNION SELECT relid FROM pg_partition_ancestors(CAST(:t AS regclass))) "
    "SELECT DISTINCT pt.pubname AS name FROM pg_publication_tables pt "
    "JOIN pg_publication p ON p.pubname = pt.pubname "
    "JOIN pg_namespace n ON n.nspname = pt.schemaname "
    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename "
    "JOIN rels ON rels.relid = c.oid "
    "WHERE p.pubupdate ORDER BY pt.pubname"
)

# The replica identity of the target and of every table below it, where it carries personal
# data to logical decoding: FULL (every old value), or an index (USING INDEX, or the primary
# key under DEFAULT) holding a column cleaning changes (`:personal`): the WAL then carries
# the old key, that column's old value among it. NOTHING and keys over kept columns carry
# none.
_REPLICA_IDENTITY = text(
    _TREE + "SELECT format('%I.%I', n.nspname, c.relname) AS relation, "
    "c.relreplident = 'f' AS full, quote_ident(ic.relname) AS index, "
    "ARRAY(SELECT CAST(a.attname AS text) FROM pg_attribute a WHERE a.attrelid = c.oid "
    "AND a.attnum = ANY(i.indkey) AND a.attname = ANY(CAST(:personal AS text[])) "
    "ORDER BY a.attnum) AS personal "
    "FROM (SELECT relid, min(level) AS level FROM tree GROUP BY relid) t "
    "JOIN pg_class c ON c.oid = t.relid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN pg_index i ON i.indrelid = c.oid AND c.relreplident <> 'f' "
    "AND ((c.relreplident = 'i' AND i.indisreplident) "
    "OR (c.relreplident = 'd' AND i.indisprimary)) "
    "LEFT JOIN pg_class ic ON ic.oid = i.indexrelid "
    "WHERE c.relreplident = 'f' OR i.indexrelid IS NOT NULL ORDER BY t.level, relation"
)

#: How many relations a replica identity risk names (a partitioned table may have many).
_NAMED = 5

# A foreign table below the target (a partition on another server): its rows are updated
# there, by rules and triggers this job cannot see.
_FOREIGN = text(
    _TREE + "SELECT format('%I.%I', n.nspname, c.relname) AS relation "
    "FROM pg_class c JOIN tree ON tree.relid = c.oid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind = 'f' ORDER BY relation"
)


@dataclass(frozen=True)
class Risk:
    """A place the cleaning UPDATE can copy personal data to or write it back from."""

    kind: str  # "trigger" | "rule" | "publication" | "replica_identity" | "foreign_table"
    name: str  # the object's name; the key in [acknowledged]
    when: str | None  # "BEFORE" | "AFTER" | "INSTEAD OF" for triggers, else None
    detail: str  # what it may do, one sentence, no personal data
    acknowledged: str | None  # the reason from [acknowledged], None when not reviewed

    def as_dict(self) -> dict[str, Any]:
        """For logs and JSON."""
        return asdict(self)


def copy_risks(conn: Connection, settings: Settings) -> list[Risk]:
    """Every copy risk of the target (`settings.target.table`, resolved by
    `target.resolve_settings`): triggers, rules, publications, replica identity, in that
    order, each with its reason from `[acknowledged]` when it has one."""
    params = {"t": settings.target.regclass}
    found: list[tuple[str, str, str | None, str]] = []
    for row in conn.execute(_TRIGGERS, params).mappings():
        when, effect = _trigger_effect(int(row["tgtype"]))
        level = "row-level" if int(row["tgtype"]) & _ROW else "statement-level"
        where = "" if row["on_target"] else f"on partition {row['relation']}, "
        detail = f"{where}{level}, calls {row['function']}(): {effect}"
        found.append(("trigger", str(row["name"]), when, detail))
    for row in conn.execute(describe.RULES, params).mappings():
        effect = (
            "DO INSTEAD: replaces the cleaning UPDATE, so rows may stay uncleaned and "
            "personal data may be copied elsewhere"
            if row["is_instead"]
            else "DO ALSO: runs more statements with each cleaning UPDATE, which may copy "
            "the old row's personal data elsewhere"
        )
        found.append(("rule", str(row["name"]), None, effect))
    for row in conn.execute(_PUBLICATIONS, params).mappings():
        found.append(
            (
                "publication",
                str(row["name"]),
                None,
                "subscribers receive each cleaned row; their copies keep personal data per "
                "their own retention",
            )
        )
    identity = _replica_identity(conn, settings)
    if identity:
        found.append((REPLICA_IDENTITY, REPLICA_IDENTITY, None, identity))
    for relation in conn.execute(_FOREIGN, params).scalars():
        found.append(
            (
                "foreign_table",
                str(relation),
                None,
                "a foreign table below the target: its rows are updated on another server, "
                "whose triggers, rules and copies this job cannot see",
            )
        )
    return [
        Risk(kind, name, when, detail, settings.acknowledged.get(name))
        for kind, name, when, detail in found
    ]


def _replica_identity(conn: Connection, settings: Settings) -> str | None:
    """What the replica identities of the target and the tables below it ship of a cleaned
    row to logical decoding (one risk, acknowledged as `replica_identity`), or None."""
    params = {"t": settings.target.regclass, "personal": list(settings.clean.columns)}
    full, keyed = [], []
    for row in conn.execute(_REPLICA_IDENTITY, params).mappings():
        if row["full"]:
            full.append(str(row["relation"]))
        elif row["personal"]:
            columns = ", ".join(row["personal"])
            keyed.append(f"{row['relation']} (index {row['index']} holds {columns})")
    said = []
    if full:
        said.append(
            f"REPLICA IDENTITY FULL on {_some(full)}: the WAL carries each cleaned row's old "
            "values in full (logical decoding, CDC)"
        )
    if keyed:
        said.append(
            f"the replica identity of {_some(keyed)} holds a personal column: the WAL carries "
            "its old value for each cleaned row (logical decoding, CDC)"
        )
    return "; ".join(said) or None


def _some(names: list[str]) -> str:
    """At most `_NAMED` names, and how many more."""
    more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
    return ", ".join(names[:_NAMED]) + more


def _trigger_effect(tgtype: int) -> tuple[str, str]:
    """BEFORE / AFTER / INSTEAD OF, and what such a trigger on UPDATE may do."""
    row = bool(tgtype & _ROW)
    if tgtype & _INSTEAD:
        return "INSTEAD OF", (
            "replaces the cleaning UPDATE, so rows may stay uncleaned and personal data may "
            "be copied elsewhere"
        )
    if tgtype & _BEFORE:
        if row:
            return "BEFORE", "may skip rows (RETURN NULL) or write personal columns back"
        return "BEFORE", "runs before each cleaning UPDATE and may copy personal data elsewhere"
    if row:
        return "AFTER", "may copy the old row's personal data elsewhere (e.g. a history table)"
    return "AFTER", (
        "may copy the old rows' personal data elsewhere (e.g. through a transition table)"
    )


def stale_acknowledgements(settings: Settings, risks: Iterable[Risk]) -> list[str]:
    """Names in `[acknowledged]` that match no risk (a dropped trigger, a typo), in the
    config's order."""
    names = {r.name for r in risks}
    return [name for name in settings.acknowledged if name not in names]


def updating(risks: Iterable[Risk]) -> list[Risk]:
    """What can leave a row of the cleaning UPDATE as it was, or write personal data back
    into it: the triggers and rules that fire on UPDATE of the target (or of a table below
    it), and foreign tables below it. Without any, a plain UPDATE cleans every row its
    WHERE matches."""
    return [r for r in risks if r.kind in ("trigger", "rule", "foreign_table")]
