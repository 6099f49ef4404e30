"""Sharded runs: `--shard I/N` splits the id space into stripes that never overlap.

Ids are cut into stripes of `STRIPE_IDS` consecutive ids; stripe k belongs to shard k mod N.
Every shard therefore works on contiguous id ranges (the fast range UPDATE still applies),
spreads over the whole table (a backlog at the old end is shared by all shards), and no two
shards of the same N can ever touch the same row. All shards of one run must use the same N
(a Kubernetes Indexed Job guarantees it). Defaults come from the Indexed Job's
`JOB_COMPLETION_INDEX` and `JOB_COMPLETIONS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Table, case

STRIPE_IDS = 100_000
#: `I/N` in ASCII digits: `\d` would take any script's digits, and `int()` reads them
SHARD = re.compile(r"[ \t]*([0-9]{1,4})[ \t]*/[ \t]*([0-9]{1,4})[ \t]*")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 1024 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= I < N <= 1024")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def predicate(self, table: Table) -> ColumnElement[bool]:
        stripe = floor_div(table.c.id, STRIPE_IDS)
        return ((stripe % self.count) + self.count) % self.count == self.index


def floor_div(column: ColumnElement[int], n: int) -> ColumnElement[int]:
    """Python's `//` in SQL: PostgreSQL's integer division rounds toward zero, so negative
    ids need `(id + 1) / n - 1` to land in the same block or stripe as in Python."""
    return case((column >= 0, column // n), else_=(column + 1) // n - 1)


def parse(text: str) -> Shard:
    match = SHARD.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not I/N (for example 0/4)")
    return Shard(int(match[1]), int(match[2]))


def from_env(env: Mapping[str, str]) -> Shard | None:
    """The shard of a Kubernetes Indexed Job pod, if this is one with more than one index."""
    index, count = env.get("JOB_COMPLETION_INDEX"), env.get("JOB_COMPLETIONS")
    if index is None or count is None:
        return None
    shard = parse(f"{index}/{count}")
    return shard if shard.count > 1 else None
