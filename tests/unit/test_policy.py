"""The pure policy core: compiled SQL, binding order, and the rule evaluated by PostgreSQL
against named boundary cases with a fixed `now`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql

from dispatch_retention.rule import policy
from tests.helpers import DAY, TABLE, dispatch, insert_rows, settings
from tests.oracle import binding_policy, is_due

NOW = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)  # a DST change in Europe, for good measure
SEC = timedelta(seconds=1)


def compiled(expr: object) -> str:
    return str(expr.compile(dialect=postgresql.dialect()))  # type: ignore[attr-defined]


def test_predicate_binds_values_and_never_inlines_them() -> None:
    """Cutoffs and match values are bound parameters; identifiers are columns, not text."""
    s = settings()
    statement = policy.due(TABLE, policy.rules(s, NOW)).compile(dialect=postgresql.dialect())
    sql, params = str(statement), statement.params
    assert "dispatches.cleaned_at IS NULL" in sql
    assert "'failed'" not in sql and "'sms'" not in sql and "2026" not in sql
    for name in params:  # each bound value has its place in the statement
        assert f"%({name})s" in sql or f"[POSTCOMPILE_{name}]" in sql, name
    grace = s.clean.in_flight_grace_days
    windows = {p.retention_days + extra for p in s.policies for extra in (0, grace)}
    cutoffs = {v for v in params.values() if isinstance(v, datetime)}
    assert cutoffs == {NOW} | {NOW - days * DAY for days in windows}  # NOW: scheduled_at's
    words = {w for p in s.policies for values in p.where.values() for w in values}
    settled = {"failed", "delivered"}  # the settled rule's words (transmission, delivery)
    assert {w for v in params.values() if isinstance(v, list) for w in v} == words | settled


def test_holds_add_one_not_exists() -> None:
    """Given a holds table, the predicate gains exactly one NOT EXISTS on it."""
    from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table

    holds = Table(
        "legal_holds",
        MetaData(),
        Column("member_id", BigInteger),
        Column("released_at", DateTime(timezone=True)),
    )
    sql = compiled(policy.due(TABLE, policy.rules(settings(), NOW), holds))
    assert sql.count("NOT (EXISTS (SELECT") == 1
    assert "legal_holds.released_at IS NULL" in sql


def test_binding_order_shortest_first_ties_keep_file_order() -> None:
    """Shortest retention binds; among equal retentions the first in the file."""
    s = settings(
        policies="""
