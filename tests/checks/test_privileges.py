"""Least privilege on a real server: roles built from `db grants` can do their job and no more."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ProgrammingError

from dispatch_retention import errors
from dispatch_retention.checks import db_check, db_grants
from dispatch_retention.cli.main import cli
from dispatch_retention.pg import diagnosis, engines
from tests.helpers import (
    DAY,
    apply_grants,
    config_text,
    db_now,
    dispatch,
    insert_rows,
    settings,
    snapshot,
    write_config,
)


@pytest.fixture
def roles(engine: Engine, database_url: URL) -> Iterator[dict[str, URL]]:
    """A run role, a read-only role and a holds role, made from `db grants` output."""
    suffix = uuid.uuid4().hex[:8]
    names = {purpose: f"dr_{purpose.replace('-', '_')}_{suffix}" for purpose in db_grants.PURPOSES}
    s = settings()
    with engine.begin() as conn:
        for purpose, name in names.items():
            conn.execute(text(f"CREATE ROLE {name} LOGIN"))
            apply_grants(conn, name, purpose, s)
    yield {purpose: database_url.set(username=name) for purpose, name in names.items()}
    with engine.begin() as conn:
        for name in names.values():
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))


def cli_as(url: URL, config: Path, *args: str) -> tuple[int, str]:
    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    result = CliRunner().invoke(cli, ["--config", str(config), "--database-url", plain, *args])
    return result.exit_code, result.output


def test_roles_can_do_their_job(engine: Engine, roles: dict[str, URL], tmp_path: Path) -> None:
    """run, dry-run, verify and hold add work under the granted roles."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 21)])
    config = write_config(tmp_path / "r.toml", config_text())
    assert cli_as(roles["read-only"], config, "run", "--dry-run")[0] == 0
    code, out = cli_as(roles["holds"], config, "hold", "add", "1003", "--reason", "case 1")
    assert code == 0, out
    code, out = cli_as(roles["run"], config, "run", "--yes")
    assert code == 0, out
    code, out = cli_as(roles["read-only"], config, "verify")
    assert code == 0, out
    cleaned = [r for r in snapshot(engine).values() if r["cleaned_at"] is not None]
    assert len(cleaned) == 19  # member 1003 (row 3) is held


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("DELETE FROM dispatches", id="delete"),
        pytest.param("TRUNCATE dispatches", id="truncate"),
        pytest.param("UPDATE dispatches SET type = 'push'", id="update-kept-column"),
        pytest.param("UPDATE dispatches SET member_id = NULL", id="update-member-id"),
        pytest.param("SELECT msisdn FROM dispatches", id="read-personal-data"),
        pytest.param("ALTER TABLE dispatches ADD COLUMN x int", id="ddl"),
        pytest.param("CREATE TABLE dispatch_retention.x (a int)", id="ddl-in-audit-schema"),
        pytest.param("DELETE FROM dispatch_retention.runs", id="delete-audit"),
        pytest.param("UPDATE dispatch_retention.chunks SET rows = 0", id="rewrite-chunks"),
        pytest.param("DELETE FROM dispatch_retention.legal_holds", id="delete-holds"),
    ],
)
def test_run_role_is_denied_the_rest(engine: Engine, roles: dict[str, URL], statement: str) -> None:
    """The run role may not delete, truncate, alter, read personal data or rewrite the trail."""
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY)])
    as_run = engines.make_engine(roles["run"])
    try:
        with pytest.raises(ProgrammingError) as info, as_run.begin() as conn:
            conn.execute(text(statement))
        assert diagnosis.sqlstate(info.value) == "42501"  # insufficient_privilege
    finally:
        as_run.dispose()


