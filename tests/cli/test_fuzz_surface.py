"""A fuzz test over the whole command-line surface.

Hypothesis draws a command (walked from the click tree, so a new command or option is
fuzzed without editing this file), its options and arguments (valid values, odd values,
other scripts' digits, control characters, formulas, huge and non-finite numbers), a
config file (valid, mutated, in odd encodings, huge, missing, a directory) and an
environment (database URLs with special characters and a password, unreadable URL files,
Indexed Job variables; hosts only on loopback or under `.invalid`), then runs the CLI
in-process and, for fewer examples, as the installed console script.

Properties: never a traceback; an exit code docs/operations.md documents; neither the password
nor a personal-data marker in any output; a command that exits 2 (a usage error) has
written nothing: the dispatches and the audit trail are as they were.

`demo` is left out: with valid options it starts an embedded server (seconds per example);
its options are the same click types fuzzed here.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention.cli.main import cli
from tests.helpers import DAY, MARK, SCRIPT, config_text, db_now, dispatch, insert_rows, script_env
from tests.strategies import mutated_configs

#: docs/operations.md, "Exit codes and run statuses".
DOCUMENTED_EXITS = {0, 1, 2, 3, 4, 5, 6, 130, 143}
PASSWORD = "Pw0rd-SECRET-4711"
LEFT_OUT = {("demo",)}

ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "0",
        "-1",
        "1",
        "7",
        "+3",
        "1e9",
        "nan",
        "inf",
        "-inf",
        "9" * 30,
        "0x10",
        "\u0665",
        "\uff17",
        "1/0",
        "3/2",
        "0/1",
        "1024/1025",
        "=cmd|' /C calc'!A0",
        "@SUM(1)",
        "a\x1b]0;title\x07b",
        "line\nbreak",
        "tab\tcell",
        "NULL",
        "public",
        "PUBLIC",
        "pg_monitor",
        "x; DROP TABLE dispatches",
        "'; --",
        "../../etc/passwd",
        "/dev/null",
        "/dev/zero",
        "json",
        "table",
        "csv",
        "run",
        "read-only",
        "holds",
        "00000000-0000-0000-0000-000000000000",
        "not-a-uuid",
        "http://127.0.0.1:1",
        "http://[::1",
        "http://gw.invalid:9091",
        "\u00e9t\u00e9",
    ]
) | st.text(max_size=12)


@dataclass
class Surface:
    """Every command path and its parameters, read from the click tree."""

    commands: dict[tuple[str, ...], click.Command] = field(default_factory=dict)

    @classmethod
    def of(cls, group: click.Group) -> Surface:
        surface = cls()

        def walk(command: click.Command, path: tuple[str, ...]) -> None:
            if isinstance(command, click.Group):
                for name, sub in command.commands.items():
                    walk(sub, (*path, name))
            elif path not in LEFT_OUT:
                surface.commands[path] = command

        walk(group, ())
        return surface


SURFACE = Surface.of(cli)


def good_value(param: click.Parameter) -> st.SearchStrategy[str]:
    kind = param.type
    if isinstance(kind, click.Choice):
        return st.sampled_from([str(c) for c in kind.choices])
    if isinstance(kind, click.IntRange | click.types.IntParamType):
        return st.integers(0, 3000).map(str)
    if isinstance(kind, click.types.FloatParamType) or kind.name == "number":
        return st.sampled_from(["0.5", "1", "24", "3600"])
    if kind.name == "I/N":
        return st.sampled_from(["0/1", "0/2", "1/2"])
    if isinstance(kind, click.DateTime):
        return st.sampled_from(["2026-01-01", "2026-11-30T00:00:00", "1970-01-01"])
    if kind.name == "RUN_ID":
        return st.uuids().map(str)
    if kind.name == "HASH":
        return st.sampled_from(["0" * 64, "AB" * 32])
    if isinstance(kind, click.Path):  # a file a command may write (audit verify --head-file)
        return st.just(str(Path(tempfile.gettempdir()) / "dr-fuzz-chain-head"))
    return st.sampled_from(["case 17", "ops", "dispatch_retention_run", "42"])


def value_for(param: click.Parameter) -> st.SearchStrategy[str]:
    """Mostly a valid value (so that most cases reach the database), else an odd one."""
    return st.integers(0, 9).flatmap(lambda n: good_value(param) if n < 8 else ODD_TEXT)


def mostly(common: Any, rare: st.SearchStrategy[Any], tenths: int = 8) -> st.SearchStrategy[Any]:
    return st.integers(0, 9).flatmap(lambda n: st.just(common) if n < tenths else rare)


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    path = draw(st.sampled_from(sorted(SURFACE.commands)))
    command = SURFACE.commands[path]
    argv = list(path)
    for param in command.params:
        if isinstance(param, click.Argument):
            if draw(st.integers(0, 9)) or param.required:
                argv.append(draw(value_for(param)))
            continue
        assert isinstance(param, click.Option)
        if param.name == "help" or not (param.required or draw(st.booleans())):
            continue
        opt = param.opts[0]
        if param.is_flag:
            argv.append(opt)
        else:
            argv += [opt, draw(value_for(param))]
    if draw(st.integers(0, 29)) == 17:  # not 0: Hypothesis favours the bounds
        argv.append(draw(st.sampled_from(["--no-such-option", "extra", "--help"])))
    return argv


@st.composite
def config_files(draw: st.DrawFn) -> bytes | str:
    """The config's bytes, or a marker for a path that is not a readable file."""
    kind = draw(st.sampled_from(["valid"] * 12 + ["mutated"] * 4 + ["encoded", "huge", "path"]))
    if kind == "valid":
        return config_text().encode()
    if kind == "mutated":
        return draw(mutated_configs())
    if kind == "encoded":
        codec = draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig", "cp1252"]))
        return (config_text() + '\n# r\u00e9sum\u00e9 \u2013 "\u00fc"\n').encode(codec, "replace")
    if kind == "huge":
        return config_text().encode() + b"#" * (1024 * 1024 + 10)
    return draw(st.sampled_from(["missing", "directory", "/dev/zero", "/dev/null"]))


