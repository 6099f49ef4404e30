"""The command line (README "Command line"): parse, call one library function, map to an exit code.

Exit codes: 0 done (also a clean stop on a budget), 1 failed, 2 bad usage or configuration,
3 another run holds the lock, 4 refused by a guard, 5 verify found violations,
128 + signal number when stopped by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import (
    audit,
    config,
    db,
    errors,
    grants,
    holds,
    job,
    logs,
    migrate,
    output,
    shard,
)
from .planning import Plan
from .schema import AuditTables
from .vocabulary import Chunk, Exit, Hooks, Options, Request, Status, Stop, exit_code


class UsageProblem(click.ClickException):
    """A user mistake (configuration, URL, target): exit 2, one line, no traceback."""

    exit_code = Exit.USAGE


class Commands(click.Group):
    """The root group: the one place an error of the job's becomes an exit code (as
    Alembic's CLI turns its `CommandError` into one). `errors.UsageError` exits 2,
    `errors.RunError` and a database error exit 1, each as one line without a traceback; a
    database error is reduced to its SQLSTATE and object names (`db.describe_error`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.UsageError as exc:
            raise UsageProblem(exc.for_user()) from None
        except errors.RunError as exc:
            raise click.ClickException(exc.for_user()) from None
        except DBAPIError as exc:
            raise click.ClickException(f"database error: {db.describe_error(exc)}") from None


class ShardParam(click.ParamType[shard.Shard | None]):
    """`I/N` (0 <= I < N <= 1024): a `shard.Shard`."""

    name = "I/N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, shard.Shard):
            return value
        try:
            return shard.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class RunIdParam(click.ParamType[str]):
    """A run id as `audit list` shows it (a UUID), in its canonical form."""

    name = "RUN_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            self.fail("not a run id (a UUID, as `audit list` shows)", param, ctx)


#: --max-runtime at most a week; --tolerance-hours at most ten years (anything more is a typo)
MAX_RUNTIME_S, MAX_TOLERANCE_HOURS = 7 * 24 * 3600.0, 10 * 365 * 24.0


class Bounded(click.ParamType[float]):
    """A finite number in (low, high] (or [low, high] with `allow_min`): never nan or inf."""

    name = "number"

    def __init__(self, low: float, high: float, *, allow_min: bool = False) -> None:
        self.low, self.high, self.allow_min = low, high, allow_min

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        above = number >= self.low if self.allow_min else number > self.low
        if not (math.isfinite(number) and above and number <= self.high):
            bound = "from" if self.allow_min else "above"
            self.fail(
                f"{value!r}: give a number {bound} {self.low:g} up to {self.high:g}", param, ctx
            )
        return number


def _shard_from_env() -> shard.Shard | None:
    """The default of `--shard`: a Kubernetes Indexed Job's own index and count."""
    try:
        return shard.from_env(os.environ)
    except ValueError as exc:
        raise click.BadParameter(
            f"{exc} (from JOB_COMPLETION_INDEX/JOB_COMPLETIONS)", param_hint="--shard"
        ) from None


class State:
    def __init__(
        self, config_path: str | None, database_url: str | None, log_format: Any = None
    ) -> None:
        self.config_path, self.database_url = config_path, database_url
        self.log_format = log_format

    def settings(self) -> config.Settings:
        return config.load(self.config_path)

    def engine(self) -> Engine:
        return db.make_engine(db.parse_url(db.resolve_url(self.database_url)))


table_or_json = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format (json: one document).",
)


@contextmanager
def _audit_session(
    state: State, *, write: bool = False
) -> Iterator[tuple[Connection, config.Settings, AuditTables]]:
    """Settings, a checked audit schema and one connection (one transaction if `write`)."""
    settings, engine = state.settings(), state.engine()
    try:
        with engine.connect() as conn:
            migrate.require_current(conn, settings.audit.schema_)
        with engine.begin() if write else engine.connect() as conn:
            yield conn, settings, AuditTables(settings.audit.schema_)
    finally:
        engine.dispose()


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file [default: $DISPATCH_RETENTION_CONFIG, else config/retention.toml].",
)
@click.option(
    "--database-url",
    help="postgresql:// URL [default: $DATABASE_URL, else the file named by $DATABASE_URL_FILE].",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "console"]),
    help="Log format on stderr [default: console on a terminal, else json].",
)
@click.version_option(package_name="dispatch-retention")
@click.pass_context
def cli(
    ctx: click.Context, config_path: str | None, database_url: str | None, log_format: Any
) -> None:
    """Strip personal data from Messaging API dispatches past their retention window."""
    logs.configure(log_format)
    ctx.obj = State(config_path, database_url, log_format)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Show what is due; write nothing (READ ONLY).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal.")
