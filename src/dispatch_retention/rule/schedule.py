"""The retention schedule in words, for the record of processing (GDPR Art. 30(1)(f)): what
`policy describe` prints and the report's schedule section shows. Pure: from the validated
settings only, deterministic (the config's order; no clock, no database).

Per policy: its name, what it matches (in words), its retention and the grace unsettled
dispatches get, its `legal_basis` and `purpose` (texts of `[[policy]]`, or None where the
config states none). For the whole schedule: the rule that decides between policies, where
the age is measured from, the columns stripped (and what replaces them) and the columns kept
with the reason each stays.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from dispatch_retention.config import KEPT_COLUMNS, Policy, Settings

#: How the schedule's policies combine (README "What is due", rules 2 and 3).
PRECEDENCE = (
    "Every policy whose conditions match a dispatch applies and the shortest retention wins "
    "(ties: the first listed); a dispatch no policy matches is never cleaned. Settled "
    "dispatches (failed sends, delivered or failed deliveries) are cleaned once older than "
    "the retention; unsettled ones wait the grace longer. A dispatch of a member under a "
    "legal hold is never cleaned while the hold lasts."
)


@dataclass(frozen=True)
class PolicyLine:
    """One policy of the schedule."""

    name: str
    matches: str
    retention_days: int
    grace_days: int
    legal_basis: str | None
    purpose: str | None


@dataclass(frozen=True)
class Column:
    """A column of the dispatches: stripped (`becomes`: what cleaning writes, as JSON or
    NULL) or kept (`reason`; `personal`: personal data kept on purpose, `clean.keep`)."""

    name: str
    becomes: str | None = None
    reason: str | None = None
    personal: bool = False


@dataclass(frozen=True)
class Schedule:
    policies: tuple[PolicyLine, ...]
    precedence: str
    age_from: str
    stripped: tuple[Column, ...]
    kept: tuple[Column, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "policies": [asdict(p) for p in self.policies],
            "precedence": self.precedence,
            "age_from": self.age_from,
            "stripped": [{"column": c.name, "becomes": c.becomes} for c in self.stripped],
            "kept": [
                {"column": c.name, "reason": c.reason, "personal_data": c.personal}
                for c in self.kept
            ],
        }


def schedule(settings: Settings) -> Schedule:
    clean = settings.clean
    stripped = tuple(
        Column(c, becomes=json.dumps(clean.replace[c]) if c in clean.replace else "NULL")
        for c in clean.columns
    )
    kept = tuple(Column(c, reason=r, personal=True) for c, r in clean.keep.items()) + tuple(
        Column(c, reason=r) for c, r in KEPT_COLUMNS.items() if c not in clean.columns
    )
    return Schedule(
        policies=tuple(
            PolicyLine(
                p.name,
                matches(p),
                p.retention_days,
                clean.in_flight_grace_days,
                p.legal_basis,
                p.purpose,
            )
            for p in settings.policies
        ),
        precedence=PRECEDENCE,
        age_from=age_from_words(clean.age_from),
        stripped=stripped,
        kept=kept,
    )


def matches(policy: Policy) -> str:
    """`where` in words: "every dispatch", or each key's values joined by "or", the keys by
    "and" ("type is sms or email, and transmission_status is failed")."""
    if not policy.where:
        return "every dispatch"
    parts = [f"{key} is {' or '.join(values)}" for key, values in policy.where.items()]
    return "dispatches whose " + ", and ".join(parts)


def age_from_words(column: str) -> str:
    if column == "created_at":
        return "created_at (when the dispatch was created)"
    return f"{column}, or created_at where {column} is empty"
