"""Adaptive chunk size: a pure controller, so it can be tested without a database.

The size is in due rows per chunk. From the last few chunks it estimates the time one row
takes (their total milliseconds over their total rows, so chunks of different sizes weigh
right) and aims the next chunk at `target_ms`, moving at most 2x up or down per step so one
odd chunk cannot swing it far. It shrinks only when chunks take longer than the target (not
when sparse windows just hold few rows). A chunk that took more than `SLOW` times the target
is answered at once, from its own pace: the server has slowed down (a checkpoint has begun
and every page first written after it is logged whole, or the application is busy), and the
few chunks before it would otherwise keep the next ones too large for as long as they stay
in the estimate. A statement timeout cuts it to a quarter at once. The result stays between
a floor and a ceiling.
"""

from __future__ import annotations

from collections.abc import Sequence

WINDOW = 5  # chunks in the moving estimate
SLOW = 1.5  # a chunk over this many times the target sizes the next one by itself


def next_size(
    size: int,
    recent: Sequence[tuple[int, float]],
    *,
    target_ms: float,
    floor: int,
    ceiling: int,
    timed_out: bool = False,
) -> int:
    """The next chunk size in rows, from `(rows, ms)` of recent chunks; `target_ms <= 0`
    turns adaptation off."""
    if timed_out:
        return max(floor, size // 4)
    window = recent[-WINDOW:]
    rows = sum(r for r, _ in window)
    elapsed = sum(ms for _, ms in window)
    if target_ms <= 0 or rows <= 0:
        return _clamp(size, floor, ceiling)
    ideal = size * 2 if elapsed <= 0 else target_ms * rows / elapsed
    if elapsed / len(window) <= target_ms:
        # Chunks within the target never shrink the size: few due rows in a window (sparse
        # data) make the time per row look high only through the fixed cost per chunk.
        ideal = max(ideal, size)
    last_rows, last_ms = window[-1]
    if last_ms > SLOW * target_ms and last_rows > 0:
        ideal = min(ideal, target_ms * last_rows / last_ms)
    return _clamp(round(min(size * 2, max(size / 2, ideal))), floor, ceiling)


def _clamp(value: int, floor: int, ceiling: int) -> int:
    return max(floor, min(ceiling, value))
