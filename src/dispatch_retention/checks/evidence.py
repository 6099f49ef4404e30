"""The evidence pack: what `report` shows a reviewer (CONTRACT section 10), as one document of
plain data (`report --format json` prints it; the HTML form renders the same). Read-only, as
the read-only role of `db grants` may: it counts personal data through the audit schema's
view, never reads it, and writes nothing.

Two read-only transactions, each one snapshot: the first takes a `verify` and everything else
the report says of the table and the trail (the runs, the rows cleaned per day, the holds, the
copy risks, the dead row versions); the second checks the audit chain (`audit verify`), whose
head the report names. No personal data: member ids only with `member_ids`
(`--include-member-ids`); texts are the trail's (the job's own words, a hold's reason).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from dispatch_retention.catalog import remnants, risks
from dispatch_retention.catalog import target as target_module
from dispatch_retention.checks import audit_verify
from dispatch_retention.checks.verify import verify
from dispatch_retention.config import Settings
from dispatch_retention.rule import schedule
from dispatch_retention.trail import period, run_record
from dispatch_retention.trail.audit_tables import AuditTables

#: The pack's format: a reader checks it before reading the rest.
FORMAT = "dispatch-retention-evidence/1"
#: What the report's timeline shows of each run.
TIMELINE = (
    "run_id", "status", "trigger", "shard", "started_at", "finished_at", "planned_at",
    "rows_cleaned", "rows_recleaned", "due_rows", "remaining_due_rows", "remaining_reason",
    "oldest_due_at",
)  # fmt: skip
#: Statuses of a run that did not do its work, listed with their reasons.
FAILURES = ("failed", "refused", "abandoned", "interrupted", "cancelled")

#: Where cleaned values may still exist: the facts the report states with its figures.
REMNANT_STATEMENTS = (
    "Cleaning writes a new version of each row; PostgreSQL keeps the old version, with the "
    "personal data it held, as a dead row version in the table (and the old values of long "
    "columns in its TOAST table) until VACUUM reclaims it, and the table's indexes keep "
    "entries pointing at it until then.",
    "VACUUM marks the space free but does not overwrite it at once: the bytes stay in the "
    "data files until new rows reuse the space (VACUUM FULL or a table rewrite copies the live "
    "rows to new files; the old files are then removed, not wiped).",
    "The write-ahead log records each cleaning; WAL archives and streaming or logical "
    "replicas (and what they feed) keep that history under their own retention, which this "
    "job does not control.",
)
ERASURE_NOTE = (
    "None recorded: erasure on request (GDPR Art. 17) is not part of this version of the job"
)


@dataclass(frozen=True)
class Options:
    since: datetime
    tolerance_hours: float = 24
    member_ids: bool = False


def gather(engine: Engine, settings: Settings, options: Options) -> dict[str, Any]:
    """The evidence pack, as plain data (datetimes as they are; `render.to_json` writes
    them as ISO 8601)."""
    tables = AuditTables(settings.audit.schema_)
    with engine.connect() as conn, conn.begin():
        checked = verify(conn, settings, tables, options.tolerance_hours)
        resolved = target_module.resolve_settings(conn, settings)
        now = checked.now
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        runs = period.runs(conn, tables, options.since)
        per_day = period.cleaned_per_day(conn, tables, options.since)
        active, released = period.holds(conn, tables, options.since, member_ids=options.member_ids)
        found_risks = risks.copy_risks(conn, resolved)
        leaves = remnants.tables(conn, resolved)
        last_cleaned = period.last_cleaned_at(conn, tables)
    with engine.connect() as conn, conn.begin():
        chain = audit_verify.check(conn, settings, tables)
    last_run = next((r for r in reversed(runs) if r["finished_at"] is not None), None)
    return {
        "format": FORMAT,
        "header": {
            "target": checked.target,
            "database": database,
            "generated_at": now,
            "tool_version": run_record.tool_version(),
            "config_path": settings.path,
            "config_sha256": settings.sha256,
            "period": {"since": options.since, "until": now},
            "chain_head": chain.head,
            "chain_head_seq": chain.head_seq,
            "member_ids_included": options.member_ids,
        },
        "verdict": verdict(checked.ok, chain.ok, checked.violation_rows),
        "schedule": schedule.schedule(settings).as_dict(),
        "verify": checked.as_dict(),
        "runs": {**_runs(runs), "cleaned_per_day": per_day},
        "exceptions": {
            "active_holds": active,
            "released_holds": released,
            "held_rows": checked.held_rows,
            "unmatched_rows": checked.unmatched_rows,
            "anomalies": checked.anomalies.as_dict(),
            "copy_risks": [r.as_dict() for r in found_risks],
        },
        "erasure_requests": {"requests": [], "note": ERASURE_NOTE},
        "audit_chain": chain.as_dict(),
        "remnants": _remnants(leaves, last_run),
        "backups": backups(settings.evidence.backup_retention_days, last_cleaned),
    }


def verdict(verify_ok: bool, chain_ok: bool, violation_rows: int) -> dict[str, Any]:
    """The report's first line: OK only when nothing overdue holds personal data and the
    trail checks out."""
    problems = []
    if not verify_ok:
        problems.append(
            f"{violation_rows} dispatches past their retention window still hold personal data"
            if violation_rows
            else "verify found anomalies (strict)"
        )
    if not chain_ok:
        problems.append("the audit trail does not check out (audit verify)")
    return {"ok": not problems, "problems": problems}


def _runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = Counter(str(r["status"]) for r in runs)
    return {
        "count": len(runs),
        "by_status": dict(sorted(statuses.items())),
        "rows_cleaned": sum(int(r["rows_cleaned"]) for r in runs),
        "timeline": [
            {
                **{key: run[key] for key in TIMELINE},
                "oldest_due_age_days": _age_days(run["planned_at"], run["oldest_due_at"]),
            }
            for run in runs
        ],
        "failures": [
            {
                "run_id": r["run_id"],
                "status": r["status"],
                "started_at": r["started_at"],
                "reason": r["error"] or r["stopped_by"] or r["remaining_reason"],
            }
            for r in runs
            if r["status"] in FAILURES
        ],
    }


def _age_days(planned_at: datetime | None, oldest_due_at: str | None) -> float | None:
    """How old the oldest due row was when the run planned, in days (None: not recorded)."""
    if planned_at is None or oldest_due_at is None:
        return None
    try:
        oldest = datetime.fromisoformat(oldest_due_at)
    except ValueError:
        return None
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return round((planned_at - oldest).total_seconds() / 86_400, 1)


def _remnants(
    leaves: list[remnants.TableRemnants], last_run: dict[str, Any] | None
) -> dict[str, Any]:
    finished = last_run["finished_at"] if last_run else None
    vacuums = [t.vacuumed for t in leaves]
    return {
        "tables": [t.as_dict() for t in leaves],
        "dead_row_versions": sum(t.dead + t.toast_dead for t in leaves),
        "last_run_finished_at": finished,
        "vacuumed_since_last_run": (
            None
            if finished is None
            else all(t.vacuumed is not None and t.vacuumed >= finished for t in leaves)
        ),
        "never_vacuumed_tables": sum(v is None for v in vacuums),
        "oldest_last_vacuum": min((v for v in vacuums if v is not None), default=None),
        "statements": list(REMNANT_STATEMENTS),
    }


def backups(retention_days: int | None, last_cleaned: datetime | None) -> dict[str, Any]:
    """The backup horizon: a backup taken before a row was cleaned holds its personal data
    until that backup expires, `retention_days` after it was taken."""
    if retention_days is None:
        return {
            "retention_days": None,
            "statement": "The backup retention is not stated ([evidence] "
            "backup_retention_days): how long backups keep what was cleaned is not known here.",
        }
    if last_cleaned is None:
        return {
            "retention_days": retention_days,
            "statement": f"Backups are kept {retention_days} days; nothing has been cleaned yet.",
        }
    until = last_cleaned + timedelta(days=retention_days)
    return {
        "retention_days": retention_days,
        "last_cleaned_at": last_cleaned,
        "held_until": until,
        "statement": f"A backup may still hold what was cleaned before {_day(last_cleaned)} "
        f"until {_day(until)}: backups are kept {retention_days} days, and one taken before "
        "a dispatch was cleaned holds its personal data until it expires.",
    }


def _day(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
