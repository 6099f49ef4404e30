"""The audit trail's guards (migration 0003): the database itself refuses every
forgery a role could try on runs and chunks, and any deletion, whoever asks.

Found before the guards, as the role `db grants --purpose run` makes: a finished run's
status and start rewritten, a forged `succeeded` run inserted, chunks added to a finished
run (`audit show` then counted 6,351 rows cleaned against 1,352 real ones).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from dispatch_retention.pg import diagnosis
from tests.helpers import granted_role, run_job, seed_series, settings

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


def _as(url: str) -> Engine:
    """An engine connected as the role of `url`."""
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def execute_as(url: str, *statements: str, run_id: str = "") -> None:
    """`statements` in one transaction as the role of `url`, `:r` bound to `run_id`."""
    engine = _as(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement), {"r": run_id})
    finally:
        engine.dispose()


def refused(url: str, *statements: str, run_id: str) -> str:
    """The SQLSTATE and rule with which the database refuses `statements` (in one
    transaction, rolled back either way)."""
    with pytest.raises(DBAPIError) as raised:
        execute_as(url, *statements, run_id=run_id)
    return diagnosis.describe_error(raised.value)


@pytest.mark.parametrize("statement", list(FORGERIES.values()), ids=list(FORGERIES))
def test_the_run_role_cannot_forge_the_trail(
    engine: Engine, run_role: tuple[str, str], finished_run: str, statement: str
) -> None:
    _role, url = run_role
    error = refused(url, statement, run_id=finished_run)
    assert "IntegrityConstraintViolation" in error or "InsufficientPrivilege" in error, error


@pytest.mark.parametrize(
    "statement", [*FORGERIES.values(), *OWNER_ONLY.values()], ids=[*FORGERIES, *OWNER_ONLY]
)
def test_not_even_the_owner_can_forge_or_delete_with_the_guards_on(
    engine: Engine, url_string: str, finished_run: str, statement: str
) -> None:
    """The owner (here a superuser) is refused too, by the guards themselves: only turning
    them off (which `audit verify` will catch) gets past."""
    error = refused(url_string, statement, run_id=finished_run)
    assert "IntegrityConstraintViolation, SQLSTATE 23000" in error, error
    assert "constraint " in error  # the rule is named


def test_a_run_is_stamped_by_the_server_and_its_plan_written_once(
    engine: Engine, run_role: tuple[str, str], finished_run: str
) -> None:
    """A run inserted as running gets the server's time and role, whatever the client
    sent; the job's own runs (running, planned, chunks, closed) pass every guard."""
    role, url = run_role
    forged = str(uuid.uuid4())
    execute_as(
        url,
        f"INSERT INTO {RUNS} (run_id, status, started_at, trigger, host, tool_version, "
        "db_user, target_table, options, config_path, config_sha256, config_text) VALUES "
        "(:r, 'running', '2020-01-01', 'cron', 'h', '0', 'someone_else', 'public.dispatches', "
        "'{}', 'x', 'x', 'x')",
        run_id=forged,
    )
    with engine.connect() as conn:
        started, by = conn.execute(
            text(f"SELECT started_at > now() - interval '1 hour', db_user FROM {RUNS} "
                 "WHERE run_id = :r"),
            {"r": forged},
        ).one()  # fmt: skip
    assert (started, by) == (True, role)
    replanned = f"UPDATE {RUNS} SET due_rows = 0 WHERE run_id = :r"
    assert "runs_finished_immutable" in refused(url, replanned, run_id=finished_run)


# --- legal holds (migration 0004) --------------------------------------------------------------


def test_a_hold_is_stamped_by_the_server_and_released_once(
    engine: Engine, database_url: Any
) -> None:
    """As the role `db grants --purpose holds` makes: a hold backdated and credited to
    another role is stamped with the server's time and the inserting role (what it claimed
    is kept as requested_by); a release dated before the hold gets the server's time; an
    un-release, a second release and a rewritten reason are refused."""
    with granted_role(engine, database_url, "holds") as (role, url):
        execute_as(
            url,
            f"INSERT INTO {HOLDS} (member_id, reason, created_at, created_by) "
            "VALUES (77, 'case 9', '2020-01-01', 'the_dpo')",
            f"UPDATE {HOLDS} SET released_at = '2000-01-01', released_by = 'x' "
            "WHERE member_id = 77",
        )
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
            assert rule in refused(url, statement, run_id=""), statement
    reworded = f"UPDATE {HOLDS} SET reason = 'nothing' WHERE member_id = 4242"
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (4242, 'case 1')"))
    owner = database_url.set(drivername="postgresql").render_as_string(hide_password=False)
    assert "legal_holds_placed_immutable" in refused(owner, reworded, run_id="")


