"""Push a run's figures to a Prometheus Pushgateway when `PUSHGATEWAY_URL` is set.

Pushed at the end of every real run (not dry runs), grouped by job and target (and shard):
rows cleaned per policy, duration, due rows remaining, the last run's status, and
`dispatch_retention_last_success_timestamp_seconds` only when the run succeeded. The push
uses POST (pushadd), which replaces only the metrics it sends, so a failed run leaves the
last success timestamp in place and an alert on its age keeps working. A push that fails is
logged and never changes the run's outcome or exit code.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import time
import urllib.error
from typing import TYPE_CHECKING

import structlog

from dispatch_retention.vocabulary import Outcome, Status

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = structlog.get_logger("dispatch_retention")
JOB = "dispatch_retention"
URL_ENV = "PUSHGATEWAY_URL"
#: What a run can end as from its own point of view: the audit trail's final statuses
#: (`abandoned` is set by a later run, never pushed by the run itself) plus `locked`.
STATUSES = (*(s for s in Status.final() if s is not Status.ABANDONED), Status.LOCKED)


def registry_for(outcome: Outcome, duration_s: float) -> CollectorRegistry:
    # imported here: every run imports this module, few push (docs/performance.md)
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    cleaned = Gauge(
        "dispatch_retention_rows_cleaned",
        "Dispatches cleaned by the last run, per binding policy.",
        ["policy"],
        registry=registry,
    )
    names = [p.name for p in outcome.plan.policies] if outcome.plan else []
    for name in sorted({*names, *outcome.by_policy}):
        cleaned.labels(policy=name).set(outcome.by_policy.get(name, 0))
    Gauge(
        "dispatch_retention_run_duration_seconds",
        "Wall time of the last run.",
        registry=registry,
    ).set(duration_s)
    remaining = outcome.remaining_due_rows
    Gauge(
        "dispatch_retention_due_rows_remaining",
        "Dispatches still due at the end of the last run, counted at its cutoffs (-1: not "
        "counted).",
        registry=registry,
    ).set(-1 if remaining is None else remaining)
    status = Gauge(
        "dispatch_retention_last_run_status",
        "1 for the status the last run ended with, 0 for the others.",
        ["status"],
        registry=registry,
    )
    for name in STATUSES:
        status.labels(status=name).set(1 if outcome.status == name else 0)
    if outcome.status == Status.SUCCEEDED:
        Gauge(
            "dispatch_retention_last_success_timestamp_seconds",
            "Unix time at which the last successful run finished.",
            registry=registry,
        ).set(time.time())
    return registry


def push(url: str, outcome: Outcome, duration_s: float, target: str, shard: str | None) -> bool:
    from prometheus_client import pushadd_to_gateway

    grouping = {"target": target, **({"shard": shard.replace("/", "of")} if shard else {})}
    try:
        pushadd_to_gateway(
            url,
            job=JOB,
            registry=registry_for(outcome, duration_s),
            grouping_key=grouping,
            timeout=10,
        )
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # unreachable, a malformed URL (`http://[::1`), a gateway that answers no HTTP: the
        # run's outcome stands whatever the push does
        log.warning(
            "metrics_push_failed",
            run_id=outcome.run_id,
            error=type(exc).__name__,
            reason=push_failure(exc),
        )
        return False
    log.info("metrics_pushed", run_id=outcome.run_id)
    return True


#: How prometheus_client words a gateway's answer of 400 or more, where urllib did not raise.
_STATUS = re.compile(r"^error talking to pushgateway: (\d{3})\b")

#: The job's words for what can stop a push, the most particular first.
_FAILURES: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "the connection was refused"),
    (TimeoutError, "the gateway did not answer in time"),
    (socket.gaierror, "the gateway's host name did not resolve"),
    (ssl.SSLError, "an SSL error"),
    (http.client.HTTPException, "the gateway's answer is not HTTP"),
    (ConnectionError, "the connection was lost"),
    (ValueError, "the URL is not one the job can push to"),
)


def push_failure(exc: BaseException) -> str:
    """Why a push failed, in the job's words: never the exception's text, which can quote
    the URL and the password in it."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"the gateway answered HTTP {exc.code}"
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, str):  # urllib's own words about the URL (an unknown scheme)
        return "the URL is not one the job can push to (http:// or https://)"
    for kind, words in _FAILURES:
        if isinstance(cause, kind):
            return words
    status = _STATUS.match(str(cause)) if type(cause) is OSError else None
    if status is not None:
        return f"the gateway answered HTTP {status[1]}"
    if isinstance(cause, OSError) and cause.errno:
        return f"the connection failed ({os.strerror(cause.errno)})"  # the system's words
    return f"{type(cause).__name__} (its text is not shown)"
