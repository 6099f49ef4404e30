"""The report on a long history: a year of nightly runs with 1,000 chunks each, how long
`report` takes and how large its files are.

    python -m bench.evidence [--days 365] [--chunks 1000] [--json PATH]
    make bench-evidence

The history is written straight into the trail on a server of its own whose clock is moved a
day at a time (libfaketime, as tests/report/history.py): per day a transaction that opens a
run, then one that records its plan, inserts its chunks (each a window of 5 cleaned rows, by
two policies) and closes it `succeeded`, so every guard and the hash chain's triggers run as
for the job's own writes. The dispatches table stays empty: the chain check then finds each
chunk's count not borne out by the table (it lists 20 findings and counts the rest), which
costs it what counting them would. Printed: the report's time in all and without the chain
check (the check's own time apart, as `audit verify`), and the size of the HTML and the JSON.
Targets (issue 28): under 5 s and 2 MB without the chain check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from tests.report import history

from dispatch_retention import config
from dispatch_retention.checks import audit_verify, evidence
from dispatch_retention.config import Target
from dispatch_retention.demo.synthetic import create_dispatches
from dispatch_retention.pg import engines
from dispatch_retention.report import html
from dispatch_retention.trail import migrate

AUDIT = "dispatch_retention"


def write_year(engine: Engine, clock: Path, days: int, chunks: int) -> None:
    """One succeeded run a day for `days` days, `chunks` chunks each."""
    run_sql = text(
        f"INSERT INTO {AUDIT}.runs (run_id, status, trigger, host, tool_version, db_user, "
        "target_table, options, config_path, config_sha256, config_text) VALUES (:id, "
        "'running', 'cron', 'bench', '0.1.0', current_user, 'public.dispatches', '{}', "
        "'retention.toml', repeat('0', 64), '')"
    )
    plan_sql = text(
        f"UPDATE {AUDIT}.runs SET planned_at = now(), due_rows = :due, held_rows = 0, "
        "waiting_grace_rows = 0, policies = CAST(:policies AS jsonb) WHERE run_id = :id"
    )
    chunks_sql = text(
        f"INSERT INTO {AUDIT}.chunks (run_id, seq, first_id, last_id, rows, cleaned_at, "
        "by_policy, skipped_locked, kind) SELECT :id, g, :base + g * 10, :base + g * 10 + 9, "
        """5, now(), '{"sms": 3, "default": 2}', false, 'clean' """
        "FROM generate_series(1, :chunks) AS g"
    )
    close_sql = text(
        f"UPDATE {AUDIT}.runs SET status = 'succeeded', remaining_due_rows = 0 WHERE run_id = :id"
    )
    for day in range(days, 0, -1):
        history.set_clock(clock, day)
        run_id = str(uuid.uuid4())
        policies = json.dumps(
            [
                {"name": "sms", "retention_days": 90, "cutoff": "2026-01-01T00:00:00+00:00",
                 "grace_cutoff": "2026-01-01T00:00:00+00:00", "due_rows": 3 * chunks,
                 "oldest_due_at": "2025-09-01T00:00:00+00:00"},
                {"name": "default", "retention_days": 365, "cutoff": "2025-01-01T00:00:00+00:00",
                 "grace_cutoff": "2025-01-01T00:00:00+00:00", "due_rows": 2 * chunks,
                 "oldest_due_at": None},
            ]
        )  # fmt: skip
        with engine.begin() as conn:  # the plan comes after the run's start, as the job's
            conn.execute(run_sql, {"id": run_id})
        with engine.begin() as conn:
            conn.execute(plan_sql, {"id": run_id, "due": 5 * chunks, "policies": policies})
            base = (days - day) * chunks * 10
            conn.execute(chunks_sql, {"id": run_id, "base": base, "chunks": chunks})
            conn.execute(close_sql, {"id": run_id})


@contextmanager
def timed(into: dict[str, float], name: str) -> Any:
    start = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - start


def measure(engine: Engine, settings: config.Settings, since: datetime) -> dict[str, Any]:
    """The report made in this process, with the chain check's time apart."""
    spent: dict[str, float] = {}
    check = audit_verify.check

    def chain(*args: Any, **kwargs: Any) -> audit_verify.ChainReport:
        with timed(spent, "chain_check_s"):
            return check(*args, **kwargs)

    audit_verify.check = chain
    try:
        with timed(spent, "gather_s"):
            pack = evidence.gather(engine, settings, evidence.Options(since))
    finally:
        audit_verify.check = check
    with timed(spent, "html_s"):
        page = html.render(pack)
    from dispatch_retention import render

    with timed(spent, "json_s"):
        document = render.to_json(pack)
    without_chain = spent["gather_s"] - spent["chain_check_s"] + spent["html_s"]
    return {
        "runs": pack["runs"]["count"],
        "chunks_counted": pack["audit_chain"]["chunks_counted"],
        "events": pack["audit_chain"]["events"],
        "report_s_without_chain_check": round(without_chain, 3),
        "chain_check_s": round(spent["chain_check_s"], 3),
        "report_s_in_all": round(spent["gather_s"] + spent["html_s"], 3),
        "json_s": round(spent["json_s"], 3),
        "html_bytes": len(page.encode()),
        "json_bytes": len(document.encode()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    settings = config.parse("[clean]\n[[policy]]\nname = 'sms'\nretention_days = 90\n"
                            "where = { type = 'sms' }\n[[policy]]\nname = 'default'\n"
                            "retention_days = 365\n", "bench.toml")  # fmt: skip
    with tempfile.NamedTemporaryFile(prefix="dr-clock-", delete=False) as handle:
        clock = Path(handle.name)
    clock.chmod(0o644)
    history.set_clock(clock, args.days + 1)
    try:
        with history.clocked_server(clock) as server:
            admin = create_engine(engines.parse_url(server.url), isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text("CREATE DATABASE evidence"))
            admin.dispose()
            engine = create_engine(engines.parse_url(server.url).set(database="evidence"))
            with engine.begin() as conn:
                create_dispatches(conn, Target())
            migrate.upgrade(engine, settings.audit.schema_)
            started = time.perf_counter()
            write_year(engine, clock, args.days, args.chunks)
            print(f"wrote {args.days} runs of {args.chunks} chunks in "
                  f"{time.perf_counter() - started:.0f} s")  # fmt: skip
            history.set_clock(clock, 0)
            since = datetime.now(UTC).replace(year=datetime.now(UTC).year - 2)
            figures = measure(engine, settings, since)
            engine.dispose()
    finally:
        clock.unlink(missing_ok=True)
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    print(
        "targets: under 5 s and 2 MB without the chain check: "
        + ("met" if figures["report_s_without_chain_check"] < 5
           and figures["html_bytes"] < 2_000_000 else "NOT met")
    )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
