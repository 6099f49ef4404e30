"""The command line in-process (click's CliRunner) against a real PostgreSQL: dry runs, runs,
guards, usage errors and their exit codes, URLs that never show their password.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from dispatch_retention.run.lock import lock_key
from tests.cli.harness import (
    EXPECTED_PLAN,
    INVALID_CONFIGS,
    PASSWORD,
    UNREACHABLE,
    plan_table,
    seed,
)
from tests.helpers import (
    MARK,
    assert_no_half_cleaned_row,
    config_text,
    invoke,
    json_lines,
    snapshot,
    write_config,
)

# --- 1. the CLI in-process -------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(
    engine: Engine, upgraded: str, config_file: Path
) -> None:
    """`run --dry-run` prints each policy's retention and due count, and writes nothing."""
    seed(engine)
    before = snapshot(engine)
    result = invoke("--config", str(config_file), "--database-url", upgraded, "run", "--dry-run")
    assert result.exit_code == 0, result.output
    assert plan_table(result.stdout) == EXPECTED_PLAN
    assert "due in total:                      4" in result.stdout
    assert "unsettled, waiting out the grace:  1" in result.stdout
    assert before == snapshot(engine)
    assert MARK not in result.output
    runs = invoke("--config", str(config_file), "--database-url", upgraded, "audit", "list",
                  "--format", "json")  # fmt: skip
    assert runs.exit_code == 0, runs.output
    assert json.loads(runs.stdout) == []  # not even a run record


def test_run_yes_cleans_the_due_rows_and_exits_0(
    engine: Engine, upgraded: str, config_file: Path
) -> None:
    """`run --yes` strips exactly the due rows; a dry run afterwards finds nothing due."""
    due = seed(engine)
    before = snapshot(engine)
    result = invoke("--config", str(config_file), "--database-url", upgraded, "run", "--yes")
    assert result.exit_code == 0, result.output
    assert ": succeeded" in result.stdout
    assert "cleaned in total: 4" in result.stdout
    assert due == assert_no_half_cleaned_row(snapshot(engine), before=before)
    assert MARK not in result.output
    again = invoke("--config", str(config_file), "--database-url", upgraded, "run", "--dry-run")
    assert again.exit_code == 0
    assert {name: (days, 0) for name, (days, _) in EXPECTED_PLAN.items()} == plan_table(
        again.stdout
    )


def test_run_without_a_terminal_never_asks(
    engine: Engine, upgraded: str, config_file: Path
) -> None:
    """Without --yes and without a terminal (CliRunner's stdin), `run` cleans without asking."""
    seed(engine)
    result = invoke("--config", str(config_file), "--database-url", upgraded, "run")
    assert result.exit_code == 0, result.output
    assert "cleaned in total: 4" in result.stdout
    assert "[y/N]" not in result.output


