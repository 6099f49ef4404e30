"""docs/auditor.md as a test: its sample session is replayed on a real database, prepared as
the page says (`cycle.prepare`: 2,000 synthetic dispatches from a fixed seed, the shipped
config/retention.toml, a legal hold on member 7 and a released one on member 12, a manual run
stopped at `--max-rows 500`, then the nightly run), and every command's output must be what
the page shows (as sqlite-utils tests its docs).

Only what must vary is normalised: run ids (the page's ids stand for the session's, learned
from the first listing), timestamps, the `--since` day (the first of the session's month) and
the host (`vm`). psql aligns its columns to the widths of the timestamps it prints, so its
spacing is not compared. `...` in a sample stands for any text (a shortened config).

A sample that no longer reproduces fails here.
`DOCS_UPDATE=1 pytest tests/docs/test_docs_auditor.py` writes the real outputs into the page
for the samples that differ (then read the diff).

Blocks marked `<!-- session: NAME -->` are replayed at another point of the session than their
place on the page: `before the runs` (placing and releasing holds) and `after a write-back` (one
cleaned sms gets its msisdn back: a violation).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention import config
from dispatch_retention.demo import cycle
from dispatch_retention.pg import engines
from tests.helpers import AMBIENT, db_now, fresh_database, granted_role, invoke

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "auditor.md"
CONFIG = "config/retention.toml"  # as the page exports it, relative to the checkout
ROWS = 2000
BEFORE_RUNS, AFTER_WRITE_BACK = "before the runs", "after a write-back"

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:[+-]\d{2}(?::\d{2})?|Z)?"
)
SINCE = re.compile(r"(--since )\d{4}-\d{2}-\d{2}")
MARKER = re.compile(r"<!-- session: (.+?) -->\s*$")


@dataclass(frozen=True)
class Command:
    """One `$ ...` line of a console sample (continued while its quotes are open) and the
    output the page shows under it."""

    block: int
    session: str | None
    line: str
    shown: str


def sample_session(doc: str) -> list[Command]:
    """The console samples of the page, command by command, in the page's order."""
    commands: list[Command] = []
    for block, match in enumerate(re.finditer(r"```console\n(.*?)```", doc, re.S)):
        marker = MARKER.search(doc[: match.start()])
        session = marker.group(1) if marker else None
        lines = match.group(1).splitlines()
        i = 0
        while i < len(lines):
            assert lines[i].startswith("$ "), f"block {block}: output before a command"
            line = lines[i][2:]
            i += 1
            while not _complete(line):
                line += "\n" + lines[i]
                i += 1
            shown: list[str] = []
            while i < len(lines) and not lines[i].startswith("$ "):
                shown.append(lines[i])
                i += 1
            commands.append(Command(block, session, line, "\n".join(shown).strip("\n")))
    return commands


def _complete(line: str) -> bool:
    try:
        shlex.split(line)
    except ValueError:  # a quote still open: the command goes on on the next line
        return False
    return True


COMMANDS = sample_session(DOC.read_text(encoding="utf-8"))


# --- the session -----------------------------------------------------------------------------


#: A time zone far from UTC (+14 h), the server's default for the replayed session.
AWAY = "Pacific/Kiritimati"
#: What the page exports for psql: its queries then read every stamp in UTC.
PAGE_ENV = {"PGTZ": "UTC"}


def test_the_page_sets_the_time_zone_its_queries_assume() -> None:
    """The replay gives psql PAGE_ENV because the page exports it."""
    for name, value in PAGE_ENV.items():
        assert f"export {name}={value}" in DOC.read_text(encoding="utf-8")


