"""bench/run.py itself: a small run end to end, and how a repeated contender is reported."""

from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

REPO = Path(__file__).resolve().parent.parent


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_repeated_contender_is_its_median_run_and_keeps_every_runs_problems() -> None:
    bench = _bench_module()
    runs = []
    for seconds, problem in ((3.0, None), (1.0, "cleaned 9 rows"), (2.0, None)):
        result = bench.Result(key="b", name="job", seconds=seconds, chunk_ms=[seconds * 100])
        if problem:
            result.problems.append(problem)
        runs.append(result)

    chosen = bench.median_run(runs)

    assert chosen is runs[2]  # 1.0 < 2.0 < 3.0
    assert chosen.detail["repeats"]["seconds"] == [3.0, 1.0, 2.0]
    assert chosen.detail["repeats"]["chunk_max_ms_all_runs"] == 300.0
    assert chosen.problems == ["run 2: cleaned 9 rows"]
    single = bench.Result(key="a", name="bound", seconds=1.0)
    assert bench.median_run([single]) is single
    assert "repeats" not in single.detail


@pytest.mark.slow
def test_a_small_bench_run_verifies_every_contender_and_drops_its_databases(
    server_url: URL, tmp_path: Path
) -> None:
    url = server_url.set(drivername="postgresql").render_as_string(hide_password=False)
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
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

    report = json.loads(out.read_text())
    # without --job-bin: the job beside this Python, the development install
    job_install = report["bench"]["job"]
    assert Path(job_install["bin"]) == Path(sys.executable).with_name("dispatch-retention")
    assert (job_install["python"], job_install["install"]) == (
        platform.python_version(),
        "editable",
    )
    (scenario,) = report["scenarios"]
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

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        left = conn.execute(
            text("SELECT count(*) FROM pg_database WHERE datname LIKE :prefix"),
            {"prefix": f"bench\\_{proc.pid}\\_%"},
        ).scalar_one()
    admin.dispose()
    assert left == 0
