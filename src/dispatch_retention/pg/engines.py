"""Engine and URL handling and session settings.

The database URL is a secret: it is read from `--database-url`, `DATABASE_URL` or the file
named by `DATABASE_URL_FILE`, and only ever shown with its password masked. The engine hides
bound parameters from error messages.

Every session runs in UTC with keepalives, a connect timeout and an
`idle_in_transaction_session_timeout`, so that a stuck job cannot hold locks for long, and
with `row_security = off`: where row-level security would hide rows from the job's role,
PostgreSQL raises instead of filtering them out silently (`target.resolve` refuses such a
target first, naming the fix).
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from dispatch_retention.config import NotSmallFile, read_small_file
from dispatch_retention.errors import DatabaseUrlError
from dispatch_retention.pg.diagnosis import know

URL_ENV = "DATABASE_URL"
URL_FILE_ENV = "DATABASE_URL_FILE"
APPLICATION_NAME = "dispatch-retention"


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