class Shell:
    """The commands of the page, as a reviewer types them: the console script in-process
    (with the page's environment), psql as a subprocess, a redirect, `cat` and `echo $?`."""

    def __init__(self, workdir: Path, ro_url: str) -> None:
        self.workdir, self.ro_url = workdir, ro_url
        self.status = 0
        self.month_start = ""  # the first day of the session's month, for `--since`
        self.written_back = False
        self.ids: dict[str, str] = {}  # the page's run ids -> the session's

    def run(self, line: str) -> str:
        for page_id, real_id in self.ids.items():
            line = line.replace(page_id, real_id)
        line = SINCE.sub(rf"\g<1>{self.month_start}", line)
        argv = shlex.split(line)
        into = None
        if len(argv) > 2 and argv[-2] == ">":
            argv, into = argv[:-2], self.workdir / argv[-1]
        if argv[0] == "dispatch-retention":
            result = invoke(*argv[1:])
            self.status, out = result.exit_code, result.stdout
        elif argv[:2] == ["psql", "$RO_URL"] and argv[2] == "-c" and len(argv) == 4:
            out = self.psql(argv[3])
        elif argv == ["echo", "$?"]:
            out = f"{self.status}\n"
        elif argv[0] == "cat" and len(argv) == 2:
            out = (self.workdir / argv[1]).read_text(encoding="utf-8")
        else:
            raise AssertionError(f"the test cannot replay `{line}`: teach Shell.run")
        if into is not None:
            into.write_text(out, encoding="utf-8")
            return ""
        return out

    def psql(self, query: str) -> str:
        psql = shutil.which("psql")
        assert psql, "psql (postgresql-client) is needed to replay docs/auditor.md"
        done = subprocess.run(
            [psql, self.ro_url, "-c", query],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env={**os.environ, "PSQLRC": os.devnull, "PAGER": "", **PAGE_ENV},
        )
        assert done.returncode == 0, done.stderr
        self.status = done.returncode
        return done.stdout


