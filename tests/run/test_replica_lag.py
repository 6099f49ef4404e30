"""The replica lag throttle (`run/throttle.py`, `trail/replica_lag.py`) on a real primary and
its streaming replica, both made here (`servers.server`, `servers.standby`: initdb, then
`pg_basebackup -R` from that primary, never from the suite's server) and removed after.

A replica whose replay is paused (`pg_wal_replay_pause()`) lags more every moment the
primary writes: the run waits for it, and goes on once it is resumed; a wait past
`clean.max_throttle_wait_s` ends the run `incomplete` (`replica_lag`); SIGTERM while
waiting stops it cleanly; a role without the lag function is warned and the run goes on;
the function answers the lag and nothing else.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from structlog.testing import capture_logs

from dispatch_retention import config
from dispatch_retention.catalog import indexes
from dispatch_retention.checks import db_check, db_grants
from dispatch_retention.config import Settings, Target
from dispatch_retention.demo.synthetic import create_dispatches
from dispatch_retention.pg import engines
from dispatch_retention.run.throttle import Lag, LagClock
from dispatch_retention.trail import migrate, objects, replica_lag
from dispatch_retention.vocabulary import Chunk
from tests.helpers import (
    Job,
    apply_sql,
    assert_no_half_cleaned_row,
    config_text,
    run_job,
    seed_series,
    settings,
    snapshot,
    write_config,
)
from tests.matrix import servers

AUDIT_SCHEMA = "dispatch_retention"
ROWS = 3000


# --- the lag measured from the primary's side (no database) -----------------------------


def lag(wal: int, replayed: int | None, *, standbys: int = 1, reported: float | None = None) -> Lag:
    return Lag(standbys, 0, wal, replayed, reported, 0)


def test_a_standby_that_replayed_everything_has_no_lag() -> None:
    clock = LagClock()
    assert clock.lag_s(lag(100, 100), now=10.0) == 0
    assert clock.lag_s(lag(200, 200, reported=3.0), now=11.0) == 0  # a stale report


def test_the_lag_is_the_time_since_the_first_position_not_replayed() -> None:
    clock = LagClock()
    assert clock.lag_s(lag(100, 90), now=10.0) == 0  # first seen now: at least 0 s behind
    assert clock.lag_s(lag(150, 90), now=11.0) == 1.0  # 100 was there at 10.0
    assert clock.lag_s(lag(180, 120), now=12.5) == 1.5  # 100 replayed, 150 (11.0) is not
    assert clock.lag_s(lag(180, 180), now=13.0) == 0
    assert clock.lag_s(lag(190, 185), now=14.0) == 0  # 180 replayed; 190 first seen now
    assert clock.lag_s(lag(195, 185), now=14.5) == 0.5


def test_a_paused_standby_lags_more_every_read_though_postgresql_reports_it_stale() -> None:
    clock = LagClock()
    for second in range(6):
        seen = clock.lag_s(lag(100 + second, 99, reported=0.002), now=float(second))
    assert seen == 5.0


def test_the_lag_postgresql_reports_counts_when_it_is_the_larger() -> None:
    clock = LagClock()
    assert clock.lag_s(lag(100, 50, reported=7.5), now=1.0) == 7.5


def test_no_standby_or_no_position_is_no_lag_and_a_clock_that_stays_small() -> None:
    clock = LagClock()
    assert clock.lag_s(lag(100, None, standbys=0), now=1.0) == 0
    for n in range(300):
        clock.lag_s(lag(200 + n, 200 + n), now=2.0 + n)
    assert len(clock.marks) == 1  # replayed positions are forgotten


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_replica_lag_s", "-1"), ("max_throttle_wait_s", "0"), ("max_replica_lag_s", '"2s"')],
)
def test_the_config_refuses_throttle_settings_it_cannot_keep(key: str, value: str) -> None:
    with pytest.raises(config.ConfigError, match=key):
        config.parse(config_text(clean=f"{key} = {value}"))


def test_db_grants_prints_the_lag_function_only_with_a_limit_and_says_who_runs_it() -> None:
    plain = db_grants.printed(settings(), "job", "run")
    assert "replica_lag" not in plain and "Part" not in plain
    s = config.parse(config_text(clean="max_replica_lag_s = 2"))
    printed = db_grants.printed(s, "job", "run")
    part1, part2 = printed.split("-- Part 2")
    assert part1.startswith("-- Part 1, run by the owner of dispatches or an administrator")
    assert "GRANT UPDATE" in part1 and "replica_lag" not in part1
    assert part2.startswith(", run by a superuser or a member of pg_read_all_stats")
    assert "SECURITY DEFINER SET search_path = pg_catalog, pg_temp" in part2
    assert "REVOKE ALL ON FUNCTION dispatch_retention.replica_lag() FROM PUBLIC;" in part2
    assert "GRANT EXECUTE ON FUNCTION dispatch_retention.replica_lag() TO job;" in part2
    for purpose in ("read-only", "holds"):
        assert "replica_lag" not in db_grants.printed(s, "job", purpose)


# --- a primary and its replica ------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    primary: URL
    replica: URL
    binaries: servers.Binaries


def _binaries() -> servers.Binaries:
    """The machine's PostgreSQL where it has one, else the suite's embedded one (pgserver)."""
    for major in (15,):
        for source in servers.SOURCES[major]:
            if isinstance(source, servers.Installed) and source.available(Path()):
                return source.install(Path())
    import pgserver

    home = Path(pgserver.__file__).parent / "pginstall"
    return servers.Binaries("pgserver", home, "bin")


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    binaries = _binaries()
    options = f"{servers.SERVER_OPTIONS} -c wal_level=logical"  # a CDC reader's slot too
    with (
        servers.server(binaries, 0, options) as primary,
        servers.standby(binaries, primary, options) as replica,
    ):
        url = engines.parse_url(primary.url)
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE dispatches"))
        admin.dispose()
        engine = create_engine(url.set(database="dispatches"))
        with engine.begin() as conn:
            create_dispatches(conn, Target())
            indexes.create(conn, settings())
        migrate.upgrade(engine, AUDIT_SCHEMA)
        engine.dispose()
        yield Pair(url.set(database="dispatches"), engines.parse_url(replica.url), binaries)


@pytest.fixture
def primary(pair: Pair) -> Iterator[Engine]:
    """The primary's dispatches, emptied and seeded with ROWS due ones for each test; the
    replica's replay resumed after it, whatever the test did."""
    engine = engines.make_engine(pair.primary)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE dispatches"))
    seed_series(engine, range(1, ROWS + 1))
    yield engine
    replay(pair, pause=False)
    engine.dispose()


