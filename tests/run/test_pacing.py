"""Pacing (`run/pacing.py`): the rest after a chunk, as arithmetic and in a run."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from dispatch_retention import config
from dispatch_retention.errors import ConfigError
from dispatch_retention.run.pacing import rest_ms
from tests.helpers import config_text, run_job, seed_series


@pytest.mark.parametrize(
    ("chunk_ms", "pause_ms", "fraction", "rest"),
    [
        (100, 0, 1.0, 0),  # both off
        (100, 40, 1.0, 40),  # the fixed pause alone
        (100, 0, 0.5, 100),  # busy half the time: rest as long as the chunk took
        (100, 0, 0.25, 300),  # a quarter: three times as long
        (100, 500, 0.5, 500),  # the longer of the two
        (300, 100, 0.5, 300),  # a slower chunk earns a longer rest
        (-5, 0, 0.5, 0),  # a clock that went back is no chunk
    ],
)
def test_the_rest_is_the_longer_of_the_pause_and_the_duty_cycle(
    chunk_ms: float, pause_ms: float, fraction: float, rest: float
) -> None:
    assert rest_ms(chunk_ms, pause_ms=pause_ms, busy_fraction=fraction) == pytest.approx(rest)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_a_busy_fraction_outside_0_to_1_is_no_duty_cycle(fraction: float) -> None:
    with pytest.raises(ValueError, match="busy_fraction"):
        rest_ms(100, pause_ms=0, busy_fraction=fraction)


@pytest.mark.parametrize("value", ["0", "0.001", "1.01", "-1", '"half"'])
def test_the_config_refuses_a_busy_fraction_it_cannot_keep(value: str) -> None:
    with pytest.raises(ConfigError, match="max_busy_fraction"):
        config.parse(config_text(clean=f"max_busy_fraction = {value}"))


def test_a_run_at_half_duty_rests_as_long_as_each_chunk_took(engine: Engine) -> None:
    """`max_busy_fraction = 0.5`: each chunk's event says it rests as long as it took, the
    run rests between chunks (not after the last), and cleans what it would without it."""
    seed_series(engine, range(1, 601))
    s = config.parse(config_text(clean="max_busy_fraction = 0.5"))
    began = time.monotonic()
    with capture_logs() as logs:
        outcome = run_job(engine, s, chunk_size=100)
    took = time.monotonic() - began
    assert (outcome.status, outcome.rows_cleaned) == ("succeeded", 600)
    chunks = [e for e in logs if e["event"] == "chunk_committed"]
    assert len(chunks) >= 6
    for e in chunks:
        assert e["rest_ms"] == pytest.approx(e["ms"], abs=0.11)  # both rounded to 0.1 ms
    # the rests between chunks are slept (a lower bound only: the chunks take time too)
    assert took >= sum(e["rest_ms"] for e in chunks[:-1]) / 1000
