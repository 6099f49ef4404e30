"""The order a row's events may come in, as the trail's guards let them be written.

`audit verify` compares each row with its newest event, which alone would let the schema's
owner rewrite a row and then append a fitting event in good form (valid hashes, the kept
head still in the chain). The events of one row must also tell a story the guards allow
(migrations 0003, 0004, 0006): a run starts once, as `running`; what it started with never
changes, nor its plan once written; nothing follows its final status; a chunk is recorded
once, while its run is running; a hold is placed once, unchanged, and released at most once.
An event the upgrade that began the chain wrote (`imported`) may open a row's story in any
state; what follows it is held to the same rules.

`Histories.see()` takes the events in chain order and answers what is wrong with one, if
anything. It keeps a few bytes per run and hold, never a row's texts: a digest of what a run
started with and of its plan, its status; a digest of what a hold was placed with and whether
it was released. A chunk costs nothing here: `audit verify` finds a chunk's second event in
the database (`audit_verify._repeated_chunks`).

A fact's values are what `json` reads (numbers as `Decimal`), or a `Long`: a value too long
to be read here, which the database hashed (`audit_verify`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

#: What a run started with, and its plan (as the guards of 0003 and 0006 keep them: the
#: migrations keep their own copies, held equal to these by tests/unit/test_one_source.py).
STARTED_WITH = (
    "run_id", "started_at", "trigger", "host", "tool_version", "db_user", "target_table",
    "shard", "options", "config_path", "config_sha256", "config_text", "copy_risks",
)  # fmt: skip
PLANNED = ("planned_at", "policies", "due_rows", "held_rows", "waiting_grace_rows")
#: What a hold is placed with (as the guards of 0004 and 0006 keep it; held equal likewise).
PLACED_WITH = ("hold_id", "member_id", "reason", "created_at", "created_by", "requested_by")
#: A run in one of these may still change.
OPEN = ("running", "abandoned")
#: The status a run's event of these kinds leaves it in (`run_finished`: a final one;
#: `run_planned`: the one it had).
KIND_STATUS = {"run_started": "running", "run_abandoned": "abandoned"}
#: The longest status kept or named as it is (the runs table's own bound).
STATUS_CHARS = 32
#: Statuses that claim the work done, which a run marked abandoned never ends in (from
#: migration 0008 the database lets it close only as failed or interrupted).
FALSE_SUCCESS = ("succeeded", "incomplete")
#: Per event kind (encoding version 2, migration 0008): the row's stamp that is the event's
#: `at`, and the row's column that names the role which wrote it (the event's `role`).
STAMPS: dict[str, tuple[str, str | None]] = {
    "run_started": ("started_at", "db_user"),
    "run_finished": ("finished_at", None),
    "run_abandoned": ("finished_at", None),
    "hold_placed": ("created_at", "created_by"),
    "hold_released": ("released_at", None),
}


@dataclass(frozen=True)
class Long:
    """A value of an event's JSON too long to read here: the SHA-256 of its JSON text, as
    the database computed it. Equal to another only where that text is the same."""

    sha256: str


@dataclass(frozen=True, slots=True)
class Digest:
    """A fact's values under some keys, as a digest: the keys it has (a column added later
    is in newer facts only) and a hash of their values."""

    keys: tuple[str, ...]
    value: bytes


def digest(fact: dict[str, Any], keys: tuple[str, ...]) -> Digest:
    """The digest of `fact` on those of `keys` it has."""
    present = tuple(k for k in keys if k in fact)
    h = hashlib.blake2b(digest_size=16)
    for key in present:
        _feed(h, key)
        _feed(h, fact[key])
    return Digest(present, h.digest())


def same(fact: dict[str, Any], kept: Digest) -> bool:
    """Whether `fact` holds the values `kept` was taken of, under its keys."""
    return digest(fact, kept.keys) == kept


def _feed(h: Any, value: Any) -> None:
    """A value in a typed, length-prefixed encoding: two values feed the same bytes only when
    `==` holds between them (numbers by their value, so 1 and 1.0 alike, as JSON has it)."""
    if value is None or isinstance(value, bool):
        h.update({None: b"n", True: b"t", False: b"f"}[value])
    elif isinstance(value, int | float | Decimal):
        number = Decimal(value) if not isinstance(value, Decimal) else value
        _tagged(h, b"d", str(number.normalize()) if number.is_finite() else str(number))
    elif isinstance(value, str):
        _tagged(h, b"s", value)
    elif isinstance(value, Long):
        _tagged(h, b"L", value.sha256)
    elif isinstance(value, list):
        h.update(b"[%d:" % len(value))
        for item in value:
            _feed(h, item)
    elif isinstance(value, dict):
        h.update(b"{%d:" % len(value))
        for key in sorted(value):
            _feed(h, key)
            _feed(h, value[key])
    else:
        _tagged(h, b"?", repr(value))


def _tagged(h: Any, tag: bytes, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    h.update(tag + b"%d:" % len(data))
    h.update(data)


@dataclass(slots=True)
class _Run:
    started: Digest
    status: str
    plan: Digest | None = None


@dataclass
class Histories:
    runs: dict[str, _Run] = field(default_factory=dict)
    #: hold subject -> (what it was placed with, released)
    holds: dict[str, tuple[Digest, bool]] = field(default_factory=dict)

    def see(self, kind: str, subject: str, fact: dict[str, Any], imported: bool) -> str | None:
        """What is wrong with this event, coming after the ones seen; None if nothing."""
        if kind.startswith("run_"):
            return self._run(kind, subject, fact, imported)
        if kind == "chunk_committed":
            return self._chunk(fact, imported)
        return self._hold(kind, subject, fact, imported)

    def _run(self, kind: str, subject: str, fact: dict[str, Any], imported: bool) -> str | None:
        status = _status(fact.get("status"))
        if KIND_STATUS.get(kind, status) != status or (kind == "run_finished" and status in OPEN):
            return f"a {kind} event that leaves the run {status}"
        plan = digest(fact, PLANNED) if fact.get("planned_at") is not None else None
        run = self.runs.get(subject)
        if run is None:
            if kind != "run_started" and not imported:
                return f"the run's first event is {kind}, not its start"
            self.runs[subject] = _Run(digest(fact, STARTED_WITH), status, plan)
            return None
        if kind == "run_started":
            return "a second start of the run"
        if run.status not in OPEN:
            return f"an event after the run ended {run.status}"
        if not same(fact, run.started):
            return "what the run started with changed"
        if run.plan is not None and plan != run.plan:
            return "the run's plan changed"
        if kind == "run_planned" and status != run.status:
            return "a run_planned event that changes the run's status"
        if run.status == "abandoned" and status in FALSE_SUCCESS:
            return f"an abandoned run closed {status}: out of abandoned there is only a failure"
        run.status, run.plan = status, plan or run.plan
        return None

    def _chunk(self, fact: dict[str, Any], imported: bool) -> str | None:
        run = self.runs.get(f"run:{fact.get('run_id')}")
        if not imported and (run is None or run.status != "running"):
            return "the chunk was recorded while its run was not running"
        return None

    def _hold(self, kind: str, subject: str, fact: dict[str, Any], imported: bool) -> str | None:
        placed = digest(fact, PLACED_WITH)
        released = kind == "hold_released"
        if released != (fact.get("released_at") is not None):
            return f"a {kind} event whose hold says otherwise"
        seen = self.holds.get(subject)
        if seen is None:
            if released and not imported:
                return "the hold's first event is its release"
            self.holds[subject] = (placed, released)
            return None
        if seen[1] or not released:
            return "the hold was placed or released twice"
        if not same(fact, seen[0]):
            return "what the hold was placed with changed"
        self.holds[subject] = (seen[0], True)
        return None


def _status(value: Any) -> str:
    """A status as it may be kept and named: one of the runs table's, or cut short."""
    return str(value)[:STATUS_CHARS]


