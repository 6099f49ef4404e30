"""Inputs the job must refuse whole, before they do harm (docs/operations.md, "Messages that
refuse an input").

- A database URL whose password holds a special character written as it is (`&`, `/`, `?`,
  `#`, `%`, `@`, a space) is refused before connecting, exit 2, with a fixed message: a
  part of the password would otherwise land in a query key, the host or the database name,
  which libpq's refusal names. Whichever way the URL comes (`--database-url`,
  `DATABASE_URL`, `DATABASE_URL_FILE`); a URL that is accepted means exactly its password.
- Bytes that are not UTF-8 in a URL, a TOML value nested 500 deep, and a path that is no
  small regular file (a FIFO, /dev/zero, a directory, a huge file) for `--config` or
  `DATABASE_URL_FILE`: exit 2 at once, never a traceback or a read without end.
- Config values and options the database could not store (a NUL, a reason past its bound,
  a count past 10^15) are refused in validation, exit 2 naming the key.
- Printed grants stay the administrator's SQL whatever the names (a dollar quote in the
  audit schema's name), and never grant or show a column the config strips.
- `db check` counts unknown status values without printing them; `--shard` and the Indexed
  Job's variables take ASCII digits only.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention import config, errors
from dispatch_retention.checks import db_grants
from dispatch_retention.pg import engines
from dispatch_retention.trail import facts
from tests.helpers import (
    DAY,
    SCRIPT,
    assert_no_marker,
    config_text,
    db_now,
    dispatch,
    granted_role,
    insert_rows,
    invoke,
    script_env,
    settings,
    write_config,
)

SECRET = "cdSECRET"


def run_script(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """The console script with `env` added (values may hold surrogate escapes: they reach
    the process as the raw bytes), its output decoded leniently."""
    return subprocess.run(
        [str(SCRIPT), "--log-format", "json", *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env=script_env(**(env or {})),
    )


def assert_refused(done: subprocess.CompletedProcess[str], *secrets: str) -> str:
    """Exit 2, one line of error, no traceback, none of `secrets` anywhere."""
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and "internal_error" not in output, output
    for secret in secrets:
        assert secret not in output, output
    return output


# --- item 2: a password written as it is -------------------------------------------------


def _hostport(url: URL) -> str:
    return f"{url.host}:{url.port}"


#: URLs (HOST and DB filled in) whose password holds a special character as it is; `u`
#: exists nowhere, so a URL that were accepted would fail to connect, naming what it parsed.
LEAKY = [
    pytest.param("postgresql://postgres@HOST/DB?password=pQ&cdSECRET=ef", id="amp-query"),
    pytest.param("postgresql://postgres@HOST/DB?password=pQ&cdSECRET", id="amp-no-equals"),
    pytest.param("postgresql://postgres@HOST/DB?password=pQ&password=cdSECRET", id="twice"),
    pytest.param("postgresql://u:pQ/cdSECRET@HOST/DB", id="slash"),
    pytest.param("postgresql://u:pQ?cdSECRET@HOST/DB", id="question"),
    pytest.param("postgresql://u:pQ?x=cdSECRET@HOST/DB", id="question-equals"),
    pytest.param("postgresql://u:pQ#cdSECRET@HOST/DB", id="hash"),
    pytest.param("postgresql://u:pQ%cdSECRET@HOST/DB", id="percent-hex"),
    pytest.param("postgresql://u:pQ%zzcdSECRET@HOST/DB", id="percent"),
    pytest.param("postgresql://u:pQ cdSECRET@HOST/DB", id="space"),
    pytest.param("postgresql://u:pQ@cd/cdSECRET@HOST/DB", id="at-then-slash"),
    pytest.param("postgresql://pQ/cdSECRET:pw@HOST/DB", id="slash-in-user"),
    pytest.param("postgresql://u:pQ@cdSECRET@HOST/DB", id="two-at"),
    pytest.param("postgresql://u:pQ\ncdSECRET@HOST/DB", id="newline"),
    pytest.param("postgresql://u:pQ[cdSECRET@HOST/DB", id="bracket"),
]


def _filled(template: str, url: URL) -> str:
    return template.replace("HOST", _hostport(url)).replace("DB", str(url.database))


@pytest.mark.parametrize("template", LEAKY)
def test_a_url_that_would_spill_its_password_is_refused_before_connecting(template: str) -> None:
    """In-process: `engines.parse_url` refuses it with a message that repeats nothing of it."""
    value = template.replace("HOST", "127.0.0.1:5432").replace("DB", "postgres")
    with pytest.raises(errors.DatabaseUrlError) as refused:
        engines.parse_url(value)
    assert SECRET not in str(refused.value) and "pQ" not in str(refused.value)


@pytest.mark.parametrize("via", ["option", "env", "file"])
@pytest.mark.parametrize("template", LEAKY)
def test_no_part_of_the_password_reaches_any_output(
    template: str, via: str, database_url: URL, tmp_path: Path
) -> None:
    """The console script, the URL given each way: exit 2, the fixed message, nothing of
    the password in stdout, stderr (the JSON log) or anywhere."""
    value = _filled(template, database_url)
    cfg = write_config(tmp_path / "r.toml", config_text())
    args, env = ["--config", str(cfg)], {}
    if via == "option":
        args += ["--database-url", value]
    elif via == "env":
        env["DATABASE_URL"] = value
    else:
        (tmp_path / "url").write_text(value)
        env["DATABASE_URL_FILE"] = str(tmp_path / "url")
    done = run_script(*args, "db", "check", env=env)
    output = assert_refused(done, SECRET, "cdSEC")
    assert "the database URL" in output


@pytest.mark.parametrize(
    "password",
    ["ab&cd=ef", "ab;cd", "ab:cd", "ab=cd", "ab+cd", "ab!cd$'()*,", "p\u00e4ss", "ab~cd"],
    ids=["amp-equals", "semicolon", "colon", "equals", "plus", "sub-delims", "non-ascii", "tilde"],
)
@pytest.mark.parametrize("where", ["userinfo", "query"])
def test_a_url_that_is_accepted_means_exactly_its_password(password: str, where: str) -> None:
    """Characters a URL may hold as they are: accepted, and the password read whole (or,
    where `&` or `=` split a query and `+` reads as a space there, refused); never a
    different password."""
    if where == "userinfo":
        value = f"postgresql://u:{password}@127.0.0.1:5432/db"
    else:
        value = f"postgresql://u@127.0.0.1:5432/db?password={password}"
    try:
        url = engines.parse_url(value)
    except errors.DatabaseUrlError:
        assert where == "query" and any(c in password for c in "&=+")
        return
    found = url.password if where == "userinfo" else url.query.get("password")
    assert found == password


def test_every_libpq_option_is_accepted_in_the_query() -> None:
    """The list of query keys is libpq's own (`PQconndefaults`), not a guess."""
    assert {"sslmode", "application_name", "options", "host", "port", "password"} <= (
        engines.LIBPQ_OPTIONS
    )
    url = engines.parse_url("postgresql://u@h/db?sslmode=require&host=a&host=b&port=1&port=2")
    assert url.query["sslmode"] == "require"


