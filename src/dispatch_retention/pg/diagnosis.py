"""What a database error says, and whether it is the server's: the classification of errors.

No text the server sends is ever shown, logged or stored: a message's DETAIL can quote row
values (personal data), and a trigger can RAISE any SQLSTATE with a row's values in every
field. `describe_error()` says a server's error by its condition, SQLSTATE and the names the
job knows, and a client-side error (libpq's or psycopg's own: no SQLSTATE, no severity) in
the job's own words for what it recognises. Which errors are retried: a lost connection
(`is_connection_lost`: broken, never made, or ended by the server going away) and the
server's own serialization failure, deadlock, lock timeout and statement timeout; never an
error a function raised (`RAISED_BY_FUNCTIONS`), whatever its SQLSTATE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from sqlalchemy.exc import DBAPIError

from dispatch_retention.config import KEPT_COLUMNS, PERSONAL_COLUMNS
from dispatch_retention.printable import shown_name

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


#: The names an error message may show: the dispatches table's columns, the job's own
#: schema, tables, columns and constraints (`know()`, by `trail.audit_tables` as it loads),
#: and the target's schema, table and columns (`know()`, when the target is resolved). A
#: diagnostic field can be set to anything by a trigger (`RAISE ... USING COLUMN =
#: OLD.email`), so a name the job does not know is never shown.
_KNOWN_NAMES: set[str] = {*PERSONAL_COLUMNS, *KEPT_COLUMNS}


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