[[policy]]
name = "b"
retention_days = 60
[[policy]]
name = "a"
retention_days = 30
[[policy]]
name = "c"
retention_days = 60
"""
    )
    assert [p.name for p in policy.binding_order(s.policies)] == ["a", "b", "c"]


def test_rules_refuse_naive_now() -> None:
    """`now` must be timezone-aware: it comes from the database clock."""
    with pytest.raises(ValueError, match="timezone-aware"):
        policy.rules(settings(), datetime(2026, 1, 1))


def test_cutoffs_from_now() -> None:
    """Each cutoff is now minus retention; the unsettled one also minus the grace."""
    r = policy.rules(settings(clean="in_flight_grace_days = 10"), NOW)
    by_name = {c.policy.name: c for c in r.cutoffs}
    assert by_name["sms"].settled == NOW - 90 * DAY
    assert by_name["sms"].unsettled == NOW - 100 * DAY
    assert r.latest_cutoff == NOW - 30 * DAY


# Each case: a row (against the default policies: failed 30 d, sms 90 d, everything 365 d,
# grace 30 d) and whether it is due at NOW.
CASES = [
    pytest.param({"created_at": NOW - 90 * DAY}, False, id="exactly-at-cutoff"),
    pytest.param({"created_at": NOW - 90 * DAY + SEC}, False, id="one-second-before"),
    pytest.param({"created_at": NOW - 90 * DAY - SEC}, True, id="one-second-past"),
    pytest.param(
        {"created_at": NOW - 40 * DAY, "transmission_status": "failed"},
        True,
        id="shortest-retention-wins",
    ),
    pytest.param({"created_at": NOW - 200 * DAY, "type": "email"}, False, id="email-under-default"),
    pytest.param({"created_at": NOW - 366 * DAY, "type": "push"}, True, id="default-past"),
    pytest.param(
        {"created_at": NOW - 100 * DAY, "delivery_status": "pending"},
        False,
        id="unsettled-inside-grace",
    ),
    pytest.param(
        {"created_at": NOW - 120 * DAY, "delivery_status": "pending"},
        False,
        id="unsettled-exactly-at-grace",
    ),
    pytest.param(
        {"created_at": NOW - 120 * DAY - SEC, "delivery_status": "pending"},
        True,
        id="unsettled-one-second-past-grace",
    ),
    pytest.param(
        {"created_at": NOW - 200 * DAY, "transmission_status": None, "delivery_status": None},
        True,
        id="null-statuses-count-as-unsettled",
    ),
    pytest.param(
        {"created_at": NOW - 100 * DAY, "delivery_status": "bounced"},
        False,
        id="unknown-status-gets-grace",
    ),
    pytest.param(
        {"created_at": NOW - 100 * DAY, "delivery_status": "failed"},
        True,
        id="delivery-failed-is-settled",
    ),
    pytest.param(
        {"created_at": NOW - 200 * DAY, "scheduled_at": NOW + SEC},
        True,
        id="settled-scheduled-in-future-is-due-by-age",
    ),
    pytest.param(
        {"created_at": NOW - 200 * DAY, "scheduled_at": NOW + 70_000 * DAY},
        True,
        id="settled-scheduled-in-2099",
    ),
    pytest.param(
        {"created_at": NOW - 200 * DAY, "transmission_status": "failed", "scheduled_at": NOW + DAY},
        True,
        id="failed-send-scheduled-in-future",
    ),
    pytest.param(
        {
            "created_at": NOW - 200 * DAY,
            "delivery_status": "pending",
            "scheduled_at": NOW + SEC,
        },
        False,
        id="unsettled-scheduled-in-future",
    ),
    pytest.param(
        {"created_at": NOW - 200 * DAY, "delivery_status": "pending", "scheduled_at": NOW},
        True,
        id="unsettled-scheduled-exactly-now",
    ),
    pytest.param(
        {"created_at": NOW - 200 * DAY, "scheduled_at": NOW}, True, id="scheduled-exactly-now"
    ),
    pytest.param({"created_at": NOW - 200 * DAY, "scheduled_at": None}, True, id="scheduled-null"),
    pytest.param(
        {"created_at": NOW - 200 * DAY, "cleaned_at": NOW - DAY}, False, id="already-cleaned"
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), CASES)
def test_boundaries_on_postgresql(engine: Engine, overrides: dict, expected: bool) -> None:
    """PostgreSQL evaluates the predicate at a fixed `now` as the oracle and the case say."""
    s = settings()
    overrides = dict(overrides)  # the case is shared with other tests: never mutate it
    row = dispatch(1, **{"created_at": overrides.pop("created_at"), **overrides})
    insert_rows(engine, [row])
    r = policy.rules(s, NOW)
    with engine.connect() as conn:
        got = conn.execute(select(policy.due(TABLE, r)).where(TABLE.c.id == 1)).scalar_one()
    assert got == expected
    assert is_due(row, s, NOW) == expected


@pytest.mark.parametrize(
    ("age_from", "expected"),
    [
        pytest.param("created_at", True, id="created_at"),
        pytest.param("delivered_at", False, id="delivered_at-younger"),
    ],
)
def test_age_from(engine: Engine, age_from: str, expected: bool) -> None:
    """Age counts from clean.age_from, falling back to created_at where it is NULL."""
    s = settings(clean=f'age_from = "{age_from}"')
    insert_rows(
        engine,
        [
            dispatch(1, NOW - 100 * DAY, delivered_at=NOW - 10 * DAY),
            dispatch(2, NOW - 100 * DAY, delivered_at=None),
        ],
    )
    r = policy.rules(s, NOW)
    with engine.connect() as conn:
        got = dict(conn.execute(select(TABLE.c.id, policy.due(TABLE, r))).all())
    assert got == {1: expected, 2: True}


def test_unmatched_is_never_due(engine: Engine) -> None:
    """A dispatch no policy matches is never due, however old."""
    s = settings(policies='[[policy]]\nname="sms"\nretention_days=30\nwhere={type="sms"}\n')
    insert_rows(engine, [dispatch(1, NOW - 900 * DAY, type="email")])
    r = policy.rules(s, NOW)
    with engine.connect() as conn:
        due, unmatched = conn.execute(
            select(policy.due(TABLE, r), policy.unmatched(TABLE, r))
        ).one()
    assert (due, unmatched) == (False, True)


def test_credit_names_binding_policy(engine: Engine) -> None:
    """The CASE credits the shortest matching policy."""
    insert_rows(
        engine,
        [
            dispatch(1, NOW - 400 * DAY, type="sms", transmission_status="failed"),
            dispatch(2, NOW - 400 * DAY, type="sms"),
            dispatch(3, NOW - 400 * DAY, type="push"),
        ],
    )
    r = policy.rules(settings(), NOW)
    with engine.connect() as conn:
        got = dict(conn.execute(select(TABLE.c.id, policy.credit(TABLE, r))).all())
    assert got == {1: "failed-sends", 2: "sms", 3: "default"}


def test_arms_hold_each_due_row_once_in_its_binding_policys_arm(engine: Engine) -> None:
    """Every boundary case, under overlapping two-key policies with NULL keys: a due row lies
    in exactly one arm, its binding policy's (the oracle's); no row lies in two arms."""
    s = settings(
        policies="""
