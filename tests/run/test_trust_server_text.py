"""No text the server supplies reaches an output, a log line, a run record or the trail
(docs/auditor.md, "What the audit trail never contains").

A trigger may raise any SQLSTATE with a row's values in every diagnostic field: the message,
DETAIL, HINT, COLUMN, CONSTRAINT, TABLE, SCHEMA, DATATYPE. Whatever the class (a lost
connection's 08, authentication's 28, a missing database's 3D, the server going away's 57P0x,
a serialization failure's 40), none of it may show: the job says the SQLSTATE, the condition
and names it knows. And an error the server raised is no lost connection: it is not retried
as one (a trigger's RAISE of 08006 fails the run at once). Client-side errors (libpq's own,
no server) show in fixed words the job knows, never libpq's text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from dispatch_retention.pg import diagnosis, engines
from tests.helpers import (
    AUDIT_SCHEMA,
    MARK,
    as_json_lines,
    cleaned_count,
    config_text,
    invoke,
    run_script,
    script,
    seed_series,
    write_config,
)

#: SQLSTATEs a trigger raises: every class the job once trusted or retried, and others.
SQLSTATES = [
    pytest.param("08006", id="08006-connection-failure"),
    pytest.param("08001", id="08001-unable-to-connect"),
    pytest.param("08003", id="08003-connection-does-not-exist"),
    pytest.param("08P01", id="08P01-protocol-violation"),
    pytest.param("28000", id="28000-invalid-authorization"),
    pytest.param("28P01", id="28P01-invalid-password"),
    pytest.param("3D000", id="3D000-invalid-catalog-name"),
    pytest.param("57P01", id="57P01-admin-shutdown"),
    pytest.param("57P02", id="57P02-crash-shutdown"),
    pytest.param("57P03", id="57P03-cannot-connect-now"),
    pytest.param("40001", id="40001-serialization-failure"),
    pytest.param("40P01", id="40P01-deadlock"),
    pytest.param("55P03", id="55P03-lock-not-available"),
    pytest.param("57014", id="57014-query-canceled"),
    pytest.param("53300", id="53300-too-many-connections"),
    pytest.param("42501", id="42501-insufficient-privilege"),
    pytest.param("XX000", id="XX000-internal-error"),
    pytest.param("P0001", id="P0001-raise-exception"),
]

#: Trigger bodies: the row's e-mail (the marker) in the message alone, in every field, and in
#: words libpq itself uses (a client message the job might have trusted).
BODIES = {
    "message": "RAISE EXCEPTION '%', OLD.email USING ERRCODE = '{state}';",
    "every-field": (
        "RAISE EXCEPTION USING MESSAGE = 'row ' || OLD.email, ERRCODE = '{state}', "
        "DETAIL = OLD.msisdn, HINT = OLD.app_token, COLUMN = OLD.email, "
        "CONSTRAINT = OLD.email, TABLE = OLD.email, SCHEMA = OLD.email, DATATYPE = OLD.email;"
    ),
    "libpq-words": (
        "RAISE EXCEPTION 'server closed the connection unexpectedly: connection to server "
        'at "%", port 5432 failed: FATAL:  password authentication failed for user "%"\','
        " OLD.email, OLD.email USING ERRCODE = '{state}';"
    ),
}


def raising_trigger(engine: Engine, state: str, body: str, *, at_commit: bool = False) -> None:
    """A trigger on dispatches that raises `state` with the row's personal values, as the
    chunk's UPDATE runs (a BEFORE row trigger) or at its COMMIT (a deferred constraint
    trigger). Made by the table's owner; the run role fires it."""
    when = (
        "CREATE CONSTRAINT TRIGGER leaky AFTER UPDATE ON dispatches DEFERRABLE INITIALLY DEFERRED"
        if at_commit
        else "CREATE TRIGGER leaky BEFORE UPDATE ON dispatches"
    )
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION leak() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                + BODIES[body].format(state=state)
                + " RETURN NEW; END $$"
            )
        )
        conn.execute(text(f"{when} FOR EACH ROW EXECUTE FUNCTION leak()"))


