"""The tests' harness: dispatch rows with personal-data markers and the one bulk seeder,
snapshots, configs, databases and roles, the CLI in-process, the invariants (no half-cleaned
row, the audit trail's accounting). The console script as a subprocess and its JSON logs
live in tests/processes.py and are re-exported here."""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from sqlalchemy import Connection, Engine, create_engine, event, func, insert, select
from sqlalchemy import text as sql
from sqlalchemy.engine import URL

from dispatch_retention import config
from dispatch_retention.checks import db_grants
from dispatch_retention.cli.main import cli
from dispatch_retention.config import KEPT_COLUMNS, Settings, Target
from dispatch_retention.rule.dispatch_table import dispatches_table
from dispatch_retention.run import job
from dispatch_retention.trail.objects import TABLES as TRAIL_TABLES
from dispatch_retention.trail.objects import triggers as trail_triggers
from dispatch_retention.vocabulary import Chunk, Hooks, Options, Outcome, Request, Stop
from tests import oracle

# the harness's subprocess half (tests import it from here)
from tests.processes import (  # noqa: F401
    AMBIENT,
    SCRIPT,
    Job,
    as_json_lines,
    json_lines,
    read_until_first_chunk,
    run_script,
    script,
    script_env,
    spawn,
)

TABLE = dispatches_table(Target())
DAY = timedelta(days=1)
MARK = "PIIMARK"  # every personal value seeded by a test carries it; output must never


def personal(row_id: int) -> dict[str, Any]:
    return {
        "content": {"body": f"{MARK}-content-{row_id}"},
        "msisdn": f"+47{MARK}{row_id}",
        "email": f"{MARK}.{row_id}@example.invalid",
        "app_token": f"{MARK}-token-{row_id}",
    }


def dispatch(row_id: int, created_at: datetime, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": row_id,
        "type": "sms",
        "member_id": 1000 + row_id,
        "transmission_status": "transmitted",
        "delivery_status": "delivered",
        "external_delivery_status": "delivered",
        "created_at": created_at,
        "updated_at": created_at,
        "scheduled_at": created_at,
        "transmitted_at": created_at,
        "delivered_at": created_at,
        "cleaned_at": None,
        **personal(row_id),
    }
    row.update(overrides)
    return row


def insert_rows(engine: Engine, rows: Iterable[Mapping[str, Any]]) -> None:
    batch = list(rows)
    if batch:
        with engine.begin() as conn:
            conn.execute(insert(TABLE), batch)


Rows = dict[int, dict[str, Any]]  # a table's rows by id, as `snapshot()` reads them
#: What cleaning writes in the personal columns under the default settings.
STRIPPED = {"content": {}, "msisdn": None, "email": None, "app_token": None}


def snapshot(engine: Engine) -> Rows:
    with engine.connect() as conn:
        return {
            r["id"]: dict(r) for r in conn.execute(select(TABLE).order_by(TABLE.c.id)).mappings()
        }


def db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        value = conn.execute(select(func.now())).scalar_one()
    assert isinstance(value, datetime)
    return value


DEFAULT_POLICIES = """
[[policy]]
name = "failed-sends"
retention_days = 30
where = { transmission_status = "failed" }

[[policy]]
name = "sms"
retention_days = 90
where = { type = "sms" }

[[policy]]
name = "default"
retention_days = 365
"""


def config_text(
    clean: str = "", guard: str = "", policies: str = DEFAULT_POLICIES, table: str | None = None
) -> str:
    target = f'[target]\ntable = "{table}"\n' if table else ""
    return f"{target}[clean]\n{clean}\n[guard]\n{guard}\n{policies}"


def settings(
    clean: str = "", guard: str = "", policies: str = DEFAULT_POLICIES, table: str | None = None
) -> Settings:
    return config.parse(config_text(clean, guard, policies, table), "test.toml")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


_databases = itertools.count()


