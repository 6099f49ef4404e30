"""Roles for the people, not only the job (`trail/rights.py`, `db grants --purpose`, `db check
--purpose`): the SQL of each purpose gives exactly the rights that purpose's data names; the
runbook's commands run as the operator role; `run --reclean` runs as the table's owner once
it has the reclean grants; a role without a right a command needs stops with exit 2, naming
the right and the purpose, before anything is written."""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention.checks import db_check
from dispatch_retention.pg import engines
from dispatch_retention.trail import rights
from tests.helpers import (
    apply_grants,
    granted_role,
    invoke,
    run_records,
    seed_series,
    settings,
    snapshot,
)


@pytest.mark.parametrize("purpose", rights.PURPOSES)
def test_each_purposes_sql_gives_the_rights_its_data_names(
    engine: Engine, database_url: URL, purpose: str
) -> None:
    s = settings()
    with granted_role(engine, database_url, purpose) as (_, url):
        as_role = engines.make_engine(engines.parse_url(url))
        with as_role.connect() as conn:
            assert rights.missing(conn, s, purpose) == []  # type: ignore[arg-type]
        with as_role.connect() as conn, conn.begin():
            findings = [f for f in db_check.check(conn, s, purpose) if f.check == "privileges"]  # type: ignore[arg-type]
        as_role.dispose()
    assert [f.level for f in findings] == ["ok"], findings


@pytest.mark.parametrize(
    ("role_purpose", "checked", "lacking"),
    [
        ("read-only", "run", "UPDATE(cleaned_at) on column"),
        ("run", "read-only", "SELECT on view dispatch_retention.dispatch_facts"),
        ("run", "reclean", "SELECT(msisdn) on column"),
        ("holds", "operator", "INSERT on table dispatch_retention.runs"),
    ],
)
def test_db_check_calls_a_right_the_purpose_needs_an_error_and_names_the_purpose(
    engine: Engine,
    database_url: URL,
    role_purpose: str,
    checked: str,
    lacking: str,
    config_file: Path,
) -> None:
    s = settings()
    with granted_role(engine, database_url, role_purpose) as (_, url):
        as_role = engines.make_engine(engines.parse_url(url))
        with as_role.connect() as conn, conn.begin():
            found = [f for f in db_check.check(conn, s, checked) if f.check == "privileges"]  # type: ignore[arg-type]
        as_role.dispose()
    errors = [f for f in found if f.level == "error"]
    assert len(errors) == 1, found
    assert lacking in errors[0].message and f"`db grants --purpose {checked}`" in errors[0].message


def test_db_check_as_the_read_only_role_for_its_purpose_has_no_privilege_error(
    engine: Engine, database_url: URL, config_file: Path
) -> None:
    with granted_role(engine, database_url, "read-only") as (_, url):
        result = invoke("--config", str(config_file), "--database-url", url, "db", "check",
                        "--purpose", "read-only")  # fmt: skip
        default = invoke("--config", str(config_file), "--database-url", url, "db", "check")
    assert "[error] privileges" not in result.stdout, result.stdout
    assert "[error] privileges" in default.stdout and "--purpose run" in default.stdout


def test_run_by_a_role_without_the_run_rights_exits_2_before_writing_anything(
    engine: Engine, database_url: URL, config_file: Path
) -> None:
    seed_series(engine, range(1, 51))
    before = snapshot(engine)
    with granted_role(engine, database_url, "read-only") as (role, url):
        result = invoke("--config", str(config_file), "--database-url", url, "run", "--yes")
    assert result.exit_code == 2, result.output
    assert f"role {role} lacks rights this command needs" in result.stderr
    assert "UPDATE(content) on column" in result.stderr
    assert f"db grants --role {role} --purpose run" in result.stderr
    assert snapshot(engine) == before and run_records(engine) == {}


@contextmanager
def table_owner(engine: Engine, database_url: URL) -> Iterator[tuple[str, str]]:
    """A LOGIN role (not a superuser) that owns the dispatches, as the application's does."""
    name = f"dr_owner_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {name} LOGIN"))
        conn.execute(text(f"ALTER TABLE dispatches OWNER TO {name}"))
    try:
        yield (
            name,
            database_url.set(drivername="postgresql", username=name).render_as_string(
                hide_password=False
            ),
        )
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE dispatches OWNER TO postgres"))
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))