def replay(pair: Pair, *, pause: bool) -> None:
    engine = create_engine(pair.replica, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        call = "pg_wal_replay_pause()" if pause else "pg_wal_replay_resume()"
        conn.execute(text(f"SELECT {call}"))
        if pause:  # paused for real before the run starts writing
            for _ in range(100):
                if conn.execute(text("SELECT pg_get_wal_replay_pause_state()")).scalar() == (
                    "paused"
                ):
                    break
                time.sleep(0.05)
    engine.dispose()


def caught_up(pair: Pair, timeout: float = 30) -> None:
    """Wait until the replica has replayed all the primary has written."""
    engine = create_engine(pair.primary, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            behind = conn.execute(
                text(
                    "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)), 0)"
                    " FROM pg_stat_replication"
                )
            ).scalar_one()
            if behind == 0:
                break
            time.sleep(0.05)
    engine.dispose()


@contextlib.contextmanager
def role(engine: Engine, pair: Pair, s: Settings, *, lag_function: bool) -> Iterator[URL]:
    """A LOGIN role with the run grants (and the lag function's part, or not): its URL."""
    name = f"dr_run_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {name} LOGIN"))
        apply_sql(conn, db_grants.statements(s, name, "run"))
        if lag_function:
            apply_sql(conn, db_grants.lag_statements(s, name))
    try:
        yield pair.primary.set(username=name)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))


def throttled(limit: float = 0.3, wait: float = 60, extra: str = "") -> Settings:
    return config.parse(
        config_text(
            clean=f"max_replica_lag_s = {limit}\nmax_throttle_wait_s = {wait}\n"
            f"pause_between_chunks_ms = 20\n{extra}"
        )
    )


