"""`db check`: is this database ready for the job, and is the job's role no mightier than it
needs to be? Read-only.

Each finding is `ok`, `warn` (works, but slowly, with more rights than needed, or with
something not yet reviewed) or `error` (the run would fail or could not be trusted). Checks:
the dispatches table and every column the job uses; what `run` refuses the table for
(`target.table_problems`: columns that cannot take what cleaning writes, an `id` the windows
cannot walk, a rule on UPDATE, an inheritance child's own unclassified columns), each an
error; the copy risks of the table (catalog/risks.py: triggers, publications, a replica identity
that carries personal data), a warn until named in `[acknowledged]`, and names there that
match none;
columns neither stripped nor kept (a warn); the policy indexes (catalog/indexes.py: an index counts
only where the plan can read it alone; a missing one comes with the statements that build it
without blocking writes, partition by partition on a partitioned table); the audit schema's
revision; the read-only view of the dispatches, where it exists (stale: a warn, with the
SQL to run again); the autovacuum settings, last (auto)vacuum and tuples of the table, or of each of
its partitions; the current role's rights; with `clean.max_replica_lag_s` set, whether it
can read the standbys' lag (`trail/replica_lag.py`: a warn when not, as a run would only
warn); TEMPORARY on the database (PostgreSQL grants it to PUBLIC by default: a warn, with
the REVOKE an administrator would run; the job does not run it, since it concerns every
role of the database). `db check --strict` fails on any warn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from dispatch_retention import errors
from dispatch_retention.catalog import indexes, risks
from dispatch_retention.catalog import target as target_module
from dispatch_retention.checks.db_grants import write_columns
from dispatch_retention.config import PERSONAL_COLUMNS, Settings, Target
from dispatch_retention.names import quoted_name
from dispatch_retention.pg import diagnosis, engines
from dispatch_retention.rule.dispatch_table import dispatches_table
from dispatch_retention.rule.shape import Shape
from dispatch_retention.trail import facts, migrate, replica_lag, rights
from dispatch_retention.trail.audit_tables import FACTS_VIEW
from dispatch_retention.trail.rights import Purpose

Level = Literal["ok", "warn", "error"]


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    message: str


def check(conn: Connection, settings: Settings, purpose: Purpose = "run") -> list[Finding]:
    """The findings, in one read-only snapshot. A target the job refuses (missing, a view,
    row-level security that applies to this role) raises `target.TargetRefused` (exit 2)."""
    engines.read_only(conn)
    configured = settings.target
    settings = target_module.resolve_settings(conn, settings, refuse=False)
    findings: list[Finding] = [_target(conn, configured, settings)]
    assert settings.shape is not None  # read by resolve_settings
    findings += [
        Finding(problem.level, problem.check, problem.message)  # errors: `run` refuses, exit 2
        for problem in target_module.table_problems(
            conn, settings, settings.shape, settings.target.table
        )
    ]
    columns = settings.shape.columns  # in the table's order
    expected = {c.name for c in dispatches_table(settings.target).columns}
    missing = sorted(expected - set(columns))
    findings.append(
        Finding("error", "columns", f"missing columns: {', '.join(missing)}")
        if missing
        else Finding("ok", "columns", "every column of the seed model is present")
    )
    findings += _statuses(conn, settings)
    findings += _copy_risks(conn, settings)
    findings.append(_classification(settings, list(columns), settings.shape))
    findings += _indexes(conn, settings)
    findings.append(_schema(conn, settings))
    findings.append(_facts_view(conn, settings))
    findings += _vacuum(conn, settings)
    findings += _privileges(conn, settings, set(columns), purpose)
    findings += _replica_lag(conn, settings)
    findings.append(_temp_privilege(conn))
    return findings


def _replica_lag(conn: Connection, settings: Settings) -> list[Finding]:
    """With `clean.max_replica_lag_s` set: can this role read the standbys' lag through the
    function `db grants --purpose run` prints? If not, the throttle would warn and not wait."""
    limit = settings.clean.max_replica_lag_s
    if limit <= 0:
        return []
    fix = "run part 2 of `db grants --purpose run` (as a superuser or a pg_read_all_stats member)"
    try:
        with conn.begin_nested():  # a savepoint: a refusal leaves the snapshot usable
            row = conn.execute(replica_lag.call(settings.audit.schema_)).one()
    except DBAPIError as exc:
        return [
            Finding(
                "warn",
                "replica lag",
                f"this role cannot read the replica lag ({diagnosis.describe_error(exc)}): "
                f"a run would warn and not wait for the standbys; {fix}",
            )
        ]
    findings = []
    if row.unseen:
        findings.append(
            Finding(
                "warn",
                "replica lag",
                f"{row.unseen} walsender(s) whose position the lag function's owner cannot "
                f"read: a run cannot see their lag; {fix}",
            )
        )
    if row.idle_slots:
        findings.append(
            Finding(
                "warn",
                "replica lag",
                f"{row.idle_slots} physical replication slot(s) with no standby connected: "
                "their standby's lag cannot be seen, and the primary keeps their WAL",
            )
        )
    behind = 0 if row.replayed_bytes is None else max(0, row.wal_bytes - row.replayed_bytes)
    findings.append(
        Finding(
            "ok",
            "replica lag",
            f"{row.standbys} physical standby(s) seen, {behind} bytes of WAL behind; a run "
            f"waits while one replays more than {limit:g} s behind",
        )
    )
    return findings


def _facts_view(conn: Connection, settings: Settings) -> Finding:
    """The read-only role's view of the dispatches (trail/facts.py), where it exists: a warn when
    it is stale (made by an earlier release, for other clean.columns, replaced since), as
    `verify` through it would refuse it; with the SQL to run again in the message."""
    view = facts.view_name(settings)
    exists = conn.execute(
        text("SELECT to_regclass(:v) IS NOT NULL"),
        {"v": quoted_name(settings.audit.schema_, FACTS_VIEW)},
    ).scalar()
    if not exists:
        return Finding(
            "ok",
            "facts view",
            f"no view {view}: only a role that may not read the personal columns needs it "
            "(`db grants --purpose read-only` makes it)",
        )
    try:
        facts.check(conn, settings, list(settings.clean.columns))
    except (errors.StaleFactsView, errors.TargetRefused) as exc:
        return Finding("warn", "facts view", str(exc))
    except errors.NoFactsView:
        return Finding("ok", "facts view", f"{view} exists; this role does not read it")
    return Finding("ok", "facts view", f"{view} is current")


#: How long `db check` may read the table for status values no mapping names.
STATUS_SCAN_TIMEOUT = "30s"


def _statuses(conn: Connection, settings: Settings) -> list[Finding]:
    """Status values in the table that stand for none of the API's words (a status the
    application added; `target.unmapped_values`): a warn, since the rule counts them as
    unknown, so unsettled. Reads the table, within `STATUS_SCAN_TIMEOUT`."""
    try:
        with conn.begin_nested():
            engines.set_local(conn, statement_timeout=STATUS_SCAN_TIMEOUT)
            found = target_module.unmapped_values(conn, settings)
    except DBAPIError as exc:  # a timeout on a large table, a foreign partition, ...
        why = (
            f"within {STATUS_SCAN_TIMEOUT} (a large table)"
            if diagnosis.is_statement_timeout(exc)
            else f"({diagnosis.describe_error(exc)})"
        )
        return [
            Finding(
                "warn",
                "statuses",
                f"could not read the status values {why}: values no [target.codes] names "
                "count as unknown, so unsettled",
            )
        ]
    if not found:
        return [Finding("ok", "statuses", "every status value stands for one of the API's words")]
    return [
        Finding(
            "warn",
            "statuses",
            f"{column} holds {count} unknown value{'' if count == 1 else 's'} (not shown: "
            "an application may put anything there), standing for none of the API's words: "
            "dispatches with them count as unsettled (unknown status) and wait out the grace; "
            "if one means a word, map it in [target.codes]",
        )
        for column, count in found.items()
    ]


def _copy_risks(conn: Connection, settings: Settings) -> list[Finding]:
    """One finding per copy risk (warn until acknowledged), one per stale acknowledgement."""
    table = settings.target.table
    found = risks.copy_risks(conn, settings)
    findings = []
    for risk in found:
        if risk.kind == "rule":
            continue  # the job refuses the table: an error of the `rule` check, not a risk
        if risk.kind == "trigger":
            label = f"trigger {risk.name} ({risk.when} UPDATE)"
        elif risk.kind == risks.REPLICA_IDENTITY:
            label = "replica identity"
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
                "updates, its replica identity carries no personal data (not FULL, no key "
                "holding a column of clean.columns)",
            )
        )
    for name in risks.stale_acknowledgements(settings, found):
        findings.append(
            Finding(
                "warn",
                "acknowledged",
                f"{name} matches no copy risk of {table} (no such trigger or rule on UPDATE, "
                f"no such publication of its updates; {risks.REPLICA_IDENTITY} only while a "
                "replica identity carries personal data): remove it from [acknowledged] or "
                "correct the name",
            )
        )
    return findings


def _classification(settings: Settings, columns: list[str], shape: Shape) -> Finding:
    """Every column of the table is stripped (clean.columns) or kept with a reason (those
    of the tables that inherit from it, which cleaning cannot strip, are the errors of
    `target.table_problems` until kept)."""
    table = settings.target.table
    unclassified = settings.unclassified(columns)
    if not unclassified:
        children = [b.relation for b in shape.below if b.own]
        classified = not any(settings.unclassified(b.own) for b in shape.below)
        also = (
            f", and so is every column {', '.join(children)} adds (kept with a reason)"
            if children and classified
            else ""
        )
        return Finding(
            "ok",
            "column classification",
            f"every column of {table} is stripped (clean.columns) or kept with a reason{also}",
        )
    return Finding(
        "warn",
        "column classification",
        f"columns of {table} neither stripped nor kept: {', '.join(unclassified)}. Decide "
        "whether each holds personal data, then list it in clean.columns to strip it (with a "
        "clean.replace value where it may not be NULL), or in clean.keep with the reason it "
        "stays (a clean.keep you write replaces the default, which keeps member_id)",
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
    findings = []
    table = settings.target.table
    for advice in indexes.advice(conn, settings):
        keys = advice.keys
        names = ", ".join(p.name for p in settings.policies if tuple(sorted(p.where)) == keys)
        if advice.serving is not None:
            on_each = " (valid: every partition's own is attached)" if advice.partitioned else ""
            findings.append(
                Finding("ok", "index", f"policies {names}: read through {advice.serving}{on_each}")
            )
            continue
        columns = ", ".join((*keys, settings.clean.age_from))
        missing = (
            f"policies {names}: no index finds their not-yet-cleaned rows by ({columns}) "
            f"holding the columns the plan reads, so every run reads the table. "
        )
        if advice.near is not None:
            missing += (
                f"{advice.near} finds them but lacks {', '.join(advice.lacks)}: the plan "
                f"would read each row from the table too, so it does not count. "
            )
        if not advice.partitioned:
            steps = " ".join(advice.steps)
            do = (
                "Create it (it does not block writes)"
                if len(advice.steps) == 1
                else "An index of its name is there but does not serve (an older shape, or "
                "left invalid by a concurrent build that failed): replace it "
                "(neither statement blocks writes)"
            )
            findings.append(Finding("warn", "index", f"{missing}{do}: {steps} {AFTER_BUILDING}"))
            continue
        done = (
            f" ({advice.attached} of {advice.partitions} partitions have theirs attached already)"
            if advice.attached
            else ""
        )
        steps = "".join(f"\n    {step}" for step in advice.steps)
        how = (
            f"build one on each partition and attach it{done}. Run these one by one, in "
            f"this order, outside a transaction (the index ON ONLY a partitioned table takes "
            f"a brief lock, the partitions' indexes are built CONCURRENTLY, attaching blocks "
            f"no write; PostgreSQL marks the index valid once every partition's is attached)"
        )
        if advice.foreign:
            how = (
                f"build one on each partition, then the parent's. {', '.join(advice.foreign)} "
                f"is a foreign table and holds no index, so attaching would never make the "
                f"parent's index valid; the last statement, run after the others, builds no "
                f"index: it attaches the partitions' and skips the foreign one (a brief lock "
                f"on each partition). Run these one by one, in this order, outside a "
                f"transaction"
            )
        findings.append(
            Finding(
                "warn",
                "index",
                f"{missing}{table} is partitioned, and PostgreSQL builds no index on it "
                f"CONCURRENTLY: {how}:{steps}\n    {AFTER_BUILDING}",
            )
        )
    return findings


#: What makes new policy indexes work: until a VACUUM sets the visibility map, the planner
#: may read an arm through an older index with a filter instead.
AFTER_BUILDING = (
    "Then, once every index is built, VACUUM (ANALYZE) the table (as its owner; CONCURRENTLY "
    "and VACUUM cannot run in a transaction block, so one statement at a time): until the "
    "visibility map is set the planner may read the arms through an older index and a filter."
)


def _schema(conn: Connection, settings: Settings) -> Finding:
    try:
        migrate.require_current(conn, settings.audit.schema_)
    except errors.SchemaNotReady as exc:
        return Finding("error", "audit schema", str(exc))
    return Finding("ok", "audit schema", f"{settings.audit.schema_} is at {migrate.HEAD}")


_VACUUM = text(
    "SELECT format('%I.%I', n.nspname, c.relname) AS relation, c.reloptions, "
    "s.last_vacuum, s.last_autovacuum, s.last_autoanalyze, s.n_live_tup, s.n_dead_tup "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid "
    "WHERE c.oid = ANY(CAST(:relids AS oid[])) ORDER BY n.nspname, c.relname"
)


def _vacuum(conn: Connection, settings: Settings) -> list[Finding]:
    """The autovacuum settings and the last (auto)vacuum of each table that holds the
    target's rows: the target itself, or, where it is partitioned (or has inheritance
    children), each table below it (a partitioned table holds no rows, and autovacuum
    visits its partitions, not it)."""
    tree = indexes.tree(conn, settings)
    holding = [r for r in tree if r.kind == "r"]
    rows = conn.execute(_VACUUM, {"relids": [r.oid for r in holding]}).mappings().all()

    def options(row: Any) -> str:
        return ", ".join(row["reloptions"] or []) or "server defaults"

    def last(row: Any) -> str:
        return (
            f"last vacuum {row['last_vacuum'] or 'never'}, last autovacuum "
            f"{row['last_autovacuum'] or 'never'}, last autoanalyze "
            f"{row['last_autoanalyze'] or 'never'}; {row['n_live_tup'] or 0} live, "
            f"{row['n_dead_tup'] or 0} dead tuples"
        )

    if len(tree) == 1 and len(rows) == 1:  # a table with nothing below it
        return [
            Finding("ok", "autovacuum settings", options(rows[0])),
            Finding("ok", "last vacuum", last(rows[0])),
        ]
    table = settings.target.table
    if tree[0].partitioned:
        whole = f"{table} is partitioned: autovacuum visits its {len(rows)} leaf partitions, not it"
    else:
        whole = f"{table} and the {len(tree) - 1} tables that inherit from it"
    settings_of: dict[str, list[str]] = {}
    for row in rows:
        settings_of.setdefault(options(row), []).append(str(row["relation"]))
    if not settings_of:
        said = "no partition yet"
    elif len(settings_of) == 1:
        said = f"{next(iter(settings_of))} on each"
    else:
        said = "; ".join(f"{o}: {', '.join(names)}" for o, names in settings_of.items())
    findings = [Finding("ok", "autovacuum settings", f"{whole}; {said}")]
    findings += [Finding("ok", "last vacuum", f"{row['relation']}: {last(row)}") for row in rows]
    return findings


def _privileges(
    conn: Connection, settings: Settings, present: set[str], purpose: Purpose
) -> list[Finding]:
    """Compare the current role's rights with what `purpose` needs (`trail/rights.py`), on
    the columns the table has (`present`; a missing one is the `columns` check's error). For
    `run`, rights beyond it on the dispatches are named too (a warn): the CronJob's role
    should hold no more."""
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
    lacking = [
        str(right)
        for right in rights.needed(settings, purpose)
        if (right.column is None or right.column in present) and not rights.has(conn, right)
    ]
    if lacking:
        findings.append(
            Finding(
                "error",
                "privileges",
                f"role {role['name']} lacks rights {purpose} needs: {'; '.join(lacking)} "
                f"(`db grants --purpose {purpose}`)",
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

    if purpose == "run":
        needed_write = set(write_columns(settings))
        extra = [p for p in ("DELETE", "TRUNCATE", "INSERT") if has(p)]
        all_columns = [
            c.name for c in dispatches_table(settings.target).columns if c.name in present
        ]
        extra += [f"UPDATE({c})" for c in all_columns if c not in needed_write and has("UPDATE", c)]
        personal = [c for c in PERSONAL_COLUMNS if c != "member_id" and c in present]
        extra += [f"SELECT({c})" for c in personal if has("SELECT", c)]
        if extra:
            findings.append(
                Finding(
                    "warn",
                    "privileges",
                    f"role {role['name']} has more rights than `run` needs on {table}: "
                    f"{', '.join(extra)} (fine for an administrator)",
                )
            )
    if not findings:
        findings.append(
            Finding("ok", "privileges", f"role {role['name']} has what {purpose} needs")
        )
    return findings


#: Who may create temporary tables in the current database, from the catalog: a NULL
#: `datacl` is the default ACL (`acldefault`), which gives PUBLIC (grantee 0) TEMPORARY.
_TEMP_PRIVILEGE = text(
    "SELECT format('%I', d.datname) AS database, current_user AS role, r.rolsuper, "
    "EXISTS (SELECT FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a "
    "WHERE a.grantee = 0 AND a.privilege_type = 'TEMPORARY') AS public_may, "
    "has_database_privilege(d.oid, 'TEMPORARY') AS role_may "
    "FROM pg_database d, pg_roles r "
    "WHERE d.datname = current_database() AND r.rolname = current_user"
)


def _temp_privilege(conn: Connection) -> Finding:
    """TEMPORARY on the current database: a warn while PUBLIC holds it (PostgreSQL's
    default), or while the current role holds it some other way (a grant to it or to a role
    it belongs to, or owning the database; a superuser is the `privileges` check's warn).
    No role the job uses needs temporary tables. Revoking it from PUBLIC is for an
    administrator to decide, for every role of the database: the finding says how."""
    row = conn.execute(_TEMP_PRIVILEGE).mappings().one()
    database, role = row["database"], row["role"]
    if row["public_may"]:
        return Finding(
            "warn",
            "temp privilege",
            f"PUBLIC has TEMPORARY on database {database} (PostgreSQL's default): every role, "
            "the job's run, read-only and holds roles among them, may create temporary "
            "tables (tables of its own for the length of a session, to fill with whatever it "
            "may read, on the server's disk); the job needs none. Revoking it concerns every "
            "role of the database, so the job leaves it to an administrator, who would run "
            f"`REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC;` and then grant it to each "
            "role that needs temporary tables: "
            f"`GRANT TEMPORARY ON DATABASE {database} TO <role>;`",
        )
    if row["role_may"] and not row["rolsuper"]:
        return Finding(
            "warn",
            "temp privilege",
            f"PUBLIC has no TEMPORARY on database {database}, but role {role} has it (granted "
            "to it or to a role it belongs to, or as the database's owner): `run` needs no "
            "temporary tables (fine for an admin)",
        )
    return Finding(
        "ok",
        "temp privilege",
        f"PUBLIC has no TEMPORARY on database {database}: only roles granted it (and the "
        "database's owner) may create temporary tables"
        + ("" if row["role_may"] else f", role {role} may not"),
    )
