"""What a run will do: the statements it runs, and the plan read from the database.

`Statements` builds every statement of a run once, from the rules (builders; the cleaner
executes them). `make_plan()` reads `now` from the database clock, fixes the cutoffs for the
whole run, and in one read-only pass over the policies' arms (`policy.arms`, index ranges
when the policy indexes exist) counts what is due per binding policy, what legal holds keep
back, what waits out the in-flight grace, and which id blocks hold due rows. The chunk loop
later visits only those blocks, so a run over a few scattered due rows never walks the rest
of the table, and its windows can be sized in rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CompoundSelect,
    Connection,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    false,
    func,
    literal,
    not_,
    null,
    select,
    true,
    union_all,
    update,
)

from . import db, indexes, policy
from .config import Settings
from .schema import dispatches_table
from .shard import STRIPE_IDS, Shard, floor_div

#: Ids per block of the plan's map of due rows (a divisor of the shard stripe).
BLOCK_IDS = 10_000
#: The ids a bigint primary key can hold: windows are clamped to them when bound.
MIN_ID, MAX_ID = -(2**63), 2**63 - 1
#: Index entries read for the cost of one row read by id (`Windows.sparse`).
INDEX_ENTRIES_PER_ROW = 20
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
    #: every arm has its index (`indexes.serving`): sparse windows may go through them
    through_indexes: bool = False

    @property
    def due_rows(self) -> int:
        return sum(p.due_rows for p in self.policies)

    @property
    def arm_rows(self) -> int:
        """Rows in the policies' arms that the plan counted (due, held, waiting)."""
        return self.due_rows + self.held_rows + self.waiting_grace_rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.rules.now.isoformat(),
            "due_rows": self.due_rows,
            "held_rows": self.held_rows,
            "waiting_grace_rows": self.waiting_grace_rows,
            "due_blocks": len(self.blocks),
            "through_indexes": self.through_indexes,
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


def window_params(lo: int, hi: int) -> dict[str, int]:
    """The bound parameters of the id window [lo, hi): its first and last id, clamped to
    what a bigint holds (a block may reach past either end of the id space). A window wholly
    outside them is bound as an empty one."""
    if lo > MAX_ID or hi - 1 < MIN_ID:
        return {"lo": MAX_ID, "last": MAX_ID - 1}
    return {"lo": max(lo, MIN_ID), "last": min(hi - 1, MAX_ID)}


