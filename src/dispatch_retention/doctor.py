"""`db check`: is this database ready for the job, and is the job's role no mightier than it
needs to be? Read-only.

Each finding is `ok`, `warn` (works, but slowly, with more rights than needed, or with
something not yet reviewed) or `error` (the run would fail or could not be trusted). Checks:
the dispatches table and every column the job uses; NOT NULL columns that cleaning would set
to NULL; the copy risks of the table (risks.py: triggers, rules, publications, REPLICA
IDENTITY FULL), a warn until named in `[acknowledged]`, and names there that match none;
columns neither stripped nor kept (a warn); the supporting partial index (with the exact
CREATE INDEX CONCURRENTLY statement when it is missing); the audit schema's revision; the
table's autovacuum settings and last (auto)vacuum; the current role's rights. `db check
--strict` fails on any warn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, inspect, text

from . import db, errors, indexes, migrate, risks
from . import target as target_module
from .config import PERSONAL_COLUMNS, Settings, Target
from .grants import read_columns, write_columns
from .schema import dispatches_table

Level = Literal["ok", "warn", "error"]


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    message: str


def check(conn: Connection, settings: Settings) -> list[Finding]:
    """The findings, in one read-only snapshot. A target the job refuses (missing, a view,
    row-level security that applies to this role) raises `target.TargetRefused` (exit 2)."""
    db.read_only(conn)
    configured = settings.target
    settings = target_module.resolve_settings(conn, settings, refuse=False)
    findings: list[Finding] = [_target(conn, configured, settings)]
    assert settings.shape is not None  # read by resolve_settings
    findings += [
        Finding("error", "columns", problem)  # what `run` refuses with exit 2
        for problem in target_module.column_problems(settings, settings.shape)
    ]
    target = settings.target
    inspector = inspect(conn)
    columns = {c["name"]: c for c in inspector.get_columns(target.table_name, target.schema_name)}
    expected = {c.name for c in dispatches_table(target).columns}
    missing = sorted(expected - set(columns))
    findings.append(
        Finding("error", "columns", f"missing columns: {', '.join(missing)}")
        if missing
        else Finding("ok", "columns", "every column of the seed model is present")
    )
    for column in settings.clean.columns:
        info = columns.get(column)
        if info and not info["nullable"] and column not in settings.clean.replace:
            findings.append(
                Finding(
                    "error",
                    "nullability",
                    f"{column} is NOT NULL but clean.columns sets it to NULL: "
                    f"give clean.replace a value for it",
                )
            )
    findings += _copy_risks(conn, settings)
    findings.append(_classification(settings, list(columns)))
    findings += _indexes(conn, settings)
    findings.append(_schema(conn, settings))
    findings += _vacuum(conn, settings)
    findings += _privileges(conn, settings, set(columns))
    return findings


def _copy_risks(conn: Connection, settings: Settings) -> list[Finding]:
    """One finding per copy risk (warn until acknowledged), one per stale acknowledgement."""
    table = settings.target.table
    found = risks.copy_risks(conn, settings)
    findings = []
    for risk in found:
        if risk.kind == "trigger":
            label = f"trigger {risk.name} ({risk.when} UPDATE)"
        elif risk.kind == risks.REPLICA_IDENTITY:
            label = f"REPLICA IDENTITY FULL on {table}"
        else:
            label = f"{risk.kind} {risk.name}"
        if risk.acknowledged is None:
            findings.append(
                Finding(
                    "warn",
                    "copy risk",
                    f"{label}: {risk.detail} — review it, then add "
                    f'{risk.name} = "<reason>" under [acknowledged]',
                )
            )
        else:
            findings.append(
                Finding(
                    "ok", "copy risk", f"{label}: {risk.detail}; acknowledged: {risk.acknowledged}"
                )
            )
    if not found:
        findings.append(
            Finding(
                "ok",
                "copy risk",
                f"no trigger or rule fires on UPDATE of {table}, no publication sends its "
                "updates, its replica identity is not FULL",
            )
        )
    for name in risks.stale_acknowledgements(settings, found):
        findings.append(
            Finding(
                "warn",
                "acknowledged",
                f"{name} matches no copy risk of {table} (no such trigger or rule on UPDATE, "
                f"no such publication of its updates; {risks.REPLICA_IDENTITY} only while "
                "REPLICA IDENTITY is FULL): remove it from [acknowledged] or correct the name",
            )
        )
    return findings


def _classification(settings: Settings, columns: list[str]) -> Finding:
    """Every column of the table is stripped (clean.columns) or kept with a reason."""
    table = settings.target.table
    unclassified = settings.unclassified(columns)
    if not unclassified:
        return Finding(
            "ok",
            "column classification",
            f"every column of {table} is stripped (clean.columns) or kept with a reason",
        )
    return Finding(
        "warn",
        "column classification",
        f"columns of {table} neither stripped nor kept: {', '.join(unclassified)}. Decide "
        "whether each holds personal data, then list it in clean.keep with the reason it "
        "stays (a clean.keep you write replaces the default, which keeps member_id); the job "
        "cannot strip such columns yet",
    )


_SAME_NAME_ON_PATH = text(
    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relname = :name AND n.nspname = ANY(current_schemas(false)) "
    "AND c.oid <> CAST(:resolved AS regclass) ORDER BY 1"
)


def _target(conn: Connection, configured: Target, settings: Settings) -> Finding:
    """Which table `target.table` names; a warn when it is unqualified and another schema
    on the search_path holds the name too (a role with another search_path would clean or
    verify that other table)."""
    resolved = settings.target.table
    said = f"target.table {configured.table} is {resolved}"
    if configured.schema_name is None:
        others = list(
            conn.execute(
                _SAME_NAME_ON_PATH,
                {"name": configured.table_name, "resolved": settings.target.regclass},
            ).scalars()
        )
        if others:
            return Finding(
                "warn",
                "target",
                f"{said}, but {', '.join(others)} is on the search_path too: a role with "
                f"another search_path would clean or verify that one; write target.table = "
                f'"{resolved}"',
            )
    return Finding("ok", "target", said)


def _indexes(conn: Connection, settings: Settings) -> list[Finding]:
    """One finding per set of policy `where` keys: is there an index for their arm?"""
    create = indexes.statements(settings)
    findings = []
    for keys, definition in indexes.serving(conn, settings).items():
        names = ", ".join(p.name for p in settings.policies if tuple(sorted(p.where)) == keys)
        if definition is not None:
            findings.append(Finding("ok", "index", f"policies {names}: read through {definition}"))
            continue
        columns = ", ".join((*keys, settings.clean.age_from))
        findings.append(
            Finding(
                "warn",
                "index",
                f"policies {names}: no index finds their not-yet-cleaned rows by ({columns}), "
                f"so every run reads the table. Create it (it does not block writes): "
                f"{create[keys]}",
            )
        )
    return findings


def _schema(conn: Connection, settings: Settings) -> Finding:
    try:
        migrate.require_current(conn, settings.audit.schema_)
    except errors.SchemaNotReady as exc:
        return Finding("error", "audit schema", str(exc))
    return Finding("ok", "audit schema", f"{settings.audit.schema_} is at {migrate.HEAD}")


def _vacuum(conn: Connection, settings: Settings) -> list[Finding]:
    row = (
        conn.execute(
            text(
                "SELECT c.reloptions, s.last_vacuum, s.last_autovacuum, s.last_autoanalyze, "
                "s.n_live_tup, s.n_dead_tup FROM pg_class c "
                "LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid "
                "WHERE c.oid = CAST(:table AS regclass)"
            ),
            {"table": settings.target.regclass},
        )
        .mappings()
        .one()
    )
    options = ", ".join(row["reloptions"] or []) or "server defaults"
    return [
        Finding("ok", "autovacuum settings", options),
        Finding(
            "ok",
            "last vacuum",
            f"last vacuum {row['last_vacuum'] or 'never'}, last autovacuum "
            f"{row['last_autovacuum'] or 'never'}, last autoanalyze "
            f"{row['last_autoanalyze'] or 'never'}; {row['n_live_tup']} live, "
            f"{row['n_dead_tup']} dead tuples",
        ),
    ]


def _privileges(conn: Connection, settings: Settings, present: set[str]) -> list[Finding]:
    """Compare the current role's rights with what `run` needs (grants.py), on the columns
    the table has (`present`; a missing one is the `columns` check's error)."""
    table, regclass = settings.target.table, settings.target.regclass
    role: dict[str, Any] = dict(
        conn.execute(
            text(
                "SELECT current_user AS name, rolsuper, rolcreaterole, rolcreatedb "
                "FROM pg_roles WHERE rolname = current_user"
            )
        )
        .mappings()
        .one()
    )
    findings = []
    if role["rolsuper"]:
        findings.append(
            Finding(
                "warn",
                "privileges",
                f"role {role['name']} is a superuser: "
                "run the job as a role made with `db grants --role NAME`",
            )
        )

    def has(privilege: str, column: str | None = None) -> bool:
        if column is None:
            query = "SELECT has_table_privilege(CAST(:t AS regclass), :p)"
            return bool(conn.execute(text(query), {"t": regclass, "p": privilege}).scalar())
        query = "SELECT has_column_privilege(CAST(:t AS regclass), :c, :p)"
        return bool(
            conn.execute(text(query), {"t": regclass, "c": column, "p": privilege}).scalar()
        )

    needed_write = set(write_columns(settings))
    lacking = [c for c in write_columns(settings) if c in present and not has("UPDATE", c)]
    lacking += [c for c in read_columns(settings) if c in present and not has("SELECT", c)]
    if lacking:
        findings.append(
            Finding(
                "error",
                "privileges",
                f"role {role['name']} lacks rights the run needs on: {', '.join(lacking)}",
            )
        )
    extra = [p for p in ("DELETE", "TRUNCATE", "INSERT") if has(p)]
    all_columns = [c.name for c in dispatches_table(settings.target).columns if c.name in present]
    extra += [f"UPDATE({c})" for c in all_columns if c not in needed_write and has("UPDATE", c)]
    personal = [c for c in PERSONAL_COLUMNS if c != "member_id" and c in present]
    extra += [f"SELECT({c})" for c in personal if has("SELECT", c)]
    if extra:
        findings.append(
            Finding(
                "warn",
                "privileges",
                f"role {role['name']} has more rights than `run` needs on {table}: "
                f"{', '.join(extra)} (fine for an admin or the read-only verify role)",
            )
        )
    if not findings:
        findings.append(
            Finding("ok", "privileges", f"role {role['name']} has exactly what run needs")
        )
    return findings
