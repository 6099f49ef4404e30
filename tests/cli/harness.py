"""What the command-line tests share: a seeded table, the plan table as printed, the
invalid configs and the secret URL's parts. Their fixtures live in tests/cli/conftest.py."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from tests.helpers import DAY, config_text, db_now, dispatch, insert_rows

PASSWORD = "s3cr3tPW"
UNREACHABLE = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"  # nothing listens on port 1
AUDIT = "dispatch_retention"  # the audit schema of config_text() (the default)


def seed(engine: Engine) -> set[int]:
    """Rows for every plan line; returns the ids that are due under the default policies."""
    now = db_now(engine)
    insert_rows(
        engine,
        [
            dispatch(1, now - 500 * DAY, type="sms"),  # sms (90 days): due
            dispatch(2, now - 100 * DAY, type="sms"),  # sms: due
            dispatch(3, now - 60 * DAY, type="sms"),  # sms: not yet
            dispatch(4, now - 40 * DAY, transmission_status="failed"),  # failed-sends: due
            dispatch(5, now - 400 * DAY, type="email"),  # default (365 days): due
            dispatch(6, now - 200 * DAY, type="email"),  # default: not yet
            dispatch(7, now - 5 * DAY, type="push"),  # young
            dispatch(8, now - 100 * DAY, type="sms", delivery_status="pending"),  # in grace
        ],
    )
    return {1, 2, 4, 5}


EXPECTED_PLAN = {"failed-sends": (30, 1), "sms": (90, 2), "default": (365, 1)}


def plan_table(stdout: str) -> dict[str, tuple[int, int]]:
    """{policy: (retention_days, due)} read back from the plan table `run --dry-run` prints."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["policy"]) + 2
    table: dict[str, tuple[int, int]] = {}
    for line in lines[start:]:
        if not line.strip():
            break
        name, retention, _cutoff, due = line.split()
        table[name] = (int(retention), int(due))
    return table


INVALID_CONFIGS = [
    pytest.param(config_text(clean="chunk_sise = 5"), "clean.chunk_sise", id="unknown-key"),
    pytest.param(config_text(clean='chunk_size = "5"'), "clean.chunk_size", id="wrong-type"),
    pytest.param(
        config_text(policies='[[policy]]\nname = "x"\nretention_days = 3\n'),
        "policy[0].retention_days",
        id="under-the-floor",
    ),
    pytest.param(config_text(clean='columns = ["id"]'), "clean.columns", id="kept-column-listed"),
    pytest.param("[target]\ntable = 'x; drop table y'\n", "target.table", id="bad-table"),
    pytest.param("[[policy]\n", "not valid TOML", id="not-toml"),
    pytest.param(None, "cannot read the file", id="missing-file"),
]
