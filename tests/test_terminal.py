"""On a real terminal (a pseudo-terminal): the plan, the question, the progress bar."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from .helpers import SCRIPT, config_text, seed_series, snapshot, write_config


def on_terminal(args: list[str], answer: str | None, timeout: float = 30) -> tuple[int, str]:
    """Run the console script with stdin/stdout/stderr on a pty; answer its question."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [str(SCRIPT), *args],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        close_fds=True,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(secondary)
    seen, answered, deadline = b"", False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.2)
        if ready:
            try:
                data = os.read(primary, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            seen += data
        if answer is not None and not answered and b"now? [y/N]" in seen:
            os.write(primary, answer.encode() + b"\r")
            answered = True
        if process.poll() is not None and not ready:
            break
    code = process.wait(timeout=10)
    os.close(primary)
    return code, seen.decode(errors="replace")


@pytest.fixture
def backlog(engine: Engine) -> None:
    seed_series(engine, range(1, 31))


@pytest.mark.usefixtures("backlog")
def test_terminal_asks_then_cleans_with_a_progress_bar(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """On a terminal the plan is shown, the question asked, and 'y' cleans with a bar."""
    config = write_config(tmp_path / "r.toml", config_text())
    code, seen = on_terminal(
        ["--config", str(config), "--database-url", url_string, "run", "--chunk-size", "5"], "y"
    )
    assert code == 0, seen
    assert "Plan as of" in seen and "Clean 30 dispatches now? [y/N]" in seen
    assert "cleaning" in seen and "100%" in seen
    assert all(r["cleaned_at"] is not None for r in snapshot(engine).values())


@pytest.mark.usefixtures("backlog")
def test_terminal_answer_no_cleans_nothing(engine: Engine, url_string: str, tmp_path: Path) -> None:
    """Declining at the prompt leaves every row as it was and exits 0 (status cancelled)."""
    config = write_config(tmp_path / "r.toml", config_text())
    before = snapshot(engine)
    code, seen = on_terminal(["--config", str(config), "--database-url", url_string, "run"], "n")
    assert code == 0, seen
    assert snapshot(engine) == before
    assert "cancelled" in seen


@pytest.mark.usefixtures("backlog")
def test_yes_skips_the_question_on_a_terminal(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """--yes cleans on a terminal without asking."""
    config = write_config(tmp_path / "r.toml", config_text())
    code, seen = on_terminal(
        ["--config", str(config), "--database-url", url_string, "run", "--yes"], None
    )
    assert code == 0, seen
    assert "[y/N]" not in seen
    assert all(r["cleaned_at"] is not None for r in snapshot(engine).values())


def test_sigterm_as_pid_1(engine: Engine, url_string: str, tmp_path: Path) -> None:
    """As PID 1 of its own PID namespace (as in a container) SIGTERM still stops it: 143."""
    if os.geteuid() != 0:
        pytest.fail("needs root for `unshare --pid` (CI and this machine run as root)")
    seed_series(engine, range(1, 3001))
    config = write_config(tmp_path / "r.toml", config_text(clean="pause_between_chunks_ms = 100"))
    process = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child",
         str(SCRIPT), "--config", str(config), "--database-url", url_string,
         "--log-format", "json", "run", "--yes", "--chunk-size", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stderr is not None
    for line in process.stderr:
        if '"chunk_committed"' in line:
            break
    # The job is PID 1 inside the namespace: signal it through its host pid.
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(children) == 1
    os.kill(int(children[0]), 15)
    process.wait(timeout=30)
    assert process.returncode == 143
    rows = snapshot(engine).values()
    assert 0 < sum(r["cleaned_at"] is not None for r in rows) < 3000


@pytest.mark.usefixtures("backlog")
def test_logs_do_not_tear_the_progress_bar(engine: Engine, url_string: str, tmp_path: Path) -> None:
    """While the bar is shown, the run's info events (a line per chunk, the end count) stay
    off the terminal, so the bar redraws cleanly; the outcome is printed after it."""
    config = write_config(tmp_path / "r.toml", config_text())
    code, seen = on_terminal(
        ["--config", str(config), "--database-url", url_string, "run", "--chunk-size", "5"], "y"
    )
    assert code == 0, seen
    assert "cleaning" in seen and "100%" in seen
    for event in ("chunk_committed", "recount", "run_finished"):
        assert event not in seen, seen
    assert seen.index("100%") < seen.index(": succeeded")


@pytest.mark.usefixtures("backlog")
def test_ctrl_d_at_the_prompt_cancels(engine: Engine, url_string: str, tmp_path: Path) -> None:
    """End of input (Ctrl-D) at the question is a no: status cancelled, exit 0, nothing
    cleaned, no traceback and no 'internal error'."""
    config = write_config(tmp_path / "r.toml", config_text())
    before = snapshot(engine)
    code, seen = on_terminal(["--config", str(config), "--database-url", url_string, "run"], "\x04")
    assert code == 0, seen
    assert "cancelled" in seen
    assert "Traceback" not in seen and "internal error" not in seen and "Abort" not in seen
    assert snapshot(engine) == before
