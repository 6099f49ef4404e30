"""Test databases: a real PostgreSQL, never a mock.

Where the server comes from, in order: `TEST_DATABASE_URL` (CI points it at the local
server), else a testcontainers PostgreSQL when a Docker engine answers, else the embedded
server of the `pgserver` package. No test is skipped for want of a database.

Each test gets a fresh database copied from a template that already holds the dispatches
table (CREATE DATABASE ... TEMPLATE), so tests never see each other's rows.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url

from dispatch_retention.catalog import indexes
from dispatch_retention.config import Target
from dispatch_retention.demo.synthetic import create_dispatches
from dispatch_retention.pg import engines
from dispatch_retention.trail import migrate
from tests.faults import PROBE_APP, make_config
from tests.helpers import (
    AMBIENT,
    Job,
    config_text,
    fresh_database,
    granted_role,
    settings,
    write_config,
)

AUDIT_SCHEMA = "dispatch_retention"


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def server_url() -> Iterator[URL]:
    """An admin URL of the PostgreSQL server the suite runs against."""
    with contextlib.ExitStack() as stack:
        raw = os.environ.get("TEST_DATABASE_URL")
        if not raw and _docker_answers():
            from testcontainers.postgres import PostgresContainer

            container = stack.enter_context(PostgresContainer("postgres:15", driver="psycopg"))
            raw = container.get_connection_url()
        if not raw:
            import pgserver

            data = stack.enter_context(tempfile.TemporaryDirectory(prefix="dr-test-pg-"))
            raw = str(pgserver.get_server(data, cleanup_mode="stop").get_uri())
        yield engines.parse_url(raw)


def _admin(url: URL) -> Engine:
    return create_engine(url, isolation_level="AUTOCOMMIT", poolclass=None)


@pytest.fixture(scope="session")
def template_db(server_url: URL) -> Iterator[str]:
    """A template database holding the dispatches table with production-like indexes and
    the policy indexes of the default test settings."""
    name = f"dr_tmpl_{os.getpid()}"
    admin = _admin(server_url)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(server_url.set(database=name))
    with engine.begin() as conn:
        create_dispatches(conn, Target())
        indexes.create(conn, settings())  # the job's own, as `db check` asks for them
    migrate.upgrade(engine, AUDIT_SCHEMA)
    engine.dispose()
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def database_url(server_url: URL, template_db: str) -> Iterator[URL]:
    """A fresh database for one test, copied from the template."""
    with fresh_database(server_url, template_db) as url:
        yield url


@pytest.fixture
def engine(database_url: URL) -> Iterator[Engine]:
    eng = engines.make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def run_role(engine: Engine, database_url: URL) -> Iterator[tuple[str, str]]:
    """A role with exactly the rights of `db grants --purpose run`: its name and URL."""
    with granted_role(engine, database_url, "run") as role:
        yield role


@pytest.fixture
def url_string(database_url: URL) -> str:
    """The test database's URL as a user would pass it (postgresql://...)."""
    return database_url.set(drivername="postgresql").render_as_string(hide_password=False)


# The fixtures every database fixture stems from: the suite's server, and the server of its
# own that test_connection_faults.py starts and stops (`throwaway`).
SERVER_FIXTURES = frozenset({"server_url", "throwaway"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `db` every test that reaches PostgreSQL through a fixture: a test needs a server
    exactly when its fixture closure holds one of SERVER_FIXTURES. (A test that starts one
    without a fixture, as the demo's does, carries `@pytest.mark.db` itself.) `make test-fast`
    runs the others (`-m "not db"`), and they pass with no server at all."""
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.db)


def pytest_report_header(config: pytest.Config) -> str:
    source = (
        "TEST_DATABASE_URL"
        if os.environ.get("TEST_DATABASE_URL")
        else "testcontainers or embedded pgserver"
    )
    return f"database: {source}"


_ = make_url  # re-exported for tests that build URLs


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test picks up a URL, config, trigger or shard from the developer's or CI's
    environment (`helpers.AMBIENT`); a test sets what it needs."""
    for name in AMBIENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """CLI tests configure structlog to print to click's stream; undo it after each test."""
    yield
    structlog.reset_defaults()


# --- the fault-injection tests' fixtures (tests/faults.py holds their helpers) ----------
@pytest.fixture(autouse=True)
def _no_job_outlives_its_test() -> Iterator[None]:
    yield
    Job.reap()


@pytest.fixture
def probe(database_url: URL) -> Iterator[Engine]:
    """The test's own engine (another application_name than the job's)."""
    engine = create_engine(
        database_url, pool_pre_ping=True, connect_args={"application_name": PROBE_APP}
    )
    yield engine
    engine.dispose()


@pytest.fixture
def plain_config(tmp_path: Path) -> Path:
    """The config of a following normal run: defaults and DEFAULT_POLICIES."""
    return make_config(tmp_path, "plain.toml")


# --- the command tests' fixtures (tests/cli, tests/trail, tests/checks) -------------------------
@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """The default test config, written to a file."""
    return write_config(tmp_path / "retention.toml", config_text())


@pytest.fixture
def base(config_file: Path, url_string: str) -> list[str]:
    """The global options every command of a test gets: its config and its database."""
    return ["--config", str(config_file), "--database-url", url_string]