# --- what a red-team pass got past the first guards (migration 0006) -------------------------

RUN_COLUMNS = (
    "(run_id, status, started_at, trigger, host, tool_version, db_user, target_table, options, "
    "config_path, config_sha256, config_text)"
)


def start_run(url: str, options: str = "'{}'", config_text: str = "'x'") -> str:
    """A running run inserted as the role of `url`; its id."""
    run_id = str(uuid.uuid4())
    execute_as(
        url,
        f"INSERT INTO {RUNS} {RUN_COLUMNS} VALUES (:r, 'running', now(), 'cron', 'h', '0', "
        f"'x', 'public.dispatches', {options}, 'x', 'x', {config_text})",
        run_id=run_id,
    )
    return run_id


def test_a_temporary_type_named_text_does_not_blind_the_guards(
    run_role: tuple[str, str],
) -> None:
    """The run role's own `pg_temp.text` (a domain that keeps one character) first in its
    search_path made the guard compare only first characters: what a running run started
    with could be rewritten. The guards now run with a fixed search_path."""
    _role, url = run_role
    run_id = start_run(url)
    error = refused(
        url,
        "CREATE DOMAIN pg_temp.text AS pg_catalog.varchar(1)",
        "SET LOCAL search_path = pg_temp, pg_catalog",
        f"UPDATE {RUNS} SET started_at = '2001-01-01', config_text = 'x forged' WHERE run_id = :r",
        run_id=run_id,
    )
    assert "runs_start_immutable" in error


@pytest.mark.parametrize(
    ("options", "config_text"),
    [
        ("""'{"chunk_size": 1e5000}'""", "'x'"),
        ("jsonb_build_object('x', (repeat('[', 3000) || repeat(']', 3000))::jsonb)", "'x'"),
        ("'{}'", "repeat('#', 4 * 1048576 + 1)"),
    ],
    ids=["a 5001-digit number", "nested 3000 deep", "a config text over 4 MiB"],
)
def test_no_run_record_can_make_the_trail_unreadable(
    run_role: tuple[str, str], options: str, config_text: str
) -> None:
    """A number no reader takes as a float, JSON nested past any parser's depth, a huge
    config: the trail is append-only, so such a row would break `audit verify` for good."""
    _role, url = run_role
    with pytest.raises(DBAPIError) as raised:
        start_run(url, options, config_text)
    assert "runs_documents_bounded" in diagnosis.describe_error(raised.value)


def test_a_run_is_changed_by_its_own_role_and_never_revived(
    engine: Engine, database_url: Any, run_role: tuple[str, str]
) -> None:
    """Another role may mark a running run abandoned (a dead run, found by the next one),
    nothing else; an abandoned run never runs again; finished_at is the server's."""
    _role, url = run_role
    run_id = start_run(url)
    with granted_role(engine, database_url, "run") as (_other, other_url):
        assert "runs_changed_by_their_role" in refused(
            other_url,
            f"UPDATE {RUNS} SET status = 'failed', error = 'forged' WHERE run_id = :r",
            run_id=run_id,
        )
        execute_as(
            other_url,
            f"UPDATE {RUNS} SET status = 'abandoned', finished_at = '1990-01-01', "
            "error = 'dead' WHERE run_id = :r",
            run_id=run_id,
        )
    revive = f"UPDATE {RUNS} SET status = 'running' WHERE run_id = :r"
    assert "runs_not_revived" in refused(url, revive, run_id=run_id)
    with engine.connect() as conn:
        stamped = conn.execute(
            text(f"SELECT finished_at > now() - interval '1 hour' FROM {RUNS} WHERE run_id = :r"),
            {"r": run_id},
        ).scalar_one()
    assert stamped is True