@contextmanager
def fresh_database(server_url: URL, template: str | None = None) -> Iterator[URL]:
    """A database of its own on the test server (a copy of `template`, else empty), dropped
    after: the conftest's `database_url` for one test, or a module's for a shared scenario."""
    name = f"dr_t_{os.getpid()}_{next(_databases)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    copy = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(sql(f'CREATE DATABASE "{name}"{copy}'))
    try:
        yield server_url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def apply_sql(conn: Connection, statements: Iterable[str]) -> None:
    """Run printed SQL as psql would: the text as it is (no bound parameters, so a `:name`
    or a `%` in a literal stays itself)."""
    for statement in statements:
        conn.exec_driver_sql(statement, execution_options={"no_parameters": True})


def apply_grants(conn: Connection, name: str, purpose: str, s: Settings | None = None) -> None:
    """What `db grants --role NAME --purpose PURPOSE` prints with a database URL, run on
    `conn`, whose role (an administrator) then owns the view of the read-only grants."""
    fitted = db_grants.fitted(conn, s or settings(), purpose)  # type: ignore[arg-type]
    apply_sql(conn, db_grants.statements(fitted, name, purpose))  # type: ignore[arg-type]
    if purpose == "run":
        apply_sql(conn, db_grants.lag_statements(fitted, name))


@contextmanager
def granted_role(
    engine: Engine, database_url: URL, purpose: str, s: Settings | None = None
) -> Iterator[tuple[str, str]]:
    """A LOGIN role (not a superuser, not the table's owner) with exactly the rights `db
    grants --purpose PURPOSE` prints, given by `engine`'s role: its name and its
    postgresql:// URL. Dropped after."""
    name = f"dr_{purpose.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sql(f"CREATE ROLE {name} LOGIN"))
        apply_grants(conn, name, purpose, s)
    url = database_url.set(drivername="postgresql", username=name)
    try:
        yield name, url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(sql(f"DROP OWNED BY {name}"))
            conn.execute(sql(f"DROP ROLE {name}"))


def run_job(
    engine: Engine, s: Settings, on_chunk: Callable[[Chunk], None] | None = None, **options: Any
) -> Outcome:
    """One run of the job in-process (`job.run`) with `Options(**options)`."""
    return job.run(
        engine, s, Request(Options(**options)), stop=Stop(), hooks=Hooks(on_chunk=on_chunk)
    )


def due_now(engine: Engine, s: Settings, outcome: Outcome) -> int:
    """A fresh count of due rows at the run's own cutoffs (the oracle over the table)."""
    assert outcome.plan is not None
    now = outcome.plan.rules.now
    return sum(1 for row in snapshot(engine).values() if oracle.is_due(row, s, now))


@contextmanager
def transaction_ids_taken() -> Iterator[list[int]]:
    """The transaction ids that the statements run inside take (a write takes one), as each
    statement's own session tells right after it (`pg_current_xact_id_if_assigned()` on its
    DBAPI connection, past SQLAlchemy's events). Unlike txid_current_snapshot() before and
    after, it sees this process's statements only, not another test's on the same server.
    A statement on an AUTOCOMMIT connection has ended its transaction by then (the run
    lock's connection: advisory locks only)."""
    taken: list[int] = []

    def after(conn: Connection, *_: Any) -> None:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        xid = raw.execute("SELECT pg_current_xact_id_if_assigned()").fetchone()[0]
        if xid is not None:
            taken.append(int(xid))

    event.listen(Engine, "after_cursor_execute", after)
    try:
        yield taken
    finally:
        event.remove(Engine, "after_cursor_execute", after)


