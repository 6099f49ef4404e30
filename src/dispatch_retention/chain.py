"""`audit verify`: whether the audit trail is what the job and the database wrote.

The database writes the trail's events (migration 0005): each event's `body` is its
canonical encoding (version 1, a JSON object naming its sequence number, kind, subject, time,
session role, the row it records as `fact`, and the previous event's hash as `prev`), and its
`hash` the SHA-256 of that body. Here, outside the database:

1. the chain: every event's hash is recomputed from its body, its body agrees with its
   columns, its `prev` is the hash of the event before it, sequence numbers have no gap,
   and `events_head` names the last event (so events cut off the end show);
2. the expected head (`--expect-head`, a head kept from an earlier check) is in the chain:
   a chain cut back or rewritten since then no longer holds it;
3. the tables against their events: each row of runs, chunks and legal_holds equals the
   `fact` of its newest event (on the columns that fact has: a column added later is not in
   older events), no row lacks an event, and no event's row is gone;
4. the chunks against the dispatches: a cleaning chunk's `rows` equals the number of
   dispatches in its id window whose `cleaned_at` is its transaction's time (chunks of one
   stamp are summed; `reclean` chunks are not counted, as a recleaned row keeps its first
   stamp).

What this cannot see: events appended in good form by a role that may write them (the
migrating role, or a superuser), after the last head kept outside the database; hence the
head in the run's `run_finished` log line and in the verify CronJob's state. Read-only,
one snapshot.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, and_, cast, func, select, text

from . import db, target
from .config import Settings
from .history import Histories
from .schema import AuditTables, target_table

#: The `prev` of the first event.
GENESIS = "0" * 64
#: The canonical encodings this version reads.
VERSIONS = (1,)
#: Findings named one by one; past that, counted.
MAX_LISTED = 20
#: How the events name the rows of each trail table, as migration 0005 writes them.
SUBJECTS = {
    "runs": ("run:", "'run:' || r.run_id"),
    "chunks": ("chunk:", "'chunk:' || r.run_id || '/' || r.seq"),
    "legal_holds": ("hold:", "'hold:' || r.hold_id"),
}


@dataclass(frozen=True)
class Finding:
    """One thing the trail does not bear out: where (`row`) and what (`problem`)."""

    row: str
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {"row": self.row, "problem": self.problem}


@dataclass
class ChainReport:
    events: int = 0
    imported: int = 0
    head_seq: int = 0
    head: str = GENESIS
    chunks_counted: int = 0
    expected_head: str | None = None
    #: where the expected head is in the chain (None: not found, or none expected)
    expected_seq: int | None = None
    findings: list[Finding] = field(default_factory=list)
    #: findings past MAX_LISTED, counted only
    unlisted: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def found(self, row: str, problem: str) -> None:
        if len(self.findings) < MAX_LISTED:
            self.findings.append(Finding(row, problem))
        else:
            self.unlisted += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "imported_events": self.imported,
            "head": self.head,
            "head_seq": self.head_seq,
            "expected_head": self.expected_head,
            "expected_head_seq": self.expected_seq,
            "chunks_counted": self.chunks_counted,
            "findings": [f.as_dict() for f in self.findings],
            "unlisted_findings": self.unlisted,
        }


def event_hash(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def check(
    conn: Connection, settings: Settings, tables: AuditTables, expect_head: str | None = None
) -> ChainReport:
    db.read_only(conn)
    db.set_local(conn, TimeZone="UTC")  # the timestamps in a row's JSON, as in its events
    report = ChainReport(expected_head=expect_head)
    _walk(conn, tables, report)
    _head(conn, tables, report)
    if expect_head is not None and report.expected_seq is None:
        report.found(
            "events",
            f"the expected head {expect_head} is not in the chain: the chain was cut back or "
            "rewritten since that head was kept",
        )
    for name in SUBJECTS:
        _rows(conn, tables, name, report)
    _chunk_counts(conn, target.resolve_settings(conn, settings), tables, report)
    return report


def head(conn: Connection, tables: AuditTables) -> tuple[int, str]:
    """The chain's newest (seq, hash), as `events_head` holds it."""
    h = tables.events_head
    seq, digest = conn.execute(select(h.c.seq, h.c.hash)).one()
    return int(seq), str(digest)


