"""`report` on a history of simulated days (CONTRACT section 10): every figure of the HTML and
the JSON equals what a query of the audit tables and the dispatches gives, computed here
apart from the job (an oracle, not a snapshot of the report itself); no personal data in
either; the read-only role's report equals the owner's; an empty history reports too.

The days are real days of a server's clock: the history is written on a PostgreSQL of its own
whose processes run under libfaketime, the offset read from a file before every clock read
(FAKETIME_TIMESTAMP_FILE, FAKETIME_NO_CACHE), moved forward between the runs. The job reads
only the database clock, so its runs, chunks and holds fall on those days. The history: an
`incomplete` run (a row budget), a `refused` one (a guard), a `cancelled` one (declined at the
prompt), an `interrupted` one (SIGTERM), one killed (SIGKILL: the next run marks it
`abandoned`), a `failed` one (a trigger of the table's owner raises), a `succeeded` one; two
legal holds, one released; rows no policy matches; and rows that became due after the last
run, which the report's check finds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from dispatch_retention import config
from dispatch_retention.config import Target
from dispatch_retention.demo.synthetic import create_dispatches
from dispatch_retention.pg import engines
from dispatch_retention.trail import migrate
from tests import oracle
from tests.cli.test_terminal import on_terminal
from tests.helpers import (
    DAY,
    MARK,
    Job,
    assert_no_marker,
    db_now,
    dispatch,
    granted_role,
    insert_rows,
    invoke,
    snapshot,
    write_config,
)
from tests.matrix import servers
from tests.run.test_replica_lag import _binaries

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
pytestmark = pytest.mark.skipif(
    not FAKETIME.exists(), reason="install Debian's faketime (.ci/run does)"
)

POLICIES = """
[[policy]]
name = "failed-sends"
retention_days = 30
where = { transmission_status = "failed" }
legal_basis = "Art. 6(1)(f) <b>bold</b> & more"

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
TOLERANCE = timedelta(hours=24)


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


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
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
            folder = tmp_path_factory.mktemp("history")
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


# --- the oracle: the audit tables and the dispatches, read here -----------------------------


def expected(h: History) -> dict[str, Any]:
    s = config.load(str(h.config))
    with h.engine.connect() as conn:
        now = conn.execute(text("SELECT now()")).scalar_one()
        since = datetime.fromisoformat(h.since + "T00:00:00+00:00")
        runs = conn.execute(
            text("SELECT run_id::text, status, started_at FROM dispatch_retention.runs "
                 "WHERE started_at >= :s ORDER BY started_at"), {"s": since}
        ).all()  # fmt: skip
        chunks = conn.execute(
            text("SELECT run_id::text, rows, kind, cleaned_at, by_policy "
                 "FROM dispatch_retention.chunks")
        ).all()  # fmt: skip
        holds = conn.execute(
            text("SELECT hold_id, member_id, released_at FROM dispatch_retention.legal_holds")
        ).all()
        head = conn.execute(text("SELECT hash FROM dispatch_retention.events_head")).scalar_one()
    per_day: Counter[tuple[str, str]] = Counter()
    cleaned_by_run: Counter[str] = Counter()
    for run_id, n, kind, at, by_policy in chunks:
        if kind == "clean":
            cleaned_by_run[run_id] += n
            if at >= since:
                for policy, rows in by_policy.items():
                    per_day[(at.astimezone(UTC).strftime("%Y-%m-%d"), policy)] += rows
    held = {m for _, m, released in holds if released is None}
    violations: Counter[str] = Counter()
    held_rows = unmatched = 0
    for row in snapshot(h.engine).values():
        binding = oracle.binding_policy(row, s)
        if binding is None:
            unmatched += 1
        elif row["cleaned_at"] is None and oracle.is_due(row, s, now - TOLERANCE):
            if row["member_id"] in held:
                held_rows += 1
            else:
                violations[binding.name] += 1
    return {
        "statuses": Counter(str(status) for _, status, _ in runs),
        "run_ids": [r for r, _, _ in runs],
        "cleaned_by_run": cleaned_by_run,
        "per_day": per_day,
        "violations": violations,
        "held_rows": held_rows,
        "unmatched": unmatched,
        "active_holds": sorted(h_id for h_id, _, released in holds if released is None),
        "released_holds": sorted(h_id for h_id, _, released in holds if released is not None),
        "head": head,
    }


