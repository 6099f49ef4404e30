"""What the audit-trail tests share: the chunk records, the trail's invariant (every cleaned
row in exactly one chunk record), holds and the CLI's audit listings. Seeding, the run
records, the console script and the no-half-cleaned-row check are tests/helpers.py's; the
fixtures live in tests/conftest.py.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from sqlalchemy import Engine, text

from dispatch_retention.run.lock import RunLock, run_locks
from dispatch_retention.trail import holds
from dispatch_retention.trail.audit_tables import AuditTables
from tests.helpers import invoke, snapshot

SCHEMA = "dispatch_retention"
TABLES = AuditTables(SCHEMA)
WHOLE_TARGET = run_locks("public.dispatches", None)  # the locks a run without --shard takes


# --- reading the database ------------------------------------------------------------------


def every_tenth_young(row_id: int) -> bool:
    """The young rows of the trail's backlogs (`seed_series(..., mixed=True)`)."""
    return row_id % 10 == 0


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