def _walk(conn: Connection, tables: AuditTables, report: ChainReport) -> None:
    """Recompute the chain, event by event, holding one event at a time."""
    e = tables.events
    query = select(
        e.c.seq, e.c.kind, e.c.subject, e.c.recorded_at, e.c.body, e.c.prev_hash, e.c.hash
    )
    rows = conn.execution_options(yield_per=2000).execute(query.order_by(e.c.seq))
    prev_seq, prev_hash = 0, GENESIS
    histories = Histories()
    for seq, kind, subject, recorded_at, body, stored_prev, digest in rows:
        where = f"events seq {seq}"
        report.events += 1
        if seq != prev_seq + 1:
            report.found(where, f"follows seq {prev_seq}: events between them are missing")
        if event_hash(body) != digest:
            report.found(where, "its hash is not the SHA-256 of its body: the event was changed")
        decoded = _decoded(body)
        if decoded is None:
            report.found(where, "its body is not an event encoding this version reads")
        else:
            report.imported += bool(decoded.get("imported"))
            said = (decoded.get("seq"), decoded.get("kind"), decoded.get("subject"))
            if (
                said != (seq, kind, subject)
                or decoded.get("prev") != stored_prev
                or _when(decoded.get("at")) != recorded_at
            ):
                report.found(where, "its columns differ from its body: the event was changed")
            fact = decoded.get("fact")
            problem = histories.see(
                kind, subject, fact if isinstance(fact, dict) else {}, bool(decoded.get("imported"))
            )
            if problem:
                report.found(where, f"{subject}: {problem}: its history was rewritten")
        if stored_prev != prev_hash:
            report.found(
                where, f"its previous hash is not the hash of seq {prev_seq}: the chain is broken"
            )
        if digest == report.expected_head:
            report.expected_seq = seq
        prev_seq, prev_hash = seq, digest
    report.head_seq, report.head = prev_seq, prev_hash


def _decoded(body: str) -> dict[str, Any] | None:
    """The body's JSON; numbers as Decimal, so that no size of number stops the reading
    (the guards of 0006 bound them; an owner's forgery need not keep to that)."""
    try:
        decoded = json.loads(body, parse_int=Decimal, parse_float=Decimal)
    except (ValueError, RecursionError):
        return None
    if not isinstance(decoded, dict) or decoded.get("v") not in VERSIONS:
        return None
    return decoded


