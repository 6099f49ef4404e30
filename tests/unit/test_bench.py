"""The bench (`python -m bench`) itself: a small run end to end, how a repeated contender is
reported, the contender table, and the statements it compiles."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bench import contenders, report, scenarios, server
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import URL

from dispatch_retention import config
from dispatch_retention.rule import dispatch_table, policy
from tests.matrix import servers

REPO = Path(__file__).resolve().parents[2]


def test_a_repeated_contender_is_its_median_run_and_keeps_every_runs_problems() -> None:
    """The run of median time stands for the contender and carries every run's problems."""
    runs = []
    for seconds, problem in ((3.0, None), (1.0, "cleaned 9 rows"), (2.0, None)):
        result = report.Result(key="b", name="job", seconds=seconds, chunk_ms=[seconds * 100])
        if problem:
            result.problems.append(problem)
        runs.append(result)

    chosen = report.median_run(runs)

    assert chosen is runs[2]  # 1.0 < 2.0 < 3.0
    assert chosen.detail["repeats"]["seconds"] == [3.0, 1.0, 2.0]
    assert chosen.detail["repeats"]["chunk_max_ms_all_runs"] == 300.0
    assert chosen.problems == ["run 2: cleaned 9 rows"]
    single = report.Result(key="a", name="bound", seconds=1.0)
    assert report.median_run([single]) is single
    assert "repeats" not in single.detail


def test_the_contender_table_names_each_letter_once_in_the_order_they_run() -> None:
    """Letters, names and which contenders repeat, as the command line and report use them."""
    table = [(c.key, c.name, c.repeats, c.runs_job) for c in contenders.CONTENDERS]

    assert table == [
        ("a", "bound", True, False),
        ("b", "job", True, True),
        ("e", "shards", True, True),
        ("f", "unchained", True, True),
        ("c", "skiplock", False, False),
        ("d", "naive", False, False),
    ]
    assert set(contenders.BY_KEY) == set("abcdef")


def test_the_bound_writes_the_jobs_cleaned_values_as_literal_sql() -> None:
    """policy.cleaned_values() compiles with literal values (its JSONB replacement included)."""
    settings = config.load(REPO / "config" / "retention.toml")
    table = dispatch_table.dispatches_table(settings.target)
    now = datetime(2026, 1, 1, tzinfo=UTC)

    stmt = server.sql(
        update(table)
        .where(scenarios.due_expr(settings, table, now))
        .values(policy.cleaned_values(settings))
    )

    assert stmt.startswith(
        "UPDATE dispatches SET content=CAST('{}' AS JSONB), msisdn=NULL, email=NULL, "
        "app_token=NULL WHERE dispatches.cleaned_at IS NULL AND "
    )
    assert "%(" not in stmt  # no bound parameter left


@pytest.mark.slow
def test_a_small_bench_run_verifies_every_contender_and_drops_its_databases(
    server_url: URL, tmp_path: Path
) -> None:
    """`python -m bench` on 3,000 rows: every contender verified, every database dropped."""
    url = server_url.set(drivername="postgresql").render_as_string(hide_password=False)
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench",
            "--rows",
            "3000",
            "--scenario",
            "nightly",
            "--contenders",
            "ab",
            "--shards",
            "2",
            "--repeat",
            "2",
            "--database-url",
            url,
            "--json",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output.decode()[-2000:]

    written = json.loads(out.read_text())
    # without --job-bin: the job beside this Python, the development install
    job_install = written["bench"]["job"]
    assert Path(job_install["bin"]) == Path(sys.executable).with_name("dispatch-retention")
    assert (job_install["python"], job_install["install"]) == (
        platform.python_version(),
        "editable",
    )
    (scenario,) = written["scenarios"]
    assert scenario["due_rows"] > 0
    contenders = {c["key"]: c for c in scenario["contenders"]}
    assert set(contenders) == {"a", "b", "e"}
    for c in contenders.values():
        assert c["problems"] == []
        assert c["rows"] == c["verified_rows"] == scenario["due_rows"]
        assert c["still_due_after"] == 0
        assert c["repeats"]["runs"] == 2
        assert c["seconds"] in c["repeats"]["seconds"]
    bound, job = contenders["a"], contenders["b"]
    # (the seconds in the report are rounded to milliseconds)
    assert job["ratio_to_bound"] == pytest.approx(bound["seconds"] / job["seconds"], abs=0.002)
    assert [s["shard"] for s in contenders["e"]["shards"]] == ["0/2", "1/2"]
    # the job's phases add up: start, plan, the chunks (with their sweeps), the end count,
    # the record's close and the exit account for its wall time
    phases = job["job"]
    assert 0 <= phases["sweep_s"] <= phases["chunks_s"]
    assert phases["end_count_s"] > 0 and phases["close_s"] >= 0
    walked = phases["chunks_s"] + phases["end_count_s"] + phases["close_s"]
    assert walked <= phases["clean_s"] + 0.01
    assert "(b) phases: start" in output.decode()

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        left = conn.execute(
            text("SELECT count(*) FROM pg_database WHERE datname LIKE :prefix"),
            {"prefix": f"bench\\_{proc.pid}\\_%"},
        ).scalar_one()
    admin.dispose()
    assert left == 0


