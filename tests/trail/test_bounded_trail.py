"""Every text of the trail bounded, and its readers' memory with it (migration 0007).

Found by the third review: one 60 MB hold reason, written once and never deletable, took
`audit verify` to 310 MB and `hold list` to 680 MB, so the verify CronJob (256Mi) was
OOM-killed every morning from then on. Here a database made at revision 0006 gets such rows
(as the table's owner could write them), then `db upgrade`: the readers run in a subprocess
whose address space is bounded well under what they took before; rows that may still change
can; and every new text over its bound is refused, by the job with exit 2 naming the limit,
by the database (the CHECK constraints) for a role writing directly.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention.catalog.risks import Risk
from dispatch_retention.errors import TooLongForTrail
from dispatch_retention.pg import engines
from dispatch_retention.trail import migrate, run_record
from dispatch_retention.trail.audit_tables import CUT, TEXT_BOUNDS, AuditTables, fitted
from dispatch_retention.vocabulary import Options, Outcome, Status
from tests.helpers import (
    SCRIPT,
    config_text,
    fresh_database,
    granted_role,
    guards_off,
    invoke,
    run_job,
    script_env,
    seed_series,
    settings,
    write_config,
)
from tests.trail.test_guards import HOLDS, RUNS, execute_as, refused

SCHEMA = "dispatch_retention"
MB = 1000 * 1000
#: The long hold reason written before the upgrade. Before the fix `audit verify` took about
#: 87 + 4 x its size MiB of address space here, and `hold list` 87 + 9 x (at 8 MB: 118 and
#: 158 MiB; with the fix both take what they take on an empty trail, about 87 MiB).
LONG_REASON = 32 * MB
#: The address space the readers get (RLIMIT_AS): room over what they need on an empty trail,
#: far under what they took before.
ADDRESS_SPACE = 160 * 1024 * 1024
#: A run's texts written long before the upgrade (the 0006 guard lets a config text of 4 MiB).
LONG_HOST, LONG_CONFIG, LONG_ERROR = 5000, 3 * 1024 * 1024, 100_000


def at_0006(engine: Engine) -> None:
    """The audit schema as today's main makes it: the migrations up to 0006, from nothing."""
    cfg = migrate.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["schema"] = SCHEMA
        command.downgrade(cfg, "base")
        command.upgrade(cfg, "0006")


def insert_run(conn: object, run_id: str, **texts: str) -> None:
    """A run record as the owner writes it (the guards on), with `texts` as SQL expressions."""
    values = {
        "trigger": "'cron'", "host": "'h'", "tool_version": "'0'",
        "target_table": "'public.dispatches'", "config_path": "'x'", "config_sha256": "'x'",
        "config_text": "'x'", **texts,
    }  # fmt: skip
    conn.execute(  # type: ignore[attr-defined]
        text(
            f"INSERT INTO {RUNS} (run_id, status, started_at, db_user, options, "
            f"{', '.join(values)}) VALUES (:r, 'running', now(), current_user, '{{}}', "
            f"{', '.join(values.values())})"
        ),
        {"r": run_id},
    )


@dataclasses.dataclass(frozen=True)
class Legacy:
    url: str
    config: Path
    finished_run: str


@pytest.fixture(scope="module")
def legacy(
    server_url: URL, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Legacy]:
    """A database at 0006 holding a hold with a 32 MB reason and a finished run with a long
    host, config text and error, written by the owner; then `db upgrade`. Read only by the
    tests that share it."""
    config = write_config(tmp_path_factory.mktemp("legacy") / "retention.toml", config_text())
    with fresh_database(server_url, template_db) as url:
        engine = engines.make_engine(url)
        at_0006(engine)
        run_id = str(uuid.uuid4())
        with engine.begin() as conn:
            conn.execute(
                text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (42, repeat('r', :n))"),
                {"n": LONG_REASON},
            )
            conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (43, 'case 7')"))
            insert_run(
                conn,
                run_id,
                host=f"repeat('h', {LONG_HOST})",
                config_text=f"repeat('c', {LONG_CONFIG})",
            )
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"UPDATE {RUNS} SET status = 'failed', error = repeat('e', {LONG_ERROR}) "
                    "WHERE run_id = :r"
                ),
                {"r": run_id},
            )
        engine.dispose()
        plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
        upgraded = invoke("--config", str(config), "--database-url", plain, "db", "upgrade")
        assert upgraded.exit_code == 0 and "from 0006 to 0008" in upgraded.output, upgraded.output
        yield Legacy(plain, config, run_id)


