"""The rule that decides which dispatches are due (README "What is due"). Pure: no I/O.

Everything here takes the validated settings and `now` (read once from the database clock by
the caller) and returns SQLAlchemy Core expressions; it never reads a clock, an env var or a
socket. The statements are unit-tested by compiling them against the PostgreSQL dialect and,
on a real server, against a plain-Python oracle of README "What is due" (`tests/oracle.py`).

The rule, in the words the expressions follow:
- age is measured from `clean.age_from`, falling back to `created_at` where that is NULL;
- every policy whose `where` matches applies, and the SHORTEST retention binds (ties: the
  first in the file); a dispatch no policy matches is never due;
- settled (`transmission_status = 'failed'` or `delivery_status` in delivered/failed):
  due once age > retention, whatever `scheduled_at` says (a delivered or failed message is
  over; a bogus future schedule must not keep its personal data forever);
- anything else (including unknown status values and NULLs) is unsettled: due once age >
  retention + `in_flight_grace_days`, and never while its `scheduled_at` is in the future;
- never due once `cleaned_at` is set, never due while the member is under an active legal
  hold.

Because the binding policy has the latest cutoff of all the policies that match a dispatch,
"due under the binding policy" equals "due under any matching policy": the predicate is an OR
over policies, and the CASE that credits a cleaned row picks the first match in binding order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    not_,
    null,
    or_,
    true,
)
from sqlalchemy.dialects.postgresql import JSON, JSONB

from dispatch_retention.config import Policy, Settings

#: The status columns the rule itself reads (whether a dispatch is settled), and the API's
#: words (`config.API_WORDS`) that make it settled.
SETTLED_COLUMNS = ("transmission_status", "delivery_status")
SETTLED_TRANSMISSION = ("failed",)
SETTLED_DELIVERY = ("delivered", "failed")


@dataclass(frozen=True)
class Cutoff:
    """One policy's windows as of `now`: older than `settled` (or `unsettled`) is past it."""

    policy: Policy
    settled: datetime
    unsettled: datetime


@dataclass(frozen=True)
class Rules:
    """The policies in binding order with their cutoffs, fixed for one run."""

    now: datetime
    cutoffs: tuple[Cutoff, ...]
    age_from: str

    @property
    def latest_cutoff(self) -> datetime:
        return max(c.settled for c in self.cutoffs)


def binding_order(policies: Sequence[Policy]) -> list[Policy]:
    """Shortest retention first; ties keep the order of the file."""
    return sorted(policies, key=lambda p: p.retention_days)  # sorted() is stable


def rules(settings: Settings, now: datetime) -> Rules:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (it comes from the database clock)")
    now = now.astimezone(UTC)  # days are 24 h: never local wall-clock arithmetic across DST
    grace = timedelta(days=settings.clean.in_flight_grace_days)
    cutoffs = tuple(
        Cutoff(
            policy=p,
            settled=now - timedelta(days=p.retention_days),
            unsettled=now - timedelta(days=p.retention_days) - grace,
        )
        for p in binding_order(settings.policies)
    )
    return Rules(now=now, cutoffs=cutoffs, age_from=settings.clean.age_from)


def _ts(value: datetime, like: ColumnElement[Any]) -> ColumnElement[datetime]:
    """`value` bound as the type of the column it is compared with: a column without time
    zone holds UTC (README "Real tables"), so it gets the UTC wall time as a plain
    timestamp, which its indexes serve and no session time zone shifts."""
    if isinstance(like.type, DateTime) and not like.type.timezone:
        plain = value.astimezone(UTC).replace(tzinfo=None)
        return bindparam(None, plain, type_=DateTime(timezone=False))
    return bindparam(None, value, type_=DateTime(timezone=True))


def stored(column: Any, words: Sequence[str]) -> list[Any]:
    """The values `column` stores for the API's `words`: through `[target.codes]` where
    the table has its own (`dispatch_table.target_table` puts them in the column's `info`), and
    for an enum only its labels (binding a word it lacks would fail)."""
    codes = column.info.get("codes")
    values: list[Any] = [codes[w] for w in words if w in codes] if codes else list(words)
    labels = column.info.get("labels")
    return [v for v in values if v in labels] if labels is not None else values


def _is_one_of(column: Any, words: Sequence[str]) -> ColumnElement[bool]:
    values = stored(column, words)
    return column.in_(values) if values else false()


def matches(table: Table, policy: Policy) -> ColumnElement[bool]:
    """The policy's `where`: every key must match one of its values (NULL never matches)."""
    if not policy.where:
        return true()
    return and_(*(_is_one_of(table.c[key], values) for key, values in policy.where.items()))


def settled(table: Table) -> ColumnElement[bool]:
    """NULL-safe: a NULL or unknown status (a code or label no mapping names) counts as
    unsettled."""
    return or_(
        func.coalesce(_is_one_of(table.c.transmission_status, SETTLED_TRANSMISSION), false()),
        func.coalesce(_is_one_of(table.c.delivery_status, SETTLED_DELIVERY), false()),
    )


