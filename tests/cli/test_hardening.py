"""Hardening: no secret leaks, no traceback on any input, no grant to everyone.

Each test feeds what an attacker or a careless operator would, and checks for a one-line
reason, a documented exit code, and nothing leaked or written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from dispatch_retention import render
from tests.helpers import (
    DAY,
    MARK,
    config_text,
    db_now,
    dispatch,
    guards_off,
    insert_rows,
    invoke,
    script,
    write_config,
)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "r.toml", config_text())


def one_line_usage_error(result: object, code: int = 2) -> str:
    """The result exited `code` with a message and no traceback; its text."""
    out = getattr(result, "output", "") or ""
    assert getattr(result, "exit_code", None) == code, out
    assert "Traceback" not in out
    exception = getattr(result, "exception", None)
    assert exception is None or isinstance(exception, SystemExit), repr(exception)
    return str(out)


# --- grants to everyone ----------------------------------------------------------------------


@pytest.mark.parametrize("role", ["public", "PUBLIC", "Public", "pg_monitor", "pg_read_all_data"])
def test_db_grants_refuses_public_and_pg_roles_printing_nothing(config: Path, role: str) -> None:
    """`db grants --role public` (any case) or a pg_* role exits 2 and prints no SQL to pipe
    into psql."""
    result = invoke("--config", str(config), "db", "grants", "--role", role)
    out = one_line_usage_error(result)
    assert "GRANT" not in result.stdout
    assert "public" in out.lower() or "pg_" in out


# --- numbers that are not numbers ------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e9"])
def test_verify_tolerance_must_be_a_finite_sane_number(config: Path, value: str) -> None:
    """`verify --tolerance-hours nan|inf|1e9`: a usage error (exit 2), before connecting."""
    result = invoke(
        "--config", str(config), "--database-url", "postgresql://x@127.0.0.1:1/x",
        "verify", "--tolerance-hours", value,
    )  # fmt: skip
    one_line_usage_error(result)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_run_max_runtime_must_be_finite(
    engine: Engine, url_string: str, config: Path, value: str
) -> None:
    """`run --max-runtime nan|inf`: exit 2, and no run record is created."""
    result = invoke(
        "--config", str(config), "--database-url", url_string, "run", "--yes",
        "--max-runtime", value,
    )  # fmt: skip
    one_line_usage_error(result)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM dispatch_retention.runs")).scalar() == 0


# --- config files ----------------------------------------------------------------------------


def test_a_utf8_bom_in_the_config_is_accepted(tmp_path: Path) -> None:
    """Editors on Windows write a byte-order mark: the file is read as the text it is."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + config_text().encode())
    result = invoke("--config", str(path), "db", "grants", "--role", "job_run")
    assert result.exit_code == 0, result.output
    assert "GRANT" in result.stdout


@pytest.mark.parametrize(
    ("source", "named"),
    [
        pytest.param("/dev/zero", "not a regular file", id="dev-zero"),
        pytest.param("big", "1 MiB", id="50-MB"),
    ],
)
def test_a_huge_config_is_refused_quickly(tmp_path: Path, source: str, named: str) -> None:
    """`--config /dev/zero` (refused as a device, before any read) or a 50 MB file (refused
    naming the 1 MiB limit): exit 2, no MemoryError, and no 50 MB config stored in every run
    record."""
    if source == "big":
        path = tmp_path / "big.toml"
        path.write_text(config_text() + "# " + "x" * 50_000_000 + "\n", encoding="utf-8")
        source = str(path)
    result = invoke("--config", source, "db", "grants", "--role", "job_run")
    out = one_line_usage_error(result)
    assert named in out


@pytest.mark.parametrize(
    ("section", "line"),
    [
        pytest.param("policy", 'where = { external_delivery_status = "a\\u0000b" }', id="where"),
        pytest.param("clean", 'replace = { content = { note = "a\\u0000b" } }', id="replace"),
    ],
)
def test_a_nul_character_in_a_value_is_refused_before_connecting(
    tmp_path: Path, section: str, line: str
) -> None:
    """A \\u0000 in a `where` or `replace` value is refused as configuration (exit 2) before
    any connection (the URL points nowhere), not at run time with exit 1."""
    text_ = (
        config_text().replace("[clean]\n", f"[clean]\n{line}\n")
        if section == "clean"
        else config_text(policies=f'[[policy]]\nname = "p"\nretention_days = 30\n{line}\n')
    )
    path = write_config(tmp_path / "nul.toml", text_)
    result = invoke(
        "--config", str(path), "--database-url", "postgresql://x@127.0.0.1:1/x", "run", "--yes"
    )
    out = one_line_usage_error(result)
    assert "NUL" in out


# --- secrets in URLs -------------------------------------------------------------------------


