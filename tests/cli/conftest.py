"""Fixtures of the command-line tests: a config file, an upgraded database and its URL with
a password (which no output may show). tests/conftest.py clears the ambient settings."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from tests.cli.harness import AUDIT, PASSWORD
from tests.helpers import invoke

_roles = itertools.count()


@pytest.fixture
def secret_url(server_url: URL, database_url: URL, upgraded: str) -> Iterator[str]:
    """The test database's URL for a least-privilege login role whose password is PASSWORD.

    A role of its own makes the password real on any server (trust, md5 or scram), so the
    CLI always sees a URL carrying a secret it must never print."""
    role = f"dr_cli_{os.getpid()}_{next(_roles)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    owner = create_engine(database_url)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
    with owner.begin() as conn:
        for grant in (
            f"GRANT USAGE ON SCHEMA public, {AUDIT} TO {role}",
            f"GRANT SELECT, UPDATE ON public.dispatches TO {role}",
            f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {AUDIT} TO {role}",
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {AUDIT} TO {role}",
        ):
            conn.execute(text(grant))
    yield database_url.set(
        drivername="postgresql", username=role, password=PASSWORD
    ).render_as_string(hide_password=False)
    with owner.begin() as conn:
        conn.execute(text(f"DROP OWNED BY {role}"))
    owner.dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP ROLE {role}"))
    admin.dispose()


@pytest.fixture
def upgraded(url_string: str, config_file: Path) -> str:
    """The test database after `db upgrade` (a run refuses to start without the audit schema)."""
    result = invoke("--config", str(config_file), "--database-url", url_string, "db", "upgrade")
    assert result.exit_code == 0, result.output
    return url_string
