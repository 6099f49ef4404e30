"""README "Real tables": on each table shape an application makes (tests/real_tables.py),
the oracle (tests/oracle.py, in the API's words) decides: exactly the due rows are cleaned,
and every other row is byte-identical (`to_jsonb` of the row before and after); `verify`
then finds nothing and exits 5 once a row is overdue again; the audit trail counts what was
cleaned; every statement `db check` prints is accepted; partitions come and go.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention import config
from tests import oracle
from tests.helpers import DAY, MARK, db_now, granted_role, invoke, run_job, script
from tests.real_tables import (
    PERSONAL,
    POLICIES,
    VARIANTS,
    Table,
    api_rows,
    due_ids,
    image,
    image_without,
    insert,
    make_table,
)


@pytest.fixture(params=VARIANTS, ids=[v.name for v in VARIANTS])
def real_table(request: Any, engine: Engine, url_string: str, tmp_path: Path) -> Table:
    """Each table shape in turn, seeded, with its config."""
    return make_table(request.param, engine, url_string, tmp_path)


def test_a_run_cleans_exactly_the_due_rows_and_leaves_every_other_byte_identical(
    real_table: Table,
) -> None:
    t = real_table
    before = image(t.engine, t.variant)
    kept_part = ("cleaned_at", "updated_at", *PERSONAL, *t.variant.extra)
    before_rest = image_without(t.engine, t.variant, kept_part)
    outcome = run_job(t.engine, t.settings)
    assert outcome.status.value == "succeeded", outcome.error
    assert outcome.plan is not None
    due = due_ids(t, outcome.plan.rules.now)
    assert 0 < len(due) < len(t.rows)
    after = image(t.engine, t.variant)
    after_rest = image_without(t.engine, t.variant, kept_part)
    changed = {i for i in before if before[i] != after[i]}
    assert changed == due
    assert all(before_rest[i] == after_rest[i] for i in due)  # only the cleaned columns
    with t.engine.connect() as conn:
        extra = "".join(f", {c}" for c in t.variant.extra)
        cleaned = conn.execute(
            text(
                f"SELECT id, content::text, msisdn, email, app_token{extra} "
                f"FROM {t.variant.table} WHERE cleaned_at IS NOT NULL"
            )
        ).all()
    assert {r[0] for r in cleaned} == due
    emptied = ("{}", None, None, None, *(value for _, value in t.variant.extra.values()))
    assert all(tuple(r[1:]) == emptied for r in cleaned)
    assert outcome.rows_cleaned == len(due)


def test_verify_finds_nothing_after_a_run_and_exit_5_for_an_overdue_row(
    real_table: Table,
) -> None:
    t = real_table
    base = ["--config", str(t.config), "--database-url", t.url]
    assert run_job(t.engine, t.settings).status.value == "succeeded"
    clean_bill = script(*base, "verify")
    assert clean_bill.returncode == 0, clean_bill.stdout + clean_bill.stderr
    overdue = {**t.rows[0], "id": 10_000, "transmission_status": "failed"}
    overdue["created_at"] = db_now(t.engine) - 400 * DAY
    insert(t.engine, t.variant, [overdue])
    caught = script(*base, "verify")
    assert caught.returncode == 5, caught.stdout + caught.stderr
    assert MARK not in caught.stdout + caught.stderr


def test_the_read_only_role_reports_through_the_view_what_the_owner_reads_in_the_table(
    real_table: Table, database_url: URL
) -> None:
    """verify as the read-only role of `db grants` (which counts through the view, made
    for the table's own column types) is the owner's report on every shape: before a run,
    and after one with a row written back."""
    t = real_table

    def reports(*urls: str) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for url in urls:
            done = invoke("--config", str(t.config), "--database-url", url, "verify",
                          "--format", "json")  # fmt: skip
            assert done.exit_code in (0, 5), done.output
            document = json.loads(done.stdout)
            document.pop("checked_at")
            out.append((done.exit_code, document))
        return out

    with granted_role(t.engine, database_url, "read-only", t.settings) as (_, ro_url):
        owner, read_only = reports(t.url, ro_url)
        assert owner == read_only and owner[0] == 5
        assert run_job(t.engine, t.settings).status.value == "succeeded"
        with t.engine.begin() as conn:
            conn.execute(
                text(
                    f"UPDATE {t.variant.table} SET msisdn = '+4700000000' WHERE id = "
                    f"(SELECT min(id) FROM {t.variant.table} WHERE cleaned_at IS NOT NULL)"
                )
            )
        owner, read_only = reports(t.url, ro_url)
        assert owner == read_only
        assert owner[1]["anomalies"]["written_back_rows"] == 1


def test_the_audit_trail_counts_what_the_run_cleaned(real_table: Table) -> None:
    """The chunks add up to the stamped rows, `audit show` says so, and `audit verify` finds
    every chunk's count in the table (its stamp compared as the column keeps it)."""
    t = real_table
    outcome = run_job(t.engine, t.settings)
    with t.engine.connect() as conn:
        audited = conn.execute(
            text("SELECT coalesce(sum(rows), 0) FROM dispatch_retention.chunks")
        ).scalar_one()
        stamped = conn.execute(
            text(f"SELECT count(*) FROM {t.variant.table} WHERE cleaned_at IS NOT NULL")
        ).scalar_one()
    assert audited == stamped == outcome.rows_cleaned > 0
    shown = script("--config", str(t.config), "--database-url", t.url, "audit", "show",
                   outcome.run_id, "--format", "json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["rows_cleaned"] == outcome.rows_cleaned
    checked = script("--config", str(t.config), "--database-url", t.url, "audit", "verify",
                     "--format", "json")  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["chunks_counted"] == outcome.chunks


# --- what depends on the table is checked on connecting ----------------------------------------

STATEMENT = re.compile(r"((?:CREATE|ALTER|DROP) INDEX [^;]*;)")


def advised(report: str) -> str:
    """What `db check` asks for: its findings but the `ok` ones (which show the index they
    found)."""
    return "\n".join(line for line in report.splitlines() if not line.startswith("[ok"))


def test_every_statement_db_check_prints_is_accepted_and_then_serves_the_plan(
    real_table: Table,
) -> None:
    """`db check` on the table as the application made it: every index statement it prints
    runs on the server as printed (one by one, outside a transaction, as the advice says),
    then the VACUUM (ANALYZE) it advises; then it reports every policy index present and a
    run plans through them."""
    t = real_table
    base = ["--config", str(t.config), "--database-url", t.url, "db", "check"]
    advice = script(*base)
    statements = STATEMENT.findall(advised(advice.stdout))
    assert statements, advice.stdout
    with t.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.execute(text(statement))
        conn.execute(text(f"VACUUM (ANALYZE) {t.settings.target.table}"))
    again = script(*base)
    assert not STATEMENT.findall(advised(again.stdout)), again.stdout
    assert "[warn ] index" not in again.stdout and "[ok   ] index" in again.stdout
    outcome = run_job(t.engine, t.settings)
    assert outcome.plan is not None and outcome.plan.through_indexes
    assert outcome.status.value == "succeeded"


def test_partitions_attached_and_detached_between_runs(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Due rows in several partitions are cleaned by one run; then one partition is detached
    (archived: no longer the job's) and a new one attached holding due rows; the next run
    cleans exactly the new one's due rows and leaves the detached one as it was."""
    partitioned = next(v for v in VARIANTS if v.name.startswith("partitioned"))
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(partitioned.ddl))
    now = db_now(engine)
    rows = api_rows(now, 500, seed=5)
    insert(engine, partitioned, rows)
    s = config.parse(f"[clean]\n{POLICIES}")
    first = run_job(engine, s)
    assert first.plan is not None
    due = {r["id"] for r in rows if oracle.is_due(r, s, first.plan.rules.now)}
    with engine.connect() as conn:
        spread = conn.execute(
            text("SELECT count(DISTINCT tableoid) FROM dispatches WHERE id = ANY(:ids)"),
            {"ids": sorted(due)},
        ).scalar_one()
    assert spread >= 2 and first.rows_cleaned == len(due)

    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatches DETACH PARTITION dispatches_old"))
        conn.execute(text("UPDATE dispatches_old SET cleaned_at = NULL, msisdn = 'x'"))
        conn.execute(
            text(
                "CREATE TABLE dispatches_old2 (LIKE dispatches INCLUDING DEFAULTS);"
                "ALTER TABLE dispatches ATTACH PARTITION dispatches_old2 "
                "FOR VALUES FROM (MINVALUE) TO ('2024-01-01')"
            )
        )
    archived = image(engine, replace(partitioned, table="dispatches_old"))
    old = [
        {**r, "id": 100_000 + r["id"], "created_at": datetime(2023, 6, 1, tzinfo=UTC)}
        for r in rows[:40]
    ]
    insert(engine, partitioned, old)
    second = run_job(engine, s)
    assert second.plan is not None
    due_new = {r["id"] for r in old if oracle.is_due(r, s, second.plan.rules.now)}
    assert due_new and second.rows_cleaned == len(due_new)
    with engine.connect() as conn:
        cleaned_new = set(
            conn.execute(
                text("SELECT id FROM dispatches_old2 WHERE cleaned_at IS NOT NULL")
            ).scalars()
        )
    assert cleaned_new == due_new
    assert image(engine, replace(partitioned, table="dispatches_old")) == archived
