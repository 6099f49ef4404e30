"""Which database errors are worth a retry, and the bounded backoff (tenacity) around them.

Retryable: a lost connection or a server going away, a lock timeout, a statement timeout.
Everything else (a missing column, permission denied, a constraint violation, a read-only
standby) fails at once: no retry loop hides it.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.exc import DBAPIError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from . import db
from .config import Clean
from .errors import RetriesExhausted


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and (
        db.is_lock_timeout(exc) or db.is_statement_timeout(exc) or db.is_transient(exc)
    )


def reason(exc: BaseException) -> str:
    if db.is_lock_timeout(exc):
        return "lock timeout: another session holds a lock on the table"
    if db.is_statement_timeout(exc):
        return "statement timeout"
    return "connection lost"


def retrying(
    clean: Clean,
    *,
    sleep: Callable[[float], None],
    before_sleep: Callable[[RetryCallState], None],
) -> Retrying:
    return Retrying(
        stop=stop_after_attempt(clean.max_retries + 1),
        wait=wait_exponential(multiplier=0.5, max=clean.retry_max_wait_s),
        retry=retry_if_exception(retryable),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )


def exhausted(exc: DBAPIError, clean: Clean, what: str) -> RetriesExhausted:
    return RetriesExhausted(
        f"{what}: {reason(exc)} ({db.describe_error(exc)}); "
        f"gave up after {clean.max_retries + 1} attempts"
    )