def stamp_problems(kind: str, fact: dict[str, Any], at: datetime | None, role: Any) -> list[str]:
    """What a version 2 event (migration 0008) says that its row does not bear out: the
    row's stamp is the event's time (the guard took it under the chain's lock), the role that
    wrote the row is the one the row names, and a chunk's transaction began before its
    event. Empty if they agree."""
    if not isinstance(role, str) or not role:
        return ["its event names no writing role: the row was written past the trail's triggers"]
    found = []
    if kind == "chunk_committed":
        cleaned = instant(fact.get("cleaned_at"))
        if cleaned is None or at is None or cleaned > at:
            found.append(
                "its cleaned_at is not before its event: the row was written past the guards"
            )
        return found
    stamp, named = STAMPS.get(kind, (None, None))
    if stamp is not None and instant(fact.get(stamp)) != at:
        found.append(f"its {stamp} is not its event's time: the row was written past the guards")
    if named is not None and fact.get(named) != role:
        found.append(
            f"its {named} is not the role that wrote it: the row was written past the guards"
        )
    if kind == "hold_released" and not str(fact.get("released_by", "")).endswith(
        f"(db role {role})"
    ):
        found.append("its released_by does not name the role that released it")
    return found


def instant(value: Any) -> datetime | None:
    """An ISO 8601 time as an event or a row's JSON writes it; None for anything else."""
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
