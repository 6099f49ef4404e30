"""The job's own schema: Alembic's head, upgrade and downgrade on a real PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url

from dispatch_retention.config import MAX_CONFIG_BYTES
from dispatch_retention.trail import migrate
from dispatch_retention.trail.audit_tables import (
    ALEMBIC_VERSION_TABLE,
    TEXT_BOUNDS,
    AuditTables,
    bound_name,
)
from dispatch_retention.vocabulary import Status
from tests.helpers import config_text, granted_role, invoke


def test_head_constant_matches_alembic() -> None:
    """migrate.HEAD (what `run` requires) is the newest revision in migrations/versions."""
    assert ScriptDirectory.from_config(migrate.alembic_config()).get_current_head() == migrate.HEAD


def test_upgrade_creates_the_model_tables_in_their_own_schema(engine: Engine) -> None:
    """db upgrade into a fresh schema creates exactly the tables audit_tables.AuditTables describes,
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
        "events",
        "events_head",
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


def test_the_revisions_are_alembics_in_order() -> None:
    """migrate.REVISIONS lists every revision in migrations/versions, oldest first."""
    script = ScriptDirectory.from_config(migrate.alembic_config())
    walked = [r.revision for r in script.walk_revisions()]
    assert list(migrate.REVISIONS) == list(reversed(walked))


def _cli(url: str, *args: str) -> tuple[int, str]:
    result = invoke("--database-url", url, *args)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_an_older_image_says_the_database_is_newer(engine: Engine, url_string: str) -> None:
    """After a newer version migrated the database (an image rolled back): `db upgrade`,
    `run` and `verify` exit 2 saying the revision and that this image is older."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE dispatch_retention.dispatch_retention_alembic_version "
                          "SET version_num = '0099'"))  # fmt: skip
    for args in (("db", "upgrade"), ("run", "--yes"), ("verify",)):
        code, out = _cli(url_string, *args)
        assert code == 2, (args, out)
        assert "0099" in out and "older" in out, out


def test_tables_without_their_version_table_are_not_recreated(
    engine: Engine, url_string: str
) -> None:
    """The job's tables without the version table (a partial restore): `run` and `db upgrade`
    exit 2 naming the missing table (no 'run db upgrade' / DuplicateTable loop); the trail
    is left as it is."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatch_retention.dispatch_retention_alembic_version"))
    for args in (("db", "upgrade"), ("run", "--yes")):
        code, out = _cli(url_string, *args)
        assert code == 2, (args, out)
        assert "dispatch_retention_alembic_version" in out and "DuplicateTable" not in out
    assert inspect(engine).has_table("runs", schema="dispatch_retention")


