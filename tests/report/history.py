"""A history of simulated days for the report's tests and its screenshot (`make
report-screenshot`): written on a PostgreSQL of its own whose processes run under
libfaketime, the offset read from a file before every clock read (FAKETIME_TIMESTAMP_FILE,
FAKETIME_NO_CACHE), moved forward between the runs. The job reads only the database clock, so
its runs, chunks and holds fall on those days. The history: an `incomplete` run (a row
budget), a `refused` one (a guard), a `cancelled` one (declined at the prompt), an
`interrupted` one (SIGTERM), one killed (SIGKILL: the next run marks it `abandoned`), a
`failed` one (a trigger of the table's owner raises), a `succeeded` one; two legal holds, one
released; rows no policy matches; and rows that became due after the last run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from dispatch_retention import config
from dispatch_retention.config import Target
from dispatch_retention.demo.synthetic import create_dispatches
from dispatch_retention.pg import engines
from dispatch_retention.trail import migrate
from tests.cli.test_terminal import on_terminal
from tests.helpers import DAY, MARK, Job, db_now, dispatch, insert_rows, invoke, write_config
from tests.matrix import servers
from tests.run.test_replica_lag import _binaries

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

POLICIES = """
[[policy]]
name = "failed-sends"
retention_days = 30
where = { transmission_status = "failed" }
legal_basis = "GDPR Art. 6(1)(f) <legitimate interests> & support"

[[policy]]
name = "sms"
retention_days = 90
where = { type = "sms" }

[[policy]]
name = "email"
retention_days = 365
where = { type = "email" }
"""  # no policy for push: those rows are unmatched
CONFIG = f"[clean]\nchunk_size = 10\n[evidence]\nbackup_retention_days = 35\n{POLICIES}"
HELD, RELEASED = 1001, 1002


@dataclass
class History:
    engine: Engine  # the owner (a superuser of the history's server)
    url: URL
    config: Path
    since: str  # the report's --since


@contextlib.contextmanager
def clocked_server(clock: Path) -> Iterator[servers.Server]:
    """A throwaway server whose clock is the real one shifted by what `clock` holds."""
    env = {
        "LD_PRELOAD": str(FAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    with servers.server(_binaries(), 0, env=env) as server:
        yield server


def set_clock(clock: Path, days_ago: int) -> None:
    clock.write_text(f"-{days_ago}d\n")


@contextlib.contextmanager
def made(folder: Path) -> Iterator[History]:
    """The history, on its own server (stopped and removed after); its files in `folder`."""
    fd, name = tempfile.mkstemp(prefix="dr-clock-")  # in /tmp: the server's account reads it
    os.close(fd)
    clock = Path(name)
    clock.chmod(0o644)
    set_clock(clock, 10)
    try:
        with clocked_server(clock) as server:
            admin = create_engine(engines.parse_url(server.url), isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text("CREATE DATABASE history"))
            admin.dispose()
            url = engines.parse_url(server.url).set(database="history")
            engine = create_engine(url)
            cfg = write_config(folder / "retention.toml", CONFIG)
            since = _write_history(engine, url, cfg, clock, folder)
            yield History(engine, url, cfg, since)
            engine.dispose()
    finally:
        clock.unlink(missing_ok=True)


def _write_history(engine: Engine, url: URL, cfg: Path, clock: Path, folder: Path) -> str:
    s = config.load(str(cfg))
    with engine.begin() as conn:
        create_dispatches(conn, Target())
    migrate.upgrade(engine, s.audit.schema_)
    owner = url.render_as_string(hide_password=False)
    base = ["--config", str(cfg), "--database-url", owner]
    now = db_now(engine)
    since = (now - DAY).strftime("%Y-%m-%d")
    rows = [dispatch(i, now - 200 * DAY, type="sms", member_id=1000 + i) for i in range(1, 61)]
    rows += [dispatch(i, now - 400 * DAY, type="email") for i in range(61, 81)]
    rows += [dispatch(i, now - 500 * DAY, type="push") for i in range(81, 86)]  # unmatched
    # due 3 days from now: the last run cleans them
    rows += [dispatch(i, now - 87 * DAY, type="sms") for i in range(86, 96)]
    insert_rows(engine, rows)
    assert invoke(*base, "hold", "add", str(HELD), "--reason", "case 1").exit_code == 0
    assert invoke(*base, "hold", "add", str(RELEASED), "--reason", "case 2").exit_code == 0

    assert invoke(*base, "run", "--yes", "--max-rows", "30").exit_code == 0  # incomplete
    set_clock(clock, 9)
    refusing = write_config(
        folder / "refusing.toml",
        CONFIG.replace("[evidence]", "[guard]\nrefuse_above_rows = 5\n[evidence]"),
    )
    refused = invoke("--config", str(refusing), "--database-url", owner, "run", "--yes")
    assert refused.exit_code == 4, refused.output
    set_clock(clock, 8)
    assert invoke(*base, "hold", "release", str(RELEASED)).exit_code == 0
    code, seen = on_terminal([*base, "run"], "n")  # cancelled
    assert code == 0 and "cancelled" in seen, seen
    set_clock(clock, 7)
    paused = write_config(
        folder / "paused.toml", CONFIG.replace("[clean]", "[clean]\npause_between_chunks_ms = 3000")
    )
    job = Job(owner, paused, "run", "--yes", "--chunk-size", "5")
    job.wait_for("chunk_committed", seq=1)
    job.send(signal.SIGTERM)
    assert job.finish(30) == 143, job.stderr  # interrupted
    set_clock(clock, 6)
    job = Job(owner, paused, "run", "--yes", "--chunk-size", "5")
    job.wait_for("chunk_committed", seq=1)
    job.send(signal.SIGKILL)  # left running: the next run marks it abandoned
    job.finish(30)
    set_clock(clock, 5)
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"RAISE EXCEPTION 'no cleaning of %', '{MARK}-secret'; END $$"
        ))  # fmt: skip
        conn.execute(text("CREATE TRIGGER refuse BEFORE UPDATE ON dispatches "
                          "FOR EACH ROW EXECUTE FUNCTION refuse()"))  # fmt: skip
    failed = invoke(*base, "run", "--yes")
    assert failed.exit_code == 1, failed.output
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse ON dispatches"))
        conn.execute(text("DROP FUNCTION refuse()"))
    set_clock(clock, 4)
    assert invoke(*base, "run", "--yes").exit_code == 0  # succeeded
    now = db_now(engine)
    # due 2 days from now, and no run after: more than a day overdue when the report is made
    insert_rows(engine, [dispatch(i, now - 88 * DAY, type="sms") for i in range(96, 103)])
    set_clock(clock, 1)
    return since
