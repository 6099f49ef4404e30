"""Adaptive chunk size: a pure controller, so it can be tested without a database.

The chunk (an id window) grows or shrinks toward `target_ms` per chunk transaction, from the
moving average of the last few chunk times, between a floor and a ceiling; a statement that
timed out shrinks the window at once to a quarter. Growth per step is at most 2x and
shrinkage at most 2x (except after a timeout), so one odd chunk cannot swing it far.
"""

from __future__ import annotations

from collections.abc import Sequence

WINDOW = 5  # chunks in the moving average


def next_size(
    size: int,
    recent_ms: Sequence[float],
    *,
    target_ms: float,
    floor: int,
    ceiling: int,
    timed_out: bool = False,
) -> int:
    """The next window size in ids. `target_ms <= 0` turns adaptation off."""
    if timed_out:
        return max(floor, size // 4)
    if target_ms <= 0 or not recent_ms:
        return _clamp(size, floor, ceiling)
    window = recent_ms[-WINDOW:]
    average = sum(window) / len(window)
    factor = 2.0 if average <= 0 else min(2.0, max(0.5, target_ms / average))
    return _clamp(round(size * factor), floor, ceiling)


def _clamp(value: int, floor: int, ceiling: int) -> int:
    return max(floor, min(ceiling, value))