# --- item 7: tracebacks and reads without end -------------------------------------------


@pytest.mark.parametrize("via", ["option", "env"])
def test_a_url_with_bytes_that_are_not_utf8_exits_2(
    via: str, database_url: URL, tmp_path: Path
) -> None:
    """`\\xff` in the password (os.environ and argv carry it as a surrogate escape)."""
    value = (
        f"postgresql://postgres:pw\udcffSECRET@{_hostport(database_url)}/{database_url.database}"
    )
    cfg = write_config(tmp_path / "r.toml", config_text())
    args = ["--config", str(cfg)]
    env = {"DATABASE_URL": value} if via == "env" else {}
    if via == "option":
        args += ["--database-url", value]
    output = assert_refused(run_script(*args, "db", "check", env=env), "SECRET")
    assert "not UTF-8" in output


def _special(kind: str, tmp_path: Path) -> str:
    """A path that is no small regular file."""
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return str(path)
    if kind == "directory":
        return str(tmp_path)
    if kind == "huge":
        path = tmp_path / "huge"
        with path.open("wb") as handle:
            handle.truncate(2 * 1024 * 1024)  # sparse: 2 MiB of NULs
        return str(path)
    return "/dev/zero"


SPECIAL = ["fifo", "dev-zero", "directory", "huge"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_database_url_file_that_is_no_small_regular_file_exits_2(
    kind: str, tmp_path: Path
) -> None:
    """DATABASE_URL_FILE naming a FIFO (which would block for ever), /dev/zero (read until
    memory ends), a directory or a huge file: exit 2 at once."""
    cfg = write_config(tmp_path / "r.toml", config_text())
    done = run_script(
        "--config", str(cfg), "db", "check", env={"DATABASE_URL_FILE": _special(kind, tmp_path)}
    )
    assert "DATABASE_URL_FILE" in assert_refused(done)


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_config_that_is_no_small_regular_file_exits_2(kind: str, tmp_path: Path) -> None:
    """`--config` naming the same: exit 2 at once, naming the file."""
    path = _special(kind, tmp_path)
    done = run_script("--config", path, "--database-url", "postgresql://x@127.0.0.1:1/x", "run")
    assert "invalid configuration" in assert_refused(done) or kind == "directory"


def test_a_url_file_of_64_kib_is_read_and_one_byte_more_refused(tmp_path: Path) -> None:
    """The bound is the file's content, not a guess from its size."""
    url = "postgresql://u@127.0.0.1:1/x"
    fits = tmp_path / "fits"
    fits.write_text(url + " " * (engines.MAX_URL_FILE_BYTES - len(url)))
    over = tmp_path / "over"
    over.write_text(url + " " * (engines.MAX_URL_FILE_BYTES - len(url) + 1))
    os.environ["DATABASE_URL_FILE"] = str(fits)
    try:
        assert engines.resolve_url(None) == url
        os.environ["DATABASE_URL_FILE"] = str(over)
        with pytest.raises(errors.DatabaseUrlError, match="larger than 64 KiB"):
            engines.resolve_url(None)
    finally:
        del os.environ["DATABASE_URL_FILE"]


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "array" else "{a=" * depth + "1" + "}" * depth


@pytest.mark.parametrize("kind", ["array", "table"])
@pytest.mark.parametrize(
    ("key", "depth"),
    [("replace", 500), ("replace", 40), ("acknowledged", 500), ("top", 500)],
    ids=["replace-500", "replace-40", "acknowledged-500", "top-500"],
)
def test_a_value_nested_too_deep_is_refused_naming_the_key(
    key: str, depth: int, kind: str, tmp_path: Path
) -> None:
    """A TOML value nested deeper than the config's bound: exit 2, never a RecursionError
    (tomllib and pydantic recurse)."""
    value = _nested(depth, kind)
    if key == "replace":
        text_ = config_text(clean=f"replace = {{ content = {value} }}")
    elif key == "acknowledged":
        text_ = config_text() + f"\n[acknowledged]\nx = {value}\n"
    else:
        text_ = f"x = {value}\n" + config_text()
    cfg = write_config(tmp_path / "deep.toml", text_)
    done = run_script("--config", str(cfg), "--database-url", "postgresql://x@127.0.0.1:1/x", "run")
    output = assert_refused(done)
    assert "invalid configuration" in output and "nest" in output, output


def test_a_config_path_that_is_not_utf8_exits_2(tmp_path: Path) -> None:
    """The run record keeps the config's path: a name with bytes that are not UTF-8 is
    refused before anything connects."""
    path = tmp_path / "r\udcff.toml"
    path.write_text(config_text())
    done = run_script(
        "--config", str(path), "--database-url", "postgresql://x@127.0.0.1:1/x", "run"
    )
    assert "not UTF-8" in assert_refused(done)


# --- item 10 (the config parts): what the database could not hold ------------------------

NUL = "\\u0000"


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        pytest.param(f'[acknowledged]\nt = "a{NUL}b"', "acknowledged.t", id="ack-reason-nul"),
        pytest.param(f'[acknowledged]\n"t{NUL}" = "ok"', "acknowledged", id="ack-name-nul"),
        pytest.param(f'[acknowledged]\nt = "{"x" * 70_000}"', "acknowledged.t", id="ack-70k"),
        pytest.param(
            "[acknowledged]\n" + "".join(f't{i} = "{"y" * 900}"\n' for i in range(30)),
            "acknowledged",
            id="ack-total",
        ),
        pytest.param(
            f'[clean]\nkeep = {{ member_id = "a{NUL}" }}', "clean.keep.member_id", id="keep-nul"
        ),
        pytest.param(
            f'[clean]\nkeep = {{ member_id = "{"x" * 2000}" }}',
            "clean.keep.member_id",
            id="keep-long",
        ),
        pytest.param(
            f'[clean]\nreplace = {{ content = "a{NUL}" }}', "clean.replace", id="replace-nul"
        ),
        pytest.param(
            f'[target.codes]\ntype = {{ sms = "a{NUL}" }}', "target.codes", id="codes-nul"
        ),
        pytest.param(
            "[guard]\nmax_rows_per_run = 1000000000000001",
            "guard.max_rows_per_run",
            id="max-rows-per-run",
        ),
        pytest.param(
            "[guard]\nrefuse_above_rows = 9223372036854775807",
            "guard.refuse_above_rows",
            id="refuse-above-rows",
        ),
    ],
)
def test_a_config_value_the_database_could_not_hold_is_refused_naming_its_key(
    toml: str, key: str
) -> None:
    """Refused in validation (exit 2, naming the key), not accepted and then failing every
    run with exit 1 (where the run record could not even be written)."""
    base = config_text().replace("[clean]\n\n[guard]\n\n", "")
    text_ = f"{toml}\n{base}"
    with pytest.raises(errors.ConfigError) as refused:
        config.parse(text_, "c.toml")
    assert refused.value.key.startswith(key.split(".")[0]), refused.value
    assert key in str(refused.value), refused.value
    assert "\x00" not in str(refused.value)


