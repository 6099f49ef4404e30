"""`db grants`: the SQL that gives a role exactly what the job needs, and nothing more.

Three purposes:
- `run`: read the columns the rule looks at (never the personal ones), update only the
  cleaned columns plus `cleaned_at` and `updated_at`, write its own run and chunk records,
  read legal holds. No DELETE, no TRUNCATE, no DDL.
- `read-only`: `verify`, `run --dry-run` and the audit commands: read the same columns of
  the dispatches as `run` (never the personal ones: a SELECT on the whole table granted
  before is revoked first), the audit tables, and the audit schema's view of the dispatches
  (`trail/facts.py`: whether each personal column holds data, never the data), which these
  statements create. They must be run by the table's owner or an administrator who may read
  every column of the table and create in the audit schema: the view is theirs and reads the
  table with their rights (`notes()` says so in the output).
- `holds`: for the people who place and release legal holds.
- `operator`: the person who does a manual run (db check, a dry run, run, verify, audit
  list/show/verify): `read-only`'s statements, then `run`'s.
- `reclean`: what `run --reclean` needs: `run`'s, and SELECT on the personal columns
  (`clean.columns`), to find rows that hold data again.

The rights they give are data in `trail/rights.py` (what `db check --purpose` and each
command's check before it writes compare a role with); tests hold the two equal.

With `clean.max_replica_lag_s` set, the run grants come with a second part, run by a role
that may read `pg_stat_replication` (a superuser, or a member of `pg_read_all_stats`): the
replica lag function (`trail/replica_lag.py`), which the run role may call and which shows
it the lag and nothing else (`printed()` heads each part with who runs it).

The statements are built from validated identifiers, quoted by `names.quoted_name`; the
view's values (the cleaned values of the config) are written out by SQLAlchemy's PostgreSQL
compiler (`facts.statements`).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from dispatch_retention.catalog import target
from dispatch_retention.config import Settings
from dispatch_retention.errors import RoleRefused
from dispatch_retention.names import IDENTIFIER, MAX_IDENTIFIER, quoted_name
from dispatch_retention.printable import escaped
from dispatch_retention.trail import facts, replica_lag
from dispatch_retention.trail.audit_tables import ALEMBIC_VERSION_TABLE, FACTS_VIEW
from dispatch_retention.trail.rights import PURPOSES, Purpose

__all__ = ["PURPOSES", "Purpose"]


#: The purposes whose statements make the audit schema's view of the dispatches.
VIEWING: tuple[Purpose, ...] = ("read-only", "operator")


def valid_role(name: str) -> str:
    """A role to grant to: a plain SQL name, never `public` (every role in the cluster) nor a
    `pg_*` role (the server's own); `RoleRefused` otherwise."""
    if name.lower() == "public":
        raise RoleRefused(
            name,
            "--role public is every role in the cluster: name the job's own role (CREATE ROLE "
            "... LOGIN), never public",
        )
    if name.lower().startswith("pg_"):
        raise RoleRefused(name, "--role: pg_* roles are the server's own: name the job's own role")
    if len(name) > MAX_IDENTIFIER or not IDENTIFIER.match(name):
        raise RoleRefused(name, "--role must be a plain SQL name (lower-case letters, digits, _)")
    return name


def refuse_superuser(conn: Connection, role: str) -> None:
    """With a database to ask: a superuser bypasses every grant (and row-level security),
    so grants to it would bound nothing."""
    found = conn.execute(
        text("SELECT rolsuper FROM pg_roles WHERE rolname = :r"), {"r": role}
    ).scalar()
    if found:
        raise RoleRefused(
            role,
            f"--role {role} is a superuser: it bypasses every grant, so these would bound "
            "nothing; run the job as a role of its own (CREATE ROLE ... LOGIN NOSUPERUSER)",
        )


def fitted(conn: Connection, settings: Settings, purpose: Purpose) -> Settings:
    """With a database to ask: the read-only view fits the table's own column types (a
    `json` or `text` content is compared as such), so the target is resolved first."""
    if purpose not in VIEWING:
        return settings
    return target.resolve_settings(conn, settings)


def notes(settings: Settings, purpose: Purpose) -> list[str]:
    """Comment lines printed before the statements: who must run them. A name with a
    newline (a quoted one may hold any character) is shown escaped: it would end the
    comment, and psql would run the rest of the line."""
    if purpose not in VIEWING:
        return []
    view = facts.view_name(settings)
    lines = [
        f"-- Run as the owner of {settings.target.table}, or as an administrator who may read "
        f"all its columns and create in schema {settings.audit.schema_}: the view {view} "
        "will be that role's, and reads the table with its rights and under its row-level "
        "security.",
        f"-- After a change of clean.columns, DROP VIEW {view} first, then run the read-only "
        "grants of every role that reads it again (CREATE OR REPLACE VIEW cannot drop or rename "
        "a column).",
    ]
    return [escaped(line) for line in lines]


def lag_statements(settings: Settings, role: str) -> list[str]:
    """With `clean.max_replica_lag_s` set: the statements that make the replica lag function
    and let `role` call it (run by a role that may read `pg_stat_replication`)."""
    if settings.clean.max_replica_lag_s <= 0:
        return []
    return replica_lag.create(settings.audit.schema_, quoted_name(valid_role(role)))


def printed(settings: Settings, role: str, purpose: Purpose) -> str:
    """What `db grants` prints: the notes and the statements, and for `run` with a replica
    lag limit the lag function's part, each part headed by who runs it."""
    lines = [*notes(settings, purpose), *statements(settings, role, purpose)]
    lag = lag_statements(settings, role) if purpose in ("run", "operator", "reclean") else []
    if not lag:
        return "\n".join(lines)
    schema = settings.audit.schema_
    return "\n".join(
        [
            f"-- Part 1, run by the owner of {escaped(settings.target.table)} or an "
            "administrator: the role's grants.",
            *lines,
            "",
            "-- Part 2, run by a superuser or a member of pg_read_all_stats that may create in "
            f"schema {escaped(schema)}: the replica lag function (clean.max_replica_lag_s) is "
            "that role's and reads pg_stat_replication with its rights; the run role may call "
            "it and sees the lag through it, nothing else (no pg_monitor, no query texts).",
            *lag,
        ]
    )


def write_columns(settings: Settings) -> list[str]:
    return [*settings.clean.columns, "cleaned_at", "updated_at"]


def statements(settings: Settings, role: str, purpose: Purpose) -> list[str]:
    role_q = quoted_name(valid_role(role))
    target_schema = settings.target.schema_name or "public"
    table = quoted_name(*settings.target.parts)
    audit = quoted_name(settings.audit.schema_)

    def audit_table(name: str) -> str:
        return quoted_name(settings.audit.schema_, name)

    def cols(columns: list[str]) -> str:
        return ", ".join(quoted_name(c) for c in columns)

    out = [
        f"GRANT USAGE ON SCHEMA {quoted_name(target_schema)} TO {role_q};",
        f"GRANT USAGE ON SCHEMA {audit} TO {role_q};",
        f"GRANT SELECT ON {audit_table(ALEMBIC_VERSION_TABLE)} TO {role_q};",
        # the hash chain: read by `audit verify` and by a run logging its head; only the
        # database's own triggers write it
        f"GRANT SELECT ON {audit_table('events')}, {audit_table('events_head')} TO {role_q};",
    ]

    def run() -> list[str]:
        return [
            f"GRANT SELECT ({cols(target.read_columns(settings))}) ON {table} TO {role_q};",
            f"GRANT UPDATE ({cols(write_columns(settings))}) ON {table} TO {role_q};",
            f"GRANT SELECT, INSERT, UPDATE ON {audit_table('runs')} TO {role_q};",
            f"GRANT SELECT, INSERT ON {audit_table('chunks')} TO {role_q};",
            f"GRANT SELECT ON {audit_table('legal_holds')} TO {role_q};",
        ]

    def read_only() -> list[str]:
        return [
            f"REVOKE SELECT ON {table} FROM {role_q};",
            f"GRANT SELECT ({cols(facts.shown_columns(settings))}) ON {table} TO {role_q};",
            *facts.statements(settings),
            f"GRANT SELECT ON {audit_table(FACTS_VIEW)} TO {role_q};",
            f"GRANT SELECT ON {audit_table('runs')}, {audit_table('chunks')}, "
            f"{audit_table('legal_holds')} TO {role_q};",
        ]

    def holds() -> list[str]:
        return [
            f"GRANT SELECT, INSERT ON {audit_table('legal_holds')} TO {role_q};",
            f"GRANT UPDATE ({cols(['released_at', 'released_by'])}) ON "
            f"{audit_table('legal_holds')} TO {role_q};",
        ]

    def reclean() -> list[str]:
        personal = cols(list(settings.clean.columns))
        return [*run(), f"GRANT SELECT ({personal}) ON {table} TO {role_q};"]

    parts = {
        "run": run,
        "read-only": read_only,
        "holds": holds,
        "operator": lambda: [*read_only(), *run()],
        "reclean": reclean,
    }
    return [*out, *parts[purpose]()]