[[policy]]
name = "failed-sms"
retention_days = 20
where = { type = "sms", transmission_status = ["failed", "scheduled"] }

[[policy]]
name = "delivered"
retention_days = 60
where = { delivery_status = "delivered" }

[[policy]]
name = "sms"
retention_days = 90
where = { type = "sms" }

[[policy]]
name = "default"
retention_days = 365
"""
    )
    rows = []
    for i, (overrides, _expected) in enumerate((c.values for c in CASES), start=1):
        extra = dict(overrides)
        rows.append(dispatch(i, **{"created_at": extra.pop("created_at"), **extra}))
    for status in ("failed", "scheduled", None):
        for age in (25, 70, 100, 400):
            rows.append(
                dispatch(len(rows) + 1, NOW - age * DAY, transmission_status=status, type="sms")
            )
            rows.append(
                dispatch(len(rows) + 1, NOW - age * DAY, delivery_status=None, type="email")
            )
    insert_rows(engine, rows)
    r = policy.rules(s, NOW)
    arms = policy.arms(TABLE, r)
    with engine.connect() as conn:
        in_arms = conn.execute(
            select(TABLE.c.id, *(arm for _, arm in arms), policy.due(TABLE, r))
        ).all()
    names = [c.policy.name for c, _ in arms]
    due_seen = 0
    for row_id, *flags, due in in_arms:
        member = [name for name, flag in zip(names, flags[: len(names)], strict=True) if flag]
        assert len(member) <= 1, f"row {row_id} in arms {member}"
        row = next(x for x in rows if x["id"] == row_id)
        assert bool(due) == is_due(row, s, NOW)  # NULL (unknown) selects nothing
        if due:
            due_seen += 1
            assert member == [binding_policy(row, s).name], f"row {row_id}"
    assert due_seen >= 10  # the cases reach into every arm, not only a few
