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
anything. It keeps a little per row: a run's start, plan and status, the chunks seen, a
hold's placing and whether it was released.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: What a run started with, and its plan (as the guards of 0003 and 0006 keep them).
STARTED_WITH = (
    "run_id", "started_at", "trigger", "host", "tool_version", "db_user", "target_table",
    "shard", "options", "config_path", "config_sha256", "config_text", "copy_risks",
)  # fmt: skip
PLANNED = ("planned_at", "policies", "due_rows", "held_rows", "waiting_grace_rows")
#: What a hold is placed with (as the guard of 0004 keeps it).
PLACED_WITH = ("hold_id", "member_id", "reason", "created_at", "created_by", "requested_by")
#: A run in one of these may still change.
OPEN = ("running", "abandoned")
#: The status a run's event of these kinds leaves it in (`run_finished`: a final one;
#: `run_planned`: the one it had).
KIND_STATUS = {"run_started": "running", "run_abandoned": "abandoned"}


def _subset(fact: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: fact[k] for k in keys if k in fact}


@dataclass
class _Run:
    started: dict[str, Any]
    status: str
    plan: dict[str, Any] | None = None


@dataclass
class Histories:
    runs: dict[str, _Run] = field(default_factory=dict)
    chunks: set[str] = field(default_factory=set)
    #: hold subject -> (what it was placed with, released)
    holds: dict[str, tuple[dict[str, Any], bool]] = field(default_factory=dict)

    def see(self, kind: str, subject: str, fact: dict[str, Any], imported: bool) -> str | None:
        """What is wrong with this event, coming after the ones seen; None if nothing."""
        if kind.startswith("run_"):
            return self._run(kind, subject, fact, imported)
        if kind == "chunk_committed":
            return self._chunk(subject, fact, imported)
        return self._hold(kind, subject, fact, imported)

    def _run(self, kind: str, subject: str, fact: dict[str, Any], imported: bool) -> str | None:
        status = str(fact.get("status"))
        if KIND_STATUS.get(kind, status) != status or (kind == "run_finished" and status in OPEN):
            return f"a {kind} event that leaves the run {status}"
        plan = _subset(fact, PLANNED) if fact.get("planned_at") is not None else None
        run = self.runs.get(subject)
        if run is None:
            if kind != "run_started" and not imported:
                return f"the run's first event is {kind}, not its start"
            self.runs[subject] = _Run(_subset(fact, STARTED_WITH), status, plan)
            return None
        if kind == "run_started":
            return "a second start of the run"
        if run.status not in OPEN:
            return f"an event after the run ended {run.status}"
        if _subset(fact, tuple(run.started)) != run.started:
            return "what the run started with changed"
        if run.plan is not None and plan != run.plan:
            return "the run's plan changed"
        if kind == "run_planned" and status != run.status:
            return "a run_planned event that changes the run's status"
        run.status, run.plan = status, plan or run.plan
        return None

    def _chunk(self, subject: str, fact: dict[str, Any], imported: bool) -> str | None:
        if subject in self.chunks:
            return "a second event for the chunk"
        self.chunks.add(subject)
        run = self.runs.get(f"run:{fact.get('run_id')}")
        if not imported and (run is None or run.status != "running"):
            return "the chunk was recorded while its run was not running"
        return None

    def _hold(self, kind: str, subject: str, fact: dict[str, Any], imported: bool) -> str | None:
        placed = _subset(fact, PLACED_WITH)
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
        if _subset(placed, tuple(seen[0])) != seen[0]:
            return "what the hold was placed with changed"
        self.holds[subject] = (seen[0], True)
        return None
