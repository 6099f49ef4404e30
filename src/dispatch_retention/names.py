"""SQL names as a config writes them: `NAME`, `SCHEMA.NAME`, or their quoted forms
(`"Messaging"."Dispatches"`). Parsed into their parts here and never pasted into SQL: every
statement quotes the parts again (SQLAlchemy's preparer, `config.Target.regclass`)."""

from __future__ import annotations

import re

IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1

#: One part of a name: a plain SQL name, or a quoted one ("Dispatches", with "" for a quote).
_NAME_PART = re.compile(r'"((?:[^"]|"")+)"|([^".]+)')


def name_parts(value: str) -> list[str]:
    """The parts of `NAME`, `SCHEMA.NAME` or their quoted forms (`"Messaging"."Dispatches"`),
    unquoted; `ValueError` for anything else. Parsed here, never pasted into SQL: every
    statement quotes the parts again (SQLAlchemy's preparer, `Target.regclass`)."""
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


def quoted_name(*parts: str) -> str:
    """`schema.name` as a config or a log writes it: each part quoted only where it must be."""
    return ".".join(p if IDENTIFIER.match(p) else '"' + p.replace('"', '""') + '"' for p in parts)
