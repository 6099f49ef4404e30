"""`audit verify --head-file`: the chain's head kept in a file, outside the database.

The file holds one head (64 hexadecimal digits and a newline). No file, or an empty one, is a
first check: nothing is expected. The new head is written only when the trail checks out,
through a temporary file renamed over the old one, so the file always holds a whole head: the
last one a check found good.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

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
    target = path.resolve()
    try:
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
        fd, temporary = tempfile.mkstemp(prefix=".head-", dir=target.parent)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(head + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise HeadFileError(str(path), "cannot keep the head: " + _why(exc)) from None


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "not a text file"
