"""What the trail says about a period, for the report (`checks/evidence.py`): the runs that
started in it, the rows each day's chunks cleaned per policy, the legal holds active now and
those released in it. Read-only; texts bounded as `audit list` reads them; a recorded document
of an unexpected shape (an imported row) is left out of a sum, never a traceback.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Numeric, Text, cast, func, literal_column, select

from dispatch_retention.trail import listing
from dispatch_retention.trail.audit_tables import DOCUMENT_BYTES, AuditTables

#: The most runs one report lists (a year of nightly runs of 16 shards is 5,840).
MAX_RUNS = 50_000


def runs(conn: Connection, tables: AuditTables, since: datetime) -> list[dict[str, Any]]:
    """The runs started since `since`, oldest first, as `audit list` shows them, each with
    the oldest overdue age its plan recorded (None: not recorded)."""
    found = listing.list_runs(conn, tables, since=since, limit=MAX_RUNS)
    runs_table = tables.runs
    plans = conn.execute(
        select(runs_table.c.run_id, runs_table.c.policies).where(
            runs_table.c.started_at >= since,
            func.octet_length(cast(runs_table.c.policies, Text)) <= DOCUMENT_BYTES,
        )
    )
    oldest = {str(run_id): oldest_due_at(policies) for run_id, policies in plans}
    for run in found:
        run["oldest_due_at"] = oldest.get(run["run_id"])
    return sorted(found, key=lambda r: r["started_at"])


def oldest_due_at(policies: Any) -> str | None:
    """The oldest due row's age stamp a plan recorded (its earliest `oldest_due_at` over the
    policies), or None where the plan recorded none (a run before this version, or none
    due)."""
    if not isinstance(policies, list):
        return None
    stamps = [
        p["oldest_due_at"]
        for p in policies
        if isinstance(p, dict) and isinstance(p.get("oldest_due_at"), str)
    ]
    return min(stamps) if stamps else None


def cleaned_per_day(conn: Connection, tables: AuditTables, since: datetime) -> list[dict[str, Any]]:
    """Rows the chunks of kind `clean` cleaned since `since`, per UTC day and policy (the
    chunk's `by_policy`), oldest first."""
    chunks = tables.chunks
    entry = func.jsonb_each(chunks.c.by_policy).table_valued("key", "value").alias("entry")
    day = func.to_char(func.timezone("UTC", chunks.c.cleaned_at), "YYYY-MM-DD").label("day")
    query = (
        select(day, entry.c.key, func.sum(cast(entry.c.value, Numeric)))
        .select_from(chunks.join(entry, literal_column("true")))
        .where(
            chunks.c.kind == "clean",
            chunks.c.cleaned_at >= since,
            func.jsonb_typeof(chunks.c.by_policy) == "object",
            func.jsonb_typeof(entry.c.value) == "number",
        )
        .group_by(day, entry.c.key)
        .order_by(day, entry.c.key)
    )
    return [
        {"day": d, "policy": str(name), "rows": int(rows)} for d, name, rows in conn.execute(query)
    ]


def holds(
    conn: Connection, tables: AuditTables, since: datetime, *, member_ids: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The holds active now, and those released since `since`; `member_ids` only when
    asked (`report --include-member-ids`)."""
    h = tables.holds
    columns = [
        h.c.hold_id,
        h.c.member_id,
        h.c.reason,
        h.c.created_at,
        h.c.created_by,
        h.c.requested_by,
        h.c.released_at,
        h.c.released_by,
    ]
    active, released = [], []
    query = (
        select(*columns)
        .where((h.c.released_at.is_(None)) | (h.c.released_at >= since))
        .order_by(h.c.hold_id)
    )
    for row in conn.execute(query).mappings():
        hold = {
            "hold_id": int(row["hold_id"]),
            **({"member_id": int(row["member_id"])} if member_ids else {}),
            "reason": row["reason"],
            "since": row["created_at"],
            "by": row["created_by"],
            "requested_by": row["requested_by"],
        }
        if row["released_at"] is None:
            active.append(hold)
        else:
            released.append(
                {**hold, "released_at": row["released_at"], "released_by": row["released_by"]}
            )
    return active, released


def last_cleaned_at(conn: Connection, tables: AuditTables) -> datetime | None:
    """When a chunk last cleaned a row (of any kind)."""
    value = conn.execute(select(func.max(tables.chunks.c.cleaned_at))).scalar_one()
    return value if isinstance(value, datetime) else None
