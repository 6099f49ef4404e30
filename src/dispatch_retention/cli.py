"""The command line (CONTRACT section 5): parse, call one library function, map to an exit code.

Exit codes: 0 done (also a clean stop on a budget), 1 failed, 2 bad usage or configuration,
3 another run holds the lock, 4 refused by a guard, 5 verify found violations,
128 + signal number when stopped by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import click
from sqlalchemy import Engine

from . import config, db, job, logs, output
from .cleaner import Options, Outcome, Plan, Stop

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_REFUSED, EXIT_VIOLATIONS = 0, 1, 2, 3, 4, 5


class UsageProblem(click.ClickException):
    """A user mistake (configuration, URL): exit 2, one line, no traceback."""

    exit_code = EXIT_USAGE


class State:
    def __init__(self, config_path: str | None, database_url: str | None) -> None:
        self.config_path, self.database_url = config_path, database_url

    def settings(self) -> config.Settings:
        try:
            return config.load(self.config_path)
        except config.ConfigError as exc:
            raise UsageProblem(f"invalid configuration: {exc}") from None

    def engine(self) -> Engine:
        try:
            url = db.parse_url(db.resolve_url(self.database_url))
        except db.DatabaseUrlError as exc:
            raise UsageProblem(str(exc)) from None
        return db.make_engine(url)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    ctx.obj = State(config_path, database_url)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Show what is due; write nothing (READ ONLY).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal.")
@click.option("--force", is_flag=True, help="Proceed although guard.refuse_above_rows trips.")
@click.option("--chunk-size", type=click.IntRange(1, 1_000_000), help="Rows per chunk.")
@click.option("--max-rows", type=click.IntRange(1), help="Stop cleanly after this many rows.")
@click.option(
    "--max-runtime",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop cleanly after this long (the chunk in progress finishes).",
)
@click.pass_obj
def run(
    state: State,
    dry_run: bool,
    yes: bool,
    force: bool,
    chunk_size: int | None,
    max_rows: int | None,
    max_runtime: float | None,
) -> None:
    """Clean every dispatch that is due (see --dry-run first)."""
    settings, engine = state.settings(), state.engine()
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    options = Options(
        dry_run=dry_run, chunk_size=chunk_size, max_rows=max_rows, max_runtime_s=max_runtime
    )
    with _signals() as stop, _progress(interactive and not dry_run) as on_chunk:
        outcome = job.run(
            engine,
            settings,
            options,
            stop=stop,
            force=force,
            confirm=None if dry_run or yes or not interactive else _confirm,
            on_chunk=on_chunk,
        )
    engine.dispose()
    if outcome.plan is not None and dry_run:
        click.echo(output.plan_text(outcome.plan))
    elif outcome.status != "cancelled":
        click.echo(output.outcome_text(outcome))
    sys.exit(exit_code(outcome))


@cli.command()
@click.option("--rows", type=click.IntRange(1, 100_000_000), default=20_000, show_default=True)
@click.pass_obj
def demo(state: State, rows: int) -> None:
    """The whole cycle on an embedded PostgreSQL with synthetic dispatches."""
    from . import demo as demo_module

    settings = state.settings() if state.config_path else _bundled_settings()
    try:
        server = demo_module.embedded_server()
        url = server.__enter__()
    except demo_module.EmbeddedUnavailable as exc:
        raise UsageProblem(str(exc)) from None
    try:
        engine = db.make_engine(db.parse_url(url))
        click.echo(f"Seeding {rows} synthetic dispatches into an embedded PostgreSQL ...")
        total = demo_module.prepare(engine, settings, rows)
        click.echo(f"{total} dispatches in {settings.target.table}.\n")
        stop = Stop()
        planned = job.run(engine, settings, Options(dry_run=True), stop=stop)
        if planned.plan is None:
            sys.exit(exit_code(planned))
        click.echo("== dry run ==\n" + output.plan_text(planned.plan) + "\n")
        with _signals() as stop:
            outcome = job.run(engine, settings, Options(), stop=stop)
        click.echo("== run ==\n" + output.outcome_text(outcome) + "\n")
        again = job.run(engine, settings, Options(dry_run=True), stop=stop)
        if again.plan is not None:
            click.echo(f"== after the run: {again.plan.due_rows} dispatches still due ==")
        engine.dispose()
    finally:
        server.__exit__(None, None, None)
    sys.exit(exit_code(outcome))


def _bundled_settings() -> config.Settings:
    text = resources.files("dispatch_retention").joinpath("retention.toml").read_text("utf-8")
    return config.parse(text, "<bundled retention.toml>")


def exit_code(outcome: Outcome) -> int:
    if outcome.status == "interrupted" and outcome.signum:
        return 128 + outcome.signum
    return {
        "succeeded": EXIT_OK,
        "incomplete": EXIT_OK,
        "planned": EXIT_OK,
        "cancelled": EXIT_OK,
        "refused": EXIT_REFUSED,
        "locked": EXIT_LOCKED,
    }.get(outcome.status, EXIT_FAILED)


def _confirm(plan: Plan) -> bool:
    click.echo(output.plan_text(plan), err=True)
    return click.confirm(f"Clean {plan.due_rows} dispatches now?", default=False, err=True)


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


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    with click.progressbar(length=0, label="cleaning", file=sys.stderr) as bar:
        yield lambda chunk: bar.update(chunk.rows)


def main() -> None:
    cli(prog_name="dispatch-retention", auto_envvar_prefix=None)