def test_max_rows_stops_cleanly_with_exit_0(
    engine: Engine, upgraded: str, config_file: Path
) -> None:
    """`--max-rows 3` cleans 3 rows, reports `incomplete` and the rest as still due, exit 0."""
    seed(engine)
    before = snapshot(engine)
    result = invoke(
        "--config", str(config_file), "--database-url", upgraded,
        "run", "--max-rows", "3", "--chunk-size", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert ": incomplete" in result.stdout
    assert "still due:        1" in result.stdout
    assert len(assert_no_half_cleaned_row(snapshot(engine), before=before)) == 3


def test_refuse_above_rows_exits_4_unless_forced(
    engine: Engine, upgraded: str, tmp_path: Path
) -> None:
    """A plan above guard.refuse_above_rows exits 4 touching nothing; --force cleans, exit 0."""
    seed(engine)
    cfg = write_config(tmp_path / "guarded.toml", config_text(guard="refuse_above_rows = 3"))
    before = snapshot(engine)
    refused = invoke("--config", str(cfg), "--database-url", upgraded, "run", "--yes")
    assert refused.exit_code == 4, refused.output
    assert "refuse_above_rows" in refused.stdout
    assert before == snapshot(engine)
    forced = invoke("--config", str(cfg), "--database-url", upgraded, "run", "--yes", "--force")
    assert forced.exit_code == 0, forced.output
    assert len(assert_no_half_cleaned_row(snapshot(engine), before=before)) == 4


@pytest.mark.parametrize("mode", ["--dry-run", "--yes"])
def test_run_before_db_upgrade_exits_2_touching_nothing(
    engine: Engine, url_string: str, tmp_path: Path, mode: str
) -> None:
    """Without its audit schema, `run` exits 2 naming `db upgrade`; after it, the run works."""
    cfg = write_config(
        tmp_path / "fresh.toml", config_text() + '\n[audit]\nschema = "cli_fresh_audit"\n'
    )
    seed(engine)
    before = snapshot(engine)
    args = ["--config", str(cfg), "--database-url", url_string]
    result = invoke(*args, "run", mode)
    assert result.exit_code == 2, result.output
    assert "'cli_fresh_audit'" in result.stderr
    assert "dispatch-retention db upgrade" in result.stderr
    assert before == snapshot(engine)
    upgrade = invoke(*args, "db", "upgrade")
    assert upgrade.exit_code == 0, upgrade.output
    assert "audit schema 'cli_fresh_audit' migrated from nothing to" in upgrade.stdout
    assert invoke(*args, "run", mode).exit_code == 0


def test_run_while_another_holds_the_lock_exits_3(
    engine: Engine, upgraded: str, config_file: Path
) -> None:
    """While another session holds the target's advisory lock, `run` exits 3, writes nothing."""
    seed(engine)
    before = snapshot(engine)
    with engine.connect() as other:
        other.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock_key("public.dispatches")})
        other.commit()
        result = invoke("--config", str(config_file), "--database-url", upgraded, "run", "--yes")
    assert result.exit_code == 3, result.output
    assert before == snapshot(engine)
    assert "run_locked" in [e["event"] for e in json_lines(result.stderr)]


def test_missing_database_url_exits_2_with_a_clear_message(config_file: Path) -> None:
    """No --database-url, DATABASE_URL or DATABASE_URL_FILE: exit 2, says how to give one."""
    result = invoke("--config", str(config_file), "run", "--dry-run")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "Error: no database URL: pass --database-url, or set DATABASE_URL or DATABASE_URL_FILE"
    )
    assert result.stdout == ""


