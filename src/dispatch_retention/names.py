"""SQL names: parsed as a config writes them, quoted as SQL and messages write them.

`name_parts()` reads `NAME`, `SCHEMA.NAME`, or their quoted forms (`"Messaging"."Dispatches"`)
into their parts, checked before any connection; they are never pasted into SQL as written.
`quoted_name()` is the one place a name is quoted again, for a statement, a script that
psql runs, a `regclass` value or a message: SQLAlchemy's PostgreSQL identifier preparer
(`"Dispatches"`, `"user"`, but `dispatches`)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sqlalchemy.dialects.postgresql.base import PGDialect

if TYPE_CHECKING:
    from sqlalchemy import TableClause

IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1

#: One part of a name: a plain SQL name, or a quoted one ("Dispatches", with "" for a quote).
_NAME_PART = re.compile(r'"((?:[^"]|"")+)"|([^".]+)')


def name_parts(value: str) -> list[str]:
    """The parts of `NAME`, `SCHEMA.NAME` or their quoted forms (`"Messaging"."Dispatches"`),
    unquoted; `ValueError` for anything else. Parsed here, never pasted into SQL: every
    statement quotes the parts again (`quoted_name`)."""
    parts, at = [], 0
    while True:
        found = _NAME_PART.match(value, at)
        if found is None:
            raise ValueError("a name is NAME, SCHEMA.NAME, or their quoted forms")
        quoted, plain = found.groups()
        if quoted is not None:
            part = quoted.replace('""', '"')
            if "\x00" in part or len(part.encode()) > MAX_IDENTIFIER:
                raise ValueError(f"a quoted name holds at most {MAX_IDENTIFIER} bytes, no NUL")
        else:
            part = plain
            if len(part) > MAX_IDENTIFIER or not IDENTIFIER.match(part):
                raise ValueError(
                    "a name is a plain SQL name (lower-case letters, digits and _, not starting "
                    f'with a digit, at most {MAX_IDENTIFIER} characters) or quoted ("Name")'
                )
        parts.append(part)
        at = found.end()
        if at == len(value):
            return parts
        if value[at] != ".":
            raise ValueError("a name is NAME, SCHEMA.NAME, or their quoted forms")
        at += 1


#: PostgreSQL's identifier preparer as psql and a reader take names: quotes doubled and
#: nothing else. A driver's dialect (psycopg's) also doubles `%` for its placeholders, which
#: `text()` does itself to the whole statement when it is sent.
_PREPARER = PGDialect(paramstyle="named").identifier_preparer  # type: ignore[no-untyped-call]


def quoted_name(*parts: str, always: bool = False) -> str:
    """`schema.name` as SQL, a config or a message writes it: a part is left as it is only
    where it is a plain name (`IDENTIFIER`, which `name_parts` reads back) that is not a
    reserved word (`user`), else quoted by the preparer; or always quoted (`always`, as the
    migrations quote the audit schema in the functions they make)."""
    return ".".join(
        p
        if not always and IDENTIFIER.match(p) and p not in _PREPARER.reserved_words
        else _PREPARER.quote_identifier(p)
        for p in parts
    )


def quoted_table(table: TableClause) -> str:
    """A SQLAlchemy table's name, with its schema if it has one (`quoted_name`)."""
    return quoted_name(*([table.schema] if table.schema else []), table.name)
