"""The auditor counts, and cannot read (docs/auditor.md, "What each role can and cannot do"):
the read-only role of `db grants` counts through the audit schema's view (`trail/facts.py`)
and gets the owner's `verify` report; a view built for another configuration, a missing one,
or one whose owner cannot see every row or read every personal column is refused with the
fix (exit 2), never counted through.

The scenario has every kind of row `verify` reports (violations, a held row, written-back
rows, cleaned rows, young, undatable and far-future rows) and cleaned values that a careless
rendering would corrupt (a quote, a backslash, `%`, `:name`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from dispatch_retention import errors
from dispatch_retention.checks import db_grants
from dispatch_retention.trail import facts
from dispatch_retention.trail.audit_tables import FACTS_VIEW
from tests.cli.harness import plan_table
from tests.helpers import (
    DAY,
    apply_grants,
    apply_sql,
    assert_no_marker,
    config_text,
    db_now,
    dispatch,
    granted_role,
    insert_rows,
    invoke,
    settings,
    write_config,
)

VIEW = f"dispatch_retention.{FACTS_VIEW}"
#: Cleaned values with a quote, a backslash, `%` and `:name` in them (TOML: `\\` is `\`).
TRICKY = r"""replace = { content = { note = "it's 100% \\ :gone" }, email = "o'k %s :x \\ gone" }"""
UNSETTLED = {"transmission_status": "scheduled", "delivery_status": "pending"}
FAR_FUTURE = datetime(2099, 1, 1, tzinfo=UTC)


@pytest.fixture
def tricky(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tricky.toml", config_text(clean=TRICKY))


def cli(url: str, cfg: Path, *args: str) -> Result:
    result = invoke("--config", str(cfg), "--database-url", url, *args)
    assert_no_marker(result.stdout, result.stderr)
    assert "Traceback" not in result.output
    return result


def report(url: str, cfg: Path) -> tuple[int, dict[str, Any]]:
    """`verify --format json`: the exit code and the document, but for its moment."""
    result = cli(url, cfg, "verify", "--format", "json")
    assert result.exit_code in (0, 5), result.output
    document = json.loads(result.stdout)
    document.pop("checked_at")
    return result.exit_code, document


def seed_every_kind(engine: Engine, owner: str, cfg: Path) -> None:
    """Rows 1-6 due and cleaned by a run as the owner (but row 3, whose member is held),
    then written back: row 1's msisdn, row 2's content as `{}`, not this config's value; rows
    11-13 due and never cleaned; 21-22 young; 31 undatable; 32 scheduled in 2099."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 7)])
    held = cli(owner, cfg, "hold", "add", "1003", "--reason", "case 17")
    assert held.exit_code == 0, held.output
    ran = cli(owner, cfg, "run", "--yes")
    assert ran.exit_code == 0, ran.output
    with engine.begin() as conn:
        conn.execute(text("UPDATE dispatches SET msisdn = '+4712345678' WHERE id = 1"))
        conn.execute(text("UPDATE dispatches SET content = '{}' WHERE id = 2"))
    insert_rows(
        engine,
        [
            *(dispatch(i, now - 500 * DAY) for i in range(11, 14)),
            *(dispatch(i, now - DAY) for i in range(21, 23)),
            dispatch(31, datetime(2999, 1, 1, tzinfo=UTC)),
            dispatch(32, now - 200 * DAY, scheduled_at=FAR_FUTURE, **UNSETTLED),
        ],
    )


EXPECTED = {
    "violations": [{"policy": "sms", "rows": 5}],  # rows 1, 2 (written back), 11-13
    "held_rows": 1,
    "cleaned_rows": 5,
    "anomalies": {"undatable_rows": 1, "future_scheduled_rows": 1, "written_back_rows": 2},
}


@pytest.fixture
def read_only(engine: Engine, database_url: URL) -> Iterator[tuple[str, str]]:
    """The read-only role, its grants (tricky cleaned values) run by the owner."""
    with granted_role(engine, database_url, "read-only", settings(clean=TRICKY)) as role:
        yield role


