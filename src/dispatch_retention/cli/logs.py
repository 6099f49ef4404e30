"""structlog set-up: JSON lines on stderr when not on a terminal, console output on one.

What a log line may hold: never a row value and never text the server sent (docs/auditor.md,
"What the audit trail never contains"). So:

- an exception is logged as its traceback's frames and classes, each with no message but
  the job's own: `diagnosis.describe_error` for a database error (condition, SQLSTATE, names the job
  knows), the text of the job's own errors (`errors.DispatchRetentionError`), nothing for any
  other (a `KeyError` can name a row's value, and a chained database error's text holds the
  server's message and DETAIL). Never frame locals (structlog's dict tracebacks and rich's
  pretty tracebacks show them);
- the libraries' own warnings (SQLAlchemy's pool, psycopg: "error ignored in rollback on
  %s: %s", the server's message in the arguments) are logged as `library_warning` events
  with the library's fixed format string and never its arguments;
- on the console every text value is escaped (`printable.escaped`): a trigger's or lock
  holder's name cannot send a terminal escape or forge a line. JSON lines are escaped by the
  JSON encoder (`ensure_ascii`).
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterator
from typing import Any, Literal

import structlog

from dispatch_retention.printable import escaped

Format = Literal["json", "console"]


def configure(fmt: Format | None = None, *, level: int = logging.INFO) -> None:
    """Logs on stderr in `fmt` (console on a terminal, else JSON), from `level` up (a run
    that draws a progress bar keeps its info events off the terminal: `level` WARNING)."""
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _exception,
    ]
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        shared += [_readable_plan, _escaped_values]
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    if _LIBRARY_WARNINGS not in root.handlers:
        root.addHandler(_LIBRARY_WARNINGS)


def safe_traceback(exc: BaseException) -> str:
    """`exc`'s traceback as Python prints it (its causes and contexts first), but with the
    job's words for each exception's message (`_said`), never the exception's own text."""
    lines: list[str] = []
    for link, joined_by in _chain(exc):
        if joined_by:
            lines += ["", joined_by, ""]
        lines.append("Traceback (most recent call last):")
        for frame in traceback.extract_tb(link.__traceback__):
            lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
            if frame.line:
                lines.append(f"    {frame.line}")
        kind = type(link)
        lines.append(f"{kind.__module__}.{kind.__qualname__}: {_said(link)}")
    return "\n".join(escaped(line) for line in lines)


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def _chain(exc: BaseException) -> Iterator[tuple[BaseException, str]]:
    """The exceptions chained to `exc`, oldest first, each with the line that joins it to
    the one printed before it (as `traceback` prints them)."""
    newest_first: list[tuple[BaseException, str]] = []  # (exception, how its successor
    seen: set[int] = set()  # came of it)
    current: BaseException | None = exc
    how = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        newest_first.append((current, how))
        if current.__cause__ is not None:
            current, how = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, how = current.__context__, _CONTEXT
        else:
            current = None
    oldest_first = newest_first[::-1]
    for i, (link, _) in enumerate(oldest_first):
        yield link, oldest_first[i - 1][1] if i else ""


def _said(exc: BaseException) -> str:
    """The message logged for `exc`: the job's own words only (see the module's note)."""
    from dispatch_retention import (
        errors,  # not at import: `logs` is configured before the heavy imports
    )
    from dispatch_retention.pg import diagnosis

    if isinstance(exc, errors.DispatchRetentionError):
        return str(exc)
    described = diagnosis.describe_error(exc)
    if described != type(exc).__name__:
        return described
    return "(its message is not shown: it may hold data)"


def _exception(_logger: Any, _method: str, event_dict: Any) -> Any:
    """`exc_info=` of an event as `safe_traceback` (in place of structlog's formatting)."""
    exc_info = event_dict.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    if isinstance(exc, BaseException):
        event_dict["exception"] = safe_traceback(exc)
    return event_dict


def _readable_plan(_logger: Any, _method: str, event_dict: Any) -> Any:
    """On the console, the plan's policies as `name=due` pairs (the plan's table says the
    rest), not the repr of a list of dicts that made a line of 600 characters."""
    policies = event_dict.get("policies")
    if isinstance(policies, list) and all(isinstance(p, dict) for p in policies):
        event_dict["policies"] = " ".join(f"{p.get('name')}={p.get('due_rows')}" for p in policies)
    return event_dict


def _escaped_values(_logger: Any, _method: str, event_dict: Any) -> Any:
    """On the console, every text value escaped (`printable.escaped`); the traceback line by
    line (its line breaks are the job's). Other values print as their repr, escaped."""
    for key, value in event_dict.items():
        if key == "exception" and isinstance(value, str):
            event_dict[key] = "\n".join(escaped(line) for line in value.split("\n"))
        elif isinstance(value, str):
            event_dict[key] = escaped(value)
    return event_dict


class _LibraryWarnings(logging.Handler):
    """The libraries' warnings (Python's `logging`) as the job's `library_warning` events:
    the logger, the level and the library's format string, never its arguments (they can
    hold the server's text); an exception as `safe_traceback`."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name, "message": str(record.msg)}
        if record.exc_info and record.exc_info[1] is not None:
            fields["exception"] = safe_traceback(record.exc_info[1])
        structlog.get_logger("dispatch_retention").warning(
            "library_warning", logged_as=record.levelname.lower(), **fields
        )


_LIBRARY_WARNINGS = _LibraryWarnings(logging.WARNING)
