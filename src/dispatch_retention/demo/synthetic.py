"""Synthetic dispatches for the demo and the benchmarks: generated inside the server.

Every type and status, ages spread evenly over two years with ids rising with `created_at`,
about 20 % unsettled, some still scheduled in the future, and content of about 1.1 KB. The
personal data is fake (msisdns in +47 4xxxxxxx, e-mails at example.invalid).

`create_dispatches()` makes the dispatches table as the Dispatch model documents it, for
the demo, the tests and the benchmarks only.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Connection,
    Index,
    Table,
    text,
)
from sqlalchemy.schema import CreateSchema

from dispatch_retention.config import Target
from dispatch_retention.names import quoted_table
from dispatch_retention.rule.dispatch_table import dispatches_table, due_index

SEED_SQL = """
INSERT INTO {table} (id, type, content, member_id, msisdn, email, app_token,
    transmission_status, delivery_status, external_delivery_status,
    created_at, updated_at, scheduled_at, transmitted_at, delivered_at)
SELECT id, type,
    CASE type WHEN 'sms' THEN jsonb_build_object('body', body)
              WHEN 'email' THEN jsonb_build_object('subject', left(body, 40), 'html', body)
              ELSE jsonb_build_object('title', left(body, 30), 'body', body) END,
    member_id,
    CASE WHEN type = 'sms' THEN '+474' || lpad((id % 10000000)::text, 7, '0') END,
    CASE WHEN type = 'email' THEN 'member' || member_id || '@example.invalid' END,
    CASE WHEN type = 'push' THEN md5(id::text || 'token') END,
    st.ts, st.ds, st.ext,
    created_at, created_at + interval '5 seconds',
    CASE WHEN st.ts = 'scheduled' THEN created_at + r2 * interval '60 days' ELSE created_at END,
    CASE WHEN st.ts = 'transmitted' THEN created_at + interval '1 second' END,
    CASE WHEN st.ds = 'delivered' THEN created_at + interval '3 seconds' END
FROM (
    SELECT g AS id,
        (ARRAY['sms', 'email', 'push'])[1 + floor(random() * 3)::int] AS type,
        1 + floor(random() * :members)::bigint AS member_id,
        CAST(:now AS timestamptz) - interval '730 days' * (1 - (g - :first)::float8 / :rows)
            AS created_at,
        random() AS r1, random() AS r2,
        repeat(md5(g::text), 34) AS body
    FROM generate_series(CAST(:first AS bigint), CAST(:first AS bigint) + :rows - 1) AS g
) AS s
CROSS JOIN LATERAL (
    SELECT * FROM (VALUES
        (0.00, 0.70, 'transmitted', 'delivered', 'delivered'),
        (0.70, 0.78, 'transmitted', 'failed', 'undeliverable'),
        (0.78, 0.80, 'failed', 'pending', NULL),
        (0.80, 0.92, 'transmitted', 'pending', NULL),
        (0.92, 0.99, 'scheduled', 'pending', NULL),
        (0.99, 1.01, 'transmitted', 'pending', 'queued-upstream')
    ) AS v(lo, hi, ts, ds, ext)
    WHERE s.r1 >= v.lo AND s.r1 < v.hi
) AS st
"""


def seed(
    conn: Connection,
    table: Table,
    *,
    rows: int,
    now: datetime,
    first_id: int = 1,
    members: int = 50_000,
    random_seed: float = 0.42,
) -> None:
    """Insert `rows` synthetic dispatches with ids from `first_id` (deterministic)."""
    conn.execute(text("SELECT setseed(:s)"), {"s": random_seed})
    target = quoted_table(table)
    conn.execute(
        text(SEED_SQL.format(table=target)),
        {"rows": rows, "first": first_id, "now": now, "members": members},
    )


def create_dispatches(conn: Connection, target: Target) -> Table:
    """Create the dispatches table with production-like indexes (tests, demo, benchmarks)."""
    table = dispatches_table(target)
    if target.schema_name:
        conn.execute(CreateSchema(target.schema_name, if_not_exists=True))
    table.create(conn, checkfirst=True)
    for index in (
        Index(f"{table.name}_member_id_idx", table.c.member_id),
        Index(f"{table.name}_msisdn_idx", table.c.msisdn),
        due_index(table),
    ):
        index.create(conn, checkfirst=True)
    return table