def url_variants(base: URL) -> st.SearchStrategy[str]:
    good = base.set(drivername="postgresql", password=PASSWORD).render_as_string(
        hide_password=False
    )
    host = f"{base.host}:{base.port}"
    return mostly(
        good,
        st.sampled_from(
            [
                f"postgresql://u:{PASSWORD}@tail@{host}/x",  # an unencoded @ in the password
                f"postgresql://u:{PASSWORD}@engines.invalid:5432/x",
                f"postgresql://u:{PASSWORD}@127.0.0.1:1/x",
                f"mysql://u:{PASSWORD}@{host}/x",
                f"postgresql://u:{PASSWORD}@[::1/x",
                f"postgresql://u:{PASSWORD}%@{host}/x",
                f"postgresql://{PASSWORD}@{host}/{base.database}?sslmode=bogus",
                "",
                "   ",
                "not a url",
            ]
        ),
    )


@dataclass(frozen=True)
class Case:
    argv: list[str]
    config: bytes | str
    url: str
    via: str  # "option", "env", "file", "file-unreadable", "none"
    shard_env: tuple[str, str] | None


SHARD_ENVS = [("0", "2"), ("7", "4"), ("x", "2"), ("\u0661", "4")]


def cases(base: URL) -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        argv=argvs(),
        config=config_files(),
        url=url_variants(base),
        via=st.sampled_from(["option", "option", "env", "file", "file-unreadable", "none"]),
        shard_env=st.none()
        | st.sampled_from([("0", "2"), ("7", "4"), ("x", "2"), ("\u0661", "4")]),
    )