def test_reclean_as_the_tables_owner_needs_the_reclean_grants_and_then_runs(
    engine: Engine, database_url: URL, config_file: Path
) -> None:
    seed_series(engine, range(1, 51))
    with table_owner(engine, database_url) as (owner, url):
        refused = invoke("--config", str(config_file), "--database-url", url, "run", "--yes",
                         "--reclean")  # fmt: skip
        assert refused.exit_code == 2, refused.output
        assert "--purpose reclean" in refused.stderr
        assert "on table dispatch_retention.runs" in refused.stderr
        assert run_records(engine) == {}
        with engine.begin() as conn:
            apply_grants(conn, owner, "reclean")
        done = invoke("--config", str(config_file), "--database-url", url, "run", "--yes",
                      "--reclean")  # fmt: skip
    assert done.exit_code == 0, done.output
    (record,) = run_records(engine).values()
    assert (record["status"], record["audited_rows"]) == ("succeeded", 50)


def runbook_commands() -> list[list[str]]:
    """docs/operations.md, "A manual run": each `dispatch-retention` line of its first
    block, without the program's name and the comment."""
    page = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    block = page.split("## A manual run", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [
        shlex.split(line.split("#", 1)[0])[1:]
        for line in block.splitlines()
        if line.startswith("dispatch-retention ")
    ]


def test_the_runbooks_manual_run_works_as_the_operator_role(
    engine: Engine, database_url: URL, config_file: Path
) -> None:
    """docs/operations.md, "A manual run", as written: each command, as the role `db grants
    --purpose operator` makes, exits 0 (`db check` with no error), then `audit show` and
    `audit verify` of the run."""
    commands = runbook_commands()
    assert [c[:2] for c in commands] == [
        ["db", "check"], ["run", "--dry-run"], ["run"], ["verify"], ["audit", "list"]
    ]  # fmt: skip
    seed_series(engine, range(1, 51))
    with granted_role(engine, database_url, "operator") as (_, url):
        base = ["--config", str(config_file), "--database-url", url]
        for args in commands:
            result = invoke(*base, *args)
            assert result.exit_code == 0, (args, result.output)
            assert "[error]" not in result.stdout, (args, result.stdout)
        (run_id,) = run_records(engine)
        for args in (("audit", "show", run_id), ("audit", "verify")):
            result = invoke(*base, *args)
            assert result.exit_code == 0, (args, result.output)
    (record,) = run_records(engine).values()
    assert (record["status"], record["audited_rows"]) == ("succeeded", 50)


def test_a_hold_by_a_role_without_the_holds_rights_exits_2_naming_them(
    engine: Engine, database_url: URL, config_file: Path
) -> None:
    with granted_role(engine, database_url, "read-only") as (_, url):
        base = ["--config", str(config_file), "--database-url", url]
        result = invoke(*base, "hold", "add", "42", "--reason", "case 7")
    assert result.exit_code == 2, result.output
    assert "INSERT on table dispatch_retention.legal_holds" in result.stderr
    assert "--purpose holds" in result.stderr
    with engine.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM dispatch_retention.legal_holds")).scalar() == 0
        )
    with granted_role(engine, database_url, "holds") as (_, url):
        base = ["--config", str(config_file), "--database-url", url]
        assert invoke(*base, "hold", "add", "42", "--reason", "case 7").exit_code == 0


@pytest.mark.parametrize(
    ("what", "givers"),
    [
        ("holds", ["run", "read-only", "holds", "operator", "reclean"]),
        ("trail", ["run", "read-only", "operator", "reclean"]),
        ("plan", ["run", "read-only", "operator", "reclean"]),
    ],
)
def test_each_read_needs_only_rights_the_purposes_that_run_it_give(
    what: str, givers: list[str]
) -> None:
    """A read's rights are a subset of each purpose whose commands do that read: a role made
    for one of them never meets the preflight's exit 2."""
    s = settings()
    wanted = set(rights.reads(s, what))  # type: ignore[arg-type]
    for purpose in rights.PURPOSES:
        given = set(rights.needed(s, purpose))
        assert (wanted <= given) == (purpose in givers), (what, purpose, wanted - given)


@pytest.mark.parametrize(
    "args",
    [["verify"], ["run", "--dry-run"], ["audit", "list"], ["audit", "verify"]],
    ids=" ".join,
)
def test_a_read_by_a_role_without_its_rights_exits_2_naming_them_and_the_purpose(
    engine: Engine, database_url: URL, config_file: Path, args: list[str]
) -> None:
    """Not a database error (exit 1, which Kubernetes retries) from inside the command."""
    seed_series(engine, range(1, 11))
    with granted_role(engine, database_url, "holds") as (role, url):
        result = invoke("--config", str(config_file), "--database-url", url, *args)
    assert result.exit_code == 2, result.output
    assert f"role {role} lacks rights this command needs" in result.stderr
    assert "SELECT on table dispatch_retention.runs" in result.stderr
    assert f"db grants --role {role} --purpose read-only" in result.stderr
    assert "42501" not in result.output and run_records(engine) == {}
