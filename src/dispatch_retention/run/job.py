"""One run of the job from start to finish: check, lock, record, plan, guard, confirm, clean.

`run()` never lets a database error escape as a traceback: every way a run ends is an
`Outcome` with a status (docs/auditor.md) that the CLI maps to an exit code. Errors are
logged through `diagnosis.describe_error()`, which keeps row values (personal data) out of the log.

Order of a real run: the audit schema must be current (else `SchemaNotReady`, exit 2) and
the target a table the job can see whole (`target.resolve`, else `TargetRefused`, exit 2;
from then on the target is named by its resolved schema and name); the advisory lock of
the target is taken on a dedicated connection (else status `locked`, exit 3, nothing
written); runs left `running` by a dead process are marked `abandoned`; the run
record is inserted; then plan, guard, confirmation and chunks; the record is closed last,
through a fresh connection. A dry run checks the schema and plans, in a READ ONLY
transaction, and writes nothing at all (no lock, no record).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from tenacity import RetryCallState

from dispatch_retention import errors, metrics
from dispatch_retention.catalog import risks, target
from dispatch_retention.config import Settings
from dispatch_retention.names import quoted_name
from dispatch_retention.pg import diagnosis, retry
from dispatch_retention.printable import shown_name
from dispatch_retention.rule import policy
from dispatch_retention.rule.plans import Limits, Plan
from dispatch_retention.rule.shard import Shard
from dispatch_retention.run import reclean, statements
from dispatch_retention.run.cleaner import Cleaner
from dispatch_retention.run.lock import RunLock, run_locks, with_holders
from dispatch_retention.run.planning import make_plan
from dispatch_retention.trail import migrate, rights, run_record
from dispatch_retention.trail.audit_tables import AuditTables
from dispatch_retention.vocabulary import (
    Hooks,
    Interrupted,
    Options,
    Outcome,
    Remaining,
    Request,
    Status,
    Stop,
)

log = structlog.get_logger("dispatch_retention")
Logger = structlog.typing.FilteringBoundLogger


def run(
    engine: Engine,
    settings: Settings,
    request: Request,
    *,
    stop: Stop,
    hooks: Hooks = Hooks(),  # noqa: B008 (frozen: one shared empty instance is fine)
) -> Outcome:
    """Run (or dry-run) the job once. Raises only `errors.UsageError` (nothing was
    touched); every other way it ends is an `Outcome`."""
    options, shard = request.options, request.shard
    outcome = Outcome()
    rlog = log.bind(run_id=outcome.run_id)
    tables = AuditTables(settings.audit.schema_)
    configured = settings.target.table  # the metrics' target label, as before resolving
    rlog.info(
        "run_started",
        dry_run=options.dry_run,
        shard=str(shard) if shard else None,
        table=settings.target.table,
        trigger=run_record.trigger(),
        config=settings.path,
        config_sha256=settings.sha256,
    )
    try:
        with engine.connect() as conn:
            # before anything is written: exit 2 naming the rights, not a 42501 later
            if options.dry_run:
                rights.require(conn, settings, "read-only", "plan")
            else:
                rights.require(conn, settings, "reclean" if options.reclean else "run")
            migrate.require_current(conn, tables.schema)
            settings = target.resolve_settings(conn, settings)
            if options.reclean and not options.dry_run:
                reclean.require_rights(conn, settings)
            _copy_risks(conn, settings, outcome, rlog)
            check_write_back = _checks_write_back(conn, settings, outcome, rlog)
        if options.dry_run:
            deadline = options.deadline(outcome.started)
            _plan(engine, settings, tables, outcome, stop, shard, deadline=deadline)
            outcome.status = Status.PLANNED
        else:
            _locked_run(
                engine,
                settings,
                tables,
                request,
                hooks,
                outcome,
                rlog,
                stop=stop,
                check_write_back=check_write_back,
            )
    except errors.UsageError:
        raise
    except (Interrupted, Exception) as exc:
        _ended_by(exc, outcome, rlog)
    _report(rlog, outcome)
    if request.pushgateway and not options.dry_run:
        duration = time.monotonic() - outcome.started
        metrics.push(
            request.pushgateway, outcome, duration, configured, str(shard) if shard else None
        )
    return outcome


def _plan(
    engine: Engine,
    settings: Settings,
    tables: AuditTables,
    outcome: Outcome,
    stop: Stop,
    shard: Shard | None,
    rules: policy.Rules | None = None,
    deadline: float | None = None,
) -> Plan:
    """The plan (`rules` None: cutoffs from the database clock), or with `rules` the end
    count at the run's own cutoffs; retried like a chunk, within the run's deadline."""

    def attempt() -> Plan:
        with stop.interruptible(), engine.connect() as conn, conn.begin():
            return make_plan(conn, settings, tables.holds, shard, rules)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "plan_retry",
            run_id=outcome.run_id,
            attempt=state.attempt_number,
            reason=retry.reason(exc) if exc else None,
            error=diagnosis.describe_error(exc) if exc else None,
        )

    what = "planning" if rules is None else "counting what is left"
    plan = retry.call(
        attempt,
        settings.clean,
        what,
        sleep=stop.sleep,
        before_sleep=before_sleep,
        deadline=deadline,
    )
    if rules is not None:
        log.info("recount", run_id=outcome.run_id, due_rows=plan.due_rows)
        return plan
    outcome.plan = plan
    log.info("plan", run_id=outcome.run_id, table=settings.target.table, **plan.as_dict())
    if not plan.through_indexes:
        log.warning(
            "policy_indexes_missing",
            run_id=outcome.run_id,
            hint="the plan does not read every policy's arm through its index, so the run "
            "reads the table to find due rows: `db check` prints the CREATE INDEX "
            "CONCURRENTLY statements, and once they are built a VACUUM (ANALYZE) of the table "
            "lets the planner use them",
        )
    return plan


def _locked_run(
    engine: Engine,
    settings: Settings,
    tables: AuditTables,
    request: Request,
    hooks: Hooks,
    outcome: Outcome,
    rlog: Logger,
    *,
    stop: Stop,
    check_write_back: bool,
) -> None:
    options, shard = request.options, request.shard
    shard_name = str(shard) if shard else None
    deadline = options.deadline(outcome.started)
    with RunLock(engine, run_locks(settings.target.table, shard_name)) as lock:
        if not lock.acquired:
            outcome.status = Status.LOCKED
            holders = lock.holder(quoted_name(tables.schema, "runs"))
            outcome.error = _locked_by(holders)
            rlog.warning("run_locked", holder=holders)
            return
        record = run_record.RunRecord(
            engine, tables, outcome.run_id, clean=settings.clean, stop=stop, deadline=deadline
        )
        abandoned = record.mark_abandoned(settings.target.table, shard_name)
        if abandoned:
            rlog.warning("runs_abandoned", run_ids=abandoned)
        record.start(settings, options, shard_name, outcome.copy_risks)
        try:
            plan = _plan(engine, settings, tables, outcome, stop, shard, deadline=deadline)
            record.planned(plan)
            if _refused(settings, plan, request.options, request.force):
                outcome.status = Status.REFUSED
                outcome.error = (
                    f"{plan.due_rows} due rows exceed guard.refuse_above_rows "
                    f"({settings.guard.refuse_above_rows}); rerun with --force if intended"
                )
            elif hooks.confirm is not None and not _ask(hooks.confirm, plan, stop):
                outcome.status = Status.CANCELLED
            else:
                if hooks.on_plan is not None:
                    hooks.on_plan(plan)
                Cleaner(
                    engine,
                    settings,
                    plan,
                    options=options,
                    stop=stop,
                    outcome=outcome,
                    log=rlog,
                    holds=tables.holds,
                    shard=shard,
                    recorder=record,
                    before_chunk=lambda: _keep(lock, settings, stop, rlog, deadline),
                    on_chunk=hooks.on_chunk,
                    fail_in_chunk=hooks.fail_in_chunk,
                    recount=lambda: _plan(
                        engine, settings, tables, outcome, stop, shard, plan.rules, deadline
                    ),
                    skipped_by=lambda: _skipping(engine, settings),
                    check_write_back=check_write_back,
                ).run()
                if options.reclean and outcome.status in (Status.SUCCEEDED, Status.INCOMPLETE):
                    reclean.Recleaner(
                        engine,
                        settings,
                        plan.rules,
                        outcome=outcome,
                        stop=stop,
                        size=options.chunk_size or settings.clean.chunk_size,
                        holds=tables.holds,
                        shard=shard,
                        recorder=record,
                        log=rlog,
                        before_chunk=lambda: _keep(lock, settings, stop, rlog, deadline),
                        skipped_by=lambda: _skipping(engine, settings),
                        deadline=deadline,
                    ).run()
                _risks_at_end(
                    engine,
                    settings,
                    tables,
                    outcome,
                    rlog,
                    checked=check_write_back,
                    stop=stop,
                    deadline=deadline,
                )
        except (Interrupted, Exception) as exc:
            if isinstance(exc, errors.RetriesExhausted):
                exc = with_holders(engine, settings.target.regclass, exc, rlog)
            _ended_by(exc, outcome, rlog)
        finally:
            _close(record, outcome, rlog)


def _keep(
    lock: RunLock, settings: Settings, stop: Stop, rlog: Logger, deadline: float | None
) -> None:
    """Before each chunk: the run lock is still ours (reconnecting through a server restart
    with the same bounded retries as a chunk)."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        rlog.warning(
            "lock_retry",
            attempt=state.attempt_number,
            error=diagnosis.describe_error(exc) if exc else None,
        )

    retry.call(
        lock.ensure,
        settings.clean,
        "keeping the run lock",
        sleep=stop.sleep,
        before_sleep=before_sleep,
        deadline=deadline,
    )


