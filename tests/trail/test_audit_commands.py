"""`audit list` and `audit show` over one run of every final status (set up once for the
module, one test per claim); commands refuse without the audit schema until `db upgrade`.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention.pg import engines
from dispatch_retention.render import LIST_COLUMNS
from dispatch_retention.run import job
from dispatch_retention.trail import run_record
from dispatch_retention.vocabulary import Hooks, Options, Request, Stop
from tests.helpers import (
    AMBIENT,
    DAY,
    as_json_lines,
    cleaned_count,
    config_text,
    db_now,
    dispatch,
    fresh_database,
    guards_off,
    insert_rows,
    invoke,
    seed_series,
    settings,
    snapshot,
    write_config,
)
from tests.trail.harness import (
    SCHEMA,
    TABLES,
    assert_chunks_account_for_every_cleaned_row,
    audit_list,
    audit_show,
    chunk_records,
    every_tenth_young,
    schema_tables,
)

# --- 7. audit list / audit show over one run of every final status ---------------------------

#: Rows each run cleaned. Windows start at the due block's first id (0), so with
#: --chunk-size 5 the first chunk is ids 0-4: rows 1-4.
EXPECTED_ROWS = {
    "abandoned": 0,
    "refused": 0,
    "failed": 4,
    "interrupted": 5,
    "cancelled": 0,
    "incomplete": 7,
    "succeeded": 44,
}
STATUSES = list(EXPECTED_ROWS)


@dataclass(frozen=True)
class EveryStatus:
    """A database holding one run of every final status, and what `audit list` says of it."""

    engine: Engine
    base: list[str]
    now: datetime
    ids: dict[str, str]  # run id by status
    listed: list[dict[str, Any]]  # `audit list --format json`


@pytest.fixture(scope="module")
def every_status(
    server_url: URL, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EveryStatus]:
    """60 due dispatches, then runs ending abandoned (killed long ago), refused, failed,
    interrupted, cancelled, incomplete and succeeded (by cron): set up once for the module."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database(server_url, template_db))
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for name in AMBIENT:
            patch.delenv(name, raising=False)
        engine = engines.make_engine(url)
        stack.callback(engine.dispose)
        url_string = url.set(drivername="postgresql").render_as_string(hide_password=False)
        tmp = tmp_path_factory.mktemp("every_status")
        base = ["--config", str(write_config(tmp / "retention.toml", config_text()))]
        base += ["--database-url", url_string]
        yield EveryStatus(engine, base, db_now(engine), *_run_every_status(engine, base, tmp))


