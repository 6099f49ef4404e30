"""Names quoted in one place (`names.quoted_name`, on SQLAlchemy's PostgreSQL preparer):
a plain name as it is, anything else quoted, a reserved word too; read back by the
config's own parser; and a `%` in a name doubled by no one but the driver's `text()`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine

from dispatch_retention import config
from dispatch_retention.checks import audit_verify
from dispatch_retention.names import MAX_IDENTIFIER, name_parts, quoted_name
from dispatch_retention.trail import migrate
from dispatch_retention.trail.audit_tables import AuditTables
from tests.helpers import DEFAULT_POLICIES, run_job, seed_series


@pytest.mark.parametrize(
    ("parts", "always", "quoted"),
    [
        pytest.param(("dispatches",), False, "dispatches", id="plain"),
        pytest.param(("public", "dispatches"), False, "public.dispatches", id="plain-schema"),
        pytest.param(("user", "dispatches"), False, '"user".dispatches', id="reserved-word"),
        pytest.param(("Messaging", "Dispatches"), False, '"Messaging"."Dispatches"', id="capitals"),
        pytest.param(('say "hi"',), False, '"say ""hi"""', id="a-quote"),
        pytest.param(("a%b", "x$y"), False, '"a%b"."x$y"', id="percent-and-dollar"),
        pytest.param(("dispatch_retention",), True, '"dispatch_retention"', id="always"),
    ],
)
def test_quoted_name(parts: tuple[str, ...], always: bool, quoted: str) -> None:
    """Each part as it is where it is a plain name and no reserved word, else quoted."""
    assert quoted_name(*parts, always=always) == quoted


_PART = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1
).filter(lambda p: len(p.encode()) <= MAX_IDENTIFIER)


@given(st.lists(_PART, min_size=1, max_size=2), st.booleans())
def test_a_quoted_name_reads_back_as_its_parts(parts: list[str], always: bool) -> None:
    """What `quoted_name` writes, the config's parser reads back part for part (a resolved
    target's name is written into the settings this way and parsed again)."""
    assert name_parts(quoted_name(*parts, always=always)) == parts


def test_audit_verify_reads_a_trail_whose_schema_holds_a_percent(engine: Engine) -> None:
    """A `%` in the audit schema's name reaches the server as itself (the driver's dialect
    doubled it once more before): `audit verify` finds the trail whole."""
    schema = "audit%trail"
    s = config.parse(f"[audit]\nschema = '\"{schema}\"'\n{DEFAULT_POLICIES}", "test.toml")
    migrate.upgrade(engine, schema)
    seed_series(engine, range(0, 40))
    assert run_job(engine, s, chunk_size=10).status.value == "succeeded"
    with engine.connect() as conn:
        report = audit_verify.check(conn, s, AuditTables(schema))
    assert (report.findings, report.chunks_counted) == ([], 4)
