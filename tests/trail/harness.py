"""What the audit-trail tests share: seeding in bulk, reading the run and chunk records, the
trail's invariants (every cleaned row in exactly one chunk record, nothing half cleaned),
and the console script in a subprocess. Their fixtures live in tests/trail/conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from typing import Any

from sqlalchemy import Engine, text

from dispatch_retention import holds
from dispatch_retention.config import DEFAULT_CLEAN_COLUMNS
from dispatch_retention.lock import RunLock, run_locks
from dispatch_retention.schema import AuditTables

from ..helpers import (
    MARK,
    SCRIPT,
    invoke,
    snapshot,
)

SCHEMA = "dispatch_retention"
TABLES = AuditTables(SCHEMA)
WHOLE_TARGET = run_locks("public.dispatches", None)  # the locks a run without --shard takes
STRIPPED = {"content": {}, "msisdn": None, "email": None, "app_token": None}


# --- running the CLI -------------------------------------------------------------------------


def spawn(*args: str, **streams: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([str(SCRIPT), *args], text=True, **streams)


def read_until_first_chunk(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Log events of a running subprocess up to and including its first committed chunk."""
    assert proc.stderr is not None
    seen: list[dict[str, Any]] = []
    for line in proc.stderr:  # ends at EOF if the run never commits a chunk
        seen.append(json.loads(line))
        if seen[-1]["event"] == "chunk_committed":
            return seen
    raise AssertionError(f"the run ended before committing a chunk: {seen}")


# --- seeding and reading the database --------------------------------------------------------

BULK_SQL = """
INSERT INTO dispatches (id, type, content, member_id, msisdn, email, app_token,
    transmission_status, delivery_status, external_delivery_status,
    created_at, updated_at, scheduled_at, transmitted_at, delivered_at)
SELECT g, (ARRAY['sms', 'email', 'push'])[1 + g % 3],
    jsonb_build_object('body', :mark || '-content-' || g), 1000 + g % 97,
    '+47' || :mark || g, :mark || '.' || g || '@example.invalid', :mark || '-token-' || g,
    CASE WHEN g % 7 = 0 THEN 'failed' ELSE 'transmitted' END, 'delivered', 'delivered',
    ts, ts, ts, ts, ts
FROM generate_series(1, CAST(:n AS bigint)) AS g,
    LATERAL (SELECT now() - CASE WHEN g % 10 = 0 THEN interval '5 days'
                                 ELSE interval '500 days' END AS ts) AS t
"""


def bulk_seed(engine: Engine, n: int) -> int:
    """n marked dispatches in one statement: every tenth young, the rest due; returns #due."""
    with engine.begin() as conn:
        conn.execute(text(BULK_SQL), {"n": n, "mark": MARK})
    return n - n // 10


def expected_policy(row: dict[str, Any]) -> str:
    """The binding policy of a dispatch under the default test policies (shortest wins)."""
    if row["transmission_status"] == "failed":
        return "failed-sends"
    return "sms" if row["type"] == "sms" else "default"


def chunk_records(engine: Engine, run_id: str | None = None) -> list[dict[str, Any]]:
    sql = f"SELECT * FROM {SCHEMA}.chunks" + (" WHERE run_id = :r" if run_id else "")
    with engine.connect() as conn:
        return [
            dict(r) for r in conn.execute(text(sql + " ORDER BY seq"), {"r": run_id}).mappings()
        ]


def run_records(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT * FROM {SCHEMA}.runs")).mappings()
        return {str(r["run_id"]): dict(r) for r in rows}


def cleaned_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM dispatches WHERE cleaned_at IS NOT NULL")
            ).scalar_one()
        )


def assert_chunks_account_for_every_cleaned_row(engine: Engine) -> None:
    """The chunk records partition the cleaned dispatches exactly, policy by policy."""
    rows = snapshot(engine)
    cleaned = {i for i, r in rows.items() if r["cleaned_at"] is not None}
    chunks = chunk_records(engine)
    assert sum(c["rows"] for c in chunks) == len(cleaned)
    recovered: set[int] = set()
    for c in chunks:
        members = {
            i
            for i in range(c["first_id"], c["last_id"] + 1)
            if i in rows and rows[i]["cleaned_at"] == c["cleaned_at"]
        }
        assert len(members) == c["rows"], f"chunk {c['run_id']}/{c['seq']}"
        assert Counter(expected_policy(rows[i]) for i in members) == Counter(c["by_policy"])
        assert not members & recovered, "two chunk records claim the same dispatch"
        recovered |= members
    assert recovered == cleaned


def assert_nothing_half_cleaned(engine: Engine) -> None:
    """Personal columns are all stripped if and only if cleaned_at is set."""
    for row_id, row in snapshot(engine).items():
        stripped = {c: row[c] for c in DEFAULT_CLEAN_COLUMNS} == STRIPPED
        untouched = all(MARK in json.dumps(row[c]) for c in DEFAULT_CLEAN_COLUMNS)
        if row["cleaned_at"] is None:
            assert untouched, f"row {row_id} lost personal data without cleaned_at"
        else:
            assert stripped, f"row {row_id} is half cleaned"
            assert row["updated_at"] == row["cleaned_at"]


def wait_for_lock_release(engine: Engine, timeout: float = 10) -> None:
    """Until the server has noticed that a killed process's session (and lock) is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with RunLock(engine, WHOLE_TARGET) as lock:
            if lock.acquired:
                return
        time.sleep(0.05)
    raise AssertionError("the advisory lock of the killed run was never released")


BACKLOG = 20_000


def hold(engine: Engine, member_id: int, reason: str) -> None:
    """A legal hold through the library (the CLI's `hold add` is tested on its own)."""
    with engine.begin() as conn:
        holds.add(conn, TABLES, member_id, reason, "test")


def audit_list(base: list[str], *extra: str) -> list[dict[str, Any]]:
    result = invoke(*base, "audit", "list", "--format", "json", *extra)
    assert result.exit_code == 0, result.output
    return list(json.loads(result.stdout))


def audit_show(base: list[str], run_id: str) -> dict[str, Any]:
    result = invoke(*base, "audit", "show", run_id, "--format", "json")
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def schema_tables(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = :s ORDER BY table_name"
                ),
                {"s": SCHEMA},
            ).scalars()
        )
