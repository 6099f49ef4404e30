"""The audit trail on a real PostgreSQL (CONTRACT section 6, issue 3): atomic chunk records,
abandoned and concurrent runs, verify, legal holds, audit list/show, and no personal data in
the job's own tables or in anything the commands print.

The CLI runs in-process through click's CliRunner (stdout and stderr captured apart) where
that proves the point, and as the installed console script in real subprocesses where the
issue asks for real processes (SIGKILL, two runs racing for the lock).
"""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result
from sqlalchemy import Engine, event, text

from dispatch_retention import audit, holds, job
from dispatch_retention.cli import cli
from dispatch_retention.config import DEFAULT_CLEAN_COLUMNS
from dispatch_retention.lock import RunLock, run_locks
from dispatch_retention.output import LIST_COLUMNS
from dispatch_retention.schema import AuditTables
from dispatch_retention.vocabulary import Hooks, Options, Request, Stop

from .helpers import (
    MARK,
    assert_no_marker,
    config_text,
    db_now,
    dispatch,
    insert_rows,
    settings,
    snapshot,
    write_config,
)

SCRIPT = Path(sys.executable).parent / "dispatch-retention"
SCHEMA = "dispatch_retention"
TABLES = AuditTables(SCHEMA)
DAY = timedelta(days=1)
WHOLE_TARGET = run_locks("public.dispatches", None)  # the locks a run without --shard takes
STRIPPED = {"content": {}, "msisdn": None, "email": None, "app_token": None}


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ambient URL, config or trigger; structlog restored after the CLI reconfigured it."""
    for name in (
        "DATABASE_URL",
        "DATABASE_URL_FILE",
        "DISPATCH_RETENTION_CONFIG",
        "DISPATCH_RETENTION_TRIGGER",
    ):
        monkeypatch.delenv(name, raising=False)
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)  # CliRunner's stderr is closed once the invocation ends


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "retention.toml", config_text())


@pytest.fixture
def base(config_file: Path, url_string: str) -> list[str]:
    """The global options every command of a test gets: its config and its database."""
    return ["--config", str(config_file), "--database-url", url_string]


# --- running the CLI -------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI in-process; `result.stdout` and `result.stderr` apart."""
    return CliRunner().invoke(cli, list(args), prog_name="dispatch-retention", env=env)


def script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed console script in a real subprocess (stderr is not a tty: JSON logs)."""
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def spawn(*args: str, **streams: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([str(SCRIPT), *args], text=True, **streams)


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def read_until_first_chunk(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Log events of a running subprocess up to and including its first committed chunk."""
    assert proc.stderr is not None
    seen: list[dict[str, Any]] = []
    for line in proc.stderr:  # ends at EOF if the run never commits a chunk
        seen.append(json.loads(line))
        if seen[-1]["event"] == "chunk_committed":
            return seen
    raise AssertionError(f"the run ended before committing a chunk: {seen}")


# --- seeding and reading the database --------------------------------------------------------

BULK_SQL = """
INSERT INTO dispatches (id, type, content, member_id, msisdn, email, app_token,
    transmission_status, delivery_status, external_delivery_status,
    created_at, updated_at, scheduled_at, transmitted_at, delivered_at)
SELECT g, (ARRAY['sms', 'email', 'push'])[1 + g % 3],
    jsonb_build_object('body', :mark || '-content-' || g), 1000 + g % 97,
    '+47' || :mark || g, :mark || '.' || g || '@example.invalid', :mark || '-token-' || g,
    CASE WHEN g % 7 = 0 THEN 'failed' ELSE 'transmitted' END, 'delivered', 'delivered',
    ts, ts, ts, ts, ts
FROM generate_series(1, CAST(:n AS bigint)) AS g,
    LATERAL (SELECT now() - CASE WHEN g % 10 = 0 THEN interval '5 days'
                                 ELSE interval '500 days' END AS ts) AS t
"""


def bulk_seed(engine: Engine, n: int) -> int:
    """n marked dispatches in one statement: every tenth young, the rest due; returns #due."""
    with engine.begin() as conn:
        conn.execute(text(BULK_SQL), {"n": n, "mark": MARK})
    return n - n // 10


def expected_policy(row: dict[str, Any]) -> str:
    """The binding policy of a dispatch under the default test policies (shortest wins)."""
    if row["transmission_status"] == "failed":
        return "failed-sends"
    return "sms" if row["type"] == "sms" else "default"