def trail_text(engine: Engine) -> str:
    """Every run, chunk and event of the audit trail as text (runs.error, remaining_reason,
    every event's body among it)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                f"SELECT r::text FROM {AUDIT_SCHEMA}.runs r UNION ALL "
                f"SELECT c::text FROM {AUDIT_SCHEMA}.chunks c UNION ALL "
                f"SELECT e.body FROM {AUDIT_SCHEMA}.events e"
            )
        ).scalars()
        return "\n".join(rows)


def run_errors(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                text(f"SELECT status, error, remaining_reason FROM {AUDIT_SCHEMA}.runs")
            )
        ]


def assert_said_nothing_of_the_row(engine: Engine, *outputs: str) -> None:
    """The marker (every personal value seeded carries it) in no output and nowhere in the
    trail; the run failed, its record says so with a SQLSTATE, and nothing was cleaned."""
    for output in outputs:
        assert MARK not in output, output
    assert MARK not in trail_text(engine)
    [(status, error, remaining)] = run_errors(engine)
    assert status == "failed" and "SQLSTATE" in error, error
    assert remaining is None or MARK not in remaining
    assert cleaned_count(engine) == 0


def retries(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if str(e.get("event", "")).endswith("_retry")]


@pytest.fixture
def leaky_config(tmp_path: Path) -> Path:
    """Retries on and quick: a retried raise would show as `*_retry` events."""
    return write_config(
        tmp_path / "r.toml", config_text("max_retries = 3\nretry_max_wait_s = 0.05")
    )


@pytest.mark.parametrize("state", SQLSTATES)
def test_a_trigger_raising_any_sqlstate_leaks_nothing_and_is_not_retried(
    engine: Engine, run_role: tuple[str, str], leaky_config: Path, state: str
) -> None:
    """The console script as the run role, a trigger raising `state` with the row's values
    in every field: exit 1 at once (no retry), the SQLSTATE in the record, the row's values
    in no output, log line, run record or event."""
    seed_series(engine, range(1, 21))
    raising_trigger(engine, state, "every-field")
    job = run_script(run_role[1], leaky_config, "run", "--yes")
    assert job.returncode == 1, job.stderr
    assert retries(job.events()) == []
    assert f"SQLSTATE {state}" in job.last("run_failed")["error"]
    assert_said_nothing_of_the_row(engine, job.stdout, job.stderr)


@pytest.mark.parametrize("body", sorted(BODIES))
@pytest.mark.parametrize("at_commit", [False, True], ids=["in-update", "at-commit"])
@pytest.mark.parametrize(
    "state",
    [
        pytest.param("08006", id="08006"),
        pytest.param("28P01", id="28P01"),
        pytest.param("3D000", id="3D000"),
        pytest.param("40001", id="40001"),
    ],
)
def test_in_process_every_body_and_moment_leaks_nothing(
    engine: Engine,
    run_role: tuple[str, str],
    leaky_config: Path,
    state: str,
    body: str,
    at_commit: bool,
) -> None:
    """The CLI in-process as the run role (its stdout, stderr and JSON log), the raise in the
    chunk's UPDATE or at its COMMIT (a deferred trigger): no retry, nothing of the row."""
    seed_series(engine, range(1, 11))
    raising_trigger(engine, state, body, at_commit=at_commit)
    result = invoke(
        "--database-url", run_role[1], "--config", str(leaky_config),
        "--log-format", "json", "run", "--yes",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert retries(as_json_lines(result.stderr)) == []
    assert_said_nothing_of_the_row(engine, result.stdout, result.stderr)


# --- describe_error and is_transient on the server's errors --------------------------------


def raised(engine: Engine, state: str, field: str = "MESSAGE") -> DBAPIError:
    """The error of a RAISE of `state` with the marker in `field` (MESSAGE always holds it)."""
    extra = f", {field} = 'x{MARK}@example.invalid'" if field != "MESSAGE" else ""
    with pytest.raises(DBAPIError) as caught, engine.connect() as conn:
        conn.execute(
            text(
                f"DO $$ BEGIN RAISE EXCEPTION USING MESSAGE = '{MARK}@example.invalid', "
                f"ERRCODE = '{state}'{extra}; END $$"
            )
        )
    return caught.value


@pytest.mark.parametrize("state", SQLSTATES)
@pytest.mark.parametrize("field", ["MESSAGE", "DETAIL", "HINT", "COLUMN", "TABLE", "SCHEMA"])
def test_describe_error_holds_no_server_text(engine: Engine, state: str, field: str) -> None:
    """Whatever the SQLSTATE and the field: the condition and SQLSTATE, never the text; a
    raise is not transient and no lock or statement timeout."""
    error = raised(engine, state, field)
    described = diagnosis.describe_error(error)
    assert MARK not in described
    assert f"SQLSTATE {state}" in described
    assert not diagnosis.is_transient(error)
    assert not diagnosis.is_lock_timeout(error) and not diagnosis.is_statement_timeout(error)


def test_the_servers_own_lock_timeout_is_still_one(engine: Engine) -> None:
    """A lock timeout the server raises (not a trigger) is still a lock timeout (retried)."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE locked (x int)"))
    holder = engine.connect()
    holder.begin()
    holder.execute(text("LOCK locked"))
    try:
        with pytest.raises(DBAPIError) as caught, engine.connect() as conn:
            conn.execute(text("SET lock_timeout = '20ms'"))
            conn.execute(text("SELECT * FROM locked"))
    finally:
        holder.rollback()
        holder.close()
    assert diagnosis.is_lock_timeout(caught.value)
    assert diagnosis.describe_error(caught.value) == "LockNotAvailable, SQLSTATE 55P03"


def test_the_servers_own_deadlock_is_still_retried(engine: Engine) -> None:
    """A deadlock the server detects (not a trigger's RAISE of 40P01) is retried, and said by
    its condition and SQLSTATE alone (its DETAIL names the processes and the rows' tuples)."""
    import threading

    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE crossed (id int PRIMARY KEY)"))
        conn.execute(text("INSERT INTO crossed VALUES (1), (2)"))
    errors: list[DBAPIError] = []
    both_hold = threading.Barrier(2)

    def cross(first: int, second: int) -> None:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
            conn.execute(text("SELECT 1 FROM crossed WHERE id = :i FOR UPDATE"), {"i": first})
            both_hold.wait(10)
            try:
                conn.execute(text("SELECT 1 FROM crossed WHERE id = :i FOR UPDATE"), {"i": second})
            except DBAPIError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=cross, args=pair) for pair in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    [deadlock] = errors
    assert diagnosis.is_transient(deadlock) and not diagnosis.is_connection_lost(deadlock)
    assert diagnosis.describe_error(deadlock) == "DeadlockDetected, SQLSTATE 40P01"


def test_a_terminated_session_is_a_lost_connection(engine: Engine) -> None:
    """The server ending the session (57P01, FATAL) is a lost connection: retried."""
    with pytest.raises(DBAPIError) as caught, engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    assert diagnosis.is_transient(caught.value)
    assert diagnosis.describe_error(caught.value) == "AdminShutdown, SQLSTATE 57P01"


# --- libpq's own messages: fixed words ------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "said"),
    [
        pytest.param(
            "postgresql://dr_nobody@127.0.0.1:1/postgres",
            "connection refused",
            id="refused",
        ),
        pytest.param(
            f"postgresql://dr_nobody@{MARK.lower()}.invalid:5432/postgres",
            "could not resolve the host name",
            id="unknown-host",
        ),
        pytest.param(
            "postgresql://postgres@/postgres?host=/nonexistent-dir",
            "no server listens on that socket",
            id="no-socket",
        ),
        pytest.param(
            "postgresql://postgres@127.0.0.1:5432/postgres?sslmode=require",
            "the server does not support SSL",
            id="ssl-required",
        ),
        pytest.param(
            "postgresql://postgres@127.0.0.1:5432/dr_no_such_db",
            "database dr_no_such_db does not exist",
            id="no-database",
        ),
        pytest.param(
            "postgresql://dr_no_such_role@127.0.0.1:5432/postgres",
            "role dr_no_such_role does not exist",
            id="no-role",
        ),
    ],
)
def test_a_client_side_error_is_said_in_the_jobs_words(url: str, said: str) -> None:
    """libpq's text (host, socket path, what the server answered at connect) is never
    repeated: a phrase the job knows, naming only what the URL gave it."""
    engine = engines.make_engine(engines.parse_url(url), connect_timeout_s=2)
    try:
        with pytest.raises(DBAPIError) as caught, engine.connect():
            pass
    finally:
        engine.dispose()
    described = diagnosis.describe_error(caught.value)
    assert said in described, described
    assert "failed:" not in described and "Is the server running" not in described
    assert MARK.lower() not in described.lower()


def test_a_client_message_is_never_repeated_whatever_it_says() -> None:
    """A psycopg error without a SQLSTATE (the client's) whose text the job does not know
    is said as a client-side error, without its text."""
    error = psycopg.OperationalError(f'something new: "{MARK}" \x1b]0;x\x07')
    described = diagnosis.describe_error(error)
    assert MARK not in described and "\x1b" not in described
    assert described.startswith("OperationalError")


def test_the_script_says_a_refused_connection_in_the_jobs_words(tmp_path: Path) -> None:
    """`db check` against a port nothing listens on: exit 1, one line, libpq's text absent."""
    config = write_config(tmp_path / "r.toml", config_text())
    proc = script(
        "--config", str(config), "--database-url", "postgresql://x@127.0.0.1:1/x", "db", "check"
    )
    assert proc.returncode == 1, proc.stderr
    assert "connection refused" in proc.stderr
    assert "Is the server running" not in proc.stderr + proc.stdout


def test_a_known_name_is_escaped_and_bounded(database_url: URL) -> None:
    """A database name the URL gives (known to the job) is shown escaped and bounded."""
    evil = "dr_\x1b]0;x\x07" + "n" * 50
    engine = engines.make_engine(database_url.set(database=evil), connect_timeout_s=2)
    try:
        with pytest.raises(DBAPIError) as caught, engine.connect():
            pass
    finally:
        engine.dispose()
    described = diagnosis.describe_error(caught.value)
    assert "\x1b" not in described and "\x07" not in described
    assert "does not exist" in described and "…" in described
    assert max(len(word) for word in described.split()) <= 63


# --- what else carries an exception's text: tracebacks, the libraries' warnings -------------


def test_a_logged_traceback_holds_no_exception_text(
    engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    """An internal error logged with its traceback (`exc_info`), chained to a server error
    with the marker in every field: the frames and classes, the server error as
    `describe_error` says it, no message, in JSON and on the console."""
    import structlog

    from dispatch_retention.cli import logs

    formats: tuple[logs.Format, ...] = ("json", "console")
    for fmt in formats:
        logs.configure(fmt)
        try:
            raise KeyError(f"{MARK}@example.invalid") from raised(engine, "08006", "DETAIL")
        except KeyError as exc:
            structlog.get_logger("dispatch_retention").error("internal_error", exc_info=exc)
        logged = capsys.readouterr().err
        assert "internal_error" in logged and "KeyError" in logged, logged
        assert "ConnectionFailure, SQLSTATE 08006" in logged
        assert MARK not in logged


def test_an_exception_no_command_maps_ends_the_script_without_its_text() -> None:
    """A bug's exception escaping every command (here the CLI itself raising a KeyError that
    quotes a row) ends the console script with exit 1 and a traceback of frames and classes,
    never the exception's message."""
    import subprocess
    import sys

    boom = (
        "import dispatch_retention.cli.main as cli\n"
        "def boom():\n"
        f"    raise KeyError('{MARK}@example.invalid')\n"
        "cli.main = boom\n"
        "from dispatch_retention import entry\n"
        "entry.main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", boom], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "builtins.KeyError" in done.stderr and "Traceback" in done.stderr
    assert MARK not in done.stdout + done.stderr


def test_a_librarys_warning_is_logged_without_its_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """psycopg's "error ignored in rollback on %s: %s" (the server's text in the arguments):
    a `library_warning` event with the format string, never the arguments."""
    import logging

    from dispatch_retention.cli import logs

    logs.configure("json")
    logging.getLogger("psycopg").warning("error ignored in rollback on %s: %s", "conn", MARK)
    [event] = as_json_lines(capsys.readouterr().err)
    assert event["event"] == "library_warning" and event["logger"] == "psycopg"
    assert event["message"] == "error ignored in rollback on %s: %s"
    assert MARK not in str(event)


# --- names from pg_stat_activity: escaped and bounded ---------------------------------------


def test_the_lock_holders_names_are_escaped_and_bounded(
    engine: Engine, database_url: URL, tmp_path: Path
) -> None:
    """A run locked out by a session whose role name (a quoted identifier) holds a newline,
    a forged OK line and an OSC sequence: `run_locked` names it escaped, on one line."""
    from dispatch_retention.printable import shown_name
    from dispatch_retention.run import lock

    evil = "dr_holder\nOK: all clear\x1b]0;pwned\x07"
    quoted = '"' + evil + '"'
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {quoted} LOGIN"))
    holder = psycopg.connect(
        # the suite's own server (pgserver) is a socket directory in the URL's query
        host=database_url.host or database_url.query.get("host") or "127.0.0.1",
        port=database_url.port or 5432,
        dbname=database_url.database,
        user=evil,
        application_name="x" * 200,
        autocommit=True,
    )
    try:
        holder.execute("SELECT pg_advisory_lock(%s)", [lock.lock_key("public.dispatches")])
        config = write_config(tmp_path / "r.toml", config_text())
        url = database_url.set(drivername="postgresql").render_as_string(hide_password=False)
        job = run_script(url, config, "run", "--yes")
        assert job.returncode == 3, job.stderr
        [who] = job.last("run_locked")["holder"]
        assert who["usename"] == shown_name(evil) and "\n" not in who["usename"]
        assert len(who["application_name"]) <= 63
    finally:
        holder.close()
        with engine.begin() as conn:
            conn.execute(text(f"DROP ROLE {quoted}"))
