"""Engine and URL handling, session settings, and the classification of database errors.

The database URL is a secret: it is read from `--database-url`, `DATABASE_URL` or the file
named by `DATABASE_URL_FILE`, and only ever shown with its password masked. The engine hides
bound parameters from error messages.

No text the server sends is ever shown, logged or stored: a message's DETAIL can quote row
values (personal data), and a trigger can RAISE any SQLSTATE with a row's values in every
field. `describe_error()` says a server's error by its condition, SQLSTATE and the names the
job knows, and a client-side error (libpq's or psycopg's own: no SQLSTATE, no severity) in
the job's own words for what it recognises. Which errors are retried: a lost connection
(`is_connection_lost`: broken, never made, or ended by the server going away) and the
server's own serialization failure, deadlock, lock timeout and statement timeout; never an
error a function raised (`RAISED_BY_FUNCTIONS`), whatever its SQLSTATE.

Every session runs in UTC with keepalives, a connect timeout and an
`idle_in_transaction_session_timeout`, so that a stuck job cannot hold locks for long, and
with `row_security = off`: where row-level security would hide rows from the job's role,
PostgreSQL raises instead of filtering them out silently (`target.resolve` refuses such a
target first, naming the fix).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from .config import KEPT_COLUMNS, PERSONAL_COLUMNS, NotSmallFile, read_small_file
from .errors import DatabaseUrlError
from .printable import shown_name
from .schema import AUDIT_NAMES

URL_ENV = "DATABASE_URL"
URL_FILE_ENV = "DATABASE_URL_FILE"
APPLICATION_NAME = "dispatch-retention"

#: The server's own states worth a retry in a new transaction: serialization failure and
#: deadlock (when the server's code raised them, never a function: `RAISED_BY_FUNCTIONS`).
CONFLICT_SQLSTATES = ("40001", "40P01")
#: The server going away or not ready: a session it ended (FATAL) with one of these is a
#: lost connection, retried on a new one.
GOING_AWAY_SQLSTATES = ("57P01", "57P02", "57P03")
LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"
UNIQUE_VIOLATION = "23505"
#: What libpq says of a statement it would not send (no SQLSTATE: nothing reached the server).
NOT_SENT = "number of parameters must be between"
#: The routines through which a function raises an error of its choosing (PL/pgSQL's RAISE
#: and ASSERT, PL/Python's plpy.error): any SQLSTATE, any text. Such an error is the
#: function's, never the server's lock timeout, deadlock or shutdown.
RAISED_BY_FUNCTIONS = ("exec_stmt_raise", "exec_stmt_assert", "PLy_elog_impl")


def url_configured() -> bool:
    """Whether the environment names a database URL (`DATABASE_URL` or its file)."""
    return bool(os.environ.get(URL_ENV) or os.environ.get(URL_FILE_ENV))


#: A database URL is a line of text: a file named by `DATABASE_URL_FILE` holds at most this.
MAX_URL_FILE_BYTES = 64 * 1024


def resolve_url(cli_value: str | None) -> str:
    """`--database-url`, else `DATABASE_URL`, else the contents of `DATABASE_URL_FILE` (a
    regular file of at most `MAX_URL_FILE_BYTES`: never a FIFO that blocks, nor a device
    read without end)."""
    if cli_value is not None:
        if not cli_value.strip():
            raise DatabaseUrlError("--database-url is empty")
        return cli_value
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV]
    file = os.environ.get(URL_FILE_ENV)
    if file:
        shown = _shown_path(file)
        try:
            raw = read_small_file(file, MAX_URL_FILE_BYTES)
        except OSError as exc:
            raise DatabaseUrlError(
                f"{URL_FILE_ENV}: cannot read {shown} ({exc.strerror or type(exc).__name__})"
            ) from None
        except NotSmallFile as exc:
            raise DatabaseUrlError(f"{URL_FILE_ENV}: {shown} {exc.reason}") from None
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError:  # never repeat the content: it is a secret
            raise DatabaseUrlError(f"{URL_FILE_ENV}: {shown} is not UTF-8 text") from None
        if value:
            return value
        raise DatabaseUrlError(f"{URL_FILE_ENV}: {shown} is empty")
    raise DatabaseUrlError(
        f"no database URL: pass --database-url, or set {URL_ENV} or {URL_FILE_ENV}"
    )


def _shown_path(path: str) -> str:
    """A path as a message shows it: bytes that are not UTF-8 as `\\xff`, control
    characters escaped."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def _has_surrogate(value: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in value)


