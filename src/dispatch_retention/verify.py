"""`verify`: proof of storage limitation at this moment. Read-only (a READ ONLY transaction).

A violation is a dispatch past its binding policy's window (the same rule as `run`, legal
holds excluded) that still holds personal data: any column of `clean.columns` that differs
from what cleaning writes. That includes rows whose `cleaned_at` is set but whose personal
columns were written back. Reported apart, not as violations: dispatches no policy matches,
and dispatches past their window kept by a legal hold.

`tolerance_hours` shifts `now` back: a nightly job cannot clean a row the moment its window
passes, so a monitor may allow the rows that became due since the last run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, or_, select

from . import db, policy, target
from .config import Settings
from .planning import database_now
from .schema import AuditTables, dispatches_table


@dataclass
class Report:
    now: Any
    tolerance_hours: float
    violations: dict[str, int] = field(default_factory=dict)
    held_rows: int = 0
    unmatched_rows: int = 0
    cleaned_rows: int = 0

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked_at": self.now,
            "tolerance_hours": self.tolerance_hours,
            "violations": [{"policy": k, "rows": v} for k, v in self.violations.items() if v],
            "violation_rows": sum(self.violations.values()),
            "held_rows": self.held_rows,
            "unmatched_rows": self.unmatched_rows,
            "cleaned_rows": self.cleaned_rows,
        }


def holds_personal_data(table: Any, settings: Settings) -> ColumnElement[bool]:
    """Any cleaned column that differs from what cleaning writes (NULL or its replacement)."""
    return or_(
        *(
            table.c[column].is_distinct_from(value)
            for column, value in policy.cleaned_values(settings).items()
        )
    )


def verify(
    conn: Connection, settings: Settings, tables: AuditTables, tolerance_hours: float = 0
) -> Report:
    db.read_only(conn)
    settings = target.resolve_settings(conn, settings)
    now = database_now(conn)
    rules = policy.rules(settings, now - timedelta(hours=tolerance_hours))
    table = dispatches_table(settings.target)
    past = and_(policy.past_window(table, rules), holds_personal_data(table, settings))
    held = policy.held(table, tables.holds)
    credit = policy.credit(table, rules)
    report = Report(now=now, tolerance_hours=tolerance_hours)
    report.violations = {c.policy.name: 0 for c in rules.cutoffs}
    for name, is_held, rows in conn.execute(
        select(credit, held.label("held"), func.count()).where(past).group_by(credit, held)
    ):
        if is_held:
            report.held_rows += rows
        else:
            report.violations[name] += rows
    report.unmatched_rows = conn.execute(
        select(func.count()).where(policy.unmatched(table, rules))
    ).scalar_one()
    report.cleaned_rows = conn.execute(
        select(func.count()).where(table.c.cleaned_at.is_not(None))
    ).scalar_one()
    return report
