"""Facts kept in two places because one of them is frozen (a migration never imports code
that can change later), each pair held equal here, so that the next migration or status
cannot make them drift apart unseen."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import Engine, text

from dispatch_retention import config
from dispatch_retention.cli import root
from dispatch_retention.config import DEFAULT_AUDIT_SCHEMA
from dispatch_retention.rule import policy
from dispatch_retention.trail import audit_tables as schema_module
from dispatch_retention.trail import history, migrate, objects
from dispatch_retention.vocabulary import Exit, Remaining

VERSIONS = (
    Path(__file__).parents[2] / "src" / "dispatch_retention" / "trail" / "migrations" / "versions"
)


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


#: Every name of a migrated trail that an error can carry: the schema's tables, and the
#: columns, constraints, unique indexes and triggers of the trail's tables, the functions.
_CATALOG_NAMES = text(
    """
WITH trail AS (SELECT c.oid FROM pg_class c
               WHERE c.relnamespace = to_regnamespace(:schema) AND c.relname = ANY(:tables))
SELECT c.relname FROM pg_class c
  WHERE c.relnamespace = to_regnamespace(:schema) AND c.relkind = 'r'
UNION SELECT a.attname FROM pg_attribute a
  WHERE a.attrelid IN (SELECT oid FROM trail) AND a.attnum > 0 AND NOT a.attisdropped
UNION SELECT k.conname FROM pg_constraint k WHERE k.conrelid IN (SELECT oid FROM trail)
  AND k.contype <> 'n'  -- NOT NULL (a row from PostgreSQL 18 on): its error names the column
UNION SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
  WHERE i.indrelid IN (SELECT oid FROM trail) AND i.indisunique
UNION SELECT g.tgname FROM pg_trigger g
  WHERE g.tgrelid IN (SELECT oid FROM trail) AND NOT g.tgisinternal
UNION SELECT p.proname FROM pg_proc p WHERE p.pronamespace = to_regnamespace(:schema)
"""
)
_BODIES = text("SELECT p.prosrc FROM pg_proc p WHERE p.pronamespace = to_regnamespace(:schema)")
#: A refusal raised under a constraint's name (`RAISE ... USING ... CONSTRAINT = 'name'`).
_RAISED = re.compile(r"CONSTRAINT\s*=\s*'([^']+)'")


def test_the_names_errors_may_show_are_the_migrated_catalogs(engine: Engine) -> None:
    """`audit_tables.AUDIT_NAMES` (the job's names that `diagnosis.describe_error` shows)
    holds every name of a migrated trail an error can carry, and `objects.RAISED` is exactly
    the names its functions raise refusals under: a migration that adds either adds it there."""
    schema = DEFAULT_AUDIT_SCHEMA
    migrate.upgrade(engine, schema)
    with engine.connect() as conn:
        tables = list(objects.TABLES)
        found = set(conn.execute(_CATALOG_NAMES, {"schema": schema, "tables": tables}).scalars())
        bodies = conn.execute(_BODIES, {"schema": schema}).scalars()
        raised = {name for body in bodies for name in _RAISED.findall(body)}
    assert raised == objects.RAISED
    assert sorted(found - schema_module.AUDIT_NAMES) == []


def test_the_settled_words_are_the_apis() -> None:
    """The rule's settled statuses are words of the API (`config.API_WORDS`), in the
    columns it names (`policy.SETTLED_COLUMNS`), which a policy may match on too."""
    words = (policy.SETTLED_TRANSMISSION, policy.SETTLED_DELIVERY)
    settled = dict(zip(policy.SETTLED_COLUMNS, words, strict=True))
    assert {c: set(w) - set(config.API_WORDS[c]) for c, w in settled.items()} == {
        "transmission_status": set(),
        "delivery_status": set(),
    }
    assert set(config.API_WORDS) <= set(config.MATCH_KEYS)


@pytest.mark.parametrize("page", ["docs/operations.md", "docs/auditor.md"])
def test_the_pages_name_every_reason_a_run_is_incomplete(page: str) -> None:
    """The pages that explain `remaining_reason` name each of `vocabulary.Remaining`."""
    written = (Path(__file__).parents[2] / page).read_text()
    assert [r.value for r in Remaining if f"`{r.value}`" not in written] == []


def test_the_cli_names_every_exit_code() -> None:
    """The command line's docstring lists each of `vocabulary.Exit`, and no other code
    below 128 (a signal's)."""
    assert root.__doc__ is not None
    listed = root.__doc__.partition("Exit codes:")[2]
    named = {int(n) for n in re.findall(r"\b(\d+) [a-z]", listed) if int(n) < 128}
    assert named == {int(code) for code in Exit}