def _bounded_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def under_limit(legacy: Legacy, *args: str) -> subprocess.CompletedProcess[str]:
    """The console script with `ADDRESS_SPACE` bytes of address space at most."""
    return subprocess.run(
        [str(SCRIPT), "--config", str(legacy.config), "--database-url", legacy.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=script_env(),
        preexec_fn=_bounded_address_space,
    )


READERS = {
    "audit verify": ("audit", "verify"),
    "audit verify json": ("audit", "verify", "--format", "json"),
    "hold list": ("hold", "list"),
    "hold list all json": ("hold", "list", "--all", "--format", "json"),
    "audit list": ("audit", "list"),
    "audit list json": ("audit", "list", "--format", "json"),
    "audit list csv": ("audit", "list", "--format", "csv"),
}


@pytest.mark.parametrize("args", list(READERS.values()), ids=list(READERS))
def test_the_readers_take_bounded_memory_over_long_rows_written_before(
    legacy: Legacy, args: tuple[str, ...]
) -> None:
    """Each reader of the trail succeeds with far less memory than the long rows' texts
    (before the fix `audit verify` and `hold list` ran out of it: MemoryError, exit 1), and
    prints at most a bounded prefix of a long text."""
    done = under_limit(legacy, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert len(done.stdout) < 64 * 1024


def test_audit_verify_still_hashes_the_long_events_whole(legacy: Legacy) -> None:
    """The long hold's event is checked like any other (read in slices): the trail is OK, and
    the chain holds all of its events."""
    done = under_limit(legacy, "audit", "verify", "--format", "json")
    report = json.loads(done.stdout)
    assert report["ok"] and report["findings"] == [] and report["events"] == 4, report


def test_a_long_text_is_listed_cut_and_marked(legacy: Legacy) -> None:
    """`hold list` shows a reason longer than the bound as its first characters and how long
    it is in all; a short one as it is."""
    done = under_limit(legacy, "hold", "list", "--format", "json")
    held = {h["member_id"]: h["reason"] for h in json.loads(done.stdout)}
    limit = TEXT_BOUNDS["legal_holds"]["reason"]
    assert held[43] == "case 7"
    assert held[42] == "r" * limit + f" [cut: {LONG_REASON} bytes in all]"


def test_audit_show_cuts_each_long_text_of_a_run(legacy: Legacy) -> None:
    """`audit show` of the run with long texts: each cut to its bound and marked; the
    config text (3 MiB) to the 1 MiB a run record now keeps."""
    done = under_limit(legacy, "audit", "show", legacy.finished_run, "--format", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    shown = json.loads(done.stdout)
    bounds = TEXT_BOUNDS["runs"]
    for column, size in (("host", LONG_HOST), ("error", LONG_ERROR), ("config_text", LONG_CONFIG)):
        assert shown[column].endswith(f" [cut: {size} bytes in all]"), column
        assert len(shown[column]) < bounds[column] + 100, column
    text_out = under_limit(legacy, "audit", "show", legacy.finished_run)
    assert text_out.returncode == 0 and "[cut: 100000 bytes in all]" in text_out.stdout


# --- rows that may still change, and new texts over their bounds ------------------------------


@pytest.fixture
def upgraded_with_open_long_rows(engine: Engine, url_string: str) -> str:
    """At 0006: an active hold with a 5 MB reason and an abandoned run with a long host (both
    may still change), a released hold with a long reason (may not); then `db upgrade`. The
    abandoned run's id."""
    at_0006(engine)
    run_id = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(
            text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (42, repeat('r', 5e6::int))")
        )
        conn.execute(
            text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (44, repeat('s', 5000))")
        )
        conn.execute(text(f"UPDATE {HOLDS} SET released_at = now() WHERE member_id = 44"))
        insert_run(conn, run_id, host=f"repeat('h', {LONG_HOST})")
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE {RUNS} SET status = 'abandoned', error = 'dead' WHERE run_id = :r"),
            {"r": run_id},
        )
    assert invoke("--database-url", url_string, "db", "upgrade").exit_code == 0
    return run_id


def test_rows_that_may_still_change_still_can(
    engine: Engine, url_string: str, base: list[str], upgraded_with_open_long_rows: str
) -> None:
    """The active hold with a long reason is released (`hold release`), the abandoned run
    with a long host closed by its role; their constraints name them (and only them) as
    exceptions; the trail then checks out."""
    released = invoke(*base, "hold", "release", "42")
    assert released.exit_code == 0, released.output
    run_id = upgraded_with_open_long_rows
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {RUNS} SET status = 'failed' WHERE run_id = :r"), {"r": run_id})
        definitions = dict(
            conn.execute(
                text(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conname IN ('runs_host_bounded', 'legal_holds_reason_bounded', "
                    "'runs_error_bounded')"
                )
            ).all()
        )
    assert run_id in definitions["runs_host_bounded"]
    assert "hold_id" in definitions["legal_holds_reason_bounded"]  # the active one, 42's
    assert "run_id" not in definitions["runs_error_bounded"]
    verified = invoke(*base, "audit", "verify")
    assert verified.exit_code == 0, verified.output


def test_a_row_that_can_no_longer_change_is_no_exception(
    engine: Engine, upgraded_with_open_long_rows: str
) -> None:
    """The released hold's long reason stays as it was, and is named in no constraint: the
    exceptions are the rows that may still change, nothing else."""
    with engine.connect() as conn:
        definition = conn.execute(
            text(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conname = 'legal_holds_reason_bounded'"
            )
        ).scalar_one()
        released = conn.execute(
            text(f"SELECT hold_id FROM {HOLDS} WHERE member_id = 44")
        ).scalar_one()
    assert f"'{released}'" not in definition


def _long(n: int) -> str:
    return f"repeat('x', {n})"


HOLD_WRITES = {
    "reason": (
        f"INSERT INTO {HOLDS} (member_id, reason) VALUES (7, {_long(4097)})",
        "legal_holds_reason_bounded",
    ),
    "reason in multibyte characters": (
        f"INSERT INTO {HOLDS} (member_id, reason) VALUES (7, repeat('€', 1366))",
        "legal_holds_reason_bounded",
    ),
    "requested_by": (
        f"INSERT INTO {HOLDS} (member_id, reason, requested_by) VALUES (7, 'c', {_long(257)})",
        "legal_holds_requested_by_bounded",
    ),
    "released_by": (
        f"UPDATE {HOLDS} SET released_at = now(), released_by = {_long(600)} WHERE member_id = 43",
        "legal_holds_released_by_bounded",
    ),
}
RUN_TEXTS = ("trigger", "host", "tool_version", "target_table", "shard", "config_path",
             "config_sha256", "config_text")  # fmt: skip
END_TEXTS = ("error", "stopped_by", "remaining_reason")


@pytest.mark.parametrize("purpose", ["holds", "owner"])
@pytest.mark.parametrize("statement", list(HOLD_WRITES.values()), ids=list(HOLD_WRITES))
def test_the_database_refuses_a_long_hold_text(
    engine: Engine, database_url: URL, url_string: str, purpose: str, statement: tuple[str, str]
) -> None:
    """As the holds role of `db grants` (or the owner, a superuser here): a hold's text over
    its bound is refused by its CHECK constraint, named."""
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (43, 'case 1')"))
    sql, constraint = statement
    if purpose == "owner":
        error = refused(url_string, sql, run_id="")
    else:
        with granted_role(engine, database_url, "holds") as (_role, url):
            error = refused(url, sql, run_id="")
    assert "CheckViolation, SQLSTATE 23514" in error and f"constraint {constraint}" in error, error


@pytest.mark.parametrize("column", [*RUN_TEXTS, *END_TEXTS])
def test_the_database_refuses_a_long_run_text(
    engine: Engine, run_role: tuple[str, str], column: str
) -> None:
    """As the run role of `db grants`: each text a run writes, at its start or at its end,
    over its bound is refused by its CHECK constraint, named."""
    _role, url = run_role
    run_id = str(uuid.uuid4())
    long = _long(TEXT_BOUNDS["runs"][column] + 1)
    if column in RUN_TEXTS:
        columns = ["trigger", "host", "tool_version", "target_table", "config_path",
                   "config_sha256", "config_text", "shard"]  # fmt: skip
        values = ["'cron'", "'h'", "'0'", "'public.dispatches'", "'x'", "'x'", "'x'", "NULL"]
        values[columns.index(column)] = long
        statements = [
            f"INSERT INTO {RUNS} (run_id, status, started_at, db_user, options, "
            f"{', '.join(columns)}) VALUES (:r, 'running', now(), current_user, '{{}}', "
            f"{', '.join(values)})"
        ]
    else:
        execute_as(
            url,
            f"INSERT INTO {RUNS} (run_id, status, started_at, trigger, host, tool_version, "
            "db_user, target_table, options, config_path, config_sha256, config_text) VALUES "
            "(:r, 'running', now(), 'cron', 'h', '0', current_user, 'public.dispatches', '{}', "
            "'x', 'x', 'x')",
            run_id=run_id,
        )
        statements = [f"UPDATE {RUNS} SET status = 'failed', {column} = {long} WHERE run_id = :r"]
    error = refused(url, *statements, run_id=run_id)
    assert "CheckViolation, SQLSTATE 23514" in error, error
    assert f"constraint runs_{column}_bounded" in error, error


@pytest.mark.parametrize(
    ("args", "option"),
    [
        pytest.param(("hold", "add", "7", "--reason", "r" * 4097), "--reason", id="reason"),
        pytest.param(("hold", "add", "7", "--reason", "€" * 1366), "--reason", id="multibyte"),
        pytest.param(("hold", "add", "7", "--reason", "c", "--by", "b" * 257), "--by", id="by"),
        pytest.param(("hold", "release", "43", "--by", "b" * 257), "--by", id="release-by"),
    ],
)
def test_the_job_refuses_a_long_hold_text_by_name(
    engine: Engine, base: list[str], args: tuple[str, ...], option: str
) -> None:
    """`hold add` / `hold release` with a text over its bound: exit 2 naming the option and
    the limit, before anything is written (never the database's CHECK violation)."""
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (43, 'case 1')"))
    result = invoke(*base, *args)
    assert result.exit_code == 2, result.output
    assert option in result.output and "at most" in result.output, result.output
    assert "CheckViolation" not in result.output and "Traceback" not in result.output
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT member_id, released_at FROM {HOLDS}")).all()
    assert rows == [(43, None)]


def test_a_run_record_is_refused_by_name_before_it_is_written(engine: Engine) -> None:
    """A run whose record would hold a text over its bound (a config path of 5,000 bytes)
    is refused before it starts: exit 2 naming the text and the limit; nothing written."""
    record = run_record.RunRecord(engine, AuditTables(SCHEMA), str(uuid.uuid4()))
    long_path = dataclasses.replace(settings(), path="p" * 5000)
    with pytest.raises(TooLongForTrail) as raised:
        record.start(long_path, Options())
    assert "config_path" in str(raised.value) and "4096" in str(raised.value)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {RUNS}")).scalar_one() == 0


def test_the_end_of_a_run_is_recorded_cut_never_refused(engine: Engine) -> None:
    """A run's own words at its end (an error, why rows are left) longer than the trail keeps
    are recorded cut to the bound, marked: the record is always closed."""
    record = run_record.RunRecord(engine, AuditTables(SCHEMA), str(uuid.uuid4()))
    record.start(settings(), Options())
    outcome = Outcome(
        run_id=record.run_id, status=Status.FAILED, error="é" * 5000, remaining_reason="x" * 5000
    )
    assert record.finish(outcome)
    with engine.connect() as conn:
        error, reason = conn.execute(
            text(f"SELECT error, remaining_reason FROM {RUNS} WHERE run_id = :r"),
            {"r": record.run_id},
        ).one()
    assert error == fitted("runs", "error", "é" * 5000) and error.endswith(CUT)
    assert len(error.encode()) <= TEXT_BOUNDS["runs"]["error"]
    assert reason.endswith(CUT) and len(reason.encode()) <= TEXT_BOUNDS["runs"]["remaining_reason"]


# --- runs.copy_risks_at_end (0007) --------------------------------------------------------------

RISK = Risk("trigger", "late_copy", "AFTER", "row-level, calls f(): copies rows", None)


def _record_as(url: str) -> run_record.RunRecord:
    return run_record.RunRecord(
        engines.make_engine(engines.parse_url(url)), AuditTables(SCHEMA), str(uuid.uuid4())
    )


def test_the_copy_risks_at_the_end_are_written_by_the_close_and_shown(
    engine: Engine, run_role: tuple[str, str], base: list[str]
) -> None:
    """The run's close, as its own role, records the copy risks read again at its end; they
    are in the run_finished event (the trail checks out) and `audit show` shows them."""
    _role, url = run_role
    record = _record_as(url)
    record.start(settings(), Options())
    assert record.finish(Outcome(run_id=record.run_id, status=Status.SUCCEEDED), [RISK])
    record.engine.dispose()
    with engine.connect() as conn:
        body = conn.execute(
            text(f"SELECT body FROM {SCHEMA}.events WHERE kind = 'run_finished'")
        ).scalar_one()
    assert json.loads(body)["fact"]["copy_risks_at_end"] == [RISK.as_dict()]
    shown = invoke(*base, "audit", "show", record.run_id, "--format", "json")
    assert json.loads(shown.stdout)["copy_risks_at_end"] == [RISK.as_dict()]
    assert "trigger late_copy (AFTER)" in invoke(*base, "audit", "show", record.run_id).stdout
    assert invoke(*base, "audit", "verify").exit_code == 0


AT_END = '\'[{"kind": "trigger", "name": "t"}]\''
OTHER_WRITES = {
    "while it runs": f"UPDATE {RUNS} SET copy_risks_at_end = {AT_END} WHERE run_id = :r",
    "at its start": None,
    "after its end": f"UPDATE {RUNS} SET copy_risks_at_end = '[]' WHERE run_id = :r",
    "nested deeper": (
        f"UPDATE {RUNS} SET status = 'succeeded', copy_risks_at_end = '[{{\"a\": [[1]]}}]' "
        "WHERE run_id = :r"
    ),
}


@pytest.mark.parametrize("when", list(OTHER_WRITES), ids=list(OTHER_WRITES))
def test_the_copy_risks_at_the_end_are_written_only_by_the_close(
    engine: Engine, run_role: tuple[str, str], when: str
) -> None:
    """Written while the run runs, at its insert, again after its end, or deeper than a
    flat record: refused by the database (`runs_risks_at_end`, or a finished run never
    changes)."""
    _role, url = run_role
    run_id = str(uuid.uuid4())
    start = (
        f"INSERT INTO {RUNS} (run_id, status, started_at, trigger, host, tool_version, db_user, "
        "target_table, options, config_path, config_sha256, config_text, copy_risks_at_end) "
        "VALUES (:r, 'running', now(), 'cron', 'h', '0', current_user, 'public.dispatches', "
        "'{}', 'x', 'x', 'x', " + ("'[]'" if when == "at its start" else "NULL") + ")"
    )
    if when == "at its start":
        error = refused(url, start, run_id=run_id)
    else:
        execute_as(url, start, run_id=run_id)
        if when == "after its end":
            execute_as(
                url, f"UPDATE {RUNS} SET status = 'succeeded' WHERE run_id = :r", run_id=run_id
            )
        error = refused(url, str(OTHER_WRITES[when]), run_id=run_id)
    assert "IntegrityConstraintViolation" in error, error
    assert "runs_risks_at_end" in error or "runs_finished_immutable" in error, error


def test_another_role_cannot_write_the_copy_risks_at_the_end(
    engine: Engine, run_role: tuple[str, str], url_string: str
) -> None:
    """Another role (here the owner) closing the run cannot record copy risks at its end."""
    _role, url = run_role
    run_id = str(uuid.uuid4())
    execute_as(
        url,
        f"INSERT INTO {RUNS} (run_id, status, started_at, trigger, host, tool_version, db_user, "
        "target_table, options, config_path, config_sha256, config_text) VALUES (:r, "
        "'running', now(), 'cron', 'h', '0', current_user, 'public.dispatches', '{}', 'x', "
        "'x', 'x')",
        run_id=run_id,
    )
    error = refused(
        url_string,
        f"UPDATE {RUNS} SET status = 'abandoned', copy_risks_at_end = '[]' WHERE run_id = :r",
        run_id=run_id,
    )
    assert "runs_risks_at_end" in error or "runs_changed_by_their_role" in error, error


@pytest.mark.parametrize(
    "padding",
    [
        pytest.param(60_000, id="start-inline-end-long"),
        pytest.param(70_000, id="config-past-inline"),
        pytest.param(900_000, id="config-near-its-bound"),
    ],
)
def test_runs_with_long_configs_check_out(engine: Engine, base: list[str], padding: int) -> None:
    """A run whose config is long enough that some or all of its events are read in slices
    and decoded by the database (`audit_verify.INLINE_BYTES`): its story compares the same either
    way, and the trail checks out; a config changed in its events is still caught."""
    seed_series(engine, range(0, 200))
    long_settings = settings(clean="# " + "p" * padding)
    outcome = run_job(engine, long_settings, chunk_size=100)
    assert outcome.status.value == "succeeded", outcome
    result = invoke(*base, "audit", "verify", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["events"] == 3 + outcome.chunks
    with engine.begin() as conn:  # the owner rewrites the finished event's config, rehashed
        guards_off(conn)
        conn.execute(
            text(
                f"UPDATE {SCHEMA}.events SET body = replace(body, 'pppp', 'qqqq') "
                "WHERE kind = 'run_finished'"
            )
        )
        conn.execute(
            text(
                f"UPDATE {SCHEMA}.events SET hash = encode(sha256(convert_to(body, 'UTF8')), "
                "'hex') WHERE kind = 'run_finished'"
            )
        )
    problems = [
        f["problem"]
        for f in json.loads(invoke(*base, "audit", "verify", "--format", "json").stdout)["findings"]
    ]
    assert any("what the run started with changed" in p for p in problems), problems