def _ended_by(exc: BaseException, outcome: Outcome, rlog: Logger) -> None:
    """The status an exception gives the run; a bug is logged with its traceback."""
    if isinstance(exc, Interrupted):
        outcome.status, outcome.signum = Status.INTERRUPTED, exc.signum
    elif isinstance(exc, errors.RunError):
        outcome.status, outcome.error = Status.FAILED, str(exc)
    elif isinstance(exc, DBAPIError):
        outcome.status, outcome.error = Status.FAILED, diagnosis.describe_error(exc)
    else:
        outcome.status, outcome.error = Status.FAILED, f"internal error: {type(exc).__name__}"
        rlog.error("internal_error", exc_info=exc)


def _locked_by(holders: list[dict[str, Any]]) -> str:
    """Why the run is locked out: another run, or (the lock's key is computable) a session
    of a role that may not run the job, named with its pid, so that it can be ended."""
    named = ", ".join(f"role {h['usename']} (pid {h['pid']})" for h in holders)
    if not holders:  # released between the try and the look
        return "another run holds the lock of this target"
    if any(h["may_run"] for h in holders):
        return f"another run holds the lock of this target: {named}"
    return (
        f"the lock of this target is held by {named}, which may not run the job: not another "
        "run; end that session (SELECT pg_terminate_backend(PID)) and find who took the "
        "lock's key"
    )