def test_the_read_only_role_gets_the_owners_report_through_the_view(
    engine: Engine, url_string: str, tricky: Path, read_only: tuple[str, str]
) -> None:
    """verify as the read-only role (which may not read a personal column) is the owner's
    report, row kinds and tricky cleaned values alike; and it did count through the view."""
    seed_every_kind(engine, url_string, tricky)
    _, ro_url = read_only

    owner_code, owner_report = report(url_string, tricky)
    ro_code, ro_report = report(ro_url, tricky)

    assert (ro_code, ro_report) == (owner_code, owner_report)
    assert ro_code == 5
    assert {key: ro_report[key] for key in EXPECTED} == EXPECTED
    with engine.begin() as conn:
        conn.execute(text(f"DROP VIEW {VIEW}"))
    assert cli(ro_url, tricky, "verify").exit_code == 2  # no view, no report: it used it


def test_the_views_flags_are_the_tables_personal_data(
    engine: Engine, url_string: str, tricky: Path, read_only: tuple[str, str]
) -> None:
    """has_<column> is true exactly where the column differs from what cleaning writes, the
    tricky values included, and the view shows no personal column."""
    seed_every_kind(engine, url_string, tricky)
    with engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT id, has_content, has_msisdn, has_email, has_app_token FROM {VIEW}")
        ).all()
        shown = conn.execute(text(f"SELECT * FROM {VIEW} LIMIT 0")).keys()
    flags = {row[0]: tuple(row[1:]) for row in rows}
    assert flags[4] == (False, False, False, False)  # cleaned by the run: `it's 100% \ :gone`
    assert flags[1] == (False, True, False, False)  # msisdn written back
    assert flags[2] == (True, False, False, False)  # `{}` is not this config's content
    assert flags[3] == flags[11] == (True, True, True, True)  # held / never cleaned
    assert set(shown).isdisjoint({"content", "msisdn", "email", "app_token"})
    assert "holds_personal_data" in shown and "member_id" in shown


def test_run_dry_run_as_the_read_only_role_plans_as_the_owner(
    engine: Engine, url_string: str, tricky: Path, read_only: tuple[str, str]
) -> None:
    """`run --dry-run` needs no personal column: the read-only role's plan is the owner's."""
    seed_every_kind(engine, url_string, tricky)
    owner = cli(url_string, tricky, "run", "--dry-run")
    ro = cli(read_only[1], tricky, "run", "--dry-run")
    assert (owner.exit_code, ro.exit_code) == (0, 0), ro.output
    assert plan_table(ro.stdout) == plan_table(owner.stdout)
    assert plan_table(ro.stdout)["sms"] == (90, 3)  # rows 11-13


def test_a_view_built_for_other_cleaned_values_is_refused_until_made_again(
    engine: Engine, url_string: str, tmp_path: Path, database_url: URL
) -> None:
    """Grants made for `content = {}`, then the config cleans content to another value:
    verify as the read-only role exits 2 naming the view, what changed and the command that
    fixes it; the same grants run again (CREATE OR REPLACE) make it count as the owner."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(1, now - 500 * DAY), dispatch(2, now - 500 * DAY)])
    before = write_config(tmp_path / "before.toml", config_text())
    changed_clean = "replace = { content = { redacted = true } }"
    after = write_config(tmp_path / "after.toml", config_text(clean=changed_clean))
    assert cli(url_string, after, "run", "--yes").exit_code == 0
    with granted_role(engine, database_url, "read-only", settings()) as (role, ro_url):
        assert report(ro_url, before) == report(url_string, before)

        refused = cli(ro_url, after, "verify")
        assert refused.exit_code == 2, refused.output
        assert refused.stdout == ""
        assert f"view {VIEW}: was built for other cleaned values of content" in refused.stderr
        assert f"db grants --role {role} --purpose read-only" in refused.stderr

        with engine.begin() as conn:
            apply_grants(conn, role, "read-only", settings(clean=changed_clean))
        code, ro_report = report(ro_url, after)
        assert (code, ro_report) == report(url_string, after)
        assert (code, ro_report["cleaned_rows"], ro_report["violation_rows"]) == (0, 2, 0)


def test_a_view_replaced_with_its_comment_kept_is_refused(
    engine: Engine, url_string: str, tmp_path: Path, database_url: URL
) -> None:
    """The red team's view: the same columns, a WHERE that hides the cleaned rows (so a
    written-back row no longer counts), the COMMENT left as it was. The definition the
    COMMENT records no longer matches: exit 2, never an OK that the owner would not give."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 4)])
    cfg = write_config(tmp_path / "r.toml", config_text())
    assert cli(url_string, cfg, "run", "--yes").exit_code == 0
    with engine.begin() as conn:
        conn.execute(text("UPDATE dispatches SET msisdn = '+4700000' WHERE id = 1"))
    assert report(url_string, cfg)[0] == 5
    with granted_role(engine, database_url, "read-only", settings()) as (_role, ro_url):
        assert report(ro_url, cfg) == report(url_string, cfg)
        with engine.begin() as conn:
            definition = conn.execute(
                text("SELECT pg_get_viewdef(CAST(:v AS regclass))"), {"v": VIEW}
            ).scalar_one()
            hiding = definition.rstrip().rstrip(";") + " WHERE dispatches.cleaned_at IS NULL"
            conn.execute(text(f"CREATE OR REPLACE VIEW {VIEW} AS {hiding}"))
        refused = cli(ro_url, cfg, "verify")
        assert refused.exit_code == 2, refused.output
        assert "was replaced since it was made" in refused.stderr


