"""Legal holds: every dispatch of a member under an active hold is exempt from cleaning.

Holds are never deleted: `release` stamps `released_at` and who released it, so the history
of every hold stays readable. A reason is mandatory (the table refuses an empty one too).
The database stamps who placed a hold and when (`created_by`, `created_at`; `--by` is kept
as `requested_by`) and lets a hold be released once, at the server's time (migration 0004).
"""

from __future__ import annotations

import getpass
import socket
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from dispatch_retention.errors import HoldError
from dispatch_retention.pg import diagnosis
from dispatch_retention.rule.policy import active
from dispatch_retention.trail.audit_tables import (
    ONE_ACTIVE_HOLD,
    AuditTables,
    over_bound,
    read_bounded,
    shown,
)

#: The options that give a hold's texts (what `--help` names).
OPTIONS = {"reason": "--reason", "requested_by": "--by"}


def operator() -> str:
    """Who is acting: the OS user at this host (the database role is recorded too)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _text(value: str, what: str) -> str:
    """A value typed on a terminal in another encoding arrives with undecodable bytes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HoldError(f"{what} is not UTF-8 text: set the terminal to UTF-8") from None
    return value


def _fits(**values: str) -> None:
    """Each text within what the trail keeps of it (`audit_tables.TEXT_BOUNDS`): else `HoldError`
    naming the option and the limit, before anything is written."""
    long = over_bound("legal_holds", values)
    if long is not None:
        column, limit, size = long
        raise HoldError(
            f"{OPTIONS[column]} is {size} bytes long; a legal hold keeps at most {limit} "
            "(a case number or a reference, not a document)"
        )


def add(conn: Connection, tables: AuditTables, member_id: int, reason: str, by: str) -> int:
    reason, by = _text(reason, "--reason"), _text(by, "--by")
    if not reason.strip():
        raise HoldError("a legal hold needs a reason (--reason)")
    _fits(reason=reason.strip(), requested_by=by)
    holds = tables.holds
    try:
        with conn.begin_nested():
            hold_id = conn.execute(
                insert(holds)
                .values(
                    member_id=member_id,
                    reason=reason.strip(),
                    requested_by=by,  # created_at and created_by: the server's (0004)
                )
                .returning(holds.c.hold_id)
            ).scalar_one()
    except IntegrityError as exc:
        raise _refused(exc, member_id) from None
    return int(hold_id)


def _refused(exc: IntegrityError, member_id: int) -> HoldError:
    """The job's words for a hold the database refused: the member is held already (the
    one-active-hold-per-member index), else the constraint or guard that refused it, by
    name (`diagnosis.describe_error`: never the server's text)."""
    if diagnosis.violates(exc, diagnosis.UNIQUE_VIOLATION, ONE_ACTIVE_HOLD):
        return HoldError(f"member {member_id} is already under an active legal hold")
    return HoldError(f"the audit trail refused the hold ({diagnosis.describe_error(exc)})")


def release(conn: Connection, tables: AuditTables, member_id: int, by: str) -> int:
    by = _text(by, "--by")
    _fits(requested_by=by)  # the database adds the releasing role (0006)
    holds = tables.holds
    released = conn.execute(
        update(holds)
        .where(holds.c.member_id == member_id, active(holds))
        .values(released_at=func.now(), released_by=f"{by} (db role {_role(conn)})")
        .returning(holds.c.hold_id)
    ).scalar()
    if released is None:
        raise HoldError(f"member {member_id} has no active legal hold")
    return int(released)


def list_holds(
    conn: Connection, tables: AuditTables, *, include_released: bool = False
) -> list[dict[str, Any]]:
    """The holds, oldest first, read a batch at a time, each text at most its bound (a
    longer one, written before migration 0007, is cut and marked: `audit_tables.shown`)."""
    holds = tables.holds
    query = select(*read_bounded(holds, *holds.c.keys())).order_by(
        holds.c.created_at, holds.c.hold_id
    )
    if not include_released:
        query = query.where(active(holds))
    rows = conn.execute(query.execution_options(yield_per=100)).mappings()
    return [shown(holds.name, row) for row in rows]


def _role(conn: Connection) -> str:
    return str(conn.execute(select(func.current_user())).scalar_one())