def report(h: History, *args: str, url: str | None = None) -> str:
    target = url or h.url.render_as_string(hide_password=False)
    done = invoke("--config", str(h.config), "--database-url", target, "report",
                  "--since", h.since, *args)  # fmt: skip
    assert done.exit_code == 0, done.output
    return done.stdout


# --- the HTML, read back as tables ----------------------------------------------------------


class Tables(HTMLParser):
    """Each <section id>'s tables, as rows of cell texts; and every <svg> met."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[list[list[str]]]] = {}
        self.section = ""
        self.cell: list[str] | None = None
        self.svgs = 0
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self.section = dict(attrs).get("id") or ""
        elif tag == "table":
            self.sections.setdefault(self.section, []).append([])
        elif tag == "tr":
            self.sections[self.section][-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "svg":
            self.svgs += 1
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.sections[self.section][-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def tables(page: str) -> Tables:
    parsed = Tables()
    parsed.feed(page)
    return parsed


def body(table: list[list[str]]) -> list[list[str]]:
    return [row for row in table[1:] if len(row) > 1]


# --- the tests ---------------------------------------------------------------------------------


def test_the_json_holds_what_the_trail_and_the_table_say(history: History) -> None:
    want = expected(history)
    pack = json.loads(report(history, "--format", "json"))
    assert pack["format"] == "dispatch-retention-evidence/1"
    runs = pack["runs"]
    assert Counter(runs["by_status"]) == want["statuses"]
    assert set(want["statuses"]) == {
        "incomplete", "refused", "cancelled", "interrupted", "abandoned", "failed", "succeeded"
    }  # fmt: skip
    assert [r["run_id"] for r in runs["timeline"]] == want["run_ids"]
    assert {r["run_id"]: r["rows_cleaned"] for r in runs["timeline"]} == {
        r: want["cleaned_by_run"].get(r, 0) for r in want["run_ids"]
    }
    assert {(d["day"], d["policy"]): d["rows"] for d in runs["cleaned_per_day"]} == dict(
        want["per_day"]
    )
    assert len({d["day"] for d in runs["cleaned_per_day"]}) >= 3  # the simulated days
    assert {f["status"] for f in runs["failures"]} >= {"failed", "refused", "abandoned"}
    assert all(f["reason"] for f in runs["failures"] if f["status"] in ("failed", "refused"))
    verify = pack["verify"]
    assert {v["policy"]: v["rows"] for v in verify["violations"]} == dict(want["violations"])
    assert verify["violation_rows"] > 0 and not pack["verdict"]["ok"]
    assert (
        verify["held_rows"] == want["held_rows"] and verify["unmatched_rows"] == want["unmatched"]
    )
    exceptions = pack["exceptions"]
    assert [x["hold_id"] for x in exceptions["active_holds"]] == want["active_holds"]
    assert [x["hold_id"] for x in exceptions["released_holds"]] == want["released_holds"]
    assert all(
        "member_id" not in x for x in exceptions["active_holds"] + exceptions["released_holds"]
    )
    assert pack["audit_chain"]["ok"] and pack["header"]["chain_head"] == want["head"]
    assert pack["backups"]["retention_days"] == 35 and "until" in pack["backups"]["statement"]
    assert pack["erasure_requests"]["requests"] == []
    recorded = [r for r in runs["timeline"] if r["oldest_due_age_days"] is not None]
    assert recorded and all(r["oldest_due_age_days"] > 87 for r in recorded)
    assert_no_marker(json.dumps(pack))


def test_the_html_shows_the_same_figures(history: History) -> None:
    want = expected(history)
    page = report(history)
    found = tables(page)
    assert found.scripts == 0 and found.svgs == 2
    assert "Content-Security-Policy" in page and "http://" not in page.replace(
        "http://www.w3.org/", ""
    ).replace("http-equiv", "")
    per_day, timeline, failures = found.sections["runs"]
    assert {(r[0], r[1]): int(r[2]) for r in body(per_day)} == dict(want["per_day"])
    assert len(body(timeline)) == len(want["run_ids"])
    assert Counter(r[1] for r in body(timeline)) == want["statuses"]
    assert sum(int(r[4]) for r in body(timeline)) == sum(
        want["cleaned_by_run"].get(r, 0) for r in want["run_ids"]
    )
    assert {r[2] for r in body(failures)} >= {"failed", "refused", "abandoned"}
    violations = found.sections["verify"][0]
    assert {r[0]: int(r[1]) for r in body(violations)} == {
        name: want["violations"].get(name, 0) for name in ("failed-sends", "sms", "email")
    }
    holds_active, holds_released, _risks = found.sections["exceptions"]
    assert [int(r[0]) for r in body(holds_active)] == want["active_holds"]
    assert [int(r[0]) for r in body(holds_released)] == want["released_holds"]
    assert want["head"] in page
    assert "Attention:" in page and "past their retention window" in page
    # a text from the config is escaped, never markup
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page and "<b>bold</b>" not in page
    assert_no_marker(page)


def test_member_ids_only_when_asked(history: History) -> None:
    without = json.loads(report(history, "--format", "json"))
    asked = json.loads(report(history, "--format", "json", "--include-member-ids"))
    assert [x.get("member_id") for x in without["exceptions"]["active_holds"]] == [None]
    assert [x["member_id"] for x in asked["exceptions"]["active_holds"]] == [HELD]
    assert str(HELD) not in report(history).split("Active legal holds", 1)[1].split("</table>")[0]


def _comparable(pack: dict[str, Any]) -> dict[str, Any]:
    pack["header"].pop("generated_at")
    pack["header"]["period"].pop("until")
    pack["verify"].pop("checked_at")
    return pack


def test_the_read_only_roles_report_equals_the_owners(history: History) -> None:
    owners = json.loads(report(history, "--format", "json"))
    with granted_role(history.engine, history.url, "read-only") as (_, url):
        readers = json.loads(report(history, "--format", "json", url=url))
    assert _comparable(readers) == _comparable(owners)


def test_the_report_is_written_with_its_sha256_and_writes_nothing_to_the_database(
    history: History, tmp_path: Path
) -> None:
    with history.engine.connect() as conn:
        before = conn.execute(text("SELECT hash FROM dispatch_retention.events_head")).scalar_one()
    out = tmp_path / "report.html"
    owner = history.url.render_as_string(hide_password=False)
    done = invoke(
        "--config", str(history.config), "--database-url", owner, "report", "--output", str(out)
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digest in done.stdout
    assert (tmp_path / "report.html.sha256").read_text() == f"{digest}  report.html\n"
    with history.engine.connect() as conn:
        after = conn.execute(text("SELECT hash FROM dispatch_retention.events_head")).scalar_one()
    assert after == before


def test_an_empty_history_reports_too(engine: Engine, base: list[str]) -> None:
    done = invoke(*base, "report", "--format", "json")
    assert done.exit_code == 0, done.output
    pack = json.loads(done.stdout)
    assert pack["runs"]["count"] == 0 and pack["runs"]["cleaned_per_day"] == []
    assert pack["verdict"]["ok"] and pack["backups"]["retention_days"] is None
    page = invoke(*base, "report")
    assert page.exit_code == 0 and "no run in the period" in page.stdout


def test_a_since_in_the_future_is_a_usage_error(base: list[str]) -> None:
    done = invoke(*base, "report", "--since", "2999-01-01")
    assert done.exit_code == 2 and "--since" in done.stderr
