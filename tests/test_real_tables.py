"""Real tables (issue 16): the dispatches table as application frameworks make it.

Each variant is DDL as a Rails or Django migration would emit it (enum types, `json` or
`text` content, `timestamp(6) without time zone`, range partitions), seeded with the same
dispatches written in that table's own values. After a run, the oracle (tests/oracle.py,
in the API's words) decides: exactly the due rows are cleaned, and every other row is
byte-identical (`to_jsonb` of the row before and after); `verify` then finds nothing and
exits 5 once a row is overdue again; the audit trail counts what was cleaned.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from dispatch_retention import config

from . import oracle
from .helpers import DAY, MARK, db_now, run_job, script, write_config

PERSONAL = ("content", "msisdn", "email", "app_token")
POLICIES = """
[[policy]]
name = "failed-sends"
retention_days = 30
where = { transmission_status = "failed" }

[[policy]]
name = "sms"
retention_days = 90
where = { type = ["sms", "push"] }

[[policy]]
name = "default"
retention_days = 365
"""

ENUMS = """
CREATE TYPE dispatch_type AS ENUM ('sms', 'email', 'push');
CREATE TYPE transmission_status AS ENUM ('scheduled', 'transmitted', 'failed');
CREATE TYPE delivery_status AS ENUM ('pending', 'delivered', 'failed');
"""


def columns(
    *,
    type_: str = "text",
    transmission: str = "text",
    delivery: str = "text",
    content: str = "jsonb",
    ts: str = "timestamp with time zone",
    pk: str = "bigserial PRIMARY KEY",
    extra: str = "",
) -> str:
    """The column list of a dispatches table, with the types an application chose."""
    return f"""
      id {pk},
      type {type_} NOT NULL,
      content {content},
      member_id bigint,
      msisdn character varying,
      email character varying,
      app_token character varying,
      transmission_status {transmission},
      delivery_status {delivery},
      external_delivery_status character varying,
      created_at {ts} NOT NULL,
      updated_at {ts},
      scheduled_at {ts},
      transmitted_at {ts},
      delivered_at {ts},
      cleaned_at {ts}{extra}"""


@dataclass(frozen=True)
class Variant:
    """One way an application made the table: its DDL, how an API word or a timestamp or a
    content value is written into it, and the config lines it needs."""

    name: str
    ddl: str
    table: str = "dispatches"
    config: str = ""
    encode: Callable[[str, Any], Any] = lambda _column, value: value
    naive: bool = False
    text_content: bool = False
    #: [clean] lines, and the application's own personal columns: seeded value, cleaned value
    clean: str = ""
    extra: dict[str, tuple[Callable[[int], Any], Any]] = field(default_factory=dict)


def _plain(table: str = "dispatches", **kinds: str) -> str:
    return f"CREATE TABLE {table} ({columns(**kinds)});"


PARTITION_KEY = ",\n      PRIMARY KEY (id, created_at)"
PARTITIONED = f"""
CREATE TABLE dispatches ({columns(pk="bigserial", extra=PARTITION_KEY)})
  PARTITION BY RANGE (created_at);
CREATE TABLE dispatches_old PARTITION OF dispatches FOR VALUES FROM (MINVALUE) TO ('2025-01-01');
CREATE TABLE dispatches_2025 PARTITION OF dispatches
  FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE dispatches_new PARTITION OF dispatches FOR VALUES FROM ('2026-01-01') TO (MAXVALUE);
