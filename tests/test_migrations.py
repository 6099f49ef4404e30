"""The job's own schema: Alembic's head, upgrade and downgrade on a real PostgreSQL."""

from __future__ import annotations

import re

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from dispatch_retention import migrate
from dispatch_retention.schema import ALEMBIC_VERSION_TABLE, AuditTables
from dispatch_retention.vocabulary import Status


def test_head_constant_matches_alembic() -> None:
    """migrate.HEAD (what `run` requires) is the newest revision in migrations/versions."""
    assert ScriptDirectory.from_config(migrate.alembic_config()).get_current_head() == migrate.HEAD


def test_upgrade_creates_the_model_tables_in_their_own_schema(engine: Engine) -> None:
    """db upgrade into a fresh schema creates exactly the tables schema.AuditTables describes,
    with their columns, and its own version table (never `alembic_version`)."""
    before, after = migrate.upgrade(engine, "dr_other")
    assert (before, after) == (None, migrate.HEAD)
    inspector = inspect(engine)
    model = AuditTables("dr_other")
    for table in model.metadata.sorted_tables:
        columns = {c["name"] for c in inspector.get_columns(table.name, schema="dr_other")}
        assert columns == {c.name for c in table.columns}, table.name
    assert set(inspector.get_table_names(schema="dr_other")) == {
        "runs",
        "chunks",
        "legal_holds",
        ALEMBIC_VERSION_TABLE,
    }
    assert not inspector.has_table("alembic_version", schema="public")


def test_downgrade_and_upgrade_again(engine: Engine) -> None:
    """The migration is reversible: downgrade to base drops the tables, upgrade restores them."""
    cfg = migrate.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["schema"] = "dispatch_retention"
        command.downgrade(cfg, "base")
    with engine.connect() as conn:
        assert migrate.current(conn, "dispatch_retention") is None
        count = conn.execute(
            text("SELECT count(*) FROM pg_tables WHERE schemaname = 'dispatch_retention'")
        ).scalar()
    assert count == 1  # only the version table remains
    assert migrate.upgrade(engine, "dispatch_retention") == (None, migrate.HEAD)


def test_the_status_enum_is_the_check_constraint(engine: Engine) -> None:
    """`Status.recorded()` (what the code writes) equals the statuses the migrated CHECK
    constraint on runs.status allows (migrations keep their own literals)."""
    with engine.connect() as conn:
        definition = conn.execute(
            text(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conname = 'runs_status_known' "
                "AND conrelid = 'dispatch_retention.runs'::regclass"
            )
        ).scalar_one()
    allowed = set(re.findall(r"'([a-z_]+)'::text", definition))
    assert allowed == {s.value for s in Status.recorded()}
