"""`verify` through the CLI: violations per policy, held and unmatched rows, as a read-only
role.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text

from tests.helpers import (
    DAY,
    MARK,
    assert_no_marker,
    config_text,
    db_now,
    dispatch,
    insert_rows,
    invoke,
    snapshot,
    transaction_ids_taken,
    write_config,
)
from tests.trail.harness import hold

# --- 4. verify -------------------------------------------------------------------------------

VERIFY_POLICIES = """
[[policy]]
name = "failed-sends"
retention_days = 30
where = { transmission_status = "failed" }

[[policy]]
name = "sms"
retention_days = 90
where = { type = "sms" }

[[policy]]
name = "email"
retention_days = 365
where = { type = "email" }
"""


class ReadOnlyProbe:
    """Asks the server, before each statement on dispatches, whether its transaction is READ
    ONLY (on the statement's own connection, bypassing SQLAlchemy's events)."""

    def __init__(self) -> None:
        self.answers: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "dispatches" in statement:
            raw = conn.connection.dbapi_connection
            self.answers.append(raw.execute("SHOW transaction_read_only").fetchone()[0])

    def __enter__(self) -> ReadOnlyProbe:
        event.listen(Engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(Engine, "before_cursor_execute", self)


def verify_json(base: list[str], *extra: str) -> tuple[int, dict[str, Any]]:
    result = invoke(*base, "verify", "--format", "json", *extra)
    assert_no_marker(result.stdout, result.stderr)
    return result.exit_code, json.loads(result.stdout)


def test_verify_reports_violations_held_and_unmatched_read_only(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """verify: 0 when clean, 5 with per-policy counts; holds and unmatched are not violations."""
    cfg = write_config(tmp_path / "v.toml", config_text(policies=VERIFY_POLICIES))
    base = ["--config", str(cfg), "--database-url", url_string]
    code, empty = verify_json(base)
    assert (code, empty["ok"], empty["violations"]) == (0, True, [])

    now = db_now(engine)
    insert_rows(
        engine,
        [
            dispatch(1, now - 500 * DAY, type="sms"),  # cleaned, then msisdn written back
            dispatch(2, now - 500 * DAY, type="sms"),  # cleaned, stays clean
            dispatch(3, now - 500 * DAY, type="sms"),  # cleaned, then content written back
            dispatch(5, now - 500 * DAY, type="sms", member_id=77),  # held
            dispatch(6, now - 500 * DAY, type="push"),  # no policy matches: never due
            dispatch(7, now - 5 * DAY, type="push"),  # no policy matches
            dispatch(8, now - 10 * DAY, type="sms"),  # young
        ],
    )
    hold(engine, 77, "case V-1")
    ran = invoke(*base, "run", "--yes")
    assert ran.exit_code == 0, ran.output
    code, clean = verify_json(base)
    assert (code, clean["ok"], clean["violations"]) == (0, True, [])
    assert (clean["held_rows"], clean["unmatched_rows"], clean["cleaned_rows"]) == (1, 2, 3)

    with engine.begin() as conn:
        conn.execute(text("UPDATE dispatches SET msisdn = '+47' || :m WHERE id = 1"), {"m": MARK})
        conn.execute(
            text("UPDATE dispatches SET content = CAST(:c AS jsonb) WHERE id = 3"),
            {"c": json.dumps({"body": MARK})},
        )
    insert_rows(
        engine,
        [
            dispatch(10, now - 400 * DAY, type="email"),  # overdue, never cleaned
            dispatch(11, now - 40 * DAY, transmission_status="failed"),  # overdue failed send
            dispatch(12, now - 90 * DAY - timedelta(hours=1), type="sms"),  # just past
        ],
    )
    before = snapshot(engine)
    with ReadOnlyProbe() as probe, transaction_ids_taken() as taken:
        code, report = verify_json(base)

    assert code == 5
    assert report["ok"] is False
    assert {v["policy"]: v["rows"] for v in report["violations"]} == {
        "sms": 3,
        "email": 1,
        "failed-sends": 1,
    }
    assert (report["violation_rows"], report["held_rows"], report["unmatched_rows"]) == (5, 1, 2)
    assert probe.answers and set(probe.answers) == {"on"}, probe.answers
    assert taken == []  # not one transaction id consumed: nothing written
    assert snapshot(engine) == before

    code, tolerant = verify_json(base, "--tolerance-hours", "2")
    assert (code, {v["policy"]: v["rows"] for v in tolerant["violations"]}) == (
        5,
        {"sms": 2, "email": 1, "failed-sends": 1},
    )
    table = invoke(*base, "verify")
    assert table.exit_code == 5
    assert "VIOLATION: 5 dispatches" in table.stdout
