"""The job as a subprocess: which executable, how it is installed, and what its log says.

`run_job()` starts `dispatch-retention` on one copy with JSON logs, waits for it with
`wait4()` (its own peak RSS and CPU time) and returns its events; `job_outcome()` and
`job_breakdown()` read the rows cleaned, the chunk times and where the wall time went from
those events. A process this module starts is listed in the caller's `procs` while it
runs, so that the bench can kill it (by its pid) when it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from .report import _r
from .server import REPO

#: the job reads its database and shard from these; the bench passes both on the command line
IGNORED_ENV = ("DATABASE_URL", "DATABASE_URL_FILE", "JOB_COMPLETION_INDEX", "JOB_COMPLETIONS")


def run_job(
    job_bin: Path,
    config_path: Path,
    url: str,
    command: tuple[str, ...],
    procs: list[subprocess.Popen[bytes]],
    *,
    check: bool = False,
) -> dict[str, Any]:
    argv = [
        str(job_bin),
        "--config",
        str(config_path),
        "--log-format",
        "json",
        "--database-url",
        url,
        *command,
    ]
    env = {k: v for k, v in os.environ.items() if k not in IGNORED_ENV}
    with tempfile.TemporaryFile() as stdout:
        spawned = time.perf_counter()
        spawned_wall = time.time()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        procs.append(proc)
        assert proc.stderr is not None
        lines = proc.stderr.read().decode("utf-8", "replace").splitlines()
        # wait4 gives this child's own rusage: ru_maxrss is its peak RSS (KiB on Linux).
        _pid, status, usage = os.wait4(proc.pid, 0)
        ended = time.perf_counter()
        proc.returncode = os.waitstatus_to_exitcode(status)
        procs.remove(proc)
    events = []
    for line in lines:
        with suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    out = {
        "returncode": proc.returncode,
        "wall_s": ended - spawned,
        "spawned_at": spawned_wall,
        "peak_rss_mb": usage.ru_maxrss / 1024
        if sys.platform != "darwin"
        else usage.ru_maxrss / 2**20,
        "cpu_user_s": usage.ru_utime,
        "cpu_sys_s": usage.ru_stime,
        "events": events,
        "stderr_tail": " | ".join(line for line in lines[-3:])[:600],
    }
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {out['stderr_tail']}")
    return out


def job_outcome(
    out: dict[str, Any], problems: list[str], prefix: str = ""
) -> tuple[int, list[float]]:
    """Rows cleaned and chunk times from a job's log events; problems noted."""
    events = out["events"]
    finished = next((e for e in events if e.get("event") == "run_finished"), None)
    if out["returncode"] != 0 or finished is None or finished.get("status") != "succeeded":
        problems.append(f"{prefix}job exited {out['returncode']}: {out['stderr_tail']}")
    chunks = [e for e in events if e.get("event") == "chunk_committed"]
    chunk_rows = sum(int(e["rows"]) for e in chunks)
    rows = int(finished["rows_cleaned"]) if finished else chunk_rows
    if finished and chunk_rows != rows:
        problems.append(f"{prefix}chunk_committed rows do not add up to rows_cleaned")
    return rows, [float(e["ms"]) for e in chunks]


