"""What each role can do to the trail, tried (docs/security.md): the forgeries a
third adversarial pass got past the guards and `audit verify`, each as the role `db grants`
generates or as the migrating owner, on a real server.

Prevented by the database (migration 0008): an abandoned run closed `succeeded`; an event
imported after the chain went live; a trigger skipped with `session_replication_role`; a
stamp taken at a transaction's start. Detected by `audit verify`: the trail's tables with an
inheritance child, a trigger of theirs missing, disabled or not the job's, and rows written
while the owner had a guard off (a time or a role their event does not bear out), even once
it is on again. The lock's key, which any role can compute, taken by a role that may not run
the job: named as such.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from structlog.testing import capture_logs

from dispatch_retention.run.lock import run_locks
from dispatch_retention.vocabulary import Exit, Status
from tests.checks.test_audit_verify import EVENTS, HEAD, events, verify
from tests.helpers import granted_role, invoke, run_job, seed_series, settings
from tests.trail.test_guards import FORGERIES, HOLDS, RUNS, execute_as, refused, start_run

SCHEMA = "dispatch_retention"


@pytest.fixture
def live(engine: Engine) -> str:
    """A trail that went live: a finished run and a placed hold; the run's id."""
    seed_series(engine, range(0, 120))
    outcome = run_job(engine, settings(), chunk_size=50)
    assert outcome.status is Status.SUCCEEDED
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (4242, 'case 1')"))
    return outcome.run_id


def problems(report: dict[str, Any]) -> list[str]:
    return [f"{f['row']}: {f['problem']}" for f in report["findings"]]


def set_trigger(engine: Engine, table: str, trigger: str, state: str) -> None:
    """As the owner: `ALTER TABLE ... {DISABLE|ENABLE|ENABLE ALWAYS} TRIGGER`."""
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {SCHEMA}.{table} {state} TRIGGER {trigger}"))


def owner_appends(
    engine: Engine,
    kind: str,
    subject: str,
    fact: str,
    *,
    version: int = 2,
    imported: bool = False,
    at: str = "now()",
) -> None:
    """As the owner, with its own SQL (not `append_event`): one event in good form (its
    hash the SHA-256 of its body, linked to the head) from SQL expressions of its parts."""
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL TimeZone = 'UTC'"))
        conn.execute(
            text(
                f"""
DO $$
DECLARE head record; body text; digest text; at timestamptz := {at};
BEGIN
  SELECT seq, hash INTO head FROM {HEAD} FOR UPDATE;
  body := jsonb_build_object('v', {version}, 'seq', head.seq + 1, 'kind', {kind},
    'subject', {subject}, 'at', at, 'by', session_user, 'role', session_user,
    'imported', {str(imported).lower()}, 'fact', {fact}, 'prev', head.hash)::text;
  digest := encode(sha256(convert_to(body, 'UTF8')), 'hex');
  INSERT INTO {EVENTS} VALUES (head.seq + 1, {kind}, {subject}, at, body, head.hash, digest);
  UPDATE {HEAD} SET seq = head.seq + 1, hash = digest;
END $$
"""
            )
        )


# --- finding 2: an abandoned run revived -------------------------------------------------------


def test_an_abandoned_run_is_closed_only_failed_or_interrupted(
    engine: Engine, database_url: Any, run_role: tuple[str, str]
) -> None:
    """The run role turned a killed run into `succeeded` with 0 remaining, and the guard and
    `audit verify` accepted it; now the database refuses every close but a failure."""
    _role, url = run_role
    closes = {}
    for status in ("succeeded", "incomplete", "refused", "cancelled", "failed", "interrupted"):
        run_id = start_run(url)
        with granted_role(engine, database_url, "run") as (_other, other_url):
            execute_as(
                other_url,
                f"UPDATE {RUNS} SET status = 'abandoned', error = 'dead' WHERE run_id = :r",
                run_id=run_id,
            )
        close = f"UPDATE {RUNS} SET status = '{status}', remaining_due_rows = 0 WHERE run_id = :r"
        try:
            execute_as(url, close, run_id=run_id)
            closes[status] = "closed"
        except Exception:  # the refusal is read below
            closes[status] = refused(url, close, run_id=run_id)
    assert closes.pop("failed") == closes.pop("interrupted") == "closed"
    assert all("runs_abandoned_closes" in why for why in closes.values()), closes


