"""The root group of the command line: its options, its state, and the one place errors
become exit codes (`Commands`). The command modules import it to register on it; `main`
puts them together.

Exit codes: 0 done (also a clean stop on a budget), 1 failed, 2 bad usage or configuration,
3 another run holds the lock, 4 refused by a guard, 5 verify found violations, 6 audit verify
found the audit trail changed, 128 + signal number when stopped by SIGINT (130) or SIGTERM
(143).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from dispatch_retention import config, errors, metrics
from dispatch_retention.cli import logs
from dispatch_retention.pg import diagnosis, engines
from dispatch_retention.printable import escaped
from dispatch_retention.trail import migrate, rights
from dispatch_retention.trail.audit_tables import AuditTables
from dispatch_retention.vocabulary import Exit


class UsageProblem(click.ClickException):
    """A user mistake (configuration, URL, target): exit 2, one line, no traceback."""

    exit_code = Exit.USAGE


class Commands(click.Group):
    """The root group: the one place an error of the job's becomes an exit code (as
    Alembic's CLI turns its `CommandError` into one). `errors.UsageError` exits 2,
    `errors.RunError` and a database error exit 1, each as one line without a traceback
    (escaped: a message can name what a file or the catalog holds); a database error is
    reduced to its SQLSTATE and object names (`diagnosis.describe_error`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.UsageError as exc:
            raise UsageProblem(escaped(exc.for_user())) from None
        except errors.RunError as exc:
            raise click.ClickException(escaped(exc.for_user())) from None
        except DBAPIError as exc:
            raise click.ClickException(f"database error: {diagnosis.describe_error(exc)}") from None


class State:
    def __init__(
        self, config_path: str | None, database_url: str | None, log_format: Any = None
    ) -> None:
        self.config_path, self.database_url = config_path, database_url
        self.log_format = log_format

    def settings(self) -> config.Settings:
        return config.load(self.config_path)

    def has_database_url(self) -> bool:
        """Whether a database URL was given (option or environment), so one may be asked."""
        return self.database_url is not None or engines.url_configured()

    def engine(self) -> Engine:
        return engines.make_engine(engines.parse_url(engines.resolve_url(self.database_url)))


FC = TypeVar("FC", bound=Callable[..., Any])

table_or_json = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format (json: one document).",
)


def pushgateway_option(what: str) -> Callable[[FC], FC]:
    """`--pushgateway URL` (default $PUSHGATEWAY_URL): push `what` to that Pushgateway."""
    return click.option(
        "--pushgateway",
        metavar="URL",
        envvar=metrics.URL_ENV,
        help=f"Push {what} to this Prometheus Pushgateway [default: ${metrics.URL_ENV}].",
    )


@contextmanager
def audit_session(
    state: State,
    purpose: rights.Purpose,
    only: rights.Reads | None = None,
    *,
    write: bool = False,
) -> Iterator[tuple[Connection, config.Settings, AuditTables]]:
    """Settings, a checked audit schema and one connection (one transaction if `write`),
    after the role's rights for `purpose` (with `only`, those of that read) are checked: exit
    2 naming what is missing and the purpose that gives it, before anything is written."""
    settings, engine = state.settings(), state.engine()
    try:
        with engine.connect() as conn:
            rights.require(conn, settings, purpose, only)
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
