"""`verify` on a real PostgreSQL: what it counts, what it calls a violation, what it refuses.

Each table is set up as the Messaging API would leave it (a bogus schedule, a NULL age, a
column written back after cleaning, a policy set without a catch-all, row-level security, a
soft-delete view), then `verify` is asked through the command line. No output may carry a
personal value (`MARK`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention.cli.main import cli
from tests.helpers import (
    DAY,
    MARK,
    STRIPPED,
    assert_no_marker,
    config_text,
    db_now,
    dispatch,
    granted_role,
    insert_rows,
    run_script,
    seed_series,
    settings,
    write_config,
)

FAR_FUTURE = datetime(2099, 1, 1, tzinfo=UTC)
UNSETTLED = {"transmission_status": "scheduled", "delivery_status": "pending"}


def verify(cfg: Path, url: str, *extra: str) -> tuple[int, dict[str, Any]]:
    """`verify --format json` in-process: the exit code and the document."""
    result = CliRunner().invoke(
        cli,
        ["--config", str(cfg), "--database-url", url, "verify", "--format", "json", *extra],
        prog_name="dispatch-retention",
    )
    assert_no_marker(result.stdout, result.stderr)
    assert result.exit_code in (0, 5), result.output
    return result.exit_code, json.loads(result.stdout)


def verify_table(cfg: Path, url: str, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli,
        ["--config", str(cfg), "--database-url", url, "verify", *extra],
        prog_name="dispatch-retention",
    )
    assert_no_marker(result.stdout, result.stderr)
    return result.exit_code, result.stdout


def default_config(tmp_path: Path, **kwargs: str) -> Path:
    return write_config(tmp_path / "verify.toml", config_text(**kwargs))


def test_settled_dispatch_with_future_schedule_is_a_violation_until_cleaned(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """A delivered dispatch past its window with scheduled_at in 2099 is a violation (exit 5)
    and no anomaly, and `run` cleans it, after which verify is OK."""
    cfg = default_config(tmp_path)
    now = db_now(engine)
    insert_rows(engine, [dispatch(1, now - 200 * DAY, scheduled_at=FAR_FUTURE)])

    code, report = verify(cfg, url_string)
    assert (code, report["ok"], report["violations"]) == (5, False, [{"policy": "sms", "rows": 1}])
    assert report["anomaly_rows"] == 0

    ran = CliRunner().invoke(cli, ["--config", str(cfg), "--database-url", url_string, "run"])
    assert ran.exit_code == 0, ran.output
    code, report = verify(cfg, url_string, "--strict")
    assert (code, report["ok"], report["violation_rows"], report["cleaned_rows"]) == (0, True, 0, 1)


def test_unsettled_dispatch_scheduled_beyond_the_longest_retention_is_an_anomaly(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """An unsettled dispatch scheduled in 2099 is counted in future_scheduled_rows (exit 0,
    exit 5 with --strict); one scheduled tomorrow is not, nor is a settled or cleaned one."""
    cfg = default_config(tmp_path)
    now = db_now(engine)
    insert_rows(
        engine,
        [
            dispatch(1, now - 200 * DAY, scheduled_at=FAR_FUTURE, **UNSETTLED),
            dispatch(2, now - 200 * DAY, scheduled_at=now + DAY, **UNSETTLED),
            dispatch(3, now - 200 * DAY, scheduled_at=now + 300 * DAY, **UNSETTLED),
            dispatch(4, now - 5 * DAY, scheduled_at=FAR_FUTURE, delivery_status="failed"),
            dispatch(
                5,
                now - 5 * DAY,
                scheduled_at=FAR_FUTURE,
                cleaned_at=now - DAY,
                **UNSETTLED,
                **STRIPPED,
            ),
        ],
    )

    code, report = verify(cfg, url_string)
    assert (code, report["ok"], report["strict"], report["violation_rows"]) == (0, True, False, 0)
    assert report["anomalies"] == {
        "undatable_rows": 0,
        "future_scheduled_rows": 1,
        "written_back_rows": 0,
    }
    assert report["anomaly_rows"] == 1

    code, strict = verify(cfg, url_string, "--strict")
    assert (code, strict["ok"], strict["strict"], strict["violation_rows"]) == (5, False, True, 0)
    assert strict["anomalies"] == report["anomalies"]

    code, shown = verify_table(cfg, url_string, "--strict")
    assert code == 5
    assert "scheduled beyond the longest retention" in shown
    assert "VIOLATION" in shown


def test_dispatch_without_an_age_is_an_undatable_anomaly(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """A dispatch with NULL created_at that holds personal data is counted in undatable_rows
    (exit 5 with --strict); a cleaned one is not, nor one dated by its age_from column."""
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatches ALTER COLUMN created_at DROP NOT NULL"))
    now = db_now(engine)
    insert_rows(
        engine,
        [
            {**dispatch(1, now, delivered_at=None), "created_at": None},
            {**dispatch(2, now, cleaned_at=now, **STRIPPED), "created_at": None},
            {**dispatch(3, now), "created_at": None, "delivered_at": now - 500 * DAY},
            dispatch(4, now - 5 * DAY),
        ],
    )
    cfg = default_config(tmp_path)

    code, report = verify(cfg, url_string)
    assert (code, report["ok"], report["violation_rows"]) == (0, True, 0)
    assert report["anomalies"]["undatable_rows"] == 2  # rows 1 and 3: no created_at
    code, strict = verify(cfg, url_string, "--strict")
    assert (code, strict["ok"], strict["anomaly_rows"]) == (5, False, 2)

    by_delivery = write_config(
        tmp_path / "delivered_at.toml", config_text(clean='age_from = "delivered_at"')
    )
    code, report = verify(by_delivery, url_string)
    assert report["anomalies"]["undatable_rows"] == 1  # row 3 is dated by delivered_at
    assert (code, report["violations"]) == (5, [{"policy": "sms", "rows": 1}])


def test_personal_data_written_back_after_cleaning_is_an_anomaly_and_a_violation(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """A cleaned dispatch whose app_token was written back is counted in written_back_rows,
    and in the violations too when it is past its window."""
    cfg = default_config(tmp_path)
    now = db_now(engine)
    cleaned = {**STRIPPED, "cleaned_at": now - DAY}
    insert_rows(
        engine,
        [
            dispatch(1, now - 500 * DAY, **{**cleaned, "app_token": f"{MARK}-token-1"}),
            dispatch(2, now - 500 * DAY, **cleaned),
            dispatch(3, now - 5 * DAY, **{**cleaned, "email": f"{MARK}.3@example.invalid"}),
        ],
    )

    code, report = verify(cfg, url_string)
    assert (code, report["ok"], report["violations"]) == (5, False, [{"policy": "sms", "rows": 1}])
    assert report["anomalies"] == {
        "undatable_rows": 0,
        "future_scheduled_rows": 0,
        "written_back_rows": 2,  # row 3 is not past its window, but was cleaned
    }
    assert report["cleaned_rows"] == 3


def test_unmatched_rows_count_null_where_columns(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Without a catch-all policy, a dispatch whose where column is NULL is unmatched just
    like one with an unknown value (README "What is due": it is never cleaned)."""
    only_delivered = (
        '[[policy]]\nname = "delivered"\nretention_days = 30\n'
        'where = { external_delivery_status = "delivered" }\n'
    )
    cfg = default_config(tmp_path, policies=only_delivered)
    now = db_now(engine)
    insert_rows(
        engine,
        [
            dispatch(1, now - 500 * DAY),  # matched and overdue
            dispatch(2, now - 500 * DAY, external_delivery_status="z"),
            dispatch(3, now - 500 * DAY, external_delivery_status=None),
            dispatch(4, now - 5 * DAY, external_delivery_status=None),
        ],
    )

    code, report = verify(cfg, url_string)
    assert (code, report["violations"]) == (5, [{"policy": "delivered", "rows": 1}])
    assert report["unmatched_rows"] == 3


