"""Legal holds: a held member's dispatches stay until the hold is released; the hold commands."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, text

from tests.helpers import DAY, MARK, db_now, dispatch, insert_rows, invoke, snapshot
from tests.trail.harness import SCHEMA, audit_list, audit_show

# --- 5. legal holds --------------------------------------------------------------------------


def hold_list(base: list[str], *extra: str) -> list[dict[str, Any]]:
    result = invoke(*base, "hold", "list", "--format", "json", *extra)
    assert result.exit_code == 0, result.output
    return list(json.loads(result.stdout))


def test_legal_hold_keeps_dispatches_until_released(engine: Engine, base: list[str]) -> None:
    """A held member's overdue dispatches survive runs; released, the next run cleans them."""
    now = db_now(engine)
    insert_rows(
        engine,
        [dispatch(i, now - 500 * DAY, member_id=77 if i <= 3 else 100 + i) for i in range(1, 7)],
    )
    added = invoke(*base, "hold", "add", "77", "--reason", "case LEGAL-1 (litigation)")
    assert added.exit_code == 0, added.output
    [held] = hold_list(base)
    assert (held["member_id"], held["reason"], held["released_at"]) == (
        77,
        "case LEGAL-1 (litigation)",
        None,
    )
    assert held["created_by"] and held["created_at"]

    planned = invoke(*base, "run", "--dry-run")
    [held_line] = [ln for ln in planned.stdout.splitlines() if ln.startswith("held back")]
    assert held_line.split()[-1] == "3"
    first = invoke(*base, "run", "--yes")
    assert first.exit_code == 0, first.output
    rows = snapshot(engine)
    assert {i for i, r in rows.items() if r["cleaned_at"]} == {4, 5, 6}
    assert all(MARK in rows[i]["msisdn"] for i in (1, 2, 3))
    [run1] = audit_list(base)
    shown = audit_show(base, run1["run_id"])
    assert (shown["held_rows"], shown["due_rows"], shown["rows_cleaned"]) == (3, 3, 3)
    again = invoke(*base, "run", "--yes")
    assert again.exit_code == 0
    assert snapshot(engine) == rows  # still held

    released = invoke(*base, "hold", "release", "77")
    assert released.exit_code == 0, released.output
    assert hold_list(base) == []
    [kept] = hold_list(base, "--all")
    assert kept["hold_id"] == held["hold_id"]
    assert kept["released_at"] is not None and kept["released_by"]

    last = invoke(*base, "run", "--yes")
    assert last.exit_code == 0, last.output
    assert all(r["cleaned_at"] is not None for r in snapshot(engine).values())
    newest = audit_show(base, audit_list(base)[0]["run_id"])
    assert (newest["held_rows"], newest["rows_cleaned"]) == (0, 3)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {SCHEMA}.legal_holds")).scalar_one() == 1


def test_hold_commands_add_release_and_refuse_bad_requests(base: list[str]) -> None:
    """hold add/release/list on the CLI; no reason, a second hold, no hold to release: exit 2."""
    added = invoke(*base, "hold", "add", "77", "--reason", "case LEGAL-2")
    assert added.exit_code == 0, added.output
    [held] = hold_list(base)
    assert (held["member_id"], held["reason"], held["released_at"]) == (77, "case LEGAL-2", None)

    assert invoke(*base, "hold", "add", "77", "--reason", "again").exit_code == 2
    assert invoke(*base, "hold", "add", "78").exit_code == 2
    assert invoke(*base, "hold", "add", "78", "--reason", "   ").exit_code == 2
    assert invoke(*base, "hold", "release", "78").exit_code == 2
    assert len(hold_list(base, "--all")) == 1  # none of the refused commands wrote a hold

    released = invoke(*base, "hold", "release", "77")
    assert released.exit_code == 0, released.output
    assert hold_list(base) == []
    assert invoke(*base, "hold", "release", "77").exit_code == 2  # nothing active any more
    assert invoke(*base, "hold", "add", "77", "--reason", "case LEGAL-3").exit_code == 0
    history = hold_list(base, "--all")
    assert [(h["reason"], h["released_at"] is None) for h in history] == [
        ("case LEGAL-2", False),
        ("case LEGAL-3", True),
    ]


#: A trigger of the table's owner that fires before the trail's guard (triggers fire in the
#: order of their names) and marks a new hold released, which the guard refuses.
RELEASE_ON_INSERT = f"""
CREATE FUNCTION {SCHEMA}.app_release_at_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.released_at := now(); RETURN NEW; END $$;
CREATE TRIGGER a_release_at_once BEFORE INSERT ON {SCHEMA}.legal_holds
  FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.app_release_at_once();
"""


def test_a_guard_that_refuses_a_hold_is_named_not_taken_for_a_hold_in_place(
    engine: Engine, base: list[str]
) -> None:
    """Only the one-active-hold-per-member index means "already under an active legal
    hold"; a guard's refusal (SQLSTATE 23000) is said as what it is, by its constraint's
    name, in the job's words (exit 2), and writes no hold."""
    with engine.begin() as conn:
        conn.execute(text(RELEASE_ON_INSERT))
    refused = invoke(*base, "hold", "add", "77", "--reason", "case LEGAL-4")
    assert refused.exit_code == 2, refused.output
    assert "already under an active legal hold" not in refused.output
    assert "SQLSTATE 23000" in refused.output
    assert "constraint legal_holds_placed_active" in refused.output
    assert "a hold is placed active" not in refused.output  # the server's text
    assert hold_list(base, "--all") == []
