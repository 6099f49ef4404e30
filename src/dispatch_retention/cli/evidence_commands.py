"""`policy describe` (the retention schedule for the record of processing) and, with it, the
evidence a reviewer reads."""

from __future__ import annotations

import click

from dispatch_retention import render
from dispatch_retention.cli.root import State, cli
from dispatch_retention.rule import schedule


@cli.group("policy")
def policy_group() -> None:
    """The retention schedule the config sets."""


@policy_group.command("describe")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["markdown", "json", "csv"]),
    default="markdown",
    show_default=True,
    help="markdown: to paste into the record of processing (GDPR Art. 30).",
)
@click.pass_obj
def policy_describe(state: State, fmt: str) -> None:
    """Print the retention schedule: per policy what it applies to, its retention and grace,
    its legal basis and purpose; the columns stripped, and those kept with their reasons.
    Reads the config only (no database)."""
    settings = state.settings()
    found = schedule.schedule(settings)
    if fmt == "json":
        document = {"table": settings.target.table, "config_sha256": settings.sha256}
        click.echo(render.to_json({**document, **found.as_dict()}))
    elif fmt == "csv":
        click.echo(render.schedule_csv(found), nl=False)
    else:
        click.echo(render.schedule_markdown(found, settings.target.table, settings.sha256))