def test_a_password_with_an_unencoded_at_is_refused_without_echoing_it(config: Path) -> None:
    """`postgresql://u:hunter2@hunter2tail@host/db`: exit 2 before connecting, saying to
    percent-encode; neither part of the password nor the host appears."""
    proc = script(
        "--config", str(config), "--database-url",
        "postgresql://u:hunter2@hunter2tail@127.0.0.1:5432/db", "run", "--yes",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    both = proc.stdout + proc.stderr
    assert "hunter2" not in both and "Traceback" not in both
    assert "%40" in both


def test_a_database_url_file_that_is_not_utf8_is_a_usage_error(
    tmp_path: Path, config: Path
) -> None:
    """DATABASE_URL_FILE with bytes that are not UTF-8: exit 2 naming the variable."""
    secret = tmp_path / "url"
    secret.write_bytes(b"postgresql://u:\xff\xfe@127.0.0.1/db")
    result = invoke("--config", str(config), "run", "--yes", env={"DATABASE_URL_FILE": str(secret)})
    out = one_line_usage_error(result)
    assert "DATABASE_URL_FILE" in out and "UTF-8" in out


# --- what tables and CSV show ----------------------------------------------------------------


def test_table_output_escapes_control_characters() -> None:
    """A hold's reason with an OSC sequence, a bell and newlines that fake table rows is
    shown escaped, on one line."""
    evil = "case 1\x1b]0;pwned\x07\nhold_id  member_id\n9  9"
    shown = render.table(["reason"], [[evil]])
    assert "\x1b" not in shown and "\x07" not in shown
    assert len(shown.splitlines()) == 3  # header, rule, one row
    assert "\\x1b" in shown and "\\n" in shown


@pytest.mark.parametrize("cell", ["=HYPERLINK(1)", "+1+1", "-1+1", "@SUM(A1)", "\t=1", "\r=1"])
def test_csv_cells_never_become_formulas(cell: str) -> None:
    """A CSV cell that a spreadsheet would read as a formula is prefixed with a quote."""
    shown = render.to_csv(["host"], [{"host": cell}])
    value = shown.splitlines()[1].strip('"')
    assert value.startswith("'"), shown


def test_audit_list_csv_neutralises_a_formula_in_a_host_name(
    engine: Engine, url_string: str, config: Path
) -> None:
    """End to end: a run record whose host is '=cmd|...' lists as text in `audit list --format
    csv`."""
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY)])
    ran = invoke("--config", str(config), "--database-url", url_string, "run", "--yes")
    assert ran.exit_code == 0, ran.output
    with engine.begin() as conn:  # a forgery the guards refuse
        guards_off(conn)
        conn.execute(text("UPDATE dispatch_retention.runs SET host = '=cmd|calc!A1'"))
    listed = invoke(
        "--config", str(config), "--database-url", url_string, "audit", "list", "--format", "csv"
    )
    assert listed.exit_code == 0, listed.output
    assert ",'=cmd|calc!A1," in listed.stdout
    assert MARK not in listed.stdout


def test_a_reason_that_is_not_utf8_is_a_usage_error(
    url_string: str, config: Path, tmp_path: Path
) -> None:
    """`hold add --reason` with bytes that are not UTF-8 (a terminal in another encoding):
    exit 2, nothing stored, no traceback."""
    proc = script(
        "--config", str(config), "--database-url", url_string, "hold", "add", "5",
        "--reason", os.fsdecode(b"case \xff"),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "UTF-8" in proc.stderr


LEAKY_TRIGGER = """
CREATE FUNCTION app_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'refused' USING COLUMN = OLD.email, CONSTRAINT = OLD.msisdn,
    TABLE = OLD.app_token, SCHEMA = OLD.content::text, DATATYPE = OLD.email;
END $$;
CREATE TRIGGER app_refuse BEFORE UPDATE ON dispatches
  FOR EACH ROW EXECUTE FUNCTION app_refuse();
"""


def test_diagnostic_fields_set_by_a_trigger_never_carry_personal_data(
    engine: Engine, url_string: str, config: Path
) -> None:
    """A trigger that raises with COLUMN = OLD.email, CONSTRAINT = OLD.msisdn (and the
    other diagnostic fields) from the row: the run fails (exit 1) and neither its log, its
    output nor `runs.error` holds a personal value; the SQLSTATE is kept."""
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY, type="email")])
    with engine.begin() as conn:
        conn.execute(text(LEAKY_TRIGGER))
    proc = script("--config", str(config), "--database-url", url_string, "run", "--yes")
    assert proc.returncode == 1, proc.stderr
    with engine.connect() as conn:
        error = conn.execute(text("SELECT error FROM dispatch_retention.runs")).scalar_one()
    for shown in (proc.stdout, proc.stderr, error):
        assert MARK not in shown, shown
    assert "P0001" in error