def test_checked_columns_are_exactly_clean_columns(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """checked_columns lists clean.columns with what cleaning writes; a kept column (email)
    is not compared, a stripped member_id is."""
    clean = (
        'columns = ["content", "msisdn", "app_token", "member_id"]\n'
        "replace = { content = {} }\n"
        'keep = { email = "kept for the bounce-handling contract" }\n'
    )
    cfg = default_config(tmp_path, clean=clean)
    now = db_now(engine)
    stripped = {**STRIPPED, "member_id": None, "cleaned_at": now - DAY}
    insert_rows(
        engine,
        [
            dispatch(1, now - 500 * DAY, **{**stripped, "email": f"{MARK}.1@example.invalid"}),
            dispatch(2, now - 500 * DAY, **{**stripped, "member_id": 42}),
        ],
    )

    code, report = verify(cfg, url_string)
    assert report["checked_columns"] == [
        {"column": "content", "cleaned_value": {}},
        {"column": "msisdn", "cleaned_value": None},
        {"column": "app_token", "cleaned_value": None},
        {"column": "member_id", "cleaned_value": None},
    ]
    assert (code, report["violation_rows"], report["anomalies"]["written_back_rows"]) == (5, 1, 1)

    code, shown = verify_table(cfg, url_string)
    assert "checked columns: content (cleaned: {}), msisdn (cleaned: NULL)" in shown
    assert "member_id (cleaned: NULL)" in shown and "email" not in shown

    _, default = verify(default_config(tmp_path), url_string)
    assert [c["column"] for c in default["checked_columns"]] == list(settings().clean.columns)


def test_row_level_security_is_refused_unless_the_role_bypasses_it(
    engine: Engine, database_url: URL, tmp_path: Path
) -> None:
    """With RLS hiding half the rows from the read-only role, verify exits 2 naming RLS and
    BYPASSRLS; with BYPASSRLS it sees every row and reports all the violations."""
    cfg = default_config(tmp_path)
    seed_series(engine, range(1, 11))
    with granted_role(engine, database_url, "read-only") as (role, url):
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE dispatches ENABLE ROW LEVEL SECURITY"))
            conn.execute(
                text(
                    f"CREATE POLICY even_only ON dispatches FOR SELECT TO {role} USING (id % 2 = 0)"
                )
            )

        refused = run_script(url, cfg, "verify", "--format", "json")
        assert_no_marker(refused.stdout, refused.stderr)
        assert refused.returncode == 2, refused.stderr
        assert "row-level security" in refused.stderr and "BYPASSRLS" in refused.stderr
        assert refused.stdout == ""

        with engine.begin() as conn:
            conn.execute(text(f"ALTER ROLE {role} BYPASSRLS"))
        checked = run_script(url, cfg, "verify", "--format", "json")
        assert_no_marker(checked.stdout, checked.stderr)
        assert checked.returncode == 5, checked.stderr
        report = json.loads(checked.stdout)
        assert report["violations"] == [{"policy": "sms", "rows": 10}]


def test_a_view_as_target_is_refused(engine: Engine, url_string: str, tmp_path: Path) -> None:
    """A soft-delete view over the table is not a target: verify exits 2 naming the view."""
    seed_series(engine, range(1, 5))
    with engine.begin() as conn:
        conn.execute(
            text("CREATE VIEW live_dispatches AS SELECT * FROM dispatches WHERE id % 2 = 0")
        )
    cfg = default_config(tmp_path, table="live_dispatches")

    refused = run_script(url_string, cfg, "verify")
    assert_no_marker(refused.stdout, refused.stderr)
    assert refused.returncode == 2, refused.stderr
    assert "view" in refused.stderr and "live_dispatches" in refused.stderr
    assert refused.stdout == ""


def test_a_future_or_infinite_age_is_undatable(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """A created_at of 'infinity' or in the year 2999 would keep personal data for ever:
    undatable_rows (exit 5 with --strict); the JSON and the table name the target."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(1, datetime(2999, 1, 1, tzinfo=UTC)), dispatch(2, now - DAY)])
    with engine.begin() as conn:
        conn.execute(text("UPDATE dispatches SET created_at = 'infinity' WHERE id = 2"))
    config = write_config(tmp_path / "v.toml", config_text())
    code, report = verify(config, url_string, "--strict")
    assert code == 5
    assert report["anomalies"]["undatable_rows"] == 2
    assert report["target"] == "public.dispatches"
    code, table = verify_table(config, url_string)
    assert code == 0 and "public.dispatches" in table
