"""Benchmark the retention job against the single-statement bound.

    python -m bench --rows N --scenario backlog|nightly|sparse|idle|all --json PATH

One process run, per scenario: a template database shaped for the scenario
(`bench.scenarios`), then every chosen contender on its own copy of it, verified on that
copy against the bound (`bench.contenders`); the report is printed and written as JSON
(`bench.report`).

Databases are created on the server of --database-url, else $BENCH_DATABASE_URL, else
$TEST_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/postgres, and all of them are
dropped at the end, also on an error or SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

try:
    from dispatch_retention import config, errors

    from .contenders import BY_KEY, CONTENDERS, Bench, run_scenario
    from .jobs import job_install
    from .report import print_report, write_json
    from .scenarios import SCENARIOS
    from .server import DEFAULT_URL, REPO, Server, log
except ImportError as exc:  # pragma: no cover - a usage problem, not a bug
    sys.exit(
        f"python -m bench needs the project's environment ({exc}).\n"
        "Run it as `.venv/bin/python -m bench ...` or `make bench`."
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) arrived: unwind so that the databases are dropped.

    A KeyboardInterrupt, so that psycopg cancels the query in progress on the server."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark dispatch-retention against the single-statement bound.",
    )
    p.add_argument("--rows", type=int, default=100_000, help="dispatches per scenario [100000]")
    p.add_argument(
        "--scenario", choices=(*SCENARIOS, "all"), default="all", help="which shape [all]"
    )
    p.add_argument("--json", dest="json_path", type=Path, help="write the results here as JSON")
    p.add_argument(
        "--database-url",
        help="server to create the bench databases on [$BENCH_DATABASE_URL, "
        f"$TEST_DATABASE_URL, {DEFAULT_URL}]",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=REPO / "config" / "retention.toml",
        help="the job's config [config/retention.toml]",
    )
    p.add_argument(
        "--contenders",
        default="abcd",
        help="which contenders, e.g. 'ab' [abcd]: a bound, b job, c skiplock, d naive, e shards, "
        "f the job with the audit trail's hash chain off",
    )
    p.add_argument(
        "--job-bin",
        type=Path,
        default=os.environ.get("BENCH_JOB_BIN") or None,
        help="the dispatch-retention executable to measure [$BENCH_JOB_BIN, else the one "
        "beside this Python]; `make bench` builds one as the image has it: a wheel and the "
        "locked dependencies in a virtualenv of its own",
    )
    p.add_argument(
        "--job-args",
        default="",
        help="extra arguments for `dispatch-retention run`, e.g. '--chunk-size 10000'",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=0,
        help="also run (e): N job processes at once, `run --shard I/N` each [off]",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run (a), (b) and (e) this many times each, taking turns, and report the run of "
        "median time (the others are listed beside it) [1]",
    )
    p.add_argument("--chunk-size", type=int, help="(c)'s chunk size [the config's chunk_size]")
    p.add_argument("--naive-sample", type=int, default=20_000, help="(d)'s sample rows [20000]")
    p.add_argument("--naive-commit", type=int, default=1000, help="(d) commits every N [1000]")
    p.add_argument("--sparse-rows", type=int, default=3000, help="due rows left in sparse [3000]")
    p.add_argument(
        "--nightly-fraction",
        type=float,
        default=0.01,
        help="share of the table due in nightly [0.01]",
    )
    p.add_argument(
        "--margin-hours",
        type=float,
        default=24.0,
        help="no row comes due within this long of the template's build [24]",
    )
    p.add_argument(
        "--autovacuum",
        choices=("on", "off"),
        default="off",
        help="autovacuum on the bench table [off: its timing is noise between contenders]",
    )
    args = p.parse_args(argv)
    p_contenders = args.contenders.lower()
    if args.shards and args.shards > 1 and "e" not in p_contenders:
        p_contenders += "e"
    args.contenders = [c.key for c in CONTENDERS if c.key in p_contenders]
    if "e" in args.contenders and (args.shards or 0) < 2:
        p.error("contender e needs --shards N (N >= 2)")
    if not args.contenders:
        p.error("--contenders: name at least one of a, b, c, d")
    if args.rows < 1000:
        p.error("--rows: at least 1000")
    if args.repeat < 1:
        p.error("--repeat: at least 1")
    args.config = args.config.absolute()
    args.database_url = (
        args.database_url
        or os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("TEST_DATABASE_URL")
        or DEFAULT_URL
    )
    return args


@contextmanager
def terminated_on_signals() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = config.load(args.config)
    except errors.ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    server = Server(args.database_url)
    prefix = f"bench_{os.getpid()}"
    started = time.monotonic()
    report: dict[str, Any] = {
        "bench": {
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "rows": args.rows,
            "scenarios": scenarios,
            "contenders": {k: BY_KEY[k].name for k in args.contenders},
            "config": str(args.config),
            "job_args": args.job_args,
            "server": server.libpq_url("", hide_password=True),
            "server_version": server.version,
            "server_settings": server.settings,
            "autovacuum": args.autovacuum,
            "repeat": args.repeat,
            "naive_sample": args.naive_sample,
            "naive_commit": args.naive_commit,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "scenarios": [],
    }
    bench = Bench(server, settings, args)
    report["bench"]["job"] = job_install(bench.job_bin)
    failed: BaseException | None = None
    try:
        with terminated_on_signals():
            for scenario in scenarios:
                report["scenarios"].append(run_scenario(bench, scenario, prefix))
    except (Exception, KeyboardInterrupt) as exc:
        failed = exc
    finally:
        for proc in list(bench.procs):
            if proc.poll() is None:
                proc.kill()  # our own child, by its pid
                with suppress(ChildProcessError):
                    proc.wait()
        server.drop_all()
        server.admin.dispose()
    report["bench"]["wall_s"] = round(time.monotonic() - started, 1)
    if failed is not None:
        report["error"] = f"{type(failed).__name__}: {failed}"
    if report["scenarios"]:
        print_report(report)
    if args.json_path:
        write_json(report, args.json_path)
        log(f"wrote {args.json_path}")
    if failed is not None:
        if isinstance(failed, KeyboardInterrupt):
            signum = failed.signum if isinstance(failed, Terminated) else signal.SIGINT
            log(f"stopped by signal {signum}; the bench databases were dropped")
            return 128 + signum
        log(f"failed: {report['error']}; the bench databases were dropped")
        raise failed
    problems = sum(len(c["problems"]) for s in report["scenarios"] for c in s["contenders"])
    if problems:
        log(f"{problems} problem(s): see the WARNING lines")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
