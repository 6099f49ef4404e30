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
   stamp). Each chunk is counted in its own run's target (`runs.target_table`): a schema
   shared by two targets holds chunks of both. A target this role cannot count in (gone,
   not readable, not a table it sees whole) is reported with its chunks as not counted,
   never as tampered and never silently.

Memory does not grow with the trail nor with a row's texts: the events are read a batch at a
time, a body longer than `INLINE_BYTES` (a row written before migration 0007 bounded the
trail) is hashed in slices and decoded by the database, a value at a time (`history.Long`
stands for a long one), and a row's story is kept as digests (`history`).

What this cannot see: events appended in good form by a role that may write them (the
migrating role, or a superuser), after the last head kept outside the database; hence the
head in the run's `run_finished` log line and in the verify CronJob's state. Read-only,
one snapshot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Table, Text, and_, case, cast, func, or_, select, text
from sqlalchemy.exc import DBAPIError

from dispatch_retention.catalog import target
from dispatch_retention.config import Settings
from dispatch_retention.errors import NoFactsView, StaleFactsView, TargetRefused
from dispatch_retention.names import name_parts, quoted_name, quoted_table
from dispatch_retention.pg import diagnosis, engines
from dispatch_retention.printable import shown_name
from dispatch_retention.rule import policy
from dispatch_retention.rule.dispatch_table import target_table
from dispatch_retention.trail import facts, objects
from dispatch_retention.trail.audit_tables import AuditTables
from dispatch_retention.trail.facts import ROW_XACT_COLUMN, row_xact
from dispatch_retention.trail.history import Histories, Long, instant, stamp_problems
from dispatch_retention.trail.run_record import head

#: The `prev` of the first event.
GENESIS = "0" * 64
#: The canonical encodings this version reads.
VERSIONS = (1, 2)
#: Findings named one by one; past that, counted.
MAX_LISTED = 20
#: An event's body up to this many bytes is read with its row and decoded here; a longer one
#: is hashed in slices and decoded by the database (`_long_event`).
INLINE_BYTES = 64 * 1024
#: Events per round trip: at most this many bodies of `INLINE_BYTES` in memory at once.
BATCH = 64
#: A long body is hashed this many characters at a time.
SLICE_CHARS = 256 * 1024
#: An event's columns but its body are read up to this many characters (the database
#: writes them far shorter: a longer one is a forgery, and shows as one cut).
COLUMN_CHARS = 300
#: The most keys a long body's object may have to be decoded (a row has a few dozen).
MAX_KEYS = 1000
#: How the events name the rows of each trail table, as migration 0005 writes them.
SUBJECTS = {
    "runs": ("run:", "'run:' || r.run_id"),
    "chunks": ("chunk:", "'chunk:' || r.run_id || '/' || r.seq"),
    "legal_holds": ("hold:", "'hold:' || r.hold_id"),
}


@dataclass(frozen=True)
class Finding:
    """One thing the trail does not bear out: where (`row`), what (`problem`), and what
    changed (`changed`): the trail (its tables, events or triggers: only the migrating owner
    or a superuser can, past the guards) or the table (the dispatches no longer hold what a
    chunk recorded: any role with UPDATE on their `cleaned_at`, the run role included)."""

    row: str
    problem: str
    changed: str = "trail"

    def as_dict(self) -> dict[str, str]:
        return {"row": self.row, "problem": self.problem, "changed": self.changed}


@dataclass(frozen=True)
class NotCounted:
    """Chunks of runs of another target that this check could not count: the target as the
    runs name it, how many chunks, and why."""

    table: str
    chunks: int
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "chunks": self.chunks, "why": self.why}


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
    #: chunks of other targets left uncounted, and why (at most MAX_LISTED targets named)
    not_counted: list[NotCounted] = field(default_factory=list)
    #: clean chunks (0008 on) whose rows were read for personal data
    chunks_read: int = 0
    #: cleaned rows holding personal data written after their chunk, by another transaction
    #: (`verify` reports them: a write-back, not a chunk's lie)
    written_after_chunk: int = 0
    #: why the chunks' rows could not be read for personal data (None: they were)
    rows_not_read: str | None = None

    @property
    def chunks_not_counted(self) -> int:
        return sum(n.chunks for n in self.not_counted)

    @property
    def ok(self) -> bool:
        return not self.findings

    def found(self, row: str, problem: str, changed: str = "trail") -> None:
        if len(self.findings) < MAX_LISTED:
            self.findings.append(Finding(row, problem, changed))
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
            "chunks_not_counted": self.chunks_not_counted,
            "not_counted": [n.as_dict() for n in self.not_counted],
            "chunks_read_for_personal_data": self.chunks_read,
            "rows_written_after_their_chunk": self.written_after_chunk,
            "rows_not_read": self.rows_not_read,
            "findings": [f.as_dict() for f in self.findings],
            "unlisted_findings": self.unlisted,
        }


