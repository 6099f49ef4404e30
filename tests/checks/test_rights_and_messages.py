"""Hardening: the documented set-up works as written, a missing right or a
clashing object is named, a superuser gets no grants, and what an operator reads is plain.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from dispatch_retention.pg import diagnosis
from dispatch_retention.run.lock import RunLock, run_locks
from tests.faults import every_fifth_young
from tests.helpers import MARK, Job, config_text, script, seed_series, write_config
from tests.processes import SCRIPT, script_env

DEPLOY = Path(__file__).parents[2] / "docs" / "deploy.md"
DOC_ROLES = re.compile(r"\bdispatch_retention_(migrate|run|ro)\b")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "r.toml", config_text())


def as_role(url: URL, role: str) -> str:
    return url.set(drivername="postgresql", username=role).render_as_string(hide_password=False)


def administrator_sql() -> str:
    """The SQL block docs/deploy.md gives the database administrator (step 3)."""
    page = DEPLOY.read_text()
    after = page.split("As a database administrator:", 1)[1]
    block = re.search(r"```sql\n(.*?)```", after, re.S)
    assert block, "docs/deploy.md lost its administrator's SQL block"
    return block.group(1)


@pytest.fixture
def doc_roles(engine: Engine) -> Iterator[dict[str, str]]:
    """The three roles of docs/deploy.md under names of this test's own (roles are
    cluster-wide); dropped with what they own afterwards (and the read-only grants' view,
    an administrator's, in the migrate role's schema)."""
    suffix = uuid.uuid4().hex[:6]
    names = {kind: f"dispatch_retention_{kind}_{suffix}" for kind in ("migrate", "run", "ro")}
    yield names
    with engine.begin() as conn:
        for name in names.values():
            if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name}).first():
                conn.execute(text(f"DROP OWNED BY {name} CASCADE"))
                conn.execute(text(f"DROP ROLE {name}"))


def grants_script() -> str:
    """The shell block of docs/deploy.md step 3 that prints the grants and applies them."""
    after = DEPLOY.read_text().split("review them, and apply them:", 1)[1]
    block = re.search(r"```sh\n(.*?)```", after, re.S)
    assert block, "docs/deploy.md lost its grants' shell block"
    return block.group(1)


def psql(url: str, sql_text: str) -> None:
    done = subprocess.run(
        ["psql", url, "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"],
        input=sql_text,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# --- the documented procedure, as written ---------------------------------------------------


@pytest.mark.skipif(shutil.which("psql") is None, reason="the procedure pipes SQL into psql")
def test_the_documented_set_up_works_as_written_with_the_roles_it_creates(
    engine: Engine, database_url: URL, config: Path, doc_roles: dict[str, str], tmp_path: Path
) -> None:
    """docs/deploy.md step 3 on a database without the job's schema: the administrator's
    SQL as written (role names made unique), `db upgrade` as the migrate role (which has no
    CREATE on the database), the page's shell block that prints the grants and applies them
    with psql, run by bash as written, then `run` as the run role and `verify`, a dry run
    and `audit list` as the read-only role."""
    seed_series(engine, range(1, 301), young=every_fifth_young)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA dispatch_retention CASCADE"))
    admin = as_role(database_url, database_url.username or "postgres")
    statements = DOC_ROLES.sub(lambda m: doc_roles[m.group(1)], administrator_sql())
    psql(admin, statements.replace("PASSWORD '...'", "PASSWORD 'not-used-here'"))
    with engine.connect() as conn:
        can_create = conn.execute(
            text("SELECT has_database_privilege(:r, current_database(), 'CREATE')"),
            {"r": doc_roles["migrate"]},
        ).scalar()
    assert can_create is False  # the procedure must not depend on it

    base = ["--config", str(config)]
    upgrade = script(*base, "--database-url", as_role(database_url, doc_roles["migrate"]),
                     "db", "upgrade")  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr
    grants = DOC_ROLES.sub(lambda m: doc_roles[m.group(1)], grants_script())
    (tmp_path / "config").mkdir()
    shutil.copy(config, tmp_path / "config" / "retention.toml")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "less() { :; }\n" + grants],
        cwd=tmp_path,
        env=script_env(ADMIN_URL=admin, PATH=f"{SCRIPT.parent}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run-grants.sql").stat().st_size and (
        tmp_path / "ro-grants.sql"
    ).stat().st_size

    run = script(*base, "--database-url", as_role(database_url, doc_roles["run"]), "run", "--yes")
    assert run.returncode == 0, run.stderr
    as_ro = ["--database-url", as_role(database_url, doc_roles["ro"])]
    for args in (["verify"], ["run", "--dry-run"], ["audit", "list"]):  # the table's "used by"
        done = script(*base, *as_ro, *args)
        assert done.returncode == 0, (args, done.stdout + done.stderr)
    again = script(*base, "--database-url", as_role(database_url, doc_roles["migrate"]),
                   "db", "upgrade")  # fmt: skip
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr


def test_db_upgrade_names_the_right_it_lacks_to_create_the_schema(
    engine: Engine, database_url: URL, config: Path, doc_roles: dict[str, str]
) -> None:
    """No schema and no CREATE on the database: exit 2 before anything is tried, naming
    the role, the right, the database and both ways to fix it."""
    role = doc_roles["migrate"]
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA dispatch_retention CASCADE"))
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
    proc = script("--config", str(config), "--database-url", as_role(database_url, role),
                  "db", "upgrade")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr
    assert "Traceback" not in message
    assert f"role {role} may not create schema 'dispatch_retention'" in message
    assert f"CREATE on database {database_url.database}" in message
    assert "AUTHORIZATION" in message and "GRANT CREATE ON DATABASE" in message


def test_db_upgrade_names_a_schema_it_may_not_use(
    engine: Engine, database_url: URL, config: Path, doc_roles: dict[str, str]
) -> None:
    """The schema exists but belongs to someone else and the role has no USAGE on it."""
    role = doc_roles["migrate"]
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
    proc = script("--config", str(config), "--database-url", as_role(database_url, role),
                  "db", "upgrade")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"role {role} lacks USAGE on schema dispatch_retention" in proc.stderr


# --- no grants for a superuser --------------------------------------------------------------


def test_db_grants_refuses_a_superuser_when_a_database_url_is_given(
    engine: Engine, url_string: str, config: Path, doc_roles: dict[str, str]
) -> None:
    """With a database to ask, `db grants --role <superuser>` exits 2 and prints no SQL;
    an ordinary role gets its grants; without a URL nothing can be asked and SQL prints."""
    superuser, plain = doc_roles["migrate"], doc_roles["run"]
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {superuser} SUPERUSER"))
        conn.execute(text(f"CREATE ROLE {plain}"))
    base = ["--config", str(config), "--database-url", url_string, "db", "grants", "--role"]
    refused = script(*base, superuser)
    assert refused.returncode == 2, refused.stderr
    assert refused.stdout == "" and "superuser" in refused.stderr
    assert "Traceback" not in refused.stderr
    granted = script(*base, plain)
    assert granted.returncode == 0 and "GRANT" in granted.stdout, granted.stderr
    offline = script("--config", str(config), "db", "grants", "--role", superuser)
    assert offline.returncode == 0 and "GRANT" in offline.stdout, offline.stderr


# --- errors name their object, and only an object the job knows -----------------------------


def error_of(engine: Engine, statement: str) -> str:
    with pytest.raises(DBAPIError) as raised, engine.begin() as conn:
        conn.execute(text(statement))
    return diagnosis.describe_error(raised.value)


def test_a_clashing_or_missing_object_is_named_when_the_job_knows_it(engine: Engine) -> None:
    assert "relation runs already exists" in error_of(
        engine, "CREATE TABLE dispatch_retention.runs (x int)"
    )
    assert "schema dispatch_retention already exists" in error_of(
        engine, "CREATE SCHEMA dispatch_retention"
    )
    assert "unacceptable schema name (a name the job does not know)" in error_of(
        engine, "CREATE SCHEMA pg_mine"
    )
    assert "column cleaned_at does not exist" in error_of(
        engine, "SELECT cleaned_at FROM dispatch_retention.runs"
    )
    unknown = error_of(engine, f"SELECT * FROM app_{MARK.lower()}")
    assert "(a name the job does not know) does not exist" in unknown
    assert MARK.lower() not in unknown


def test_a_trigger_cannot_smuggle_values_through_a_named_object_message(
    engine: Engine,
) -> None:
    """A RAISE with the SQLSTATE and wording of `permission denied` and a row value as the
    object's name: the phrase stays, the value does not."""
    raised = error_of(
        engine,
        "DO $$ BEGIN RAISE EXCEPTION 'permission denied for table +49 %', 'PIIMARK' "
        "USING ERRCODE = '42501'; END $$",
    )
    assert "permission denied for table (a name the job does not know)" in raised
    assert MARK not in raised


