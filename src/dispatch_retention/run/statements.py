"""The statements of a run, built once from its rules: builders only (the cleaner and the
planner execute them), pure like `rule/policy.py`, whose expressions they put together.

- the plan's read of the policies' arms (`Statements.plan_scan`), one row per id block;
- a window's cleaning UPDATE: `range_update` (by ids) or `indexed_update` (a sparse
  window's candidates from the policies' arms), each answered per binding policy;
- the sweeps (`swept_range`, `swept_indexed`): lock what is due and clean exactly that,
  answering how many were locked;
- `written_back` (the rows of a chunk's ids that hold personal data), `written_back_in_run`
  (the same over a run's windows, after the fact) and `next_due`.

Where the run checks for write-back (`ids=True`), each cleaning statement also answers
with the ids it cleaned (RETURNING): the check reads those rows by id, never by matching
a stamp (a trigger may move `cleaned_at`).

Ids are bound as a window's first and last id (`window_params`), clamped to what a bigint
holds.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    BindParameter,
    ColumnElement,
    CompoundSelect,
    Select,
    Table,
    Update,
    and_,
    any_,
    bindparam,
    cast,
    exists,
    false,
    func,
    literal,
    not_,
    null,
    select,
    text,
    true,
    union_all,
    update,
)

from dispatch_retention.config import Settings
from dispatch_retention.rule import policy
from dispatch_retention.rule.dispatch_table import target_table
from dispatch_retention.rule.shard import STRIPE_IDS, Shard, floor_div

#: Makes deferred constraint triggers fire now (before a chunk's check), not at its COMMIT.
FIRE_DEFERRED = text("SET CONSTRAINTS ALL IMMEDIATE")
#: Ids per block of the plan's map of due rows (a divisor of the shard stripe).
BLOCK_IDS = 10_000
#: The ids a bigint primary key can hold: windows are clamped to them when bound.
MIN_ID, MAX_ID = -(2**63), 2**63 - 1
assert STRIPE_IDS % BLOCK_IDS == 0


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
        *,
        ids: bool = False,
    ) -> None:
        self.table = table = target_table(settings)
        self.rules, self.holds, self.ids = rules, holds, ids
        self.scope = shard.predicate(table) if shard else true()
        self.due = and_(policy.due(table, rules, holds), self.scope)
        self.credit = policy.credit(table, rules)
        lo, last = bindparam("lo", type_=BigInteger), bindparam("last", type_=BigInteger)
        window = and_(table.c.id >= lo, table.c.id <= last)  # `window_params()`
        self.values: dict[str, Any] = dict(policy.cleaned_values(settings, table))
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
        # Rows of a chunk's ids (`written_back_params`) that hold personal data again: a
        # trigger wrote it back. Reads the personal columns: only for a role that may.
        self.written_back = written_back(table, settings)
        # After an empty window: where the next due row of the block is, if any.
        self.next_due = select(func.min(table.c.id)).where(window, self.due)
        # Once the chunk's event holds the chain's lock (every hold before it in the chain
        # has committed): rows this transaction cleaned whose member is now under a hold
        # placed after its cleaning statement began. Needs a kept `member_id` (stripped, the
        # row no longer names its member); None otherwise.
        self.held_since: Select[Any] | None = (
            select(func.count()).where(
                policy.any_active(holds),  # no hold at all: a one-time filter, nothing read
                window,
                table.c.cleaned_at == cast(func.now(), table.c.cleaned_at.type),
                policy.held(table, holds),
            )
            if holds is not None and "member_id" not in settings.clean.columns
            else None
        )

    def _counted(self, statement: Update) -> Select[Any]:
        """The UPDATE in a CTE, answered per policy: a few rows back, not one per dispatch.

        Each row returns only its policy's name; the stamp is the transaction's `now()`,
        which is what the UPDATE wrote into every row's `cleaned_at`."""
        cleaned = statement.values(self.values).returning(*self._returning()).cte("cleaned")
        return select(
            cleaned.c.policy,
            func.count().label("rows"),
            func.now().label("cleaned_at"),
            *self._ids(cleaned),
        ).group_by(cleaned.c.policy)

    def _returning(self) -> tuple[ColumnElement[Any], ...]:
        return (self.credit, self.table.c.id) if self.ids else (self.credit,)

    def _ids(self, cleaned: Any) -> tuple[ColumnElement[Any], ...]:
        """With `ids`: the policy's cleaned ids, one array per answer row."""
        if not self.ids:
            return ()
        return (func.array_agg(cast(cleaned.c.id, BigInteger)).label("ids"),)

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
            .returning(*self._returning())
            .cte("cleaned")
        )
        no_ids = (cast(null(), ARRAY(BigInteger)),) if self.ids else ()
        return union_all(
            select(
                cleaned.c.policy,
                func.count().label("rows"),
                func.now().label("cleaned_at"),
                *self._ids(cleaned),
            ).group_by(cleaned.c.policy),
            select(
                null().label("policy"),
                select(func.count()).select_from(locked).scalar_subquery(),
                func.now(),
                *no_ids,
            ),
        )

    def plan_scan(self, holds: Table | None, *, oldest: bool = True) -> CompoundSelect[Any]:
        """One read of each policy's arm (`policy.arms`: an index range when the policy
        indexes exist), one row per id block and arm: due rows per binding policy (not
        held), the oldest age stamp of those per binding policy (NULL without `oldest`: the
        end count needs none, and the `min()` costs a plan about a tenth), due rows held back,
        rows waiting out the grace. The active holds of `holds`
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
        row_age = policy.age(table, r.age_from)
        for c, arm in policy.arms(table, r):
            past = policy.arm_past(table, r, c)
            per_policy = [
                func.count().filter(and_(past, not_(held))) if other is c else literal(0)
                for other in r.cutoffs
            ]
            oldest_at = [  # a NULL of the age's type: a union types each column from its arms
                func.min(row_age).filter(and_(past, not_(held)))
                if other is c and oldest
                else cast(null(), row_age.type)
                for other in r.cutoffs
            ]
            per_arm.append(
                select(
                    block,
                    *per_policy,
                    *oldest_at,
                    func.count().filter(and_(past, held)),
                    func.count().filter(policy.arm_waiting(table, r, c)),
                )
                .select_from(source)
                .where(arm, self.scope)
                .group_by(block)
            )
        return union_all(*per_arm)


def written_back(table: Table, settings: Settings) -> Select[Any]:
    """How many rows of the bound `ids` (`ids_params`) hold personal data: a chunk's check
    for write-back, before its COMMIT and after it, read by the primary key. Reads the
    personal columns: only for a role that may."""
    return select(func.count()).where(
        table.c.id == any_(ids_param()), policy.holds_personal_data(table, settings)
    )


def written_back_in_run(settings: Settings, chunks: Table, run_id: str) -> Select[Any]:
    """How many cleaned rows in the windows of a run's chunks (`chunks`, the audit table)
    hold personal data again: the check after the fact of a run that did not check its
    chunks (a write-back trigger appeared while it ran). Read by the windows' ids, never a
    stamp; a row an earlier run cleaned in those windows counts too (it holds data all the
    same). Reads the personal columns: only for a role that may."""
    table = target_table(settings)
    in_a_window = exists().where(
        chunks.c.run_id == run_id, table.c.id >= chunks.c.first_id, table.c.id <= chunks.c.last_id
    )
    return select(func.count()).where(policy.written_back(table, settings), in_a_window)


def ids_param() -> BindParameter[Any]:
    """A chunk's ids, bound as one bigint array (`ids_params`)."""
    return bindparam("ids", type_=ARRAY(BigInteger))


def ids_params(ids: tuple[int, ...] | list[int]) -> dict[str, list[int]]:
    """The bound parameters of `written_back`: the ids as one array (not one parameter
    each: a chunk may hold more ids than a statement may have parameters)."""
    return {"ids": list(ids)}