def test_db_upgrade_never_adopts_tables_it_did_not_create(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """`audit.schema = "public"` where the application already has a `runs` table: `db
    upgrade` exits 2 and leaves that table as it was (no DuplicateTable, no adoption)."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE public.runs (id int PRIMARY KEY, note text)"))
        conn.execute(text("INSERT INTO public.runs VALUES (1, 'the application')"))
    config = tmp_path / "public.toml"
    config.write_text(
        '[audit]\nschema = "public"\n[[policy]]\nname = "p"\nretention_days = 30\n',
        encoding="utf-8",
    )
    code, out = _cli(url_string, "--config", str(config), "db", "upgrade")
    assert code == 2, out
    assert "never adopts" in out and "DuplicateTable" not in out
    with engine.connect() as conn:
        assert conn.execute(text("SELECT note FROM public.runs")).scalar_one() == "the application"


# --- 0007: every text of the trail bounded ------------------------------------------------


def _revision(number: str) -> Any:
    """A migration's module, as Alembic loads it."""
    script = ScriptDirectory.from_config(migrate.alembic_config())
    return script.get_revision(number).module  # type: ignore[union-attr]


def test_the_bounds_are_frozen_equal() -> None:
    """The bounds migration 0007 made CHECK constraints of are the ones the job's writers
    check against (`audit_tables.TEXT_BOUNDS`); the config text's is the config file's own."""
    assert _revision("0007").BOUNDS == TEXT_BOUNDS
    assert TEXT_BOUNDS["runs"]["config_text"] == MAX_CONFIG_BYTES


#: The catalog's types whose values have no size of their own.
UNBOUNDED_TYPES = ("text", "jsonb", "json", "bytea", "character varying", "character")


def test_every_text_column_of_the_trail_is_bounded(engine: Engine) -> None:
    """Read from the catalog, not from a list: every text and document column of every table
    in the audit schema (but a varchar(n), which its type bounds) has its CHECK constraint
    `<table>_<column>_bounded`, on its size, NOT VALID (rows written before stay)."""
    with engine.connect() as conn:
        columns = conn.execute(
            text(
                "SELECT c.relname, a.attname FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'dispatch_retention' AND c.relkind = 'r' "
                "AND a.attnum > 0 AND NOT a.attisdropped "
                "AND format_type(a.atttypid, a.atttypmod) = ANY(:types)"
            ),
            {"types": list(UNBOUNDED_TYPES)},
        ).all()
        checks = {
            name: (definition, valid)
            for name, definition, valid in conn.execute(
                text(
                    "SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
                    "WHERE contype = 'c' AND connamespace = 'dispatch_retention'::regnamespace"
                )
            )
        }
    found = {(t, c) for t, c in columns}
    assert found == {(t, c) for t, cs in TEXT_BOUNDS.items() for c in cs}
    for table, column in found:
        definition, valid = checks[bound_name(table, column)]
        assert re.search(rf"octet_length\(\(?{column}\b", definition), definition
        assert f"<= {TEXT_BOUNDS[table][column]}" in definition, definition
        assert "NOT VALID" in definition and not valid


def test_db_check_finds_nothing_stale_after_the_upgrade(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """0007 changes no grant (the roles of `db grants` have table rights, which cover the new
    column): `db check` as the run role finds the rights it needs, as before."""
    config = tmp_path / "retention.toml"
    config.write_text(config_text(), encoding="utf-8")
    with granted_role(engine, make_url(url_string), "run") as (_role, role_url):
        code, out = _cli(role_url, "--config", str(config), "db", "check")
    assert code == 0, out
    assert "[error]" not in out, out


# --- 0008: stamps under the chain's lock, chunks that know their transaction ------------------


def _to(engine: Engine, revision: str, how: str = "downgrade") -> None:
    cfg = migrate.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["schema"] = "dispatch_retention"
        getattr(command, how)(cfg, revision)


def test_a_trail_written_under_0007_upgrades_and_verifies_beside_new_events(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """A database the previous release made and wrote (version 1 events: a finished run, a
    placed and a released hold, an open hold) upgrades to 0008: its old events verify beside
    the version 2 events a new run writes, the open hold can still be released, every trigger
    of the trail is ENABLE ALWAYS, and old chunks know no transaction."""
    from tests.helpers import run_job, seed_series, settings

    _to(engine, "0007")
    s = "dispatch_retention"
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {s}.legal_holds (member_id, reason) VALUES (1, 'a')"))
        conn.execute(text(f"INSERT INTO {s}.legal_holds (member_id, reason) VALUES (2, 'b')"))
        conn.execute(text(f"UPDATE {s}.legal_holds SET released_at = now() WHERE member_id = 2"))
    _to(engine, "head", "upgrade")
    seed_series(engine, range(0, 50))
    assert run_job(engine, settings(), chunk_size=20).status is Status.SUCCEEDED
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {s}.legal_holds SET released_at = now() WHERE member_id = 1"))
        versions = conn.execute(
            text(f"SELECT (body::jsonb ->> 'v')::int FROM {s}.events ORDER BY seq")
        ).scalars()
        assert list(versions)[:3] == [1, 1, 1]
        enabled = conn.execute(
            text(
                "SELECT DISTINCT tgenabled::text FROM pg_trigger WHERE NOT tgisinternal AND "
                f"tgrelid::regclass::text LIKE '{s}.%'"
            )
        ).scalars()
        assert list(enabled) == ["A"]
    config = tmp_path / "retention.toml"
    config.write_text(config_text(), encoding="utf-8")
    code, out = _cli(url_string, "--config", str(config), "audit", "verify")
    assert code == 0 and "OK:" in out, out


def test_db_check_names_a_read_only_view_an_earlier_release_made(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """The read-only view gains `row_xact` (format 2): one made by the previous release
    (format 1) is named by `db check` with the SQL to run again, and the read-only role's
    `verify` refuses it (exit 2); made again, both are content."""
    from tests.helpers import apply_grants

    config = tmp_path / "retention.toml"
    config.write_text(config_text(), encoding="utf-8")
    with granted_role(engine, make_url(url_string), "read-only") as (role, role_url):
        code, out = _cli(url_string, "--config", str(config), "db", "check")
        assert "[ok   ] facts view" in out and "is current" in out, out
        with engine.begin() as conn:  # the COMMENT of a view the previous release made
            conn.execute(
                text(
                    "DO $$ BEGIN EXECUTE format('COMMENT ON VIEW dispatch_retention.dispatch_facts "
                    "IS %L', jsonb_set(obj_description('dispatch_retention.dispatch_facts'::"
                    "regclass, 'pg_class')::jsonb, '{format}', '1')::text); END $$"
                )
            )
        code, out = _cli(url_string, "--config", str(config), "db", "check")
        assert "[warn ] facts view" in out and "another version" in out, out
        assert "--purpose read-only` prints" in out, out
        code, out = _cli(role_url, "--config", str(config), "verify")
        assert code == 2 and "another version" in out, out
        with engine.begin() as conn:
            apply_grants(conn, role, "read-only")
        code, out = _cli(role_url, "--config", str(config), "verify")
        assert code in (0, 5), out
        code, out = _cli(url_string, "--config", str(config), "db", "check")
        assert "is current" in out, out


def test_the_downgrade_of_0008_restores_the_functions_0005_made(engine: Engine) -> None:
    """0008's downgrade writes 0005's event functions again (a frozen copy): held equal here
    to what an upgrade to 0007 makes, with the triggers back as they were."""

    def made() -> dict[str, str]:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid) FROM pg_proc p "
                    "WHERE p.pronamespace = 'dispatch_retention'::regnamespace ORDER BY 1"
                )
            ).all()
            triggers = conn.execute(
                text(
                    "SELECT tgrelid::regclass::text || '.' || tgname || ':' || tgenabled::text "
                    "FROM pg_trigger WHERE NOT tgisinternal AND tgrelid::regclass::text "
                    "LIKE 'dispatch_retention.%' ORDER BY 1"
                )
            ).scalars()
            return {**dict(rows), "triggers": ", ".join(triggers)}

    _to(engine, "base")
    _to(engine, "0007", "upgrade")
    at_0007 = made()
    _to(engine, "head", "upgrade")
    assert made() != at_0007
    _to(engine, "0007")
    assert made() == at_0007