@pytest.mark.parametrize(
    "values",
    [
        """(:r, 1, 9, 1, 5, now(), '{"sms": 5}', false, 'clean')""",
        """(:r, 1, 1, 9, 0, now(), '{}', false, 'clean')""",
        """(:r, 1, 1, 9, 5, now() - interval '1 day', '{"sms": 5}', false, 'clean')""",
        """(:r, 1, 1, 9, 5, now(), '{"sms": 4}', false, 'clean')""",
        """(:r, 1, 1, 9, 5, now(), '{"sms": "five"}', false, 'clean')""",
        """(:r, 1, 1, 20000, 1000000, now(), '{"sms": 1000000}', false, 'reclean')""",
        """(:r, 1, 1, 9, 5, now(), '{"a": 2.5, "b": 2.5}', false, 'clean')""",
        """(:r, 1, 1, 9, 5, now(), '{"sms": 1000, "default": -995}', false, 'clean')""",
        """(:r, 1, 1, 20000, 5, now(), '{"sms": 5}', false, 'reclean')""",
        """(:r, 1, 1, 20000, 500, now(), '{"sms": 500}', false, 'reclean')""",
    ],
    ids=["first after last", "no rows", "backdated", "by_policy short", "not a count",
         "more reclean rows than ids", "half rows", "a negative count",
         "reclean in a run without --reclean", "more reclean rows than its chunk size"],
)  # fmt: skip
def test_a_chunk_records_what_its_transaction_cleaned(
    run_role: tuple[str, str], values: str
) -> None:
    _role, url = run_role
    without = "20000, 5, now()" in values  # the one reclean chunk of a run without --reclean
    recleaning = """'{"reclean": true, "chunk_size": 100}'"""
    run_id = start_run(url, recleaning if "'reclean'" in values and not without else "'{}'")
    insert_chunk = f"INSERT INTO {CHUNKS} {CHUNK_COLUMNS[:-1]}, kind) VALUES {values}"
    assert "chunks_as_cleaned" in refused(url, insert_chunk, run_id=run_id)


def test_a_hold_id_and_its_releasing_role_are_the_servers(
    engine: Engine, database_url: Any
) -> None:
    with granted_role(engine, database_url, "holds") as (role, url):
        chosen = f"INSERT INTO {HOLDS} (hold_id, member_id, reason) VALUES (3, 1, 'r')"
        error = refused(url, chosen, run_id="")
        assert "GeneratedAlways" in error or "428C9" in error
        execute_as(
            url,
            f"INSERT INTO {HOLDS} (member_id, reason) VALUES (5, 'r')",
            f"UPDATE {HOLDS} SET released_at = now(), "
            "released_by = 'the-dpo (db role the_dpo)' WHERE member_id = 5",
        )
    with engine.connect() as conn:
        released_by = conn.execute(
            text(f"SELECT released_by FROM {HOLDS} WHERE member_id = 5")
        ).scalar_one()
    assert released_by == f"the-dpo (db role {role})"


def test_a_chunk_waits_for_an_abandoning_not_yet_committed_and_is_refused(
    engine: Engine, database_url: Any, run_role: tuple[str, str]
) -> None:
    """The run role's chunk, while another role's UPDATE marking its run abandoned has not
    committed: the guard reads the run FOR SHARE, so the chunk waits, then sees the run
    abandoned and is refused (before: it slipped in, and audit verify cried tampering)."""
    _role, url = run_role
    run_id = start_run(url)
    with granted_role(engine, database_url, "run") as (_other, other_url):
        other = _as(other_url)
        try:
            with other.connect() as abandoning:
                tx = abandoning.begin()
                abandoning.execute(
                    text(f"UPDATE {RUNS} SET status = 'abandoned' WHERE run_id = :r"),
                    {"r": run_id},
                )
                errors: list[str] = []
                chunk = (
                    f"INSERT INTO {CHUNKS} {CHUNK_COLUMNS} VALUES "
                    """(:r, 1, 1, 9, 5, now(), '{"sms": 5}', false)"""
                )
                adding = threading.Thread(
                    target=lambda: errors.append(refused(url, chunk, run_id=run_id))
                )
                adding.start()
                adding.join(0.5)
                assert adding.is_alive()  # waits for the abandoning
                tx.commit()
                adding.join(10)
        finally:
            other.dispose()
    assert len(errors) == 1 and "chunks_of_a_running_run" in errors[0], errors


def test_the_start_and_the_plan_hold_whatever_the_sessions_clock_style(
    run_role: tuple[str, str],
) -> None:
    """A time zone of the run role's own making printed two instants a day apart alike,
    and the text comparison let started_at move; a plan written in pieces, or dated outside
    its run, is refused."""
    _role, url = run_role
    run_id = start_run(url)
    shifted = (
        "UPDATE dispatch_retention.runs SET started_at = started_at + interval '24 hours' "
        "WHERE run_id = :r"
    )
    error = refused(
        url,
        "SET LOCAL DateStyle = 'SQL, MDY'",
        "SET LOCAL TimeZone = 'AAA0AAA-24,J1/0,J334/34:04:21'",
        shifted,
        run_id=run_id,
    )
    assert "runs_start_immutable" in error
    for piece in (
        f"UPDATE {RUNS} SET due_rows = 5 WHERE run_id = :r",
        f"UPDATE {RUNS} SET planned_at = '2001-01-01', due_rows = 7 WHERE run_id = :r",
    ):
        assert "runs_plan_immutable" in refused(url, piece, run_id=run_id), piece