#: The connection options libpq knows (`PQconndefaults`, as psycopg reads them): the only
#: keys a URL's query may hold. Any other is refused before connecting, because libpq's
#: refusal names it, and an unencoded `&` in a password makes its tail such a key.
LIBPQ_OPTIONS = frozenset(o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults())
#: Keys a query may repeat (SQLAlchemy joins them into libpq's lists of hosts).
_REPEATABLE = frozenset({"host", "hostaddr", "port"})
#: Characters a URL never holds as they are (RFC 3986): a space, a quote, ... They must be
#: percent-encoded, like a `#`, which would start a fragment.
_NEVER_IN_A_URL = frozenset(' "<>\\^`{|}#')
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODE = (
    "percent-encode special characters in the user name and password (@ as %40, / as %2F, "
    "? as %3F, # as %23, % as %25, & as %26, = as %3D, + as %2B, a space as %20)"
)


def parse_url(value: str) -> URL:
    """Accept postgresql:// (and postgres://) as psycopg 3; refuse anything else.

    A URL is refused before anything connects when a special character (`@ / ? # & =`, a
    space, a `%` that starts no escape) written as it is into the password could move a
    part of it elsewhere: into the host, the port, the database name or a query key, which a
    failed connection names (`could not translate host name`, `invalid connection option`).
    It must read the same to SQLAlchemy and to RFC 3986 (`urllib.parse.urlsplit`), hold no
    `@` after its host, and its query only libpq's own connection options. No message
    repeats any part of the URL."""
    problem = _ambiguity(value)
    if problem:
        raise DatabaseUrlError(f"the database URL {problem}: {_ENCODE}")
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):  # never repeat the value: it may hold the password
        raise DatabaseUrlError(
            "the database URL is not a valid URL (expected postgresql://USER:PASSWORD@HOST:PORT/DB)"
        ) from None
    if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise DatabaseUrlError(
            "the database URL must start with postgresql:// (got another scheme)"
        )
    problem = _read_otherwise(value, url) or _query_problem(value)
    if problem:
        raise DatabaseUrlError(f"the database URL {problem}: {_ENCODE}")
    return url.set(drivername="postgresql+psycopg")


def _ambiguity(value: str) -> str:
    """What makes `value` no URL at all, as the character class it is (never the text)."""
    if _has_surrogate(value):
        return "holds bytes that are not UTF-8 text"
    if not value.isprintable():
        return "holds a control character (a line break, a tab, ...)"
    if any(ch in _NEVER_IN_A_URL for ch in value):
        return "holds a character a URL never holds as it is (a space, #, a quote, ...)"
    if _PERCENT.search(value):
        return "holds a % that starts no percent-encoding"
    try:
        unquote(value, errors="strict")
    except UnicodeDecodeError:
        return "holds a percent-encoding that is not UTF-8 text"
    authority = value.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    if authority.count("@") > 1:
        return "has more than one '@' before the host"
    return ""


def _read_otherwise(value: str, url: URL) -> str:
    """Whether RFC 3986 reads the user, password, host, port and database of `value` as
    SQLAlchemy did (`url`); they differ where a `/` or `?` in the password ends the
    authority for one and not the other."""
    try:
        split = urlsplit(value)
        port = split.port
    except ValueError:
        return "does not read as a URL (its host or port)"
    rfc = (
        unquote(split.username or "") or None,
        unquote(split.password or "") or None,
        split.hostname or None,
        port,
        split.path[1:] or None,
    )
    ours = (url.username or None, url.password or None, (url.host or "").lower() or None, url.port,
            url.database or None)  # fmt: skip
    if rfc != ours:
        return "reads as two different URLs (a '/' or '?' in the user name or password?)"
    if "@" in split.path:
        return "has an '@' after the host"
    return ""