def test_a_revival_written_past_the_guard_is_caught_after_it_is_back(
    engine: Engine, run_role: tuple[str, str], database_url: Any, base: list[str]
) -> None:
    """With only the stamp guard off (the owner's doing), the run role closes an abandoned
    run `succeeded`: the events record it, and `audit verify` names it, also once every
    trigger is ENABLE ALWAYS again."""
    _role, url = run_role
    run_id = start_run(url)
    with granted_role(engine, database_url, "run") as (_other, other_url):
        execute_as(
            other_url, f"UPDATE {RUNS} SET status = 'abandoned' WHERE run_id = :r", run_id=run_id
        )
    set_trigger(engine, "runs", "runs_stamp", "DISABLE")
    execute_as(url, f"UPDATE {RUNS} SET status = 'succeeded' WHERE run_id = :r", run_id=run_id)
    code, report = verify(base)
    assert code == Exit.TAMPERED
    assert any("runs_stamp is not ENABLE ALWAYS (disabled)" in p for p in problems(report))
    set_trigger(engine, "runs", "runs_stamp", "ENABLE ALWAYS")
    code, report = verify(base)
    assert code == Exit.TAMPERED
    assert any(f"run:{run_id}: an abandoned run closed succeeded" in p for p in problems(report)), (
        report
    )


# --- finding 3: backdated history by the schema owner -------------------------------------------


def test_an_import_after_the_chain_went_live_is_refused_and_a_child_table_is_named(
    engine: Engine, live: str, base: list[str]
) -> None:
    """The owner adds an inheritance child to the holds (its rows read as the holds') and
    imports an event for a hold placed "in 2023 by dpo_officer": the database refuses the
    import, and `audit verify --expect-head` names the child."""
    kept = verify(base)[1]["head"]
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {SCHEMA}.old_holds () INHERITS ({HOLDS})"))
        conn.execute(
            text(
                f"INSERT INTO {SCHEMA}.old_holds (hold_id, member_id, reason, created_at, "
                "created_by) OVERRIDING SYSTEM VALUE "
                "VALUES (900, 77, 'case 2023', '2023-01-01', 'dpo_officer')"
            )
        )
    with pytest.raises(Exception) as raised, engine.begin() as conn:
        conn.execute(
            text(
                f"SELECT {SCHEMA}.append_event('hold_placed', 'hold:900', to_jsonb(h), true) "
                f"FROM {SCHEMA}.old_holds h"
            )
        )
    assert "only the upgrade that began the chain imports events" in str(raised.value)
    code, report = verify(base, "--expect-head", kept)
    assert code == Exit.TAMPERED
    assert any(
        "legal_holds: has the inheritance child dispatch_retention.old_holds" in p
        for p in problems(report)
    ), report


def test_an_import_written_past_the_function_is_caught(
    engine: Engine, live: str, base: list[str]
) -> None:
    """The owner writes the imported event in good form with its own SQL (valid hash, the
    kept head still in the chain): an imported event after a live one is named."""
    kept = verify(base)[1]["head"]
    owner_appends(
        engine,
        "'hold_placed'",
        "'hold:900'",
        "jsonb_build_object('hold_id', 900)",
        version=1,
        imported=True,
    )
    code, report = verify(base, "--expect-head", kept)
    assert code == Exit.TAMPERED and report["expected_head_seq"] is not None
    assert any(
        "an imported event after the chain's first live one" in p for p in problems(report)
    ), report


