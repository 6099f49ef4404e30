"""What the job pushes to a Prometheus Pushgateway when `PUSHGATEWAY_URL` is set (or
`--pushgateway URL`), and the one place each metric's name and meaning are written: the
alert rules (`k8s/alerts/`) and their tests are generated from `METRICS`
(`k8s/alerts/generate.py`), so a renamed metric cannot leave an alert watching nothing.

- `run` (a real run, not a dry run), grouped by job, target (and shard): rows cleaned per
  policy, duration, due rows remaining, the last run's status, and the last success's time
  only when the run succeeded;
- `verify`, grouped by job, target and `command="verify"`: whether it passed, the rows past
  their window still holding data, and the last pass's time only when it passed;
- `audit verify`, grouped by job, target and `command="audit_verify"`: whether the chain
  checked out, and the last good check's time only when it did.

Each push uses POST (pushadd), which replaces only the metrics it sends, so a failed run
leaves the last success timestamp in place and an alert on its age keeps working; the
Pushgateway adds `push_time_seconds` to each group, which the staleness alert reads. A push
that fails is logged and never changes the command's outcome or exit code.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import time
import urllib.error
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

from dispatch_retention.vocabulary import Outcome, Status

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Gauge

log = structlog.get_logger("dispatch_retention")
JOB = "dispatch_retention"
URL_ENV = "PUSHGATEWAY_URL"
#: What a run can end as from its own point of view: the audit trail's final statuses
#: (`abandoned` is set by a later run, never pushed by the run itself) plus `locked`.
STATUSES = (*(s for s in Status.final() if s is not Status.ABANDONED), Status.LOCKED)

# The metrics' names (the alert rules take them from here).
ROWS_CLEANED = "dispatch_retention_rows_cleaned"
RUN_DURATION = "dispatch_retention_run_duration_seconds"
DUE_ROWS_REMAINING = "dispatch_retention_due_rows_remaining"
LAST_RUN_STATUS = "dispatch_retention_last_run_status"
LAST_SUCCESS = "dispatch_retention_last_success_timestamp_seconds"
VERIFY_OK = "dispatch_retention_verify_ok"
VERIFY_VIOLATIONS = "dispatch_retention_verify_violation_rows"
VERIFY_LAST_SUCCESS = "dispatch_retention_verify_last_success_timestamp_seconds"
CHAIN_OK = "dispatch_retention_audit_chain_ok"
CHAIN_LAST_SUCCESS = "dispatch_retention_audit_chain_last_success_timestamp_seconds"
#: the Pushgateway's own: when each group was last pushed
PUSH_TIME = "push_time_seconds"

#: Each metric's help text, as the Pushgateway shows it.
METRICS: Mapping[str, str] = {
    ROWS_CLEANED: "Dispatches cleaned by the last run, per binding policy.",
    RUN_DURATION: "Wall time of the last run.",
    DUE_ROWS_REMAINING: "Dispatches still due at the end of the last run, counted at its "
    "cutoffs (-1: not counted).",
    LAST_RUN_STATUS: "1 for the status the last run ended with, 0 for the others.",
    LAST_SUCCESS: "Unix time at which the last successful run finished.",
    VERIFY_OK: "1 when the last verify found nothing past its window (and, with --strict, "
    "no anomaly), else 0.",
    VERIFY_VIOLATIONS: "Dispatches past their window still holding personal data, as the "
    "last verify counted them.",
    VERIFY_LAST_SUCCESS: "Unix time at which the last passing verify finished.",
    CHAIN_OK: "1 when the last audit verify found the trail's hash chain intact, else 0.",
    CHAIN_LAST_SUCCESS: "Unix time at which the last passing audit verify finished.",
}


def _gauge(registry: CollectorRegistry, name: str, labels: tuple[str, ...] = ()) -> Gauge:
    from prometheus_client import Gauge

    return Gauge(name, METRICS[name], list(labels), registry=registry)


def registry_for(outcome: Outcome, duration_s: float) -> CollectorRegistry:
    # imported here: every run imports this module, few push (docs/performance.md)
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    cleaned = _gauge(registry, ROWS_CLEANED, ("policy",))
    names = [p.name for p in outcome.plan.policies] if outcome.plan else []
    for name in sorted({*names, *outcome.by_policy}):
        cleaned.labels(policy=name).set(outcome.by_policy.get(name, 0))
    _gauge(registry, RUN_DURATION).set(duration_s)
    remaining = outcome.remaining_due_rows
    _gauge(registry, DUE_ROWS_REMAINING).set(-1 if remaining is None else remaining)
    status = _gauge(registry, LAST_RUN_STATUS, ("status",))
    for name in STATUSES:
        status.labels(status=name).set(1 if outcome.status == name else 0)
    if outcome.status == Status.SUCCEEDED:
        _gauge(registry, LAST_SUCCESS).set(time.time())
    return registry


def check_registry(
    ok_name: str, success_name: str, ok: bool, counts: Mapping[str, int] | None = None
) -> CollectorRegistry:
    """A check's gauges: whether it passed, `counts` (name: value), and the time of the last
    pass only when it passed."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    _gauge(registry, ok_name).set(1 if ok else 0)
    for name, value in (counts or {}).items():
        _gauge(registry, name).set(value)
    if ok:
        _gauge(registry, success_name).set(time.time())
    return registry


def push(url: str, outcome: Outcome, duration_s: float, target: str, shard: str | None) -> bool:
    """A run's metrics (grouped by target and shard)."""
    grouping = {"target": target, **({"shard": shard.replace("/", "of")} if shard else {})}
    return push_registry(url, registry_for(outcome, duration_s), grouping, run_id=outcome.run_id)


def push_verify(url: str, ok: bool, violation_rows: int, target: str) -> bool:
    registry = check_registry(
        VERIFY_OK, VERIFY_LAST_SUCCESS, ok, {VERIFY_VIOLATIONS: violation_rows}
    )
    return push_registry(url, registry, {"target": target, "command": "verify"})


def push_chain(url: str, ok: bool, target: str) -> bool:
    registry = check_registry(CHAIN_OK, CHAIN_LAST_SUCCESS, ok)
    return push_registry(url, registry, {"target": target, "command": "audit_verify"})


def push_registry(
    url: str, registry: CollectorRegistry, grouping: dict[str, str], **context: str
) -> bool:
    """Push `registry` to the group `grouping` of job `JOB` (pushadd); False, logged, when the
    push failed."""
    from prometheus_client import pushadd_to_gateway

    try:
        pushadd_to_gateway(url, job=JOB, registry=registry, grouping_key=grouping, timeout=10)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # unreachable, a malformed URL (`http://[::1`), a gateway that answers no HTTP: the
        # command's outcome stands whatever the push does
        log.warning(
            "metrics_push_failed", **context, error=type(exc).__name__, reason=push_failure(exc)
        )
        return False
    log.info("metrics_pushed", **context)
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
