"""`run --format json` and `run --dry-run --format json`: one document on stdout, the keys
docs/operations.md documents, each equal to what the run did or the table holds; the dry
run says when a real run would be refused or limited."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sqlalchemy import Engine

from dispatch_retention.rule.plans import Limits
from tests.helpers import config_text, invoke, run_records, seed_series, snapshot, write_config

PLAN_KEYS = {"now", "due_rows", "held_rows", "waiting_grace_rows", "due_blocks",
             "through_indexes", "policies"}  # fmt: skip
OUTCOME_KEYS = {"rows_cleaned", "rows_recleaned", "chunks", "by_policy", "remaining_due_rows",
                "remaining_reason", "stopped_by", "error", "missed_rows", "written_back_rows",
                "replica_wait_s", "chain_head"}  # fmt: skip


def test_the_dry_run_document_is_the_plan_and_writes_nothing(
    engine: Engine, base: list[str]
) -> None:
    seed_series(engine, range(1, 41))
    before = snapshot(engine)
    result = invoke(*base, "run", "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"run_id", "status", "exit_code", "plan", "limits"}
    assert (doc["status"], doc["exit_code"]) == ("planned", 0)
    assert set(doc["plan"]) == PLAN_KEYS and doc["plan"]["due_rows"] == 40
    assert sum(p["due_rows"] for p in doc["plan"]["policies"]) == 40
    assert doc["limits"] == {
        "would_refuse": False,
        "refuse_above_rows": None,
        "row_budget": None,
        "row_budget_from": None,
        "would_clean_up_to": 40,
    }
    assert snapshot(engine) == before and run_records(engine) == {}


@pytest.mark.parametrize(
    ("guard", "option", "limits", "said"),
    [
        ("refuse_above_rows = 30", [], (True, 0), "a run would be refused:"),
        ("max_rows_per_run = 25", [], (False, 25), "up to 25 of them (guard.max_rows_per_run)"),
        (
            "max_rows_per_run = 25",
            ["--max-rows", "12"],
            (False, 12),
            "up to 12 of them (--max-rows)",
        ),
        ("refuse_above_rows = 30", ["--force"], (False, 40), None),
    ],
)
def test_the_dry_run_says_when_a_run_would_be_refused_or_limited(
    engine: Engine, url_string: str, tmp_path: Path, guard: str, option: list[str],
    limits: tuple[bool, int], said: str | None,
) -> None:  # fmt: skip
    seed_series(engine, range(1, 41))
    config = write_config(tmp_path / "r.toml", config_text(guard=guard))
    base = ["--config", str(config), "--database-url", url_string, "run", "--dry-run", *option]
    doc = json.loads(invoke(*base, "--format", "json").stdout)
    assert (doc["limits"]["would_refuse"], doc["limits"]["would_clean_up_to"]) == limits
    text = invoke(*base).stdout
    if said is None:
        assert "a run would" not in text
    else:
        assert said in text


def test_the_run_document_says_how_it_ended(engine: Engine, base: list[str]) -> None:
    seed_series(engine, range(1, 41))
    result = invoke(*base, "run", "--yes", "--format", "json", "--max-rows", "15",
                    "--chunk-size", "5")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    ((run_id, record),) = run_records(engine).items()
    assert doc["run_id"] == run_id and doc["status"] == record["status"] == "incomplete"
    assert set(doc["outcome"]) == OUTCOME_KEYS
    out = doc["outcome"]
    assert out["rows_cleaned"] == record["audited_rows"] == 15
    assert out["remaining_due_rows"] == 25 and out["stopped_by"] == "max_rows"
    assert sum(out["by_policy"].values()) == 15 and out["chain_head"]
    assert doc["limits"]["would_clean_up_to"] == 15


def test_limits_take_the_smaller_budget_and_the_option_on_a_tie() -> None:
    from dispatch_retention.config import Guard
    from dispatch_retention.vocabulary import Options

    guard = Guard(max_rows_per_run=10)
    assert Limits.of(50, guard, Options(max_rows=10)).budget_name == "max_rows"
    assert Limits.of(50, guard, Options(max_rows=11)).budget_name == "max_rows_per_run"
    assert Limits.of(5, guard, Options()).to_clean == 5
    refusing = Guard(refuse_above_rows=4)
    assert Limits.of(5, refusing, Options()).refused
    assert not Limits.of(5, refusing, Options(), force=True).refused
    assert not Limits.of(4, refusing, Options()).refused


def test_on_the_console_the_plan_event_is_a_short_line_not_a_repr(
    engine: Engine, base: list[str]
) -> None:
    """`--log-format console`: the plan's policies as `name=due` pairs; every line short."""
    seed_series(engine, range(1, 41))
    result = invoke("--log-format", "console", *base, "run", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = re.sub(r"\x1b\[[0-9;]*m", "", result.stderr).splitlines()  # the console's colours
    (plan,) = [line for line in lines if " plan " in line]
    assert "policies='failed-sends=0 sms=40 default=0'" in plan and "{'name'" not in plan
    assert max(len(line) for line in lines) < 400  # it was about 600
