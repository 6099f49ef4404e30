"""Building blocks for tests: dispatch rows with personal-data markers, snapshots, configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, insert, select
from sqlalchemy import text as sql
from sqlalchemy.engine import URL

from dispatch_retention import config, grants, job
from dispatch_retention.cli import cli
from dispatch_retention.config import Settings, Target
from dispatch_retention.schema import dispatches_table
from dispatch_retention.vocabulary import Chunk, Hooks, Options, Outcome, Request, Stop

from . import oracle

TABLE = dispatches_table(Target())
DAY = timedelta(days=1)
MARK = "PIIMARK"  # every personal value seeded by a test carries it; output must never


def personal(row_id: int) -> dict[str, Any]:
    return {
        "content": {"body": f"{MARK}-content-{row_id}"},
        "msisdn": f"+47{MARK}{row_id}",
        "email": f"{MARK}.{row_id}@example.invalid",
        "app_token": f"{MARK}-token-{row_id}",
    }


def dispatch(row_id: int, created_at: datetime, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": row_id,
        "type": "sms",
        "member_id": 1000 + row_id,
        "transmission_status": "transmitted",
        "delivery_status": "delivered",
        "external_delivery_status": "delivered",
        "created_at": created_at,
        "updated_at": created_at,
        "scheduled_at": created_at,
        "transmitted_at": created_at,
        "delivered_at": created_at,
        "cleaned_at": None,
        **personal(row_id),
    }
    row.update(overrides)
    return row


def insert_rows(engine: Engine, rows: Iterable[Mapping[str, Any]]) -> None:
    batch = list(rows)
    if batch:
        with engine.begin() as conn:
            conn.execute(insert(TABLE), batch)


def snapshot(engine: Engine) -> dict[int, dict[str, Any]]:
    with engine.connect() as conn:
        return {
            r["id"]: dict(r) for r in conn.execute(select(TABLE).order_by(TABLE.c.id)).mappings()
        }


def db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        value = conn.execute(select(func.now())).scalar_one()
    assert isinstance(value, datetime)
    return value


DEFAULT_POLICIES = """
[[policy]]
name = "failed-sends"
retention_days = 30
where = { transmission_status = "failed" }

[[policy]]
name = "sms"
retention_days = 90
where = { type = "sms" }