def _close(record: run_record.RunRecord, outcome: Outcome, rlog: Logger) -> None:
    if outcome.status == Status.RUNNING:  # never leave a record open on a path we did not foresee
        outcome.status, outcome.error = Status.FAILED, "the run ended without a status"
    try:
        if record.status() == Status.ABANDONED:  # another run took the lock while we lived
            rlog.error("run_record_taken_over", status=outcome.status)
            # out of abandoned the trail takes only a failure (migration 0008)
            if outcome.status not in (Status.FAILED, Status.INTERRUPTED):
                outcome.status = Status.FAILED
                outcome.error = (
                    "lost the run lock: another run took it and marked this one abandoned"
                )
        record.finish(outcome, outcome.copy_risks_at_end)
    except (DBAPIError, errors.RetriesExhausted) as exc:
        error = _described(exc)
        rlog.error("run_record_failed", error=error)
        if outcome.status in (Status.SUCCEEDED, Status.INCOMPLETE):
            outcome.status = Status.FAILED
            outcome.error = "could not close the run record: " + error
        return
    try:
        outcome.chain_head = record.chain_head()
    except (DBAPIError, errors.RetriesExhausted) as exc:  # the record is closed: say so, go on
        rlog.warning("chain_head_unread", error=_described(exc))


def _described(exc: DBAPIError | errors.RetriesExhausted) -> str:
    return diagnosis.describe_error(exc) if isinstance(exc, DBAPIError) else str(exc)


