"""The chunk loop on a real PostgreSQL: exactly the due rows are cleaned, chunk by chunk."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, delete, event, select
from sqlalchemy import text as sql
from structlog.testing import capture_logs

from dispatch_retention.catalog import indexes
from dispatch_retention.rule.shard import STRIPE_IDS, Shard
from dispatch_retention.run import job
from dispatch_retention.run.statements import BLOCK_IDS
from dispatch_retention.trail import holds
from dispatch_retention.vocabulary import Hooks, Options, Request, Stop
from tests.helpers import (
    DAY,
    MARK,
    TABLE,
    assert_no_half_cleaned_row,
    db_now,
    dispatch,
    insert_rows,
    run_job,
    settings,
    snapshot,
    transaction_ids_taken,
)
from tests.oracle import is_due
from tests.strategies import dispatch_specs, legal_holds, policy_sets
from tests.trail.harness import TABLES

SPREAD = 10_007  # ids this far apart: every due row in a block of its own
STRIPED = STRIPE_IDS // 3 + 1  # ids this far apart: three to a shard's stripe, then the next's

_cases = itertools.count()  # the holds stay from one example to the next: new members each


# --- the oracle property ---------------------------------------------------------------------


@hsettings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    policies=policy_sets(),
    specs=st.lists(dispatch_specs(), min_size=5, max_size=25),
    histories=legal_holds(),
    grace=st.sampled_from([0, 10, 30]),
    age_from=st.sampled_from(["created_at", "delivered_at"]),
    chunk_size=st.integers(1, 7),
    spread=st.sampled_from([1, 1, SPREAD, STRIPED]),
    shards=st.sampled_from([1, 1, 2, 3]),
)
def test_run_cleans_exactly_what_the_oracle_says(
    engine: Engine,
    policies: str,
    specs: list[dict[str, Any]],
    histories: dict[int, str],
    grace: int,
    age_from: str,
    chunk_size: int,
    spread: int,
    shards: int,
) -> None:
    """Against random policies, dispatches and legal holds (placed, released, placed again),
    run cleans exactly the oracle's due rows, the held members' left alone: with ids side by
    side (windows by ids) and spread apart (sparse windows, through the policies' arms and
    indexes); run as 2 or 3 shards, each cleans due rows of its own stripes only, and
    together exactly the oracle's."""
    s = settings(
        clean=f'in_flight_grace_days = {grace}\nage_from = "{age_from}"',
        guard="min_retention_days = 7",
        policies=policies,
    )
    member_ids = {m: 10**9 + 10 * next(_cases) + m for m in histories}
    with engine.begin() as conn:
        conn.execute(delete(TABLE))
        if spread > 1:  # this example's indexes alone (an earlier one may have left others,
            # which the planner may read an arm through: `through_indexes` would say so)
            left = conn.execute(
                sql(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'dispatches' "
                    "AND indexname LIKE 'dispatches\\_retention\\_%'"
                )
            ).scalars()
            for name in list(left):
                conn.execute(sql(f'DROP INDEX IF EXISTS "{name}"'))
            indexes.create(conn, s)
        place_holds(conn, {member_ids[m]: history for m, history in histories.items()})
    held = {member_ids[m] for m, history in histories.items() if history in HELD}
    anchor = db_now(engine)
    # sharded, the rows take turns across the shards' stripes (still in blocks of their own
    # when spread: STRIPE_IDS is a multiple of BLOCK_IDS)
    stripe = STRIPE_IDS if shards > 1 else 0
    rows = []
    for i, spec in enumerate(specs, start=1):
        created = anchor - spec["age"]
        scheduled = {
            "null": None,
            "past": anchor - DAY,
            "future": anchor + DAY,
            "2099": anchor + 27_000 * DAY,
            "created": created,
        }[spec["scheduled"]]
        delivered = (
            None if spec["delivered_after"] is None else created + spec["delivered_after"] * DAY
        )
        member = {} if spec["member"] is None else {"member_id": member_ids[spec["member"]]}
        rows.append(
            dispatch(
                i * spread + stripe * (i % shards),
                created,
                type=spec["type"],
                transmission_status=spec["transmission_status"],
                delivery_status=spec["delivery_status"],
                external_delivery_status=spec["external_delivery_status"],
                scheduled_at=scheduled,
                delivered_at=delivered,
                cleaned_at=anchor - 2 * DAY if spec["cleaned"] else None,
                **member,
            )
        )
    insert_rows(engine, rows)
    before = snapshot(engine)

    cleaned: set[int] = set()
    for index in range(shards):
        shard = Shard(index, shards) if shards > 1 else None
        # a pinned size caps a window's ids too: spread rows take the adaptive size
        options = Options(chunk_size=chunk_size if spread == 1 else None)
        with capture_logs() as logs:
            outcome = job.run(engine, s, Request(options, shard=shard), stop=Stop())
        assert outcome.status == "succeeded", outcome.error
        if spread > 1:  # the indexes are there, and a window over several blocks is sparse
            assert outcome.plan.through_indexes
            for e in (e for e in logs if e["event"] == "chunk_committed"):
                wide = e["last_id"] - e["first_id"] >= BLOCK_IDS
                assert e["via"] == ("arms" if wide else "ids"), e
        now = outcome.plan.rules.now
        mine = {r["id"] for r in rows if shard is None or (r["id"] // STRIPE_IDS) % shards == index}
        due_here = {r["id"] for r in rows if r["id"] in mine and is_due(r, s, now, held)}
        assert outcome.rows_cleaned == outcome.plan.due_rows == len(due_here)
        by_now = assert_no_half_cleaned_row(snapshot(engine), before=before, s=s)
        # this shard's due rows at its own `now` (a case's ages sit seconds from a cutoff),
        # none of another shard's, none twice: so the shards' union is the oracle's due set
        assert by_now - cleaned == due_here
        cleaned = by_now
    assert not {r["id"] for r in rows if r["member_id"] in held} & cleaned


#: the hold histories that leave a hold active (strategies.HOLD_HISTORIES)
HELD = frozenset({"placed", "placed-again"})


def place_holds(conn: Connection, histories: dict[int, str]) -> None:
    """Each member's hold history, through the library (`hold add` / `hold release`)."""
    for member_id, history in histories.items():
        if history != "none":
            holds.add(conn, TABLES, member_id, "case 42", "test")
        if history in ("released", "placed-again"):
            holds.release(conn, TABLES, member_id, "test")
        if history == "placed-again":
            holds.add(conn, TABLES, member_id, "case 43", "test")


# --- chunks, failures, dry runs, locks, logs -------------------------------------------------


def backlog(engine: Engine, n: int) -> list[dict[str, Any]]:
    """n rows: every third one young (not due), the rest well past every window."""
    now = db_now(engine)
    rows = [
        dispatch(i, now - (5 * DAY if i % 3 == 0 else 500 * DAY), type=["sms", "email"][i % 2])
        for i in range(1, n + 1)
    ]
    insert_rows(engine, rows)
    return rows


def test_chunk_size_two_cleans_everything_in_many_chunks(engine: Engine) -> None:
    """With chunk_size=2 every due row is cleaned, each chunk at most 2 rows."""
    rows = backlog(engine, 60)
    s = settings()
    before = snapshot(engine)
    with capture_logs() as logs:
        outcome = run_job(engine, s, chunk_size=2)
    chunks = [e for e in logs if e["event"] == "chunk_committed"]
    due = {r["id"] for r in rows if r["id"] % 3}
    assert outcome.status == "succeeded"
    assert outcome.rows_cleaned == len(due) == sum(c["rows"] for c in chunks)
    assert all(1 <= c["rows"] <= 2 for c in chunks)
    assert len(chunks) == outcome.chunks >= len(due) // 2
    assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert assert_no_half_cleaned_row(snapshot(engine), before=before, s=s) == due


def test_failure_in_chunk_n_rolls_back_that_chunk_only(engine: Engine) -> None:
    """An error raised inside chunk 3 before COMMIT undoes chunk 3; chunks 1-2 stay."""
    backlog(engine, 30)
    s = settings()

    def fail(seq: int) -> None:
        if seq == 3:
            raise RuntimeError("injected")

    before = snapshot(engine)
    outcome = job.run(
        engine, s, Request(Options(chunk_size=3)), stop=Stop(), hooks=Hooks(fail_in_chunk=fail)
    )
    assert outcome.status == "failed"
    after = snapshot(engine)
    cleaned = sorted(i for i in after if after[i]["cleaned_at"] is not None)
    # windows of 3 ids from id 1: chunk 1 = ids 1-3, chunk 2 = ids 4-6 (id 3, 6 are young)
    assert cleaned == [1, 2, 4, 5]
    assert outcome.rows_cleaned == 4
    stamps = {after[i]["cleaned_at"] for i in cleaned}
    assert len(stamps) == 2  # one transaction timestamp per chunk

    rerun = run_job(engine, s)
    assert rerun.status == "succeeded"
    final = snapshot(engine)
    assert assert_no_half_cleaned_row(final, before=before, s=s) == {i for i in before if i % 3}
    again = run_job(engine, s)
    assert (again.status, again.rows_cleaned) == ("succeeded", 0)
    assert snapshot(engine) == final


def test_dry_run_writes_nothing_and_predicts_the_run(engine: Engine) -> None:
    """A dry run leaves every row as it was; its per-policy counts equal the real run's."""
    backlog(engine, 90)
    insert_rows(
        engine,
        [
            dispatch(
                500, db_now(engine) - 100 * DAY, delivery_status="pending", type="sms"
            ),  # sms unsettled: waits out the grace
            dispatch(501, db_now(engine) - 40 * DAY, transmission_status="failed"),
        ],
    )
    s = settings()
    before = snapshot(engine)
    with transaction_ids_taken() as taken:
        planned = run_job(engine, s, dry_run=True)
    assert planned.status == "planned"
    assert snapshot(engine) == before
    assert taken == []  # not a single transaction id was consumed
    assert planned.plan is not None
    predicted = {p.name: p.due_rows for p in planned.plan.policies}
    assert planned.plan.waiting_grace_rows == 1
    outcome = run_job(engine, s)
    assert {p: outcome.by_policy.get(p, 0) for p in predicted} == predicted
    assert predicted["failed-sends"] == 1


def test_locked_row_is_skipped_without_waiting(engine: Engine) -> None:
    """A due row another session holds FOR UPDATE is skipped at once and cleaned next run."""
    backlog(engine, 40)
    s = settings(clean="lock_timeout_ms = 20000")
    locked = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with engine.begin() as conn:
            conn.execute(select(TABLE.c.id).where(TABLE.c.id == 10).with_for_update())
            locked.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    try:
        started = time.monotonic()
        outcome = run_job(engine, s, chunk_size=8)
        elapsed = time.monotonic() - started
    finally:
        release.set()
        holder.join()
    # never `succeeded` while a due row keeps its personal data: incomplete, counted, why
    assert (outcome.status, outcome.remaining_due_rows) == ("incomplete", 1)
    assert outcome.remaining_reason == "locked_by_application"
    # a run that waited on the row would wait out the 20 s lock_timeout; 10 s leaves the five
    # chunks room on two busy cores
    assert elapsed < 10, f"the run waited {elapsed:.1f}s on a locked row"
    after = snapshot(engine)
    assert after[10]["cleaned_at"] is None
    assert after[10]["msisdn"] is not None
    due = {i for i in after if i % 3}
    assert {i for i in after if after[i]["cleaned_at"]} == due - {10}

    nxt = run_job(engine, s)
    assert (nxt.rows_cleaned, nxt.status, nxt.remaining_due_rows) == (1, "succeeded", 0)
    assert snapshot(engine)[10]["cleaned_at"] is not None


def test_an_empty_window_jumps_to_the_next_due_row_of_its_block(engine: Engine) -> None:
    """Small pinned windows do not walk the rest of a block window by window once its due
    rows are cleaned or held locked: an empty window looks up the block's next due row."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 500 * DAY) for i in (1, 2, 3, 5_000, 5_001)])
    updates: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().startswith("WITH cleaned"):
            updates.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        outcome = run_job(engine, settings(), chunk_size=2)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert outcome.rows_cleaned == 5
    cleaned = {i for i, row in snapshot(engine).items() if row["cleaned_at"]}
    assert cleaned == {1, 2, 3, 5_000, 5_001}
    # windows [1,3) [3,5) then empty [5,7) jumps to 5,000: [5000,5002) and an empty end
    assert len(updates) <= 6, len(updates)


def test_logs_carry_run_id_and_no_personal_data(engine: Engine) -> None:
    """Every event has the run id; no seeded personal-data marker reaches the log."""
    backlog(engine, 20)
    with capture_logs() as logs:
        outcome = run_job(engine, settings(), chunk_size=5)
    events = [e["event"] for e in logs]
    assert events[0] == "run_started" and events[1] == "plan" and events[-1] == "run_finished"
    assert "chunk_committed" in events
    assert all(e.get("run_id") == outcome.run_id for e in logs)
    assert MARK not in repr(logs)


def test_replace_writes_json_and_member_id_can_be_stripped(engine: Engine) -> None:
    """clean.replace writes its JSON value; member_id is stripped only when listed."""
    backlog(engine, 6)
    s = settings(
        clean='columns = ["content", "msisdn", "member_id"]\n'
        'replace = { content = { redacted = true }, msisdn = "" }\n'
        'keep = { email = "a test keeps it", app_token = "a test keeps it" }'
    )
    run_job(engine, s)
    row = snapshot(engine)[1]
    assert row["content"] == {"redacted": True}
    assert row["msisdn"] == ""
    assert row["member_id"] is None
    assert row["email"] is not None  # not listed: kept


def test_only_chunks_commit_without_waiting_for_the_disk(engine: Engine) -> None:
    """Each chunk's transaction sets synchronous_commit off (a server crash loses a chunk
    whole, rows and audit row together); no other transaction of the run does, so the run
    record's end flushes every chunk before it."""
    backlog(engine, 30)
    statements: list[tuple[str, str]] = []  # (statement, its parameters)

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        statements.append((statement, repr(parameters)))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        outcome = run_job(engine, settings(), chunk_size=4)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert outcome.status == "succeeded" and outcome.chunks >= 5
    relaxed = [
        i
        for i, (s, p) in enumerate(statements)
        if "set_config" in s and "'synchronous_commit'" in p and "'off'" in p
    ]
    # one transaction per window (an empty one, rolled back, records no chunk)
    updates = [i for i, (s, _) in enumerate(statements) if s.lstrip().startswith("WITH cleaned AS")]
    assert len(relaxed) == len(updates) >= outcome.chunks
    assert all(r < u for r, u in zip(relaxed, updates, strict=True))
    assert not any("synchronous_commit" in s + p for s, p in statements[updates[-1] + 1 :])
