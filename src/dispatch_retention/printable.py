"""Text the job did not write, made safe to print: the one escaping of the job (a leaf).

Whatever came from the database or a file (a trigger's name, a lock holder's application, a
hold's reason, the config's text, a recorded error) may hold control characters: a newline
that forges a line of its own ("OK: ..."), an ANSI or OSC escape sequence that a terminal
runs (a retitled window, a cleared screen, a hyperlink), a bidirectional override that
shows text in another order. `escaped()` shows every character that is not printable as its
Python escape (`\\n`, `\\x1b`, `\\u202e`), so such text stays on its line and is seen for what
it is; `shown_name()` also bounds a name read from the catalog or `pg_stat_activity` to
PostgreSQL's NAMEDATALEN - 1 characters, with a visible ellipsis.

`render` (the results on stdout), `logs` (the console renderer), the command line's error
line and `diagnosis.describe_error` all go through these two functions. JSON documents keep
the text whole: json.dumps escapes control characters, and `render.to_json` the rest.
"""

from __future__ import annotations

#: PostgreSQL's NAMEDATALEN - 1: the longest name the catalog holds.
NAME_LIMIT = 63
ELLIPSIS = "…"


def escaped(text: str) -> str:
    """`text` on one line: every character that is not printable (control characters, line
    and paragraph separators, format characters such as bidirectional overrides) shown as
    its escape (`\\n`, `\\x1b`, `\\u202e`), never sent raw."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    """A character that is not printable as Python writes it in a string (`\\x1b`)."""
    return repr(char)[1:-1]


def shown_name(name: str, limit: int = NAME_LIMIT) -> str:
    """A name the job read and did not choose (catalog, `pg_stat_activity`), escaped, and
    cut to `limit` characters as shown, the cut marked with an ellipsis."""
    shown = escaped(name)
    if len(shown) <= limit:
        return shown
    kept, length = [], 0
    for char in name:
        piece = char if char.isprintable() else _escape(char)
        if length + len(piece) > limit - len(ELLIPSIS):
            break
        kept.append(piece)
        length += len(piece)
    return "".join(kept) + ELLIPSIS
