"""Pacing: how long the job rests after a chunk, a pure function so it can be tested without
a database.

Two settings ask for rest. `clean.pause_between_chunks_ms` is a fixed pause. A duty cycle,
`clean.max_busy_fraction` = f (1: off), keeps the job busy at most that fraction of its time
between chunks: after a chunk of t ms it rests t * (1 - f) / f ms, so a slower chunk (a busy
server) earns a longer rest and the job's share of the server stays about f whatever the
chunk size. The longer of the two applies. The adaptive chunk size keeps its own target:
the rest is not counted in a chunk's time.
"""

from __future__ import annotations


def rest_ms(chunk_ms: float, *, pause_ms: float, busy_fraction: float) -> float:
    """Milliseconds to rest after a chunk of `chunk_ms`: the fixed pause, or the duty cycle's
    rest, whichever is longer (0 when neither asks for any)."""
    if not 0 < busy_fraction <= 1:
        raise ValueError("busy_fraction must be in (0, 1]")
    duty = max(chunk_ms, 0.0) * (1 - busy_fraction) / busy_fraction
    return max(float(pause_ms), duty)
