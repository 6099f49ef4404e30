"""`verify`: proof of storage limitation at this moment. Read-only (a READ ONLY transaction).

A violation is a dispatch past its binding policy's window (the same rule as `run`, legal
holds excluded) that still holds personal data: any column of `clean.columns` (the
`checked_columns`) that differs from what cleaning writes. That includes rows whose
`cleaned_at` is set but whose personal columns were written back; their age is
measured from `created_at` whatever `clean.age_from` names (`policy.past_window_unstamped`:
the cleaning moves `updated_at`, and a write-back may move the other columns), or a
written-back row would look young.
Reported apart, not as violations: dispatches no policy matches, and dispatches past their
window kept by a legal hold.

Anomalies (docs/architecture.md "What the job refuses") are rows the due rule can
never reach or should never see, so `verify` is the only place they show; `--strict`
counts them as violations:
- `undatable_rows`: not cleaned, holding personal data, and no age to measure (the
  `clean.age_from` column and `created_at` both NULL, or an age starting more than a day in
  the future or at 'infinity'): never due;
- `future_scheduled_rows`: not cleaned, unsettled, and `scheduled_at` further ahead than the
  longest retention (from the database's `now`, before any tolerance): never due while the
  schedule stands, most likely a bogus schedule on a message that was never sent;
- `written_back_rows`: cleaned, yet holding personal data again (past its window, such a row
  is also a violation).

`tolerance_hours` shifts `now` back for the windows: a nightly job cannot clean a row the
moment its window passes, so a monitor may allow the rows that became due since the last
run. Every count is read in one READ ONLY, REPEATABLE READ snapshot.

A role that may not read every personal column (the read-only role of `db grants`) counts
through the audit schema's view of the dispatches (`facts.source`): the same statements on
a Table of the same names, whose `has_<column>` flags are the predicate above computed by
the view, so the report is the same. A view that does not fit this configuration, or that
row-level security filters, is refused (`facts.check`), as RLS that applies to `verify`'s
own role is (`target.resolve`), whichever way it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, select

from dispatch_retention.catalog import target
from dispatch_retention.config import Settings
from dispatch_retention.pg import engines
from dispatch_retention.rule import policy
from dispatch_retention.trail import facts
from dispatch_retention.trail.audit_tables import AuditTables


@dataclass(frozen=True)
class Anomalies:
    """Rows the due rule cannot see as they are (see the module docstring)."""

    undatable_rows: int = 0
    future_scheduled_rows: int = 0
    written_back_rows: int = 0

    @property
    def total(self) -> int:
        return self.undatable_rows + self.future_scheduled_rows + self.written_back_rows

    def as_dict(self) -> dict[str, int]:
        return {
            "undatable_rows": self.undatable_rows,
            "future_scheduled_rows": self.future_scheduled_rows,
            "written_back_rows": self.written_back_rows,
        }


@dataclass
class Report:
    now: Any
    tolerance_hours: float
    violations: dict[str, int] = field(default_factory=dict)
    held_rows: int = 0
    unmatched_rows: int = 0
    cleaned_rows: int = 0
    anomalies: Anomalies = field(default_factory=Anomalies)
    #: clean.columns in config order, each with what cleaning writes (None: NULL)
    checked_columns: list[tuple[str, Any]] = field(default_factory=list)
    strict: bool = False
    #: the table checked, as the database resolved `target.table` (schema.name)
    target: str = ""

    @property
    def violation_rows(self) -> int:
        return sum(self.violations.values())

    @property
    def ok(self) -> bool:
        """No violation; under `strict`, no anomaly either."""
        return self.violation_rows == 0 and not (self.strict and self.anomalies.total)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "strict": self.strict,
            "target": self.target,
            "checked_at": self.now,
            "tolerance_hours": self.tolerance_hours,
            "violations": [{"policy": k, "rows": v} for k, v in self.violations.items() if v],
            "violation_rows": self.violation_rows,
            "held_rows": self.held_rows,
            "unmatched_rows": self.unmatched_rows,
            "cleaned_rows": self.cleaned_rows,
            "anomalies": self.anomalies.as_dict(),
            "anomaly_rows": self.anomalies.total,
            "checked_columns": [
                {"column": column, "cleaned_value": value} for column, value in self.checked_columns
            ],
        }


def verify(
    conn: Connection,
    settings: Settings,
    tables: AuditTables,
    tolerance_hours: float = 0,
    strict: bool = False,
) -> Report:
    engines.read_only(conn)
    settings = target.resolve_settings(conn, settings)
    now = engines.database_now(conn)
    rules = policy.rules(settings, now - timedelta(hours=tolerance_hours))
    table = facts.source(conn, settings)  # the table, or the view a read-only role counts through
    personal = policy.holds_personal_data(table, settings)
    past = and_(policy.past_window_unstamped(table, rules), personal)
    held = policy.held(table, tables.holds)
    credit = policy.credit(table, rules)
    report = Report(
        target=settings.target.table,
        now=now,
        tolerance_hours=tolerance_hours,
        checked_columns=policy.checked_columns(settings),
        strict=strict,
    )
    report.violations = {c.policy.name: 0 for c in rules.cutoffs}
    for name, is_held, rows in conn.execute(
        select(credit, held.label("held"), func.count()).where(past).group_by(credit, held)
    ):
        if is_held:
            report.held_rows += rows
        else:
            report.violations[name] += rows

    # One pass over the table for everything else.
    counts = conn.execute(
        select(
            func.count().filter(policy.unmatched(table, rules)),
            func.count().filter(table.c.cleaned_at.is_not(None)),
            func.count().filter(policy.undatable(table, settings, now)),
            func.count().filter(policy.scheduled_far_ahead(table, settings, now)),
            func.count().filter(policy.written_back(table, settings)),
        )
    ).one()
    report.unmatched_rows, report.cleaned_rows = counts[0], counts[1]
    report.anomalies = Anomalies(
        undatable_rows=counts[2], future_scheduled_rows=counts[3], written_back_rows=counts[4]
    )
    return report
