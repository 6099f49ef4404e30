"""Errors a retry cannot fix fail the run at once (exit 1), with a message free of row values."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from tests.helpers import (
    MARK,
    cleaned_count,
    config_text,
    run_records,
    run_script,
    seed_series,
    write_config,
)


@pytest.fixture
def backlog(engine: Engine) -> None:
    seed_series(engine, range(1, 51))


def assert_failed_at_once(job: object, engine: Engine, sqlstate: str) -> None:
    """Exit 1, no retry, the SQLSTATE named, nothing cleaned, no personal data in the output."""
    assert job.returncode == 1, job.stderr  # type: ignore[attr-defined]
    assert job.events("chunk_retry") == []  # type: ignore[attr-defined]
    [failed] = job.events("run_failed")  # type: ignore[attr-defined]
    assert f"SQLSTATE {sqlstate}" in failed["error"]
    assert MARK not in job.stderr + job.stdout  # type: ignore[attr-defined]
    [record] = run_records(engine).values()
    assert record["status"] == "failed" and f"SQLSTATE {sqlstate}" in record["error"]
    assert cleaned_count(engine) == 0


@pytest.mark.parametrize(
    ("ddl", "reason"),
    [
        ("ALTER TABLE dispatches DROP COLUMN app_token",
         "clean.columns names app_token, which the table does not have"),
        ("ALTER TABLE dispatches ALTER COLUMN msisdn SET NOT NULL",
         "msisdn is NOT NULL (text) but clean.columns sets it to NULL"),
    ],
)  # fmt: skip
@pytest.mark.usefixtures("backlog")
def test_a_column_cleaning_cannot_write_is_refused_before_anything_runs(
    engine: Engine, url_string: str, tmp_path: Path, ddl: str, reason: str
) -> None:
    """A cleaned column the table does not have, or a NOT NULL one set to NULL: checked when
    the job connects (README "Real tables"): exit 2 naming it, no run record, no retry."""
    with engine.begin() as conn:
        conn.execute(text(ddl))
    config = write_config(tmp_path / "r.toml", config_text("max_retries = 5"))
    job = run_script(url_string, config, "run", "--yes")
    assert job.returncode == 2, job.stderr
    assert reason in job.stderr and "Traceback" not in job.stderr
    assert run_records(engine) == {}
    assert cleaned_count(engine) == 0


@pytest.mark.usefixtures("backlog")
def test_a_check_violation_fails_at_once_without_row_values(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """A CHECK constraint the cleaning UPDATE breaks on some rows (it depends on the row, so
    the job only warns of it beforehand: one it breaks on every row is refused before the
    run): check_violation; its DETAIL (the failing row, personal data included) never
    reaches the log or the run record."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "ALTER TABLE dispatches ADD CONSTRAINT has_msisdn "
                "CHECK (msisdn IS NOT NULL OR id < 0)"
            )
        )
    config = write_config(tmp_path / "r.toml", config_text())
    job = run_script(url_string, config, "run", "--yes")
    assert_failed_at_once(job, engine, "23514")
    [record] = run_records(engine).values()
    assert MARK not in record["error"]


@pytest.mark.usefixtures("backlog")
def test_a_role_that_may_not_update_is_refused_before_it_starts(
    engine: Engine, database_url: URL, tmp_path: Path
) -> None:
    """A role that may read but not update the table: refused before anything is written
    (exit 2, no run record, no retry), naming the rights and the purpose that gives them;
    it failed with insufficient_privilege from inside the run (exit 1, which Kubernetes
    retries)."""
    role = f"dr_ro_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT SELECT ON dispatches TO {role}"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA dispatch_retention TO {role}"))
        conn.execute(
            text(
                f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA dispatch_retention TO {role}"
            )
        )
    try:
        url = database_url.set(drivername="postgresql", username=role)
        config = write_config(tmp_path / "r.toml", config_text())
        job = run_script(url.render_as_string(hide_password=False), config, "run", "--yes")
        assert job.returncode == 2, job.stderr
        assert "UPDATE(content) on column dispatches" in job.stderr
        assert f"db grants --role {role} --purpose run" in job.stderr
        assert job.events("chunk_retry") == [] and run_records(engine) == {}
        assert cleaned_count(engine) == 0 and MARK not in job.stderr + job.stdout
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))


@pytest.mark.usefixtures("backlog")
def test_read_only_server_fails_at_once(
    engine: Engine, database_url: URL, url_string: str, tmp_path: Path
) -> None:
    """A read-only standby (here: default_transaction_read_only) refuses the UPDATE:
    read_only_sql_transaction, no retry; the run record cannot be written either, so the
    run fails before its first chunk."""
    with engine.begin() as conn:
        conn.execute(
            text(f'ALTER DATABASE "{database_url.database}" SET default_transaction_read_only = on')
        )
    engine.dispose()
    config = write_config(tmp_path / "r.toml", config_text())
    job = run_script(url_string, config, "run", "--yes")
    assert job.returncode == 1, job.stderr
    assert job.events("chunk_retry") == []
    [failed] = job.events("run_failed")
    assert "SQLSTATE 25006" in failed["error"]
    assert cleaned_count(engine) == 0
