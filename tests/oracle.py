"""A plain-Python reading of README "What is due", written from its words, not from
rule/policy.py."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from typing import Any

from dispatch_retention.config import Settings


def binding_policy(row: Mapping[str, Any], settings: Settings) -> Any:
    """Every matching policy applies; the shortest retention wins; ties: first in the file."""
    best = None
    for p in settings.policies:
        matches = all(row.get(key) in values for key, values in p.where.items())
        if matches and (best is None or p.retention_days < best.retention_days):
            best = p
    return best


def is_settled(row: Mapping[str, Any]) -> bool:
    return row["transmission_status"] == "failed" or row["delivery_status"] in (
        "delivered",
        "failed",
    )


def is_due(
    row: Mapping[str, Any],
    settings: Settings,
    now: datetime,
    held_members: Collection[int] = (),
) -> bool:
    if row["cleaned_at"] is not None:
        return False
    if row["member_id"] is not None and row["member_id"] in held_members:
        return False
    policy = binding_policy(row, settings)
    if policy is None:
        return False
    start = row[settings.clean.age_from] or row["created_at"]
    if start is None:  # no age to measure: never due (verify reports it as undatable)
        return False
    window = timedelta(days=policy.retention_days)
    if not is_settled(row):
        # "never while its scheduled_at is in the future": for unsettled dispatches only
        if row["scheduled_at"] is not None and row["scheduled_at"] > now:
            return False
        window += timedelta(days=settings.clean.in_flight_grace_days)
    return now - start > window
