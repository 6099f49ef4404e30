"""The console script as a real subprocess, and its JSON log lines: `script` (to its end),
`spawn` (left running), `Job` (a run to watch, signal and wait for), the environment they get
(`script_env`, without the ambient job settings `AMBIENT`). tests/helpers.py re-exports all
of it: tests import the harness from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar


def as_json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log events in `text` (other lines, e.g. a click usage message, skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of a non-terminal stderr, each of which must be one JSON log event."""
    return [json.loads(line) for line in stderr.splitlines()]


def script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed console script in a real subprocess, without the ambient job settings
    of the shell (stderr is not a terminal: JSON logs)."""
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=script_env(),
    )


def spawn(*args: str, **streams: Any) -> subprocess.Popen[str]:
    """The console script started in a real subprocess, left running."""
    return subprocess.Popen([str(SCRIPT), *args], text=True, **streams)


def read_until_first_chunk(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Log events of a running subprocess up to and including its first committed chunk."""
    assert proc.stderr is not None
    seen: list[dict[str, Any]] = []
    for line in proc.stderr:  # ends at EOF if the run never commits a chunk
        seen.append(json.loads(line))
        if seen[-1]["event"] == "chunk_committed":
            return seen
    raise AssertionError(f"the run ended before committing a chunk: {seen}")


SCRIPT = Path(sys.executable).parent / "dispatch-retention"
#: Settings a developer's or CI's shell may carry that must not leak into a test's subprocess.
AMBIENT = (
    "DATABASE_URL",
    "DATABASE_URL_FILE",
    "DISPATCH_RETENTION_CONFIG",
    "DISPATCH_RETENTION_TRIGGER",
    "JOB_COMPLETION_INDEX",
    "JOB_COMPLETIONS",
)


def script_env(**extra: str) -> dict[str, str]:
    """The test's environment without ambient job settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in AMBIENT}
    env.update(extra)
    return env


class Job:
    """`dispatch-retention --log-format json ...` as a real subprocess (no shell in between).

    Its stderr (JSON log lines) and stdout are read by threads as they come, so a test can
    wait for an event, then act (signal, kill, lock, restart) at a known point of the run."""

    started_jobs: ClassVar[list[Job]] = []

    @classmethod
    def reap(cls) -> None:
        """Kill every job a test started and left running (a failed test, say)."""
        while cls.started_jobs:
            job = cls.started_jobs.pop()
            if job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()

    def __init__(
        self,
        url: str,
        config: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        prefix: Iterable[str] = (),
    ) -> None:
        self.argv = [
            *prefix,
            str(SCRIPT),
            "--database-url",
            url,
            "--config",
            str(config),
            "--log-format",
            "json",
            *args,
        ]
        self.started = time.monotonic()
        self.elapsed: float | None = None
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else script_env(),
        )
        Job.started_jobs.append(self)
        self._err: list[str] = []
        self._out: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((self.proc.stderr, self._err), (self.proc.stdout, self._out))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._changed:
                into.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self._err)

    @property
    def stdout(self) -> str:
        with self._changed:
            return "".join(self._out)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in as_json_lines(self.stderr) if name is None or e.get("event") == name]

    def last(self, name: str) -> dict[str, Any]:
        found = self.events(name)
        assert found, f"no {name} event; stderr:\n{self.stderr}"
        return found[-1]

    def wait_for(self, name: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        """The first `name` event whose fields include `fields`; fails if the job ends first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events(name):
                    if all(event.get(k) == v for k, v in fields.items()):
                        return event
                if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                    raise AssertionError(
                        f"the job exited ({self.proc.returncode}) before {name} {fields}; "
                        f"stderr:\n{self.stderr}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {name} {fields} within {timeout}s:\n{self.stderr}")
                self._changed.wait(min(left, 0.05))

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 60) -> int:
        """Wait for the exit (killing the job after `timeout`) and return the exit status."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            for reader in self._readers:
                reader.join(5)
            raise AssertionError(
                f"{' '.join(self.argv)} still running after {timeout}s; stderr:\n{self.stderr}"
            ) from None
        for reader in self._readers:
            reader.join(10)
        self.elapsed = time.monotonic() - self.started
        return self.proc.returncode


def run_script(
    url: str,
    config: Path,
    *args: str,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> Job:
    """Run the console script to its end."""
    job = Job(url, config, *args, env=env)
    job.finish(timeout)
    return job
