"""TEMPORARY on the database: PostgreSQL grants it to PUBLIC by default, so every
role made by `db grants` may create temporary tables. `db check` warns while PUBLIC holds it
and prints the REVOKE an administrator would run; once revoked, the finding is ok, the job's
roles can no longer create temporary tables, and the job still runs (it needs none)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ProgrammingError

from dispatch_retention.checks import db_check, db_grants
from dispatch_retention.checks.db_check import Finding
from dispatch_retention.pg import diagnosis, engines
from dispatch_retention.vocabulary import Status
from tests.helpers import (
    config_text,
    granted_role,
    run_job,
    run_script,
    seed_series,
    settings,
    write_config,
)

CHECK = "temp privilege"
#: The statement the warn prints between backticks.
REVOKE = re.compile(r"`(REVOKE TEMPORARY ON DATABASE .* FROM PUBLIC;)`")


def temp_findings(engine: Engine) -> list[Finding]:
    with engine.connect() as conn, conn.begin():
        return [f for f in db_check.check(conn, settings()) if f.check == CHECK]


def revoke_from_public(engine: Engine, database: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC'))


def may_create_temp_table(url: str) -> bool:
    """Whether a new session of the role behind `url` may CREATE TEMP TABLE."""
    engine = engines.make_engine(engines.parse_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TEMP TABLE scratch (id bigint) ON COMMIT DROP"))
        return True
    except ProgrammingError as exc:
        assert diagnosis.sqlstate(exc) == "42501", exc  # insufficient_privilege
        return False
    finally:
        engine.dispose()


def test_fresh_database_warns_then_ok_after_revoke(engine: Engine, database_url: URL) -> None:
    """A fresh database (the default ACL) warns with the REVOKE to run; after it, ok."""
    name = database_url.database
    assert name is not None
    [warn] = temp_findings(engine)
    assert warn.level == "warn", warn
    assert REVOKE.findall(warn.message) == [f"REVOKE TEMPORARY ON DATABASE {name} FROM PUBLIC;"]
    assert f"`GRANT TEMPORARY ON DATABASE {name} TO <role>;`" in warn.message
    revoke_from_public(engine, name)
    assert [f.level for f in temp_findings(engine)] == ["ok"]


def test_printed_revoke_runs_as_printed_on_a_quoted_name(server_url: URL, template_db: str) -> None:
    """On a database whose name needs quoting, the printed REVOKE runs as printed and the
    finding is then ok."""
    name = f'Dispatch "Retention" {os.getpid()}'
    admin = engines.make_engine(server_url).execution_options(isolation_level="AUTOCOMMIT")
    quoted = '"' + name.replace('"', '""') + '"'
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE {quoted} TEMPLATE "{template_db}"'))
    engine = engines.make_engine(server_url.set(database=name))
    try:
        [warn] = temp_findings(engine)
        [statement] = REVOKE.findall(warn.message)
        assert statement == f"REVOKE TEMPORARY ON DATABASE {quoted} FROM PUBLIC;"
        with engine.begin() as conn:
            conn.execute(text(statement))
        assert [f.level for f in temp_findings(engine)] == ["ok"]
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        admin.dispose()


def test_revoke_applies_to_a_session_already_open(
    engine: Engine, database_url: URL, run_role: tuple[str, str]
) -> None:
    """A session of the run role that made a temporary table before the REVOKE may make no
    other after it (what docs/deploy.md says: it applies at once)."""
    assert database_url.database is not None
    as_run = engines.make_engine(engines.parse_url(run_role[1]))
    try:
        with as_run.connect() as conn:
            conn.execute(text("CREATE TEMP TABLE before_revoke (id bigint)"))
            conn.commit()
            revoke_from_public(engine, database_url.database)
            with pytest.raises(ProgrammingError) as info:
                conn.execute(text("CREATE TEMP TABLE after_revoke (id bigint)"))
            assert diagnosis.sqlstate(info.value) == "42501"  # insufficient_privilege
    finally:
        as_run.dispose()


@pytest.mark.parametrize("purpose", db_grants.PURPOSES)
def test_granted_role_creates_temp_tables_until_revoked(
    engine: Engine, database_url: URL, purpose: str
) -> None:
    """A role made by `db grants` may CREATE TEMP TABLE on a fresh database (what the warn
    says) and may not once TEMPORARY is revoked from PUBLIC."""
    assert database_url.database is not None
    with granted_role(engine, database_url, purpose) as (_, url):
        assert may_create_temp_table(url)
        revoke_from_public(engine, database_url.database)
        assert not may_create_temp_table(url)


def test_strict_check_fails_on_the_warn_and_passes_after_revoke(
    engine: Engine, database_url: URL, run_role: tuple[str, str], tmp_path: Path
) -> None:
    """`db check` as the run role exits 0 on the warn, `--strict` exits 1 naming it; after
    the REVOKE, `--strict` exits 0 and the finding is ok."""
    assert database_url.database is not None
    url = run_role[1]
    cfg = write_config(tmp_path / "r.toml", config_text())
    plain = run_script(url, cfg, "db", "check")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    strict = run_script(url, cfg, "db", "check", "--strict")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    warned = [line for line in strict.stdout.splitlines() if line.startswith("[warn ]")]
    assert [line.split(":", 1)[0] for line in warned] == [f"[warn ] {CHECK}"], strict.stdout
    revoke_from_public(engine, database_url.database)
    strict = run_script(url, cfg, "db", "check", "--strict")
    assert strict.returncode == 0, strict.stdout + strict.stderr
    assert f"[ok   ] {CHECK}: PUBLIC has no TEMPORARY" in strict.stdout


def test_run_role_with_its_own_grant_warns_and_the_job_runs_without_it(
    engine: Engine, database_url: URL, run_role: tuple[str, str]
) -> None:
    """After the REVOKE, a run role granted TEMPORARY itself is a warn naming it; without
    that grant the finding is ok and says it may not, and a run succeeds (it needs none)."""
    name = database_url.database
    assert name is not None
    role, url = run_role
    revoke_from_public(engine, name)
    as_run = engines.make_engine(engines.parse_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(text(f'GRANT TEMPORARY ON DATABASE "{name}" TO {role}'))
        [granted] = temp_findings(as_run)
        assert (granted.level, f"role {role} has it" in granted.message) == ("warn", True)
        with engine.begin() as conn:
            conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM {role}'))
        [revoked] = temp_findings(as_run)
        assert (revoked.level, revoked.message.endswith(f"role {role} may not")) == ("ok", True)
        due, _young = seed_series(engine, range(1, 11))
        outcome = run_job(as_run, settings())
        assert (outcome.status, outcome.rows_cleaned) == (Status.SUCCEEDED, len(due))
    finally:
        as_run.dispose()