def assert_no_marker(*texts: str) -> None:
    for text in texts:
        assert MARK not in text, "personal data leaked into output"


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI in-process (click's CliRunner); `result.stdout` and `result.stderr` apart."""
    return CliRunner().invoke(cli, list(args), prog_name="dispatch-retention", env=env)


# --- seeding and the invariants (faults.py and the tests) ---------------------------------

AUDIT_SCHEMA = "dispatch_retention"
DUE_DAYS, YOUNG_DAYS = 500, 1  # past every window of DEFAULT_POLICIES / inside all of them


def seed_series(
    engine: Engine,
    ids: Iterable[int],
    young: Callable[[int], bool] = lambda _id: False,
    *,
    mixed: bool = False,
) -> tuple[set[int], set[int]]:
    """The one bulk seeder: marked dispatches like `dispatch()` (delivered, personal values
    from `personal()`) in one statement. `young(id)` ones YOUNG_DAYS old (never due), the
    rest DUE_DAYS old (due under every DEFAULT_POLICIES window). All sms of member 1000 + id;
    `mixed`: types cycle sms, email, push by id, every seventh id is a failed send and the
    members repeat every 97 ids (1000 + id % 97). Returns (due ids, young ids)."""
    all_ids = list(ids)
    flags = [bool(young(i)) for i in all_ids]
    with engine.begin() as conn:
        conn.execute(
            sql(
                "INSERT INTO dispatches (id, type, content, member_id, msisdn, email, app_token,"
                " transmission_status, delivery_status, external_delivery_status, created_at,"
                " updated_at, scheduled_at, transmitted_at, delivered_at)"
                " SELECT s.id, s.type, jsonb_build_object('body', :mark || '-content-' || s.id),"
                " s.member_id, '+47' || :mark || s.id,"
                " :mark || '.' || s.id || '@example.invalid', :mark || '-token-' || s.id,"
                " s.status, 'delivered', 'delivered', t.at, t.at, t.at, t.at, t.at"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:types AS text[]),"
                " CAST(:statuses AS text[]), CAST(:members AS bigint[]),"
                " CAST(:young AS boolean[])) AS s(id, type, status, member_id, young)"
                " CROSS JOIN LATERAL (SELECT now() - make_interval(days =>"
                " CASE WHEN s.young THEN :young_days ELSE :due_days END) AS at) AS t"
            ),
            {
                "mark": MARK,
                "ids": all_ids,
                "types": [("sms", "email", "push")[i % 3] if mixed else "sms" for i in all_ids],
                "statuses": ["failed" if mixed and i % 7 == 0 else "transmitted" for i in all_ids],
                "members": [1000 + (i % 97 if mixed else i) for i in all_ids],
                "young": flags,
                "young_days": YOUNG_DAYS,
                "due_days": DUE_DAYS,
            },
        )
    young_ids = {i for i, f in zip(all_ids, flags, strict=True) if f}
    return set(all_ids) - young_ids, young_ids


def assert_no_half_cleaned_row(
    after: Rows, *, before: Rows | None = None, s: Settings | None = None
) -> set[int]:
    """The one check that no dispatch is half cleaned; returns the ids of the cleaned rows.

    A cleaned row holds what cleaning writes in every column of `s.clean.columns` (the
    default settings' when `s` is None), has `cleaned_at` set and `updated_at` equal to it.
    With `before` (a `snapshot()` taken earlier), the cleaned rows are those that changed:
    every other row is unchanged to the byte, and a cleaned row keeps each kept column.
    Without it, they are those whose `cleaned_at` is set, and every other row still holds
    its MARK in each of those columns (rows seeded by `dispatch()` or `seed_series()`)."""
    s = s or settings()
    stripped = {c: s.clean.replace.get(c) for c in s.clean.columns}
    kept = [c for c in KEPT_COLUMNS if c not in ("cleaned_at", "updated_at")]
    if before is not None:
        assert before.keys() == after.keys()
    cleaned: set[int] = set()
    for row_id, new in after.items():
        if before is not None:
            old = before[row_id]
            if new == old:
                continue
            assert {c: old[c] for c in kept} == {c: new[c] for c in kept}, f"row {row_id}"
        elif new["cleaned_at"] is None:
            personal = [new[c] for c in s.clean.columns]
            assert all(MARK in json.dumps(v) for v in personal), f"row {row_id} half cleaned"
            continue
        assert {c: new[c] for c in s.clean.columns} == stripped, f"row {row_id} half cleaned"
        assert new["cleaned_at"] is not None, f"row {row_id} stripped, not stamped"
        assert new["updated_at"] == new["cleaned_at"], f"row {row_id}"
        cleaned.add(row_id)
    return cleaned