@click.option("--force", is_flag=True, help="Proceed although guard.refuse_above_rows trips.")
@click.option(
    "--reclean",
    is_flag=True,
    help="Also strip again cleaned rows whose personal data was written back (verify's "
    "written_back_rows); needs SELECT on the personal columns.",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(1, 1_000_000),
    help="At most N rows per chunk, fixed for this run (default: clean.chunk_size, adaptive).",
)
@click.option("--max-rows", type=click.IntRange(1), help="Stop cleanly after this many rows.")
@click.option(
    "--max-runtime",
    type=Bounded(0, MAX_RUNTIME_S),
    metavar="SECONDS",
    help="Stop cleanly after this long (the chunk in progress finishes).",
)
@click.option(
    "--shard",
    "chosen",
    type=ShardParam(),
    default=_shard_from_env,
    show_default="from JOB_COMPLETION_INDEX/JOB_COMPLETIONS",
    help="Clean only shard I of N.",
)
@click.option(
    "--pushgateway",
    metavar="URL",
    envvar="PUSHGATEWAY_URL",
    help="Push the run's figures to this Prometheus Pushgateway [default: $PUSHGATEWAY_URL].",
)
@click.pass_obj
def run(
    state: State,
    dry_run: bool,
    yes: bool,
    force: bool,
    reclean: bool,
    chunk_size: int | None,
    max_rows: int | None,
    max_runtime: float | None,
    chosen: shard.Shard | None,
    pushgateway: str | None,
) -> None:
    """Clean every dispatch that is due (see --dry-run first)."""
    settings, engine = state.settings(), state.engine()
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    options = Options(
        dry_run=dry_run,
        reclean=reclean,
        chunk_size=chunk_size,
        max_rows=max_rows,
        max_runtime_s=max_runtime,
    )
    request = Request(options, force=force, shard=chosen, pushgateway=pushgateway)
    if interactive and not dry_run:  # the bar and the outcome tell it; warnings still show
        logs.configure(state.log_format, level=logging.WARNING)
    with _signals() as stop, _progress(interactive and not dry_run) as progress:
        hooks = Hooks(
            confirm=None if dry_run or yes or not interactive else _confirm,
            on_plan=progress.start if progress else None,
            on_chunk=progress.advance if progress else None,
        )
        outcome = job.run(engine, settings, request, stop=stop, hooks=hooks)
    engine.dispose()
    if outcome.plan is not None and dry_run:
        click.echo(output.plan_text(outcome.plan))
    elif outcome.status == Status.CANCELLED:
        click.echo(f"Run {outcome.run_id}: cancelled, nothing cleaned")
    else:
        click.echo(output.outcome_text(outcome))
    sys.exit(exit_code(outcome))


@cli.command()
@click.option(
    "--rows",
    type=click.IntRange(1, 100_000_000),
    default=20_000,
    show_default=True,
    help="Synthetic dispatches to seed.",
)
@click.pass_obj
def demo(state: State, rows: int) -> None:
    """The whole cycle on an embedded PostgreSQL with synthetic dispatches."""
    from . import demo as demo_module

    settings = state.settings() if state.config_path else _bundled_settings()
    with _signals() as stop:
        outcome = demo_module.cycle(settings, rows, stop=stop, echo=click.echo)
    sys.exit(exit_code(outcome))


@cli.command()
@table_or_json
@click.option(
    "--tolerance-hours",
    type=Bounded(0, MAX_TOLERANCE_HOURS, allow_min=True),
    default=0,
    show_default=True,
    help="Allow rows whose window passed less than this long ago (the time between runs).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Count anomalies (undatable, future-scheduled and written-back rows) as violations: "
    "exit 5 when there is any.",
)
@click.pass_obj
def verify(state: State, fmt: str, tolerance_hours: float, strict: bool) -> None:
    """Prove that nothing past its window still holds personal data (exit 5 if something does)."""
    from .verify import verify as check

    with _audit_session(state) as (conn, settings, tables), conn.begin():
        report = check(conn, settings, tables, tolerance_hours, strict=strict)
    click.echo(output.to_json(report.as_dict()) if fmt == "json" else output.verify_text(report))
    sys.exit(Exit.OK if report.ok else Exit.VIOLATIONS)


@cli.group("audit")
def audit_group() -> None:
    """Read the audit trail: what was cleaned, when, under which policy."""


@audit_group.command("list")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), help="YYYY-MM-DD (UTC).")
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=50,
    show_default=True,
    help="At most this many runs.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Output format (csv opens in a spreadsheet).",
)
@click.pass_obj
def audit_list(state: State, since: datetime | None, limit: int, fmt: str) -> None:
    """List runs, newest first."""
    since_utc = since.replace(tzinfo=UTC) if since else None
    with _audit_session(state) as (conn, _settings, tables):
        runs = audit.list_runs(conn, tables, since=since_utc, limit=limit)
    click.echo(output.runs(runs, fmt), nl=fmt != "csv")


@audit_group.command("show")
@click.argument("run_id", type=RunIdParam())
@table_or_json
@click.pass_obj
def audit_show(state: State, run_id: str, fmt: str) -> None:
    """Show one run: its status, config, policies with cutoffs and rows cleaned."""
    with _audit_session(state) as (conn, _settings, tables):
        document = audit.show_run(conn, tables, run_id)
    if document is None:
        raise click.ClickException(f"no run {run_id} in the audit trail")
    click.echo(output.to_json(document) if fmt == "json" else output.run_text(document))


@cli.group("hold")
def hold_group() -> None:
    """Legal holds: exempt every dispatch of a member from cleaning until released."""


