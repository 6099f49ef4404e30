"""The console script's first code: catch SIGTERM / SIGINT before the heavy imports.

As PID 1 in a container a process ignores any signal it has no handler for, and importing
SQLAlchemy, psycopg and pydantic takes a few hundred milliseconds. So the handlers are
installed here first; a signal that arrives before the command is ready ends the process at
once with 128 + N, having touched nothing. Once the CLI is loaded, every command stops on a
signal the same way, except `run`, which installs its own handlers (stop after the chunk in
progress).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_pending: list[int] = []


def _early(signum: int, _frame: FrameType | None) -> None:
    _pending.append(signum)


def _stop_now(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _early)
    from .cli import main as cli_main

    if _pending:
        sys.exit(128 + _pending[0])
    for signum in SIGNALS:
        signal.signal(signum, _stop_now)
    cli_main()
