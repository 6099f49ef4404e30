"""The stories a row's events may tell (`history.Histories`), without a database: the ones
the job writes pass, each forgery the owner could cover with fitting events is named. (A
chunk's second event is found by the database: test_chain's rewrite covered by fitting
events.)"""

from __future__ import annotations

from typing import Any

import pytest

from dispatch_retention.history import Histories

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
