"""What a run will do: the plan read from the database.

`make_plan()` reads `now` from the database clock (or takes a run's rules, for its end
count), fixes the cutoffs for the whole run, and in one read-only pass over the policies'
arms (`policy.arms`, index ranges when the policy indexes exist; `Statements.plan_scan`)
counts what is due per binding policy, what legal holds keep back, what waits out the
in-flight grace, and which id blocks hold due rows. The chunk loop later visits only those
blocks (`windows.Windows`), so a run over a few scattered due rows never walks the rest of
the table, and its windows can be sized in rows.
"""

from __future__ import annotations

from collections import Counter

from sqlalchemy import Connection, Table, select

from dispatch_retention.catalog import indexes
from dispatch_retention.config import Settings
from dispatch_retention.pg import engines
from dispatch_retention.rule import policy
from dispatch_retention.rule.plans import Plan, PolicyPlan
from dispatch_retention.rule.shard import Shard
from dispatch_retention.run.statements import Statements


def read_through_indexes(conn: Connection, settings: Settings) -> bool:
    """When every arm has its index (`indexes.complete`), set this transaction up to read the
    arms through them and count their blocks in memory; say whether it did."""
    if not indexes.complete(conn, settings):
        return False
    engines.set_local(conn, **engines.INDEX_SCANS)
    engines.count_in_memory(conn)
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
    engines.read_only(conn)
    engines.set_local(
        conn,
        **engines.timeouts(
            lock_timeout_ms=settings.clean.lock_timeout_ms,
            statement_timeout_ms=settings.clean.plan_timeout_ms,
        ),
    )
    if rules is None:
        rules = policy.rules(settings, engines.database_now(conn))
    stmts = Statements(settings, rules, holds, shard)
    names = [c.policy.name for c in rules.cutoffs]
    due: Counter[str] = Counter()
    held_rows = waiting_rows = 0
    in_block: Counter[int] = Counter()
    through_indexes = read_through_indexes(conn, settings)
    # Without an active hold there is nothing to join (what the join costs is measured in
    # docs/performance.md, "Where the time goes", item 14); the transaction reads one
    # snapshot (`engines.read_only`), so the two statements agree.
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