[[policy]]
name = "default"
retention_days = 365
"""


def config_text(
    clean: str = "", guard: str = "", policies: str = DEFAULT_POLICIES, table: str | None = None
) -> str:
    target = f'[target]\ntable = "{table}"\n' if table else ""
    return f"{target}[clean]\n{clean}\n[guard]\n{guard}\n{policies}"


def settings(
    clean: str = "", guard: str = "", policies: str = DEFAULT_POLICIES, table: str | None = None
) -> Settings:
    return config.parse(config_text(clean, guard, policies, table), "test.toml")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def granted_role(
    engine: Engine, database_url: URL, purpose: str, s: Settings | None = None
) -> Iterator[tuple[str, str]]:
    """A LOGIN role (not a superuser, not the table's owner) with exactly the rights `db
    grants --purpose PURPOSE` prints: its name and its postgresql:// URL. Dropped after."""
    name = f"dr_{purpose.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sql(f"CREATE ROLE {name} LOGIN"))
        for statement in grants.statements(s or settings(), name, purpose):  # type: ignore[arg-type]
            conn.execute(sql(statement))
    url = database_url.set(drivername="postgresql", username=name)
    try:
        yield name, url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(sql(f"DROP OWNED BY {name}"))
            conn.execute(sql(f"DROP ROLE {name}"))


def run_job(
    engine: Engine, s: Settings, on_chunk: Callable[[Chunk], None] | None = None, **options: Any
) -> Outcome:
    """One run of the job in-process (`job.run`) with `Options(**options)`."""
    return job.run(
        engine, s, Request(Options(**options)), stop=Stop(), hooks=Hooks(on_chunk=on_chunk)
    )


def due_now(engine: Engine, s: Settings, outcome: Outcome) -> int:
    """A fresh count of due rows at the run's own cutoffs (the oracle over the table)."""
    assert outcome.plan is not None
    now = outcome.plan.rules.now
    return sum(1 for row in snapshot(engine).values() if oracle.is_due(row, s, now))


def assert_no_marker(*texts: str) -> None:
    for text in texts:
        assert MARK not in text, "personal data leaked into output"


def as_json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log events in `text` (other lines, e.g. a click usage message, skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of a non-terminal stderr, each of which must be one JSON log event."""
    return [json.loads(line) for line in stderr.splitlines()]


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI in-process (click's CliRunner); `result.stdout` and `result.stderr` apart."""
    return CliRunner().invoke(cli, list(args), prog_name="dispatch-retention", env=env)


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


# --- real subprocesses and fault-injection checks (faults.py and its tests) ---------------------

SCRIPT = Path(sys.executable).parent / "dispatch-retention"
AUDIT_SCHEMA = "dispatch_retention"
DUE_DAYS, YOUNG_DAYS = 500, 1  # past every window of DEFAULT_POLICIES / inside all of them
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
        found = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    found.append(event)
        return found

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


def seed_series(
    engine: Engine, ids: Iterable[int], young: Callable[[int], bool] = lambda _id: False
) -> tuple[set[int], set[int]]:
    """Insert dispatches like `dispatch()` (sms, delivered) in one statement: `young(id)` ones
    YOUNG_DAYS old (never due), the rest DUE_DAYS old (due under every DEFAULT_POLICIES
    window). Returns (due ids, young ids)."""
    all_ids = list(ids)
    flags = [bool(young(i)) for i in all_ids]
    with engine.begin() as conn:
        conn.execute(
            sql(
                "INSERT INTO dispatches (id, type, content, member_id, msisdn, email, app_token,"
                " transmission_status, delivery_status, external_delivery_status, created_at,"
                " updated_at, scheduled_at, transmitted_at, delivered_at)"
                " SELECT s.id, 'sms', jsonb_build_object('body', :mark || '-content-' || s.id),"
                " 1000 + s.id, '+47' || :mark || s.id, :mark || '.' || s.id || '@example.invalid',"
                " :mark || '-token-' || s.id, 'transmitted', 'delivered', 'delivered',"
                " t.at, t.at, t.at, t.at, t.at"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:young AS boolean[])) AS s(id, young)"
                " CROSS JOIN LATERAL (SELECT now() - make_interval(days =>"
                " CASE WHEN s.young THEN :young_days ELSE :due_days END) AS at) AS t"
            ),
            {
                "mark": MARK,
                "ids": all_ids,
                "young": flags,
                "young_days": YOUNG_DAYS,
                "due_days": DUE_DAYS,
            },
        )
    young_ids = {i for i, f in zip(all_ids, flags, strict=True) if f}
    return set(all_ids) - young_ids, young_ids


def assert_consistent(engine: Engine, due: Collection[int]) -> set[int]:
    """The invariants every fault must keep; returns the cleaned ids.

    No dispatch is half cleaned (its personal columns are all stripped iff `cleaned_at` is
    set), only due dispatches are cleaned, and the audit trail accounts for each cleaned row
    exactly once: the chunk rows sum to the cleaned rows, every cleaned row lies in exactly
    one chunk's id window with that chunk's `cleaned_at`, and every chunk's count is right."""
    cleaned: set[int] = set()
    with engine.connect() as conn:
        rows = conn.execute(
            sql("SELECT id, cleaned_at, content, msisdn, email, app_token FROM dispatches")
        ).all()
        for row_id, cleaned_at, *values in rows:
            if cleaned_at is None:
                assert all(MARK in json.dumps(v) for v in values), f"row {row_id} half cleaned"
            else:
                assert values == [{}, None, None, None], f"row {row_id} stamped, not stripped"
                cleaned.add(row_id)
        total = conn.execute(
            sql(f"SELECT coalesce(sum(rows), 0) FROM {AUDIT_SCHEMA}.chunks")
        ).scalar_one()
        unaccounted = conn.execute(
            sql(
                f"SELECT d.id, count(c.seq) FROM dispatches d LEFT JOIN {AUDIT_SCHEMA}.chunks c"
                " ON d.id BETWEEN c.first_id AND c.last_id AND c.cleaned_at = d.cleaned_at"
                " WHERE d.cleaned_at IS NOT NULL GROUP BY d.id HAVING count(c.seq) <> 1"
                " LIMIT 10"
            )
        ).all()
        miscounted = conn.execute(
            sql(
                f"SELECT c.run_id, c.seq, c.rows, count(d.id) FROM {AUDIT_SCHEMA}.chunks c"
                " LEFT JOIN dispatches d ON d.id BETWEEN c.first_id AND c.last_id"
                " AND d.cleaned_at = c.cleaned_at GROUP BY c.run_id, c.seq, c.rows"
                " HAVING c.rows <> count(d.id) LIMIT 10"
            )
        ).all()
    not_due = cleaned - set(due)
    assert not not_due, f"cleaned but not due: {sorted(not_due)[:10]}"
    assert total == len(cleaned), f"audit rows {total} != cleaned rows {len(cleaned)}"
    assert unaccounted == [], f"cleaned rows not in exactly one chunk record: {unaccounted}"
    assert miscounted == [], f"chunk records whose count is wrong: {miscounted}"
    return cleaned


def remaining_due(engine: Engine, due: Collection[int]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sql("SELECT count(*) FROM dispatches WHERE id = ANY(:ids) AND cleaned_at IS NULL"),
                {"ids": list(due)},
            ).scalar_one()
        )


def run_records(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every run record by run id, with its audited row count (the sum of its chunks)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sql(
                f"SELECT r.*, coalesce(sum(c.rows), 0) AS audited_rows, count(c.seq) AS chunks"
                f" FROM {AUDIT_SCHEMA}.runs r LEFT JOIN {AUDIT_SCHEMA}.chunks c USING (run_id)"
                " GROUP BY r.run_id ORDER BY r.started_at"
            )
        ).mappings()
        return {str(r["run_id"]): dict(r) for r in rows}