@pytest.mark.slow
def test_the_live_scenario_runs_end_to_end_and_reports_every_figure(tmp_path: Path) -> None:
    """`python -m bench.live` on 3,000 rows: its own primary and replica made and removed,
    each variant's turn repeats the run until the load has lasted as long with it as
    without, and the report has every figure of docs/performance.md's live table."""
    from bench import live

    out = tmp_path / "live.json"
    before = set(Path(tempfile.gettempdir()).glob(f"{servers.PREFIX}*"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.live", "--rows", "3000", "--turns", "1", "--load-s",
         "2", "--bound-turns", "1", "--rate", "30", "--variants", "defaults,half",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert set(Path(tempfile.gettempdir()).glob(f"{servers.PREFIX}*")) <= before
    written = json.loads(out.read_text())
    due = written["bench"]["due_rows"]
    assert due > 0 and written["bound_s"] > 0 and written["bound"][0]["rows"] == due
    assert set(written["variants"]) == {"defaults", "half"}
    for name, v in written["variants"].items():
        assert v["statuses"] == ["succeeded"], name
        (turn,) = v["turn_details"]
        assert turn["runs"] >= 1 and turn["rows_cleaned"] == due * turn["runs"]
        assert turn["phases"]["on"]["s"] >= 2 and turn["phases"]["off"]["s"] >= 2
        for kind in live.KINDS:
            k = v["kinds"][kind]
            for figure in ("off_p50", "off_p99", "on_p50", "on_p99", "on_max", "p99_ratio"):
                assert isinstance(k[figure], float | int) and k[figure] > 0, (name, kind, figure)
            assert k["off_errors"] == 0 and k["on_errors"] == {}
        assert v["throughput_vs_bound"] > 0 and v["chunk_p99_ms"] > 0
        assert v["wal_bytes_per_row"] > 0 and v["peak_rss_mb"] > 0
        assert v["replica_lag_on"]["bytes"] >= 0 and 0 <= v["cpu_busy_off"] <= 1
        assert v["late_receipt_budget_ms"] > v["kinds"]["late_receipt"]["off_p99"]
        assert turn["stalls"] and {"kind", "ms", "at_s", "during", "run"} <= set(turn["stalls"][0])
    printed = proc.stdout
    assert "[defaults]" in printed and "[half]" in printed and "slowest operations" in printed


def test_a_live_variant_changes_only_the_keys_it_names(tmp_path: Path) -> None:
    from bench import live

    base = REPO / "config" / "retention.toml"
    for name, changes in live.VARIANTS.items():
        written = live.variant_config(base, changes, tmp_path / f"{name}.toml")
        s = config.load(written)
        for key, value in changes.items():
            assert getattr(s.clean, key) == pytest.approx(float(value)), (name, key)
        kept = base.read_text().splitlines()
        new = {line for line in written.read_text().splitlines() if line not in kept}
        assert new == {f"{k} = {v}" for k, v in changes.items()} - set(kept), name