def age(table: Table, age_from: str) -> ColumnElement[datetime]:
    if age_from == "created_at":
        return table.c.created_at
    return func.coalesce(table.c[age_from], table.c.created_at)


def not_scheduled_ahead(table: Table, r: Rules) -> ColumnElement[bool]:
    """`scheduled_at` is not in the future (the rule for unsettled dispatches)."""
    scheduled = table.c.scheduled_at
    return or_(scheduled.is_(None), scheduled <= _ts(r.now, scheduled))


def past_window(table: Table, r: Rules) -> ColumnElement[bool]:
    """Past its binding policy's window (ignores cleaned_at and holds: `verify` uses it to
    find cleaned rows that hold personal data again)."""
    row_age, is_settled = age(table, r.age_from), settled(table)
    in_time = not_scheduled_ahead(table, r)
    per_policy = [
        and_(
            matches(table, c.policy),
            or_(
                and_(is_settled, row_age < _ts(c.settled, row_age)),
                and_(row_age < _ts(c.unsettled, row_age), in_time),
            ),
        )
        for c in r.cutoffs
    ]
    return and_(
        # a superset bound that an index on the age can serve
        row_age < _ts(r.latest_cutoff, row_age),
        or_(*per_policy),
    )


#: Columns the cleaning UPDATE writes besides the personal ones: once a row is cleaned, its
#: age is not measured from them (they say when it was cleaned, not how old it is).
def past_window_unstamped(table: Table, r: Rules) -> ColumnElement[bool]:
    """`past_window()` as `verify` measures it: a cleaned row's age is measured from
    `created_at`, whatever `clean.age_from` names. The cleaning moves `updated_at` to its own
    time, and whatever writes data back into a cleaned dispatch may move the other columns
    age can be measured from (`scheduled_at`, `transmitted_at`, ...), so data written back
    into an old dispatch would look young; a dispatch is created first, so its `created_at`
    is its oldest age. A row not yet cleaned is measured as the due rule measures it."""
    if r.age_from == "created_at":
        return past_window(table, r)
    cleaned = table.c.cleaned_at.is_not(None)
    by_created = replace(r, age_from="created_at")
    return or_(
        and_(not_(cleaned), past_window(table, r)),
        and_(cleaned, past_window(table, by_created)),
    )


def arms(table: Table, r: Rules) -> list[tuple[Cutoff, ColumnElement[bool]]]:
    """The candidates for each policy, in binding order: not yet cleaned, bound by it (it
    matches and no policy before it does) and older than its retention.

    Every due row lies in exactly one arm, its binding policy's (past its window means older
    than that policy's `settled` cutoff); an arm also holds rows that are held, waiting out
    the grace or scheduled ahead, so callers still apply `due()`. Each arm is an index range
    on (the policy's `where` keys, the age) among rows not yet cleaned:
    `indexes.policy_indexes()`. Reading the arms costs what is past the windows, not the table."""
    row_age = age(table, r.age_from)
    out: list[tuple[Cutoff, ColumnElement[bool]]] = []
    earlier: list[ColumnElement[bool]] = []
    for c in r.cutoffs:
        match = matches(table, c.policy)
        out.append(
            (
                c,
                and_(
                    table.c.cleaned_at.is_(None),
                    match,
                    *(not_(func.coalesce(m, false())) for m in earlier),
                    row_age < _ts(c.settled, row_age),
                ),
            )
        )
        earlier.append(match)
    return out


def arm_past(table: Table, r: Rules, c: Cutoff) -> ColumnElement[bool]:
    """For a row in `c`'s arm: `past_window()`, in the columns of that arm's index alone
    (the binding policy's cutoffs decide; the age bound is the arm's own)."""
    row_age = age(table, r.age_from)
    return or_(
        settled(table),
        and_(row_age < _ts(c.unsettled, row_age), not_scheduled_ahead(table, r)),
    )


def active(holds: Table) -> ColumnElement[bool]:
    """A legal hold is active until it is released."""
    return holds.c.released_at.is_(None)


def held(table: Table, holds: Table) -> ColumnElement[bool]:
    """The dispatch's member is under an active legal hold. On the audit schema's view
    (`facts.table`) that cannot show a stripped `member_id`, its `info["held"]` column,
    this same predicate computed by the view."""
    column: str | None = table.info.get("held")
    if column is not None:
        return table.c[column]
    return exists().where(holds.c.member_id == table.c.member_id, active(holds))


def any_active(holds: Table) -> ColumnElement[bool]:
    """Some member is under an active legal hold."""
    return exists().where(active(holds))


def due(table: Table, r: Rules, holds: Table | None = None) -> ColumnElement[bool]:
    """The full rule of README "What is due": the rows `run` cleans."""
    clauses = [table.c.cleaned_at.is_(None), past_window(table, r)]
    if holds is not None:
        clauses.append(not_(held(table, holds)))
    return and_(*clauses)


def arm_waiting(table: Table, r: Rules, c: Cutoff) -> ColumnElement[bool]:
    """For a row in `c`'s arm: unsettled and not past the window yet, so waiting out the
    in-flight grace (or a schedule still ahead)."""
    return and_(not_(settled(table)), not_(arm_past(table, r, c)))