@pytest.mark.parametrize("variable", ["DATABASE_URL", "DATABASE_URL_FILE"])
def test_database_url_from_the_environment(
    engine: Engine,
    upgraded: str,
    config_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    """The URL is read from DATABASE_URL, or from the file DATABASE_URL_FILE names."""
    seed(engine)
    if variable == "DATABASE_URL_FILE":
        secret_file = tmp_path / "database-url"
        secret_file.write_text(upgraded + "\n", encoding="utf-8")  # trailing newline: ok
        monkeypatch.setenv(variable, str(secret_file))
    else:
        monkeypatch.setenv(variable, upgraded)
    result = invoke("--config", str(config_file), "run", "--dry-run")
    assert result.exit_code == 0, result.output
    assert plan_table(result.stdout) == EXPECTED_PLAN


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda d: d / "absent", "cannot read", id="missing-file"),
        pytest.param(lambda d: d, "cannot read", id="a-directory"),
        pytest.param(lambda d: write_config(d / "empty", ""), "is empty", id="empty-file"),
        pytest.param(lambda d: write_config(d / "blank", " \n\n"), "is empty", id="blank-file"),
    ],
)
def test_unusable_database_url_file_exits_2(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Any, message: str
) -> None:
    """A DATABASE_URL_FILE that cannot be read or holds nothing: exit 2, naming the file."""
    target = make(tmp_path)
    monkeypatch.setenv("DATABASE_URL_FILE", str(target))
    result = invoke("--config", str(config_file), "run", "--dry-run")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: DATABASE_URL_FILE: ")
    assert str(target) in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"mysql://root:{PASSWORD}@127.0.0.1/x", id="mysql"),
        pytest.param(f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1/x", id="psycopg2"),
        pytest.param(f"sqlite:///{PASSWORD}.db", id="sqlite"),
        pytest.param(PASSWORD, id="not-a-url"),
    ],
)
def test_non_postgresql_url_exits_2_without_the_password(config_file: Path, url: str) -> None:
    """A URL that is not postgresql:// is refused with exit 2, and its password is not shown."""
    result = invoke("--config", str(config_file), "--database-url", url, "run", "--dry-run")
    assert result.exit_code == 2, result.output
    assert "Error: the database URL" in result.stderr
    assert PASSWORD not in result.output


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["run", "--chunk-size", "0"], id="chunk-size-0"),
        pytest.param(["run", "--chunk-size", "1000001"], id="chunk-size-too-big"),
        pytest.param(["run", "--max-rows", "-1"], id="max-rows-negative"),
        pytest.param(["run", "--max-rows", "0"], id="max-rows-0"),
        pytest.param(["run", "--max-runtime", "0"], id="max-runtime-0"),
        pytest.param(["run", "--max-runtime", "soon"], id="max-runtime-not-a-number"),
        pytest.param(["run", "--shard", "2/2"], id="shard-out-of-range"),
        pytest.param(["run", "--shard", "half"], id="shard-not-i-of-n"),
        pytest.param(["run", "--bogus"], id="unknown-option"),
        pytest.param(["--log-format", "xml", "run"], id="unknown-log-format"),
        pytest.param(["bogus"], id="unknown-command"),
        pytest.param([], id="no-command"),
    ],
)
def test_bad_usage_exits_2(config_file: Path, args: list[str]) -> None:
    """Bad options and commands exit 2 before any connection (the URL is unreachable: 1)."""
    result = invoke("--config", str(config_file), "--database-url", UNREACHABLE, *args)
    assert result.exit_code == 2, result.output
    assert "Usage: dispatch-retention" in result.output
    assert PASSWORD not in result.output


@pytest.mark.parametrize(("text", "key"), INVALID_CONFIGS)
def test_invalid_config_exits_2_naming_file_and_key(
    tmp_path: Path, text: str | None, key: str
) -> None:
    """An invalid or missing config: exit 2 before connecting, naming the file and the key."""
    cfg = tmp_path / "broken.toml"
    if text is not None:
        write_config(cfg, text)
    result = invoke("--config", str(cfg), "--database-url", UNREACHABLE, "run", "--yes")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: invalid configuration: {cfg}: ")
    assert key in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args", [["run", "--dry-run"], ["run", "--yes"]], ids=["dry", "real"])
def test_unreachable_server_exits_1_without_the_password(
    config_file: Path, args: list[str]
) -> None:
    """A URL with a password and nothing listening: exit 1, `failed`, password never shown."""
    result = invoke("--config", str(config_file), "--database-url", UNREACHABLE, *args)
    assert result.exit_code == 1, result.output
    assert ": failed" in result.stdout
    assert "reason:           OperationalError" in result.stdout
    assert "connection refused" in result.stdout and "connection to server at" not in result.stdout
    events = json_lines(result.stderr)
    assert [e["event"] for e in events] == ["run_started", "run_failed"]
    assert PASSWORD not in result.output


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/x", id="bad-port"),
        pytest.param(f"postgresql://postgres:{PASSWORD}/x", id="host-forgotten"),
    ],
)
def test_malformed_postgresql_url_exits_2(config_file: Path, url: str) -> None:
    """A postgresql:// URL that does not parse is a usage error: exit 2, password not shown."""
    result = invoke("--config", str(config_file), "--database-url", url, "run", "--dry-run")
    assert PASSWORD not in result.output
    assert result.exit_code == 2, repr(result.exception)