def _query_problem(value: str) -> str:
    """A query key libpq does not know (never named: it may be the tail of a password after
    an unencoded `&`), a part without `=`, a key given twice, or a `+` (which the query
    reads as a space, so a password would silently change)."""
    query = urlsplit(value).query
    if not query:
        return ""
    if "+" in query:  # a query reads it as a space
        return "has a '+' in its query (percent-encode it as %2B)"
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return "has a query part that is not KEY=VALUE"
    keys = [key for key, _value in pairs]
    if any(key not in LIBPQ_OPTIONS for key in keys):
        return (
            "has a query parameter that is not a libpq connection option (see the "
            'PostgreSQL documentation, "Parameter Key Words")'
        )
    if any(keys.count(key) > 1 for key in keys if key not in _REPEATABLE):
        return "gives a query parameter twice"
    return ""


def make_engine(
    url: URL,
    *,
    idle_in_transaction_timeout_ms: int = 300_000,
    connect_timeout_s: int = 10,
) -> Engine:
    options = (
        f"-c TimeZone=UTC -c jit=off -c row_security=off "
        f"-c idle_in_transaction_session_timeout={idle_in_transaction_timeout_ms}"
    )
    connect_args: dict[str, Any] = {
        "application_name": APPLICATION_NAME,
        "connect_timeout": connect_timeout_s,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "options": options,
    }
    know(*filter(None, (url.database, url.username)))  # named in errors at connect time
    engine = create_engine(
        url, hide_parameters=True, pool_pre_ping=True, pool_size=2, connect_args=connect_args
    )
    event.listen(engine, "connect", _session_defaults)
    return engine