def _copy_risks(conn: Connection, settings: Settings, outcome: Outcome, rlog: Logger) -> None:
    """Log each place the cleaning UPDATE may copy personal data to or write it back from
    (`risks.copy_risks`), once per run; the run record keeps them (`Outcome.copy_risks`)."""
    outcome.copy_risks = risks.copy_risks(conn, settings)
    for risk in outcome.copy_risks:
        if risk.acknowledged is None:
            rlog.warning("copy_risk", **risk.as_dict(), hint="review it; `db check` explains")
        else:
            rlog.info("copy_risk", **risk.as_dict())


def _checks_write_back(
    conn: Connection, settings: Settings, outcome: Outcome, rlog: Logger
) -> bool:
    """Whether chunks check that what they cleaned holds no personal data (a trigger or
    rule fires on UPDATE, and the role may read the personal columns); where it cannot,
    say so once: `verify` is then where written-back rows show."""
    if not risks.updating(outcome.copy_risks):
        return False
    unreadable = target.unreadable_columns(conn, settings)
    if unreadable:
        rlog.warning(
            "write_back_unchecked",
            columns=unreadable,
            hint="a trigger or rule fires on UPDATE and this role may not read these columns, "
            "so the run cannot see personal data written back: `verify` reports it "
            "(written_back_rows)",
        )
    return not unreadable