class Workspace:
    """Turns a case into argv and environment for one invocation, in a scratch directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def prepare(self, case: Case) -> tuple[list[str], dict[str, str]]:
        self.count += 1
        here = self.root / f"case{self.count}"
        here.mkdir()
        if isinstance(case.config, bytes):
            config = here / "retention.toml"
            config.write_bytes(case.config)
        elif case.config == "missing":
            config = here / "absent.toml"
        elif case.config == "directory":
            config = here
        else:
            config = Path(case.config)
        argv = ["--config", str(config)]
        env: dict[str, str] = {}
        if case.via == "option":
            argv += ["--database-url", case.url]
        elif case.via == "env":
            env["DATABASE_URL"] = case.url
        elif case.via == "file":
            secret = here / "url"
            secret.write_text(case.url)
            env["DATABASE_URL_FILE"] = str(secret)
        elif case.via == "file-unreadable":
            secret = here / "url-latin1"
            secret.write_bytes(case.url.encode() + b"\xff\xfe")
            env["DATABASE_URL_FILE"] = str(secret)
        if case.shard_env:
            env["JOB_COMPLETION_INDEX"], env["JOB_COMPLETIONS"] = case.shard_env
        return [*argv, *case.argv], env


def state_of(engine: Engine) -> tuple[Any, ...]:
    """What a command could write: the dispatches and the audit trail."""
    with engine.connect() as conn:
        return tuple(
            conn.execute(text(query)).all()
            for query in (
                "SELECT id, msisdn, email, app_token, content::text, cleaned_at "
                "FROM dispatches ORDER BY id",
                "SELECT run_id, status, finished_at FROM dispatch_retention.runs ORDER BY run_id",
                "SELECT count(*) FROM dispatch_retention.chunks",
                "SELECT hold_id, released_at FROM dispatch_retention.legal_holds ORDER BY 1",
            )
        )


def check(exit_code: int, output: str, case: Case, before: Any, after: Any) -> None:
    event(f"exit {exit_code}")
    print(
        "FUZZSTAT",
        exit_code,
        case.argv[:2],
        case.via,
        repr(case.config)[:20],
        output[-150:].replace("\n", " | "),
    )
    event(f"command {' '.join(a for a in case.argv[:2] if not a.startswith('-'))}")
    assert "Traceback" not in output, output
    assert exit_code in DOCUMENTED_EXITS, (exit_code, case, output)
    assert PASSWORD not in output, (case, output)
    assert MARK not in output, (case, output)
    if exit_code == 2:
        assert after == before, ("a usage error wrote something", case, output)


@pytest.fixture
def seeded(engine: Engine) -> Engine:
    now = db_now(engine)
    insert_rows(
        engine,
        [dispatch(i, now - (400 if i % 2 else 1) * DAY, type="email") for i in range(1, 41)],
    )
    return engine


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    yield Workspace(tmp_path)


def budget(variable: str, examples: int) -> Any:
    """Hypothesis settings for a fuzz test: `examples` cases (or $`variable`'s number), no
    deadline (each case talks to a real server), nothing kept between runs."""
    return settings(
        max_examples=int(os.environ.get(variable, str(examples))),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


def test_the_fuzzed_surface_in_process(
    seeded: Engine, database_url: URL, workspace: Workspace
) -> None:
    @budget("FUZZ_EXAMPLES", 300)
    @given(case=cases(database_url))
    def fuzz(case: Case) -> None:
        argv, env = workspace.prepare(case)
        full_env = {
            **{k: None for k in ("DATABASE_URL", "DATABASE_URL_FILE", "JOB_COMPLETION_INDEX",
                                 "JOB_COMPLETIONS", "DISPATCH_RETENTION_CONFIG")},
            **env,
        }  # fmt: skip
        before = state_of(seeded)
        result = CliRunner().invoke(cli, argv, env=full_env, input="")
        after = state_of(seeded)
        exception = result.exception
        assert exception is None or isinstance(exception, SystemExit), (case, repr(exception))
        check(result.exit_code, result.output, case, before, after)

    fuzz()


def test_the_fuzzed_surface_as_a_subprocess(
    seeded: Engine, database_url: URL, workspace: Workspace
) -> None:
    @budget("FUZZ_SUBPROCESS_EXAMPLES", 30)
    @given(case=cases(database_url))
    def fuzz(case: Case) -> None:
        argv, env = workspace.prepare(case)
        before = state_of(seeded)
        done = subprocess.run(
            [str(SCRIPT), *argv],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            env=script_env(**env),
        )
        after = state_of(seeded)
        check(done.returncode, done.stdout + done.stderr, case, before, after)

    fuzz()


# --- inputs the job refuses whole (non-UTF-8 URLs, deep TOML, special files) --------------
#
# Self-contained: its own strategies and one test. Properties as above (`check`): never a
# traceback, a documented exit, no password, a usage error writes nothing; and every case
# ends (a FIFO or /dev/zero never blocks or exhausts the job).

#: Characters a password may hold as they are, or that must be percent-encoded.
I22_PASSWORD_CHARS = ["&", "=", "/", "?", "#", "%", "%zz", "@", ";", " ", "+", "[", "\n", "\udcff",
                      "\udc80", ":", "'", '"', "\\", "\u00e9"]  # fmt: skip
I22_SPECIAL_FILES = ["fifo", "/dev/zero", "directory", "huge", "sparse-huge"]


@st.composite
def i22_urls(draw: st.DrawFn, base: URL) -> str:
    """The test server's URL with a password (PASSWORD split around odd characters) in the
    user info or the query, a password moved into the user name by a `/`, or bytes that are
    not UTF-8 after the database name."""
    host, database = f"{base.host}:{base.port}", base.database
    odd = draw(st.lists(st.sampled_from(I22_PASSWORD_CHARS), min_size=1, max_size=3))
    cut = draw(st.integers(1, len(PASSWORD) - 1))
    password = PASSWORD[:cut] + "".join(odd) + PASSWORD[cut:]
    where = draw(st.sampled_from(["userinfo", "query", "user", "database"]))
    if where == "userinfo":
        return f"postgresql://postgres:{password}@{host}/{database}"
    if where == "query":
        return f"postgresql://postgres@{host}/{database}?password={password}"
    if where == "user":
        return f"postgresql://{PASSWORD[:cut]}/{PASSWORD[cut:]}:pw@{host}/{database}"
    return f"postgresql://postgres@{host}/{database}\udcff?password={password}"


I22_COMMANDS = [["db", "check"], ["verify"], ["run", "--dry-run"], ["audit", "list"],
                ["hold", "list"]]  # fmt: skip


@st.composite
def i22_configs(draw: st.DrawFn) -> str:
    """A config whose value is nested `depth` levels deep, at one of several keys."""
    depth = draw(st.sampled_from([1, 31, 33, 100, 400, 500, 1000]))
    kind = draw(st.sampled_from(["array", "table"]))
    value = "[" * depth + "]" * depth if kind == "array" else "{a=" * depth + "1" + "}" * depth
    key = draw(st.sampled_from(["replace", "acknowledged", "top", "where"]))
    if key == "replace":
        return config_text(clean=f"replace = {{ content = {value} }}")
    if key == "acknowledged":
        return config_text() + f"\n[acknowledged]\nx = {value}\n"
    if key == "where":
        return config_text().replace('where = { type = "sms" }', f"where = {{ type = {value} }}")
    return f"x = {value}\n" + config_text()


@dataclass(frozen=True)
class I22Case:
    argv: list[str]
    config: str  # TOML text, or one of I22_SPECIAL_FILES
    url: str
    via: str  # "option", "env", "file", "file-special"
    url_file: str  # one of I22_SPECIAL_FILES, for "file-special"


@st.composite
def i22_cases(draw: st.DrawFn, base: URL) -> I22Case:
    special = st.sampled_from(I22_SPECIAL_FILES)
    kind = draw(st.sampled_from(["valid"] * 3 + ["deep"] * 4 + ["special"] * 3))
    config = {"valid": st.just(config_text()), "deep": i22_configs(), "special": special}[kind]
    good = base.set(drivername="postgresql").render_as_string(hide_password=False)
    return I22Case(
        argv=draw(st.sampled_from(I22_COMMANDS)),
        config=draw(config),
        url=draw(mostly(good, i22_urls(base), tenths=3)),
        via=draw(st.sampled_from(["option", "env", "file", "file-special"])),
        url_file=draw(special),
    )


def i22_special(kind: str, here: Path, name: str) -> str:
    """A path that is no small regular file."""
    if kind == "fifo":
        os.mkfifo(here / name)
        return str(here / name)
    if kind == "directory":
        (here / name).mkdir()
        return str(here / name)
    if kind in ("huge", "sparse-huge"):
        with (here / name).open("wb") as handle:
            if kind == "huge":
                handle.write(b"#" * (1024 * 1024 + 1))
            else:
                handle.truncate(64 * 1024 * 1024)
        return str(here / name)
    return kind  # /dev/zero


def i22_prepare(root: Path, count: int, case: I22Case) -> tuple[list[str], dict[str, str]]:
    here = root / f"i22-{count}"
    here.mkdir()
    if case.config in I22_SPECIAL_FILES:
        config = i22_special(case.config, here, "config")
    else:
        (here / "r.toml").write_text(case.config)
        config = str(here / "r.toml")
    argv, env = ["--config", config], {}
    if case.via == "option":
        argv += ["--database-url", case.url]
    elif case.via == "env":
        env["DATABASE_URL"] = case.url
    elif case.via == "file":
        (here / "url").write_bytes(case.url.encode("utf-8", "surrogateescape"))
        env["DATABASE_URL_FILE"] = str(here / "url")
    else:
        env["DATABASE_URL_FILE"] = i22_special(case.url_file, here, "url")
    return [*argv, *case.argv], env


def test_i22_odd_urls_deep_toml_and_special_files(
    seeded: Engine, database_url: URL, tmp_path: Path
) -> None:
    """Non-UTF-8 URLs, passwords with special characters, TOML nested deep, and a FIFO,
    /dev/zero, a directory or a huge file as the config or the URL file: every case ends
    at once with a documented exit, no traceback, no part of the password, and a usage
    error writes nothing."""
    counter = iter(range(1_000_000))

    @budget("FUZZ_I22_EXAMPLES", 120)
    @given(case=i22_cases(database_url))
    def fuzz(case: I22Case) -> None:
        argv, env = i22_prepare(tmp_path, next(counter), case)
        before = state_of(seeded)
        done = subprocess.run(
            [str(SCRIPT), *argv],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            env=script_env(**env),
        )
        after = state_of(seeded)
        output = done.stdout + done.stderr
        for fragment in (PASSWORD[:6], PASSWORD[-6:]):
            assert fragment not in output, (case, output)
        checked = Case(argv=case.argv, config=b"", url=case.url, via=case.via, shard_env=None)
        check(done.returncode, output, checked, before, after)


# --- describe_error over the SQLSTATE classes of real server errors ---------------------------
# (its own block: the server's errors, not the command line; another block may follow)

#: SQLSTATE classes a trigger may raise in: the ones the job once trusted or retried (08,
#: 28, 3D, 40, 55, 57) and others.
RAISED_CLASSES = ("08", "28", "3D", "40", "53", "55", "57", "0A", "22", "23", "25", "42",
                  "F0", "HV", "P0", "XX")  # fmt: skip
RAISE_ANYTHING = """
CREATE OR REPLACE FUNCTION pg_temp.raise_anything(state text, said text) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN
  RAISE EXCEPTION USING MESSAGE = said, ERRCODE = state, DETAIL = said, HINT = said,
    COLUMN = said, CONSTRAINT = said, TABLE = said, SCHEMA = said, DATATYPE = said;
END $$
"""


@st.composite
def raised_errors(draw: st.DrawFn) -> tuple[str, str]:
    """A SQLSTATE (a class above, any subclass) and a text holding the marker, control
    characters and what libpq says among other things."""
    state = draw(st.sampled_from(RAISED_CLASSES)) + draw(
        st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3)
    )
    libpq_words = [
        "server closed the connection unexpectedly",
        'FATAL:  password authentication failed for user "',
        "Connection refused",
        "\n\x1b]0;x\x07",
    ]
    around = st.one_of(
        st.text(max_size=40).map(lambda s: s.replace("\x00", "")), st.sampled_from(libpq_words)
    )
    return state, draw(around) + MARK + "@example.invalid" + draw(around)


def test_describe_error_says_no_server_text_whatever_the_sqlstate(engine: Engine) -> None:
    """A real server error of any SQLSTATE class with the marker in every field: described
    by condition and SQLSTATE alone (no marker, nothing unprintable), never transient, never
    a lock or statement timeout."""
    from sqlalchemy.exc import DBAPIError

    from dispatch_retention.pg import diagnosis

    @budget("FUZZ_SQLSTATE_EXAMPLES", 150)
    @given(raised=raised_errors())
    def fuzz(raised: tuple[str, str]) -> None:
        state, said = raised
        with engine.connect() as conn:
            conn.execute(text(RAISE_ANYTHING))
            try:
                conn.execute(text("SELECT pg_temp.raise_anything(:s, :t)"), {"s": state, "t": said})
            except DBAPIError as exc:
                error = exc
            else:
                raise AssertionError(f"no error raised for {state}")
        described = diagnosis.describe_error(error)
        event(f"class {state[:2]}")
        assert MARK not in described and described.isprintable(), described
        assert f"SQLSTATE {state}" in described
        assert not diagnosis.is_transient(error)
        assert not diagnosis.is_lock_timeout(error) and not diagnosis.is_statement_timeout(error)


# --- odd trail documents (`audit show` of an unexpected shape) -----------------------------
# A run record's plan, copy risks and options, and a chunk's counts, of any JSON shape the
# table can hold (as an owner with the guards off, or an imported row, may have written):
# `audit show` and `audit list` show what is readable and exit 0, never a traceback.

TRAIL_KEYS = ("name", "retention_days", "cutoff", "grace_cutoff", "due_rows", "kind", "when",
              "detail", "acknowledged", "reclean", "chunk_size")  # fmt: skip
#: Text a jsonb value can hold: no NUL, no lone surrogate (PostgreSQL refuses both).
JSON_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
ODD_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | JSON_TEXT,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(TRAIL_KEYS) | JSON_TEXT, inner, max_size=5)
    ),
    max_leaves=12,
)


def test_odd_trail_documents(engine: Engine, url_string: str, workspace: Workspace) -> None:
    import json
    import uuid

    from tests.helpers import guards_off, invoke, write_config

    config = write_config(workspace.root / "odd.toml", config_text())
    base = ["--config", str(config), "--database-url", url_string]

    @budget("FUZZ_TRAIL_EXAMPLES", 60)
    @given(policies=ODD_JSON, risks=ODD_JSON, options=ODD_JSON, counts=ODD_JSON)
    def fuzz(policies: Any, risks: Any, options: Any, counts: Any) -> None:
        run_id = str(uuid.uuid4())
        documents = {k: json.dumps(v) for k, v in
                     (("p", policies), ("c", risks), ("o", options), ("b", counts))}  # fmt: skip
        with engine.begin() as conn:
            guards_off(conn)
            conn.execute(
                text(
                    "INSERT INTO dispatch_retention.runs (run_id, status, started_at, trigger, "
                    "host, tool_version, db_user, target_table, options, config_path, "
                    "config_sha256, config_text, planned_at, policies, copy_risks) VALUES (:r, "
                    "'succeeded', now(), 'cron', 'h', '0', 'x', 'public.dispatches', "
                    "CAST(:o AS jsonb), 'x', 'x', 'x', now(), CAST(:p AS jsonb), "
                    "CAST(:c AS jsonb))"
                ),
                {"r": run_id, **documents},
            )
            conn.execute(
                text(
                    "INSERT INTO dispatch_retention.chunks (run_id, seq, first_id, last_id, "
                    "rows, cleaned_at, by_policy, skipped_locked) VALUES (:r, 1, 1, 2, 2, "
                    "now(), CAST(:b AS jsonb), false)"
                ),
                {"r": run_id, "b": documents["b"]},
            )
        for args in (
            ("audit", "show", run_id),
            ("audit", "show", run_id, "--format", "json"),
            ("audit", "list", "--limit", "1"),
            ("audit", "list", "--limit", "1", "--format", "csv"),
        ):
            result = invoke(*base, *args)
            assert result.exception is None or isinstance(result.exception, SystemExit), (
                args,
                repr(result.exception),
            )
            assert result.exit_code == 0 and "Traceback" not in result.output, result.output

    fuzz()