@hold_group.command("add")
@click.argument("member_id", type=click.IntRange(min=0, max=2**63 - 1))
@click.option("--reason", required=True, help="Why (a case number, not personal data).")
@click.option("--by", default=None, help="Who asks for it [default: OS user@host].")
@click.pass_obj
def hold_add(state: State, member_id: int, reason: str, by: str | None) -> None:
    """Put a member's dispatches under legal hold."""
    with _audit_session(state, write=True) as (conn, _settings, tables):
        hold_id = holds.add(conn, tables, member_id, reason, by or holds.operator())
    click.echo(f"hold {hold_id}: member {member_id} is under legal hold")


@hold_group.command("release")
@click.argument("member_id", type=click.IntRange(min=0, max=2**63 - 1))
@click.option("--by", default=None, help="Who releases it [default: OS user@host].")
@click.pass_obj
def hold_release(state: State, member_id: int, by: str | None) -> None:
    """Release a member's active hold (the hold is kept, stamped released_at)."""
    with _audit_session(state, write=True) as (conn, _settings, tables):
        hold_id = holds.release(conn, tables, member_id, by or holds.operator())
    click.echo(f"hold {hold_id}: member {member_id} released")


@hold_group.command("list")
@click.option("--all", "include_released", is_flag=True, help="Include released holds.")
@table_or_json
@click.pass_obj
def hold_list(state: State, include_released: bool, fmt: str) -> None:
    """List active legal holds (with --all, released ones too)."""
    with _audit_session(state) as (conn, _settings, tables):
        found = holds.list_holds(conn, tables, include_released=include_released)
    click.echo(output.holds(found, fmt))


@cli.group("db")
def db_group() -> None:
    """The job's own tables and the database it works on."""


@db_group.command("upgrade")
@click.pass_obj
def db_upgrade(state: State) -> None:
    """Create or migrate the job's own tables (needs a role that may create them)."""
    settings, engine = state.settings(), state.engine()
    before, after = migrate.upgrade(engine, settings.audit.schema_)
    engine.dispose()
    schema = settings.audit.schema_
    if before == after:
        click.echo(f"audit schema {schema!r} is up to date (revision {after})")
    else:
        click.echo(f"audit schema {schema!r} migrated from {before or 'nothing'} to {after}")


@db_group.command("check")
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 1 on warnings too (unacknowledged copy risks and unclassified columns among them).",
)
@click.pass_obj
def db_check(state: State, strict: bool) -> None:
    """Check the table, its columns, copy risks, supporting index, autovacuum and the role's
    rights."""
    from . import doctor

    settings, engine = state.settings(), state.engine()
    with engine.connect() as conn, conn.begin():
        findings = doctor.check(conn, settings)
    engine.dispose()
    click.echo(output.findings(findings))
    worst = {f.level for f in findings}
    sys.exit(Exit.FAILED if "error" in worst or (strict and "warn" in worst) else Exit.OK)


@db_group.command("grants")
@click.option("--role", required=True, help="The role to grant to (a plain SQL name).")
@click.option(
    "--purpose",
    type=click.Choice(grants.PURPOSES),
    default="run",
    show_default=True,
    help="run: the CronJob; read-only: verify and dry runs; holds: placing legal holds.",
)
@click.pass_obj
def db_grants(state: State, role: str, purpose: grants.Purpose) -> None:
    """Print the SQL that gives ROLE exactly the rights the job needs (nothing is executed)."""
    settings = state.settings()
    try:
        click.echo("\n".join(grants.statements(settings, role, purpose)))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--role") from None


def _bundled_settings() -> config.Settings:
    from importlib import resources  # not on `run`'s path: 16 ms of start-up

    text = resources.files("dispatch_retention").joinpath("retention.toml").read_text("utf-8")
    return config.parse(text, "<bundled retention.toml>")


def _confirm(plan: Plan) -> bool:
    """Show the plan and ask; an end of input (Ctrl-D) is a no."""
    click.echo(output.plan_text(plan), err=True)
    try:
        return click.confirm(f"Clean {plan.due_rows} dispatches now?", default=False, err=True)
    except click.Abort:
        click.echo("", err=True)
        return False


@contextmanager
def _signals() -> Iterator[Stop]:
    """SIGTERM and SIGINT ask the run to stop after the chunk in progress."""
    stop = Stop()
    previous = {
        signum: signal.signal(signum, lambda n, _f: stop.request(n))
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Progress:
    """A progress bar on stderr, sized by the plan; only on a terminal."""

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, plan: Plan) -> None:
        self.bar = click.progressbar(
            length=max(plan.due_rows, 1), label="cleaning", file=sys.stderr
        )
        self.bar.__enter__()

    def advance(self, chunk: Chunk) -> None:
        if self.bar is not None:
            self.bar.update(chunk.rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@contextmanager
def _progress(enabled: bool) -> Iterator[_Progress | None]:
    if not enabled:
        yield None
        return
    progress = _Progress()
    try:
        yield progress
    finally:
        progress.close()


def main() -> None:
    cli(prog_name="dispatch-retention", auto_envvar_prefix=None)
