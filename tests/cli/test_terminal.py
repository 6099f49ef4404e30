"""On a real terminal (a pseudo-terminal): the plan, the question, the progress bar; and the
output gate: text from the database or a file (a trigger's name, an
acknowledgement's reason, a hold's reason, the config's text, a run record's fields) never
sends a terminal escape or forges a line, in any command's output or log."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.helpers import (
    AUDIT_SCHEMA,
    SCRIPT,
    config_text,
    guards_off,
    invoke,
    seed_series,
    snapshot,
    write_config,
)


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
def test_under_a_row_budget_the_prompt_says_up_to_and_the_bar_reaches_100_percent(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """`--max-rows 10` of 30 due: the plan and the question say what will be cleaned, and
    the bar is sized to it (it stopped at a third when sized to the plan)."""
    config = write_config(tmp_path / "r.toml", config_text())
    args = ["--config", str(config), "--database-url", url_string, "run", "--chunk-size", "5"]
    code, seen = on_terminal([*args, "--max-rows", "10"], "y")
    assert code == 0, seen
    assert "a run would clean:                 up to 10 of them (--max-rows)" in seen
    assert "Clean up to 10 of 30 dispatches now? [y/N]" in seen
    assert "100%" in seen and " 33%" not in seen.rsplit("now?", 1)[1]
    assert sum(r["cleaned_at"] is not None for r in snapshot(engine).values()) == 10


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


# --- the output gate: nothing from the database or a file reaches the terminal raw ------------

#: A name a quoted identifier allows (no NUL, at most 63 bytes): a line break, a forged "OK"
#: line and finding, an OSC sequence (retitles a terminal), a carriage return, a C1 CSI.
EVIL = "x\nOK: all clear\x1b]0;pwned\x07\r[ok   ] fine\x9b2J"
#: The same in a TOML basic string (escapes), and a reason with an OSC 8 hyperlink.
EVIL_TOML = '"x\\nOK: all clear\\u001b]0;pwned\\u0007\\r[ok   ] fine\\u009b2J"'
EVIL_REASON = "reviewed\nOK: nothing to see\x1b]8;;http://evil.invalid\x07\u202e"
EVIL_REASON_TOML = '"reviewed\\nOK: nothing to see\\u001b]8;;http://evil.invalid\\u0007\\u202e"'
#: What a forged line would begin with (the job's own verdicts and findings).
FORGED = re.compile(r"^(?:OK\b|\[ok|Run |TAMPERED|VIOLATION|hold \d)", re.MULTILINE)


def assert_gated(output: str, *, lines_like: str | None = None) -> None:
    """No character that is not printable but the job's own line breaks; the evil name's
    forged lines nowhere at the start of a line; with `lines_like`, every line matches it."""
    raw = sorted({c for c in output if not c.isprintable() and c != "\n"})
    assert raw == [], (raw, output)
    assert not any(
        line.startswith(("OK: all clear", "[ok   ] fine")) for line in output.split("\n")
    )
    if lines_like is not None:
        odd = [line for line in output.split("\n") if line and not re.match(lines_like, line)]
        assert odd == [], output


@pytest.fixture
def evil_target(engine: Engine, tmp_path: Path) -> Path:
    """A trigger named EVIL that skips every row (the run fails naming it), acknowledged in
    the config with EVIL_REASON; the config's text holds a C1 CSI and a line separator in a
    comment (TOML allows both)."""
    seed_series(engine, range(1, 11))
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION skip_row() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RETURN NULL; END $$"
            )
        )
        quoted = '"' + EVIL.replace('"', '""') + '"'
        conn.execute(
            text(f"CREATE TRIGGER {quoted} BEFORE UPDATE ON dispatches "
                 "FOR EACH ROW EXECUTE FUNCTION skip_row()")
        )  # fmt: skip
    body = config_text() + f"\n[acknowledged]\n{EVIL_TOML} = {EVIL_REASON_TOML}\n"
    return write_config(tmp_path / "r.toml", "# \x9b2J\u2028OK: forged comment\n" + body)


def test_the_run_outcome_db_check_and_the_trail_print_no_raw_control_character(
    engine: Engine, url_string: str, evil_target: Path
) -> None:
    """The run fails naming the trigger (the outcome's reason line), `db check` lists it and
    its acknowledgement, `audit list/show` print the run's record (a host and an error set
    by a forger too), `hold list` a hold's reason: each escaped on its line, no forged line,
    no escape sequence; JSON documents keep the text whole."""
    base = ["--config", str(evil_target), "--database-url", url_string]
    ran = invoke(*base, "--log-format", "json", "run", "--yes")
    assert ran.exit_code == 1, ran.output
    assert_gated(ran.stdout)
    assert "reason:" in ran.stdout and "OK: all clear" in ran.stdout  # shown, on its line
    assert len(re.findall(r"^Run ", ran.stdout, re.MULTILINE)) == 1

    checked = invoke(*base, "db", "check")
    assert_gated(checked.stdout, lines_like=r"\[(?:ok   |warn |error)\] [a-z ]+: |    [A-Z]")
    assert "nothing to see" in checked.stdout

    with engine.begin() as conn:  # a forger's record: the host and error of the run
        guards_off(conn)
        conn.execute(
            text(f"UPDATE {AUDIT_SCHEMA}.runs SET host = :evil, error = :evil"), {"evil": EVIL}
        )
    listed = invoke(*base, "audit", "list", "--wide")  # with the host
    assert_gated(listed.stdout)
    assert len(listed.stdout.strip().split("\n")) == 3  # header, rule, the one run
    as_csv = invoke(*base, "audit", "list", "--format", "csv")
    assert_gated(as_csv.stdout)
    as_json = invoke(*base, "audit", "list", "--format", "json")
    assert_gated(as_json.stdout)
    [run] = json.loads(as_json.stdout)
    assert run["host"] == EVIL  # whole, escaped by JSON

    shown = invoke(*base, "audit", "show", run["run_id"])
    assert shown.exit_code == 0, shown.output
    assert_gated(shown.stdout)
    assert "\\x9b2J" in shown.stdout and "nothing to see" in shown.stdout
    shown_json = invoke(*base, "audit", "show", run["run_id"], "--format", "json")
    assert_gated(shown_json.stdout)
    assert json.loads(shown_json.stdout)["config_text"].startswith("# \x9b2J\u2028OK")

    added = invoke(*base, "hold", "add", "7", "--reason", EVIL_REASON, "--by", EVIL)
    assert added.exit_code == 0, added.output
    for fmt in ("table", "json"):
        holds = invoke(*base, "hold", "list", "--format", fmt)
        assert holds.exit_code == 0, holds.output
        assert_gated(holds.stdout)


def test_on_a_terminal_the_logs_and_the_outcome_send_no_escape_sequence(
    url_string: str, evil_target: Path
) -> None:
    """On a real terminal (console logs, colours of the job's own): the copy risk's warning
    and the outcome name the trigger escaped; no OSC sequence, bell or C1 control reaches the
    terminal, and no forged line starts with "OK"."""
    code, seen = on_terminal(
        ["--config", str(evil_target), "--database-url", url_string, "run", "--yes"], None
    )
    assert code == 1, seen
    assert "\x1b]" not in seen and "\x07" not in seen and "\x9b" not in seen, seen
    assert "\u202e" not in seen
    assert not re.search(r"[\r\n](?:OK: all clear|\[ok   \] fine)", seen), seen
    assert "OK: all clear" in seen  # shown, escaped, on the line that names the trigger
