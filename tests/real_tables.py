"""The dispatches table as application frameworks make it (README "Real tables"), for the real-table
tests: DDL as a Rails or Django migration would emit it (enum types, integer codes, `json`
or `text` content, `timestamp(6) without time zone`, range partitions, extra personal
columns, quoted names), the config each needs, and the same dispatches seeded in each
table's own values (`real_table`, a fixture over every variant).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from dispatch_retention import config
from tests import oracle
from tests.helpers import DAY, DEFAULT_POLICIES, MARK, db_now, write_config

PERSONAL = ("content", "msisdn", "email", "app_token")
#: The tests' policies, with the sms one also matching push (a word an enum may lack).
POLICIES = DEFAULT_POLICIES.replace(
    'where = { type = "sms" }', 'where = { type = ["sms", "push"] }'
)
assert POLICIES != DEFAULT_POLICIES

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
    Variant(
        "timestamp(0) without time zone (Laravel's timestamps())",
        _plain(ts="timestamp(0) without time zone"),
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


def make_table(variant: Variant, engine: Engine, url_string: str, tmp_path: Path) -> Table:
    """The test database's dispatches table replaced by `variant`'s, seeded, with its config."""
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
    return Table(variant, engine, url_string, path, config.load(path), rows)


def due_ids(table: Table, now: datetime) -> set[int]:
    return {r["id"] for r in table.rows if oracle.is_due(r, table.settings, now)}


# --- the checks --------------------------------------------------------------------------------
