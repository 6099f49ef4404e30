"""The audit trail's guards (migration 0003, issue 17): the database itself refuses every
forgery a role could try on runs and chunks, and any deletion, whoever asks.

Found before the guards, as the role `db grants --purpose run` makes: a finished run's
status and start rewritten, a forged `succeeded` run inserted, chunks added to a finished
run (`audit show` then counted 6,351 rows cleaned against 1,352 real ones).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from dispatch_retention import db

from ..helpers import granted_role, run_job, seed_series, settings

RUNS, CHUNKS = "dispatch_retention.runs", "dispatch_retention.chunks"
HOLDS = "dispatch_retention.legal_holds"
CHUNK_VALUES = "(:r, 999, 1, 2, 5, now(), '{}'::jsonb, false)"
CHUNK_COLUMNS = "(run_id, seq, first_id, last_id, rows, cleaned_at, by_policy, skipped_locked)"

FORGERIES = {
    "rewrite a finished run": f"UPDATE {RUNS} SET status = 'failed' WHERE run_id = :r",
    "backdate a finished run": (f"UPDATE {RUNS} SET started_at = '2020-01-01' WHERE run_id = :r"),
    "add a chunk to a finished run": f"INSERT INTO {CHUNKS} {CHUNK_COLUMNS} VALUES {CHUNK_VALUES}",
    "rewrite a chunk": f"UPDATE {CHUNKS} SET rows = rows * 5 WHERE run_id = :r",
    "insert a forged succeeded run": (
        f"INSERT INTO {RUNS} (run_id, status, started_at, trigger, host, tool_version, db_user, "
        "target_table, options, config_path, config_sha256, config_text) VALUES "
        "(gen_random_uuid(), 'succeeded', now(), 'cron', 'h', '0', current_user, "
        "'public.dispatches', '{}', 'x', 'x', 'x')"
    ),
}
OWNER_ONLY = {
    "delete a run": f"DELETE FROM {RUNS} WHERE run_id = :r",
    "delete its chunks": f"DELETE FROM {CHUNKS} WHERE run_id = :r",
    "truncate the trail": f"TRUNCATE {CHUNKS}, {RUNS}",
    "delete the holds": "DELETE FROM dispatch_retention.legal_holds",
}


@pytest.fixture
def finished_run(engine: Engine) -> str:
    seed_series(engine, range(1, 301))
    with engine.begin() as conn:  # a hold: a row the holds table keeps for good
        conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (4242, 'case 1')"))
    outcome = run_job(engine, settings(), chunk_size=100)
    assert outcome.status.value == "succeeded" and outcome.chunks > 1
    return outcome.run_id


def refused(url: str, statement: str, run_id: str) -> str:
    """The SQLSTATE and rule with which the database refuses `statement` (in one
    transaction, rolled back either way)."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with pytest.raises(DBAPIError) as raised, engine.begin() as conn:
            conn.execute(text(statement), {"r": run_id})
        return db.describe_error(raised.value)
    finally:
        engine.dispose()


@pytest.mark.parametrize("statement", list(FORGERIES.values()), ids=list(FORGERIES))
def test_the_run_role_cannot_forge_the_trail(
    engine: Engine, run_role: tuple[str, str], finished_run: str, statement: str
) -> None:
    _role, url = run_role
    error = refused(url, statement, finished_run)
    assert "IntegrityConstraintViolation" in error or "InsufficientPrivilege" in error, error


@pytest.mark.parametrize(
    "statement", [*FORGERIES.values(), *OWNER_ONLY.values()], ids=[*FORGERIES, *OWNER_ONLY]
)
def test_not_even_the_owner_can_forge_or_delete_with_the_guards_on(
    engine: Engine, url_string: str, finished_run: str, statement: str
) -> None:
    """The owner (here a superuser) is refused too, by the guards themselves: only turning
    them off (which `audit verify` will catch, issue 17) gets past."""
    error = refused(url_string, statement, finished_run)
    assert "IntegrityConstraintViolation, SQLSTATE 23000" in error, error
    assert "constraint " in error  # the rule is named


def test_a_run_is_stamped_by_the_server_and_its_plan_written_once(
    engine: Engine, run_role: tuple[str, str], finished_run: str
) -> None:
    """A run inserted as running gets the server's time and role, whatever the client
    sent; the job's own runs (running, planned, chunks, closed) pass every guard."""
    role, url = run_role
    forged = str(uuid.uuid4())
    as_role = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with as_role.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {RUNS} (run_id, status, started_at, trigger, host, "
                    "tool_version, db_user, target_table, options, config_path, "
                    "config_sha256, config_text) VALUES (:r, 'running', '2020-01-01', 'cron', "
                    "'h', '0', 'someone_else', 'public.dispatches', '{}', 'x', 'x', 'x')"
                ),
                {"r": forged},
            )
    finally:
        as_role.dispose()
    with engine.connect() as conn:
        started, by = conn.execute(
            text(f"SELECT started_at > now() - interval '1 hour', db_user FROM {RUNS} "
                 "WHERE run_id = :r"),
            {"r": forged},
        ).one()  # fmt: skip
    assert (started, by) == (True, role)
    replanned = f"UPDATE {RUNS} SET due_rows = 0 WHERE run_id = :r"
    assert "runs_finished_immutable" in refused(url, replanned, finished_run)


# --- legal holds (migration 0004) --------------------------------------------------------------


def test_a_hold_is_stamped_by_the_server_and_released_once(
    engine: Engine, database_url: Any
) -> None:
    """As the role `db grants --purpose holds` makes: a hold backdated and credited to
    another role is stamped with the server's time and the inserting role (what it claimed
    is kept as requested_by); a release dated before the hold gets the server's time; an
    un-release, a second release and a rewritten reason are refused."""
    with granted_role(engine, database_url, "holds") as (role, url):
        as_holds = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with as_holds.begin() as conn:
                conn.execute(
                    text(
                        f"INSERT INTO {HOLDS} (member_id, reason, created_at, created_by) "
                        "VALUES (77, 'case 9', '2020-01-01', 'the_dpo')"
                    )
                )
                conn.execute(
                    text(
                        f"UPDATE {HOLDS} SET released_at = '2000-01-01', released_by = 'x' "
                        "WHERE member_id = 77"
                    )
                )
        finally:
            as_holds.dispose()
        with engine.connect() as conn:
            hold = conn.execute(
                text(
                    f"SELECT created_by, requested_by, created_at > now() - interval '1 hour' "
                    f"AS recent, released_at >= created_at AS in_order FROM {HOLDS} "
                    "WHERE member_id = 77"
                )
            ).one()
        assert (hold.created_by, hold.requested_by, hold.recent, hold.in_order) == (
            role, "the_dpo", True, True,
        )  # fmt: skip
        for statement, rule in (
            (f"UPDATE {HOLDS} SET released_at = NULL WHERE member_id = 77",
             "legal_holds_released_once"),
            (f"UPDATE {HOLDS} SET released_at = now() WHERE member_id = 77",
             "legal_holds_released_once"),
            (f"INSERT INTO {HOLDS} (member_id, reason, released_at) VALUES (78, 'r', now())",
             "legal_holds_placed_active"),
        ):  # fmt: skip
            assert rule in refused(url, statement, ""), statement
    reworded = f"UPDATE {HOLDS} SET reason = 'nothing' WHERE member_id = 4242"
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (4242, 'case 1')"))
    owner = database_url.set(drivername="postgresql").render_as_string(hide_password=False)
    assert "legal_holds_placed_immutable" in refused(owner, reworded, "")