"""

RAILS_CODES = {
    "type": {"sms": 0, "email": 1, "push": 2},
    "transmission_status": {"scheduled": 0, "transmitted": 1, "failed": 2},
    "delivery_status": {"pending": 0, "delivered": 1, "failed": 2},
}
CODES_TOML = """
[target.codes]
type = { sms = 0, email = 1, push = 2 }
transmission_status = { scheduled = 0, transmitted = 1, failed = 2 }
delivery_status = { pending = 0, delivered = 1, failed = 2 }
"""
UPPER_ENUMS = """
CREATE TYPE dispatch_kind AS ENUM ('SMS', 'EMAIL', 'PUSH');
CREATE TYPE sending AS ENUM ('SCHEDULED', 'TRANSMITTED', 'FAILED');
CREATE TYPE delivery AS ENUM ('PENDING', 'DELIVERED', 'FAILED', 'EXPIRED');
"""
LABELS_TOML = """
[target.codes]
type = { sms = "SMS", email = "EMAIL", push = "PUSH" }
transmission_status = { scheduled = "SCHEDULED", transmitted = "TRANSMITTED", failed = "FAILED" }
delivery_status = { pending = "PENDING", delivered = "DELIVERED", failed = "FAILED" }
"""

VARIANTS = [
    Variant(
        "enum types",
        ENUMS
        + _plain(
            type_="dispatch_type", transmission="transmission_status", delivery="delivery_status"
        ),
    ),
    Variant(
        "integer codes (Rails enums)",
        _plain(type_="integer", transmission="smallint", delivery="integer"),
        config=CODES_TOML,
        encode=lambda column, word: RAILS_CODES[column][word],
    ),
    Variant(
        "enum labels other than the API's words",
        UPPER_ENUMS + _plain(type_="dispatch_kind", transmission="sending", delivery="delivery"),
        config=LABELS_TOML,
        encode=lambda _column, word: word.upper(),
    ),
    Variant("content json", _plain(content="json")),
    Variant("content text", _plain(content="text"), text_content=True),
    Variant(
        "timestamp(6) without time zone",
        _plain(ts="timestamp(6) without time zone"),
        naive=True,
    ),
    Variant("partitioned by created_at", PARTITIONED),
    Variant(
        "names that need quoting",
        'CREATE SCHEMA "Messaging";\n' + _plain('"Messaging"."Dispatches"'),
        table='"Messaging"."Dispatches"',
    ),
    Variant(
        "extra personal columns",
        _plain(
            extra=",\n      recipient_name character varying NOT NULL DEFAULT '',"
            "\n      provider_error text"
        ),
        clean=(
            'columns = ["content", "msisdn", "email", "app_token", "recipient_name", '
            '"provider_error"]\nreplace = { content = {}, recipient_name = "" }'
        ),
        extra={
            "recipient_name": (lambda i: f"{MARK} Name {i}", ""),
            "provider_error": (lambda i: f"550 rejected +47{MARK}{i}", None),
        },
    ),
]


# --- seeding in the table's own values -------------------------------------------------------


def api_rows(now: datetime, count: int, seed: int) -> list[dict[str, Any]]:
    """Dispatches in the API's words, spread over two years and every status."""
    rnd = random.Random(seed)
    rows = []
    for i in range(1, count + 1):
        created = now - DAY * rnd.uniform(0, 800)
        scheduled = rnd.choice([None, created, now + DAY * rnd.uniform(1, 30)])
        rows.append(
            {
                "id": i,
                "type": rnd.choice(["sms", "email", "push"]),
                "content": {"body": f"{MARK}-content-{i}"},
                "member_id": rnd.randrange(1, 50),
                "msisdn": f"+47{MARK}{i}",
                "email": f"{MARK}.{i}@example.invalid",
                "app_token": rnd.choice([None, f"{MARK}-token-{i}"]),
                "transmission_status": rnd.choice(["scheduled", "transmitted", "failed", None]),
                "delivery_status": rnd.choice(["pending", "delivered", "failed", None]),
                "external_delivery_status": rnd.choice([None, "DELIVRD", "UNDELIV"]),
                "created_at": created,
                "updated_at": created,
                "scheduled_at": scheduled,
                "transmitted_at": None,
                "delivered_at": None,
                "cleaned_at": None,
            }
        )
    return rows


WORDS = ("type", "transmission_status", "delivery_status")
TIMES = ("created_at", "updated_at", "scheduled_at", "transmitted_at", "delivered_at")