def event_hash(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def check(
    conn: Connection, settings: Settings, tables: AuditTables, expect_head: str | None = None
) -> ChainReport:
    engines.read_only(conn)
    engines.set_local(conn, TimeZone="UTC")  # the timestamps in a row's JSON, as in its events
    report = ChainReport(expected_head=expect_head)
    _walk(conn, tables, report)
    _head(conn, tables, report)
    if expect_head is not None and report.expected_seq is None:
        report.found(
            "events",
            f"the expected head {expect_head} is not in the chain: the chain was cut back or "
            "rewritten since that head was kept",
        )
    _repeated_chunks(conn, tables, report)
    _catalog(conn, tables, report)
    for name in SUBJECTS:
        try:
            with conn.begin_nested():  # an event the database cannot read fails this check only
                _rows(conn, tables, name, report)
        except DBAPIError as exc:
            if not str(diagnosis.sqlstate(exc)).startswith("22"):
                raise
            report.found(
                name, "an event of its rows holds a body that is no JSON: the event was changed"
            )
    resolved = target.resolve_settings(conn, settings)
    _chunk_counts(conn, resolved, tables, report)
    _chunk_data(conn, resolved, tables, report)
    return report


def _walk(conn: Connection, tables: AuditTables, report: ChainReport) -> None:
    """Recompute the chain, event by event, holding a batch of short events at a time."""
    e = tables.events
    size = func.octet_length(e.c.body)
    query = select(
        e.c.seq,
        func.left(e.c.kind, COLUMN_CHARS),
        func.left(e.c.subject, COLUMN_CHARS),
        e.c.recorded_at,
        func.left(e.c.prev_hash, COLUMN_CHARS),
        func.left(e.c.hash, COLUMN_CHARS),
        case((size <= INLINE_BYTES, e.c.body)),
    ).order_by(e.c.seq)
    rows = conn.execute(query.execution_options(yield_per=BATCH))
    prev_seq, prev_hash = 0, GENESIS
    histories = Histories()
    live = False  # whether a live (not imported) event came yet
    last_at: datetime | None = None  # the time of the last version 2 event
    for seq, kind, subject, recorded_at, stored_prev, digest, body in rows:
        where = f"events seq {seq}"
        report.events += 1
        if seq != prev_seq + 1:
            report.found(where, f"follows seq {prev_seq}: events between them are missing")
        if body is None:
            computed, decoded = _long_event(conn, tables, seq)
        else:
            computed, decoded = event_hash(body), _decoded(body)
        if computed != digest:
            report.found(where, "its hash is not the SHA-256 of its body: the event was changed")
        if decoded is None:
            report.found(where, "its body is not an event encoding this version reads")
        else:
            imported = bool(decoded.get("imported"))
            report.imported += imported
            if imported and live:
                report.found(
                    where,
                    "an imported event after the chain's first live one: history was added "
                    "afterwards (only the upgrade that began the chain imports)",
                )
            live = live or not imported
            said = (decoded.get("seq"), decoded.get("kind"), decoded.get("subject"))
            if (
                said != (seq, kind, subject)
                or decoded.get("prev") != stored_prev
                or instant(decoded.get("at")) != recorded_at
            ):
                report.found(where, "its columns differ from its body: the event was changed")
            fact = decoded.get("fact")
            problem = histories.see(
                kind, subject, fact if isinstance(fact, dict) else {}, bool(decoded.get("imported"))
            )
            if problem:
                report.found(where, f"{subject}: {problem}: its history was rewritten")
            if decoded.get("v") == 2:
                if last_at is not None and recorded_at < last_at:
                    report.found(
                        where,
                        "its time is before the event before it: events are in commit order, "
                        "and their times never go back",
                    )
                last_at = max(last_at or recorded_at, recorded_at)
            if decoded.get("v") == 2 and not imported:
                for problem in stamp_problems(
                    kind, fact if isinstance(fact, dict) else {}, recorded_at, decoded.get("role")
                ):
                    report.found(where, f"{subject}: {problem}")
        if stored_prev != prev_hash:
            report.found(
                where, f"its previous hash is not the hash of seq {prev_seq}: the chain is broken"
            )
        if digest == report.expected_head:
            report.expected_seq = seq
        prev_seq, prev_hash = seq, digest
    report.head_seq, report.head = prev_seq, prev_hash


def _long_event(
    conn: Connection, tables: AuditTables, seq: int
) -> tuple[str, dict[str, Any] | None]:
    """The hash of a long body, read in slices, and its decoding by the database."""
    return _long_hash(conn, tables, seq), _long_decoded(conn, tables, seq)


def _long_hash(conn: Connection, tables: AuditTables, seq: int) -> str:
    """The SHA-256 of a body's UTF-8 bytes, a slice at a time (the body is read from its
    storage once, into the server's memory, not this process's)."""
    events = _events(conn, tables)
    query = text(
        f"SELECT substr(b, g, {SLICE_CHARS}) FROM (SELECT body || '' AS b FROM {events} "
        "WHERE seq = :seq OFFSET 0) e, "
        f"generate_series(1, greatest(length(b), 1), {SLICE_CHARS}) g ORDER BY g"
    )
    h = hashlib.sha256()
    for (piece,) in conn.execute(query.execution_options(yield_per=1), {"seq": seq}):
        h.update(piece.encode("utf-8"))
    return h.hexdigest()


def _long_decoded(conn: Connection, tables: AuditTables, seq: int) -> dict[str, Any] | None:
    """A long body decoded by the database, a value at a time: the envelope's values and the
    fact's, each read here when short and a `Long` (its hash) when not. None when the body
    is no JSON object, or too odd to decode (a forgery)."""
    events = _events(conn, tables)
    query = text(
        f"""
WITH e AS (SELECT body::jsonb AS b FROM {events} WHERE seq = :seq),
kv AS (
  SELECT false AS in_fact, j.k, j.v FROM e,
    jsonb_each(CASE jsonb_typeof(b) WHEN 'object' THEN b - 'fact' ELSE '{{}}' END) AS j(k, v)
  UNION ALL
  SELECT true, j.k, j.v FROM e,
    jsonb_each(CASE jsonb_typeof(b -> 'fact') WHEN 'object' THEN b -> 'fact' ELSE '{{}}' END)
      AS j(k, v)
)
SELECT (SELECT jsonb_typeof(b) FROM e), (SELECT jsonb_typeof(b -> 'fact') FROM e),
       in_fact, left(k, {COLUMN_CHARS}), octet_length(k) > {COLUMN_CHARS},
       CASE WHEN octet_length(v::text) <= {INLINE_BYTES} THEN v::text END,
       CASE WHEN octet_length(v::text) > {INLINE_BYTES}
            THEN encode(sha256(convert_to(v::text, 'UTF8')), 'hex') END
FROM (SELECT 1) one LEFT JOIN kv ON true
"""
    )
    decoded: dict[str, Any] = {}
    fact: dict[str, Any] = {}
    fact_type: str | None = None
    try:
        with conn.begin_nested():  # a body that is no JSON fails the statement, not the check
            rows = conn.execute(query.execution_options(yield_per=BATCH), {"seq": seq})
            try:
                for n, row in enumerate(rows):
                    body_type, fact_type, in_fact, key, odd_key, short, hashed = row
                    if body_type != "object" or odd_key or n >= MAX_KEYS:
                        return None
                    if key is not None:  # None: an empty object
                        value = Long(hashed) if hashed is not None else _json(short)
                        (fact if in_fact else decoded)[key] = value
            finally:
                rows.close()
    except DBAPIError as exc:
        if not str(diagnosis.sqlstate(exc)).startswith(
            "22"
        ):  # a data exception: no JSON jsonb reads
            raise
        return None
    if fact_type == "object":
        decoded["fact"] = fact
    return decoded if decoded.get("v") in VERSIONS else None


def _events(conn: Connection, tables: AuditTables) -> str:
    return quoted_name(tables.schema, "events")


def _json(value: str) -> Any:
    return json.loads(value, parse_int=Decimal, parse_float=Decimal)


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
    events, trail = quoted_name(tables.schema, "events"), quoted_name(tables.schema, name)
    query = text(
        f"""
WITH latest AS (
  SELECT DISTINCT ON (subject) subject, seq, (body::jsonb) -> 'fact' AS fact
  FROM {events} WHERE starts_with(subject, :prefix) ORDER BY subject, seq DESC
), rows AS (
  SELECT {subject} AS subject, to_jsonb(r) AS row FROM {trail} r
)
SELECT left(coalesce(rows.subject, latest.subject), {COLUMN_CHARS}), latest.seq,
       rows.subject IS NULL,
       ARRAY(SELECT left(k, {COLUMN_CHARS}) FROM jsonb_each(latest.fact) AS f(k, v)
             WHERE rows.row -> k IS DISTINCT FROM v ORDER BY k LIMIT {MAX_LISTED})
FROM rows FULL JOIN latest ON latest.subject = rows.subject
WHERE rows.subject IS NULL OR latest.subject IS NULL
   OR EXISTS (SELECT FROM jsonb_each(latest.fact) AS f(k, v) WHERE rows.row -> k IS DISTINCT FROM v)
ORDER BY latest.seq NULLS FIRST, 1
"""
    )
    found_rows = conn.execute(query.execution_options(yield_per=BATCH), {"prefix": prefix})
    for found, seq, gone, changed in found_rows:
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


def _catalog(conn: Connection, tables: AuditTables, report: ChainReport) -> None:
    """The trail's catalog as the migrations made it (`objects`): no inheritance
    child of a trail table (whose rows a read of the table would count as its own, written
    past its triggers); every function, trigger, constraint and rule as made, none added;
    every trigger `ENABLE ALWAYS`."""
    params = {"schema": tables.schema, "names": list(objects.TABLES)}
    oid = "to_regclass(format('%I.%I', CAST(:schema AS text), t.name))"
    children = text(
        f"""
SELECT t.name, left(format('%s', i.inhrelid::regclass), {COLUMN_CHARS})
FROM unnest(CAST(:names AS text[])) AS t(name) JOIN pg_inherits i ON i.inhparent = {oid}
ORDER BY 1, 2
"""
    )
    for table, child in conn.execute(children, params):
        report.found(
            table,
            f"has the inheritance child {shown_name(child)}: rows there are read as the "
            "table's and were written past its triggers",
        )
    for problem in objects.differences(objects.read(conn, tables.schema)):
        report.found("catalog", f"{problem}: rows may be written past the trail's guards")
    enabled = text(
        f"""
SELECT t.name, g.tgname, g.tgenabled::text
FROM unnest(CAST(:names AS text[])) AS t(name)
JOIN pg_trigger g ON g.tgrelid = {oid} AND NOT g.tgisinternal AND g.tgenabled <> 'A'
ORDER BY 1, 2
"""
    )
    expected = objects.triggers()
    for table, trigger, state in conn.execute(enabled, params):
        if trigger in expected.get(table, ()):
            report.found(
                table,
                f"its trigger {trigger} is not ENABLE ALWAYS ({_ENABLED.get(state, '?')}): "
                "rows may be written past it",
            )


#: `pg_trigger.tgenabled`, in words.
_ENABLED = {"O": "enabled for origin sessions only", "D": "disabled", "R": "replica only"}


def _repeated_chunks(conn: Connection, tables: AuditTables, report: ChainReport) -> None:
    """A chunk recorded by a second event (found by the database: no chunk is kept here)."""
    query = text(
        f"""
SELECT seq, left(subject, {COLUMN_CHARS}) FROM (
  SELECT seq, subject, row_number() OVER (PARTITION BY subject ORDER BY seq) AS nth
  FROM {_events(conn, tables)} WHERE kind = 'chunk_committed'
) chunk_events WHERE nth > 1 ORDER BY seq
"""
    )
    for seq, subject in conn.execute(query.execution_options(yield_per=BATCH)):
        report.found(
            f"events seq {seq}",
            f"{subject}: a second event for the chunk: its history was rewritten",
        )


# --- the chunks against the dispatches, each in its own run's target ---------------------------


def _chunk_counts(
    conn: Connection, settings: Settings, tables: AuditTables, report: ChainReport
) -> None:
    """Each target the runs name, with its chunks, counted where this role can."""
    runs, chunks = tables.runs, tables.chunks
    named = conn.execute(
        select(runs.c.target_table, func.count())
        .select_from(chunks.join(runs, runs.c.run_id == chunks.c.run_id))
        .group_by(runs.c.target_table)
        .order_by(runs.c.target_table)
    ).all()
    own = _oid(conn, settings.target.table)
    by_table: dict[int, list[str]] = {}
    for name, count in named:
        oid = _oid(conn, name)
        if oid is None:
            _not_counted(report, name, count, "no such table (or this role cannot see it)")
        else:
            by_table.setdefault(oid, []).append(name)
    for oid, names in by_table.items():
        table = (
            target_table(settings) if oid == own else _other(conn, settings, tables, names, report)
        )
        if table is not None:
            _stamp_counts(conn, table, tables, names, report)
            _reclean_counts(conn, table, tables, names, report)


def _oid(conn: Connection, name: str) -> int | None:
    """The table a run's `target_table` names, as the database resolves it (None: no
    table, or no name the job would have written)."""
    try:
        parts = name_parts(name)
    except ValueError:
        return None
    if len(parts) > 2:
        return None
    found = conn.execute(text("SELECT to_regclass(:n)::oid"), {"n": quoted_name(*parts)}).scalar()
    return None if found is None else int(found)


def _other(
    conn: Connection,
    settings: Settings,
    tables: AuditTables,
    names: list[str],
    report: ChainReport,
) -> Table | None:
    """Another target's table, to count its chunks in: resolved as the job resolves its own
    (a table it sees whole), whose `id` and `cleaned_at` this role may read; else None, its
    chunks reported as not counted."""
    count = _chunks_of(conn, tables, names)
    other = settings.target.model_copy(update={"table": names[0]})  # unvalidated, as `pinned`
    try:
        resolved = target.resolve_settings(
            conn, dataclasses.replace(settings, target=other, shape=None), refuse=False
        )
    except TargetRefused as exc:
        _not_counted(report, names[0], count, exc.reason)
        return None
    assert resolved.shape is not None
    missing = [c for c in ("id", "cleaned_at") if c not in resolved.shape.columns]
    readable = conn.execute(
        text(
            "SELECT has_column_privilege(CAST(:t AS regclass), 'id', 'SELECT') "
            "AND has_column_privilege(CAST(:t AS regclass), 'cleaned_at', 'SELECT')"
        ),
        {"t": resolved.target.regclass},
    ).scalar()
    if missing or not readable:
        why = (
            f"it has no {' or '.join(missing)} column"
            if missing
            else "this role may not read its id and cleaned_at"
        )
        _not_counted(report, names[0], count, why)
        return None
    return target_table(resolved)


def _chunks_of(conn: Connection, tables: AuditTables, names: list[str]) -> int:
    runs, chunks = tables.runs, tables.chunks
    return int(
        conn.execute(
            select(func.count())
            .select_from(chunks.join(runs, runs.c.run_id == chunks.c.run_id))
            .where(runs.c.target_table.in_(names))
        ).scalar_one()
    )


def _not_counted(report: ChainReport, table: str, chunks: int, why: str) -> None:
    """Name the target and why (past MAX_LISTED targets, the last line sums the rest)."""
    if len(report.not_counted) < MAX_LISTED:
        report.not_counted.append(NotCounted(table[:COLUMN_CHARS], chunks, why))
    else:
        last = report.not_counted[-1]
        report.not_counted[-1] = NotCounted("(more targets)", last.chunks + chunks, "not listed")


def _of_runs(tables: AuditTables, names: list[str]) -> Any:
    """Chunks of the runs that name one of `names` as their target."""
    runs = tables.runs
    return tables.chunks.c.run_id.in_(select(runs.c.run_id).where(runs.c.target_table.in_(names)))


def _stamp_counts(
    conn: Connection, table: Table, tables: AuditTables, names: list[str], report: ChainReport
) -> None:
    """Each stamp's cleaning chunks against the dispatches in their windows with that stamp."""
    chunks = tables.chunks
    stamps = (
        select(
            chunks.c.cleaned_at,
            func.sum(chunks.c.rows).label("rows"),
            func.count().label("chunks"),
            func.min(chunks.c.first_id).label("lo"),
            func.max(chunks.c.last_id).label("hi"),
            func.min(func.concat(chunks.c.run_id, "/", chunks.c.seq)).label("chunk"),
        )
        .where(chunks.c.kind == "clean", _of_runs(tables, names))
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
    name = quoted_table(table)
    for chunk, count, rows, dispatches in conn.execute(query.execution_options(yield_per=1000)):
        report.chunks_counted += int(count)
        if int(rows) != int(dispatches):
            also = f" (with {count - 1} more of its stamp)" if count > 1 else ""
            report.found(
                f"chunks {chunk}",
                f"says {rows} dispatches were cleaned{also}; {name} has "
                f"{dispatches} in its window with its cleaned_at: the dispatches changed after "
                "the chunk (a role with UPDATE on their cleaned_at, the run role included, "
                "can do this)",
                changed="table",
            )


def _reclean_counts(
    conn: Connection, table: Table, tables: AuditTables, names: list[str], report: ChainReport
) -> None:
    """A reclean chunk strips rows cleaned before it (they keep that first stamp): its
    window holds at least its `rows` of them."""
    chunks = tables.chunks
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
        .where(chunks.c.kind == "reclean", _of_runs(tables, names))
        .order_by(chunks.c.cleaned_at)
    )
    name = quoted_table(table)
    for run_id, seq, rows, found in conn.execute(query.execution_options(yield_per=1000)):
        report.chunks_counted += 1
        if int(found) < int(rows):
            report.found(
                f"chunks {run_id}/{seq}",
                f"says {rows} dispatches were cleaned again; {name} has "
                f"{found} in its window cleaned before it: the dispatches changed after the "
                "chunk",
                changed="table",
            )


# --- the chunks' rows against the personal data their own transaction left ---------------------


def _chunk_data(
    conn: Connection, settings: Settings, tables: AuditTables, report: ChainReport
) -> None:
    """Each chunk that knows its transaction (0008 on), against the rows of its window it
    cleaned (a cleaning chunk's: with its stamp; a reclean chunk's: cleaned before it) that
    hold personal data: written by that very transaction, the chunk recorded a cleaning that
    did not happen (a finding); by another, the data was written there after it (counted
    for cleaning chunks: `verify` reports those rows). The row's `xmin` names only the last
    transaction that wrote it, and a subtransaction's own id: a role that may write the rows
    can move the data it left under another id (docs/security.md). Read in the target, or
    through the read-only view where this role may not read the personal columns; where
    neither can be read, said so, never silently."""
    try:
        source = facts.source(conn, settings)
    except (NoFactsView, StaleFactsView, TargetRefused) as exc:
        report.rows_not_read = str(exc)
        return
    chunks = tables.chunks
    xact = source.c[ROW_XACT_COLUMN] if ROW_XACT_COLUMN in source.c else row_xact()
    rows = (
        select(source.c.id, source.c.cleaned_at, xact.label("xact"))
        .where(policy.holds_personal_data(source, settings))
        .subquery("personal")
    )
    # the row's xmin against the chunk's xid8, cut to the 32 bits an xmin has
    left_by_it = rows.c.xact == cast(func.xid(chunks.c.xact), Text)
    own = _oid(conn, settings.target.table)
    runs = tables.runs
    names = [
        name
        for (name,) in conn.execute(select(runs.c.target_table).distinct())
        if own is not None and _oid(conn, name) == own
    ]
    read = and_(chunks.c.xact.is_not(None), _of_runs(tables, names))
    report.chunks_read = int(
        conn.execute(select(func.count()).select_from(chunks).where(read)).scalar_one()
    )
    stamp = cast(chunks.c.cleaned_at, source.c.cleaned_at.type)
    clean = chunks.c.kind == "clean"
    query = (
        select(
            chunks.c.run_id,
            chunks.c.seq,
            func.count().filter(left_by_it),
            func.count().filter(~left_by_it, clean),
        )
        .select_from(
            chunks.join(
                rows,
                and_(
                    rows.c.id.between(chunks.c.first_id, chunks.c.last_id),
                    # a cleaning chunk's rows bear its stamp; a reclean chunk's, an earlier one
                    or_(
                        and_(clean, rows.c.cleaned_at == stamp),
                        and_(chunks.c.kind == "reclean", rows.c.cleaned_at <= stamp),
                    ),
                ),
            )
        )
        .where(read)
        .group_by(chunks.c.run_id, chunks.c.seq)
        .order_by(chunks.c.run_id, chunks.c.seq)
    )
    for run_id, seq, left, later in conn.execute(query.execution_options(yield_per=1000)):
        report.written_after_chunk += int(later)
        if left:
            report.found(
                f"chunks {run_id}/{seq}",
                f"{left} rows of its window with its cleaned_at hold personal data that its own "
                "transaction left there: the chunk records a cleaning that did not happen (or "
                "a trigger wrote the data back before its COMMIT; `run --reclean` strips them)",
            )
