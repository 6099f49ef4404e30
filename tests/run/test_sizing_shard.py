"""Adaptive chunk sizing (a pure controller) and sharded runs (`--shard I/N`).

`sizing.next_size` and the `shard` arithmetic are tested as pure functions, with Hypothesis
for their invariants; the shard predicate is also evaluated by PostgreSQL itself, and four
shards run as concurrent real subprocesses over a backlog spanning several stripes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy import text as sql

from dispatch_retention.config import Target
from dispatch_retention.rule.dispatch_table import dispatches_table
from dispatch_retention.rule.shard import STRIPE_IDS, Shard, from_env, parse
from dispatch_retention.run import job, sizing
from dispatch_retention.run.lock import RunLock, run_locks
from dispatch_retention.vocabulary import Request, Stop
from tests.helpers import (
    AUDIT_SCHEMA,
    Job,
    assert_consistent,
    config_text,
    remaining_due,
    run_records,
    run_script,
    seed_series,
    settings,
    write_config,
)

TABLE = dispatches_table(Target())


# --- sizing.next_size ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test() -> Iterator[None]:
    yield
    Job.reap()


def size(current: int, *recent: tuple[int, float], **kwargs: Any) -> int:
    limits: dict[str, Any] = {"target_ms": 200, "floor": 100, "ceiling": 100_000}
    return sizing.next_size(current, list(recent), **{**limits, **kwargs})


@pytest.mark.parametrize(
    ("recent", "expected"),
    [
        pytest.param([(1000, 100.0)], 2000, id="twice-as-fast-doubles"),
        pytest.param([(1000, 160.0)], 1250, id="a-bit-faster-grows-in-proportion"),
        pytest.param([(1000, 10.0)], 2000, id="much-faster-grows-at-most-2x"),
        pytest.param([(1000, 0.0)], 2000, id="zero-ms-grows-at-most-2x"),
        pytest.param([(1000, 200.0)], 1000, id="on-target-stays"),
        pytest.param([(1000, 250.0)], 800, id="a-bit-slower-shrinks-in-proportion"),
        pytest.param([(1000, 400.0)], 500, id="twice-as-slow-halves"),
        pytest.param([(1000, 60_000.0)], 500, id="much-slower-shrinks-at-most-2x"),
        pytest.param([], 1000, id="no-history-stays"),
        pytest.param([(0, 50.0)], 1000, id="no-rows-no-estimate"),
    ],
)
def test_next_size_moves_toward_the_target_by_at_most_2x(
    recent: list[tuple[int, float]], expected: int
) -> None:
    """Faster than the target: grow; slower: shrink; never more than 2x either way."""
    assert size(1000, *recent) == expected


def test_next_size_estimates_from_the_last_few_chunks_weighed_by_rows() -> None:
    """The estimate is total ms over total rows of the last WINDOW chunks; older chunks are
    forgotten, and a big chunk weighs more than a small one."""
    old = [(1000, 10_000.0)] * 10
    assert size(1000, *old, *[(1000, 100.0)] * sizing.WINDOW) == 2000
    assert size(1000, (100, 100.0), (1900, 100.0)) == 2000  # 2000 rows in 200 ms
    assert size(1000, (1000, 250.0), (1000, 250.0)) == 800  # 2000 rows in 500 ms: slower
    # Chunks within the target never shrink it, however slow per row they look (sparse
    # windows: few rows, the fixed cost per chunk dominates).
    assert size(1000, (10, 100.0), (5, 150.0)) == 1000


def test_a_chunk_well_over_the_target_sizes_the_next_one_by_itself() -> None:
    """A chunk over SLOW x the target is answered at once from its own pace, not diluted by
    the fast chunks before it (a checkpoint beginning slows every chunk for a while)."""
    fast = [(1000, 100.0)] * (sizing.WINDOW - 1)
    assert size(1000, *fast, (1000, 250.0)) == 1538  # within SLOW x: the average decides
    assert size(1000, *fast, (1000, 400.0)) == 500  # twice as slow: half, at once
    assert size(1000, *fast, (1000, 320.0)) == 625  # 1.6x as slow: in proportion
    assert size(1000, *fast, (1000, 4000.0)) == 500  # still at most 2x per step
    assert size(1000, *fast, (0, 350.0)) == 1067  # no rows: no pace of its own
    # Growth still follows the moving estimate: the slow chunk holds it back while it is
    # in the window.
    assert size(500, (500, 400.0), *[(500, 60.0)] * (sizing.WINDOW - 1)) == 781
    assert size(500, *[(500, 60.0)] * sizing.WINDOW) == 1000


@pytest.mark.parametrize(
    ("current", "recent", "limits", "expected"),
    [
        pytest.param(900, [(900, 10.0)], {"ceiling": 1000}, 1000, id="growth-to-ceiling"),
        pytest.param(150, [(150, 5000.0)], {"floor": 100}, 100, id="shrink-to-floor"),
        pytest.param(5000, [], {"ceiling": 1000}, 1000, id="no-history-still-clamped"),
    ],
)
def test_next_size_clamps_to_floor_and_ceiling(
    current: int, recent: list[tuple[int, float]], limits: dict[str, int], expected: int
) -> None:
    """The result never leaves [floor, ceiling]."""
    assert size(current, *recent, **limits) == expected


def test_a_timeout_shrinks_to_a_quarter_but_not_below_the_floor() -> None:
    """A statement timeout cuts the size to a quarter at once, whatever the history."""
    assert size(1000, (1000, 10.0), timed_out=True) == 250
    assert size(1000, (1000, 10.0), timed_out=True, floor=400) == 400
    assert size(3, timed_out=True, floor=1) == 1


def test_target_zero_disables_adaptation() -> None:
    """target_ms = 0 (a pinned --chunk-size) keeps the size, only clamped."""
    assert size(1000, (1000, 10.0), target_ms=0) == 1000
    assert size(1000, (1000, 10_000.0), target_ms=0) == 1000
    assert size(5000, (5000, 10.0), target_ms=0, ceiling=2000) == 2000


@hsettings(max_examples=500)
@given(
    data=st.data(),
    floor=st.integers(1, 10_000),
    span=st.integers(0, 1_000_000),
    recent=st.lists(
        st.tuples(st.integers(0, 1_000_000), st.floats(0, 1e7, allow_nan=False)), max_size=12
    ),
    target=st.floats(0, 1e5, allow_nan=False),
    timed_out=st.booleans(),
)
def test_next_size_always_within_floor_and_ceiling(
    data: st.DataObject,
    floor: int,
    span: int,
    recent: list[tuple[int, float]],
    target: float,
    timed_out: bool,
) -> None:
    """For any history and target, a size within [floor, ceiling] stays within them, and
    one step moves it by at most 2x (a timeout: to a quarter, or the floor)."""
    ceiling = floor + span
    current = data.draw(st.integers(floor, ceiling), label="size")
    new = sizing.next_size(
        current, recent, target_ms=target, floor=floor, ceiling=ceiling, timed_out=timed_out
    )
    assert floor <= new <= ceiling
    if timed_out:
        assert new == max(floor, current // 4)
    else:
        assert min(current / 2, ceiling) - 1 <= new <= max(current * 2, floor)


# --- shard arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("0/4", Shard(0, 4), id="plain"),
        pytest.param(" 3 / 4 ", Shard(3, 4), id="spaces"),
        pytest.param("0/1", Shard(0, 1), id="one-shard"),
        pytest.param("1023/1024", Shard(1023, 1024), id="largest"),
        pytest.param("0001/0004", Shard(1, 4), id="leading-zeros"),
    ],
)
def test_parse_accepts_i_of_n(text: str, expected: Shard) -> None:
    """I/N with 0 <= I < N <= 1024 parses, and prints back as I/N."""
    assert parse(text) == expected
    assert str(parse(text)) == f"{expected.index}/{expected.count}"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("4/4", id="index-equals-count"),
        pytest.param("5/4", id="index-above-count"),
        pytest.param("-1/2", id="negative"),
        pytest.param("1/0", id="zero-count"),
        pytest.param("0/1025", id="too-many"),
        pytest.param("x", id="not-a-number"),
        pytest.param("1/2/3", id="three-parts"),
        pytest.param("1.0/2", id="decimal"),
        pytest.param("", id="empty"),
        pytest.param("12345/99999", id="too-many-digits"),
    ],
)
def test_parse_refuses_anything_else(text: str) -> None:
    """Anything but a valid I/N is a ValueError (the CLI turns it into exit 2)."""
    with pytest.raises(ValueError, match=r"shard|I/N"):
        parse(text)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, None, id="not-an-indexed-job"),
        pytest.param({"JOB_COMPLETION_INDEX": "2"}, None, id="index-without-count"),
        pytest.param({"JOB_COMPLETIONS": "4"}, None, id="count-without-index"),
        pytest.param({"JOB_COMPLETION_INDEX": "0", "JOB_COMPLETIONS": "1"}, None, id="n-1"),
        pytest.param(
            {"JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": "4"}, Shard(2, 4), id="indexed"
        ),
    ],
)
def test_from_env_reads_the_indexed_job(env: dict[str, str], expected: Shard | None) -> None:
    """The Kubernetes Indexed Job's index and completions; one completion is no shard."""
    assert from_env(env) == expected