def assert_consistent(engine: Engine, due: Collection[int]) -> set[int]:
    """The invariants every fault must keep; returns the cleaned ids.

    No dispatch is half cleaned (`assert_no_half_cleaned_row`), only due dispatches are
    cleaned, and the audit trail accounts for each cleaned row exactly once: the chunk rows
    sum to the cleaned rows, every cleaned row lies in exactly one chunk's id window with
    that chunk's `cleaned_at`, and every chunk's count is right."""
    cleaned = assert_no_half_cleaned_row(snapshot(engine))
    with engine.connect() as conn:
        total = conn.execute(
            sql(f"SELECT coalesce(sum(rows), 0) FROM {AUDIT_SCHEMA}.chunks")
        ).scalar_one()
        unaccounted = conn.execute(
            sql(
                f"SELECT d.id, count(c.seq) FROM dispatches d LEFT JOIN {AUDIT_SCHEMA}.chunks c"
                " ON d.id BETWEEN c.first_id AND c.last_id AND c.cleaned_at = d.cleaned_at"
                " WHERE d.cleaned_at IS NOT NULL GROUP BY d.id HAVING count(c.seq) <> 1"
                " LIMIT 10"
            )
        ).all()
        miscounted = conn.execute(
            sql(
                f"SELECT c.run_id, c.seq, c.rows, count(d.id) FROM {AUDIT_SCHEMA}.chunks c"
                " LEFT JOIN dispatches d ON d.id BETWEEN c.first_id AND c.last_id"
                " AND d.cleaned_at = c.cleaned_at GROUP BY c.run_id, c.seq, c.rows"
                " HAVING c.rows <> count(d.id) LIMIT 10"
            )
        ).all()
    not_due = cleaned - set(due)
    assert not not_due, f"cleaned but not due: {sorted(not_due)[:10]}"
    assert total == len(cleaned), f"audit rows {total} != cleaned rows {len(cleaned)}"
    assert unaccounted == [], f"cleaned rows not in exactly one chunk record: {unaccounted}"
    assert miscounted == [], f"chunk records whose count is wrong: {miscounted}"
    return cleaned


def cleaned_count(engine: Engine) -> int:
    """How many dispatches have `cleaned_at` set."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sql("SELECT count(*) FROM dispatches WHERE cleaned_at IS NOT NULL")
            ).scalar_one()
        )


def remaining_due(engine: Engine, due: Collection[int]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sql("SELECT count(*) FROM dispatches WHERE id = ANY(:ids) AND cleaned_at IS NULL"),
                {"ids": list(due)},
            ).scalar_one()
        )


def run_records(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every run record by run id, with its audited row count (the sum of its chunks)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sql(
                f"SELECT r.*, coalesce(sum(c.rows), 0) AS audited_rows, count(c.seq) AS chunks"
                f" FROM {AUDIT_SCHEMA}.runs r LEFT JOIN {AUDIT_SCHEMA}.chunks c USING (run_id)"
                " GROUP BY r.run_id ORDER BY r.started_at"
            )
        ).mappings()
        return {str(r["run_id"]): dict(r) for r in rows}


def guards_off(conn: Connection) -> None:
    """For the rest of this transaction, the audit trail's triggers (its guards and events)
    do not fire: a test sets up or resets a trail as its owner might (ALTER TABLE ... DISABLE
    TRIGGER USER; since migration 0008 they are ENABLE ALWAYS, so `session_replication_role`
    no longer skips them). They are ENABLE ALWAYS again in the same transaction, just before
    its COMMIT, so no test leaves them off."""
    tables = [f"{AUDIT_SCHEMA}.{t}" for t in TRAIL_TABLES]
    for table in tables:
        conn.execute(sql(f"ALTER TABLE {table} DISABLE TRIGGER USER"))

    def enable_again(_: Connection) -> None:
        with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
            for table, triggers in trail_triggers().items():
                for trigger in sorted(triggers):
                    cursor.execute(
                        f"ALTER TABLE {AUDIT_SCHEMA}.{table} ENABLE ALWAYS TRIGGER {trigger}"
                    )

    event.listen(conn, "commit", enable_again, once=True)