def chunk_records(engine: Engine, run_id: str | None = None) -> list[dict[str, Any]]:
    sql = f"SELECT * FROM {SCHEMA}.chunks" + (" WHERE run_id = :r" if run_id else "")
    with engine.connect() as conn:
        return [
            dict(r) for r in conn.execute(text(sql + " ORDER BY seq"), {"r": run_id}).mappings()
        ]


def run_records(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT * FROM {SCHEMA}.runs")).mappings()
        return {str(r["run_id"]): dict(r) for r in rows}


def cleaned_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM dispatches WHERE cleaned_at IS NOT NULL")
            ).scalar_one()
        )


def assert_chunks_account_for_every_cleaned_row(engine: Engine) -> None:
    """The chunk records partition the cleaned dispatches exactly, policy by policy."""
    rows = snapshot(engine)
    cleaned = {i for i, r in rows.items() if r["cleaned_at"] is not None}
    chunks = chunk_records(engine)
    assert sum(c["rows"] for c in chunks) == len(cleaned)
    recovered: set[int] = set()
    for c in chunks:
        members = {
            i
            for i in range(c["first_id"], c["last_id"] + 1)
            if i in rows and rows[i]["cleaned_at"] == c["cleaned_at"]
        }
        assert len(members) == c["rows"], f"chunk {c['run_id']}/{c['seq']}"
        assert Counter(expected_policy(rows[i]) for i in members) == Counter(c["by_policy"])
        assert not members & recovered, "two chunk records claim the same dispatch"
        recovered |= members
    assert recovered == cleaned


def assert_nothing_half_cleaned(engine: Engine) -> None:
    """Personal columns are all stripped if and only if cleaned_at is set."""
    for row_id, row in snapshot(engine).items():
        stripped = {c: row[c] for c in DEFAULT_CLEAN_COLUMNS} == STRIPPED
        untouched = all(MARK in json.dumps(row[c]) for c in DEFAULT_CLEAN_COLUMNS)
        if row["cleaned_at"] is None:
            assert untouched, f"row {row_id} lost personal data without cleaned_at"
        else:
            assert stripped, f"row {row_id} is half cleaned"
            assert row["updated_at"] == row["cleaned_at"]


def wait_for_lock_release(engine: Engine, timeout: float = 10) -> None:
    """Until the server has noticed that a killed process's session (and lock) is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with RunLock(engine, WHOLE_TARGET) as lock:
            if lock.acquired:
                return
        time.sleep(0.05)
    raise AssertionError("the advisory lock of the killed run was never released")


# --- 1. atomicity ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failing", [pytest.param(1, id="first-chunk"), pytest.param(3, id="third-chunk")]
)
def test_failure_before_commit_leaves_neither_rows_nor_chunk_record(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """A failure after a chunk's UPDATE and audit insert rolls back both; totals stay exact."""
    now = db_now(engine)
    insert_rows(
        engine,
        (
            dispatch(
                i,
                now - (5 * DAY if i % 4 == 0 else 500 * DAY),
                type=("sms", "email", "push")[i % 3],
                transmission_status="failed" if i % 5 == 0 else "transmitted",
            )
            for i in range(1, 41)
        ),
    )
    inserted_in_transaction: list[tuple[int, int]] = []
    original = audit.RunRecord.record_chunk

    def spy(record: audit.RunRecord, conn: Any, chunk: Any) -> None:
        original(record, conn, chunk)
        seen = conn.execute(
            text(f"SELECT count(*) FROM {SCHEMA}.chunks WHERE run_id = :r AND seq = :s"),
            {"r": record.run_id, "s": chunk.seq},
        ).scalar_one()
        inserted_in_transaction.append((chunk.seq, seen))

    def fail(seq: int) -> None:
        if seq == failing:
            raise RuntimeError("injected after the UPDATE and the audit insert")

    monkeypatch.setattr(audit.RunRecord, "record_chunk", spy)
    s = settings()
    before = snapshot(engine)
    outcome = job.run(
        engine, s, Request(Options(chunk_size=5)), stop=Stop(), hooks=Hooks(fail_in_chunk=fail)
    )

    assert outcome.status == "failed"
    assert (failing, 1) in inserted_in_transaction  # the audit row existed inside the chunk
    assert run_records(engine)[outcome.run_id]["status"] == "failed"
    chunks = chunk_records(engine, outcome.run_id)
    assert [c["seq"] for c in chunks] == list(range(1, failing))
    after = snapshot(engine)
    window = range(1 + 5 * (failing - 1), 1 + 5 * failing)  # chunk N's id window
    assert all(after[i] == before[i] for i in window), "the failed chunk's rows changed"
    assert sum(c["rows"] for c in chunks) == cleaned_count(engine) == outcome.rows_cleaned
    assert_chunks_account_for_every_cleaned_row(engine)

    monkeypatch.undo()
    rerun = job.run(engine, s, Request(Options(chunk_size=7)), stop=Stop())
    assert rerun.status == "succeeded"
    for run_id, run in run_records(engine).items():
        assert sum(c["rows"] for c in chunk_records(engine, run_id)) == (
            outcome.rows_cleaned if run_id == outcome.run_id else rerun.rows_cleaned
        ), run["status"]
    assert cleaned_count(engine) == sum(1 for i in before if i % 4) == 30
    assert_chunks_account_for_every_cleaned_row(engine)
    assert_nothing_half_cleaned(engine)


