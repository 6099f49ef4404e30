"""structlog set-up: JSON lines on stderr when not on a terminal, console output on one.

Tracebacks are rendered as plain text without frame locals: structlog's dict tracebacks and
rich's pretty tracebacks show local variables, which could hold row data.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

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
    ]
    renderer: structlog.types.Processor
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