@pytest.mark.parametrize(
    ("purpose", "table", "statement", "says"),
    [
        (
            "holds",
            "legal_holds",
            f"INSERT INTO {HOLDS} (member_id, reason, created_at, created_by) "
            "VALUES (77, 'case 2023', '2023-01-01', 'dpo_officer')",
            "its created_at is not its event's time",
        ),
        (
            "run",
            "runs",
            f"INSERT INTO {RUNS} (run_id, status, started_at, trigger, host, tool_version, "
            "db_user, target_table, options, config_path, config_sha256, config_text) VALUES "
            "(gen_random_uuid(), 'running', '2024-03-01', 'cron', 'h', '0', 'someone', "
            "'public.dispatches', '{}', 'x', 'x', 'x')",
            "its started_at is not its event's time",
        ),
    ],
    ids=["a hold placed in 2023 by dpo_officer", "a cron run of 2024"],
)
def test_rows_written_while_the_owner_had_the_guards_off_are_caught(
    engine: Engine,
    database_url: Any,
    live: str,
    base: list[str],
    purpose: str,
    table: str,
    statement: str,
    says: str,
) -> None:
    """The owner turns off only the guards (the events stay on) while a role of `db grants`
    writes rows with forged stamps and names, then turns them on again: the kept head is
    still in the chain and every row equals its event, yet `audit verify` names the rows
    whose time or role their event does not bear out."""
    kept = verify(base)[1]["head"]
    for trigger in (f"{table}_guard", f"{table}_stamp"):
        set_trigger(engine, table, trigger, "DISABLE")
    with granted_role(engine, database_url, purpose) as (_role, url):
        execute_as(url, statement)
        for trigger in (f"{table}_guard", f"{table}_stamp"):
            set_trigger(engine, table, trigger, "ENABLE ALWAYS")
        code, report = verify(base, "--expect-head", kept)
    assert code == Exit.TAMPERED and report["expected_head_seq"] is not None
    found = problems(report)
    assert any(says in p for p in found), found
    if purpose == "holds":
        assert any("its created_by is not the role that wrote it" in p for p in found), found


@pytest.mark.parametrize("statement", list(FORGERIES.values()), ids=list(FORGERIES))
def test_a_replica_session_does_not_skip_the_guards(
    engine: Engine, url_string: str, live: str, statement: str
) -> None:
    """`session_replication_role = replica` (a superuser's, here the owner's) skipped every
    trigger of the trail; they are ENABLE ALWAYS now."""
    error = refused(
        url_string, "SET LOCAL session_replication_role = replica", statement, run_id=live
    )
    assert "IntegrityConstraintViolation, SQLSTATE 23000" in error, error


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ("DISABLE", "its trigger legal_holds_guard is not ENABLE ALWAYS (disabled)"),
        ("ENABLE", "is not ENABLE ALWAYS (enabled for origin sessions only)"),
        ("ENABLE REPLICA", "is not ENABLE ALWAYS (replica only)"),
        ("DROP", "catalog: trigger legal_holds.legal_holds_guard is gone"),
    ],
)
def test_a_trigger_of_the_trail_not_as_made_is_named(
    engine: Engine, live: str, base: list[str], state: str, says: str
) -> None:
    with engine.begin() as conn:
        if state == "DROP":
            conn.execute(text(f"DROP TRIGGER legal_holds_guard ON {HOLDS}"))
        else:
            conn.execute(text(f"ALTER TABLE {HOLDS} {state} TRIGGER legal_holds_guard"))
    code, report = verify(base)
    assert code == Exit.TAMPERED and any(says in p for p in problems(report)), report


def test_a_trigger_the_job_did_not_make_is_named(
    engine: Engine, live: str, base: list[str]
) -> None:
    """A trigger added after the stamp (named to fire last) could rewrite what the guards
    set: any trigger not the job's is a finding, its name escaped."""
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE FUNCTION {SCHEMA}.rewrite() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN NEW.created_by := 'dpo_officer'; RETURN NEW; END $$"
            )
        )
        conn.execute(
            text(
                f'CREATE TRIGGER "zz\nOK" BEFORE INSERT ON {HOLDS} '
                f"FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.rewrite()"
            )
        )
    code, report = verify(base)
    assert code == Exit.TAMPERED
    found = problems(report)
    assert any("catalog: trigger legal_holds.zz\\nOK is not the job's" in p for p in found), found
    assert any("catalog: function rewrite() is not the job's" in p for p in found), found


