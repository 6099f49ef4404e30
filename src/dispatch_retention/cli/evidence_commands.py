"""The evidence a reviewer reads: `policy describe` (the retention schedule for the record of
processing) and `report` (the evidence for a compliance review, HTML or JSON)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from dispatch_retention import errors, files, render
from dispatch_retention.cli.params import MAX_TOLERANCE_HOURS, Bounded
from dispatch_retention.cli.root import State, cli
from dispatch_retention.pg import engines
from dispatch_retention.rule import schedule
from dispatch_retention.trail import migrate, rights


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


@cli.command("report")
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="First day of the period, YYYY-MM-DD (UTC) [default: 90 days before now].",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "json"]),
    default="html",
    show_default=True,
    help="html: one self-contained page; json: the same facts (the evidence pack).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report to FILE ({date} in it: the day, YYYY-MM-DD) and its SHA-256 to "
    "FILE.sha256 [default: stdout].",
)
@click.option(
    "--include-member-ids",
    is_flag=True,
    help="Show the member id of each legal hold (without it, hold ids only).",
)
@click.option(
    "--tolerance-hours",
    type=Bounded(0, MAX_TOLERANCE_HOURS),
    default=24,
    show_default=True,
    help="The check's tolerance, as verify's: rows whose window passed less than this long "
    "ago are left to the next run.",
)
@click.pass_obj
def report(
    state: State,
    since: datetime | None,
    fmt: str,
    output: Path | None,
    include_member_ids: bool,
    tolerance_hours: float,
) -> None:
    """Write the evidence for a compliance review: the schedule, a check now, the runs, the
    exceptions, the audit chain, where cleaned data may survive. Reads only (as the
    read-only role may); writes nothing to the database."""
    from dispatch_retention.checks import evidence
    from dispatch_retention.report import html

    settings, engine = state.settings(), state.engine()
    try:
        with engine.connect() as conn:
            rights.require(conn, settings, "read-only", "trail")
            migrate.require_current(conn, settings.audit.schema_)
            now = engines.database_now(conn)
        start = since.replace(tzinfo=UTC) if since else now - timedelta(days=90)
        if start > now:
            raise errors.UsageError(f"--since {start:%Y-%m-%d} is after today ({now:%Y-%m-%d})")
        options = evidence.Options(start, tolerance_hours, include_member_ids)
        pack = evidence.gather(engine, settings, options)
    finally:
        engine.dispose()
    body = (render.to_json(pack) + "\n") if fmt == "json" else html.render(pack)
    data = body.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    if output is None:
        click.echo(body, nl=False)
        click.echo(f"SHA-256 {digest}", err=True)
        return
    output = Path(str(output).replace("{date}", f"{pack['header']['generated_at']:%Y-%m-%d}"))
    kept = output.with_name(output.name + ".sha256")
    try:
        files.replace(output, data)
        files.replace(kept, f"{digest}  {output.name}\n".encode())  # as sha256sum writes it
    except OSError as exc:
        raise errors.ReportFileError(str(output), files.why(exc)) from None
    click.echo(f"wrote {output} ({len(data)} bytes), SHA-256 {digest} (also in {kept})")