def job_breakdown(
    out: dict[str, Any], events: list[dict[str, Any]], chunk_times: list[float]
) -> dict[str, Any]:
    """Where the job's wall time went, from its own log timestamps."""

    def stamps(name: str) -> list[float]:
        found = []
        for e in events:
            if e.get("event") == name and e.get("timestamp"):
                with suppress(ValueError):
                    found.append(datetime.fromisoformat(str(e["timestamp"])).timestamp())
        return found

    def at(name: str) -> float | None:
        return next(iter(stamps(name)), None)

    def last(name: str) -> float | None:
        return next(reversed(stamps(name)), None)

    started, planned = at("run_started"), at("plan")
    finished = at("run_finished") or at("run_failed") or at("run_interrupted")
    walked = last("chunk_committed") or planned  # the walk's end (its catch-up walk's)
    recounted = last("recount")
    spawned = out["spawned_at"]
    end = spawned + out["wall_s"]
    chunk_ms = sum(chunk_times)
    detail: dict[str, Any] = {
        "returncode": out["returncode"],
        "cpu_user_s": _r(out["cpu_user_s"], 2),
        "cpu_sys_s": _r(out["cpu_sys_s"], 2),
        "startup_s": _r(started - spawned, 3) if started else None,
        "plan_s": _r(planned - started, 3) if started and planned else None,
        "clean_s": _r(finished - planned, 3) if planned and finished else None,
        "chunks_s": _r(chunk_ms / 1000, 3),
        "between_chunks_s": (
            _r((finished - planned) - chunk_ms / 1000, 3) if planned and finished else None
        ),
        # the phases after planning: the chunks (of them, the sweeps), the count at the end
        # (from the last chunk to the last `recount`), the record's close (to run_finished)
        "sweep_s": _r(
            sum(float(e.get("sweep_ms", 0)) for e in events if e.get("event") == "chunk_committed")
            / 1000,
            3,
        ),
        "end_count_s": _r(recounted - walked, 3) if recounted and walked else None,
        "close_s": _r(finished - recounted, 3) if recounted and finished else None,
        "exit_s": _r(end - finished, 3) if finished else None,
        "in_run_s": _r(finished - started, 3) if started and finished else None,
        "skipped_locked_chunks": sum(
            1 for e in events if e.get("event") == "chunk_committed" and e.get("skipped_locked")
        ),
    }
    chunks = [e for e in events if e.get("event") == "chunk_committed"]
    sizes = [int(e["chunk_size"]) for e in chunks if "chunk_size" in e]
    if sizes:  # the id window of each chunk (adaptive when clean.target_chunk_ms is set)
        detail["window_ids"] = {"first": sizes[0], "min": min(sizes), "max": max(sizes)}
    if chunks:
        detail["rows_per_chunk_max"] = max(int(e["rows"]) for e in chunks)
        # every chunk: [ms, rows, id window] (the window is null before adaptive sizing)
        detail["chunk_series"] = [
            [float(e["ms"]), int(e["rows"]), e.get("chunk_size")] for e in chunks
        ]
    plan = next((e for e in events if e.get("event") == "plan"), None)
    if plan:
        detail["planned_due_rows"] = plan.get("due_rows")
    return detail


def find_job_bin(given: Path | None = None) -> Path:
    """--job-bin, else the `dispatch-retention` beside this Python, else the one on PATH."""
    if given is not None:
        if not given.exists():
            raise SystemExit(f"--job-bin: {given} does not exist")
        return given.absolute()
    beside = Path(sys.executable).with_name("dispatch-retention")
    if beside.exists():
        return beside
    found = shutil.which("dispatch-retention")
    if not found:
        raise SystemExit("dispatch-retention is not installed in this environment")
    return Path(found)


def job_install(job_bin: Path) -> dict[str, Any]:
    """The interpreter the job runs on and how the job is installed in it (a wheel, as the
    image has it, or an editable development install), read off that interpreter."""
    first = job_bin.read_bytes().split(b"\n", 1)[0]
    if not first.startswith(b"#!"):
        return {"bin": str(job_bin)}
    python = first[2:].decode().strip()
    probe = (
        "import json, os, platform, sys, importlib.metadata as m\n"
        "d = m.distribution('dispatch-retention')\n"
        "url = json.loads(d.read_text('direct_url.json') or '{}')\n"
        "print(json.dumps({'python': platform.python_version(),"
        " 'executable': os.path.realpath(sys.executable),"
        " 'editable': bool(url.get('dir_info', {}).get('editable'))}))"
    )
    out = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, check=False, cwd=REPO
    )
    info: dict[str, Any] = {"bin": str(job_bin)}
    with suppress(ValueError):
        found = json.loads(out.stdout)
        info.update(
            python=found["python"],
            executable=found["executable"],
            install="editable" if found["editable"] else "wheel",
        )
    return info


def job_has_command(job_bin: Path, name: str) -> bool:
    out = subprocess.run(
        [str(job_bin), "--help"], capture_output=True, text=True, check=False, cwd=REPO
    ).stdout
    return any(line.split()[:1] == [name] for line in out.splitlines() if line.startswith("  "))