def test_the_lag_function_answers_the_lag_and_nothing_else(primary: Engine, pair: Pair) -> None:
    """The run role sees one streaming standby through the function, the numbers and no
    more; it still cannot read another session's query text; and `audit verify`'s catalog
    check takes the function for the job's own."""
    s = throttled()
    caught_up(pair)
    with role(primary, pair, s, lag_function=True) as url:
        as_role = create_engine(url)
        with as_role.connect() as conn:
            row = conn.execute(replica_lag.call(AUDIT_SCHEMA)).one()
            assert tuple(row._fields) == replica_lag.COLUMNS
            assert (row.standbys, row.unseen, row.idle_slots) == (1, 0, 0)
            assert row.wal_bytes >= row.replayed_bytes > 0
            texts = conn.execute(
                text("SELECT query FROM pg_stat_activity WHERE usename = 'postgres'")
            ).scalars()
            assert set(texts) <= {"<insufficient privilege>", None}
            positions = conn.execute(text("SELECT replay_lsn FROM pg_stat_replication")).scalars()
            assert set(positions) == {None}  # the view itself shows the role nothing
        as_role.dispose()
        with primary.connect() as conn:
            assert objects.differences(objects.read(conn, AUDIT_SCHEMA)) == []


def test_a_paused_replica_makes_the_run_wait_then_go_on_when_resumed(
    primary: Engine, pair: Pair
) -> None:
    s = throttled(limit=0.3)
    caught_up(pair)
    replay(pair, pause=True)
    resumed = threading.Timer(2.5, replay, args=(pair,), kwargs={"pause": False})
    with role(primary, pair, s, lag_function=True) as url, capture_logs() as logs:
        engine = engines.make_engine(url)
        resumed.start()
        began = time.monotonic()
        outcome = run_job(engine, s, chunk_size=100)
        took = time.monotonic() - began
        engine.dispose()
    resumed.join()
    assert (outcome.status, outcome.rows_cleaned, outcome.remaining_due_rows) == (
        "succeeded",
        ROWS,
        0,
    )
    events = [e["event"] for e in logs]
    assert "replica_lag_wait" in events and "replica_caught_up" in events
    assert outcome.replica_wait_s >= 1.0 and took >= 2.5
    waits = [e for e in logs if e["event"] == "replica_lag_wait"]
    assert all(e["lag_s"] > 0.3 and e["behind_bytes"] > 0 for e in waits)


def test_a_wait_past_max_throttle_wait_ends_the_run_incomplete_with_replica_lag(
    primary: Engine, pair: Pair
) -> None:
    """The replay is paused once the first chunk has committed (before, on a loaded machine,
    the run's own first writes could already be more than the limit behind, and the run then
    rightly cleans nothing): it cleans, then waits, then stops after a committed chunk."""
    s = throttled(limit=0.2, wait=1)
    caught_up(pair)

    def pause_after_the_first(chunk: Chunk) -> None:
        if chunk.seq == 1:
            replay(pair, pause=True)

    with role(primary, pair, s, lag_function=True) as url, capture_logs() as logs:
        engine = engines.make_engine(url)
        outcome = run_job(engine, s, on_chunk=pause_after_the_first, chunk_size=100)
        engine.dispose()
    assert outcome.status == "incomplete"
    assert (outcome.stopped_by, outcome.remaining_reason) == ("replica_lag", "replica_lag")
    assert 0 < outcome.rows_cleaned < ROWS
    assert outcome.remaining_due_rows == ROWS - outcome.rows_cleaned
    ended = [e for e in logs if e["event"] == "replica_lag_wait_ended"]
    assert ended and ended[-1]["outcome"] == "waited_too_long" and ended[-1]["waited_s"] >= 1
    assert_no_half_cleaned_row(snapshot(primary))


def test_sigterm_while_waiting_for_the_replica_stops_cleanly(
    primary: Engine, pair: Pair, tmp_path: Path
) -> None:
    s_text = config_text(
        clean="max_replica_lag_s = 0.2\nmax_throttle_wait_s = 120\npause_between_chunks_ms = 20"
    )
    config_path = write_config(tmp_path / "retention.toml", s_text)
    caught_up(pair)
    replay(pair, pause=True)
    with role(primary, pair, config.parse(s_text), lag_function=True) as url:
        raw = url.set(drivername="postgresql").render_as_string(hide_password=False)
        job = Job(raw, config_path, "run", "--yes", "--chunk-size", "100")
        job.wait_for("replica_lag_wait", timeout=60)
        time.sleep(0.3)
        job.send(signal.SIGTERM)
        code = job.finish(timeout=30)
    assert code == 143, job.stderr
    assert job.last("run_interrupted")["status"] == "interrupted"
    assert_no_half_cleaned_row(snapshot(primary))


