"""Files the job writes outside the database (a kept chain head, a report and its digest):
each through a temporary file in the same folder, synced and renamed over the old one, so a
reader never sees half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` into `path` (through a symlink: the file it names), with `mode`, else the
    mode the file has, else 0644. Raises OSError."""
    target = path.resolve()
    if mode is None:
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def why(exc: OSError) -> str:
    """An OSError in the system's words, without the path it may quote."""
    return exc.strerror or type(exc).__name__