def _session_defaults(dbapi_connection: Any, _record: Any) -> None:
    """Again on every new connection, because PGTZ in the environment (applied by libpq) or
    a pooler that drops the `options` startup parameter would override them."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute("SET jit = off")
        cursor.execute("SET row_security = off")
    dbapi_connection.commit()


def set_local(conn: Connection, **settings: str) -> None:
    """Settings for this transaction only (`set_config(..., true)`, as SET LOCAL), all in one
    statement: one round trip, however many there are."""
    calls = ", ".join(f"set_config(:n{i}, :v{i}, true)" for i in range(len(settings)))
    params: dict[str, str] = {}
    for i, (name, value) in enumerate(settings.items()):
        params[f"n{i}"], params[f"v{i}"] = name, value
    conn.execute(text(f"SELECT {calls}"), params)


def timeouts(*, lock_timeout_ms: int, statement_timeout_ms: int) -> dict[str, str]:
    """Per-transaction limits, for `set_local`."""
    return {
        "lock_timeout": f"{lock_timeout_ms}ms",
        "statement_timeout": f"{statement_timeout_ms}ms",
    }


#: For `set_local`: read through indexes where any serves (the arms of a plan or of a sparse
#: window are index ranges whose size the planner misjudges: it assumes `cleaned_at IS NULL`
#: and the age are independent). Used only when every arm has its index (`indexes.serving`).
INDEX_SCANS = {"enable_seqscan": "off"}


#: memory the plan's per-block counts may take before they spill to disk
PLAN_WORK_MEM = "64MB"


def count_in_memory(conn: Connection) -> None:
    """For this transaction: let the plan's per-block counts take up to `PLAN_WORK_MEM`
    (only where the server's own `work_mem` is smaller).

    The planner judges the arms far larger than they are (see `INDEX_SCANS`), and so
    the per-block counts as too many groups for the default 4MB: it sorts them, on disk.
    The real counts take a few MB (one entry per 10,000 ids). Parallel workers stay off
    (measured in docs/performance.md: they slow every nightly run)."""
    conn.execute(
        text(
            "SELECT set_config('work_mem', :mem, true) "
            "WHERE pg_size_bytes(current_setting('work_mem')) < pg_size_bytes(:mem)"
        ),
        {"mem": PLAN_WORK_MEM},
    )


#: For `set_local`: COMMIT returns before its WAL is flushed to disk (synchronous_commit off),
#: saving a flush per chunk.
#:
#: What a server crash can then lose is the last chunks of a run, each whole: their rows keep
#: their personal data and their audit rows are gone with them (same transaction), so the
#: trail stays exact and the next run cleans those rows again. Nothing is ever half written,
#: and a COMMIT of a later, synchronous transaction (the run record's end) flushes every
#: chunk before it.
COMMIT_WITHOUT_WAITING_FOR_DISK = {"synchronous_commit": "off"}


def database_now(conn: Connection) -> datetime:
    """The database clock: the one source of `now` for a run, a verify or a check."""
    value = conn.execute(text("SELECT now()")).scalar_one()
    assert isinstance(value, datetime)
    return value


def read_only(conn: Connection) -> None:
    """Make the transaction just begun READ ONLY (the server refuses any write in it) and
    give all its statements one snapshot (REPEATABLE READ), so that what they read adds up.
    A read-only transaction never fails to serialize at that level."""
    conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))


def _psycopg_error(exc: BaseException) -> psycopg.Error | None:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return orig if isinstance(orig, psycopg.Error) else None


def sqlstate(exc: BaseException) -> str | None:
    error = _psycopg_error(exc)
    return error.sqlstate if error is not None else None


def from_server(error: psycopg.Error) -> bool:
    """Whether the server sent `error` (it has a SQLSTATE and a severity), as against an
    error libpq or psycopg made on the client, where no server said anything: a refused or
    lost connection, a statement not sent. (psycopg gives an error at connect time no
    SQLSTATE, the server's answer then being part of libpq's text: `_client_said`.)"""
    return error.sqlstate is not None or error.diag.severity_nonlocalized is not None


def _servers_own(exc: BaseException, *states: str) -> bool:
    """The server raised one of `states` from its own code: a function's RAISE of the same
    SQLSTATE (`RAISED_BY_FUNCTIONS`) is the function's error, not the server's state."""
    error = _psycopg_error(exc)
    return (
        error is not None
        and error.sqlstate in states
        and error.diag.source_function not in RAISED_BY_FUNCTIONS
    )


def violates(exc: BaseException, state: str, constraint: str) -> bool:
    """The server's own check (never a function's RAISE) refused a write with SQLSTATE
    `state` under `constraint`: a unique index, a CHECK, a foreign key."""
    error = _psycopg_error(exc)
    return (
        _servers_own(exc, state) and error is not None and error.diag.constraint_name == constraint
    )


def is_lock_timeout(exc: BaseException) -> bool:
    return _servers_own(exc, LOCK_NOT_AVAILABLE)


def is_statement_timeout(exc: BaseException) -> bool:
    return _servers_own(exc, QUERY_CANCELED)


def is_transient(exc: BaseException) -> bool:
    """Worth a bounded retry: the connection is gone (`is_connection_lost`), or the server's
    own serialization failure or deadlock (`CONFLICT_SQLSTATES`) ended the transaction."""
    return is_connection_lost(exc) or _servers_own(exc, *CONFLICT_SQLSTATES)


def is_connection_lost(exc: BaseException) -> bool:
    """The session is gone, or could not be had for now: SQLAlchemy found the connection
    broken; libpq lost it or could not make it (a client-side error, but for one a retry
    cannot change: `_CLIENT_SAID`); or the server ended the session as it went away (FATAL
    57P01-57P03, at connect or mid-statement).

    An error the server raised in a session that lives on is never a lost connection,
    whatever its class: a trigger can RAISE 08006 or 57P01 with any text."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    error = _psycopg_error(exc)
    if error is None:
        return False
    if not from_server(error):
        return isinstance(error, psycopg.OperationalError) and _client_said(str(error)).retry
    return (
        error.diag.severity_nonlocalized in ("FATAL", "PANIC")
        and error.sqlstate in GOING_AWAY_SQLSTATES
        and error.diag.source_function not in RAISED_BY_FUNCTIONS
    )


