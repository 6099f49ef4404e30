"""`audit show` of a run record whose documents have an unexpected shape.

Found by the third review: a plan or copy-risk document that lacks keys or has other types
than the job writes (the run role may write any flat document its guards allow; imported
rows and an owner's writes may hold anything) made `audit show` end in a KeyError or a
TypeError traceback. It now shows what is readable, names what is not (`unreadable`), and
exits 0.
"""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from tests.helpers import guards_off, invoke
from tests.trail.test_guards import CHUNKS, RUNS, execute_as

START = (
    f"INSERT INTO {RUNS} (run_id, status, started_at, trigger, host, tool_version, db_user, "
    "target_table, options, config_path, config_sha256, config_text, copy_risks) VALUES "
    "(:r, 'running', now(), 'cron', 'h', '0', current_user, 'public.dispatches', '{}', 'x', "
    "'x', 'x', CAST(:risks AS jsonb))"
)
PLAN = (
    f"UPDATE {RUNS} SET planned_at = now(), policies = CAST(:plan AS jsonb), due_rows = 0, "
    "held_rows = 0, waiting_grace_rows = 0 WHERE run_id = :r"
)
GOOD_POLICY = {"name": "sms", "retention_days": 90, "cutoff": "2026-01-01T00:00:00+00:00"}
GOOD_RISK = {"kind": "trigger", "name": "t", "when": "AFTER", "detail": "d", "acknowledged": None}

#: (policies, copy_risks) as the run role writes them, and a part `unreadable` must name.
ODD = {
    "plan a record": ({"name": "sms"}, [], "policies: a record, not a list"),
    "plan a number": (5, [], "policies: a number, not a list"),
    "plan a text": ("sms", [], "policies: a text, not a list"),
    "plan of texts": (["sms"], [], "policies[0]: a text, not a record"),
    "plan of nulls": ([None], [], "policies[0]: null, not a record"),
    "policy without name": (
        [{"retention_days": 90, "cutoff": "c"}], [], "policies[0].name: missing"
    ),
    "policy name a number": (
        [{**GOOD_POLICY, "name": 5}], [], "policies[0].name: a number, not a text"
    ),
    "policy name a list": (
        [{**GOOD_POLICY, "name": ["sms"]}], [], "policies[0].name: a list, not a text"
    ),
    "retention a text": (
        [{**GOOD_POLICY, "retention_days": "90"}], [],
        "policies[0].retention_days: a text, not a whole number",
    ),
    "retention true": (
        [{**GOOD_POLICY, "retention_days": True}], [],
        "policies[0].retention_days: true or false, not a whole number",
    ),
    "cutoff a record": (
        [{**GOOD_POLICY, "cutoff": {"a": 1}}], [], "policies[0].cutoff: a record, not a text"
    ),
    "oldest due a number": (
        [{**GOOD_POLICY, "oldest_due_at": 5}], [], "policies[0].oldest_due_at: a number, not a text"
    ),
    "risks a record": ([GOOD_POLICY], {"kind": "trigger"}, "copy_risks: a record, not a list"),
    "risks a text": ([GOOD_POLICY], "t", "copy_risks: a text, not a list"),
    "risks a number": ([GOOD_POLICY], 1, "copy_risks: a number, not a list"),
    "risks of numbers": ([GOOD_POLICY], [1, 2], "copy_risks[0]: a number, not a record"),
    "risk without name": (
        [GOOD_POLICY], [{"kind": "trigger"}], "copy_risks[0].name: missing"
    ),
    "risk kind a list": (
        [GOOD_POLICY], [{**GOOD_RISK, "kind": ["a"]}], "copy_risks[0].kind: a list, not a text"
    ),
    "risk acknowledged a number": (
        [GOOD_POLICY], [{**GOOD_RISK, "acknowledged": 1}],
        "copy_risks[0].acknowledged: a number, not a text",
    ),
}  # fmt: skip


