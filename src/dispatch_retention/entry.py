"""The console script's first code: catch SIGTERM / SIGINT before the heavy imports.

As PID 1 in a container a process ignores any signal it has no handler for, and importing
SQLAlchemy, psycopg and pydantic takes a while (docs/performance.md). So the handlers are
installed here first; a signal that arrives before the command is ready ends the process at
once with 128 + N, having touched nothing. The cyclic garbage collector is held off while
the modules load (they are kept for the life of the process anyway). Once the CLI is
loaded, every command stops on a signal the same way, except `run`, which installs its own
handlers (stop after the chunk in progress). An exception no command maps is printed as
`logs.safe_traceback` prints it (frames and classes, never its message).
"""

from __future__ import annotations

import gc
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
    # The imports create some 110,000 tracked objects that live as long as the process; the
    # cyclic collector would walk them again and again while they are made (its cost is in
    # docs/performance.md). So it waits until they exist, then leaves them alone for good.
    gc.disable()
    from dispatch_retention.cli.logs import safe_traceback
    from dispatch_retention.cli.main import main as cli_main

    # An exception no command maps (a bug) still ends the process with exit 1, but its
    # traceback names frames and exception classes only: its message may hold server text.
    sys.excepthook = lambda _kind, exc, _tb: print(safe_traceback(exc), file=sys.stderr)
    gc.freeze()
    gc.enable()
    if _pending:
        sys.exit(128 + _pending[0])
    for signum in SIGNALS:
        signal.signal(signum, _stop_now)
    cli_main()