# --- the writing role and an honest SET ROLE ----------------------------------------------------


def test_an_honest_set_role_is_recorded_and_checks_out(
    engine: Engine, database_url: Any, live: str, base: list[str]
) -> None:
    """A person's login role that is a member of the holds role places a hold after `SET
    ROLE`: the event names both (`by` the session's, `role` the writer's) and verifies."""
    person = f"person_{uuid.uuid4().hex[:8]}"
    with granted_role(engine, database_url, "holds") as (holds_role, _url):
        with engine.begin() as conn:
            conn.execute(text(f"CREATE ROLE {person} LOGIN"))
            conn.execute(text(f"GRANT {holds_role} TO {person}"))
        try:
            person_url = database_url.set(drivername="postgresql", username=person)
            execute_as(
                person_url.render_as_string(hide_password=False),
                f"SET ROLE {holds_role}",
                f"INSERT INTO {HOLDS} (member_id, reason) VALUES (5151, 'case 3')",
            )
            body = json.loads(events(engine)[-1]["body"])
            assert (body["v"], body["by"], body["role"]) == (2, person, holds_role)
            assert body["fact"]["created_by"] == holds_role
            assert verify(base) == (Exit.OK, verify(base)[1]) and verify(base)[1]["ok"]
        finally:
            with engine.begin() as conn:
                conn.execute(text(f"DROP OWNED BY {person}"))
                conn.execute(text(f"DROP ROLE {person}"))


# --- finding 4: a hold backdated by the holds role ----------------------------------------------


@pytest.mark.parametrize("how", ["a transaction opened before the run", "a DO block that waits"])
def test_a_hold_placed_after_a_run_is_never_stamped_before_it(
    engine: Engine, database_url: Any, how: str
) -> None:
    """The holds role opens its transaction (or starts one statement that waits) before a
    run, and places the hold after the run cleaned the member's dispatches: the hold was
    stamped with the transaction's start, so the trail said the job cleaned a member under
    hold. The stamp is the clock under the chain's lock: after every cleaned row's."""
    seed_series(engine, range(0, 200))
    member = 1000 + 5 % 97  # the seeded rows' member of id 5
    with granted_role(engine, database_url, "holds") as (_role, url):
        holds = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with holds.connect() as conn:
                if how.startswith("a transaction"):
                    conn.execute(text("SELECT now()"))  # the transaction starts here
                    time.sleep(0.3)
                    outcome = run_job(engine, settings(), chunk_size=50)
                    conn.execute(
                        text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (:m, 'late')"),
                        {"m": member},
                    )
                else:
                    placed = threading.Thread(
                        target=lambda: conn.execute(
                            text(
                                "DO $$ BEGIN PERFORM pg_sleep(2); "
                                f"INSERT INTO {HOLDS} (member_id, reason) VALUES ({member}, "
                                "'late'); END $$"
                            )
                        )
                    )
                    placed.start()
                    time.sleep(0.3)
                    outcome = run_job(engine, settings(), chunk_size=50)
                    placed.join()
                conn.commit()
        finally:
            holds.dispose()
    assert outcome.status is Status.SUCCEEDED and outcome.rows_cleaned > 0
    with engine.connect() as conn:
        hold_at, last_cleaned = conn.execute(
            text(
                f"SELECT (SELECT created_at FROM {HOLDS} WHERE member_id = :m), "
                "(SELECT max(cleaned_at) FROM dispatches WHERE member_id = :m)"
            ),
            {"m": member},
        ).one()
    assert last_cleaned is not None and hold_at > last_cleaned


# --- finding 6: the run lock's key held by any role ---------------------------------------------