def stored(variant: Variant, row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for column in WORDS:
        if out[column] is not None:
            out[column] = variant.encode(column, out[column])
    out["content"] = json.dumps(out["content"])
    if variant.naive:
        for column in TIMES:
            if out[column] is not None:
                out[column] = out[column].astimezone(UTC).replace(tzinfo=None)
    return out


def insert(engine: Engine, variant: Variant, rows: list[dict[str, Any]]) -> None:
    names = list(rows[0])
    placeholders = ", ".join(f":{n}" for n in names)
    statement = text(f"INSERT INTO {variant.table} ({', '.join(names)}) VALUES ({placeholders})")
    with engine.begin() as conn:
        conn.execute(statement, [stored(variant, r) for r in rows])


def image(engine: Engine, variant: Variant) -> dict[int, str]:
    """Every row as PostgreSQL renders it: byte-identical means identical text."""
    with engine.connect() as conn:
        found = conn.execute(text(f"SELECT id, to_jsonb(t)::text FROM {variant.table} t"))
        return {int(i): str(j) for i, j in found}


def image_without(engine: Engine, variant: Variant, dropped: tuple[str, ...]) -> dict[int, str]:
    minus = ", ".join(f"'{c}'" for c in dropped)
    query = f"SELECT id, (to_jsonb(t) - ARRAY[{minus}])::text FROM {variant.table} t"
    with engine.connect() as conn:
        return {int(i): str(j) for i, j in conn.execute(text(query))}


@dataclass
class Table:
    variant: Variant
    engine: Engine
    url: str
    config: Path
    settings: config.Settings
    rows: list[dict[str, Any]]


@pytest.fixture(params=VARIANTS, ids=[v.name for v in VARIANTS])
def real_table(request: Any, engine: Engine, url_string: str, tmp_path: Path) -> Iterator[Table]:
    variant: Variant = request.param
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(variant.ddl))
    now = db_now(engine)
    rows = api_rows(now, 600, seed=16)
    for row in rows:
        row.update({column: seeded(row["id"]) for column, (seeded, _) in variant.extra.items()})
    insert(engine, variant, rows)
    with engine.begin() as conn:
        conn.execute(text(f"ANALYZE {variant.table}"))
    body = (
        f"[target]\ntable = '{variant.table}'\n{variant.config}\n[clean]\n{variant.clean}\n"
        f"{POLICIES}"
    )
    path = write_config(tmp_path / "retention.toml", body)
    yield Table(variant, engine, url_string, path, config.load(path), rows)


def due_ids(table: Table, now: datetime) -> set[int]:
    return {r["id"] for r in table.rows if oracle.is_due(r, table.settings, now)}


# --- the checks --------------------------------------------------------------------------------


def test_a_run_cleans_exactly_the_due_rows_and_leaves_every_other_byte_identical(
    real_table: Table,
) -> None:
    t = real_table
    before = image(t.engine, t.variant)
    kept_part = ("cleaned_at", "updated_at", *PERSONAL, *t.variant.extra)
    before_rest = image_without(t.engine, t.variant, kept_part)
    outcome = run_job(t.engine, t.settings)
    assert outcome.status.value == "succeeded", outcome.error
    assert outcome.plan is not None
    due = due_ids(t, outcome.plan.rules.now)
    assert 0 < len(due) < len(t.rows)
    after = image(t.engine, t.variant)
    after_rest = image_without(t.engine, t.variant, kept_part)
    changed = {i for i in before if before[i] != after[i]}
    assert changed == due
    assert all(before_rest[i] == after_rest[i] for i in due)  # only the cleaned columns
    with t.engine.connect() as conn:
        extra = "".join(f", {c}" for c in t.variant.extra)
        cleaned = conn.execute(
            text(
                f"SELECT id, content::text, msisdn, email, app_token{extra} "
                f"FROM {t.variant.table} WHERE cleaned_at IS NOT NULL"
            )
        ).all()
    assert {r[0] for r in cleaned} == due
    emptied = ("{}", None, None, None, *(value for _, value in t.variant.extra.values()))
    assert all(tuple(r[1:]) == emptied for r in cleaned)
    assert outcome.rows_cleaned == len(due)


