"""The job's commands through the console script on the server under test: `db check`,
`verify`, `run`, `verify` again, `audit list` and `audit show` over one backlog (set up once for
the module, one test per claim). The compatibility matrix (`python -m tests.matrix`) runs it on
every PostgreSQL major version it covers; the normal suite on its own server."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from dispatch_retention.pg import engines
from tests.helpers import (
    Job,
    assert_consistent,
    assert_no_marker,
    config_text,
    fresh_database,
    run_script,
    seed_series,
    settings,
    snapshot,
    write_config,
)
from tests.oracle import binding_policy

ROWS = 200  # mixed types and statuses; every tenth one young (never due)


@dataclass(frozen=True)
class Cycle:
    """A backlog, and each command of the cycle as it ran on it, in this order."""

    engine: Engine
    due: set[int]
    by_policy: dict[str, int]  # the due rows each policy binds (the oracle's)
    check: Job  # db check
    before: Job  # verify, on the backlog
    run: Job  # run --chunk-size 50
    after: Job  # verify --format json
    listed: Job  # audit list --format json
    shown: Job  # audit show RUN_ID --format json
    shown_table: Job  # audit show RUN_ID

    def finished(self) -> dict[str, Any]:
        """The run's `run_finished` event."""
        return self.run.last("run_finished")


@pytest.fixture(scope="module")
def cycle(
    server_url: URL, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cycle]:
    """200 dispatches, 180 of them due, then the commands one after another (the console
    script's environment is without the ambient job settings: `script_env`)."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database(server_url, template_db))
        engine = engines.make_engine(url)
        stack.callback(engine.dispose)
        due, _young = seed_series(engine, range(1, ROWS + 1), lambda i: i % 10 == 0, mixed=True)
        rows, s = snapshot(engine), settings()
        by_policy = dict(Counter(binding_policy(rows[i], s).name for i in due))

        target = url.set(drivername="postgresql").render_as_string(hide_password=False)
        config = write_config(tmp_path_factory.mktemp("smoke") / "retention.toml", config_text())
        check = run_script(target, config, "db", "check")
        before = run_script(target, config, "verify")
        run = run_script(target, config, "run", "--chunk-size", "50")
        after = run_script(target, config, "verify", "--format", "json")
        listed = run_script(target, config, "audit", "list", "--format", "json")
        run_id = run.last("run_started")["run_id"]
        shown = run_script(target, config, "audit", "show", run_id, "--format", "json")
        shown_table = run_script(target, config, "audit", "show", run_id)
        yield Cycle(engine, due, by_policy, check, before, run, after, listed, shown, shown_table)


def test_db_check_finds_the_prepared_database_ready(cycle: Cycle) -> None:
    """`db check` exits 0 and finds the table, its indexes and the audit schema in order."""
    assert cycle.check.returncode == 0, cycle.check.stdout + cycle.check.stderr
    lines = cycle.check.stdout.splitlines()
    assert [line for line in lines if line.startswith("[error")] == []
    ok = [line.split("] ", 1)[1].split(":", 1)[0] for line in lines if line.startswith("[ok")]
    assert {"target", "columns", "copy risk", "audit schema"} <= set(ok), lines
    assert ok.count("index") == len(settings().policies), lines


def test_verify_reports_the_backlog_before_the_run(cycle: Cycle) -> None:
    """`verify` on the backlog exits 5 and counts every due dispatch as a violation."""
    assert cycle.before.returncode == 5, cycle.before.stdout + cycle.before.stderr
    expected = f"VIOLATION: {len(cycle.due)} dispatches past their window still hold personal"
    assert expected in cycle.before.stdout


def test_run_cleans_exactly_the_due_rows_in_chunks(cycle: Cycle) -> None:
    """`run` exits 0, succeeded; it cleaned the due rows, no other, each once in the trail."""
    assert cycle.run.returncode == 0, cycle.run.stderr
    finished = cycle.finished()
    assert f"Run {finished['run_id']}: succeeded" in cycle.run.stdout
    assert (finished["status"], finished["rows_cleaned"], finished["remaining_due_rows"]) == (
        "succeeded",
        len(cycle.due),
        0,
    )
    assert finished["by_policy"] == cycle.by_policy
    assert finished["chunks"] == len(cycle.run.events("chunk_committed")) == ROWS // 50
    assert assert_consistent(cycle.engine, cycle.due) == cycle.due


def test_verify_passes_after_the_run(cycle: Cycle) -> None:
    """`verify --format json` after the run exits 0: no violation, every due row cleaned."""
    assert cycle.after.returncode == 0, cycle.after.stdout + cycle.after.stderr
    report = json.loads(cycle.after.stdout)
    assert (report["ok"], report["violation_rows"], report["cleaned_rows"]) == (
        True,
        0,
        len(cycle.due),
    )


def test_audit_list_shows_the_run(cycle: Cycle) -> None:
    """`audit list` lists the one run, succeeded, with the rows it cleaned."""
    assert cycle.listed.returncode == 0, cycle.listed.stderr
    listed = [
        (r["run_id"], r["status"], r["rows_cleaned"]) for r in json.loads(cycle.listed.stdout)
    ]
    assert listed == [(cycle.finished()["run_id"], "succeeded", len(cycle.due))]


def test_audit_show_credits_each_policy(cycle: Cycle) -> None:
    """`audit show` tells the run's status and the rows it cleaned under each policy."""
    assert cycle.shown.returncode == 0, cycle.shown.stderr
    shown = json.loads(cycle.shown.stdout)
    assert (shown["status"], shown["rows_cleaned"]) == ("succeeded", len(cycle.due))
    assert {p["name"]: p["rows_cleaned"] for p in shown["policies"]} == cycle.by_policy
    assert cycle.shown_table.returncode == 0, cycle.shown_table.stderr
    assert "status              succeeded" in cycle.shown_table.stdout


def test_no_command_prints_personal_data(cycle: Cycle) -> None:
    """No command of the cycle prints a personal value, on stdout or in its logs."""
    for job in (cycle.check, cycle.before, cycle.run, cycle.after, cycle.listed, cycle.shown):
        assert_no_marker(job.stdout, job.stderr)
    assert_no_marker(cycle.shown_table.stdout, cycle.shown_table.stderr)
