"""The end count's follower: beside a large walk, it runs the end count's own statement now
and then on a connection of its own, so that the end count does not pay for the run's old
index entries.

Every row a run cleans leaves the entry of its old version in the arms' partial indexes until
VACUUM, and an index-only scan must fetch that dead tuple from the heap to learn it is dead.
The first scan that does marks the entry dead (the index's "killed" hint) and every later
scan skips it. Without the follower the end count is that first scan, over every row the run
cleaned, in pages long gone from memory (docs/performance.md "The end count, taken apart").
The follower reads what the walk committed since its last pass, while the walk goes on.

It runs the very statement of the end count (`count`, the run's plan at its own cutoffs), so
that the planner reads the same indexes: a narrower statement may read another index and
mark nothing the end count reads. It decides nothing: its counts are thrown away, it only
reads (the plan's READ ONLY transaction and timeouts), and the end count is the same count
with or without it. An error stops it (logged, never raised): the end count does the rest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from dispatch_retention.pg import diagnosis
from dispatch_retention.rule.plans import Plan

#: The planned due rows from which a run has a follower: below it, the end count's extra
#: heap fetches take a few milliseconds, less than the follower's own connection.
FOLLOW_FROM_ROWS = 20_000
#: At most one pass per this many seconds (each pass reads every arm's index entries, cheap
#: once they are marked, but not free).
PASS_EVERY_S = 1.0


def worth_it(plan: Plan) -> bool:
    """Whether a run of this plan has a follower: its arms have their indexes (the end count
    reads them index-only) and it cleans enough rows for their old entries to cost."""
    return plan.through_indexes and plan.due_rows >= FOLLOW_FROM_ROWS


class Follower:
    """A thread that runs `count` on a connection of its own after chunks commit."""

    def __init__(self, engine: Engine, count: Callable[[Connection], object], log: Any) -> None:
        self.engine, self.count, self.log = engine, count, log
        self.passes = 0
        self.ms = 0.0
        self.stopped = threading.Event()
        self.behind = threading.Event()  # a chunk committed since the last pass began
        self.thread = threading.Thread(target=self._follow, name="end-count-follower")
        self.thread.daemon = True  # never keeps the process alive: it only reads

    def start(self) -> None:
        self.thread.start()

    def committed(self) -> None:
        """A chunk committed: there is something for the next pass to read."""
        self.behind.set()

    def stop(self) -> None:
        """No pass after this one; wait for the pass in progress (its reads are the end
        count's own, done once), and say what the follower did."""
        self.stopped.set()
        self.behind.set()
        self.thread.join()
        self.log.info("end_count_follower", passes=self.passes, ms=round(self.ms, 1))

    def _follow(self) -> None:
        while True:
            self.behind.wait()
            if self.stopped.is_set():
                return
            self.behind.clear()
            began = time.monotonic()
            try:
                with self.engine.connect() as conn, conn.begin():
                    self.count(conn)
            except DBAPIError as exc:
                self.log.info("end_count_follower_stopped", error=diagnosis.describe_error(exc))
                return
            self.passes += 1
            self.ms += (time.monotonic() - began) * 1000
            self.stopped.wait(max(0.0, PASS_EVERY_S - (time.monotonic() - began)))
            if self.stopped.is_set():
                return