def test_read_only_role_cannot_write(engine: Engine, roles: dict[str, URL]) -> None:
    """The verify / dry-run role cannot change a dispatch."""
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY)])
    as_ro = engines.make_engine(roles["read-only"])
    try:
        with pytest.raises(ProgrammingError), as_ro.begin() as conn:
            conn.execute(text("UPDATE dispatches SET msisdn = NULL"))
    finally:
        as_ro.dispose()


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("SELECT msisdn FROM dispatches", id="msisdn"),
        pytest.param("SELECT content FROM dispatches", id="content"),
        pytest.param("SELECT email, app_token FROM dispatches", id="email-app-token"),
        pytest.param("SELECT * FROM dispatches", id="star"),
        pytest.param("SELECT id FROM dispatches WHERE msisdn LIKE '+47%'", id="filter-on-msisdn"),
        pytest.param("SELECT count(content) FROM dispatches", id="count-content"),
        pytest.param("SELECT d FROM dispatches AS d", id="whole-row"),
    ],
)
def test_read_only_role_cannot_read_personal_data(
    engine: Engine, roles: dict[str, URL], statement: str
) -> None:
    """The verify / dry-run role is denied every personal column, in a result or a filter."""
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY)])
    as_ro = engines.make_engine(roles["read-only"])
    try:
        with pytest.raises(ProgrammingError) as info, as_ro.begin() as conn:
            conn.execute(text(statement))
        assert diagnosis.sqlstate(info.value) == "42501"  # insufficient_privilege
    finally:
        as_ro.dispose()


def test_read_only_role_counts_through_the_view(engine: Engine, roles: dict[str, URL]) -> None:
    """What it may read instead: the kept columns, and per personal column whether it holds
    data (the audit schema's view), never the data."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(1, now - 500 * DAY), dispatch(2, now - 500 * DAY)])
    with engine.begin() as conn:
        conn.execute(text("UPDATE dispatches SET msisdn = NULL WHERE id = 2"))
    as_ro = engines.make_engine(roles["read-only"])
    try:
        with as_ro.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, type, has_msisdn, has_email, holds_personal_data"
                    " FROM dispatch_retention.dispatch_facts ORDER BY id"
                )
            ).all()
            kept = conn.execute(text("SELECT id, created_at, member_id FROM dispatches")).all()
        assert [tuple(r) for r in rows] == [
            (1, "sms", True, True, True),
            (2, "sms", False, True, True),
        ]
        assert len(kept) == 2
    finally:
        as_ro.dispose()


def test_db_check_flags_extra_rights(engine: Engine, roles: dict[str, URL]) -> None:
    """db check is quiet for the run role and warns about a role that may DELETE."""
    s = settings()
    as_run = engines.make_engine(roles["run"])
    try:
        with as_run.connect() as conn, conn.begin():
            findings = db_check.check(conn, s)
        privileges = [f for f in findings if f.check == "privileges"]
        assert [f.level for f in privileges] == ["ok"], privileges
        with engine.begin() as conn:
            conn.execute(text(f"GRANT DELETE ON dispatches TO {roles['run'].username}"))
        with as_run.connect() as conn, conn.begin():
            findings = db_check.check(conn, s)
        warned = [f for f in findings if f.check == "privileges" and f.level == "warn"]
        assert warned and "DELETE" in warned[0].message
    finally:
        as_run.dispose()


def test_db_check_reports_not_null_column_without_replacement(engine: Engine) -> None:
    """A NOT NULL personal column that cleaning would NULL is an error before any run."""
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatches ALTER COLUMN email SET NOT NULL"))
    with engine.connect() as conn, conn.begin():
        findings = db_check.check(conn, settings())
    not_null = [f for f in findings if f.check == "columns" and "email is NOT NULL" in f.message]
    assert [f.level for f in not_null] == ["error"]
    with engine.connect() as conn, conn.begin():
        fixed = db_check.check(conn, settings(clean='replace = { content = {}, email = "" }'))
    assert not any(f.check == "columns" and "NOT NULL" in f.message for f in fixed)


def test_grants_refuse_bad_role_name() -> None:
    """A role name that is not a plain SQL name is refused, never pasted into SQL."""
    with pytest.raises(errors.RoleRefused):
        db_grants.statements(settings(), "x; DROP ROLE postgres", "run")
    result = CliRunner().invoke(cli, ["db", "grants", "--role", "Bad-Name"], env=dict(os.environ))
    assert result.exit_code == 2
