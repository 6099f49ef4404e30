"""Two targets sharing one audit schema.

Found by the third review: two configs with another `target.table` and the same
`audit.schema`; each config's `audit verify` counted the other table's chunks in its own
table, found none of their rows there, and reported them TAMPERED (exit 6). Each chunk is
now counted in its own run's target (`runs.target_table`); a target this role may not read
is reported with its chunks as not counted, and why: never tampered for that alone, never
OK silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention.config import Target
from dispatch_retention.demo.synthetic import create_dispatches
from dispatch_retention.vocabulary import Exit
from tests.helpers import (
    config_text,
    granted_role,
    invoke,
    run_job,
    seed_series,
    settings,
    write_config,
)

OTHER = "other_dispatches"


@pytest.fixture
def other_config(tmp_path: Path, url_string: str) -> list[str]:
    """The global options of the second target's config (same audit schema)."""
    config = write_config(tmp_path / "other.toml", config_text(table=OTHER))
    return ["--config", str(config), "--database-url", url_string]


@pytest.fixture
def two_targets(engine: Engine) -> None:
    """Both tables hold the same due dispatches; a run of each config cleaned its own in
    three chunks (six chunks in the one audit schema)."""
    with engine.begin() as conn:
        create_dispatches(conn, Target(table=OTHER))
    seed_series(engine, range(0, 300))
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {OTHER} SELECT * FROM dispatches"))
    for table in (None, OTHER):
        outcome = run_job(engine, settings(table=table), chunk_size=100)
        assert outcome.status.value == "succeeded" and outcome.chunks == 3


def verify(global_options: list[str]) -> tuple[int, dict[str, Any]]:
    result = invoke(*global_options, "audit", "verify", "--format", "json")
    assert result.exit_code in (Exit.OK, Exit.TAMPERED), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.usefixtures("two_targets")
@pytest.mark.parametrize("which", ["dispatches", OTHER])
def test_each_config_counts_every_chunk_in_its_own_runs_target(
    base: list[str], other_config: list[str], which: str
) -> None:
    """With either config, `audit verify` counts all six chunks, each in its own table: OK."""
    code, report = verify(base if which == "dispatches" else other_config)
    assert (code, report["findings"]) == (Exit.OK, []), report
    assert (report["chunks_counted"], report["chunks_not_counted"]) == (6, 0)


@pytest.mark.usefixtures("two_targets")
@pytest.mark.parametrize("tampered", ["dispatches", OTHER])
@pytest.mark.parametrize("which", ["dispatches", OTHER])
def test_a_tampered_row_of_either_table_is_caught_by_either_config(
    engine: Engine, base: list[str], other_config: list[str], tampered: str, which: str
) -> None:
    """A cleaned row of one table whose stamp was moved: its chunk no longer adds up, and
    `audit verify` with either config says so, naming that table (exit 6)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                f"UPDATE {tampered} SET cleaned_at = cleaned_at + interval '1 second' "
                "WHERE id = 150"
            )
        )
    code, report = verify(base if which == "dispatches" else other_config)
    assert code == Exit.TAMPERED, report
    [finding] = report["findings"]
    assert (
        finding["row"].startswith("chunks ") and f"public.{tampered} has 99" in finding["problem"]
    )


@pytest.mark.usefixtures("two_targets")
def test_a_target_the_role_may_not_read_is_reported_not_counted(
    engine: Engine, database_url: URL, tmp_path: Path
) -> None:
    """The read-only role of one config (granted the dispatches only): the other table's
    chunks are not counted, and the report says how many and why; exit 0 (nothing it could
    check is wrong), with the count in the text and the JSON."""
    with granted_role(engine, database_url, "read-only") as (_role, url):
        config = write_config(tmp_path / "ro.toml", config_text())
        options = ["--config", str(config), "--database-url", url]
        code, report = verify(options)
        assert (code, report["findings"]) == (Exit.OK, []), report
        assert (report["chunks_counted"], report["chunks_not_counted"]) == (3, 3)
        [skipped] = report["not_counted"]
        assert skipped["table"] == f"public.{OTHER}" and skipped["chunks"] == 3
        assert "may not read" in skipped["why"]
        shown = invoke(*options, "audit", "verify").stdout
    assert "chunks NOT counted (another target's runs): 3" in shown
    assert f"public.{OTHER}: 3: this role may not read its id and cleaned_at" in shown


@pytest.mark.usefixtures("two_targets")
def test_a_target_that_is_gone_is_reported_not_counted(engine: Engine, base: list[str]) -> None:
    """The other table dropped (its runs stay in the trail): its chunks are not counted, and
    why; the dispatches' own are, OK."""
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {OTHER}"))
    code, report = verify(base)
    assert (code, report["chunks_counted"], report["chunks_not_counted"]) == (Exit.OK, 3, 3)
    assert "no such table" in report["not_counted"][0]["why"]
