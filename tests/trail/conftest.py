"""Fixtures of the audit-trail tests: a config file and the common arguments (`base`) of
every command they run (tests/conftest.py clears the ambient settings and restores structlog)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..helpers import (
    config_text,
    write_config,
)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "retention.toml", config_text())


@pytest.fixture
def base(config_file: Path, url_string: str) -> list[str]:
    """The global options every command of a test gets: its config and its database."""
    return ["--config", str(config_file), "--database-url", url_string]
