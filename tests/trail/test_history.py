"""The stories a row's events may tell (`history.Histories`), without a database: the ones
the job writes pass, each forgery the owner could cover with fitting events is named. (A
chunk's second event is found by the database: test_audit_verify's rewrite covered by fitting
events.)"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from dispatch_retention.trail.history import Histories, Long, digest

RUN = "run:r1"


def run(status: str, **extra: Any) -> dict[str, Any]:
    return {"run_id": "r1", "status": status, "started_at": "t0", "config_text": "c", **extra}


PLAN = {"planned_at": "t1", "due_rows": 5, "policies": [], "held_rows": 0}
HONEST = [
    [("run_started", RUN, run("running"), False),
     ("run_planned", RUN, run("running", **PLAN), False),
     ("chunk_committed", "chunk:r1/1", {"run_id": "r1", "seq": 1}, False),
     ("run_abandoned", RUN, run("abandoned", **PLAN), False),  # another run found it dead
     ("run_finished", RUN, run("failed", **PLAN), False)],  # it was alive after all
    [("run_finished", RUN, run("succeeded", **PLAN), True),  # the upgrade's
     ("chunk_committed", "chunk:r1/1", {"run_id": "r1"}, True),
     ("hold_released", "hold:1", {"hold_id": 1, "released_at": "t"}, True)],
    [("hold_placed", "hold:1", {"hold_id": 1, "reason": "x", "released_at": None}, False),
     ("hold_released", "hold:1", {"hold_id": 1, "reason": "x", "released_at": "t"}, False)],
]  # fmt: skip
FORGED = {
    "a second start": [
        ("run_started", RUN, run("running"), False),
        ("run_started", RUN, run("running"), False),
    ],
    "an event after the run ended": [
        ("run_started", RUN, run("running"), False),
        ("run_finished", RUN, run("succeeded"), False),
        ("run_finished", RUN, run("failed"), False),
    ],
    "what the run started with changed": [
        ("run_started", RUN, run("running"), False),
        ("run_planned", RUN, run("running", config_text="forged"), False),
    ],
    "the run's plan changed": [
        ("run_started", RUN, run("running"), False),
        ("run_planned", RUN, run("running", **PLAN), False),
        ("run_finished", RUN, run("succeeded", **{**PLAN, "due_rows": 9}), False),
    ],
    "the run's first event is run_finished": [
        ("run_finished", RUN, run("succeeded"), False),
    ],
    "a run_finished event that leaves the run running": [
        ("run_started", RUN, run("running"), False),
        ("run_finished", RUN, run("running"), False),
    ],
    "a run_planned event that changes the run's status": [
        ("run_started", RUN, run("running"), False),
        ("run_planned", RUN, run("abandoned"), False),
    ],
    "recorded while its run was not running": [
        ("run_started", RUN, run("running"), False),
        ("run_finished", RUN, run("succeeded"), False),
        ("chunk_committed", "chunk:r1/9", {"run_id": "r1"}, False),
    ],
    "placed or released twice": [
        ("hold_placed", "hold:1", {"hold_id": 1, "released_at": None}, False),
        ("hold_released", "hold:1", {"hold_id": 1, "released_at": "t"}, False),
        ("hold_released", "hold:1", {"hold_id": 1, "released_at": "t2"}, False),
    ],
    "what the hold was placed with changed": [
        ("hold_placed", "hold:1", {"hold_id": 1, "reason": "x", "released_at": None}, False),
        ("hold_released", "hold:1", {"hold_id": 1, "reason": "y", "released_at": "t"}, False),
    ],
}


@pytest.mark.parametrize("story", HONEST, ids=["a run", "imported", "a hold"])
def test_the_stories_the_job_writes_pass(
    story: list[tuple[str, str, dict[str, Any], bool]],
) -> None:
    histories = Histories()
    assert [histories.see(*event) for event in story] == [None] * len(story)


@pytest.mark.parametrize("problem", list(FORGED))
def test_each_forged_story_is_named_at_its_first_bad_event(problem: str) -> None:
    histories = Histories()
    found = [histories.see(*event) for event in FORGED[problem]]
    assert found[:-1] == [None] * (len(found) - 1)
    assert found[-1] is not None and problem in found[-1]


# --- what a row's story keeps: digests, never its texts --------------------------------------


def test_a_story_keeps_digests_not_texts() -> None:
    """A run's start and a hold's placing are kept as digests: a long text is not held, and
    the stories still compare as the values do (numbers by value, records in any order, a
    long value by the hash the database gave it)."""
    histories = Histories()
    long = "x" * 100_000
    assert histories.see("run_started", RUN, run("running", config_text=long), False) is None
    assert (
        histories.see("hold_placed", "hold:1", {"reason": long, "released_at": None}, False) is None
    )
    kept = [histories.runs[RUN].started, histories.holds["hold:1"][0]]
    assert all(len(repr(k)) < 1000 for k in kept)
    reordered = {"released_at": "t", "reason": long}
    assert histories.see("hold_released", "hold:1", reordered, False) is None
    changed = run("succeeded", config_text=long[:-1] + "y")
    assert histories.see("run_finished", RUN, changed, False) == "what the run started with changed"


@pytest.mark.parametrize(
    ("first", "then", "same"),
    [
        pytest.param(1, Decimal("1.0"), True, id="one-and-one-point-zero"),
        pytest.param({"a": 1, "b": [2]}, {"b": [2], "a": 1}, True, id="record-order"),
        pytest.param(Long("ab"), Long("ab"), True, id="long-same-hash"),
        pytest.param(Long("ab"), Long("cd"), False, id="long-other-hash"),
        pytest.param("1", 1, False, id="text-is-no-number"),
        pytest.param(True, 1, False, id="true-is-no-number"),
        pytest.param([1, 2], [2, 1], False, id="list-order"),
        pytest.param(None, "", False, id="null-is-no-text"),
    ],
)
def test_digests_compare_as_the_values_do(first: Any, then: Any, same: bool) -> None:
    assert (digest({"v": first}, ("v",)) == digest({"v": then}, ("v",))) is same
