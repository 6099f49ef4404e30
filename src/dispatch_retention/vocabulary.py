"""The run's vocabulary: what every layer says about a run, in a module that imports nothing
of the project's (so no module imports the chunk loop, the audit trail or the CLI to get a
type).

- `Status`: how a run ends (the audit trail's statuses, plus `planned` for a dry run and
  `locked` when another run holds the target), and `exit_code()`: the one place an outcome
  becomes an exit code (`Exit`).
- `Request` (`Options`, `--force`, shard, Pushgateway) and `Hooks`: what a run is asked to do
  and who hears of it; `Chunk`, `Outcome`: what each chunk did, how the run ended.
- `Stop`, `Interrupted`: stop signals, honoured between chunks or at once while reading.
- `Recorder`, `Recount`: what the chunk loop needs from the audit trail and the planner.

The migration's CHECK constraint on `runs.status` keeps its own literals (a migration is
history); a test holds `Status.recorded()` equal to it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: this module imports nothing of ours at run time
    from sqlalchemy import Connection

    from dispatch_retention.catalog.risks import Risk
    from dispatch_retention.rule.plans import Plan
    from dispatch_retention.rule.shard import Shard


class Status(StrEnum):
    """How a run stands or ended. Stored as its value (`Status.SUCCEEDED.value`)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    INCOMPLETE = "incomplete"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    REFUSED = "refused"
    ABANDONED = "abandoned"
    CANCELLED = "cancelled"
    #: a dry run: planned, nothing written, no record
    PLANNED = "planned"
    #: another run holds the target's lock: nothing written, no record
    LOCKED = "locked"

    @classmethod
    def recorded(cls) -> tuple[Status, ...]:
        """The statuses a run record can hold (the CHECK constraint on `runs.status`)."""
        return tuple(s for s in cls if s not in (cls.PLANNED, cls.LOCKED))

    @classmethod
    def final(cls) -> tuple[Status, ...]:
        """The statuses a closed run record can hold."""
        return tuple(s for s in cls.recorded() if s is not cls.RUNNING)