def write_run(engine: Engine, url: str, policies: object, risks: object) -> str:
    """A run record with these documents, as the run role of `db grants` writes it; one its
    guards refuse (nested deeper than a flat record), as the owner with the guards off."""
    run_id = str(uuid.uuid4())
    start = START.replace(":risks", f"'{json.dumps(risks)}'")
    plan = PLAN.replace(":plan", f"'{json.dumps(policies)}'")
    try:
        execute_as(url, start, run_id=run_id)
        execute_as(url, plan, run_id=run_id)
    except DBAPIError:
        with engine.begin() as conn:
            guards_off(conn)
            conn.execute(text(f"DELETE FROM {RUNS} WHERE run_id = :r"), {"r": run_id})
            conn.execute(text(start.replace("current_user", "'someone'")), {"r": run_id})
            conn.execute(text(plan), {"r": run_id})
    return run_id


@pytest.mark.parametrize("case", list(ODD.values()), ids=list(ODD))
def test_audit_show_shows_what_is_readable_and_names_the_rest(
    engine: Engine, run_role: tuple[str, str], base: list[str], case: tuple[object, object, str]
) -> None:
    """Table and JSON: exit 0, no traceback, the readable fields as they are, the others
    None, each named in `unreadable` (and under "unreadable in the record:")."""
    policies, risks, named = case
    run_id = write_run(engine, run_role[1], policies, risks)
    shown = invoke(*base, "audit", "show", run_id, "--format", "json")
    assert shown.exit_code == 0 and shown.exception is None, shown.output
    document = json.loads(shown.stdout)
    assert any(named in u for u in document["unreadable"]), document["unreadable"]
    assert document["run_id"] == run_id and document["status"] == "running"
    for policy in document["policies"]:
        assert set(policy) == {
            "name", "retention_days", "cutoff", "grace_cutoff", "due_rows", "oldest_due_at",
            "rows_cleaned",
        }  # fmt: skip
    as_table = invoke(*base, "audit", "show", run_id)
    assert as_table.exit_code == 0 and as_table.exception is None, as_table.output
    assert "unreadable in the record:" in as_table.stdout and named in as_table.stdout


def test_a_well_formed_record_has_nothing_unreadable(
    engine: Engine, run_role: tuple[str, str], base: list[str]
) -> None:
    run_id = write_run(engine, run_role[1], [GOOD_POLICY], [GOOD_RISK])
    document = json.loads(invoke(*base, "audit", "show", run_id, "--format", "json").stdout)
    assert "unreadable" not in document
    assert document["copy_risks"] == [GOOD_RISK]
    assert document["policies"][0] == {
        **GOOD_POLICY, "grace_cutoff": None, "due_rows": None, "oldest_due_at": None,
        "rows_cleaned": 0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "by_policy", ['{"sms": "x"}', "[1, 2]", '"sms"', '{"sms": 1e300}', '{"sms": -4}']
)
def test_odd_chunk_counts_an_owner_wrote_are_left_out_of_the_sums(
    engine: Engine, run_role: tuple[str, str], base: list[str], by_policy: str
) -> None:
    """A chunk's counts per policy that are not whole numbers of a record (only an owner
    with the guards off can write them): left out of `rows_cleaned` per policy, never a
    database error."""
    run_id = write_run(engine, run_role[1], [GOOD_POLICY], [])
    with engine.begin() as conn:
        guards_off(conn)
        conn.execute(
            text(
                f"INSERT INTO {CHUNKS} (run_id, seq, first_id, last_id, rows, cleaned_at, "
                "by_policy, skipped_locked) VALUES (:r, 1, 1, 2, 2, now(), "
                f"CAST('{by_policy}' AS jsonb), false)"
            ),
            {"r": run_id},
        )
    shown = invoke(*base, "audit", "show", run_id, "--format", "json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["policies"][0]["rows_cleaned"] == 0
