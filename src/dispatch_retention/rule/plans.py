"""A run's plan as plain data: per policy its cutoffs and due rows, what holds keep back,
what waits out the grace, and which id blocks hold due rows (`run.planning` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dispatch_retention.config import Guard
from dispatch_retention.rule import policy
from dispatch_retention.vocabulary import Options, Remaining


@dataclass(frozen=True)
class PolicyPlan:
    name: str
    retention_days: int
    cutoff: datetime
    grace_cutoff: datetime
    due_rows: int
    #: the age stamp (`clean.age_from`, else created_at) of its oldest due row: how overdue
    #: the oldest personal data under it is (None: none due)
    oldest_due_at: datetime | None = None


@dataclass(frozen=True)
class Plan:
    rules: policy.Rules
    policies: tuple[PolicyPlan, ...]
    held_rows: int
    waiting_grace_rows: int
    #: (block number, due rows in it), ascending; block b holds ids [b*BLOCK_IDS, (b+1)*...).
    blocks: tuple[tuple[int, int], ...] = ()
    #: every arm has its index (`indexes.serving`): sparse windows may go through them
    through_indexes: bool = False

    @property
    def due_rows(self) -> int:
        return sum(p.due_rows for p in self.policies)

    @property
    def arm_rows(self) -> int:
        """Rows in the policies' arms that the plan counted (due, held, waiting)."""
        return self.due_rows + self.held_rows + self.waiting_grace_rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.rules.now.isoformat(),
            "due_rows": self.due_rows,
            "held_rows": self.held_rows,
            "waiting_grace_rows": self.waiting_grace_rows,
            "due_blocks": len(self.blocks),
            "through_indexes": self.through_indexes,
            "policies": [
                {
                    "name": p.name,
                    "retention_days": p.retention_days,
                    "cutoff": p.cutoff.isoformat(),
                    "grace_cutoff": p.grace_cutoff.isoformat(),
                    "due_rows": p.due_rows,
                    "oldest_due_at": (
                        p.oldest_due_at.isoformat() if p.oldest_due_at is not None else None
                    ),
                }
                for p in self.policies
            ],
        }


@dataclass(frozen=True)
class Limits:
    """What a run of a plan may clean: the smaller row budget (`--max-rows`,
    `guard.max_rows_per_run`; None: none) and whether `guard.refuse_above_rows` refuses it.
    The one place that decides both: the run obeys them, the dry run and the prompt say
    them."""

    due_rows: int
    budget: int | None
    budget_name: str | None  # "max_rows" | "max_rows_per_run" (a `Remaining` value)
    refuse_above_rows: int | None
    force: bool = False

    @classmethod
    def of(cls, due_rows: int, guard: Guard, options: Options, *, force: bool = False) -> Limits:
        budget, name = row_budget(options, guard)
        return cls(due_rows, budget, name, guard.refuse_above_rows or None, force)

    @property
    def refused(self) -> bool:
        limit = self.refuse_above_rows
        return bool(limit) and self.due_rows > (limit or 0) and not self.force

    @property
    def to_clean(self) -> int:
        """At most this many rows: the due rows, or the budget where it is smaller."""
        return self.due_rows if self.budget is None else min(self.due_rows, self.budget)

    def as_dict(self) -> dict[str, Any]:
        return {
            "would_refuse": self.refused,
            "refuse_above_rows": self.refuse_above_rows,
            "row_budget": self.budget,
            "row_budget_from": self.budget_name,
            "would_clean_up_to": 0 if self.refused else self.to_clean,
        }


def row_budget(options: Options, guard: Guard) -> tuple[int | None, str | None]:
    """The smaller of `--max-rows` and `guard.max_rows_per_run`, and which it is (the option
    where they are equal); (None, None) without either."""
    option, per_run = options.max_rows, guard.max_rows_per_run
    if option and (not per_run or option <= per_run):
        return option, Remaining.MAX_ROWS.value
    if per_run:
        return per_run, Remaining.MAX_ROWS_PER_RUN.value
    return None, None