def test_the_lock_held_by_a_role_that_may_not_run_is_named_as_such(
    engine: Engine, database_url: Any
) -> None:
    """The read-only role computes the run lock's key and holds it: the run exits 3 and
    says that the holder is not another run, naming its role and pid."""
    seed_series(engine, range(0, 20))
    [(key, _shared)] = run_locks("public.dispatches", None)
    with granted_role(engine, database_url, "read-only") as (role, url):
        squatter = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with squatter.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                with capture_logs() as logged:
                    outcome = run_job(engine, settings())
                conn.execute(text("SELECT pg_advisory_unlock_all()"))
        finally:
            squatter.dispose()
    assert outcome.status is Status.LOCKED
    assert outcome.error is not None and f"role {role} (pid {pid})" in outcome.error
    assert "may not run the job: not another run" in outcome.error
    [locked] = [e for e in logged if e["event"] == "run_locked"]
    assert [(h["usename"], h["may_run"]) for h in locked["holder"]] == [(role, False)]


# --- finding 1: a cleaning fabricated by the run role; finding 5: un-stamped rows -------------


def fabricate_cleaning(url: str, ids: range) -> str:
    """As the run role, in plain SQL, in one transaction: a running run, `cleaned_at`
    stamped on due rows without stripping anything, a chunk that matches, the run closed
    `succeeded`. Its run id."""
    run_id = start_run(url)
    execute_as(
        url,
        f"UPDATE dispatches SET cleaned_at = now() WHERE id BETWEEN {ids.start} AND {ids.stop - 1}",
        f"INSERT INTO {SCHEMA}.chunks (run_id, seq, first_id, last_id, rows, cleaned_at, "
        f"by_policy, skipped_locked) VALUES (:r, 1, {ids.start}, {ids.stop - 1}, {len(ids)}, "
        f"""now(), '{{"sms": {len(ids)}}}', false)""",
        run_id=run_id,
    )
    execute_as(
        url,
        f"UPDATE {RUNS} SET status = 'succeeded', remaining_due_rows = 0 WHERE run_id = :r",
        run_id=run_id,
    )
    return run_id


@pytest.mark.parametrize("reader", ["the owner", "the read-only role"])
def test_a_cleaning_the_run_role_fabricated_is_caught(
    engine: Engine,
    database_url: Any,
    run_role: tuple[str, str],
    base: list[str],
    url_string: str,
    reader: str,
) -> None:
    """`audit verify` said OK and `audit list` credited the rows: the chunk's rows still
    hold the personal data its own transaction left there, which `audit verify` now reads
    (through the read-only view's flags and `row_xact` for the read-only role)."""
    seed_series(engine, range(0, 40))
    _role, url = run_role
    run_id = fabricate_cleaning(url, range(0, 10))
    if reader == "the owner":
        code, report = verify(base)
    else:
        with granted_role(engine, database_url, "read-only") as (_reader, reader_url):
            code, report = verify([*base[:2], "--database-url", reader_url])
    assert code == Exit.TAMPERED, report
    assert report["chunks_read_for_personal_data"] == 1 and report["rows_not_read"] is None
    [finding] = report["findings"]
    assert finding["row"] == f"chunks {run_id}/1" and finding["changed"] == "trail"
    assert (
        "10 rows of its window with its cleaned_at hold personal data that its own"
        in (finding["problem"])
    )


def test_rows_written_after_their_chunk_are_counted_not_blamed_on_it(
    engine: Engine, base: list[str]
) -> None:
    """The application writes data back into a row a real run cleaned: a later write, by
    another transaction, which `verify` reports; the chunk did not lie."""
    seed_series(engine, range(0, 40))
    assert run_job(engine, settings(), chunk_size=20).status is Status.SUCCEEDED
    with engine.begin() as conn:
        conn.execute(text("UPDATE dispatches SET msisdn = '+4700000000' WHERE id = 3"))
    code, report = verify(base)
    assert (code, report["findings"]) == (Exit.OK, [])
    assert report["rows_written_after_their_chunk"] == 1
    assert report["chunks_read_for_personal_data"] == 2