def unmatched(table: Table, r: Rules) -> ColumnElement[bool]:
    """No policy matches: never cleaned, reported by `verify`. NULL-safe: a NULL in a
    `where` column matches no value, so that row counts as unmatched (not as unknown)."""
    return not_(or_(*(func.coalesce(matches(table, c.policy), false()) for c in r.cutoffs)))


def cleaned_values(settings: Settings, table: Table | None = None) -> dict[str, ColumnElement[Any]]:
    """What cleaning writes into each personal column: NULL, or its `clean.replace` value
    as the column's type (`table`'s, else the seed model's: `content` jsonb): JSON for
    `json` / `jsonb`, the value's JSON text for a text column unless it is a string."""
    values: dict[str, ColumnElement[Any]] = {}
    for column in settings.clean.columns:
        if column not in settings.clean.replace:
            values[column] = null()
            continue
        value = settings.clean.replace[column]
        kind = _kind(table, column)
        if kind in (JSONB, JSON):
            values[column] = cast(literal(value, kind()), kind())
        elif kind is Text and not isinstance(value, str):
            values[column] = literal(json.dumps(value, ensure_ascii=False), Text())
        elif table is not None and column in table.c:
            values[column] = literal(value, table.c[column].type)
        else:
            values[column] = literal(value)
    return values


def checked_columns(settings: Settings) -> list[tuple[str, Any]]:
    """The columns whose data `holds_personal_data` looks for, in the order of
    `clean.columns`, each with the value cleaning writes there (None for NULL)."""
    return [(c, settings.clean.replace.get(c)) for c in settings.clean.columns]


def _kind(table: Table | None, column: str) -> type[Any] | None:
    """JSONB, JSON or Text for a column of those types (the seed model's content: JSONB)."""
    if table is None or column not in table.c:
        return JSONB if column == "content" else None
    for kind in (JSONB, JSON, Text):
        if isinstance(table.c[column].type, kind):
            return kind
    return None


def personal_data(table: Table, settings: Settings) -> dict[str, ColumnElement[bool]]:
    """For each column of `clean.columns`: it holds data, that is, it differs from what
    cleaning writes (NULL or its `clean.replace` value). A `json` column is compared as
    `jsonb` (json has no equality).

    `table` may be the audit schema's view of the dispatches (`facts.table`), which cannot
    show the personal columns: its `info["flags"]` names, per column, the view's
    `has_<column>`, which is this same predicate, computed by the view on the table."""
    flags: dict[str, str] | None = table.info.get("flags")
    if flags is not None:
        return {column: table.c[flags[column]] for column in settings.clean.columns}
    differs: dict[str, ColumnElement[bool]] = {}
    for column, value in cleaned_values(settings, table).items():
        stored: ColumnElement[Any] = table.c[column]
        if _kind(table, column) is JSON and column in settings.clean.replace:
            stored, value = cast(stored, JSONB), cast(value, JSONB)
        differs[column] = stored.is_distinct_from(value)
    return differs


def holds_personal_data(table: Table, settings: Settings) -> ColumnElement[bool]:
    """Any column of `clean.columns` holds data (`personal_data`): the row still holds
    personal data."""
    return or_(*personal_data(table, settings).values())


#: An age that starts later than this after `now` is no age: clocks differ a little, a
#: dispatch from the future or from 'infinity' is bogus, and would never be due.
FUTURE_AGE_SLACK = timedelta(days=1)


def undatable(table: Table, settings: Settings, now: datetime) -> ColumnElement[bool]:
    """Not cleaned, holding personal data, and no age to measure: the age column and
    `created_at` both NULL, or an age that starts in the future (beyond a day's slack) or
    at 'infinity'. Never due, so `verify` reports it (`undatable_rows`)."""
    row_age = age(table, settings.clean.age_from)
    return and_(
        table.c.cleaned_at.is_(None),
        or_(row_age.is_(None), row_age > _ts(now + FUTURE_AGE_SLACK, row_age)),
        holds_personal_data(table, settings),
    )


def scheduled_far_ahead(table: Table, settings: Settings, now: datetime) -> ColumnElement[bool]:
    """Not cleaned, unsettled and scheduled further ahead than the longest retention: a
    bogus schedule that would keep an unsent message's data for ever (`verify` reports it
    as `future_scheduled_rows`)."""
    longest = max(p.retention_days for p in settings.policies)
    return and_(
        table.c.cleaned_at.is_(None),
        not_(settled(table)),
        table.c.scheduled_at > _ts(now + timedelta(days=longest), table.c.scheduled_at),
    )


def written_back(table: Table, settings: Settings) -> ColumnElement[bool]:
    """Cleaned, yet holding personal data again (a trigger or the application wrote it
    back): what `verify` reports and `run --reclean` strips again."""
    return and_(table.c.cleaned_at.is_not(None), holds_personal_data(table, settings))


def credit(table: Table, r: Rules) -> ColumnElement[str]:
    """The binding policy's name: the first matching policy in binding order."""
    whens = [(matches(table, c.policy), literal(c.policy.name)) for c in r.cutoffs]
    return case(*whens, else_=literal(None)).label("policy")
