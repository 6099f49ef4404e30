"""A plan's `oldest_due_at` per policy: the age stamp of the oldest row due under it (not
held), as the oracle of README "What is due" finds it over the table; recorded in the run's
plan, as `audit show --format json` reads it."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from dispatch_retention.run.planning import make_plan
from dispatch_retention.trail.audit_tables import AuditTables
from tests import oracle
from tests.helpers import (
    DAY,
    db_now,
    dispatch,
    insert_rows,
    invoke,
    run_records,
    settings,
    snapshot,
)


@pytest.mark.parametrize("age_from", ["created_at", "delivered_at"])
def test_oldest_due_at_is_the_oldest_due_row_per_binding_policy(
    engine: Engine, age_from: str
) -> None:
    now = db_now(engine)
    rows = [
        dispatch(1, now - 900 * DAY, type="sms", member_id=7),  # the oldest, but held
        dispatch(2, now - 800 * DAY, type="sms"),
        dispatch(3, now - 700 * DAY, type="email", delivered_at=now - 720 * DAY),
        dispatch(4, now - 600 * DAY, type="email", transmission_status="failed"),
        dispatch(5, now - 10 * DAY, type="push"),  # not due
        dispatch(6, now - 950 * DAY, type="push", cleaned_at=now - DAY, content=None),
    ]
    insert_rows(engine, rows)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO dispatch_retention.legal_holds (member_id, reason, "
                          "created_by) VALUES (7, 'case 1', 'test')"))  # fmt: skip
    s = settings(clean=f'age_from = "{age_from}"')
    with engine.connect() as conn, conn.begin():
        plan = make_plan(conn, s, AuditTables(s.audit.schema_).holds)
    held = {7}
    expected: dict[str, object] = {}
    for row in snapshot(engine).values():
        if oracle.is_due(row, s, plan.rules.now, held):
            name = oracle.binding_policy(row, s).name
            at = row[age_from] or row["created_at"]
            expected[name] = min(at, expected.get(name, at))  # type: ignore[type-var]
    got = {p.name: p.oldest_due_at for p in plan.policies if p.oldest_due_at is not None}
    assert got == expected and got
    assert all(p.oldest_due_at is None for p in plan.policies if p.due_rows == 0)
    with engine.connect() as conn, conn.begin():  # the end count, at the run's own cutoffs
        recount = make_plan(conn, s, AuditTables(s.audit.schema_).holds, rules=plan.rules)
    assert recount.due_rows == plan.due_rows  # it counts the same, and records no oldest
    assert all(p.oldest_due_at is None for p in recount.policies)


def test_the_run_record_keeps_it_and_audit_show_reads_it(engine: Engine, base: list[str]) -> None:
    now = db_now(engine)
    insert_rows(engine, [dispatch(1, now - 500 * DAY), dispatch(2, now - 400 * DAY)])
    assert invoke(*base, "run", "--yes").exit_code == 0
    (run_id,) = run_records(engine)
    shown = json.loads(invoke(*base, "audit", "show", run_id, "--format", "json").stdout)
    stamps = {p["name"]: p["oldest_due_at"] for p in shown["policies"]}
    due = [name for name, at in stamps.items() if at is not None]
    assert len(due) == 1 and not shown.get("unreadable")
    oldest = datetime.fromisoformat(stamps[due[0]])
    assert abs(oldest - (now - 500 * DAY)) < timedelta(seconds=1)