# --- 2. a killed run -------------------------------------------------------------------------

BACKLOG = 20_000


def test_sigkilled_run_is_marked_abandoned_and_the_next_run_finishes(
    engine: Engine, base: list[str]
) -> None:
    """SIGKILL mid-run leaves `running`; the next run marks it abandoned and cleans the rest."""
    due = bulk_seed(engine, BACKLOG)
    proc = spawn(
        *base, "run", "--chunk-size", "10", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        seen = read_until_first_chunk(proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed = seen[0]["run_id"]
    wait_for_lock_release(engine)

    assert run_records(engine)[killed]["status"] == "running"
    committed = sum(c["rows"] for c in chunk_records(engine, killed))
    assert 0 < committed < due, "the kill arrived after the run had finished"
    assert cleaned_count(engine) == committed
    assert_nothing_half_cleaned(engine)

    nxt = script(*base, "run")
    assert nxt.returncode == 0, nxt.stderr
    logged = events(nxt.stderr)
    [abandoned] = [e for e in logged if e["event"] == "runs_abandoned"]
    assert abandoned["run_ids"] == [killed]
    finished = logged[-1]
    assert (finished["event"], finished["remaining_due_rows"]) == ("run_finished", 0)

    shown = script(*base, "audit", "show", killed, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (record["status"], record["rows_cleaned"]) == ("abandoned", committed)
    assert record["finished_at"] is not None and "killed" in record["error"]
    assert run_records(engine)[finished["run_id"]]["status"] == "succeeded"
    assert cleaned_count(engine) == due
    assert_nothing_half_cleaned(engine)
    assert_chunks_account_for_every_cleaned_row(engine)


# --- 3. one run at a time --------------------------------------------------------------------


def test_run_exits_3_while_the_lock_is_held_touching_nothing(
    engine: Engine, base: list[str]
) -> None:
    """A run finding the target's lock held exits 3, writes no record, logs the holder."""
    bulk_seed(engine, 50)
    before = snapshot(engine)
    with RunLock(engine, WHOLE_TARGET) as lock:
        assert lock.acquired
        assert lock.conn is not None
        holder_pid = lock.conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        lock.conn.commit()
        proc = script(*base, "run", "--yes")
    assert proc.returncode == 3, proc.stderr
    logged = events(proc.stderr)
    locked = next(e for e in logged if e["event"] == "run_locked")
    [holder] = locked["holder"]
    assert (holder["pid"], holder["application_name"]) == (holder_pid, "dispatch-retention")
    assert logged[-1]["status"] == "locked"
    assert run_records(engine) == {}
    assert chunk_records(engine) == []
    assert snapshot(engine) == before


def test_two_concurrent_runs_one_proceeds_the_other_exits_3(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Two real processes started together: one cleans, the other exits 3 having done nothing."""
    bulk_seed(engine, BACKLOG)
    # A pause between chunks keeps the winner busy for seconds (a stop signal cuts it short).
    slow = write_config(tmp_path / "slow.toml", config_text(clean="pause_between_chunks_ms = 5"))
    base = ["--config", str(slow), "--database-url", url_string]
    logs = [tmp_path / "a.err", tmp_path / "b.err"]
    procs = []
    for log in logs:
        with log.open("w") as err:
            procs.append(
                spawn(*base, "run", "--chunk-size", "10", stdout=subprocess.DEVNULL, stderr=err)
            )
    try:
        deadline = time.monotonic() + 30
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = 1 - loser
        assert procs[loser].returncode == 3, logs[loser].read_text()
        while "chunk_committed" not in logs[winner].read_text() and time.monotonic() < deadline:
            time.sleep(0.02)  # stop the winner once it has cleaned something
        assert procs[winner].poll() is None, "the other run finished before the race was over"
        procs[winner].send_signal(signal.SIGTERM)
        assert procs[winner].wait(timeout=30) == 143
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    won, lost = events(logs[winner].read_text()), events(logs[loser].read_text())
    [locked] = [e for e in lost if e["event"] == "run_locked"]
    [holder] = locked["holder"]  # the winner's lock connection, named by pid and application
    assert holder["pid"] > 0 and holder["application_name"] == "dispatch-retention"
    assert "chunk_committed" not in {e["event"] for e in lost}
    runs = run_records(engine)
    assert list(runs) == [won[0]["run_id"]]  # the loser left no record
    assert lost[0]["run_id"] != won[0]["run_id"]
    assert runs[won[0]["run_id"]]["status"] == "interrupted"
    chunk_rows = sum(e["rows"] for e in won if e["event"] == "chunk_committed")
    assert 0 < chunk_rows == cleaned_count(engine)
    assert_chunks_account_for_every_cleaned_row(engine)
    assert_nothing_half_cleaned(engine)


# --- 4. verify -------------------------------------------------------------------------------

VERIFY_POLICIES = """
[[policy]]
name = "failed-sends"
retention_days = 30
where = { transmission_status = "failed" }

[[policy]]
name = "sms"
retention_days = 90
where = { type = "sms" }

[[policy]]
name = "email"
retention_days = 365
where = { type = "email" }
"""


class ReadOnlyProbe:
    """Asks the server, before each statement on dispatches, whether its transaction is READ
    ONLY (on the statement's own connection, bypassing SQLAlchemy's events)."""

    def __init__(self) -> None:
        self.answers: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "dispatches" in statement:
            raw = conn.connection.dbapi_connection
            self.answers.append(raw.execute("SHOW transaction_read_only").fetchone()[0])

    def __enter__(self) -> ReadOnlyProbe:
        event.listen(Engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(Engine, "before_cursor_execute", self)


def verify_json(base: list[str], *extra: str) -> tuple[int, dict[str, Any]]:
    result = invoke(*base, "verify", "--format", "json", *extra)
    assert_no_marker(result.stdout, result.stderr)
    return result.exit_code, json.loads(result.stdout)


def test_verify_reports_violations_held_and_unmatched_read_only(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """verify: 0 when clean, 5 with per-policy counts; holds and unmatched are not violations."""
    cfg = write_config(tmp_path / "v.toml", config_text(policies=VERIFY_POLICIES))
    base = ["--config", str(cfg), "--database-url", url_string]
    code, empty = verify_json(base)
    assert (code, empty["ok"], empty["violations"]) == (0, True, [])

    now = db_now(engine)
    insert_rows(
        engine,
        [
            dispatch(1, now - 500 * DAY, type="sms"),  # cleaned, then msisdn written back
            dispatch(2, now - 500 * DAY, type="sms"),  # cleaned, stays clean
            dispatch(3, now - 500 * DAY, type="sms"),  # cleaned, then content written back
            dispatch(5, now - 500 * DAY, type="sms", member_id=77),  # held
            dispatch(6, now - 500 * DAY, type="push"),  # no policy matches: never due
            dispatch(7, now - 5 * DAY, type="push"),  # no policy matches
            dispatch(8, now - 10 * DAY, type="sms"),  # young
        ],
    )
    hold(engine, 77, "case V-1")
    ran = invoke(*base, "run", "--yes")
    assert ran.exit_code == 0, ran.output
    code, clean = verify_json(base)
    assert (code, clean["ok"], clean["violations"]) == (0, True, [])
    assert (clean["held_rows"], clean["unmatched_rows"], clean["cleaned_rows"]) == (1, 2, 3)

    with engine.begin() as conn:
        conn.execute(text("UPDATE dispatches SET msisdn = '+47' || :m WHERE id = 1"), {"m": MARK})
        conn.execute(
            text("UPDATE dispatches SET content = CAST(:c AS jsonb) WHERE id = 3"),
            {"c": json.dumps({"body": MARK})},
        )
    insert_rows(
        engine,
        [
            dispatch(10, now - 400 * DAY, type="email"),  # overdue, never cleaned
            dispatch(11, now - 40 * DAY, transmission_status="failed"),  # overdue failed send
            dispatch(12, now - 90 * DAY - timedelta(hours=1), type="sms"),  # just past
        ],
    )
    before = snapshot(engine)
    with engine.connect() as conn:
        xids_before = conn.execute(text("SELECT txid_current_snapshot()::text")).scalar_one()
    with ReadOnlyProbe() as probe:
        code, report = verify_json(base)
    with engine.connect() as conn:
        xids_after = conn.execute(text("SELECT txid_current_snapshot()::text")).scalar_one()

    assert code == 5
    assert report["ok"] is False
    assert {v["policy"]: v["rows"] for v in report["violations"]} == {
        "sms": 3,
        "email": 1,
        "failed-sends": 1,
    }
    assert (report["violation_rows"], report["held_rows"], report["unmatched_rows"]) == (5, 1, 2)
    assert probe.answers and set(probe.answers) == {"on"}, probe.answers
    assert xids_before == xids_after  # not one transaction id consumed: nothing written
    assert snapshot(engine) == before

    code, tolerant = verify_json(base, "--tolerance-hours", "2")
    assert (code, {v["policy"]: v["rows"] for v in tolerant["violations"]}) == (
        5,
        {"sms": 2, "email": 1, "failed-sends": 1},
    )
    table = invoke(*base, "verify")
    assert table.exit_code == 5
    assert "VIOLATION: 5 dispatches" in table.stdout


# --- 5. legal holds --------------------------------------------------------------------------


def hold_list(base: list[str], *extra: str) -> list[dict[str, Any]]:
    result = invoke(*base, "hold", "list", "--format", "json", *extra)
    assert result.exit_code == 0, result.output
    return list(json.loads(result.stdout))


def hold(engine: Engine, member_id: int, reason: str) -> None:
    """A legal hold through the library (the CLI's `hold add` is tested on its own)."""
    with engine.begin() as conn:
        holds.add(conn, TABLES, member_id, reason, "test")


def test_legal_hold_keeps_dispatches_until_released(engine: Engine, base: list[str]) -> None:
    """A held member's overdue dispatches survive runs; released, the next run cleans them."""
    now = db_now(engine)
    insert_rows(
        engine,
        [dispatch(i, now - 500 * DAY, member_id=77 if i <= 3 else 100 + i) for i in range(1, 7)],
    )
    added = invoke(*base, "hold", "add", "77", "--reason", "case LEGAL-1 (litigation)")
    assert added.exit_code == 0, added.output
    [held] = hold_list(base)
    assert (held["member_id"], held["reason"], held["released_at"]) == (
        77,
        "case LEGAL-1 (litigation)",
        None,
    )
    assert held["created_by"] and held["created_at"]

    planned = invoke(*base, "run", "--dry-run")
    [held_line] = [ln for ln in planned.stdout.splitlines() if ln.startswith("held back")]
    assert held_line.split()[-1] == "3"
    first = invoke(*base, "run", "--yes")
    assert first.exit_code == 0, first.output
    rows = snapshot(engine)
    assert {i for i, r in rows.items() if r["cleaned_at"]} == {4, 5, 6}
    assert all(MARK in rows[i]["msisdn"] for i in (1, 2, 3))
    [run1] = audit_list(base)
    shown = audit_show(base, run1["run_id"])
    assert (shown["held_rows"], shown["due_rows"], shown["rows_cleaned"]) == (3, 3, 3)
    again = invoke(*base, "run", "--yes")
    assert again.exit_code == 0
    assert snapshot(engine) == rows  # still held

    released = invoke(*base, "hold", "release", "77")
    assert released.exit_code == 0, released.output
    assert hold_list(base) == []
    [kept] = hold_list(base, "--all")
    assert kept["hold_id"] == held["hold_id"]
    assert kept["released_at"] is not None and kept["released_by"]

    last = invoke(*base, "run", "--yes")
    assert last.exit_code == 0, last.output
    assert all(r["cleaned_at"] is not None for r in snapshot(engine).values())
    newest = audit_show(base, audit_list(base)[0]["run_id"])
    assert (newest["held_rows"], newest["rows_cleaned"]) == (0, 3)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {SCHEMA}.legal_holds")).scalar_one() == 1


def test_hold_commands_add_release_and_refuse_bad_requests(base: list[str]) -> None:
    """hold add/release/list on the CLI; no reason, a second hold, no hold to release: exit 2."""
    added = invoke(*base, "hold", "add", "77", "--reason", "case LEGAL-2")
    assert added.exit_code == 0, added.output
    [held] = hold_list(base)
    assert (held["member_id"], held["reason"], held["released_at"]) == (77, "case LEGAL-2", None)

    assert invoke(*base, "hold", "add", "77", "--reason", "again").exit_code == 2
    assert invoke(*base, "hold", "add", "78").exit_code == 2
    assert invoke(*base, "hold", "add", "78", "--reason", "   ").exit_code == 2
    assert invoke(*base, "hold", "release", "78").exit_code == 2
    assert len(hold_list(base, "--all")) == 1  # none of the refused commands wrote a hold

    released = invoke(*base, "hold", "release", "77")
    assert released.exit_code == 0, released.output
    assert hold_list(base) == []
    assert invoke(*base, "hold", "release", "77").exit_code == 2  # nothing active any more
    assert invoke(*base, "hold", "add", "77", "--reason", "case LEGAL-3").exit_code == 0
    history = hold_list(base, "--all")
    assert [(h["reason"], h["released_at"] is None) for h in history] == [
        ("case LEGAL-2", False),
        ("case LEGAL-3", True),
    ]


# --- 6. no personal data in the trail or the output ------------------------------------------


def schema_tables(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = :s ORDER BY table_name"
                ),
                {"s": SCHEMA},
            ).scalars()
        )


def test_no_personal_data_in_the_audit_schema_or_any_output(
    engine: Engine, base: list[str], url_string: str, tmp_path: Path
) -> None:
    """After runs over marked data (one failing on a row), no audit row and no output has it."""
    due = bulk_seed(engine, 300)
    outputs: list[str] = []

    def keep(result: Result | subprocess.CompletedProcess[str]) -> None:
        outputs.extend([result.stdout, result.stderr])

    # A first run that fails on a constraint: the server's DETAIL quotes the failing row,
    # whose kept app_token carries a marker. Neither the log nor the run record may repeat it.
    with engine.begin() as conn:
        conn.execute(
            text("ALTER TABLE dispatches ADD CONSTRAINT keep_msisdn CHECK (msisdn IS NOT NULL)")
        )
    partial = write_config(
        tmp_path / "partial.toml",
        config_text(
            clean='columns = ["content", "msisdn", "email"]\nkeep = { app_token = "test" }'
        ),
    )
    failed = script("--config", str(partial), "--database-url", url_string, "run")
    keep(failed)
    assert failed.returncode == 1, failed.stderr
    assert "CheckViolation" in events(failed.stderr)[-1]["error"]
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dispatches DROP CONSTRAINT keep_msisdn"))

    hold(engine, 1001, "case SCAN-1")
    for args in (["run", "--dry-run"], ["run", "--chunk-size", "37"]):
        result = script(*base, *args)
        keep(result)
        assert result.returncode == 0, result.stderr
    held = sum(1 for i in range(1, 301) if 1000 + i % 97 == 1001 and i % 10)
    assert cleaned_count(engine) == due - held > 0

    run_ids = list(run_records(engine))
    for args in (
        ["verify"],
        ["verify", "--format", "json"],
        ["audit", "list"],
        ["audit", "list", "--format", "json"],
        ["audit", "list", "--format", "csv"],
        ["hold", "list", "--all"],
        ["hold", "list", "--all", "--format", "json"],
        *(["audit", "show", r, *fmt] for r in run_ids for fmt in ([], ["--format", "json"])),
    ):
        result = invoke(*base, *args)
        assert result.exit_code == 0, (args, result.output)
        keep(result)
    assert_no_marker(*outputs)

    tables = schema_tables(engine)
    assert {"runs", "chunks", "legal_holds", "dispatch_retention_alembic_version"} <= set(tables)
    scanned = 0
    with engine.connect() as conn:
        for name in tables:
            for row in conn.execute(text(f'SELECT t::text FROM "{SCHEMA}"."{name}" t')).scalars():
                scanned += 1
                assert MARK not in row, f"personal data in {SCHEMA}.{name}"
    assert scanned >= len(run_ids) + 2  # runs, chunks and the hold were all read
    with engine.connect() as conn:
        still_marked = conn.execute(
            text("SELECT count(*) FROM dispatches WHERE app_token LIKE '%' || :m || '%'"),
            {"m": MARK},
        ).scalar_one()
    assert still_marked > 0  # the markers are there to be found: the scan could fail


# --- 7. audit list / audit show --------------------------------------------------------------


def audit_list(base: list[str], *extra: str) -> list[dict[str, Any]]:
    result = invoke(*base, "audit", "list", "--format", "json", *extra)
    assert result.exit_code == 0, result.output
    return list(json.loads(result.stdout))


def audit_show(base: list[str], run_id: str) -> dict[str, Any]:
    result = invoke(*base, "audit", "show", run_id, "--format", "json")
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_audit_list_and_show_cover_every_final_status(
    engine: Engine, base: list[str], url_string: str, tmp_path: Path
) -> None:
    """Runs of every final status read back in all formats; totals are the chunk sums."""
    now = db_now(engine)
    insert_rows(
        engine,
        (dispatch(i, now - 500 * DAY, type=("sms", "email")[i % 2]) for i in range(1, 61)),
    )
    s = settings()
    ids: dict[str, str] = {}

    ids["abandoned"] = "00000000-0000-4000-8000-000000000001"
    audit.RunRecord(engine, TABLES, ids["abandoned"]).start(s, Options())
    with engine.begin() as conn:  # a run killed long ago
        conn.execute(
            text(f"UPDATE {SCHEMA}.runs SET started_at = '2020-03-01T00:00:00Z' WHERE run_id = :r"),
            {"r": ids["abandoned"]},
        )

    guarded = write_config(tmp_path / "guard.toml", config_text(guard="refuse_above_rows = 1"))
    refused = invoke("--config", str(guarded), "--database-url", url_string, "run", "--yes")
    assert refused.exit_code == 4, refused.output
    ids["refused"] = events(refused.stderr)[0]["run_id"]

    def fail(seq: int) -> None:
        if seq == 2:
            raise RuntimeError("injected")

    failed = job.run(
        engine, s, Request(Options(chunk_size=5)), stop=Stop(), hooks=Hooks(fail_in_chunk=fail)
    )
    ids["failed"] = failed.run_id

    stop = Stop()
    interrupted = job.run(
        engine,
        s,
        Request(Options(chunk_size=5)),
        stop=stop,
        hooks=Hooks(on_chunk=lambda _c: stop.request(15)),
    )
    ids["interrupted"] = interrupted.run_id

    cancelled = job.run(engine, s, Request(), stop=Stop(), hooks=Hooks(confirm=lambda _plan: False))
    ids["cancelled"] = cancelled.run_id

    incomplete = invoke(*base, "run", "--max-rows", "7", "--chunk-size", "5")
    assert incomplete.exit_code == 0, incomplete.output
    ids["incomplete"] = events(incomplete.stderr)[0]["run_id"]

    succeeded = invoke(*base, "run", env={"DISPATCH_RETENTION_TRIGGER": "cron"})
    assert succeeded.exit_code == 0, succeeded.output
    ids["succeeded"] = events(succeeded.stderr)[0]["run_id"]

    # Windows start at the due block's first id (0), so with --chunk-size 5 the first chunk
    # is ids 0-4: rows 1-4.
    expected_rows = {
        "abandoned": 0,
        "refused": 0,
        "failed": 4,
        "interrupted": 5,
        "cancelled": 0,
        "incomplete": 7,
        "succeeded": 44,
    }
    listed = audit_list(base)
    assert {r["run_id"]: r["status"] for r in listed} == {v: k for k, v in ids.items()}
    assert {r["status"]: r["rows_cleaned"] for r in listed} == expected_rows
    assert [r["started_at"] for r in listed] == sorted(
        (r["started_at"] for r in listed), reverse=True
    )
    assert listed[-1]["run_id"] == ids["abandoned"]
    assert {r["run_id"]: r["trigger"] for r in listed}[ids["succeeded"]] == "cron"
    assert cleaned_count(engine) == 60 == sum(expected_rows.values())
    assert_chunks_account_for_every_cleaned_row(engine)

    assert [r["run_id"] for r in audit_list(base, "--limit", "2")] == [
        r["run_id"] for r in listed[:2]
    ]
    assert {r["run_id"] for r in audit_list(base, "--since", "2021-01-01")} == set(ids.values()) - {
        ids["abandoned"]
    }
    tomorrow = (now.date() + timedelta(days=1)).isoformat()
    assert audit_list(base, "--since", tomorrow) == []
    assert invoke(*base, "audit", "list", "--since", "01/02/2021").exit_code == 2

    as_csv = invoke(*base, "audit", "list", "--format", "csv")
    assert as_csv.exit_code == 0
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(parsed[0]) == list(LIST_COLUMNS)
    assert {r["run_id"]: (r["status"], int(r["rows_cleaned"])) for r in parsed} == {
        ids[k]: (k, n) for k, n in expected_rows.items()
    }
    as_table = invoke(*base, "audit", "list")
    assert as_table.exit_code == 0
    assert as_table.stdout.splitlines()[0].split() == list(LIST_COLUMNS)
    for status, run_id in ids.items():
        assert any(run_id in line and status in line for line in as_table.stdout.splitlines())

    for status, run_id in ids.items():
        doc = audit_show(base, run_id)
        chunk_sum = sum(c["rows"] for c in chunk_records(engine, run_id))
        assert (doc["run_id"], doc["status"]) == (run_id, status)
        assert doc["rows_cleaned"] == chunk_sum == expected_rows[status]
        assert doc["started_at"] <= doc["finished_at"]
        assert set(doc) >= {"trigger", "host", "tool_version", "config_sha256", "config_text"}
        if status == "abandoned":  # killed before it planned
            assert doc["policies"] == []
            continue
        planned_at = datetime.fromisoformat(doc["planned_at"])
        assert [p["name"] for p in doc["policies"]] == ["failed-sends", "sms", "default"]
        for p in doc["policies"]:
            assert set(p) >= {"name", "retention_days", "cutoff", "rows_cleaned"}
            cutoff = datetime.fromisoformat(p["cutoff"])
            assert planned_at - cutoff == timedelta(days=p["retention_days"])
        assert sum(p["rows_cleaned"] for p in doc["policies"]) == chunk_sum
        table = invoke(*base, "audit", "show", run_id)
        assert table.exit_code == 0
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["run_id", run_id]
        assert lines[1].split() == ["status", status]
        assert any(line.split()[:2] == ["sms", "90"] for line in lines)
        assert "config:" in lines

    assert invoke(*base, "audit", "show", "not-a-uuid").exit_code == 2
    missing = invoke(*base, "audit", "show", "00000000-0000-4000-8000-0000000000ff")
    assert missing.exit_code == 1 and "no run" in missing.output


# --- 8. the audit schema must exist ----------------------------------------------------------


def test_commands_refuse_without_the_audit_schema_until_db_upgrade(
    engine: Engine, base: list[str]
) -> None:
    """Without the audit schema run and dry-run exit 2 naming `db upgrade`, which creates it."""
    bulk_seed(engine, 20)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {SCHEMA} CASCADE"))
    before = snapshot(engine)
    for args in (["run", "--yes"], ["run", "--dry-run"], ["verify"], ["audit", "list"]):
        result = invoke(*base, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "db upgrade" in result.stderr
        assert "Traceback" not in result.output
    assert snapshot(engine) == before
    assert schema_tables(engine) == []  # run never creates the tables itself

    first = invoke(*base, "db", "upgrade")
    assert first.exit_code == 0, first.output
    assert "migrated from nothing to" in first.stdout
    assert {"runs", "chunks", "legal_holds"} <= set(schema_tables(engine))
    second = invoke(*base, "db", "upgrade")
    assert second.exit_code == 0
    assert "up to date" in second.stdout

    with engine.begin() as conn:  # a database left behind by an older release
        conn.execute(
            text(f"UPDATE {SCHEMA}.dispatch_retention_alembic_version SET version_num = '0000'")
        )
    behind = invoke(*base, "run", "--yes")
    assert behind.exit_code == 2
    assert "db upgrade" in behind.stderr
    assert snapshot(engine) == before
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {SCHEMA} CASCADE"))
    assert invoke(*base, "db", "upgrade").exit_code == 0
    done = invoke(*base, "run", "--yes")
    assert done.exit_code == 0, done.output
    assert cleaned_count(engine) == 18
