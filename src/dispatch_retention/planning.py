"""What a run will do: the statements it runs, and the plan read from the database.

`Statements` builds every statement of a run once, from the rules (builders; the cleaner
executes them). `make_plan()` reads `now` from the database clock, fixes the cutoffs for the
whole run, and in ONE read-only scan counts what is due per binding policy, what legal holds
keep back, what waits out the in-flight grace, and which id blocks hold due rows. The chunk
loop later visits only those blocks, so a run over a few scattered due rows never walks the
rest of the table, and its windows can be sized in rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    false,
    func,
    not_,
    select,
    true,
    update,
)

from . import db, policy
from .config import Settings
from .schema import dispatches_table
from .shard import STRIPE_IDS, Shard, floor_div

#: Ids per block of the plan's map of due rows (a divisor of the shard stripe).
BLOCK_IDS = 10_000
assert STRIPE_IDS % BLOCK_IDS == 0


@dataclass(frozen=True)
class PolicyPlan:
    name: str
    retention_days: int
    cutoff: datetime
    grace_cutoff: datetime
    due_rows: int


@dataclass(frozen=True)
class Plan:
    rules: policy.Rules
    policies: tuple[PolicyPlan, ...]
    held_rows: int
    waiting_grace_rows: int
    #: (block number, due rows in it), ascending; block b holds ids [b*BLOCK_IDS, (b+1)*...).
    blocks: tuple[tuple[int, int], ...] = ()

    @property
    def due_rows(self) -> int:
        return sum(p.due_rows for p in self.policies)

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.rules.now.isoformat(),
            "due_rows": self.due_rows,
            "held_rows": self.held_rows,
            "waiting_grace_rows": self.waiting_grace_rows,
            "due_blocks": len(self.blocks),
            "policies": [
                {
                    "name": p.name,
                    "retention_days": p.retention_days,
                    "cutoff": p.cutoff.isoformat(),
                    "grace_cutoff": p.grace_cutoff.isoformat(),
                    "due_rows": p.due_rows,
                }
                for p in self.policies
            ],
        }


class Statements:
    """The run's statements, built once from the rules."""

    def __init__(
        self,
        settings: Settings,
        rules: policy.Rules,
        holds: Table | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.table = table = dispatches_table(settings.target)
        self.rules, self.holds = rules, holds
        self.scope = shard.predicate(table) if shard else true()
        self.due = and_(policy.due(table, rules, holds), self.scope)
        self.credit = policy.credit(table, rules)
        lo, hi = bindparam("lo", type_=BigInteger), bindparam("hi", type_=BigInteger)
        window = and_(table.c.id >= lo, table.c.id < hi)
        values: dict[str, Any] = dict(policy.cleaned_values(settings))
        values["cleaned_at"] = func.now()
        values["updated_at"] = func.now()
        returning = (self.credit, table.c.cleaned_at)
        self.range_update = self._counted(
            update(table).where(window, self.due).values(values).returning(*returning)
        )
        locked_free = select(table.c.id).where(window, self.due).with_for_update(skip_locked=True)
        self.skip_locked_update = self._counted(
            update(table)
            .where(table.c.id.in_(locked_free.scalar_subquery()), self.due)
            .values(values)
            .returning(*returning)
        )

    @staticmethod
    def _counted(statement: Update) -> Select[Any]:
        """The UPDATE in a CTE, answered per policy: a few rows back, not one per dispatch."""
        cleaned = statement.cte("cleaned")
        return select(
            cleaned.c.policy, func.count().label("rows"), func.max(cleaned.c.cleaned_at)
        ).group_by(cleaned.c.policy)

    def plan_scan(self) -> Select[Any]:
        """One scan of the not-yet-cleaned rows older than the latest cutoff, one row per id
        block: due rows per binding policy (not held), due rows held back, rows waiting out
        the grace. Holds come in through a hash join (not a subquery per row), so the scan
        and the aggregation run in parallel workers."""
        table, r = self.table, self.rules
        past = policy.past_window(table, r)
        block = floor_div(table.c.id, BLOCK_IDS).label("block")
        source: Any = table
        held: ColumnElement[bool] = false()
        if self.holds is not None:
            active = (
                select(self.holds.c.member_id)
                .where(self.holds.c.released_at.is_(None))
                .subquery("active_holds")
            )
            source = table.outerjoin(active, active.c.member_id == table.c.member_id)
            held = active.c.member_id.is_not(None)
        per_policy = [
            func.count().filter(and_(past, not_(held), self.credit == c.policy.name))
            for c in r.cutoffs
        ]
        return (
            select(
                block,
                *per_policy,
                func.count().filter(and_(past, held)),
                func.count().filter(policy.waiting_grace(table, r)),
            )
            .select_from(source)
            .where(
                table.c.cleaned_at.is_(None),
                policy.age(table, r.age_from) < bindparam("latest", r.latest_cutoff),
                self.scope,
            )
            .group_by(block)
        )


def database_now(conn: Connection) -> datetime:
    """The database clock: the one source of `now` for the whole run."""
    value = conn.execute(select(func.now())).scalar_one()
    assert isinstance(value, datetime)
    return value


def make_plan(
    conn: Connection,
    settings: Settings,
    holds: Table | None = None,
    shard: Shard | None = None,
) -> Plan:
    """Read-only: cutoffs from the database clock and what is due under them."""
    db.read_only(conn)
    db.set_local_timeouts(
        conn,
        lock_timeout_ms=settings.clean.lock_timeout_ms,
        statement_timeout_ms=settings.clean.plan_timeout_ms,
    )
    rules = policy.rules(settings, database_now(conn))
    stmts = Statements(settings, rules, holds, shard)
    names = [c.policy.name for c in rules.cutoffs]
    due: Counter[str] = Counter()
    held_rows = waiting_rows = 0
    blocks: list[tuple[int, int]] = []
    for block, *counts in conn.execute(stmts.plan_scan()):
        per_policy, held, waiting = counts[: len(names)], counts[-2], counts[-1]
        due.update(dict(zip(names, per_policy, strict=True)))
        held_rows += held
        waiting_rows += waiting
        if sum(per_policy):
            blocks.append((int(block), int(sum(per_policy))))
    blocks.sort()
    return Plan(
        rules=rules,
        policies=tuple(
            PolicyPlan(
                name=c.policy.name,
                retention_days=c.policy.retention_days,
                cutoff=c.settled,
                grace_cutoff=c.unsettled,
                due_rows=due[c.policy.name],
            )
            for c in rules.cutoffs
        ),
        held_rows=held_rows,
        waiting_grace_rows=waiting_rows,
        blocks=tuple(blocks),
    )


class Windows:
    """Id windows over the plan's due blocks, each holding about `size` due rows.

    Consecutive due blocks are merged while their due rows fit; a block with more due rows
    than that is cut into id ranges in proportion. Blocks without due rows are never
    visited. Memory: the plan's block list (one entry per 10,000 ids that hold due rows).
    """

    def __init__(self, blocks: tuple[tuple[int, int], ...]) -> None:
        self.blocks = blocks
        self.i = 0
        self.lo = blocks[0][0] * BLOCK_IDS if blocks else 0

    @property
    def done(self) -> bool:
        return self.i >= len(self.blocks)

    def peek(self, size: int) -> tuple[int, int]:
        block, rows = self.blocks[self.i]
        end = (block + 1) * BLOCK_IDS
        left_in_block = rows * (end - self.lo) / BLOCK_IDS
        if left_in_block > size:
            return self.lo, min(end, self.lo + max(1, int(size * BLOCK_IDS / rows)))
        estimate, hi, j = left_in_block, end, self.i + 1
        while j < len(self.blocks):
            nxt, nxt_rows = self.blocks[j]
            if nxt != self.blocks[j - 1][0] + 1 or estimate + nxt_rows > size:
                break
            estimate, hi, j = estimate + nxt_rows, (nxt + 1) * BLOCK_IDS, j + 1
        return self.lo, hi

    def advance(self, hi: int) -> None:
        """Everything below `hi` is done: move to the next due block at or after it."""
        self.lo = hi
        while self.i < len(self.blocks) and (self.blocks[self.i][0] + 1) * BLOCK_IDS <= hi:
            self.i += 1
        if self.i < len(self.blocks):
            self.lo = max(hi, self.blocks[self.i][0] * BLOCK_IDS)
