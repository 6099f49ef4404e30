"""`run` and `demo`: the job itself, with its prompt, progress bar and signals on a terminal."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from dispatch_retention import config, render
from dispatch_retention.cli import logs
from dispatch_retention.cli.params import MAX_RUNTIME_S, Bounded, ShardParam, Whole, shard_from_env
from dispatch_retention.cli.root import State, cli, pushgateway_option, table_or_json
from dispatch_retention.rule import shard
from dispatch_retention.rule.plans import Limits, Plan
from dispatch_retention.run import job
from dispatch_retention.vocabulary import Chunk, Hooks, Options, Request, Status, Stop, exit_code


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
    type=Whole(1, 1_000_000),
    help="At most N rows per chunk, fixed for this run (default: clean.chunk_size, adaptive).",
)
@click.option(
    "--max-rows", type=Whole(1, config.MAX_COUNT), help="Stop cleanly after this many rows."
)
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
    default=shard_from_env,
    show_default="from JOB_COMPLETION_INDEX/JOB_COMPLETIONS",
    help="Clean only shard I of N.",
)
@table_or_json
@pushgateway_option("the run's figures")
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
    fmt: str,
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
    if interactive:  # the plan, the bar and the outcome tell it; warnings still show
        logs.configure(state.log_format, level=logging.WARNING)

    def limits(plan: Plan) -> Limits:
        return Limits.of(plan.due_rows, settings.guard, options, force=force)

    with _signals() as stop, _progress(interactive and not dry_run, limits) as progress:
        hooks = Hooks(
            confirm=None if dry_run or yes or not interactive else _confirm(limits),
            on_plan=progress.start if progress else None,
            on_chunk=progress.advance if progress else None,
        )
        outcome = job.run(engine, settings, request, stop=stop, hooks=hooks)
    engine.dispose()
    plan_limits = limits(outcome.plan) if outcome.plan is not None else None
    if fmt == "json":
        doc = render.run_document(outcome, plan_limits, exit_code(outcome))
        click.echo(render.to_json(doc))
    elif outcome.plan is not None and dry_run:
        click.echo(render.plan_text(outcome.plan, plan_limits))
    elif outcome.status == Status.CANCELLED:
        click.echo(f"Run {outcome.run_id}: cancelled, nothing cleaned")
    else:
        click.echo(render.outcome_text(outcome))
    sys.exit(exit_code(outcome))


@cli.command()
@click.option(
    "--rows",
    type=Whole(1, 100_000_000),
    default=20_000,
    show_default=True,
    help="Synthetic dispatches to seed.",
)
@click.pass_obj
def demo(state: State, rows: int) -> None:
    """The whole cycle on an embedded PostgreSQL with synthetic dispatches."""
    from dispatch_retention.demo import cycle as demo_module

    settings = state.settings() if state.config_path else _bundled_settings()
    with _signals() as stop:
        outcome = demo_module.cycle(settings, rows, stop=stop, echo=click.echo)
    sys.exit(exit_code(outcome))


def _bundled_settings() -> config.Settings:
    from importlib import resources  # imported here: not on `run`'s path

    text = resources.files("dispatch_retention").joinpath("retention.toml").read_text("utf-8")
    return config.parse(text, "<bundled retention.toml>")


def _confirm(limits: Callable[[Plan], Limits]) -> Callable[[Plan], bool]:
    """Show the plan and ask, saying what will be cleaned (all, or up to a row budget); an
    end of input (Ctrl-D) is a no."""

    def confirm(plan: Plan) -> bool:
        bounds = limits(plan)
        click.echo(render.plan_text(plan, bounds), err=True)
        what = (
            f"{plan.due_rows} dispatches"
            if bounds.to_clean >= plan.due_rows
            else f"up to {bounds.to_clean} of {plan.due_rows} dispatches"
        )
        try:
            return click.confirm(f"Clean {what} now?", default=False, err=True)
        except click.Abort:
            click.echo("", err=True)
            return False

    return confirm


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
    """A progress bar on stderr, sized by what the run may clean (the plan's due rows, or a
    smaller row budget); only on a terminal."""

    def __init__(self, limits: Callable[[Plan], Limits]) -> None:
        self.bar: Any = None
        self.limits = limits

    def start(self, plan: Plan) -> None:
        self.bar = click.progressbar(
            length=max(self.limits(plan).to_clean, 1), label="cleaning", file=sys.stderr
        )
        self.bar.__enter__()

    def advance(self, chunk: Chunk) -> None:
        if self.bar is not None:
            self.bar.update(chunk.rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@contextmanager
def _progress(enabled: bool, limits: Callable[[Plan], Limits]) -> Iterator[_Progress | None]:
    if not enabled:
        yield None
        return
    progress = _Progress(limits)
    try:
        yield progress
    finally:
        progress.close()
