"""The queries behind `audit list` and `audit show`: run records as the trail holds them,
read with bounded texts (a record written by an older version or by hand is shown, its
unreadable fields named, never trusted).
"""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    case,
    cast,
    func,
    literal_column,
    select,
    true,
)

from dispatch_retention.trail.audit_tables import (
    AuditTables,
    read_bounded,
    shown,
)

# --- reading the trail -----------------------------------------------------------------------
# The readers take a bounded amount of memory per run: texts are read at most to their
# bounds (`audit_tables.read_bounded`: a longer one, written before migration 0007, is cut and
# marked), and the runs of `audit list` a batch at a time. A recorded document of an
# unexpected shape (an imported row, an owner's write) is shown as far as it is readable,
# and what is not is named in `unreadable`, never a traceback.

#: What `audit list` shows of a run (all but its config and plan).
LISTED = (
    "run_id", "status", "trigger", "started_at", "finished_at", "due_rows", "held_rows",
    "waiting_grace_rows", "host", "shard", "tool_version", "db_user", "target_table",
    "planned_at", "config_path", "config_sha256", "options", "stopped_by", "error",
    "remaining_due_rows", "remaining_reason", "copy_risks",
)  # fmt: skip
#: A policy of a recorded plan: each field and the JSON type it has (`plans.Plan`).
PLAN_FIELDS: dict[str, type] = {
    "name": str, "retention_days": int, "cutoff": str, "grace_cutoff": str, "due_rows": int,
    "oldest_due_at": str,
}  # fmt: skip
#: missing from the plans of earlier versions (`oldest_due_at` also where none was due)
PLAN_OPTIONAL = ("grace_cutoff", "due_rows", "oldest_due_at")
#: A copy risk as recorded (`risks.Risk.as_dict`): each field and its JSON type.
RISK_FIELDS: dict[str, type] = {
    "kind": str, "name": str, "when": str, "detail": str, "acknowledged": str,
}  # fmt: skip
RISK_OPTIONAL = ("when", "detail", "acknowledged")
#: Names of unreadable parts listed one by one; past that, counted.
MAX_UNREADABLE = 20


def _totals(tables: AuditTables) -> Any:
    chunks = tables.chunks
    clean = chunks.c.kind == "clean"
    return (
        select(
            chunks.c.run_id,
            func.coalesce(func.sum(chunks.c.rows).filter(clean), 0).label("rows_cleaned"),
            func.coalesce(func.sum(chunks.c.rows).filter(~clean), 0).label("rows_recleaned"),
            func.count().label("chunks"),
        )
        .group_by(chunks.c.run_id)
        .subquery("totals")
    )


