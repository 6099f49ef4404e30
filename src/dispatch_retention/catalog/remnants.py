"""Where cleaned values may still physically exist in the database: the dead row versions of
the target's tables (and their TOAST tables) that VACUUM has not yet reclaimed, and when each
table was last vacuumed. From PostgreSQL's statistics views (`pg_stat_all_tables`), which any
role may read; the counts are the server's estimates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from dispatch_retention.catalog import indexes
from dispatch_retention.config import Settings

_STATS = text(
    "SELECT format('%I.%I', n.nspname, c.relname) AS name, "
    "COALESCE(s.n_live_tup, 0) AS live, COALESCE(s.n_dead_tup, 0) AS dead, "
    "GREATEST(s.last_vacuum, s.last_autovacuum) AS vacuumed, "
    "COALESCE(t.n_dead_tup, 0) AS toast_dead, "
    "GREATEST(t.last_vacuum, t.last_autovacuum) AS toast_vacuumed "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid "
    "LEFT JOIN pg_stat_all_tables t ON t.relid = c.reltoastrelid "
    "WHERE c.oid = ANY(CAST(:oids AS oid[])) ORDER BY 1"
)


@dataclass(frozen=True)
class TableRemnants:
    """One table that holds rows (the target, or a partition of it)."""

    name: str
    live: int
    dead: int
    vacuumed: datetime | None  # the later of the last VACUUM and the last autovacuum
    toast_dead: int
    toast_vacuumed: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tables(conn: Connection, settings: Settings) -> list[TableRemnants]:
    """Each table of the target's tree that holds rows (a partitioned parent holds none)."""
    leaves = [r.oid for r in indexes.tree(conn, settings) if not r.partitioned]
    rows = conn.execute(_STATS, {"oids": leaves}).mappings()
    return [TableRemnants(**{k: v for k, v in r.items()}) for r in rows]