@pytest.fixture(scope="module")
def session(server_url: URL, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Every command of the page replayed once, in the page's order (the marked blocks where
    their marker says): the real output of each, by the index of COMMANDS."""
    with fresh_database(server_url) as url:  # empty: cycle.prepare creates the table
        outputs = replay(url, tmp_path_factory.mktemp("auditor"))
    yield outputs
    _update_doc(outputs)


def replay(url: URL, workdir: Path) -> list[str]:
    """Prepare the database as the page says, then run its commands (in the page's
    environment: the shipped config, the read-only role's URL in DATABASE_URL_FILE)."""
    engine = engines.make_engine(url)
    owner = url.set(drivername="postgresql").render_as_string(hide_password=False)
    outputs = [""] * len(COMMANDS)
    with contextlib.ExitStack() as stack:
        stack.callback(engine.dispose)
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for variable in AMBIENT:
            patch.delenv(variable, raising=False)
        patch.chdir(ROOT)
        patch.setattr(socket, "gethostname", lambda: "vm")
        patch.setenv("DISPATCH_RETENTION_CONFIG", CONFIG)
        settings = config.load(CONFIG)
        # A server whose default time zone is not UTC (README "Real tables": the page's
        # queries must not depend on it; the page sets PGTZ for psql, the job sets UTC).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"ALTER DATABASE \"{url.database}\" SET TimeZone = '{AWAY}'"))
        cycle.prepare(engine, settings, ROWS)
        # upgrading, placing holds and running need more rights than the reviewer's role
        patch.setenv("DATABASE_URL", owner)
        assert invoke("db", "upgrade").exit_code == 0
        _, ro_url = stack.enter_context(granted_role(engine, url, "read-only", settings))
        shell = Shell(workdir, ro_url)
        placed = invoke(
            "hold", "add", "12", "--reason", "case 2026-017: complaint review",
            "--by", "j.berg (DPO office)",
        )  # fmt: skip
        assert placed.exit_code == 0, placed.output
        for i, command in enumerate(COMMANDS):
            if command.session == BEFORE_RUNS:
                outputs[i] = shell.run(command.line)
        manual = invoke("run", "--max-rows", "500")
        assert manual.exit_code == 0, manual.output
        nightly = invoke("run", env={"DISPATCH_RETENTION_TRIGGER": "cron"})
        assert nightly.exit_code == 0, nightly.output
        shell.month_start = db_now(engine).date().replace(day=1).isoformat()

        patch.delenv("DATABASE_URL")
        (workdir / "ro.url").write_text(ro_url, encoding="utf-8")
        patch.setenv("DATABASE_URL_FILE", str(workdir / "ro.url"))
        for i, command in enumerate(COMMANDS):
            assert command.session in (None, BEFORE_RUNS, AFTER_WRITE_BACK), command.session
            if command.session == BEFORE_RUNS:
                continue
            if command.session == AFTER_WRITE_BACK and not shell.written_back:
                write_back_one_msisdn(engine)
                shell.written_back = True
            outputs[i] = shell.run(command.line)
            if not shell.ids:  # the first listing: the page's run ids stand for these
                shown, real = _uuids(command.shown), _uuids(outputs[i])
                assert len(shown) == len(real), (command.shown, outputs[i])
                shell.ids = dict(zip(shown, real, strict=True))
        return [_page_ids(out, shell.ids) for out in outputs]


def write_back_one_msisdn(engine: Engine) -> None:
    """The page's violation: the first cleaned sms gets an msisdn again."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE dispatches SET msisdn = '+4740000000' WHERE id = (SELECT min(id)"
                " FROM dispatches WHERE type = 'sms' AND cleaned_at IS NOT NULL)"
            )
        )


def _uuids(output: str) -> list[str]:
    return list(dict.fromkeys(UUID.findall(output)))


def _page_ids(output: str, ids: dict[str, str]) -> str:
    for page_id, real_id in ids.items():
        output = output.replace(real_id, page_id)
    return output.strip("\n")


# --- comparing -------------------------------------------------------------------------------


def normalised(output: str, psql: bool) -> str:
    output = TIMESTAMP.sub("<time>", output)
    if psql:  # its column widths follow the timestamps' (trailing zeros are trimmed)
        output = re.sub(r"-{2,}", "--", re.sub(r"[ \t]+", " ", output))
        output = "\n".join(line.strip() for line in output.splitlines())
    return output


def matches(shown: str, real: str, psql: bool) -> bool:
    """`real` is what the page shows, but for what must vary; `...` stands for any text."""
    pattern = "[\\s\\S]*?".join(re.escape(part) for part in normalised(shown, psql).split("..."))
    return re.fullmatch(pattern, normalised(real, psql)) is not None


def _update_doc(outputs: list[str]) -> None:
    """DOCS_UPDATE=1: write the real output into the page where a sample differs."""
    if not os.environ.get("DOCS_UPDATE"):
        return
    doc = DOC.read_text(encoding="utf-8")
    for command, real in zip(COMMANDS, outputs, strict=True):
        if command.shown and not matches(command.shown, real, _is_psql(command)):
            old = f"$ {command.line}\n{command.shown}\n"
            assert doc.count(old) == 1, f"cannot place the output of `{command.line}`"
            shown = "\n".join(line.rstrip() for line in real.splitlines())  # psql pads
            doc = doc.replace(old, f"$ {command.line}\n{shown}\n")
    DOC.write_text(doc, encoding="utf-8")


def _is_psql(command: Command) -> bool:
    return command.line.startswith("psql ")


# --- the tests -------------------------------------------------------------------------------


def test_the_page_has_a_sample_session() -> None:
    """The page's console samples parse into commands, and the session reaches every kind."""
    lines = [c.line.split()[0:3] for c in COMMANDS]
    assert ["dispatch-retention", "audit", "list"] in lines
    assert ["dispatch-retention", "verify"] in [line[:2] for line in lines]
    assert any(c.session == BEFORE_RUNS for c in COMMANDS)
    assert any(c.session == AFTER_WRITE_BACK for c in COMMANDS)


@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, id=f"{i:02d}-{re.sub(r'[^a-z0-9]+', '-', c.line[:48].lower()).strip('-')}")
        for i, c in enumerate(COMMANDS)
    ],
)
def test_sample_output_is_what_the_job_prints(session: list[str], index: int) -> None:
    """The output the page shows under this command is what it prints on the session's data."""
    command = COMMANDS[index]
    assert matches(command.shown, session[index], _is_psql(command)), (
        f"docs/auditor.md, `$ {command.line}` shows\n{command.shown}\n\nbut it prints\n"
        f"{session[index]}\n(DOCS_UPDATE=1 rewrites the sample)"
    )