def list_runs(
    conn: Connection, tables: AuditTables, *, since: date | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    runs, totals = tables.runs, _totals(tables)
    query = (
        select(
            *read_bounded(runs, *LISTED),
            func.coalesce(totals.c.rows_cleaned, 0).label("rows_cleaned"),
            func.coalesce(totals.c.rows_recleaned, 0).label("rows_recleaned"),
            func.coalesce(totals.c.chunks, 0).label("chunks"),
        )
        .select_from(runs.outerjoin(totals, totals.c.run_id == runs.c.run_id))
        .order_by(runs.c.started_at.desc())
        .limit(limit)
    )
    if since is not None:
        query = query.where(runs.c.started_at >= since)
    rows = conn.execute(query.execution_options(yield_per=100)).mappings()
    return [_run_dict(shown(runs.name, row)) for row in rows]


def show_run(conn: Connection, tables: AuditTables, run_id: str) -> dict[str, Any] | None:
    runs, chunks = tables.runs, tables.chunks
    row = (
        conn.execute(select(*read_bounded(runs, *runs.c.keys())).where(runs.c.run_id == run_id))
        .mappings()
        .first()
    )
    if row is None:
        return None
    run = shown(runs.name, row)
    clean = chunks.c.kind == "clean"
    stats = conn.execute(
        select(
            func.coalesce(func.sum(chunks.c.rows).filter(clean), 0),
            func.count(),
            func.min(chunks.c.cleaned_at),
            func.max(chunks.c.cleaned_at),
            func.coalesce(func.sum(chunks.c.rows).filter(~clean), 0),
        ).where(chunks.c.run_id == run_id)
    ).one()
    document = _run_dict(
        {
            **run,
            "rows_cleaned": int(stats[0]),
            "chunks": int(stats[1]),
            "rows_recleaned": int(stats[4]),
        }
    )
    document["first_chunk_at"], document["last_chunk_at"] = stats[2], stats[3]
    unreadable: list[str] = []
    document["policies"] = _plan(
        run["policies"], _cleaned_per_policy(conn, tables, run_id), unreadable
    )
    document["copy_risks"] = _risks("copy_risks", run["copy_risks"], unreadable)
    if run.get("copy_risks_at_end") is not None:
        document["copy_risks_at_end"] = _risks(
            "copy_risks_at_end", run["copy_risks_at_end"], unreadable
        )
    document["config_text"] = run["config_text"]
    if unreadable:
        document["unreadable"] = _listed(unreadable)
    return document


def _cleaned_per_policy(conn: Connection, tables: AuditTables, run_id: str) -> dict[str, int]:
    """Rows cleaned per policy name, summed over the run's cleaning chunks: counts that are
    whole numbers (as the guards of 0006 keep them) of records that are objects."""
    chunks = tables.chunks
    counts = case(
        (func.jsonb_typeof(chunks.c.by_policy) == "object", chunks.c.by_policy),
        else_=cast(literal_column("'{}'"), chunks.c.by_policy.type),
    )
    each = func.jsonb_each_text(counts).table_valued("key", "value").render_derived("p")
    whole = each.c.value.regexp_match("^[0-9]{1,15}$")
    return {
        str(name): int(rows)
        for name, rows in conn.execute(
            select(each.c.key, func.sum(cast(case((whole, each.c.value)), BigInteger)))
            .select_from(chunks.join(each, true()))
            .where(chunks.c.run_id == run_id, chunks.c.kind == "clean")
            .group_by(each.c.key)
        )
        if rows is not None
    }


def _plan(policies: Any, cleaned: dict[str, int], unreadable: list[str]) -> list[dict[str, Any]]:
    """The recorded plan's policies, each with the rows cleaned under it; a field missing or
    of another type is None, and named in `unreadable`."""
    out = _entries("policies", policies, PLAN_FIELDS, PLAN_OPTIONAL, "policies", unreadable)
    for entry in out or ():
        name = entry["name"]
        entry["rows_cleaned"] = int(cleaned.get(name, 0)) if isinstance(name, str) else 0
    return out or []


def _risks(key: str, risks: Any, unreadable: list[str]) -> list[dict[str, Any]] | None:
    """The recorded copy risks, each field of another type None (and named in `unreadable`);
    None when not recorded (a run of an earlier version)."""
    out = _entries(key, risks, RISK_FIELDS, RISK_OPTIONAL, "copy risks", unreadable)
    if out:  # a list, read entry by entry
        for entry, risk in zip(out, risks, strict=True):
            if isinstance(risk, dict):  # what a later version may add, as it is
                entry |= {k: v for k, v in risk.items() if k not in RISK_FIELDS}
    return out


def _entries(
    key: str,
    found: Any,
    fields: dict[str, type],
    optional: tuple[str, ...],
    what: str,
    unreadable: list[str],
) -> list[dict[str, Any]] | None:
    """A recorded list of records (`_record` each); None when not recorded, empty (and named
    in `unreadable`) when it is no list."""
    if found is None:
        return None
    if not isinstance(found, list):
        unreadable.append(f"{key}: {_what(found)}, not a list of {what}")
        return []
    return [
        _record(f"{key}[{n}]", item, fields, optional, unreadable) for n, item in enumerate(found)
    ]


def _record(
    where: str,
    found: Any,
    fields: dict[str, type],
    optional: tuple[str, ...],
    unreadable: list[str],
) -> dict[str, Any]:
    """`found`'s `fields`, each of its JSON type or None (a number is never a bool)."""
    if not isinstance(found, dict):
        unreadable.append(f"{where}: {_what(found)}, not a record")
        return dict.fromkeys(fields)
    out: dict[str, Any] = {}
    for name, kind in fields.items():
        value = found.get(name)
        fits = isinstance(value, kind) and not isinstance(value, bool)
        if value is not None and not fits:
            unreadable.append(f"{where}.{name}: {_what(value)}, not {_KINDS[kind]}")
        elif value is None and name not in optional:
            unreadable.append(f"{where}.{name}: missing")
        out[name] = value if fits else None
    return out


_KINDS = {str: "a text", int: "a whole number"}


def _what(value: Any) -> str:
    """What a JSON value is, in words (never the value: an owner may have written anything)."""
    if isinstance(value, str) and value.startswith("[not shown:"):
        return value.strip("[]")
    kinds = {bool: "true or false", str: "a text", int: "a number", float: "a number"}
    kinds |= {list: "a list", dict: "a record", type(None): "null"}
    return kinds.get(type(value), "a value")


def _listed(found: list[str]) -> list[str]:
    if len(found) <= MAX_UNREADABLE:
        return found
    return [*found[:MAX_UNREADABLE], f"... and {len(found) - MAX_UNREADABLE} more"]


def _run_dict(row: Any) -> dict[str, Any]:
    out = {
        "run_id": str(row["run_id"]),
        "status": row["status"],
        "trigger": row["trigger"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "rows_cleaned": int(row["rows_cleaned"]),
        "rows_recleaned": int(row["rows_recleaned"]),
        "chunks": int(row["chunks"]),
        "due_rows": row["due_rows"],
        "held_rows": row["held_rows"],
        "waiting_grace_rows": row["waiting_grace_rows"],
        "host": row["host"],
        "shard": row["shard"],
        "tool_version": row["tool_version"],
        "db_user": row["db_user"],
        "target_table": row["target_table"],
        "planned_at": row["planned_at"],
        "config_path": row["config_path"],
        "config_sha256": row["config_sha256"],
        "options": row["options"],
        "stopped_by": row["stopped_by"],
        "error": row["error"],
        "remaining_due_rows": row["remaining_due_rows"],
        "remaining_reason": row["remaining_reason"],
        "copy_risks": row["copy_risks"],
    }
    return out
