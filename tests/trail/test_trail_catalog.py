"""The trail's catalog as the migrations make it (`objects.EXPECTED`), held equal to a
schema the migrations just made, under the default name and an odd one: `audit verify`
names any difference, so this is the one place that says what the migrations make."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from dispatch_retention.trail import migrate, objects, replica_lag


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
        "trigger runs.a is not as the migrations make it (f type 7 when)",
        "rule runs.r is not the job's",
    ]


@pytest.mark.parametrize("schema", ["dispatch_retention", 'Odd "Trail" Schema'])
def test_the_replica_lag_function_is_the_jobs_as_db_grants_makes_it_and_no_other(
    engine: Engine, schema: str
) -> None:
    """`db grants --purpose run` may add the lag function (`replica_lag.py`): as it makes it,
    `audit verify` finds nothing; with another body (a schema owner's forgery that answers
    "no lag"), it names the function."""
    migrate.upgrade(engine, schema)
    name = replica_lag.qualified(schema)
    with engine.begin() as conn:
        for statement in replica_lag.create(schema, "postgres"):
            conn.exec_driver_sql(statement, execution_options={"no_parameters": True})
        assert objects.differences(objects.read(conn, schema)) == []
        forged = replica_lag.create(schema, "postgres")[0].replace(
            replica_lag.BODY, "SELECT 0, 0, 0::numeric, 0::numeric, 0::float8, 0"
        )
        conn.exec_driver_sql(forged, execution_options={"no_parameters": True})
        found = objects.differences(objects.read(conn, schema))
        conn.exec_driver_sql(f"DROP FUNCTION {name}")
    assert len(found) == 1
    assert found[0].startswith("function replica_lag(OUT standbys integer")
    assert (
        "is not as `db grants` makes it (definer search_path=pg_catalog, pg_temp body" in found[0]
    )
