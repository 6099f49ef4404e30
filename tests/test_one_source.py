"""Facts kept in two places because one of them is frozen (a migration never imports code
that can change later), each pair held equal here, so that the next migration or status
cannot make them drift apart unseen."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from dispatch_retention import history

VERSIONS = Path(__file__).parents[1] / "src" / "dispatch_retention" / "migrations" / "versions"


def migration(revision: str) -> ModuleType:
    """The migration module of `revision` (`0003`), loaded from its file."""
    (path,) = VERSIONS.glob(f"{revision}_*.py")
    spec = importlib.util.spec_from_file_location(f"migration_{revision}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "revisions"),
    [
        pytest.param("STARTED_WITH", ("0003", "0006"), id="what-a-run-started-with"),
        pytest.param("PLANNED", ("0003", "0006"), id="a-run's-plan"),
        pytest.param("PLACED_WITH", ("0004", "0006"), id="what-a-hold-was-placed-with"),
    ],
)
def test_history_follows_the_columns_the_guards_freeze(name: str, revisions: tuple[str]) -> None:
    """`history`'s column lists are the ones the guards of the migrations keep unchanged:
    `audit verify` holds a row's events to the story the guards allow."""
    for revision in revisions:
        assert getattr(history, name) == getattr(migration(revision), name), revision
