"""No personal data in the job's own tables or in anything its commands print."""

from __future__ import annotations

import subprocess
from pathlib import Path

from click.testing import Result
from sqlalchemy import Engine, text

from tests.helpers import (
    MARK,
    as_json_lines,
    assert_no_marker,
    cleaned_count,
    config_text,
    invoke,
    run_records,
    script,
    seed_series,
    write_config,
)
from tests.trail.harness import SCHEMA, every_tenth_young, hold, schema_tables

# --- 6. no personal data in the trail or the output ------------------------------------------


def test_no_personal_data_in_the_audit_schema_or_any_output(
    engine: Engine, base: list[str], url_string: str, tmp_path: Path
) -> None:
    """After runs over marked data (one failing on a row), no audit row and no output has it."""
    due, _ = seed_series(engine, range(1, 301), every_tenth_young, mixed=True)
    outputs: list[str] = []

    def keep(result: Result | subprocess.CompletedProcess[str]) -> None:
        outputs.extend([result.stdout, result.stderr])

    # A first run that fails on a constraint that depends on the row (so it is only warned of
    # before the run, not refused): the server's DETAIL quotes the failing row,
    # whose kept app_token carries a marker. Neither the log nor the run record may repeat it.
    with engine.begin() as conn:
        conn.execute(
            text(
                "ALTER TABLE dispatches ADD CONSTRAINT keep_msisdn"
                " CHECK (msisdn IS NOT NULL OR app_token IS NULL)"
            )
        )
    partial = write_config(
        tmp_path / "partial.toml",
        config_text(
            clean='columns = ["content", "msisdn", "email"]\nkeep = { app_token = "test" }'
        ),
    )
    failed = script("--config", str(partial), "--database-url", url_string, "run")
    keep(failed)
    assert failed.returncode == 1, failed.stderr
    assert "CheckViolation" in as_json_lines(failed.stderr)[-1]["error"]
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatches DROP CONSTRAINT keep_msisdn"))

    hold(engine, 1001, "case SCAN-1")
    for args in (["run", "--dry-run"], ["run", "--chunk-size", "37"]):
        result = script(*base, *args)
        keep(result)
        assert result.returncode == 0, result.stderr
    held = sum(1 for i in range(1, 301) if 1000 + i % 97 == 1001 and i % 10)
    assert cleaned_count(engine) == len(due) - held > 0

    run_ids = list(run_records(engine))
    for args in (
        ["verify"],
        ["verify", "--format", "json"],
        ["audit", "list"],
        ["audit", "list", "--format", "json"],
        ["audit", "list", "--format", "csv"],
        ["hold", "list", "--all"],
        ["hold", "list", "--all", "--format", "json"],
        *(["audit", "show", r, *fmt] for r in run_ids for fmt in ([], ["--format", "json"])),
    ):
        result = invoke(*base, *args)
        assert result.exit_code == 0, (args, result.output)
        keep(result)
    assert_no_marker(*outputs)

    tables = schema_tables(engine)
    assert {"runs", "chunks", "legal_holds", "dispatch_retention_alembic_version"} <= set(tables)
    scanned = 0
    with engine.connect() as conn:
        for name in tables:
            for row in conn.execute(text(f'SELECT t::text FROM "{SCHEMA}"."{name}" t')).scalars():
                scanned += 1
                assert MARK not in row, f"personal data in {SCHEMA}.{name}"
    assert scanned >= len(run_ids) + 2  # runs, chunks and the hold were all read
    with engine.connect() as conn:
        still_marked = conn.execute(
            text("SELECT count(*) FROM dispatches WHERE app_token LIKE '%' || :m || '%'"),
            {"m": MARK},
        ).scalar_one()
    assert still_marked > 0  # the markers are there to be found: the scan could fail