class Exit(IntEnum):
    """The exit codes of README "Command line" (a signal exits 128 + its number)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    LOCKED = 3
    REFUSED = 4
    VIOLATIONS = 5
    TAMPERED = 6


def exit_code(outcome: Outcome) -> int:
    """The exit code of a run's outcome: 0 when it did its work or stopped cleanly on a
    budget, 128 + N when a signal N stopped it, else what its status says."""
    if outcome.status is Status.INTERRUPTED and outcome.signum:
        return 128 + outcome.signum
    if outcome.status in (Status.SUCCEEDED, Status.INCOMPLETE, Status.PLANNED, Status.CANCELLED):
        return Exit.OK
    if outcome.status is Status.REFUSED:
        return Exit.REFUSED
    if outcome.status is Status.LOCKED:
        return Exit.LOCKED
    return Exit.FAILED


@dataclass(frozen=True)
class Chunk:
    seq: int
    first_id: int
    last_id: int
    rows: int
    by_policy: dict[str, int]
    cleaned_at: datetime | None
    elapsed_ms: float
    skipped_locked: bool
    #: of `elapsed_ms`, the sweep's (the window's recount after the UPDATE)
    sweep_ms: float = 0.0
    #: found through the policies' arms (a sparse window) rather than by reading its ids
    indexed: bool = False
    #: an empty window: the id the next window starts at (the block's next due row, or
    #: the block's end), so that small windows do not walk a block row by row
    resume_at: int | None = None
    #: due rows the sweep locked that its UPDATE did not clean (a trigger or rule skipped
    #: them): the run fails
    missed: int = 0
    #: "clean", or "reclean" for written-back rows stripped again (`run/reclean.py`)
    kind: str = "clean"
    #: rows the chunk cleaned that held personal data again before it committed (a trigger
    #: wrote it back): the chunk rolled back and the run fails
    written_back: int = 0
    #: the ids its statements cleaned (RETURNING), kept only where the run checks for
    #: write-back: the check after COMMIT reads them again
    ids: tuple[int, ...] = ()

    def logged(self) -> dict[str, Any]:
        """What the `chunk_committed` log line says of every chunk."""
        return {
            "seq": self.seq,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "rows": self.rows,
            "by_policy": self.by_policy,
        }


@dataclass
class Outcome:
    """How a run ended (`status`), what it cleaned, and what it found left."""

    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)  # --max-runtime counts from here
    status: Status = Status.RUNNING
    plan: Plan | None = None
    rows_cleaned: int = 0
    #: written-back rows stripped again by `run --reclean` (not in rows_cleaned)
    rows_recleaned: int = 0
    by_policy: Counter[str] = field(default_factory=Counter)
    chunks: int = 0
    signum: int | None = None
    error: str | None = None
    stopped_by: str | None = None
    #: due rows left at the end, counted at the run's own cutoffs (None: not counted)
    remaining_due_rows: int | None = None
    #: why rows are left: comma-separated `Remaining` values
    remaining_reason: str | None = None
    #: what the sweeps found left alone by a trigger or rule (the run then fails)
    missed_rows: int = 0
    #: rows a chunk cleaned that held personal data again, before or after its COMMIT, or
    #: rows of the run found so at its end (the run then fails)
    written_back_rows: int = 0
    #: where the cleaning UPDATE may copy personal data (`risks.copy_risks`), as logged
    copy_risks: list[Risk] = field(default_factory=list)
    #: the copy risks read again at the run's end (None: the run did not get that far); the
    #: record keeps them (`runs.copy_risks_at_end`), so one that appeared during the run shows
    copy_risks_at_end: list[Risk] | None = None
    #: the audit trail's hash chain head after the run closed its record (`run_record.head`)
    chain_head: str | None = None
    #: seconds the run waited for replicas to catch up (`clean.max_replica_lag_s`)
    replica_wait_s: float = 0.0


class Remaining(StrEnum):
    """Why a run can end `incomplete`: due rows left (a budget, a replica that stayed too far
    behind, rows the application holds locked, rows that became due during the run after the
    walk had passed them), or a copy risk that appeared during the run, which its record's
    `copy_risks` do not list.
    `Outcome.remaining_reason` joins them with commas; `stopped_by` is a budget's."""

    MAX_ROWS = "max_rows"
    MAX_ROWS_PER_RUN = "max_rows_per_run"
    MAX_RUNTIME = "max_runtime"
    REPLICA_LAG = "replica_lag"
    LOCKED_BY_APPLICATION = "locked_by_application"
    BECAME_DUE_DURING_RUN = "became_due_during_run"
    COPY_RISKS_APPEARED = "copy_risks_appeared"


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    #: after the walk, strip written-back rows again (`run/reclean.py`)
    reclean: bool = False
    chunk_size: int | None = None
    max_rows: int | None = None
    max_runtime_s: float | None = None

    def deadline(self, started: float) -> float | None:
        """When `--max-runtime` is spent (on `time.monotonic()`'s clock), if it is set:
        chunks stop starting, and retries stop waiting."""
        return None if self.max_runtime_s is None else started + self.max_runtime_s


@dataclass(frozen=True)
class Request:
    """What one run is asked to do: its options, whether a tripped guard may be overridden
    (`--force`), its shard, and where to push its figures (None: nowhere)."""

    options: Options = field(default_factory=Options)
    force: bool = False
    shard: Shard | None = None
    pushgateway: str | None = None


@dataclass(frozen=True)
class Hooks:
    """What the caller of a run wants to hear of it (all optional): `confirm` asks before
    cleaning (a terminal), `on_plan` and `on_chunk` follow it (a progress bar), and
    `fail_in_chunk` raises inside chunk N before its COMMIT (tests)."""

    confirm: Callable[[Plan], bool] | None = None
    on_plan: Callable[[Plan], None] | None = None
    on_chunk: Callable[[Chunk], None] | None = None
    fail_in_chunk: Callable[[int], None] | None = None


class Recount(Protocol):
    """Counts what is due at the run's own cutoffs now (a read-only plan with its rules)."""

    def __call__(self) -> Plan: ...


class Recorder(Protocol):
    """Writes a chunk's audit record inside the chunk's own transaction."""

    def record_chunk(self, conn: Connection, chunk: Chunk) -> None: ...

    def chunk_committed(self, seq: int) -> bool: ...


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived while the job was waiting on the server (no write in flight).

    Subclassing KeyboardInterrupt makes psycopg cancel the query on the server."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Stop:
    """Set by a signal handler; honoured between chunks, or at once while only reading."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._interruptible = False

    def request(self, signum: int) -> None:
        self.signum = signum
        if self._interruptible:
            self._interruptible = False
            raise Interrupted(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def sleep(self, seconds: float) -> None:
        """Sleep, but end it at once with `Interrupted` when a stop signal arrives."""
        deadline = time.monotonic() + seconds
        while self.signum is None and time.monotonic() < deadline:
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """While inside, a signal raises `Interrupted` at once (for read-only work)."""
        if self.signum is not None:
            raise Interrupted(self.signum)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False
