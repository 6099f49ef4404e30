"""`verify` and `audit list` / `audit show` / `audit verify`: what the trail and the table say."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from dispatch_retention import errors, metrics, render
from dispatch_retention.checks import heads
from dispatch_retention.cli.params import MAX_TOLERANCE_HOURS, Bounded, HashParam, RunIdParam, Whole
from dispatch_retention.cli.root import (
    State,
    audit_session,
    cli,
    pushgateway_option,
    table_or_json,
)
from dispatch_retention.trail import listing
from dispatch_retention.vocabulary import Exit


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
@pushgateway_option("whether it passed and the rows it found")
@click.pass_obj
def verify(
    state: State, fmt: str, tolerance_hours: float, strict: bool, pushgateway: str | None
) -> None:
    """Prove that nothing past its window still holds personal data (exit 5 if something does)."""
    from dispatch_retention.checks.verify import verify as check

    with audit_session(state, "read-only", "trail") as (conn, settings, tables), conn.begin():
        report = check(conn, settings, tables, tolerance_hours, strict=strict)
    click.echo(render.to_json(report.as_dict()) if fmt == "json" else render.verify_text(report))
    if pushgateway:
        metrics.push_verify(pushgateway, report.ok, report.violation_rows, settings.target.table)
    sys.exit(Exit.OK if report.ok else Exit.VIOLATIONS)


@cli.group("audit")
def audit_group() -> None:
    """Read the audit trail: what was cleaned, when, under which policy."""


@audit_group.command("list")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), help="YYYY-MM-DD (UTC).")
@click.option(
    "--limit",
    type=Whole(1, 100_000),
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
@click.option(
    "--wide",
    is_flag=True,
    help="The table with every column (finished_at, due, held, host, shard, version); "
    "without it, it fits 100 columns.",
)
@click.pass_obj
def audit_list(state: State, since: datetime | None, limit: int, fmt: str, wide: bool) -> None:
    """List runs, newest first."""
    since_utc = since.replace(tzinfo=UTC) if since else None
    with audit_session(state, "read-only", "trail") as (conn, _settings, tables):
        runs = listing.list_runs(conn, tables, since=since_utc, limit=limit)
    click.echo(render.runs(runs, fmt, wide=wide), nl=fmt != "csv")


@audit_group.command("show")
@click.argument("run_id", type=RunIdParam())
@table_or_json
@click.pass_obj
def audit_show(state: State, run_id: str, fmt: str) -> None:
    """Show one run: its status, config, policies with cutoffs and rows cleaned."""
    with audit_session(state, "read-only", "trail") as (conn, _settings, tables):
        document = listing.show_run(conn, tables, run_id)
    if document is None:
        raise errors.UsageError(f"no run {run_id} in the audit trail")  # exit 2, as bad input
    click.echo(render.to_json(document) if fmt == "json" else render.run_text(document))


@audit_group.command("verify")
@click.option(
    "--expect-head",
    type=HashParam(),
    help="A head an earlier `audit verify` (or a run's run_finished log line) printed: the "
    "chain must still hold it (exit 6 if it was cut back or rewritten).",
)
@click.option(
    "--head-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep the head in FILE: expect the head it holds (none yet: nothing expected) and, "
    "when the trail checks out, write the new one there (a CronJob's volume).",
)
@table_or_json
@pushgateway_option("whether the chain checked out")
@click.pass_obj
def audit_verify_command(
    state: State, expect_head: str | None, head_file: Path | None, fmt: str, pushgateway: str | None
) -> None:
    """Recompute the trail's hash chain and check the tables against it (exit 6 if broken)."""
    from dispatch_retention.checks.audit_verify import check

    if head_file is not None:
        if expect_head is not None:
            raise errors.HeadFileError(str(head_file), "give it or --expect-head, not both")
        expect_head = heads.read(head_file)
        if expect_head is None:  # a first check, or a file someone emptied: say so
            click.echo(f"no head kept in {head_file} yet: this check expects none", err=True)
    with audit_session(state, "read-only", "trail") as (conn, settings, tables), conn.begin():
        report = check(conn, settings, tables, expect_head)
    click.echo(render.to_json(report.as_dict()) if fmt == "json" else render.chain_text(report))
    if pushgateway:
        metrics.push_chain(pushgateway, report.ok, settings.target.table)
    if not report.ok:
        sys.exit(Exit.TAMPERED)
    if head_file is not None:
        heads.keep(head_file, report.head)
