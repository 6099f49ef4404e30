"""Every error the job raises on purpose, in one tree, turned into an exit code in one place
(`root.Commands`). Each class carries the data a caller or a test needs, and its message
never holds a row value or a password.

    DispatchRetentionError
    ├── UsageError                   exit 2: nothing was touched; retrying cannot help
    │   ├── ConfigError              the config file: its path, key and reason
    │   ├── DatabaseUrlError         no usable database URL (never repeats the URL)
    │   ├── SchemaNotReady           the audit schema is missing or at another revision
    │   ├── TargetRefused            the target is not a table the job can see whole
    │   ├── RecleanRefused           `run --reclean` by a role that cannot read the columns
    │   ├── MissingRights            the role lacks rights its `db grants` purpose gives (named)
    │   ├── MissingPrivilege         the role lacks a right the command needs (named)
    │   │   └── NoFactsView          `verify` may read neither the personal columns nor the
    │   │                            audit schema's view of the dispatches
    │   ├── StaleFactsView           that view is not what this config's read-only grants make
    │   ├── RoleRefused              `db grants` for a role that must never get them
    │   ├── HoldError                a legal hold that cannot be placed or released as asked
    │   ├── TooLongForTrail          a text longer than the audit trail keeps (its bound)
    │   ├── HeadFileError            `audit verify --head-file`: cannot read or keep the head
    │   ├── ReportFileError          `report --output`: the report cannot be written
    │   └── EmbeddedUnavailable      `demo` without the `embedded` extra
    └── RunError                     exit 1: the run started and could not go on
        ├── LockLost                 the run lock's connection died and another run took it
        └── RetriesExhausted         a step kept failing on a retryable error

Not in the tree: `vocabulary.Interrupted` (a stop signal: a KeyboardInterrupt, so that
psycopg cancels the query on the server) and database errors (SQLAlchemy's `DBAPIError`,
reduced to their SQLSTATE and object names by `diagnosis.describe_error`, exit 1).
"""

from __future__ import annotations


class DispatchRetentionError(Exception):
    """The base of every error the job raises on purpose."""

    def for_user(self) -> str:
        """The one line the command line prints for it."""
        return str(self)


class UsageError(DispatchRetentionError):
    """A mistake in how the job was called or configured: exit 2, nothing touched."""


class RunError(DispatchRetentionError):
    """A run that could not go on: exit 1 (the run record says why)."""


class ConfigError(UsageError):
    """An invalid configuration file: names the file, the key and what is wrong."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path, self.key, self.reason = path, key, reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")

    def for_user(self) -> str:
        return f"invalid configuration: {self}"


class DatabaseUrlError(UsageError):
    """No usable database URL (the message never repeats the URL: it may hold a password)."""


class SchemaNotReady(UsageError):
    """The audit schema is missing, behind, ahead of this version (an image rolled back), or
    holds the job's tables without their version table (`state` says which)."""

    def __init__(
        self, schema: str, found: str | None, needed: str, *, state: str | None = None
    ) -> None:
        self.schema, self.found, self.needed = schema, found, needed
        self.state = state or ("missing" if found is None else "behind")
        if self.state == "missing":
            message = (
                f"the audit schema {schema!r} has no tables yet: run `dispatch-retention db "
                "upgrade` (with a role that may create them) before the first run"
            )
        elif self.state == "newer":
            message = (
                f"the audit schema {schema!r} is at revision {found}, newer than this version "
                f"of dispatch-retention knows (it ends at {needed}): this image is older than "
                "the one that migrated the database; run the newer image"
            )
        elif self.state == "unversioned":
            message = (
                f"the audit schema {schema!r} holds tables named like the job's (runs, ...) but "
                "not its version table (dispatch_retention_alembic_version): the job's after a "
                "partial restore (restore that table too), or another application's (name "
                "another audit.schema); the job never adopts tables it did not create"
            )
        else:
            message = (
                f"the audit schema {schema!r} is at revision {found}, this version needs "
                f"{needed}: run `dispatch-retention db upgrade`"
            )
        super().__init__(message)


class TargetRefused(UsageError):
    """The configured target cannot be cleaned truthfully: `reason` says why and the fix."""

    def __init__(self, table: str, reason: str) -> None:
        self.table, self.reason = table, reason
        super().__init__(f"target {table}: {reason}")


class RecleanRefused(UsageError):
    """`run --reclean` by a role that may not read `columns` of `table`."""

    def __init__(self, table: str, columns: list[str]) -> None:
        self.table, self.columns = table, columns
        which = "it" if len(columns) == 1 else "them"
        super().__init__(
            f"run --reclean must see whether {', '.join(columns)} hold data again, and this "
            f"role may not read {which} on {table}: run it as a role with SELECT on those "
            "columns (the table's owner, say); the nightly run role needs no such right"
        )


