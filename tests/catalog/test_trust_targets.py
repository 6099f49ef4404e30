"""Targets that would hide rows: row-level security and views are refused (exit 2); a table
named with or without its schema is one target.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, text

from tests.helpers import config_text, run_script, seed_series, snapshot, write_config

# --- targets that would hide rows ------------------------------------------------------------


def test_row_level_security_that_hides_rows_is_refused_with_exit_2(
    engine: Engine, run_role: tuple[str, str], tmp_path: Path
) -> None:
    """RLS hiding half the rows from the run role: `run`, `run --dry-run` and `db check`
    exit 2 naming row-level security and BYPASSRLS, touching nothing; with BYPASSRLS the
    run cleans every due row."""
    role, url = run_role
    seed_series(engine, range(1, 21))
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatches ENABLE ROW LEVEL SECURITY"))
        conn.execute(text(f"CREATE POLICY half ON dispatches TO {role} USING (id % 2 = 0)"))
    config = write_config(tmp_path / "r.toml", config_text())
    for args in (("run", "--yes"), ("run", "--dry-run"), ("db", "check")):
        refused = run_script(url, config, *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert "row-level security" in refused.stderr and "BYPASSRLS" in refused.stderr
    assert all(row["cleaned_at"] is None for row in snapshot(engine).values())
    with engine.begin() as conn:
        conn.execute(text(f"ALTER ROLE {role} BYPASSRLS"))
    done = run_script(url, config, "run", "--yes")
    assert done.returncode == 0, done.stderr
    assert done.last("run_finished")["rows_cleaned"] == 20


def test_a_view_as_the_target_is_refused_and_names_resolve_to_one_target(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """A soft-delete view over the table is refused (exit 2, naming the view); the table
    named with or without its schema is one target in the audit trail."""
    seed_series(engine, range(1, 11))
    with engine.begin() as conn:
        conn.execute(
            text("CREATE VIEW live_dispatches AS SELECT * FROM dispatches WHERE id % 2 = 0")
        )
    view = write_config(
        tmp_path / "v.toml",
        config_text().replace("[clean]", '[target]\ntable = "live_dispatches"\n[clean]'),
    )
    for args in (("run", "--yes"), ("run", "--dry-run"), ("verify",), ("db", "check")):
        refused = run_script(url_string, view, *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert "is a view, not a table" in refused.stderr
    plain = write_config(tmp_path / "p.toml", config_text())
    qualified = write_config(
        tmp_path / "q.toml",
        config_text().replace("[clean]", '[target]\ntable = "public.dispatches"\n[clean]'),
    )
    for config in (plain, qualified):
        done = run_script(url_string, config, "run", "--yes")
        assert done.returncode == 0, done.stderr
    with engine.connect() as conn:
        targets = conn.execute(text("SELECT DISTINCT target_table FROM dispatch_retention.runs"))
        assert [t for (t,) in targets] == ["public.dispatches"]
