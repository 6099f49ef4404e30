"""Which database errors are worth a retry, and the bounded backoff (tenacity) around them.

Retryable (`diagnosis.is_transient`, `is_lock_timeout`, `is_statement_timeout`): a lost
connection or a server going away, and the server's own serialization failure, deadlock,
lock timeout and statement timeout. Everything else (a missing column, permission denied, a
constraint violation, a read-only standby) fails at once: no retry loop hides it. An error a
function raised is never retried, whatever its SQLSTATE: a trigger's `RAISE ... USING ERRCODE
= '08006'` is the trigger's error, not a lost connection. Whatever is retried is logged and
recorded by `diagnosis.describe_error` (condition and SQLSTATE), never with the server's text.

Retries stop after `clean.max_retries`, or as soon as the next backoff would end past the
run's deadline (`--max-runtime`): waiting is part of the runtime budget, so a run blocked
by a lock still ends within `max_runtime` plus one attempt (docs/operations.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)
from tenacity.stop import stop_base

from dispatch_retention.config import Clean
from dispatch_retention.errors import RetriesExhausted
from dispatch_retention.pg import diagnosis

T = TypeVar("T")


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and (
        diagnosis.is_lock_timeout(exc)
        or diagnosis.is_statement_timeout(exc)
        or diagnosis.is_transient(exc)
    )


def reason(exc: BaseException) -> str:
    if diagnosis.is_lock_timeout(exc):
        return "lock timeout: another session holds a lock on the table"
    if diagnosis.is_statement_timeout(exc):
        return "statement timeout"
    if diagnosis.is_connection_lost(exc):
        return "connection lost"
    return "serialization failure or deadlock"


class _Deadline(stop_base):
    """A tenacity stop condition: the next backoff would end past `at` (monotonic)."""

    def __init__(self, at: float | None) -> None:
        self.at, self.reached = at, False

    def __call__(self, state: RetryCallState) -> bool:
        if self.at is not None and time.monotonic() + (state.upcoming_sleep or 0) >= self.at:
            self.reached = True
        return self.reached


def call(
    fn: Callable[[], T],
    clean: Clean,
    what: str,
    *,
    sleep: Callable[[float], None],
    before_sleep: Callable[[RetryCallState], None] | None = None,
    deadline: float | None = None,
) -> T:
    """`fn()`, retried on a retryable error with bounded exponential backoff (`sleep` is
    the run's, so a stop signal ends the wait). A non-retryable error is raised as it is;
    when retries stop, `RetriesExhausted` says what failed, why, and what stopped them."""
    budget = _Deadline(deadline)
    retrying = Retrying(
        stop=stop_after_attempt(clean.max_retries + 1) | budget,
        wait=wait_exponential(multiplier=0.5, max=clean.retry_max_wait_s),
        retry=retry_if_exception(retryable),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
    try:
        return retrying(fn)
    except DBAPIError as exc:
        if not retryable(exc):
            raise
        attempts = retrying.statistics.get("attempt_number", 1)
        why = (
            "--max-runtime is spent"
            if budget.reached
            else f"gave up after {clean.max_retries + 1} attempts"
        )
        raise RetriesExhausted(
            f"{what}: {reason(exc)} ({diagnosis.describe_error(exc)}); {why}"
            + (f" (after {attempts} attempts)" if budget.reached else ""),
            lock_timeout=diagnosis.is_lock_timeout(exc),
        ) from None