def _when(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _head(conn: Connection, tables: AuditTables, report: ChainReport) -> None:
    seq, digest = head(conn, tables)
    if (seq, digest) != (report.head_seq, report.head):
        report.found(
            "events_head",
            f"names seq {seq} as the head, and the last event is seq {report.head_seq}: "
            "events were removed or the head was changed",
        )


def _rows(conn: Connection, tables: AuditTables, name: str, report: ChainReport) -> None:
    """Each row of a trail table against the fact of its newest event, on that fact's keys."""
    prefix, subject = SUBJECTS[name]
    quote = conn.dialect.identifier_preparer.quote
    schema = quote(tables.schema)
    events, trail = f"{schema}.events", f"{schema}.{quote(name)}"
    query = text(
        f"""
WITH latest AS (
  SELECT DISTINCT ON (subject) subject, seq, (body::jsonb) -> 'fact' AS fact
  FROM {events} WHERE starts_with(subject, :prefix) ORDER BY subject, seq DESC
), rows AS (
  SELECT {subject} AS subject, to_jsonb(r) AS row FROM {trail} r
)
SELECT coalesce(rows.subject, latest.subject), latest.seq, rows.subject IS NULL,
       ARRAY(SELECT k FROM jsonb_each(latest.fact) AS f(k, v)
             WHERE rows.row -> k IS DISTINCT FROM v ORDER BY k)
FROM rows FULL JOIN latest ON latest.subject = rows.subject
WHERE rows.subject IS NULL OR latest.subject IS NULL
   OR EXISTS (SELECT FROM jsonb_each(latest.fact) AS f(k, v) WHERE rows.row -> k IS DISTINCT FROM v)
ORDER BY latest.seq NULLS FIRST, 1
"""
    )
    for found, seq, gone, changed in conn.execute(query, {"prefix": prefix}):
        where = f"{name} {found.removeprefix(prefix)}"
        if seq is None:
            report.found(where, "no event records this row: it was written past the trail")
        elif gone:
            report.found(where, f"event seq {seq} records this row, and the table lost it")
        else:
            report.found(
                where,
                f"differs from its last event (seq {seq}) in {', '.join(changed)}: "
                "it was changed past the trail",
            )


def _chunk_counts(
    conn: Connection, settings: Settings, tables: AuditTables, report: ChainReport
) -> None:
    """Each stamp's cleaning chunks against the dispatches in their windows with that stamp."""
    chunks, table = tables.chunks, target_table(settings)
    stamps = (
        select(
            chunks.c.cleaned_at,
            func.sum(chunks.c.rows).label("rows"),
            func.count().label("chunks"),
            func.min(chunks.c.first_id).label("lo"),
            func.max(chunks.c.last_id).label("hi"),
            func.min(func.concat(chunks.c.run_id, "/", chunks.c.seq)).label("chunk"),
        )
        .where(chunks.c.kind == "clean")
        .group_by(chunks.c.cleaned_at)
        .cte("stamps")
    )
    stamped = (
        select(stamps.c.cleaned_at, func.count().label("found"))
        .select_from(
            table.join(
                stamps,
                and_(
                    # the stamp as the column keeps it (a timestamp(0) rounds it)
                    table.c.cleaned_at == cast(stamps.c.cleaned_at, table.c.cleaned_at.type),
                    table.c.id.between(stamps.c.lo, stamps.c.hi),
                ),
            )
        )
        .group_by(stamps.c.cleaned_at)
        .cte("stamped")
    )
    found = func.coalesce(stamped.c.found, 0)
    query = (
        select(stamps.c.chunk, stamps.c.chunks, stamps.c.rows, found)
        .select_from(stamps.outerjoin(stamped, stamped.c.cleaned_at == stamps.c.cleaned_at))
        .order_by(stamps.c.cleaned_at)
    )
    for chunk, count, rows, dispatches in conn.execute(query):
        report.chunks_counted += int(count)
        if int(rows) != int(dispatches):
            also = f" (with {count - 1} more of its stamp)" if count > 1 else ""
            report.found(
                f"chunks {chunk}",
                f"says {rows} dispatches were cleaned{also}; {settings.target.table} has "
                f"{dispatches} in its window with its cleaned_at",
            )
    _reclean_counts(conn, settings, tables, report)


def _reclean_counts(
    conn: Connection, settings: Settings, tables: AuditTables, report: ChainReport
) -> None:
    """A reclean chunk strips rows cleaned before it (they keep that first stamp): its
    window holds at least its `rows` of them."""
    chunks, table = tables.chunks, target_table(settings)
    before = (
        select(func.count())
        .where(
            table.c.id.between(chunks.c.first_id, chunks.c.last_id),
            table.c.cleaned_at <= cast(chunks.c.cleaned_at, table.c.cleaned_at.type),
        )
        .scalar_subquery()
    )
    query = (
        select(chunks.c.run_id, chunks.c.seq, chunks.c.rows, before)
        .where(chunks.c.kind == "reclean")
        .order_by(chunks.c.cleaned_at)
    )
    for run_id, seq, rows, found in conn.execute(query):
        report.chunks_counted += 1
        if int(found) < int(rows):
            report.found(
                f"chunks {run_id}/{seq}",
                f"says {rows} dispatches were cleaned again; {settings.target.table} has "
                f"{found} in its window cleaned before it",
            )