def _run_every_status(
    engine: Engine, base: list[str], tmp: Path
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    now = db_now(engine)
    insert_rows(
        engine,
        (dispatch(i, now - 500 * DAY, type=("sms", "email")[i % 2]) for i in range(1, 61)),
    )
    s = settings()
    ids: dict[str, str] = {}

    ids["abandoned"] = "00000000-0000-4000-8000-000000000001"
    run_record.RunRecord(engine, TABLES, ids["abandoned"]).start(s, Options())
    with engine.begin() as conn:  # a run killed long ago: a forgery the guards refuse
        guards_off(conn)
        conn.execute(
            text(f"UPDATE {SCHEMA}.runs SET started_at = '2020-03-01T00:00:00Z' WHERE run_id = :r"),
            {"r": ids["abandoned"]},
        )

    guarded = write_config(tmp / "guard.toml", config_text(guard="refuse_above_rows = 1"))
    refused = invoke("--config", str(guarded), *base[2:], "run", "--yes")
    assert refused.exit_code == 4, refused.output
    ids["refused"] = as_json_lines(refused.stderr)[0]["run_id"]

    def fail(seq: int) -> None:
        if seq == 2:
            raise RuntimeError("injected")

    failed = job.run(
        engine, s, Request(Options(chunk_size=5)), stop=Stop(), hooks=Hooks(fail_in_chunk=fail)
    )
    ids["failed"] = failed.run_id

    stop = Stop()
    interrupted = job.run(
        engine,
        s,
        Request(Options(chunk_size=5)),
        stop=stop,
        hooks=Hooks(on_chunk=lambda _c: stop.request(15)),
    )
    ids["interrupted"] = interrupted.run_id

    cancelled = job.run(engine, s, Request(), stop=Stop(), hooks=Hooks(confirm=lambda _plan: False))
    ids["cancelled"] = cancelled.run_id

    incomplete = invoke(*base, "run", "--max-rows", "7", "--chunk-size", "5")
    assert incomplete.exit_code == 0, incomplete.output
    ids["incomplete"] = as_json_lines(incomplete.stderr)[0]["run_id"]

    succeeded = invoke(*base, "run", env={"DISPATCH_RETENTION_TRIGGER": "cron"})
    assert succeeded.exit_code == 0, succeeded.output
    ids["succeeded"] = as_json_lines(succeeded.stderr)[0]["run_id"]
    return ids, audit_list(base)


def test_audit_list_names_every_run_with_its_final_status(every_status: EveryStatus) -> None:
    """`audit list` shows each run once, with the status it ended in."""
    ids = every_status.ids
    assert {r["run_id"]: r["status"] for r in every_status.listed} == {v: k for k, v in ids.items()}


def test_audit_list_totals_are_the_rows_each_run_cleaned(every_status: EveryStatus) -> None:
    """`rows_cleaned` of each run is what it cleaned, 0 for the runs that cleaned nothing."""
    assert {r["status"]: r["rows_cleaned"] for r in every_status.listed} == EXPECTED_ROWS


def test_audit_list_is_newest_first(every_status: EveryStatus) -> None:
    """Runs are listed by start, newest first: the run abandoned long ago comes last."""
    listed = every_status.listed
    assert [r["started_at"] for r in listed] == sorted(
        (r["started_at"] for r in listed), reverse=True
    )
    assert listed[-1]["run_id"] == every_status.ids["abandoned"]


def test_audit_list_records_the_trigger(every_status: EveryStatus) -> None:
    """A run started with DISPATCH_RETENTION_TRIGGER=cron is listed with trigger `cron`."""
    triggers = {r["run_id"]: r["trigger"] for r in every_status.listed}
    assert triggers[every_status.ids["succeeded"]] == "cron"


def test_the_chunk_records_account_for_every_cleaned_row(every_status: EveryStatus) -> None:
    """All 60 dispatches are cleaned across the runs, each in exactly one chunk record."""
    assert cleaned_count(every_status.engine) == 60 == sum(EXPECTED_ROWS.values())
    assert_chunks_account_for_every_cleaned_row(every_status.engine)


def test_audit_list_limit_keeps_the_newest_runs(every_status: EveryStatus) -> None:
    """`--limit 2` lists the two newest runs."""
    assert [r["run_id"] for r in audit_list(every_status.base, "--limit", "2")] == [
        r["run_id"] for r in every_status.listed[:2]
    ]


def test_audit_list_since_keeps_the_runs_started_on_or_after_that_day(
    every_status: EveryStatus,
) -> None:
    """`--since DAY` drops the runs started before DAY: none is left after tomorrow."""
    base, ids = every_status.base, every_status.ids
    assert {r["run_id"] for r in audit_list(base, "--since", "2021-01-01")} == set(ids.values()) - {
        ids["abandoned"]
    }
    tomorrow = (every_status.now.date() + timedelta(days=1)).isoformat()
    assert audit_list(base, "--since", tomorrow) == []


def test_audit_list_refuses_a_since_that_is_not_an_iso_date(every_status: EveryStatus) -> None:
    """`--since 01/02/2021` is a usage error (exit 2)."""
    assert invoke(*every_status.base, "audit", "list", "--since", "01/02/2021").exit_code == 2


def test_audit_list_as_csv_has_the_list_columns_and_every_run(every_status: EveryStatus) -> None:
    """`--format csv` has the LIST_COLUMNS header and one row per run with its total."""
    as_csv = invoke(*every_status.base, "audit", "list", "--format", "csv")
    assert as_csv.exit_code == 0
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(parsed[0]) == list(LIST_COLUMNS)
    assert {r["run_id"]: (r["status"], int(r["rows_cleaned"])) for r in parsed} == {
        every_status.ids[k]: (k, n) for k, n in EXPECTED_ROWS.items()
    }


def test_audit_list_as_a_table_has_a_header_and_a_line_per_run(every_status: EveryStatus) -> None:
    """The table fits 100 columns (NARROW_COLUMNS); `--wide` names every LIST_COLUMNS; each
    run has a line with its status in both."""
    as_table = invoke(*every_status.base, "audit", "list")
    wide = invoke(*every_status.base, "audit", "list", "--wide")
    assert as_table.exit_code == wide.exit_code == 0
    assert as_table.stdout.splitlines()[0].split() == [
        "run_id", "status", "trigger", "started", "(UTC)", "cleaned", "left"
    ]  # fmt: skip
    assert max(len(line) for line in as_table.stdout.splitlines()) <= 100
    assert wide.stdout.splitlines()[0].split() == list(LIST_COLUMNS)
    for shown in (as_table, wide):
        for status, run_id in every_status.ids.items():
            assert any(run_id in line and status in line for line in shown.stdout.splitlines())


@pytest.mark.parametrize("status", STATUSES)
def test_audit_show_totals_are_the_chunk_sums(every_status: EveryStatus, status: str) -> None:
    """`audit show --format json` of a run: its id, status, the sum of its chunk records as
    `rows_cleaned`, a start before its end, and who ran it with which config."""
    run_id = every_status.ids[status]
    doc = audit_show(every_status.base, run_id)
    chunk_sum = sum(c["rows"] for c in chunk_records(every_status.engine, run_id))
    assert (doc["run_id"], doc["status"]) == (run_id, status)
    assert doc["rows_cleaned"] == chunk_sum == EXPECTED_ROWS[status]
    assert doc["started_at"] <= doc["finished_at"]
    assert set(doc) >= {"trigger", "host", "tool_version", "config_sha256", "config_text"}


def test_audit_show_of_a_run_killed_before_it_planned_has_no_policies(
    every_status: EveryStatus,
) -> None:
    """The abandoned run never planned: `policies` is empty."""
    assert audit_show(every_status.base, every_status.ids["abandoned"])["policies"] == []


PLANNED = [status for status in STATUSES if status != "abandoned"]


@pytest.mark.parametrize("status", PLANNED)
def test_audit_show_credits_each_policy_at_planned_at_minus_its_retention(
    every_status: EveryStatus, status: str
) -> None:
    """A planned run lists the policies shortest retention first, each cutoff `planned_at`
    minus its retention, and the policies' rows sum to the run's chunk records."""
    run_id = every_status.ids[status]
    doc = audit_show(every_status.base, run_id)
    chunk_sum = sum(c["rows"] for c in chunk_records(every_status.engine, run_id))
    planned_at = datetime.fromisoformat(doc["planned_at"])
    assert [p["name"] for p in doc["policies"]] == ["failed-sends", "sms", "default"]
    for p in doc["policies"]:
        assert set(p) >= {"name", "retention_days", "cutoff", "rows_cleaned"}
        cutoff = datetime.fromisoformat(p["cutoff"])
        assert planned_at - cutoff == timedelta(days=p["retention_days"])
    assert sum(p["rows_cleaned"] for p in doc["policies"]) == chunk_sum


@pytest.mark.parametrize("status", PLANNED)
def test_audit_show_as_a_table_names_the_run_its_policies_and_config(
    every_status: EveryStatus, status: str
) -> None:
    """The table starts with the run id and status, has a line per policy and the config."""
    run_id = every_status.ids[status]
    table = invoke(*every_status.base, "audit", "show", run_id)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["run_id", run_id]
    assert lines[1].split() == ["status", status]
    assert any(line.split()[:2] == ["sms", "90"] for line in lines)
    assert "config:" in lines


def test_audit_show_refuses_a_run_id_that_is_not_a_uuid(every_status: EveryStatus) -> None:
    """`audit show not-a-uuid` is a usage error (exit 2)."""
    assert invoke(*every_status.base, "audit", "show", "not-a-uuid").exit_code == 2


def test_audit_show_of_an_unknown_run_is_a_usage_error(every_status: EveryStatus) -> None:
    """`audit show` of a well-formed id no run has exits 2 saying so (bad input: a retry
    cannot help), as an id that is not one does."""
    missing = invoke(*every_status.base, "audit", "show", "00000000-0000-4000-8000-0000000000ff")
    assert missing.exit_code == 2 and "no run" in missing.output


# --- 8. the audit schema must exist ----------------------------------------------------------


def test_commands_refuse_without_the_audit_schema_until_db_upgrade(
    engine: Engine, base: list[str]
) -> None:
    """Without the audit schema run and dry-run exit 2 naming `db upgrade`, which creates it."""
    seed_series(engine, range(1, 21), every_tenth_young, mixed=True)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {SCHEMA} CASCADE"))
    before = snapshot(engine)
    for args in (["run", "--yes"], ["run", "--dry-run"], ["verify"], ["audit", "list"]):
        result = invoke(*base, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "db upgrade" in result.stderr
        assert "Traceback" not in result.output
    assert snapshot(engine) == before
    assert schema_tables(engine) == []  # run never creates the tables itself

    first = invoke(*base, "db", "upgrade")
    assert first.exit_code == 0, first.output
    assert "migrated from nothing to" in first.stdout
    assert {"runs", "chunks", "legal_holds"} <= set(schema_tables(engine))
    second = invoke(*base, "db", "upgrade")
    assert second.exit_code == 0
    assert "up to date" in second.stdout

    with engine.begin() as conn:  # a database left behind by an older release
        conn.execute(
            text(f"UPDATE {SCHEMA}.dispatch_retention_alembic_version SET version_num = '0000'")
        )
    behind = invoke(*base, "run", "--yes")
    assert behind.exit_code == 2
    assert "db upgrade" in behind.stderr
    assert snapshot(engine) == before
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {SCHEMA} CASCADE"))
    assert invoke(*base, "db", "upgrade").exit_code == 0
    done = invoke(*base, "run", "--yes")
    assert done.exit_code == 0, done.output
    assert cleaned_count(engine) == 18
