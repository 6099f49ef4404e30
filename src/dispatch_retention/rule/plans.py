"""A run's plan as plain data: per policy its cutoffs and due rows, what holds keep back,
what waits out the grace, and which id blocks hold due rows (`run.planning` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dispatch_retention.rule import policy


@dataclass(frozen=True)
class PolicyPlan:
    name: str
    retention_days: int
    cutoff: datetime
    grace_cutoff: datetime
    due_rows: int


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
                }
                for p in self.policies
            ],
        }