def test_the_views_record_holds_whatever_search_path_made_it_or_reads_it(
    engine: Engine, url_string: str, tmp_path: Path, database_url: URL
) -> None:
    """The definition's hash is taken with every name written whole: grants run under
    another search_path, and a read-only role whose own search_path finds the view, still
    count as the owner (pg_get_viewdef leaves out a schema the search_path finds)."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 4)])
    cfg = write_config(tmp_path / "r.toml", config_text())
    with granted_role(engine, database_url, "read-only", settings()) as (role, ro_url):
        with engine.begin() as conn:
            fitted = db_grants.fitted(conn, settings(), "read-only")
            conn.execute(text("SET LOCAL search_path = dispatch_retention, public"))
            apply_sql(conn, db_grants.statements(fitted, role, "read-only"))
            conn.execute(text(f"ALTER ROLE {role} SET search_path = pg_catalog, public"))
        assert report(ro_url, cfg) == report(url_string, cfg)


def test_a_view_built_for_other_clean_columns_is_refused_and_made_again_after_a_drop(
    engine: Engine, url_string: str, tmp_path: Path, database_url: URL
) -> None:
    """email moves from clean.columns to clean.keep: verify refuses the view naming both
    lists; CREATE OR REPLACE cannot drop its flag, so the view is dropped first (as the
    printed SQL says), then made again, and counts as the owner."""
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY)])
    narrower = 'columns = ["content", "msisdn", "app_token"]\nkeep = { email = "support" }'
    cfg = write_config(tmp_path / "narrower.toml", config_text(clean=narrower))
    with granted_role(engine, database_url, "read-only", settings()) as (role, ro_url):
        refused = cli(ro_url, cfg, "verify")
        assert refused.exit_code == 2, refused.output
        assert (
            "was built for clean.columns content, msisdn, email, app_token; the configuration "
            "names content, msisdn, app_token"
        ) in refused.stderr
        assert f"DROP VIEW {VIEW} first" in refused.stderr

        with pytest.raises(DBAPIError), engine.begin() as conn:
            apply_grants(conn, role, "read-only", settings(clean=narrower))
        with engine.begin() as conn:
            conn.execute(text(f"DROP VIEW {VIEW}"))
            apply_grants(conn, role, "read-only", settings(clean=narrower))
        assert report(ro_url, cfg) == report(url_string, cfg)
        assert report(ro_url, cfg)[1]["violations"] == [{"policy": "sms", "rows": 1}]


def test_no_view_and_no_column_rights_names_what_to_run(
    engine: Engine, url_string: str, tmp_path: Path, database_url: URL
) -> None:
    """Without the view, or without SELECT on it, the read-only role gets exit 2 naming the
    columns it may not read, the view and the `db grants` that makes both right."""
    cfg = write_config(tmp_path / "r.toml", config_text())
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY)])
    with granted_role(engine, database_url, "read-only") as (role, ro_url):
        fix = f"db grants --role {role} --purpose read-only"
        with engine.begin() as conn:
            conn.execute(text(f"REVOKE SELECT ON {VIEW} FROM {role}"))
        unreadable = cli(ro_url, cfg, "verify")
        assert unreadable.exit_code == 2, unreadable.output
        assert (
            f"role {role} may not read content, msisdn, email, app_token of public.dispatches, "
            f"and may not read the view {VIEW}"
        ) in unreadable.stderr
        assert fix in unreadable.stderr

        with engine.begin() as conn:
            conn.execute(text(f"DROP VIEW {VIEW}"))
        missing = cli(ro_url, cfg, "verify")
        assert missing.exit_code == 2, missing.output
        assert f"and there is no view {VIEW}" in missing.stderr and fix in missing.stderr
        assert missing.stdout == ""


def test_a_view_whose_owner_row_level_security_filters_is_refused(
    engine: Engine, url_string: str, tmp_path: Path, database_url: URL
) -> None:
    """Through a view, its owner's row-level security applies, not the caller's: a view
    made by an administrator that a policy filters is refused (exit 2, naming RLS and the
    owner) even for a read-only role with BYPASSRLS; the same role counts once it is not."""
    cfg = write_config(tmp_path / "r.toml", config_text())
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 5)])
    admin, role = (f"dr_{kind}_{database_url.database}"[:40] for kind in ("admin", "ro"))
    ro_url = database_url.set(drivername="postgresql", username=role)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {admin}"))
        conn.execute(text(f"CREATE ROLE {role} LOGIN BYPASSRLS"))
        conn.execute(text(f"GRANT SELECT ON dispatches TO {admin} WITH GRANT OPTION"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {admin} WITH GRANT OPTION"))
        conn.execute(
            text(f"GRANT USAGE, CREATE ON SCHEMA dispatch_retention TO {admin} WITH GRANT OPTION")
        )
        conn.execute(
            text(
                f"GRANT SELECT ON ALL TABLES IN SCHEMA dispatch_retention TO {admin} "
                "WITH GRANT OPTION"
            )
        )
        conn.execute(text(f"SET ROLE {admin}"))
        apply_grants(conn, role, "read-only")
        conn.execute(text("RESET ROLE"))
        conn.execute(text("ALTER TABLE dispatches ENABLE ROW LEVEL SECURITY"))
        conn.execute(text(f"CREATE POLICY odd ON dispatches TO {admin} USING (id % 2 = 1)"))
    try:
        refused = cli(ro_url.render_as_string(hide_password=False), cfg, "verify")
        assert refused.exit_code == 2, refused.output
        assert "row-level security is enabled and applies to role " + admin in refused.stderr
        assert f"which owns the view {VIEW}" in refused.stderr

        with engine.begin() as conn:
            conn.execute(text(f"ALTER ROLE {admin} BYPASSRLS"))
        code, counted = report(ro_url.render_as_string(hide_password=False), cfg)
        assert (code, counted) == report(url_string, cfg)
        assert counted["violations"] == [{"policy": "sms", "rows": 4}]
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"SET ROLE {admin}"))  # its column grants outlive DROP OWNED
            conn.execute(text(f"REVOKE SELECT ON dispatches FROM {role}"))
            conn.execute(text("RESET ROLE"))
            for name in (admin, role):
                conn.execute(text(f"DROP OWNED BY {name} CASCADE"))
                conn.execute(text(f"DROP ROLE {name}"))


def test_a_view_whose_owner_may_not_read_the_personal_columns_is_refused(
    engine: Engine, url_string: str, tmp_path: Path, database_url: URL
) -> None:
    """A view handed to a role that may not read the personal columns (here the run role)
    cannot compute its flags: refused, naming the owner and the columns."""
    cfg = write_config(tmp_path / "r.toml", config_text())
    with (
        granted_role(engine, database_url, "read-only") as (_, ro_url),
        granted_role(engine, database_url, "run") as (run_role, _),
    ):
        with engine.begin() as conn:
            conn.execute(text(f"ALTER VIEW {VIEW} OWNER TO {run_role}"))
        refused = cli(ro_url, cfg, "verify")
        assert refused.exit_code == 2, refused.output
        assert (
            f"belongs to role {run_role}, which may not read content, msisdn, email, app_token"
        ) in refused.stderr
        with engine.begin() as conn:
            conn.execute(text(f"ALTER VIEW {VIEW} OWNER TO CURRENT_USER"))


def test_a_role_that_reads_the_personal_columns_counts_on_the_table(
    engine: Engine, url_string: str, tmp_path: Path, database_url: URL
) -> None:
    """A role that may read every personal column reads the table itself: no view needed."""
    cfg = write_config(tmp_path / "r.toml", config_text())
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY)])
    with granted_role(engine, database_url, "read-only") as (role, ro_url):
        with engine.begin() as conn:
            conn.execute(text(f"DROP VIEW {VIEW}"))
            conn.execute(text(f"GRANT SELECT ON dispatches TO {role}"))
        assert report(ro_url, cfg) == report(url_string, cfg)


@pytest.mark.skipif(shutil.which("psql") is None, reason="the printed SQL is run by psql")
def test_the_printed_grants_run_by_psql_count_as_the_owner(
    engine: Engine, url_string: str, tricky: Path, database_url: URL
) -> None:
    """`db grants --purpose read-only` as printed (comment lines, tricky cleaned values)
    piped into psql by the owner: the role then reports what the owner reports."""
    seed_every_kind(engine, url_string, tricky)
    with granted_role(engine, database_url, "holds") as (role, ro_url):  # any plain role
        printed = cli(url_string, tricky, "db", "grants", "--role", role, "--purpose", "read-only")
        assert printed.exit_code == 0, printed.output
        assert printed.stdout.startswith("-- Run as the owner of public.dispatches")
        done = subprocess.run(
            ["psql", url_string, "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"],
            input=printed.stdout,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert report(ro_url, tricky) == report(url_string, tricky)
        assert report(ro_url, tricky)[1]["anomalies"]["written_back_rows"] == 2


def test_the_printed_view_writes_the_cleaned_values_as_postgresql_reads_them() -> None:
    """Quotes doubled, a backslash itself (standard_conforming_strings, set first), `%` and
    `:x` as they are, JSON as its text cast to jsonb; nothing left to bind."""
    printed = "\n".join(facts.statements(settings(clean=TRICKY)))
    assert printed.startswith("SET standard_conforming_strings = on;")
    content = r"""content IS DISTINCT FROM CAST('{"note": "it''s 100% \\ :gone"}' AS JSONB)"""
    assert content in printed
    assert r"""email IS DISTINCT FROM 'o''k %s :x \ gone' AS has_email""" in printed
    assert "%%" not in printed and "%(" not in printed


def test_a_flag_name_postgresql_would_cut_is_refused() -> None:
    """`has_` and a 61-character column make 65 characters: refused, not cut short."""
    long = "c" * 61
    s = settings(clean=f'columns = ["content", "msisdn", "email", "app_token", "{long}"]')
    with pytest.raises(errors.ConfigError, match=f"has_{long}, longer than"):
        facts.flags(s)


def test_the_notes_keep_a_name_with_a_newline_on_their_comment_line() -> None:
    """A quoted table name may hold a newline: the comment lines show it escaped (raw, it
    would end the comment and psql would run the rest), the statements quote it."""
    s = settings(table=r"\"Dis\npatches; DROP TABLE x; --\"")
    notes = db_grants.notes(s, "read-only")
    assert len(notes) == 2 and all("\n" not in note for note in notes)
    assert notes[0].startswith('-- Run as the owner of "Dis\\npatches; DROP TABLE x; --"')
    printed = "\n".join([*notes, *db_grants.statements(s, "r", "read-only")])
    assert 'REVOKE SELECT ON "Dis\npatches; DROP TABLE x; --" FROM r;' in printed