def test_a_role_without_the_lag_function_is_warned_once_and_the_run_goes_on(
    primary: Engine, pair: Pair
) -> None:
    s = throttled()
    with role(primary, pair, s, lag_function=False) as url, capture_logs() as logs:
        engine = engines.make_engine(url)
        outcome = run_job(engine, s, chunk_size=500)
        engine.dispose()
    assert (outcome.status, outcome.rows_cleaned) == ("succeeded", ROWS)
    unseen = [e for e in logs if e["event"] == "replica_lag_unseen"]
    assert len(unseen) == 1 and unseen[0]["log_level"] == "warning"
    assert "SQLSTATE 42883" in unseen[0]["reason"] or "SQLSTATE 42501" in unseen[0]["reason"]
    assert outcome.replica_wait_s == 0


def test_db_check_says_whether_the_role_can_see_the_replica_lag(
    primary: Engine, pair: Pair
) -> None:
    s = throttled()
    caught_up(pair)
    for lag_function, level, said in (
        (True, "ok", "1 physical standby(s) seen"),
        (False, "warn", "cannot read the replica lag"),
    ):
        with role(primary, pair, s, lag_function=lag_function) as url:
            engine = engines.make_engine(url)
            with engine.connect() as conn, conn.begin():
                found = [f for f in db_check.check(conn, s) if f.check == "replica lag"]
            engine.dispose()
        assert [f.level for f in found] == [level], found
        assert said in found[0].message
    with primary.connect() as conn, conn.begin():
        assert [f for f in db_check.check(conn, settings()) if f.check == "replica lag"] == []


def test_a_physical_slot_without_its_standby_is_warned_once_and_a_logical_reader_is_no_replica(
    primary: Engine, pair: Pair
) -> None:
    """A physical slot nobody streams from: `db check` and the run warn (its standby's lag
    cannot be seen); a CDC reader (a logical slot's walsender, here `pg_recvlogical` stopped
    with SIGSTOP, so it lags more and more) is not a replica and holds nothing up; the run
    goes on, and its one streaming standby still counts."""
    s = throttled(limit=1.0)
    caught_up(pair)
    with primary.connect() as conn:
        conn.execute(text("SELECT pg_create_physical_replication_slot('dr_idle_test')"))
        conn.execute(text("SELECT pg_create_logical_replication_slot('dr_cdc', 'test_decoding')"))
        conn.commit()
    reader = subprocess.Popen(
        [str(pair.binaries.programs / "pg_recvlogical"), "--dbname",
         pair.primary.set(drivername="postgresql").render_as_string(hide_password=False),
         "--slot", "dr_cdc", "--start", "--file", "/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):  # streaming: its walsender is there
            with primary.connect() as conn:
                if conn.execute(text("SELECT count(*) FROM pg_stat_replication")).scalar() == 2:
                    break
            time.sleep(0.1)
        reader.send_signal(signal.SIGSTOP)  # a stalled CDC reader
        with primary.begin() as conn:  # WAL it will never confirm, then more than the limit
            conn.execute(text("UPDATE dispatches SET updated_at = updated_at WHERE id < 100"))
        time.sleep(1.5)

        with role(primary, pair, s, lag_function=True) as url, capture_logs() as logs:
            engine = engines.make_engine(url)
            with engine.connect() as conn, conn.begin():
                found = [f for f in db_check.check(conn, s) if f.check == "replica lag"]
            outcome = run_job(engine, s, chunk_size=500)
            engine.dispose()
    finally:
        reader.send_signal(signal.SIGCONT)
        reader.terminate()
        reader.wait(10)
        with primary.connect() as conn:
            conn.execute(text("SELECT pg_drop_replication_slot('dr_idle_test')"))
            for _ in range(100):  # the reader's walsender gone, its slot can go
                try:
                    conn.execute(text("SELECT pg_drop_replication_slot('dr_cdc')"))
                    break
                except Exception:
                    conn.rollback()
                    time.sleep(0.1)
            conn.commit()
    assert [f.level for f in found] == ["warn", "ok"], found
    assert "1 physical replication slot(s) with no standby connected" in found[0].message
    assert "1 physical standby(s) seen" in found[1].message
    assert (outcome.status, outcome.rows_cleaned) == ("succeeded", ROWS)
    idle = [e for e in logs if e["event"] == "replica_slot_idle"]
    assert len(idle) == 1 and idle[0]["physical_slots"] == 1
    assert "replica_lag_wait" not in [e["event"] for e in logs]  # the reader held nothing up