class Statements:
    """The run's statements, built once from the rules.

    Each cleaning statement answers with one row per binding policy: (policy, rows, the
    stamp), plus, for the swept forms, one row (NULL, candidates, stamp) with the number of
    due rows it locked and so had to clean. The fast forms (`range_update`,
    `indexed_update`) update what is due in the window under the statement's snapshot; the
    swept forms (`swept_range`, `swept_indexed`) first lock the window's due rows that
    nobody else holds (SKIP LOCKED), then update exactly those, so a due row they did not
    clean was left alone by a trigger or rule (`Chunk.missed`). A chunk runs a fast form
    and then the swept form of its window in the same transaction: the sweep recounts what
    is still due there, cleans rows that became due meanwhile, and finds what a trigger
    skipped (where something can skip one: `risks.updating`); when the fast form meets a row
    lock, the chunk runs the swept form alone."""

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
        lo, last = bindparam("lo", type_=BigInteger), bindparam("last", type_=BigInteger)
        window = and_(table.c.id >= lo, table.c.id <= last)  # `window_params()`
        self.values: dict[str, Any] = dict(policy.cleaned_values(settings))
        self.values["cleaned_at"] = func.now()
        self.values["updated_at"] = func.now()
        self.range_update = self._counted(update(table).where(window, self.due))
        # A sparse window: its candidates come from the policies' arms (index ranges, the
        # window's bounds checked inside the index), not from reading the window's ids.
        arm_candidates = union_all(
            *(
                select(table.c.id).where(arm, policy.arm_past(table, rules, c), window, self.scope)
                for c, arm in policy.arms(table, rules)
            )
        ).subquery("arm_candidates")
        through_arms = table.c.id.in_(select(arm_candidates.c.id))
        self.indexed_update = self._counted(update(table).where(through_arms, window, self.due))
        self.swept_range = self._swept(select(table.c.id).where(window, self.due))
        self.swept_indexed = self._swept(select(table.c.id).where(through_arms, window, self.due))
        # Rows this transaction cleaned (stamped with its now()) that hold personal data
        # again: a trigger wrote it back. Reads the personal columns: only for a role that may.
        self.written_back_now = select(func.count()).where(
            window,
            table.c.cleaned_at == func.now(),
            policy.holds_personal_data(table, settings),
        )
        # After an empty window: where the next due row of the block is, if any.
        self.next_due = select(func.min(table.c.id)).where(window, self.due)

    def _counted(self, statement: Update) -> Select[Any]:
        """The UPDATE in a CTE, answered per policy: a few rows back, not one per dispatch.

        Each row returns only its policy's name; the stamp is the transaction's `now()`,
        which is what the UPDATE wrote into every row's `cleaned_at`."""
        cleaned = statement.values(self.values).returning(self.credit).cte("cleaned")
        return select(
            cleaned.c.policy, func.count().label("rows"), func.now().label("cleaned_at")
        ).group_by(cleaned.c.policy)

    def _swept(self, due_ids: Select[Any]) -> CompoundSelect[Any]:
        """Lock `due_ids` that nobody else holds, clean exactly those, and answer per policy
        plus (NULL, how many were locked): the UPDATE cleans every locked row unless a
        trigger or rule leaves it alone (the rows stay locked, so nothing else can)."""
        table = self.table
        locked = due_ids.with_for_update(of=table, skip_locked=True).cte("locked")
        cleaned = (
            update(table)
            .where(table.c.id.in_(select(locked.c.id)), self.due)
            .values(self.values)
            .returning(self.credit)
            .cte("cleaned")
        )
        return union_all(
            select(
                cleaned.c.policy, func.count().label("rows"), func.now().label("cleaned_at")
            ).group_by(cleaned.c.policy),
            select(
                null().label("policy"),
                select(func.count()).select_from(locked).scalar_subquery(),
                func.now(),
            ),
        )

    def plan_scan(self, holds: Table | None) -> CompoundSelect[Any]:
        """One read of each policy's arm (`policy.arms`: an index range when the policy
        indexes exist), one row per id block and arm: due rows per binding policy (not
        held), due rows held back, rows waiting out the grace. The active holds of `holds`
        (None when no hold is active: nothing to hold back) come in through a hash join
        (not a subquery per row). Its cost follows the rows past the windows, not the size
        of the table."""
        table, r = self.table, self.rules
        block = floor_div(table.c.id, BLOCK_IDS).label("block")
        source: Any = table
        held: ColumnElement[bool] = false()
        if holds is not None:
            active = select(holds.c.member_id).where(policy.active(holds)).subquery("active_holds")
            source = table.outerjoin(active, active.c.member_id == table.c.member_id)
            held = active.c.member_id.is_not(None)
        per_arm = []
        for c, arm in policy.arms(table, r):
            past = policy.arm_past(table, r, c)
            per_policy = [
                func.count().filter(and_(past, not_(held))) if other is c else literal(0)
                for other in r.cutoffs
            ]
            per_arm.append(
                select(
                    block,
                    *per_policy,
                    func.count().filter(and_(past, held)),
                    func.count().filter(policy.arm_waiting(table, r, c)),
                )
                .select_from(source)
                .where(arm, self.scope)
                .group_by(block)
            )
        return union_all(*per_arm)


def read_through_indexes(conn: Connection, settings: Settings) -> bool:
    """When every arm has its index (`indexes.complete`), set this transaction up to read the
    arms through them and count their blocks in memory; say whether it did."""
    if not indexes.complete(conn, settings):
        return False
    db.set_local(conn, **db.INDEX_SCANS)
    db.count_in_memory(conn)
    return True


def make_plan(
    conn: Connection,
    settings: Settings,
    holds: Table | None = None,
    shard: Shard | None = None,
    rules: policy.Rules | None = None,
) -> Plan:
    """Read-only: cutoffs from the database clock (or the given `rules`: a run's end count
    at its own cutoffs) and what is due under them."""
    db.read_only(conn)
    db.set_local(
        conn,
        **db.timeouts(
            lock_timeout_ms=settings.clean.lock_timeout_ms,
            statement_timeout_ms=settings.clean.plan_timeout_ms,
        ),
    )
    if rules is None:
        rules = policy.rules(settings, db.database_now(conn))
    stmts = Statements(settings, rules, holds, shard)
    names = [c.policy.name for c in rules.cutoffs]
    due: Counter[str] = Counter()
    held_rows = waiting_rows = 0
    in_block: Counter[int] = Counter()
    through_indexes = read_through_indexes(conn, settings)
    # Without an active hold there is nothing to join (a tenth of the scan's time); the
    # transaction reads one snapshot (`db.read_only`), so the two statements agree.
    if holds is not None and not conn.execute(select(policy.any_active(holds))).scalar_one():
        holds = None
    for block, *counts in conn.execute(stmts.plan_scan(holds)):
        per_policy, held, waiting = counts[: len(names)], counts[-2], counts[-1]
        due.update(dict(zip(names, per_policy, strict=True)))
        held_rows += held
        waiting_rows += waiting
        if sum(per_policy):
            in_block[int(block)] += int(sum(per_policy))  # a block may be in several arms
    blocks = sorted(in_block.items())
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
        through_indexes=through_indexes,
    )


