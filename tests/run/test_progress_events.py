"""`chunk_committed` says how far a long run has got (`kubectl logs -f`): the rows cleaned so
far, the rows it means to clean (the plan's, or a smaller row budget) and the time left."""

from __future__ import annotations

from sqlalchemy import Engine
from structlog.testing import capture_logs

from tests.helpers import run_job, seed_series, settings


def test_each_chunk_says_the_running_total_the_planned_total_and_the_time_left(
    engine: Engine,
) -> None:
    seed_series(engine, range(1, 301))
    with capture_logs() as logs:
        outcome = run_job(engine, settings(), chunk_size=50)
    chunks = [e for e in logs if e["event"] == "chunk_committed"]
    assert outcome.rows_cleaned == 300 and len(chunks) >= 6
    so_far = [e["cleaned_so_far"] for e in chunks]
    assert so_far == sorted(so_far) and so_far[-1] == 300
    assert so_far == [sum(e["rows"] for e in chunks[: i + 1]) for i in range(len(chunks))]
    assert {e["planned"] for e in chunks} == {300}
    etas = [e["eta_s"] for e in chunks]
    assert all(eta >= 0 for eta in etas) and etas[-1] == 0


def test_under_a_row_budget_the_planned_total_is_the_budget(engine: Engine) -> None:
    seed_series(engine, range(1, 301))
    with capture_logs() as logs:
        outcome = run_job(engine, settings(), chunk_size=50, max_rows=120)
    chunks = [e for e in logs if e["event"] == "chunk_committed"]
    assert outcome.rows_cleaned == 120
    assert {e["planned"] for e in chunks} == {120} and chunks[-1]["cleaned_so_far"] == 120
    assert chunks[-1]["eta_s"] == 0
