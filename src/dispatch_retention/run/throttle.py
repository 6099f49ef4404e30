"""The replica lag throttle: before each chunk, wait while a physical standby replays too far
behind (`clean.max_replica_lag_s`, 0: off), at most `clean.max_throttle_wait_s` at a time.

The lag is read through the function `db grants --purpose run` prints
(`trail/replica_lag.py`). PostgreSQL's own `replay_lag` goes stale when a standby is idle or
its replay is paused (it keeps the delay of the last WAL it did replay), so the delay is
measured here as well: each read notes the primary's WAL position and the time
(`LagClock`); while the standbys' replay position is behind, the lag is at least the time
since the first noted position they have not replayed. A standby the function cannot see
(no function, no EXECUTE, or an owner without the right to read the positions) is never
taken for one that keeps up: the throttle warns once (`replica_lag_unseen`) and the run goes
on unthrottled, as `db check` says beforehand. A physical slot with no standby connected
gets one warning (`replica_slot_idle`): its standby's lag cannot be seen.

Waiting is interruptible (a stop signal ends it, and the run stops as it does between
chunks) and never outlasts `--max-runtime`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from enum import Enum

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from dispatch_retention.config import Settings
from dispatch_retention.pg import diagnosis, retry
from dispatch_retention.trail import replica_lag
from dispatch_retention.vocabulary import Interrupted, Stop

log = structlog.get_logger("dispatch_retention")

#: How often a wait reads the lag again (seconds).
POLL_S = 0.1
#: The WAL positions a `LagClock` remembers at most (one per read: a wait of hours at
#: POLL_S, with room to spare; the oldest go first).
MAX_MARKS = 100_000


@dataclass(frozen=True)
class Lag:
    """One read of the replica lag function (`replica_lag.COLUMNS`)."""

    standbys: int
    unseen: int
    wal_bytes: int
    replayed_bytes: int | None
    replay_lag_s: float | None
    idle_slots: int

    @property
    def behind_bytes(self) -> int:
        if self.replayed_bytes is None:
            return 0
        return max(0, self.wal_bytes - self.replayed_bytes)


class LagClock:
    """The replay delay measured from the primary's side: when each WAL position was seen."""

    def __init__(self) -> None:
        self.marks: deque[tuple[int, float]] = deque(maxlen=MAX_MARKS)  # (position, seen at)

    def lag_s(self, lag: Lag, now: float) -> float:
        """Note `lag.wal_bytes` at `now`; the delay of the slowest standby: 0 when it has
        replayed everything, else at least the time since the first noted position it has not
        replayed, and at least what PostgreSQL reports."""
        if not self.marks or self.marks[-1][0] < lag.wal_bytes:
            self.marks.append((lag.wal_bytes, now))
        replayed = lag.replayed_bytes if lag.standbys else None
        while len(self.marks) > 1 and (replayed is None or self.marks[0][0] <= replayed):
            self.marks.popleft()  # replayed (or nobody replays): not waited for
        if replayed is None or lag.behind_bytes == 0:
            return 0.0
        first_unreplayed = self.marks[0][1]
        return max(now - first_unreplayed, lag.replay_lag_s or 0.0)


class Verdict(Enum):
    GO = "go"  # the standbys keep up (or cannot be seen: warned once)
    STOPPED = "stopped"  # a stop signal or `--max-runtime` ended the wait
    WAITED_TOO_LONG = "waited_too_long"  # past `clean.max_throttle_wait_s`


class Throttle:
    """Reads the standbys' lag before a chunk and waits while it is above the limit."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        stop: Stop,
        log: structlog.typing.FilteringBoundLogger = log,
    ) -> None:
        self.engine, self.stop, self.log = engine, stop, log
        self.limit_s = settings.clean.max_replica_lag_s
        self.max_wait_s = settings.clean.max_throttle_wait_s
        self.call = replica_lag.call(settings.audit.schema_)
        self.clock = LagClock()
        self.blind = False  # the lag cannot be read: warned once, no more reads
        self.warned_unseen = self.warned_idle = False
        self.waited_s = 0.0  # over the run

    def read(self) -> Lag | None:
        """One read of the lag; None when it cannot be read (warned once)."""
        if self.blind:
            return None
        try:
            with self.engine.connect() as conn:
                row = conn.execute(self.call).one()
        except DBAPIError as exc:
            if retry.retryable(exc):  # a lost connection, say: this read only
                self.log.warning("replica_lag_unread", reason=retry.reason(exc))
                return None
            self.blind = True
            self.log.warning(
                "replica_lag_unseen",
                reason=diagnosis.describe_error(exc),
                fix="run the replica lag part of `db grants --purpose run`; `db check` says more",
            )
            return None
        lag = Lag(
            standbys=int(row.standbys),
            unseen=int(row.unseen),
            wal_bytes=int(row.wal_bytes),
            replayed_bytes=None if row.replayed_bytes is None else int(row.replayed_bytes),
            replay_lag_s=None if row.replay_lag_s is None else float(row.replay_lag_s),
            idle_slots=int(row.idle_slots),
        )
        if lag.unseen and not self.warned_unseen:
            self.warned_unseen = True
            self.log.warning(
                "replica_lag_unseen",
                standbys_unseen=lag.unseen,
                reason="the lag function's owner cannot read pg_stat_replication",
                fix="make the function as a superuser or a member of pg_read_all_stats",
            )
        if lag.idle_slots and not self.warned_idle:
            self.warned_idle = True
            self.log.warning("replica_slot_idle", physical_slots=lag.idle_slots)
        return lag

    def lag_s(self) -> tuple[float, Lag] | None:
        lag = self.read()
        return None if lag is None else (self.clock.lag_s(lag, time.monotonic()), lag)

    def wait(self, deadline: float | None) -> Verdict:
        """Before a chunk: GO at once while the lag is within the limit; else wait, reading
        it again every POLL_S, until it is (GO), a stop or `deadline` (`time.monotonic()`:
        STOPPED), or `max_throttle_wait_s` has passed (WAITED_TOO_LONG)."""
        seen = self.lag_s()
        if seen is None or seen[0] <= self.limit_s:
            return Verdict.GO
        started = time.monotonic()
        self.log.info(
            "replica_lag_wait",
            lag_s=round(seen[0], 3),
            behind_bytes=seen[1].behind_bytes,
            limit_s=self.limit_s,
        )
        verdict = self._waited(started, deadline)
        waited = time.monotonic() - started
        self.waited_s += waited
        event = "replica_caught_up" if verdict is Verdict.GO else "replica_lag_wait_ended"
        self.log.info(event, waited_s=round(waited, 3), outcome=verdict.value)
        return verdict

    def _waited(self, started: float, deadline: float | None) -> Verdict:
        while True:
            now = time.monotonic()
            if now - started >= self.max_wait_s:
                return Verdict.WAITED_TOO_LONG
            if deadline is not None and now >= deadline:
                return Verdict.STOPPED
            nap = min(POLL_S, self.max_wait_s - (now - started))
            if deadline is not None:
                nap = min(nap, deadline - now)
            try:
                self.stop.sleep(max(nap, 0.0))
            except Interrupted:
                return Verdict.STOPPED
            seen = self.lag_s()
            if seen is None or seen[0] <= self.limit_s:
                return Verdict.GO
