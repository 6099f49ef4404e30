"""The end count's follower (`run/follower.py`): its passes read what the end count reads, so
the old index entries of the rows cleaned before a pass are marked dead and the end count
skips them; it changes no count (tests/run/test_trust_end_count.py runs with it forced on)."""

from __future__ import annotations

import time
from datetime import datetime

import structlog
from sqlalchemy import Engine, func, text
from structlog.testing import capture_logs

from dispatch_retention.config import Settings
from dispatch_retention.rule import policy
from dispatch_retention.run import follower
from dispatch_retention.run.planning import make_plan
from dispatch_retention.run.statements import Statements
from tests.helpers import DAY, db_now, dispatch, insert_rows, settings

FIRST, SECOND = range(1, 2_001), range(10_001, 12_001)
#: index ranges an old sms row lies in: the sms arm's, and the default policy's (every row
#: older than its window; the arm leaves the sms rows out by a filter, after reading them)
RANGES = 2

#: index entries the table's indexes returned to this session since its statistics were last
#: flushed (a killed entry is not returned)
ENTRIES_READ = text(
    "SELECT sum(pg_stat_get_xact_tuples_returned(indexrelid))::bigint FROM pg_index "
    "WHERE indrelid = 'dispatches'::regclass"
)


def clean(engine: Engine, s: Settings, rules: policy.Rules, ids: range) -> None:
    table = Statements(s, rules).table
    with engine.begin() as conn:
        values = policy.cleaned_values(s, table) | {"cleaned_at": func.now()}
        done = conn.execute(
            table.update().where(table.c.id.between(ids.start, ids.stop - 1)).values(values)
        )
        assert done.rowcount == len(ids)


def end_count_reads(engine: Engine, s: Settings, rules: policy.Rules) -> int:
    """The index entries the end count reads (its statement, as a run runs it)."""
    with engine.connect() as conn:  # one session, whose pending statistics are flushed first
        with conn.begin():
            conn.execute(text("SELECT pg_stat_force_next_flush()"))
        with conn.begin():
            plan = make_plan(conn, s, None, None, rules)
            assert plan.through_indexes and plan.due_rows == 0
            return int(conn.execute(ENTRIES_READ).scalar_one() or 0)


def test_a_pass_marks_the_old_entries_it_reads_dead(engine: Engine) -> None:
    """Two sets of due rows, both cleaned; the follower makes one pass between the two
    cleanings: the end count then reads the second set's old entries and none of the
    first's, and a second end count neither."""
    now: datetime = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 400 * DAY) for i in (*FIRST, *SECOND)])
    s = settings()
    rules = policy.rules(s, now)
    clean(engine, s, rules, FIRST)

    reader = follower.Follower(
        engine, lambda conn: make_plan(conn, s, None, None, rules), structlog.get_logger("t")
    )
    reader.start()
    reader.committed()
    deadline = time.monotonic() + 30
    while reader.passes < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    reader.stop()
    assert reader.passes == 1

    clean(engine, s, rules, SECOND)
    read = end_count_reads(engine, s, rules)
    assert RANGES * len(SECOND) <= read < RANGES * len(SECOND) + len(FIRST) // 10, read
    assert end_count_reads(engine, s, rules) < len(SECOND) // 10


def test_without_a_pass_the_end_count_reads_every_old_entry(engine: Engine) -> None:
    """The control: no follower, and the end count reads each cleaned row's old entry."""
    now = db_now(engine)
    insert_rows(engine, [dispatch(i, now - 400 * DAY) for i in FIRST])
    s = settings()
    rules = policy.rules(s, now)
    clean(engine, s, rules, FIRST)
    assert end_count_reads(engine, s, rules) >= RANGES * len(FIRST)


def test_a_follower_stopped_before_a_chunk_committed_reads_nothing(engine: Engine) -> None:
    """Stopped at once (a run that ends on its first chunk): no pass, no error, and its
    closing event says so."""
    s = settings()
    rules = policy.rules(s, db_now(engine))
    reader = follower.Follower(
        engine, lambda conn: make_plan(conn, s, None, None, rules), structlog.get_logger("t")
    )
    reader.start()
    with capture_logs() as logs:
        reader.stop()
    assert reader.passes == 0
    assert [e["passes"] for e in logs if e["event"] == "end_count_follower"] == [0]
    assert not reader.thread.is_alive()
