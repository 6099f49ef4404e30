"""Building blocks for tests: dispatch rows with personal-data markers, snapshots, configs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, select

from dispatch_retention import config
from dispatch_retention.config import Settings, Target
from dispatch_retention.schema import dispatches_table

TABLE = dispatches_table(Target())
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


def snapshot(engine: Engine) -> dict[int, dict[str, Any]]:
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


def config_text(clean: str = "", guard: str = "", policies: str = DEFAULT_POLICIES) -> str:
    return f"[clean]\n{clean}\n[guard]\n{guard}\n{policies}"


def settings(clean: str = "", guard: str = "", policies: str = DEFAULT_POLICIES) -> Settings:
    return config.parse(config_text(clean, guard, policies), "test.toml")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def assert_no_marker(*texts: str) -> None:
    for text in texts:
        assert MARK not in text, "personal data leaked into output"


def as_json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