def test_verify_finds_nothing_after_a_run_and_exit_5_for_an_overdue_row(
    real_table: Table,
) -> None:
    t = real_table
    base = ["--config", str(t.config), "--database-url", t.url]
    assert run_job(t.engine, t.settings).status.value == "succeeded"
    clean_bill = script(*base, "verify")
    assert clean_bill.returncode == 0, clean_bill.stdout + clean_bill.stderr
    overdue = {**t.rows[0], "id": 10_000, "transmission_status": "failed"}
    overdue["created_at"] = db_now(t.engine) - 400 * DAY
    insert(t.engine, t.variant, [overdue])
    caught = script(*base, "verify")
    assert caught.returncode == 5, caught.stdout + caught.stderr
    assert MARK not in caught.stdout + caught.stderr


def test_the_audit_trail_counts_what_the_run_cleaned(real_table: Table) -> None:
    t = real_table
    outcome = run_job(t.engine, t.settings)
    with t.engine.connect() as conn:
        audited = conn.execute(
            text("SELECT coalesce(sum(rows), 0) FROM dispatch_retention.chunks")
        ).scalar_one()
        stamped = conn.execute(
            text(f"SELECT count(*) FROM {t.variant.table} WHERE cleaned_at IS NOT NULL")
        ).scalar_one()
    assert audited == stamped == outcome.rows_cleaned > 0
    shown = script("--config", str(t.config), "--database-url", t.url, "audit", "show",
                   outcome.run_id, "--format", "json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["rows_cleaned"] == outcome.rows_cleaned


# --- what depends on the table is checked on connecting ----------------------------------------

REFUSALS = [
    (
        _plain(transmission="smallint", delivery="integer"),
        "",
        "delivery_status is integer: say which code stands for each of the API's words",
    ),
    (
        ENUMS.replace("'sms', 'email', 'push'", "'sms', 'email'")
        + _plain(
            type_="dispatch_type", transmission="transmission_status", delivery="delivery_status"
        ),
        "",
        "type: a policy names push, which the enum dispatch_type (sms, email) has no label",
    ),
    (
        UPPER_ENUMS + _plain(type_="dispatch_kind", transmission="sending", delivery="delivery"),
        LABELS_TOML.replace('"DELIVERED"', '"DONE"'),
        "delivery_status: [target.codes] names DONE, not labels of the enum delivery",
    ),
    (
        _plain(transmission="smallint", delivery="integer"),
        LABELS_TOML,
        "delivery_status is integer: its [target.codes] must be integers",
    ),
    (_plain(), CODES_TOML, "its [target.codes] must be its text values or labels"),
]


@pytest.mark.parametrize(("ddl", "codes", "reason"), REFUSALS)
@pytest.mark.parametrize("command", [["run", "--yes"], ["run", "--dry-run"], ["verify"]])
def test_a_table_the_config_does_not_fit_is_refused_naming_the_column(
    engine: Engine, url_string: str, tmp_path: Path, ddl: str, codes: str, reason: str,
    command: list[str],
) -> None:  # fmt: skip
    """Statuses the policies' words cannot be stored in: exit 2 before anything is read or
    written, naming the column and the fix; no run record."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(ddl))
    path = write_config(tmp_path / "r.toml", f"{codes}\n[clean]\n{POLICIES}")
    proc = script("--config", str(path), "--database-url", url_string, *command)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert reason in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM dispatch_retention.runs")).scalar() == 0


def test_cutoffs_on_plain_timestamps_do_not_depend_on_the_session_time_zone(
    engine: Engine, tmp_path: Path
) -> None:
    """`timestamp without time zone` holds UTC: the rows due are the same whatever
    `TimeZone` the server or a pooler gives the session (here Pacific/Kiritimati, +14 h)."""
    naive = next(v for v in VARIANTS if v.naive)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(naive.ddl))
        conn.execute(text("SELECT set_config('TimeZone', 'Pacific/Kiritimati', false)"))
    now = db_now(engine)
    rows = api_rows(now, 400, seed=7)
    insert(engine, naive, rows)
    with engine.begin() as conn:
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        conn.execute(text(f"ALTER DATABASE \"{database}\" SET TimeZone = 'Pacific/Kiritimati'"))
    settings = config.parse(f"[clean]\n{POLICIES}")
    outcome = run_job(engine, settings)
    assert outcome.plan is not None
    expected = {r["id"] for r in rows if oracle.is_due(r, settings, outcome.plan.rules.now)}
    with engine.connect() as conn:
        cleaned = set(
            conn.execute(text("SELECT id FROM dispatches WHERE cleaned_at IS NOT NULL")).scalars()
        )
    assert cleaned == expected and expected


COLUMN_REFUSALS = [
    ('columns = ["content", "msisdn", "email", "app_token", "nickname"]',
     "clean.columns names nickname, which the table does not have"),
    ('columns = ["content", "msisdn", "email", "app_token", "recipient_name"]',
     "recipient_name is NOT NULL (character varying) but clean.columns sets it to NULL"),
    ('columns = ["content", "msisdn", "email", "app_token", "attempts"]\n'
     'replace = { content = {}, attempts = "none" }',
     "clean.replace.attempts: 'none' does not fit attempts (integer)"),
]  # fmt: skip


@pytest.mark.parametrize(("clean", "reason"), COLUMN_REFUSALS)
def test_a_personal_column_that_cannot_take_what_cleaning_writes_is_refused(
    engine: Engine, url_string: str, tmp_path: Path, clean: str, reason: str
) -> None:
    """`clean.columns` names the application's own columns; whether each exists and can
    take NULL or its replacement is checked on connecting: exit 2 naming it, and `db check`
    lists it as an error."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        extra = ",\n recipient_name varchar NOT NULL DEFAULT '',\n attempts integer"
        conn.execute(text(_plain(extra=extra)))
    path = write_config(tmp_path / "r.toml", f"[clean]\n{clean}\n{POLICIES}")
    base = ["--config", str(path), "--database-url", url_string]
    refused = script(*base, "run", "--yes")
    assert refused.returncode == 2, refused.stderr
    assert reason in refused.stderr
    checked = script(*base, "db", "check")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"[error] columns: {reason}" in checked.stdout


def test_a_quoted_audit_schema_holds_the_trail(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """`audit.schema = '"Retention Audit"'`: created by `db upgrade`, written by `run`, read
    by `audit list` and `verify`; the name is quoted in every statement, never pasted."""
    insert(engine, Variant("plain", ""), api_rows(db_now(engine), 50, seed=3))
    body = f"[audit]\nschema = '\"Retention Audit\"'\n[clean]\n{POLICIES}"
    base = ["--config", str(write_config(tmp_path / "r.toml", body)), "--database-url", url_string]
    for command in (["db", "upgrade"], ["run", "--yes"], ["audit", "list"], ["verify"]):
        done = script(*base, *command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    with engine.connect() as conn:
        runs = conn.execute(text('SELECT status FROM "Retention Audit".runs')).scalars().all()
    assert runs == ["succeeded"]


def test_a_code_no_mapping_names_is_an_unknown_status_and_db_check_says_so(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Rails codes with a code the config does not map (7: a status the application added):
    such dispatches are unsettled (they wait out the grace, as the oracle says of an unknown
    status), and `db check` names the column and the value."""
    rails = next(v for v in VARIANTS if v.config == CODES_TOML)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(rails.ddl))
    now = db_now(engine)
    rows = api_rows(now, 300, seed=11)
    added = [r for r in rows if r["transmission_status"] == "failed"][:25]
    for row in added:
        row["transmission_status"], row["delivery_status"] = "bounced", None
    codes = {**RAILS_CODES, "transmission_status": {**RAILS_CODES["transmission_status"],
                                                    "bounced": 7}}  # fmt: skip
    insert(engine, replace(rails, encode=lambda c, w: codes[c][w]), rows)
    path = write_config(tmp_path / "r.toml", f"{CODES_TOML}\n[clean]\n{POLICIES}")
    checked = script("--config", str(path), "--database-url", url_string, "db", "check")
    assert "[warn ] statuses: transmission_status holds 7, which stand for none" in checked.stdout
    outcome = run_job(engine, config.load(path))
    assert outcome.plan is not None
    s = config.load(path)
    expected = {r["id"] for r in rows if oracle.is_due(r, s, outcome.plan.rules.now)}
    with engine.connect() as conn:
        cleaned = set(
            conn.execute(text("SELECT id FROM dispatches WHERE cleaned_at IS NOT NULL")).scalars()
        )
    assert cleaned == expected
    waiting = {r["id"] for r in added} - expected
    assert waiting  # some of them are inside retention + grace: unsettled, not failed sends


STATEMENT = re.compile(r"((?:CREATE|ALTER|DROP) INDEX [^;]*;)")


def advised(report: str) -> str:
    """What `db check` asks for: its findings but the `ok` ones (which show the index they
    found)."""
    return "\n".join(line for line in report.splitlines() if not line.startswith("[ok"))


def test_every_statement_db_check_prints_is_accepted_and_then_serves_the_plan(
    real_table: Table,
) -> None:
    """`db check` on the table as the application made it: every index statement it prints
    runs on the server as printed (one by one, outside a transaction, as the advice says);
    then it reports every policy index present and a run plans through them."""
    t = real_table
    base = ["--config", str(t.config), "--database-url", t.url, "db", "check"]
    advice = script(*base)
    statements = STATEMENT.findall(advised(advice.stdout))
    assert statements, advice.stdout
    with t.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.execute(text(statement))
    again = script(*base)
    assert not STATEMENT.findall(advised(again.stdout)), again.stdout
    assert "[warn ] index" not in again.stdout and "[ok   ] index" in again.stdout
    outcome = run_job(t.engine, t.settings)
    assert outcome.plan is not None and outcome.plan.through_indexes
    assert outcome.status.value == "succeeded"


def test_partitions_attached_and_detached_between_runs(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Due rows in several partitions are cleaned by one run; then one partition is detached
    (archived: no longer the job's) and a new one attached holding due rows; the next run
    cleans exactly the new one's due rows and leaves the detached one as it was."""
    partitioned = next(v for v in VARIANTS if v.name.startswith("partitioned"))
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(partitioned.ddl))
    now = db_now(engine)
    rows = api_rows(now, 500, seed=5)
    insert(engine, partitioned, rows)
    s = config.parse(f"[clean]\n{POLICIES}")
    first = run_job(engine, s)
    assert first.plan is not None
    due = {r["id"] for r in rows if oracle.is_due(r, s, first.plan.rules.now)}
    with engine.connect() as conn:
        spread = conn.execute(
            text("SELECT count(DISTINCT tableoid) FROM dispatches WHERE id = ANY(:ids)"),
            {"ids": sorted(due)},
        ).scalar_one()
    assert spread >= 2 and first.rows_cleaned == len(due)

    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatches DETACH PARTITION dispatches_old"))
        conn.execute(text("UPDATE dispatches_old SET cleaned_at = NULL, msisdn = 'x'"))
        conn.execute(
            text(
                "CREATE TABLE dispatches_old2 (LIKE dispatches INCLUDING DEFAULTS);"
                "ALTER TABLE dispatches ATTACH PARTITION dispatches_old2 "
                "FOR VALUES FROM (MINVALUE) TO ('2024-01-01')"
            )
        )
    archived = image(engine, replace(partitioned, table="dispatches_old"))
    old = [
        {**r, "id": 100_000 + r["id"], "created_at": datetime(2023, 6, 1, tzinfo=UTC)}
        for r in rows[:40]
    ]
    insert(engine, partitioned, old)
    second = run_job(engine, s)
    assert second.plan is not None
    due_new = {r["id"] for r in old if oracle.is_due(r, s, second.plan.rules.now)}
    assert due_new and second.rows_cleaned == len(due_new)
    with engine.connect() as conn:
        cleaned_new = set(
            conn.execute(
                text("SELECT id FROM dispatches_old2 WHERE cleaned_at IS NOT NULL")
            ).scalars()
        )
    assert cleaned_new == due_new
    assert image(engine, replace(partitioned, table="dispatches_old")) == archived
