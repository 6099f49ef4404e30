"""One run of the job from start to finish: plan, guard, confirm, clean, report.

`run()` never lets a database error escape as a traceback: every way a run ends is an
`Outcome` with a status (CONTRACT section 6) that the CLI maps to an exit code. Errors are
logged through `db.describe_error()`, which keeps row values (personal data) out of the log.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from . import db
from .cleaner import Chunk, Cleaner, Interrupted, Options, Outcome, Plan, Stop, make_plan
from .config import Settings

log = structlog.get_logger("dispatch_retention")


def run(
    engine: Engine,
    settings: Settings,
    options: Options,
    *,
    stop: Stop,
    force: bool = False,
    confirm: Callable[[Plan], bool] | None = None,
    on_chunk: Callable[[Chunk], None] | None = None,
    fail_in_chunk: Callable[[int], None] | None = None,
) -> Outcome:
    run_id = str(uuid.uuid4())
    rlog = log.bind(run_id=run_id)
    outcome = Outcome(run_id=run_id)
    rlog.info(
        "run_started",
        dry_run=options.dry_run,
        table=settings.target.table,
        config=settings.path,
        config_sha256=settings.sha256,
    )
    try:
        with stop.interruptible(), engine.connect() as conn, conn.begin():
            outcome.plan = plan = make_plan(conn, settings)
        rlog.info("plan", **plan.as_dict())
        if options.dry_run:
            outcome.status = "planned"
        elif _refused(settings, plan, force):
            outcome.status = "refused"
            outcome.error = (
                f"{plan.due_rows} due rows exceed guard.refuse_above_rows "
                f"({settings.guard.refuse_above_rows}); rerun with --force if this is intended"
            )
        elif confirm is not None and not _ask(confirm, plan, stop):
            outcome.status = "cancelled"
        else:
            Cleaner(
                engine,
                settings,
                plan,
                options=options,
                stop=stop,
                outcome=outcome,
                log=rlog,
                on_chunk=on_chunk,
                fail_in_chunk=fail_in_chunk,
            ).run()
    except Interrupted as exc:
        outcome.status, outcome.signum = "interrupted", exc.signum
    except DBAPIError as exc:
        outcome.status, outcome.error = "failed", db.describe_error(exc)
    except Exception as exc:  # a bug: fail loudly, with the traceback (never frame locals)
        outcome.status, outcome.error = "failed", f"internal error: {type(exc).__name__}"
        rlog.exception("internal_error")
    _report(rlog, outcome)
    return outcome


def _refused(settings: Settings, plan: Plan, force: bool) -> bool:
    limit = settings.guard.refuse_above_rows
    return bool(limit) and plan.due_rows > limit and not force


def _ask(confirm: Callable[[Plan], bool], plan: Plan, stop: Stop) -> bool:
    with stop.interruptible():
        return confirm(plan)


def _report(log: structlog.typing.FilteringBoundLogger, outcome: Outcome) -> None:
    fields = {
        "status": outcome.status,
        "rows_cleaned": outcome.rows_cleaned,
        "by_policy": dict(outcome.by_policy),
        "chunks": outcome.chunks,
        "remaining_due_rows": outcome.remaining_rows,
    }
    if outcome.stopped_by:
        fields["stopped_by"] = outcome.stopped_by
    if outcome.status == "failed":
        log.error("run_failed", error=outcome.error, **fields)
    elif outcome.status == "interrupted":
        log.warning("run_interrupted", signal=outcome.signum, **fields)
    elif outcome.status == "refused":
        log.error("run_finished", reason=outcome.error, **fields)
    else:
        log.info("run_finished", **fields)