def test_rights_revoked_mid_run_fail_it_naming_the_table(
    engine: Engine, database_url: URL, tmp_path: Path, run_role: tuple[str, str]
) -> None:
    """UPDATE revoked from the run role between two chunks: the run fails (exit 1) and the
    reason names the right's table, in the log and the run record."""
    role, url = run_role
    seed_series(engine, range(1, 1001), young=every_fifth_young)
    slow = write_config(tmp_path / "slow.toml", config_text(clean="pause_between_chunks_ms = 300"))
    job = Job(url, slow, "run", "--yes", "--chunk-size", "100")
    job.wait_for("chunk_committed", seq=1)
    with engine.begin() as conn:
        conn.execute(text(f"REVOKE UPDATE ON dispatches FROM {role}"))
    assert job.finish(30) == 1, job.stderr
    error = job.last("run_failed")["error"]
    assert "InsufficientPrivilege" in error
    assert "permission denied for table dispatches" in error
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT error FROM dispatch_retention.runs WHERE status = 'failed'")
        ).scalar_one()
    assert "permission denied for table dispatches" in stored


# --- what an operator reads ------------------------------------------------------------------


def test_db_check_lists_a_missing_cleaned_at_instead_of_failing_on_it(
    engine: Engine, url_string: str, config: Path
) -> None:
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatches DROP COLUMN cleaned_at CASCADE"))
    proc = script("--config", str(config), "--database-url", url_string, "db", "check")
    assert proc.returncode == 1, proc.stderr
    assert "missing columns: cleaned_at" in proc.stdout
    assert "Traceback" not in proc.stderr and "UndefinedColumn" not in proc.stdout + proc.stderr


def test_the_lock_holder_start_is_logged_as_an_iso_time(
    engine: Engine, url_string: str, config: Path
) -> None:
    """`run_locked` names the holder's backend_start as ISO 8601, on the console too, never
    as Python's `datetime.datetime(...)`."""
    with RunLock(engine, run_locks("public.dispatches", None)) as lock:
        assert lock.acquired
        proc = script("--config", str(config), "--database-url", url_string,
                      "--log-format", "console", "run", "--yes")  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "datetime.datetime" not in proc.stderr
    assert re.search(r"backend_start'?: '?\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", proc.stderr), proc.stderr