@dataclass(frozen=True)
class _Said:
    """What the job says of a client-side error: its own `words` (a `{name}` in them is
    filled with a name the job knows, else left out), and whether a retry may help."""

    pattern: re.Pattern[str]
    words: str
    retry: bool


def _said(pattern: str, words: str, *, retry: bool) -> _Said:
    return _Said(re.compile(pattern), words, retry)


#: libpq's and psycopg's own messages (and the server's answers at connect time, which
#: psycopg gives as part of libpq's text), first match wins: recognised, and said in the
#: job's words. The text itself is never repeated: a host, a socket path, an option name (a
#: password's tail, in a URL with an unencoded `&`), or what a login trigger raised.
_CLIENT_SAID = (
    _said(re.escape(NOT_SENT), "libpq would not send a statement with that many parameters",
          retry=False),
    _said(r'password authentication failed for user "(?P<name>[^"]*)"',
          "password authentication failed for role {name}", retry=False),
    _said(r'role "(?P<name>[^"]*)" does not exist', "role {name} does not exist", retry=False),
    _said(r'database "(?P<name>[^"]*)" does not exist', "database {name} does not exist",
          retry=False),
    _said(r'permission denied for database "?(?P<name>[^"]*?)"?(?:\n|$)',
          "permission denied for database {name}", retry=False),
    _said(r"pg_hba\.conf", "no pg_hba.conf entry allows this connection", retry=False),
    _said(r"no password supplied", "the server asks for a password and none was given",
          retry=False),
    _said(r"authentication", "authentication failed", retry=False),
    _said(r"the database system is (?:starting up|shutting down|in recovery mode|not yet "
          r"accepting connections|not accepting connections)",
          "the server is starting up, shutting down or recovering", retry=True),
    _said(r"too many (?:clients|connections)|connection slots are reserved",
          "the server has no connection slot left", retry=True),
    _said(r"Connection refused",
          "connection refused: is the server running on that host and port?", retry=True),
    _said(r"No such file or directory", "no server listens on that socket", retry=True),
    _said(r"failed to resolve host|could not translate host name|Name or service not known|"
          r"nodename nor servname|name resolution",
          "could not resolve the host name", retry=True),
    _said(r"timeout expired|timed out", "the connection timed out", retry=True),
    _said(r"Network is unreachable|No route to host|Host is unreachable",
          "the network is unreachable", retry=True),
    _said(r"server does not support SSL", "the server does not support SSL, which the URL "
          "requires (sslmode)", retry=False),
    _said(r"server closed the connection unexpectedly|SSL connection has been closed|"
          r"SSL SYSCALL error|connection (?:is|was) (?:lost|closed)|consuming input failed|"
          r"sending query failed|could not (?:receive|send) data|Connection reset by peer|"
          r"Broken pipe|no connection to the server|terminating connection",
          "the connection was lost", retry=True),
    _said(r"SSL|certificate", "an SSL error (see the URL's sslmode and certificates)",
          retry=False),
    _said(r"invalid (?:connection option|URI|integer value|port|sslmode|value)|"
          r"missing \"=\"|unterminated quoted string|URI query parameter",
          "the database URL has an option or value libpq does not accept", retry=False),
    _said(r"FATAL:|ERROR:", "the server refused the connection (its message is not shown)",
          retry=False),
)  # fmt: skip
_CLIENT_UNKNOWN = _Said(re.compile(""), "a client-side error (its text is not shown)", True)


def _client_said(message: str) -> _Said:
    """What the job says of a client-side error whose text is `message` (`_CLIENT_SAID`)."""
    return next((s for s in _CLIENT_SAID if s.pattern.search(message)), _CLIENT_UNKNOWN)


#: The names an error message may show: the job's own schema, tables, columns and
#: constraints, and the target's schema, table and columns (`know()`, when the target is
#: resolved). A diagnostic field can be set to anything by a trigger (`RAISE ... USING
#: COLUMN = OLD.email`), so a name the job does not know is never shown.
_KNOWN_NAMES: set[str] = {*PERSONAL_COLUMNS, *KEPT_COLUMNS, *AUDIT_NAMES}


