"""`audit verify --head-file`: the chain's head kept in a file, outside the database.

The file holds one head (64 hexadecimal digits and a newline). No file, or an empty one, is a
first check: nothing is expected. The new head is written only when the trail checks out,
through a temporary file renamed over the old one, so the file always holds a whole head: the
last one a check found good.
"""

from __future__ import annotations

import re
from pathlib import Path

from dispatch_retention import files
from dispatch_retention.errors import HeadFileError

HEAD = re.compile(r"[0-9a-f]{64}")


def read(path: Path) -> str | None:
    """The head `path` holds; None for no file or an empty one. Anything but a regular file
    (a device, a FIFO, a directory) is refused: `keep` would replace it."""
    if path.exists() and not path.resolve().is_file():
        raise HeadFileError(str(path), "is not a regular file")
    try:
        kept = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise HeadFileError(str(path), _why(exc)) from None
    if not kept:
        return None
    if not HEAD.fullmatch(kept):
        raise HeadFileError(str(path), "holds something else than a head (64 hexadecimal digits)")
    return kept


def keep(path: Path, head: str) -> None:
    """Write `head` into `path` (through a symlink: the file it names), keeping its mode."""
    try:
        files.replace(path, (head + "\n").encode("ascii"))
    except OSError as exc:
        raise HeadFileError(str(path), "cannot keep the head: " + _why(exc)) from None


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return files.why(exc)
    return "not a text file"