def _risks_at_end(
    engine: Engine,
    settings: Settings,
    tables: AuditTables,
    outcome: Outcome,
    rlog: Logger,
    *,
    checked: bool,
    stop: Stop,
    deadline: float | None,
) -> None:
    """After the walk: read the copy risks again. One that appeared while the run ran is
    logged (`copy_risk`, `appeared_during_run`), and the record, whose `copy_risks` are what
    the run started with, keeps what was read now (`copy_risks_at_end`) and says so: a run
    that would have ended `succeeded` or `incomplete` ends `incomplete`
    (`copy_risks_appeared`) naming it. Where one can write back and the chunks were not
    checked, the rows of the run's windows are checked now (a role that may read the
    personal columns): any holding personal data fails the run."""

    def read() -> tuple[list[risks.Risk], list[str]]:
        with engine.connect() as conn:
            return risks.copy_risks(conn, settings), target.unreadable_columns(conn, settings)

    found, unreadable = retry.call(
        read, settings.clean, "reading the copy risks again", sleep=stop.sleep, deadline=deadline
    )
    outcome.copy_risks_at_end = found
    appeared = [r for r in found if r not in outcome.copy_risks]
    for risk in appeared:
        rlog.warning(
            "copy_risk",
            **risk.as_dict(),
            appeared_during_run=True,
            hint="created while the run ran: not in its record's copy_risks; `db check` explains",
        )
    if not appeared or outcome.status not in (Status.SUCCEEDED, Status.INCOMPLETE):
        return
    named = ", ".join(f"{r.kind} {shown_name(r.name)}" for r in appeared)  # catalog names
    unchecked = bool(risks.updating(appeared)) and not checked
    if unchecked and not unreadable and (outcome.rows_cleaned or outcome.rows_recleaned):
        check = statements.written_back_in_run(settings, tables.chunks, outcome.run_id)

        def count() -> int:
            with engine.connect() as conn:
                return int(conn.execute(check).scalar_one())

        again = retry.call(
            count, settings.clean, "checking the run's rows", sleep=stop.sleep, deadline=deadline
        )
        if again:
            outcome.written_back_rows += again
            outcome.status = Status.FAILED
            outcome.error = (
                f"{again} cleaned rows in the windows of this run's chunks held personal data "
                f"again at its end: a trigger or rule that appeared during the run writes it "
                f"back ({named}); `run --reclean` strips them again once that is fixed; "
                "`db check` lists them"
            )
            rlog.error("rows_written_back", rows=again, on_update=named, after_commit=True)
            return
    if unchecked and unreadable:
        rlog.warning(
            "write_back_unchecked",
            columns=unreadable,
            hint="a trigger or rule on UPDATE appeared during the run and this role may not "
            "read these columns: `verify` reports personal data written back "
            "(written_back_rows)",
        )
    reasons = [outcome.remaining_reason] if outcome.remaining_reason else []
    outcome.status = Status.INCOMPLETE
    outcome.remaining_reason = ",".join([*reasons, Remaining.COPY_RISKS_APPEARED.value])
    appeared_text = (
        f"copy risks appeared during the run, which its record's copy_risks do not list: "
        f"{named}; the next run records them (`db check` lists them)"
    )
    outcome.error = f"{outcome.error}; {appeared_text}" if outcome.error else appeared_text


def _skipping(engine: Engine, settings: Settings) -> str:
    """What can leave a row of the cleaning UPDATE as it was, or write personal data back
    into it (`risks.updating`), read from the catalog now: one may have come since the
    run began."""
    with engine.connect() as conn:
        found = risks.updating(risks.copy_risks(conn, settings))
    named = (f"{r.kind} {shown_name(r.name)}" for r in found)  # catalog names: escaped
    return ", ".join(named) or "none found in the catalog"


def _refused(settings: Settings, plan: Plan, options: Options, force: bool) -> bool:
    return Limits.of(plan.due_rows, settings.guard, options, force=force).refused


def _ask(confirm: Callable[[Plan], bool], plan: Plan, stop: Stop) -> bool:
    with stop.interruptible():
        return confirm(plan)


#: What `run_finished` says only when the run has it (not zero, not empty).
REPORTED_WHEN_SET = (
    "rows_recleaned",
    "missed_rows",
    "written_back_rows",
    "stopped_by",
    "remaining_reason",
    "chain_head",
    "replica_wait_s",
)


def _report(rlog: Logger, outcome: Outcome) -> None:
    fields = {
        "status": outcome.status,
        "rows_cleaned": outcome.rows_cleaned,
        "by_policy": dict(outcome.by_policy),
        "chunks": outcome.chunks,
        "remaining_due_rows": outcome.remaining_due_rows,
    }
    fields |= {name: value for name in REPORTED_WHEN_SET if (value := getattr(outcome, name))}
    if outcome.status == Status.FAILED:
        rlog.error("run_failed", error=outcome.error, **fields)
    elif outcome.status == Status.INTERRUPTED:
        rlog.warning("run_interrupted", signal=outcome.signum, **fields)
    elif outcome.status in (Status.REFUSED, Status.LOCKED):
        rlog.error("run_finished", reason=outcome.error, **fields)
    elif outcome.error:  # incomplete, and why besides the count (copy_risks_appeared)
        rlog.warning("run_finished", reason=outcome.error, **fields)
    else:
        rlog.info("run_finished", **fields)