#: Server messages that name an object in a fixed phrase, by SQLSTATE: permission denied
#: (revoked rights), an object that exists already or not at all, a reserved name. The
#: phrase is rebuilt from the pattern, and the name shown only if the job knows it.
_NAMING = {
    "42501": re.compile(
        r"(?P<phrase>permission denied for|must be owner of) "
        r"(?P<kind>table|schema|database|sequence|view|materialized view|function|relation) "
        r'"?(?P<name>[^"]+?)"?$'
    ),
    "42P07": re.compile(r'(?P<kind>relation) "(?P<name>[^"]+)" (?P<phrase>already exists)'),
    "42P06": re.compile(r'(?P<kind>schema) "(?P<name>[^"]+)" (?P<phrase>already exists)'),
    "42P01": re.compile(r'(?P<kind>relation) "(?P<name>[^"]+)" (?P<phrase>does not exist)'),
    "3F000": re.compile(r'(?P<kind>schema) "(?P<name>[^"]+)" (?P<phrase>does not exist)'),
    "42703": re.compile(r'(?P<kind>column) "?(?P<name>[^"\s]+)"? (?P<phrase>does not exist)'),
    "42939": re.compile(r'(?P<phrase>unacceptable) (?P<kind>schema name) "(?P<name>[^"]+)"'),
}
_UNKNOWN_NAME = "(a name the job does not know)"


def know(*names: str) -> None:
    """Names the job may show in an error message from now on (the resolved target's)."""
    _KNOWN_NAMES.update(names)


def describe_error(exc: BaseException) -> str:
    """A message safe to print, log and store in the trail: never text the server sent.

    An error the server raised: its condition, SQLSTATE and the names of objects the job
    knows (`know`), nothing else: a message, DETAIL or HINT can quote row values, and a
    trigger can RAISE any SQLSTATE with them in every diagnostic field. A client-side error
    (libpq's or psycopg's, no server involved): its class and the job's own words for what
    it recognises (`_CLIENT_SAID`). Every name shown is escaped and bounded (`shown_name`)."""
    error = _psycopg_error(exc)
    if error is None:
        return type(exc).__name__
    if not from_server(error):
        return f"{type(error).__name__}, {_client_words(str(error))}"
    parts = [type(error).__name__]
    if error.sqlstate:
        parts.append(f"SQLSTATE {error.sqlstate}")
    diag = error.diag
    for label, value in (
        ("schema", diag.schema_name),
        ("table", diag.table_name),
        ("column", diag.column_name),
        ("constraint", diag.constraint_name),
    ):
        if value and value in _KNOWN_NAMES:
            parts.append(f"{label} {shown_name(value)}")
    named = _named_object(error.sqlstate, diag.message_primary)
    if named:
        parts.append(named)
    return ", ".join(parts)


def _client_words(message: str) -> str:
    """The job's words for a client-side error (`_client_said`), a name in them shown only
    when the job knows it (the URL's role and database, `make_engine`)."""
    said = _client_said(message)
    if "{name}" not in said.words:
        return said.words
    found = said.pattern.search(message)
    name = found["name"] if found else ""
    return said.words.format(name=shown_name(name) if name in _KNOWN_NAMES else _UNKNOWN_NAME)


def _named_object(state: str | None, message: str | None) -> str | None:
    """The object a server message names (`_NAMING`), as `permission denied for table
    public.dispatches`: the phrase and kind come from the pattern, the name from the
    message only when every part of it is a name the job knows."""
    pattern = _NAMING.get(state or "")
    found = pattern.search(message) if pattern and message else None
    if found is None:
        return None
    name = found["name"]
    if all(part in _KNOWN_NAMES for part in name.split(".")):
        name = shown_name(name)
    else:
        name = _UNKNOWN_NAME
    phrase, kind = found["phrase"], found["kind"]
    if phrase in ("permission denied for", "must be owner of"):
        return f"{phrase} {kind} {name}"
    if phrase == "unacceptable":
        return f"unacceptable {kind} {name}"
    return f"{kind} {name} {phrase}"