class MissingPrivilege(UsageError):
    """The connected role lacks `right` on the object `kind` `name`; checked before the
    command needs it, so nothing was done."""

    def __init__(
        self, role: str, right: str, kind: str, name: str, *, creating_schema: str = ""
    ) -> None:
        self.role, self.right, self.kind, self.name = role, right, kind, name
        if creating_schema:
            message = (
                f"role {role} may not create schema {creating_schema!r} (it needs {right} on "
                f"{kind} {name}): create the schema for it as an administrator (CREATE SCHEMA "
                f"{creating_schema} AUTHORIZATION {role}; docs/deploy.md), or GRANT {right} ON "
                f"DATABASE {name} TO {role}"
            )
        else:
            message = (
                f"role {role} lacks {right} on {kind} {name}: GRANT {right} ON "
                f"{kind.upper()} {name} TO {role} (or run as the role that owns it)"
            )
        super().__init__(message)


class MissingRights(UsageError):
    """The connected role lacks `rights` that the command's `purpose` of `db grants` gives;
    checked before anything is written."""

    #: how many of the rights the message names (the rest are counted)
    SHOWN = 6

    def __init__(self, role: str, rights: list[str], purpose: str) -> None:
        self.role, self.rights, self.purpose = role, rights, purpose
        shown = "; ".join(rights[: self.SHOWN])
        more = f" and {len(rights) - self.SHOWN} more" if len(rights) > self.SHOWN else ""
        super().__init__(
            f"role {role} lacks rights this command needs: {shown}{more}. Have the table's "
            f"owner or an administrator run the SQL that `dispatch-retention db grants --role "
            f"{role} --purpose {purpose}` prints (`db check --purpose {purpose}` lists what is "
            "missing); nothing was written"
        )


class NoFactsView(MissingPrivilege):
    """`verify` by `role`, which may not read `columns` of `table`, and cannot count through
    the audit schema's `view` either (`reason`: it is missing, or the role may not read it):
    the SQL of `db grants --purpose read-only` creates the view and grants it."""

    def __init__(self, role: str, table: str, columns: list[str], view: str, reason: str) -> None:
        self.role, self.right, self.kind, self.name = role, "SELECT", "view", view
        self.table, self.columns, self.reason = table, columns, reason
        UsageError.__init__(
            self,
            f"role {role} may not read {', '.join(columns)} of {table}, and {reason}: have the "
            f"table's owner run the SQL that `dispatch-retention db grants --role {role} "
            "--purpose read-only` prints (it creates the view and grants it), or run verify as "
            "a role that may read those columns",
        )


class StaleFactsView(UsageError):
    """The audit schema's view of the dispatches, `view`, is not what the read-only grants
    print for this configuration (`reason` says what differs): counted through it, `verify`
    would judge by other rules, so it refuses. Made again, it is current."""

    def __init__(self, view: str, reason: str, role: str) -> None:
        self.view, self.reason, self.role = view, reason, role
        super().__init__(
            f"view {view}: {reason}, so verify cannot count through it: have the table's "
            f"owner run again the SQL that `dispatch-retention db grants --role {role} "
            f"--purpose read-only` prints (when clean.columns changed, DROP VIEW {view} "
            "first, then the read-only grants of every role that reads it)"
        )


class RoleRefused(UsageError):
    """`db grants` for a role that must never receive the job's rights (`reason` says
    why); nothing is printed, so nothing can be piped into psql."""

    def __init__(self, role: str, reason: str) -> None:
        self.role, self.reason = role, reason
        super().__init__(reason)


class HoldError(UsageError):
    """A legal hold that cannot be placed or released as asked."""


class TooLongForTrail(UsageError):
    """A text the audit trail would keep (`what`) is longer than its column holds
    (`audit_tables.TEXT_BOUNDS`, migration 0007): its size and the limit, in bytes."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        self.what, self.size, self.limit = what, size, limit
        super().__init__(f"{what} is {size} bytes long; the audit trail keeps at most {limit}")


class ReportFileError(UsageError):
    """`report --output FILE` cannot be written: its path and why (exit 2, as bad usage)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"--output {path}: {reason}")


class HeadFileError(UsageError):
    """The file `audit verify --head-file` keeps the chain's head in cannot be read, holds
    something else than a head, or cannot be written: its path and why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"--head-file {path}: {reason}")


class EmbeddedUnavailable(UsageError):
    """`demo` needs the embedded PostgreSQL: pip install 'dispatch-retention[embedded]'."""


class LockLost(RunError):
    """The run lock could not be kept (its connection died and someone else took it)."""


class RetriesExhausted(RunError):
    """A step kept failing on a retryable error; the run fails with `reason`
    (`lock_timeout`: the last one was a lock timeout, so a session holding a lock can be
    named)."""

    def __init__(self, reason: str, *, lock_timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.lock_timeout = reason, lock_timeout
