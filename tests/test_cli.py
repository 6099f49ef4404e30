"""The command line (CONTRACT section 5): click's CliRunner in-process, and the installed
console script in real subprocesses, against a real PostgreSQL (never a mock).

Subprocess tests run `dispatch-retention` from the virtualenv's bin directory (there is no
`__main__` module): its stderr is not a terminal, so the logs are JSON lines.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from dispatch_retention.cli import cli
from dispatch_retention.config import DEFAULT_CLEAN_COLUMNS, KEPT_COLUMNS
from dispatch_retention.lock import lock_key

from .helpers import (
    DAY,
    MARK,
    SCRIPT,
    config_text,
    db_now,
    dispatch,
    insert_rows,
    invoke,
    json_lines,
    script,
    snapshot,
    write_config,
)

PASSWORD = "s3cr3tPW"
UNREACHABLE = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"  # nothing listens on port 1
AUDIT = "dispatch_retention"  # the audit schema of config_text() (the default)
_roles = itertools.count()

Rows = dict[int, dict[str, Any]]


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test picks up a URL or config from the developer's or CI's environment."""
    for name in ("DATABASE_URL", "DATABASE_URL_FILE", "DISPATCH_RETENTION_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "retention.toml", config_text())


@pytest.fixture
def secret_url(server_url: URL, database_url: URL, upgraded: str) -> Iterator[str]:
    """The test database's URL for a least-privilege login role whose password is PASSWORD.

    A role of its own makes the password real on any server (trust, md5 or scram), so the
    CLI always sees a URL carrying a secret it must never print."""
    role = f"dr_cli_{os.getpid()}_{next(_roles)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    owner = create_engine(database_url)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
    with owner.begin() as conn:
        for grant in (
            f"GRANT USAGE ON SCHEMA public, {AUDIT} TO {role}",
            f"GRANT SELECT, UPDATE ON public.dispatches TO {role}",
            f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {AUDIT} TO {role}",
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {AUDIT} TO {role}",
        ):
            conn.execute(text(grant))
    yield database_url.set(
        drivername="postgresql", username=role, password=PASSWORD
    ).render_as_string(hide_password=False)
    with owner.begin() as conn:
        conn.execute(text(f"DROP OWNED BY {role}"))
    owner.dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP ROLE {role}"))
    admin.dispose()


@pytest.fixture
def upgraded(url_string: str, config_file: Path) -> str:
    """The test database after `db upgrade` (a run refuses to start without the audit schema)."""
    result = invoke("--config", str(config_file), "--database-url", url_string, "db", "upgrade")
    assert result.exit_code == 0, result.output
    return url_string


def seed(engine: Engine) -> set[int]:
    """Rows for every plan line; returns the ids that are due under the default policies."""
    now = db_now(engine)
    insert_rows(
        engine,
        [
            dispatch(1, now - 500 * DAY, type="sms"),  # sms (90 days): due
            dispatch(2, now - 100 * DAY, type="sms"),  # sms: due
            dispatch(3, now - 60 * DAY, type="sms"),  # sms: not yet
            dispatch(4, now - 40 * DAY, transmission_status="failed"),  # failed-sends: due
            dispatch(5, now - 400 * DAY, type="email"),  # default (365 days): due
            dispatch(6, now - 200 * DAY, type="email"),  # default: not yet
            dispatch(7, now - 5 * DAY, type="push"),  # young
            dispatch(8, now - 100 * DAY, type="sms", delivery_status="pending"),  # in grace
        ],
    )
    return {1, 2, 4, 5}


EXPECTED_PLAN = {"failed-sends": (30, 1), "sms": (90, 2), "default": (365, 1)}


def plan_table(stdout: str) -> dict[str, tuple[int, int]]:
    """{policy: (retention_days, due)} read back from the plan table `run --dry-run` prints."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["policy"]) + 2
    table: dict[str, tuple[int, int]] = {}
    for line in lines[start:]:
        if not line.strip():
            break
        name, retention, _cutoff, due = line.split()
        table[name] = (int(retention), int(due))
    return table


def assert_fully_cleaned_or_untouched(before: Rows, after: Rows) -> set[int]:
    """No half-cleaned row: each row is stripped and stamped as a whole, or unchanged."""
    assert before.keys() == after.keys()
    cleaned = set()
    for row_id, old in before.items():
        new = after[row_id]
        if new == old:
            continue
        cleaned.add(row_id)
        stripped = {c: new[c] for c in DEFAULT_CLEAN_COLUMNS}
        assert stripped == {"content": {}, "msisdn": None, "email": None, "app_token": None}
        assert new["cleaned_at"] is not None
        kept = {c for c in KEPT_COLUMNS if c not in ("cleaned_at", "updated_at")}
        assert {c: old[c] for c in kept} == {c: new[c] for c in kept}, f"row {row_id}"
    return cleaned


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
    assert due == assert_fully_cleaned_or_untouched(before, snapshot(engine))
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
    assert len(assert_fully_cleaned_or_untouched(before, snapshot(engine))) == 3


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
    assert len(assert_fully_cleaned_or_untouched(before, snapshot(engine))) == 4


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


INVALID_CONFIGS = [
    pytest.param(config_text(clean="chunk_sise = 5"), "clean.chunk_sise", id="unknown-key"),
    pytest.param(config_text(clean='chunk_size = "5"'), "clean.chunk_size", id="wrong-type"),
    pytest.param(
        config_text(policies='[[policy]]\nname = "x"\nretention_days = 3\n'),
        "policy[0].retention_days",
        id="under-the-floor",
    ),
    pytest.param(config_text(clean='columns = ["id"]'), "clean.columns", id="kept-column-listed"),
    pytest.param("[target]\ntable = 'x; drop table y'\n", "target.table", id="bad-table"),
    pytest.param("[[policy]\n", "not valid TOML", id="not-toml"),
    pytest.param(None, "cannot read the file", id="missing-file"),
]


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
    assert "connection to server at" in result.stdout
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


# --- 2. every command documents itself -------------------------------------------------------


def _walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _walk(sub, (*path, name))


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


COMMAND_PATHS = list(_walk(cli))


#: CONTRACT section 5: every command and the options it must take.
CONTRACT_SURFACE: dict[tuple[str, ...], tuple[str, ...]] = {
    (): ("--config", "--database-url", "--log-format"),
    ("run",): (
        "--dry-run",
        "--yes",
        "--force",
        "--reclean",
        "--chunk-size",
        "--max-rows",
        "--max-runtime",
        "--shard",
    ),
    ("verify",): ("--format", "--strict"),
    ("audit", "list"): ("--since", "--limit", "--format"),
    ("audit", "show"): ("--format",),
    ("hold", "add"): ("--reason",),
    ("hold", "release"): (),
    ("hold", "list"): ("--format",),
    ("db", "upgrade"): (),
    ("db", "check"): ("--strict",),
    ("demo",): ("--rows",),
}
SURFACE = [
    pytest.param(path, option, id=" ".join([*path, option or ""]).strip() or "(root)")
    for path, options in CONTRACT_SURFACE.items()
    for option in options or (None,)
]


@pytest.mark.parametrize(("path", "option"), SURFACE)
def test_the_walk_finds_every_contract_command_and_option(
    path: tuple[str, ...], option: str | None
) -> None:
    """Each command of CONTRACT section 5 is reached by the walk and takes its options."""
    assert path in COMMAND_PATHS, f"no command {' '.join(path)!r}"
    if option is not None:
        assert option in [o for p in _command(path).params for o in p.opts]


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "(root)")
def test_every_command_has_help_and_help_exits_0(path: tuple[str, ...]) -> None:
    """Each command and group has help text, and its --help prints it and exits 0."""
    command = _command(path)
    assert (command.help or "").strip(), f"{' '.join(path) or 'cli'} has no help text"
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(" ".join(["Usage: dispatch-retention", *path]))
    first_paragraph = " ".join(command.help.strip().split("\n\n")[0].split())
    assert first_paragraph in " ".join(result.stdout.split())


# --- 3. the console script in a real subprocess ----------------------------------------------


def test_subprocess_dry_run_prints_plan_and_logs_json(
    engine: Engine, secret_url: str, config_file: Path
) -> None:
    """A real dry run: exit 0, plan on stdout, JSON events with one run_id on stderr."""
    seed(engine)
    before = snapshot(engine)
    proc = script("--config", str(config_file), "--database-url", secret_url, "run", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert plan_table(proc.stdout) == EXPECTED_PLAN
    events = json_lines(proc.stderr)
    assert [e["event"] for e in events] == ["run_started", "plan", "run_finished"]
    assert len({e["run_id"] for e in events}) == 1
    assert (True, str(config_file)) == (events[0]["dry_run"], events[0]["config"])
    assert (events[1]["due_rows"], events[2]["status"]) == (4, "planned")
    assert before == snapshot(engine)
    for stream in (proc.stdout, proc.stderr):
        assert MARK not in stream
        assert PASSWORD not in stream


def test_subprocess_run_cleans_and_logs_every_chunk(
    engine: Engine, secret_url: str, config_file: Path
) -> None:
    """A real run: exit 0, result on stdout, run_started/plan/chunk_committed/run_finished."""
    due = seed(engine)
    before = snapshot(engine)
    proc = script(
        "--config", str(config_file), "--database-url", secret_url, "run", "--chunk-size", "2"
    )
    assert proc.returncode == 0, proc.stderr
    assert ": succeeded" in proc.stdout
    events = json_lines(proc.stderr)
    names = [e["event"] for e in events]
    assert names[:2] == ["run_started", "plan"]
    assert names[-2:] == ["recount", "run_finished"]  # the end count decides the status
    assert {"chunk_committed"} == set(names[2:-2])
    assert len({e["run_id"] for e in events}) == 1
    assert f"Run {events[0]['run_id']}: succeeded" in proc.stdout
    chunks = [e for e in events if e["event"] == "chunk_committed"]
    assert 4 == sum(c["rows"] for c in chunks) == events[-1]["rows_cleaned"]
    assert (events[-1]["remaining_due_rows"], events[-1]["status"]) == (0, "succeeded")
    assert due == assert_fully_cleaned_or_untouched(before, snapshot(engine))
    for stream in (proc.stdout, proc.stderr):
        assert MARK not in stream
        assert PASSWORD not in stream


@pytest.mark.parametrize(
    ("text", "key"), [p for p in INVALID_CONFIGS if p.id in ("unknown-key", "not-toml")]
)
def test_subprocess_invalid_config_exits_2_naming_file_and_key(
    tmp_path: Path, text: str, key: str
) -> None:
    """An invalid config: exit 2 before connecting; stderr names file and key, no traceback."""
    cfg = write_config(tmp_path / "broken.toml", text)
    proc = script("--config", str(cfg), "--database-url", UNREACHABLE, "run", "--yes")
    assert proc.returncode == 2, proc.stderr
    assert f"Error: invalid configuration: {cfg}: " in proc.stderr
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout
    assert proc.stdout == ""


def test_subprocess_malformed_url_shows_no_traceback_and_no_password(config_file: Path) -> None:
    """`postgresql://user:PASSWORD/db` (host forgotten) exits 2 without echoing the password."""
    url = f"postgresql://postgres:{PASSWORD}/x"
    proc = script("--config", str(config_file), "--database-url", url, "run", "--dry-run")
    assert PASSWORD not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2


# --- 4. signals ------------------------------------------------------------------------------

BACKLOG = 10_000


@pytest.mark.parametrize(
    ("signum", "code"),
    [
        pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
        pytest.param(signal.SIGINT, 130, id="SIGINT"),
    ],
)
def test_signal_stops_after_the_chunk_in_progress(
    engine: Engine,
    upgraded: str,
    tmp_path: Path,
    signum: signal.Signals,
    code: int,
) -> None:
    """A signal mid-run: exit 128+n, `run_interrupted`, no half-cleaned row; a rerun finishes."""
    now = db_now(engine)
    types = ("sms", "email", "push")
    insert_rows(
        engine,
        (dispatch(i, now - 500 * DAY, type=types[i % 3]) for i in range(1, BACKLOG + 1)),
    )
    before = snapshot(engine)
    # a short pause between chunks leaves the signal plenty of chunks to interrupt
    slow = write_config(tmp_path / "slow.toml", config_text(clean="pause_between_chunks_ms = 5"))
    args = ["--config", str(slow), "--database-url", upgraded]
    proc = subprocess.Popen(
        [str(SCRIPT), *args, "run", "--chunk-size", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:  # ends at EOF if the run never commits a chunk
            seen.append(line)
            if json.loads(line)["event"] == "chunk_committed":
                proc.send_signal(signum)
                break
        stdout, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    events = json_lines("".join(seen) + rest)
    assert code == proc.returncode, "".join(seen) + rest
    last = events[-1]
    assert ("run_interrupted", int(signum), "interrupted") == (
        last["event"],
        last["signal"],
        last["status"],
    )
    assert len({e["run_id"] for e in events}) == 1
    assert f"Run {last['run_id']}: interrupted" in stdout
    cleaned = assert_fully_cleaned_or_untouched(before, snapshot(engine))
    chunk_rows = sum(e["rows"] for e in events if e["event"] == "chunk_committed")
    assert len(cleaned) == chunk_rows == last["rows_cleaned"]
    assert 0 < len(cleaned) < BACKLOG, "the signal arrived after the run had finished"
    # a stopped run does not linger to count: what is left is not claimed (never planned
    # minus cleaned)
    assert last["remaining_due_rows"] is None
    assert MARK not in stdout + rest
    shown = invoke(*args, "audit", "show", last["run_id"], "--format", "json")
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert ("interrupted", len(cleaned)) == (record["status"], record["rows_cleaned"])

    finish = script(*args, "run", "--chunk-size", "5000")
    assert finish.returncode == 0, finish.stderr
    done = json_lines(finish.stderr)[-1]
    assert (done["event"], done["remaining_due_rows"]) == ("run_finished", 0)
    assert len(assert_fully_cleaned_or_untouched(before, snapshot(engine))) == BACKLOG


def test_the_demo_runs_end_to_end_with_a_clean_screen() -> None:
    """`demo` (what `make demo` runs) seeds, runs, verifies and exits 0, and prints no warning
    or traceback for a newcomer to wonder about (pgserver's RuntimeDirWarning included)."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    proc = subprocess.run(
        [str(SCRIPT), "demo", "--rows", "1000"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "== dispatch-retention verify ==" in proc.stdout
    for stream in (proc.stdout, proc.stderr):
        assert "Warning" not in stream and "Traceback" not in stream, stream
