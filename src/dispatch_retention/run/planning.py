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

import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table, select

from dispatch_retention.catalog import indexes
from dispatch_retention.config import Settings
from dispatch_retention.pg import engines
from dispatch_retention.rule import policy
from dispatch_retention.rule.plans import Plan, PolicyPlan
from dispatch_retention.rule.shard import Shard
from dispatch_retention.run.statements import Statements


def read_through_indexes(conn: Connection, settings: Settings, scan: Any = None) -> bool:
    """When every arm has its index (`indexes.serving_indexes`), set this transaction up to
    read the arms through them and count their blocks in memory; say whether the planner does
    read them so: with `scan` (the plan's statement), what its EXPLAIN says, not only that the
    indexes exist (right after they are built, before a VACUUM sets the visibility map, it may
    read an arm through an older index and a filter)."""
    serving = indexes.serving_indexes(conn, settings)
    if serving is None:
        return False
    engines.set_local(conn, **engines.INDEX_SCANS)
    engines.count_in_memory(conn)
    return scan is None or reads_through(explained(conn, scan), serving)


def explained(conn: Connection, statement: Any) -> list[dict[str, Any]]:
    """The scan nodes of `statement`'s plan (EXPLAIN (FORMAT JSON), not run), as a list of
    each node's fields."""
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    found = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar()
    document: Any = json.loads(found) if isinstance(found, str) else found
    nodes: list[dict[str, Any]] = []
    stack = [document[0]["Plan"]]
    while stack:
        node = stack.pop()
        nodes.append({k: v for k, v in node.items() if k != "Plans"})
        stack.extend(node.get("Plans", []))
    return nodes


#: How a plan reads a table without any index.
TABLE_SCANS = ("Seq Scan", "Parallel Seq Scan", "Tid Scan", "Tid Range Scan", "Sample Scan")


def reads_through(nodes: list[dict[str, Any]], serving: indexes.Serving) -> bool:
    """The plan reads the target's tables through the serving indexes only: no table scan
    of them, no scan of another of their indexes (an older one, with a filter), and at least
    one scan of a serving index (an index, index-only or bitmap index scan; on a partitioned
    target the partitions' own indexes, attached to the serving ones, count as theirs)."""
    if any(
        n.get("Node Type") in TABLE_SCANS and n.get("Relation Name") in serving.relations
        for n in nodes
    ):
        return False
    used = {str(n["Index Name"]) for n in nodes if "Index Name" in n}
    if used & serving.others:
        return False
    return bool(used & serving.names) or (serving.partitioned and bool(used))


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
    recount = rules is not None  # the end count: no oldest due row to record
    if rules is None:
        rules = policy.rules(settings, engines.database_now(conn))
    stmts = Statements(settings, rules, holds, shard)
    names = [c.policy.name for c in rules.cutoffs]
    due: Counter[str] = Counter()
    held_rows = waiting_rows = 0
    in_block: Counter[int] = Counter()
    # Without an active hold there is nothing to join (what the join costs is measured in
    # docs/performance.md, "Where the time goes", item 14); the transaction reads one
    # snapshot (`engines.read_only`), so the two statements agree.
    if holds is not None and not conn.execute(select(policy.any_active(holds))).scalar_one():
        holds = None
    scan = stmts.plan_scan(holds, oldest=not recount)
    through_indexes = read_through_indexes(conn, settings, scan)
    oldest: dict[str, datetime] = {}
    for block, *counts in conn.execute(scan):
        per_policy, held, waiting = counts[: len(names)], counts[-2], counts[-1]
        due.update(dict(zip(names, per_policy, strict=True)))
        for name, at in zip(names, counts[len(names) : 2 * len(names)], strict=True):
            if at is not None and (name not in oldest or at < oldest[name]):
                oldest[name] = at
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
                oldest_due_at=_aware(oldest.get(c.policy.name)),
            )
            for c in rules.cutoffs
        ),
        held_rows=held_rows,
        waiting_grace_rows=waiting_rows,
        blocks=tuple(blocks),
        through_indexes=through_indexes,
    )


def _aware(value: datetime | None) -> datetime | None:
    """An age stamp as UTC: a column without a time zone holds UTC (README, "Real tables")."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
