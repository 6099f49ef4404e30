"""`db upgrade`, `db check`, `db grants`: the job's own tables and the database it works on."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from dispatch_retention import render
from dispatch_retention.checks import db_grants
from dispatch_retention.cli.root import State, cli
from dispatch_retention.trail import migrate
from dispatch_retention.vocabulary import Exit

F = TypeVar("F", bound=Callable[..., Any])


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


def purpose_option(help_text: str) -> Callable[[F], F]:
    """`--purpose`: one of `db grants`' purposes (default run)."""
    return click.option(
        "--purpose",
        type=click.Choice(db_grants.PURPOSES),
        default="run",
        show_default=True,
        help=help_text,
    )


@db_group.command("check")
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 1 on warnings too (unacknowledged copy risks and unclassified columns among them).",
)
@purpose_option(
    "Check the role's rights against this purpose of `db grants` (a missing right is an "
    "error; only for run are rights beyond it named)."
)
@click.pass_obj
def check_command(state: State, strict: bool, purpose: db_grants.Purpose) -> None:
    """Check the table, its columns, copy risks, supporting index, autovacuum and the role's
    rights for PURPOSE."""
    from dispatch_retention.checks import db_check

    settings, engine = state.settings(), state.engine()
    with engine.connect() as conn, conn.begin():
        findings = db_check.check(conn, settings, purpose)
    engine.dispose()
    click.echo(render.findings(findings))
    worst = {f.level for f in findings}
    sys.exit(Exit.FAILED if "error" in worst or (strict and "warn" in worst) else Exit.OK)


@db_group.command("grants")
@click.option("--role", required=True, help="The role to grant to (a plain SQL name).")
@purpose_option(
    "run: the CronJob; read-only: verify, dry runs and the audit commands, which count "
    "personal data through a view and never read it; holds: placing legal holds; operator: "
    "a person's manual run (run's and read-only's rights); reclean: run --reclean (run's "
    "rights and SELECT on the personal columns).",
)
@click.pass_obj
def grants_command(state: State, role: str, purpose: db_grants.Purpose) -> None:
    """Print the SQL that gives ROLE exactly the rights the job needs (nothing is executed).
    read-only: the SQL also creates the audit schema's view the role counts through, and is
    run by the table's owner or an administrator. With a database URL, a superuser ROLE is
    refused too, and the view fits the table's column types."""
    settings = state.settings()
    db_grants.valid_role(role)  # refused before anything is asked
    if state.has_database_url():
        engine = state.engine()
        try:
            with engine.connect() as conn:
                db_grants.refuse_superuser(conn, role)
                settings = db_grants.fitted(conn, settings, purpose)
        finally:
            engine.dispose()
    click.echo(db_grants.printed(settings, role, purpose))