def test_a_row_the_run_role_unstamped_is_named_a_table_change(
    engine: Engine, run_role: tuple[str, str], base: list[str]
) -> None:
    """The run role sets `cleaned_at = NULL` on a cleaned row (its grants allow it): `audit
    verify` exits 6 as before, and now says the dispatches changed, not the trail."""
    seed_series(engine, range(0, 40))
    assert run_job(engine, settings(), chunk_size=20).status is Status.SUCCEEDED
    _role, url = run_role
    execute_as(url, "UPDATE dispatches SET cleaned_at = NULL WHERE id = 3")
    code, report = verify(base)
    assert code == Exit.TAMPERED
    [finding] = report["findings"]
    assert (
        finding["changed"] == "table"
        and "the dispatches changed after the chunk" in (finding["problem"])
    )


def test_the_run_role_cannot_read_the_rows_and_says_so(
    engine: Engine, run_role: tuple[str, str], base: list[str]
) -> None:
    """A role that may neither read the personal columns nor the view (the run role): the
    chunks' rows are not read for personal data, and the report says why."""
    seed_series(engine, range(0, 40))
    assert run_job(engine, settings(), chunk_size=20).status is Status.SUCCEEDED
    _role, url = run_role
    result = invoke(*base[:2], "--database-url", url, "audit", "verify", "--format", "json")
    assert result.exit_code == Exit.OK, result.output
    report = json.loads(result.stdout)
    assert report["rows_not_read"] and report["chunks_read_for_personal_data"] == 0
    text_out = invoke(*base[:2], "--database-url", url, "audit", "verify").stdout
    assert "chunks' rows NOT read for personal data" in text_out


def test_an_event_dated_before_the_one_before_it_is_caught(
    engine: Engine, live: str, base: list[str]
) -> None:
    """The owner appends an event in good form (hash and link valid) whose time is a year
    before the event it follows: the chain is commit order, so its times never go back."""
    kept = verify(base)[1]["head"]
    owner_appends(
        engine,
        "'run_planned'",
        f"'run:{live}'",
        "jsonb_build_object('status', 'succeeded')",
        at="now() - interval '1 year'",
    )
    code, report = verify(base, "--expect-head", kept)
    assert code == Exit.TAMPERED
    assert any("its time is before the event before it" in p for p in problems(report)), report


def test_a_hold_that_commits_while_a_chunk_cleans_its_member_keeps_the_rows(
    engine: Engine, database_url: Any
) -> None:
    """A hold placed (not yet committed) after chunk 1, committed while chunk 2 waits for the
    chain's lock: chunk 2's cleaning statement did not see it, yet the hold is before the
    chunk in the chain. The chunk sees it once it holds the lock, is rolled back and done
    again: the member's row stays as it was, and no event says otherwise."""
    seed_series(engine, range(0, 150))
    member, row = 1060, 60  # each seeded row has a member of its own: 1000 + id
    with granted_role(engine, database_url, "holds") as (_role, url):
        holds = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        placed = threading.Event()

        def place() -> None:
            with holds.begin() as conn:
                conn.execute(
                    text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (:m, 'late')"),
                    {"m": member},
                )
                placed.set()
                time.sleep(1.5)  # chunk 2 cleans meanwhile, then waits for the chain's lock

        threads: list[threading.Thread] = []

        def after(chunk: Any) -> None:
            if chunk.seq == 1:
                threads.append(threading.Thread(target=place))
                threads[0].start()
                assert placed.wait(10)

        try:
            with capture_logs() as logged:
                outcome = run_job(engine, settings(), chunk_size=50, on_chunk=after)
            threads[0].join()
        finally:
            holds.dispose()
    assert outcome.status is Status.SUCCEEDED, outcome
    assert [e["rows"] for e in logged if e["event"] == "hold_placed_during_chunk"] == [1]
    with engine.connect() as conn:
        cleaned = conn.execute(
            text("SELECT cleaned_at IS NOT NULL FROM dispatches WHERE id = :i"), {"i": row}
        ).scalar_one()
    assert cleaned is False


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            f"CREATE TABLE {SCHEMA}.shadow_holds (LIKE {HOLDS} INCLUDING DEFAULTS); "
            f"CREATE RULE swallow_hold AS ON INSERT TO {HOLDS} DO INSTEAD "
            f"INSERT INTO {SCHEMA}.shadow_holds (member_id, reason) VALUES (NEW.member_id, "
            "NEW.reason)",
            "rule legal_holds.swallow_hold is not the job's",
        ),
        (
            f"CREATE OR REPLACE TRIGGER legal_holds_stamp BEFORE INSERT OR UPDATE ON {HOLDS} "
            f"FOR EACH ROW WHEN (false) EXECUTE FUNCTION {SCHEMA}.legal_holds_stamp()",
            "trigger legal_holds.legal_holds_stamp is not as the migrations make it",
        ),
        (
            f"ALTER TABLE {RUNS} DROP CONSTRAINT runs_counts_not_negative",
            "constraint runs.runs_counts_not_negative is gone",
        ),
        (
            f"CREATE OR REPLACE FUNCTION {SCHEMA}.chunks_stamp() RETURNS trigger "
            "LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS "
            "$$ BEGIN RETURN NEW; END $$",
            "function chunks_stamp() is not as the migrations make it",
        ),
    ],
    ids=["a rule that swallows holds", "a trigger WHEN (false)", "a constraint dropped",
         "a function rewritten"],
)  # fmt: skip
def test_the_owners_changes_to_the_trails_catalog_are_named(
    engine: Engine, live: str, base: list[str], change: str, says: str
) -> None:
    """With every trigger on and ENABLE ALWAYS, the owner changes what they do: a rule
    sends a hold elsewhere (`hold add` said it was placed; no hold, no event), a trigger
    never fires, a CHECK goes, a guard's body is emptied. `audit verify` compares the
    catalog with what the migrations made."""
    assert verify(base)[0] == Exit.OK
    with engine.begin() as conn:
        conn.execute(text(change))
    code, report = verify(base)
    assert code == Exit.TAMPERED
    assert any(says in p for p in problems(report)), report