def test_from_env_refuses_an_index_out_of_range() -> None:
    """JOB_COMPLETION_INDEX >= JOB_COMPLETIONS is an error, not a silent whole run."""
    with pytest.raises(ValueError, match="shard"):
        from_env({"JOB_COMPLETION_INDEX": "4", "JOB_COMPLETIONS": "4"})


def _owners_in_sql(engine: Engine, count: int) -> dict[int, list[int]]:
    """Which shards' predicate PostgreSQL says each row of the table satisfies."""
    owners: dict[int, list[int]] = {}
    with engine.connect() as conn:
        for row_id in conn.execute(select(TABLE.c.id)).scalars():
            owners[row_id] = []
        for index in range(count):
            query = select(TABLE.c.id).where(Shard(index, count).predicate(TABLE))
            for row_id in conn.execute(query).scalars():
                owners[row_id].append(index)
    return owners


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_the_sql_predicate_gives_every_id_exactly_one_shard(engine: Engine, count: int) -> None:
    """PostgreSQL's reading of the shard predicate agrees with align(): one owner per id."""
    ids = [0, 1, 99_999, 100_000, 250_000, 399_999, 700_001, 2**40 + 17, 2**62]
    seed_series(engine, ids)
    owners = _owners_in_sql(engine, count)
    assert owners == {i: [(i // STRIPE_IDS) % count] for i in ids}


@pytest.mark.parametrize("count", [pytest.param(1, id="unsharded"), pytest.param(4, id="4-shards")])
def test_negative_ids_are_cleaned_too(engine: Engine, count: int) -> None:
    """`id` is a bigint: due rows with negative ids are cleaned like any other, by a whole
    run or by the shards of a sharded run (run one after the other here)."""
    due, _ = seed_series(engine, [-250_001, -150_000, -100_000, -10_001, -5, 5, 150_000])
    s = settings()
    for index in range(count):
        shard = Shard(index, count) if count > 1 else None
        outcome = job.run(engine, s, Request(shard=shard), stop=Stop())
        assert outcome.status == "succeeded", outcome.error
    with engine.connect() as conn:
        left = conn.execute(select(TABLE.c.id).where(TABLE.c.cleaned_at.is_(None))).scalars()
        assert sorted(left) == []
    assert remaining_due(engine, due) == 0


# --- sharded runs as concurrent subprocesses -------------------------------------------------


def shard_of(row_id: int, count: int = 4) -> int:
    return (row_id // STRIPE_IDS) % count


@pytest.fixture
def backlog(engine: Engine) -> set[int]:
    """Ids 250..1,000,000 step 250 (ten stripes, 4000 rows), every seventh one young."""
    due, _ = seed_series(engine, range(250, 1_000_001, 250), young=lambda i: i % 1750 == 0)
    return due


def test_four_concurrent_shards_clean_every_due_row_exactly_once(
    engine: Engine, url_string: str, tmp_path: Path, backlog: set[int]
) -> None:
    """Four `run --shard I/4` processes side by side: each cleans its own stripes, each
    writes its own run record, and every due row is cleaned by exactly one chunk."""
    cfg = write_config(tmp_path / "retention.toml", config_text("pause_between_chunks_ms = 250"))
    jobs = [
        Job(url_string, cfg, "run", "--yes", "--shard", f"{i}/4", "--chunk-size", "20000")
        for i in range(4)
    ]
    for running in jobs:
        assert running.finish(60) == 0, running.stderr
    records = run_records(engine)
    assert len(records) == 4
    by_shard = {r["shard"]: r for r in records.values()}
    assert sorted(by_shard) == [f"{i}/4" for i in range(4)]
    for index, running in enumerate(jobs):
        record = records[str(running.last("run_started")["run_id"])]
        mine = {i for i in backlog if shard_of(i) == index}
        assert (record["shard"], record["status"]) == (f"{index}/4", "succeeded")
        assert record["audited_rows"] == len(mine) == running.last("run_finished")["rows_cleaned"]
    # They did run side by side: every run started before any run finished.
    assert max(r["started_at"] for r in records.values()) < min(
        r["finished_at"] for r in records.values()
    )
    assert assert_consistent(engine, backlog) == backlog
    with engine.connect() as conn:
        chunks = conn.execute(
            sql(
                f"SELECT c.first_id, c.last_id, r.shard FROM {AUDIT_SCHEMA}.chunks c"
                f" JOIN {AUDIT_SCHEMA}.runs r USING (run_id)"
            )
        ).all()
    for first_id, last_id, shard_text in chunks:  # no chunk window leaves its shard's stripe
        assert first_id // STRIPE_IDS == last_id // STRIPE_IDS
        assert f"{shard_of(first_id)}/4" == shard_text


def test_a_whole_run_beside_a_shard_exits_3_and_shards_run_side_by_side(
    engine: Engine, url_string: str, tmp_path: Path, backlog: set[int]
) -> None:
    """While shard 0/4 holds its locks: a whole run exits 3 and so does another 0/4, both
    touching nothing; shard 1/4 runs beside it. While a whole run holds the target, a
    shard exits 3."""
    cfg = write_config(tmp_path / "retention.toml", config_text())
    with RunLock(engine, run_locks("public.dispatches", "0/4")) as held:
        assert held.acquired
        whole = run_script(url_string, cfg, "run", "--yes")
        same = run_script(url_string, cfg, "run", "--yes", "--shard", "0/4")
        assert (whole.returncode, same.returncode) == (3, 3), whole.stderr + same.stderr
        assert whole.events("run_locked") and same.events("run_locked")
        assert run_records(engine) == {}  # nothing touched, not even a run record
        assert assert_consistent(engine, backlog) == set()

        beside = run_script(url_string, cfg, "run", "--yes", "--shard", "1/4")
        assert beside.returncode == 0, beside.stderr
        shard_1 = {i for i in backlog if shard_of(i) == 1}
        assert assert_consistent(engine, backlog) == shard_1

    with RunLock(engine, run_locks("public.dispatches", None)) as whole_lock:
        assert whole_lock.acquired
        blocked = run_script(url_string, cfg, "run", "--yes", "--shard", "2/4")
        assert blocked.returncode == 3, blocked.stderr
    assert assert_consistent(engine, backlog) == shard_1