class Windows:
    """Id windows over the plan's due blocks, each holding about `size` due rows.

    A window runs over consecutive due blocks until it holds `size` due rows by the plan's
    counts, cutting the last block in proportion (so a dense backlog is not split into a
    full chunk and a small remainder at every block edge). Blocks without due rows are never
    read: a window stops before one, unless it goes through the policies' arms (`sparse`),
    which read index entries, not ids, and so may span the gap. Memory: the plan's block
    list (one entry per 10,000 ids that hold due rows).
    """

    def __init__(self, blocks: tuple[tuple[int, int], ...], arm_rows: int | None = None) -> None:
        self.blocks = blocks
        self.arm_rows = arm_rows
        self.i = 0
        self.lo = blocks[0][0] * BLOCK_IDS if blocks else 0

    @property
    def done(self) -> bool:
        return self.i >= len(self.blocks)

    def block_end(self) -> int:
        """The first id after the block the next window starts in."""
        return (self.blocks[self.i][0] + 1) * BLOCK_IDS

    def peek(self, size: int) -> tuple[int, int]:
        block, rows = self.blocks[self.i]
        end = (block + 1) * BLOCK_IDS
        left_in_block = rows * (end - self.lo) / BLOCK_IDS
        if left_in_block > size:
            return self.lo, min(end, self.lo + max(1, int(size * BLOCK_IDS / rows)))
        estimate, hi, j = left_in_block, end, self.i + 1
        contiguous_hi: int | None = None  # where the window ends if it must not span a gap
        while j < len(self.blocks):
            nxt, nxt_rows = self.blocks[j]
            if nxt != self.blocks[j - 1][0] + 1:
                if not self._sparse((nxt + 1) * BLOCK_IDS - self.lo, estimate + nxt_rows):
                    break
                contiguous_hi = hi if contiguous_hi is None else contiguous_hi
            if estimate + nxt_rows > size:  # the rest of the size, cut inside that block
                hi, estimate = nxt * BLOCK_IDS + int((size - estimate) * BLOCK_IDS / nxt_rows), size
                break
            estimate, hi, j = estimate + nxt_rows, (nxt + 1) * BLOCK_IDS, j + 1
        if contiguous_hi is not None and not self._sparse(hi - self.lo, estimate):
            return self.lo, contiguous_hi  # read by ids after all: never the ids of a gap
        return self.lo, hi

    def advance(self, hi: int) -> None:
        """Everything below `hi` is done: move on to the next due block at or after it.

        A block is walked to its end (or to where an empty window found no further due row:
        `Chunk.resume_at`), never cut short on the plan's count of it: rows that became due
        since the plan are in it too."""
        self.lo = hi
        if hi > MAX_ID:  # past the last id a bigint holds
            self.i = len(self.blocks)
        while self.i < len(self.blocks) and (self.blocks[self.i][0] + 1) * BLOCK_IDS <= hi:
            self.i += 1
        if self.i < len(self.blocks):
            self.lo = max(hi, self.blocks[self.i][0] * BLOCK_IDS)

    def estimate(self, lo: int, hi: int) -> float:
        """Due rows the plan counted in [lo, hi) (spread evenly inside each block)."""
        rows, j = 0.0, self.i
        while j < len(self.blocks) and self.blocks[j][0] * BLOCK_IDS < hi:
            block, n = self.blocks[j]
            start = block * BLOCK_IDS
            overlap = min(hi, start + BLOCK_IDS) - max(lo, start)
            rows += n * max(overlap, 0) / BLOCK_IDS
            j += 1
        return rows

    def sparse(self, lo: int, hi: int) -> bool:
        """Is [lo, hi) cheaper to clean through the policies' arms than by its ids?

        By ids, a window reads every row in it. Through the arms it reads the arms' index
        entries (all of them: `arm_rows`, about 1/20 of a row's cost each) and then only its
        due rows (about 4 times a sequential row each, being scattered). Without the arms'
        indexes (`arm_rows` None), and for a window within one block, it goes by ids."""
        return self._sparse(hi - lo, self.estimate(lo, hi))

    def _sparse(self, ids: int, rows: float) -> bool:
        if self.arm_rows is None or ids <= BLOCK_IDS:  # a block's rows are cheap to read
            return False
        return ids > self.arm_rows / INDEX_ENTRIES_PER_ROW + 4 * rows
