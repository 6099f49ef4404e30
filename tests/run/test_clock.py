"""The clock: a shifted process clock or time zone, a session time zone across a DST change:
the job takes its time from the database and nothing changes.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy import text as sql
from sqlalchemy.engine import URL

from dispatch_retention import config
from tests.faults import make_config, run_id_of
from tests.helpers import (
    AUDIT_SCHEMA,
    DAY,
    dispatch,
    guards_off,
    insert_rows,
    run_records,
    run_script,
    script_env,
)
from tests.oracle import is_due

# --- the clock -------------------------------------------------------------------------------

# Debian's libfaketime moves the process's wall clock (FAKETIME="+5d"); the monotonic clock
# is left alone, as the job's budgets and timeouts read it. `.ci/run` installs it.
FAKETIME_LIBRARIES = ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime")


@pytest.fixture(scope="module")
def faketime() -> Path | None:
    """libfaketime, or None where the package is not installed (then only TZ shifts run)."""
    for folder in FAKETIME_LIBRARIES:
        library = Path(folder) / "libfaketime.so.1"
        if library.is_file():
            return library
    return None


def near_cutoff_rows(anchor: datetime) -> list[dict[str, Any]]:
    """Rows around the sms (90 d) and default (365 d) cutoffs, minutes to days either side."""
    offsets = [timedelta(minutes=10), timedelta(hours=2), DAY, 4 * DAY, 6 * DAY]
    rows, ids = [], itertools.count(1)
    for kind, days in (("sms", 90), ("email", 365)):
        for offset in offsets:
            for sign in (-1, 1):
                created = anchor - days * DAY + sign * offset
                rows.append(dispatch(next(ids), created, type=kind))
    return rows


def reset(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """The table back to `rows` and an empty audit trail: an identical database again."""
    with engine.begin() as conn:
        guards_off(conn)
        conn.execute(sql(f"TRUNCATE dispatches, {AUDIT_SCHEMA}.chunks, {AUDIT_SCHEMA}.runs"))
    insert_rows(engine, rows)


def cleaned_ids(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        found = conn.execute(sql("SELECT id FROM dispatches WHERE cleaned_at IS NOT NULL"))
        return set(found.scalars())


def oracle_ids(rows: list[dict[str, Any]], config_path: Path, planned_at: datetime) -> set[int]:
    settings = config.load(config_path)
    return {r["id"] for r in rows if is_due(r, settings, planned_at)}


def test_shifted_process_clock_or_time_zone_changes_nothing(
    probe: Engine, url_string: str, plain_config: Path, faketime: Path | None
) -> None:
    """Identical databases cleaned by a process whose clock runs 5 days ahead or behind, or
    whose local time zone is UTC+14 or UTC-8: the same rows each time, the oracle's rows
    under the database clock's `now`."""
    with probe.connect() as conn:
        rows = near_cutoff_rows(conn.execute(sql("SELECT now()")).scalar_one())
    variants: dict[str, dict[str, str]] = {
        "utc": {"TZ": "UTC"},
        "kiritimati": {"TZ": "Pacific/Kiritimati"},
        "los-angeles": {"TZ": "America/Los_Angeles"},
    }
    if faketime is not None:
        for name, days in (("clock+5d", 5), ("clock-5d", -5)):
            variants[name] = {
                "LD_PRELOAD": str(faketime),
                "FAKETIME": f"{days:+d}d",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            }
    results: dict[str, set[int]] = {}
    for name, env in variants.items():
        reset(probe, rows)
        job = run_script(url_string, plain_config, "run", "--yes", env=script_env(**env))
        assert job.returncode == 0, f"{name}: {job.stderr}"
        if "FAKETIME" in env:  # faketime works: the log's own clock is shifted
            logged = datetime.fromisoformat(job.last("run_started")["timestamp"])
            shift = timedelta(days=int(env["FAKETIME"].removesuffix("d")))
            assert abs(logged - datetime.now(UTC) - shift) < timedelta(minutes=5), name
        planned_at = run_records(probe)[run_id_of(job)]["planned_at"]
        results[name] = cleaned_ids(probe)
        assert results[name] == oracle_ids(rows, plain_config, planned_at), name
    assert len({frozenset(r) for r in results.values()}) == 1, results
    assert 0 < len(results["utc"]) < len(rows)


