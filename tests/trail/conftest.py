"""Fixtures of the audit-trail tests: an isolated environment, a config file and the
common arguments (`base`) of every command they run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from ..helpers import (
    config_text,
    write_config,
)

# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ambient URL, config or trigger; structlog restored after the CLI reconfigured it."""
    for name in (
        "DATABASE_URL",
        "DATABASE_URL_FILE",
        "DISPATCH_RETENTION_CONFIG",
        "DISPATCH_RETENTION_TRIGGER",
    ):
        monkeypatch.delenv(name, raising=False)
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)  # CliRunner's stderr is closed once the invocation ends


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "retention.toml", config_text())


@pytest.fixture
def base(config_file: Path, url_string: str) -> list[str]:
    """The global options every command of a test gets: its config and its database."""
    return ["--config", str(config_file), "--database-url", url_string]