def test_the_writing_role_is_the_sessions_whatever_a_setting_says(
    engine: Engine, live: str, base: list[str], run_role: tuple[str, str]
) -> None:
    """A writer cannot name another role in its event: setting a custom parameter in a
    RETURNING changes nothing, and the `role` parameter only takes a role the session may
    become (the server checks). The trail still verifies."""
    role, url = run_role
    run_id = start_run(url)
    execute_as(
        url,
        f"UPDATE {RUNS} SET status = 'failed' WHERE run_id = :r "
        "RETURNING set_config('dispatch_retention.role', 'postgres', true)",
        run_id=run_id,
    )
    body = json.loads(events(engine)[-1]["body"])
    assert (body["kind"], body["role"], body["by"]) == ("run_finished", role, role)
    error = refused(
        url,
        f"UPDATE {RUNS} SET status = 'failed' WHERE run_id = :r "
        "RETURNING set_config('role', 'postgres', true)",
        run_id=start_run(url),
    )
    assert "InsufficientPrivilege" in error, error
    assert verify(base)[0] == Exit.OK


def test_a_reclean_chunk_the_run_role_fabricated_is_caught(
    engine: Engine, run_role: tuple[str, str], base: list[str]
) -> None:
    """The run role starts a run with reclean options, stamps rows without stripping them
    and records a reclean chunk over them: its own transaction left the data."""
    seed_series(engine, range(0, 40))
    _role, url = run_role
    run_id = start_run(url, options="""'{"reclean": true, "chunk_size": 1000}'""")
    execute_as(
        url,
        "UPDATE dispatches SET cleaned_at = now() WHERE id BETWEEN 20 AND 29",
        f"INSERT INTO {SCHEMA}.chunks (run_id, seq, first_id, last_id, rows, cleaned_at, "
        "by_policy, skipped_locked, kind) VALUES (:r, 1, 20, 29, 10, now(), '{}', false, "
        "'reclean')",
        run_id=run_id,
    )
    code, report = verify(base)
    assert code == Exit.TAMPERED, report
    [finding] = report["findings"]
    assert (
        finding["row"] == f"chunks {run_id}/1"
        and "its own transaction left" in (finding["problem"])
    )
