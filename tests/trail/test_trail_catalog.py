"""The trail's catalog as the migrations make it (`objects.EXPECTED`), held equal to a
schema the migrations just made, under the default name and an odd one: `audit verify`
names any difference, so this is the one place that says what the migrations make."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from dispatch_retention.trail import migrate, objects


@pytest.mark.parametrize("schema", ["dispatch_retention", "dr_other", 'Odd "Trail" Schema'])
def test_a_migrated_schema_is_what_trail_catalog_expects(engine: Engine, schema: str) -> None:
    migrate.upgrade(engine, schema)
    with engine.connect() as conn:
        found = objects.read(conn, schema)
    written = "\n".join(f"    {k!r}: {v!r}," for k, v in found.items())
    assert objects.differences(found) == [], (
        "the migrations changed the trail's catalog: if that is meant, EXPECTED is now\n" + written
    )


def test_each_kind_of_difference_is_named() -> None:
    expected = {"trigger runs.a": "f type 7 unconditional", "function f()": "definer body 1"}
    found = {"trigger runs.a": "f type 7 when", "rule runs.r": "present"}
    assert objects.differences(found, expected) == [
        "function f() is gone",
        "trigger runs.a is not as the migrations made it (f type 7 when)",
        "rule runs.r is not the job's",
    ]