def test_a_where_value_with_a_nul_is_refused() -> None:
    """The neighbour already refused: a policy's where value (kept refused)."""
    policies = f'[[policy]]\nname = "p"\nretention_days = 30\nwhere = {{ type = "s{NUL}" }}\n'
    with pytest.raises(errors.ConfigError, match="NUL"):
        config.parse(config_text(policies=policies))


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--max-rows", str(10**15 + 1)], id="max-rows-past-1e15"),
        pytest.param(["--max-rows", str(2**63)], id="max-rows-past-bigint"),
        pytest.param(["--chunk-size", str(2**31)], id="chunk-size-past-int"),
    ],
)
def test_a_count_option_past_what_the_run_record_holds_exits_2(
    args: list[str], tmp_path: Path
) -> None:
    """`run --max-rows` above 10^15 (the run record's documents hold no larger number)."""
    cfg = write_config(tmp_path / "r.toml", config_text())
    done = invoke(
        "--config",
        str(cfg),
        "--database-url",
        "postgresql://x@127.0.0.1:1/x",
        "run",
        "--yes",
        *args,
    )
    assert done.exit_code == 2, done.output
    assert args[0] in done.output


def test_the_largest_acknowledged_reasons_still_write_the_run_record(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """At the bound (16 KiB of reasons, each at most 1,000 characters, every one matching
    a trigger): the run record is written and the run succeeds."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 4)])
    names = [f"audit_{i:02}" for i in range(15)]
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql "
                "AS $$BEGIN RETURN NEW; END$$"
            )
        )
        for name in names:
            conn.execute(
                text(
                    f"CREATE TRIGGER {name} AFTER UPDATE ON dispatches "
                    "FOR EACH ROW EXECUTE FUNCTION noop()"
                )
            )
    reasons = "".join(f'{name} = "{"r" * 1000}"\n' for name in names)
    cfg = write_config(tmp_path / "r.toml", config_text() + f"\n[acknowledged]\n{reasons}")
    done = run_script("--config", str(cfg), "--database-url", url_string, "run", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


# --- item 15: names in the printed SQL ----------------------------------------------------

#: Quoted audit schema names (unquoted) that hold SQL of their own.
REFUSED_SCHEMAS = [
    pytest.param("x$dr_facts$;CREATE TABLE pwned();DO $dr_facts$BEGIN", id="issue"),
    pytest.param("a$$;CREATE TABLE pwned();DO $$BEGIN", id="empty-tag"),
    pytest.param("b\\:x", id="backslash-colon"),
    pytest.param("a :x", id="colon-bind"),
    pytest.param("a\nb", id="newline"),
]
ACCEPTED_SCHEMAS = [
    pytest.param("q';CREATE TABLE pwned();--", id="quote"),
    pytest.param('d";CREATE TABLE pwned();--', id="double-quote"),
    pytest.param("p %s %(x)s", id="percent"),
    pytest.param("\u00e9t\u00e9 -- */ /*", id="comment"),
]


def _with_audit_schema(tmp_path: Path, name: str) -> Path:
    """A config naming `name` (quoted) as the audit schema, written as a TOML string."""
    quoted = '"' + name.replace('"', '""') + '"'
    return write_config(
        tmp_path / "r.toml", config_text() + f"\n[audit]\nschema = {json.dumps(quoted)}\n"
    )


@pytest.fixture
def hostile_db(engine: Engine) -> Engine:
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in range(1, 4)])
    return engine


def _pwned(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT relname FROM pg_class WHERE relname LIKE 'pwned%'")).all()


@pytest.mark.parametrize("schema", REFUSED_SCHEMAS)
def test_an_audit_schema_name_that_could_end_a_quote_is_refused(
    schema: str, hostile_db: Engine, url_string: str, tmp_path: Path
) -> None:
    """`$` (a dollar quote's end), `\\` and `:` (which the migrations' SQL text reads as
    escapes and bind parameters), a control character: exit 2 naming audit.schema, before
    `db upgrade` or `db grants` prints or runs anything."""
    cfg = _with_audit_schema(tmp_path, schema)
    for command in (["upgrade"], ["grants", "--role", "auditor", "--purpose", "read-only"]):
        done = invoke("--config", str(cfg), "--database-url", url_string, "db", *command)
        assert done.exit_code == 2, done.output
        assert "audit.schema" in done.output and done.stdout == ""
    assert _pwned(hostile_db) == []


@pytest.mark.parametrize("schema", ACCEPTED_SCHEMAS)
def test_a_hostile_audit_schema_name_stays_a_name_in_the_printed_grants(
    schema: str, hostile_db: Engine, url_string: str, database_url: URL, tmp_path: Path
) -> None:
    """The read-only grants as printed, run by psql: no statement of the name's own runs,
    and the read-only role counts through the view they make (verify exits 0 or 5)."""
    cfg = _with_audit_schema(tmp_path, schema)
    upgraded = invoke("--config", str(cfg), "--database-url", url_string, "db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    with granted_role(hostile_db, database_url, "holds") as (role, ro_url):  # a plain role
        printed = invoke(
            "--config",
            str(cfg),
            "--database-url",
            url_string,
            "db",
            "grants",
            "--role",
            role,
            "--purpose",
            "read-only",
        )
        assert printed.exit_code == 0, printed.output
        done = subprocess.run(
            ["psql", url_string, "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"],
            input=printed.stdout,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert _pwned(hostile_db) == []
        assert done.returncode == 0, done.stderr
        verified = invoke("--config", str(cfg), "--database-url", ro_url, "verify")
        assert verified.exit_code in (0, 5), verified.output


def test_a_cleaned_value_holding_the_dollar_tag_is_written_safely(
    hostile_db: Engine, url_string: str, database_url: URL
) -> None:
    """A `clean.replace` value with `$dr_facts$` in it (refused before, as a special case):
    the tag is chosen so that nothing in the body can end it."""
    s = settings(clean='replace = { content = "$dr_facts$;CREATE TABLE pwned();DO $dr_facts$" }')
    body = "\n".join(facts.statements(s))
    assert "DO $dr_facts_1$" in body
    with granted_role(hostile_db, database_url, "read-only", s):
        assert _pwned(hostile_db) == []


# --- item 16: a stripped member_id, status values, digits ---------------------------------

STRIP_MEMBER = 'columns = ["content", "msisdn", "email", "app_token", "member_id"]'


def test_a_stripped_member_id_is_neither_granted_nor_shown_to_the_read_only_role(
    engine: Engine, url_string: str, database_url: URL, tmp_path: Path
) -> None:
    """With member_id in clean.columns: the read-only grants leave it out, the view shows
    no member_id (a `held` flag instead), and the role's verify is the owner's, held rows
    included."""
    s = settings(clean=STRIP_MEMBER)
    assert "member_id" not in facts.shown_columns(s)
    read_only = db_grants.statements(s, "auditor", "read-only")
    granted = [line for line in read_only if line.startswith("GRANT SELECT (")]
    assert granted and all("member_id" not in line for line in granted)
    cfg = write_config(tmp_path / "r.toml", config_text(clean=STRIP_MEMBER))
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY, member_id=1000 + i) for i in range(1, 6)])
    held = invoke(
        "--config",
        str(cfg),
        "--database-url",
        url_string,
        "hold",
        "add",
        "1003",
        "--reason",
        "case 17",
    )
    assert held.exit_code == 0, held.output
    with granted_role(engine, database_url, "read-only", s) as (role, ro_url):
        with engine.connect() as conn:
            columns = (
                conn.execute(
                    text(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = 'dispatch_retention' AND table_name = :v"
                    ),
                    {"v": facts.FACTS_VIEW},
                )
                .scalars()
                .all()
            )
            may = conn.execute(
                text("SELECT has_column_privilege(:r, 'dispatches', 'member_id', 'SELECT')"),
                {"r": role},
            ).scalar()
        assert "member_id" not in columns and "held" in columns
        assert may is False
        owner = invoke(
            "--config", str(cfg), "--database-url", url_string, "verify", "--format", "json"
        )
        ro = invoke("--config", str(cfg), "--database-url", ro_url, "verify", "--format", "json")
        assert (owner.exit_code, ro.exit_code) == (5, 5), ro.output
        mine, theirs = json.loads(owner.stdout), json.loads(ro.stdout)
        mine.pop("checked_at"), theirs.pop("checked_at")
        assert theirs == mine and theirs["held_rows"] == 1


def test_db_check_counts_unknown_status_values_without_printing_them(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """An application that put an address into a status column: `db check` says how many
    unknown values there are, never which."""
    now = db_now(engine)
    insert_rows(
        engine,
        [
            dispatch(1, now - DAY, transmission_status="max@example.org"),
            dispatch(2, now - DAY, transmission_status="+4915112345678"),
            dispatch(3, now - DAY, delivery_status="ann@example.org"),
        ],
    )
    cfg = write_config(tmp_path / "r.toml", config_text())
    checked = invoke("--config", str(cfg), "--database-url", url_string, "db", "check")
    assert "example.org" not in checked.output and "4915112345678" not in checked.output
    assert "transmission_status holds 2 unknown values" in checked.stdout, checked.stdout
    assert "delivery_status holds 1 unknown value" in checked.stdout
    assert_no_marker(checked.stdout, checked.stderr)


@pytest.mark.parametrize(
    "shard",
    ["\u0661/4", "0/\u0664", "\uff11/4", "1/4\n", "1\u2003/4"],
    ids=["arabic-index", "arabic-count", "fullwidth", "newline", "em-space"],
)
def test_shard_takes_ascii_digits_only(shard: str, tmp_path: Path) -> None:
    """`--shard` with another script's digits (which `int()` reads): exit 2."""
    cfg = write_config(tmp_path / "r.toml", config_text())
    done = invoke(
        "--config",
        str(cfg),
        "--database-url",
        "postgresql://x@127.0.0.1:1/x",
        "run",
        "--yes",
        "--shard",
        shard,
    )
    assert done.exit_code == 2, done.output


@pytest.mark.parametrize(
    ("index", "count"),
    [("\u0661", "4"), ("1", "\u0664"), ("\u0967", "2")],
    ids=["arabic-index", "arabic-count", "devanagari"],
)
def test_indexed_job_variables_take_ascii_digits_only(
    index: str, count: str, tmp_path: Path
) -> None:
    """JOB_COMPLETION_INDEX / JOB_COMPLETIONS with another script's digits: exit 2, naming
    the variables."""
    cfg = write_config(tmp_path / "r.toml", config_text())
    done = invoke(
        "--config",
        str(cfg),
        "--database-url",
        "postgresql://x@127.0.0.1:1/x",
        "run",
        "--yes",
        env={"JOB_COMPLETION_INDEX": index, "JOB_COMPLETIONS": count},
    )
    assert done.exit_code == 2, done.output
    assert "JOB_COMPLETION_INDEX" in done.output


@pytest.fixture(autouse=True)
def _no_url_file_env() -> Iterator[None]:
    yield
    os.environ.pop("DATABASE_URL_FILE", None)