def last_dst_start(now: datetime) -> datetime:
    """The most recent start of European summer time (last Sunday of March, 01:00 UTC) at
    least a week ago."""
    for year in (now.year, now.year - 1):
        day = datetime(year, 3, 31, 1, tzinfo=UTC)
        day -= timedelta(days=(day.weekday() + 1) % 7)
        if now - day > 8 * DAY:
            return day
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "asked_by",
    [
        pytest.param({"TZ": "Europe/Oslo"}, id="database-setting"),
        pytest.param({"TZ": "Europe/Oslo", "PGTZ": "Europe/Oslo"}, id="PGTZ"),
    ],
)
def test_non_utc_session_time_zone_across_a_dst_change_changes_nothing(
    probe: Engine, database_url: URL, url_string: str, tmp_path: Path, asked_by: dict[str, str]
) -> None:
    """The database (ALTER DATABASE ... SET timezone), the process's TZ and, in the second
    case, libpq's PGTZ ask for Europe/Oslo; the policy's cutoff falls on the other side of
    a DST change than `now`, where Oslo calendar days and 24-hour days differ by an hour:
    the job still cleans exactly the oracle's rows, computed in UTC."""
    oslo = ZoneInfo("Europe/Oslo")
    with probe.connect() as conn:
        now = conn.execute(sql("SELECT now()")).scalar_one()
    dst = last_dst_start(now)
    # A retention whose cutoff lies on the other side of the DST change than `now` does.
    # (Skip a day whose Oslo wall-clock cutoff falls into the skipped hour of the change.)
    base = (now - dst) // DAY
    for days in (base, base - 1, base - 2, base + 1):
        cutoff = now - days * DAY
        calendar_cutoff = (now.astimezone(oslo) - days * DAY).astimezone(UTC)  # wall clock
        if abs(calendar_cutoff - cutoff) == timedelta(hours=1):
            break
    assert abs(calendar_cutoff - cutoff) == timedelta(hours=1)
    policy = f'[[policy]]\nname = "dst"\nretention_days = {days}\n'
    config_path = make_config(tmp_path, "dst.toml", policies=policy)
    minutes = [-120, -61, -59, -45, -30, -15, -1, 1, 15, 30, 45, 59, 61, 120]
    instants = [cutoff + timedelta(minutes=m) for m in minutes]
    instants += [dst + timedelta(minutes=m) for m in minutes]
    rows = [dispatch(i, at) for i, at in enumerate(instants, start=1)]
    insert_rows(probe, rows)
    with probe.begin() as conn:
        conn.execute(
            sql(f"ALTER DATABASE \"{database_url.database}\" SET timezone = 'Europe/Oslo'")
        )
    plain = create_engine(database_url)  # a session that takes the database's setting
    with plain.connect() as conn:
        assert conn.execute(sql("SHOW timezone")).scalar_one() == "Europe/Oslo"
    plain.dispose()

    env = script_env(**asked_by)
    job = run_script(url_string, config_path, "run", "--yes", env=env)
    assert job.returncode == 0, job.stderr
    planned_at = run_records(probe)[run_id_of(job)]["planned_at"]
    expected = oracle_ids(rows, config_path, planned_at)
    assert cleaned_ids(probe) == expected
    between = {
        r["id"]
        for r in rows
        if min(cutoff, calendar_cutoff) <= r["created_at"] < max(cutoff, calendar_cutoff)
    }
    assert between, "no row lies in the hour that calendar-day arithmetic would shift"
    logged_cutoff = datetime.fromisoformat(job.last("plan")["policies"][0]["cutoff"])
    assert logged_cutoff == planned_at - days * DAY  # 24-hour days, not Oslo calendar days
