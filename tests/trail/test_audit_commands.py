"""`audit list` and `audit show` over every final status; commands refuse without the audit
schema until `db upgrade`.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, text

from dispatch_retention import audit, job
from dispatch_retention.output import LIST_COLUMNS
from dispatch_retention.vocabulary import Hooks, Options, Request, Stop

from ..helpers import (
    DAY,
    as_json_lines,
    config_text,
    db_now,
    dispatch,
    insert_rows,
    invoke,
    settings,
    snapshot,
    write_config,
)
from .harness import (
    SCHEMA,
    TABLES,
    assert_chunks_account_for_every_cleaned_row,
    audit_list,
    audit_show,
    bulk_seed,
    chunk_records,
    cleaned_count,
    schema_tables,
)

# --- 7. audit list / audit show --------------------------------------------------------------


def test_audit_list_and_show_cover_every_final_status(
    engine: Engine, base: list[str], url_string: str, tmp_path: Path
) -> None:
    """Runs of every final status read back in all formats; totals are the chunk sums."""
    now = db_now(engine)
    insert_rows(
        engine,
        (dispatch(i, now - 500 * DAY, type=("sms", "email")[i % 2]) for i in range(1, 61)),
    )
    s = settings()
    ids: dict[str, str] = {}

    ids["abandoned"] = "00000000-0000-4000-8000-000000000001"
    audit.RunRecord(engine, TABLES, ids["abandoned"]).start(s, Options())
    with engine.begin() as conn:  # a run killed long ago
        conn.execute(
            text(f"UPDATE {SCHEMA}.runs SET started_at = '2020-03-01T00:00:00Z' WHERE run_id = :r"),
            {"r": ids["abandoned"]},
        )

    guarded = write_config(tmp_path / "guard.toml", config_text(guard="refuse_above_rows = 1"))
    refused = invoke("--config", str(guarded), "--database-url", url_string, "run", "--yes")
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

    # Windows start at the due block's first id (0), so with --chunk-size 5 the first chunk
    # is ids 0-4: rows 1-4.
    expected_rows = {
        "abandoned": 0,
        "refused": 0,
        "failed": 4,
        "interrupted": 5,
        "cancelled": 0,
        "incomplete": 7,
        "succeeded": 44,
    }
    listed = audit_list(base)
    assert {r["run_id"]: r["status"] for r in listed} == {v: k for k, v in ids.items()}
    assert {r["status"]: r["rows_cleaned"] for r in listed} == expected_rows
    assert [r["started_at"] for r in listed] == sorted(
        (r["started_at"] for r in listed), reverse=True
    )
    assert listed[-1]["run_id"] == ids["abandoned"]
    assert {r["run_id"]: r["trigger"] for r in listed}[ids["succeeded"]] == "cron"
    assert cleaned_count(engine) == 60 == sum(expected_rows.values())
    assert_chunks_account_for_every_cleaned_row(engine)

    assert [r["run_id"] for r in audit_list(base, "--limit", "2")] == [
        r["run_id"] for r in listed[:2]
    ]
    assert {r["run_id"] for r in audit_list(base, "--since", "2021-01-01")} == set(ids.values()) - {
        ids["abandoned"]
    }
    tomorrow = (now.date() + timedelta(days=1)).isoformat()
    assert audit_list(base, "--since", tomorrow) == []
    assert invoke(*base, "audit", "list", "--since", "01/02/2021").exit_code == 2

    as_csv = invoke(*base, "audit", "list", "--format", "csv")
    assert as_csv.exit_code == 0
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(parsed[0]) == list(LIST_COLUMNS)
    assert {r["run_id"]: (r["status"], int(r["rows_cleaned"])) for r in parsed} == {
        ids[k]: (k, n) for k, n in expected_rows.items()
    }
    as_table = invoke(*base, "audit", "list")
    assert as_table.exit_code == 0
    assert as_table.stdout.splitlines()[0].split() == list(LIST_COLUMNS)
    for status, run_id in ids.items():
        assert any(run_id in line and status in line for line in as_table.stdout.splitlines())

    for status, run_id in ids.items():
        doc = audit_show(base, run_id)
        chunk_sum = sum(c["rows"] for c in chunk_records(engine, run_id))
        assert (doc["run_id"], doc["status"]) == (run_id, status)
        assert doc["rows_cleaned"] == chunk_sum == expected_rows[status]
        assert doc["started_at"] <= doc["finished_at"]
        assert set(doc) >= {"trigger", "host", "tool_version", "config_sha256", "config_text"}
        if status == "abandoned":  # killed before it planned
            assert doc["policies"] == []
            continue
        planned_at = datetime.fromisoformat(doc["planned_at"])
        assert [p["name"] for p in doc["policies"]] == ["failed-sends", "sms", "default"]
        for p in doc["policies"]:
            assert set(p) >= {"name", "retention_days", "cutoff", "rows_cleaned"}
            cutoff = datetime.fromisoformat(p["cutoff"])
            assert planned_at - cutoff == timedelta(days=p["retention_days"])
        assert sum(p["rows_cleaned"] for p in doc["policies"]) == chunk_sum
        table = invoke(*base, "audit", "show", run_id)
        assert table.exit_code == 0
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["run_id", run_id]
        assert lines[1].split() == ["status", status]
        assert any(line.split()[:2] == ["sms", "90"] for line in lines)
        assert "config:" in lines

    assert invoke(*base, "audit", "show", "not-a-uuid").exit_code == 2
    missing = invoke(*base, "audit", "show", "00000000-0000-4000-8000-0000000000ff")
    assert missing.exit_code == 1 and "no run" in missing.output


# --- 8. the audit schema must exist ----------------------------------------------------------


def test_commands_refuse_without_the_audit_schema_until_db_upgrade(
    engine: Engine, base: list[str]
) -> None:
    """Without the audit schema run and dry-run exit 2 naming `db upgrade`, which creates it."""
    bulk_seed(engine, 20)
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
