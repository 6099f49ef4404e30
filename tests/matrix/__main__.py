"""`python -m tests.matrix [--versions 14,18] [-- PYTEST_ARGS]` (`make test-matrix`): the
compatibility subset of the suite (`SUBSET`) on each PostgreSQL major version, each on a
throwaway server of its own (`servers.server`), then a table of the versions; exits 1 when a
version failed (its server, its version or a test)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from tests.matrix import servers

ROOT = Path(__file__).resolve().parents[2]
#: The tests that say the job works on a server version: the oracle property (what is cleaned),
#: the least-privilege roles (the catalogs and GRANTs, the read-only role's view), every
#: command end to end, every table shape an application makes (enum types, codes, json,
#: plain timestamps, partitions), the shapes refused on connecting (read from each version's
#: catalog: constraints, rules, inheritance, replica identity), and the audit trail's hash
#: chain (written by the server's triggers, read back here): the trail's catalog as each
#: version describes it, chunks' transaction ids, triggers ENABLE ALWAYS, the writing role.
SUBSET = (
    "tests/run/test_cleaner.py::test_run_cleans_exactly_what_the_oracle_says",
    "tests/checks/test_privileges.py",
    "tests/trail/test_facts_view.py",
    "tests/matrix/test_smoke.py",
    "tests/catalog/test_real_tables.py",
    "tests/catalog/test_table_fit.py",
    "tests/catalog/test_partitioned_tables.py",
    "tests/catalog/test_trust_table_shapes.py",
    "tests/checks/test_audit_verify.py::test_every_write_to_the_trail_is_an_event_hashed_by_the_database",
    "tests/checks/test_audit_verify.py::test_the_read_only_role_verifies_the_trail",
    "tests/checks/test_audit_verify.py::test_the_owners_forgeries_of_the_chain_are_caught",
    "tests/checks/test_audit_verify.py::test_a_chunk_the_dispatches_do_not_bear_out_is_caught",
    "tests/trail/test_trail_catalog.py",
    "tests/trail/test_role_forgeries.py::test_a_cleaning_the_run_role_fabricated_is_caught",
    "tests/trail/test_role_forgeries.py::test_a_replica_session_does_not_skip_the_guards",
    "tests/trail/test_role_forgeries.py::test_an_honest_set_role_is_recorded_and_checks_out",
)


@dataclass
class Result:
    """What one version came to; `problem` when it could not be tested as a whole."""

    major: int
    source: str = "-"
    server_version: str = "-"
    passed: int = 0
    failed: list[str] = field(default_factory=list)  # test ids
    seconds: float = 0.0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.failed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.matrix", description=__doc__)
    parser.add_argument(
        "--versions",
        type=majors,
        default=list(servers.SOURCES),
        help=f"major versions, comma-separated (default: {','.join(map(str, servers.SOURCES))})",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / ".cache" / "postgres",
        help="where downloaded releases are kept (default: .cache/postgres)",
    )
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args()
    # a stop from outside (CI's timeout) unwinds like an error: every server is stopped
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))

    for home in servers.sweep_stale():
        print(f"removed {home} and stopped its server, left by an earlier run")
    started = time.monotonic()
    cache = args.cache.resolve()
    results = [check_version(major, cache, args.pytest_args) for major in args.versions]
    print(table(results))
    for result in results:
        for test in result.failed:
            print(f"FAILED on {result.major}: {test}")
        if result.problem:
            print(f"NOT TESTED on {result.major}: {result.problem}")
    print(f"matrix: {len(results)} PostgreSQL versions in {time.monotonic() - started:.0f} s")
    return 0 if all(r.ok for r in results) else 1


def majors(text: str) -> list[int]:
    """`--versions`: major versions the matrix has a source for."""
    try:
        chosen = [int(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of major versions: {text!r}") from None
    if unknown := sorted(set(chosen) - set(servers.SOURCES)):
        raise argparse.ArgumentTypeError(f"no source for {unknown}; known: {list(servers.SOURCES)}")
    return chosen


def check_version(major: int, cache: Path, pytest_args: list[str]) -> Result:
    """The subset on a fresh server of `major`."""
    result = Result(major)
    started = time.monotonic()
    print(f"\n=== PostgreSQL {major} ===", flush=True)
    try:
        binaries = servers.install(major, cache)
        result.source = binaries.source
        with servers.server(binaries, major) as server:
            result.server_version = server.version
            if server.major != major:
                result.problem = f"the server says it is {server.version}, not {major}"
            else:
                run_subset(server, pytest_args, result)
    except servers.MatrixError as exc:
        result.problem = str(exc)
        print(f"PostgreSQL {major}: {exc}", file=sys.stderr)
    result.seconds = time.monotonic() - started
    return result


def run_subset(server: servers.Server, pytest_args: list[str], result: Result) -> None:
    """pytest on `SUBSET` against `server`; its counts and failed test ids into `result`."""
    report = server.home / "junit.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *SUBSET, "-p", "no:cacheprovider",
         f"--junitxml={report}", *pytest_args],
        cwd=ROOT,
        env={**os.environ, "TEST_DATABASE_URL": server.url},
        check=False,
    )  # fmt: skip
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                result.failed.append(test_id)
            elif case.find("skipped") is None:
                result.passed += 1
    if done.returncode != 0 and not result.failed:
        result.problem = f"pytest exited {done.returncode}"


def table(results: list[Result]) -> str:
    """The versions as a plain-text table, one row each."""
    header = ("postgres", "source", "server_version", "passed", "failed", "seconds", "result")
    rows = [
        (
            str(r.major),
            r.source,
            r.server_version,
            str(r.passed),
            str(len(r.failed)),
            f"{r.seconds:.0f}",
            "ok" if r.ok else "FAILED" if r.problem is None else "NOT TESTED",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    numeric = {3, 4, 5}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join(
        ["", line(header), line(tuple("-" * w for w in widths)), *(line(row) for row in rows)]
    )


if __name__ == "__main__":
    sys.exit(main())
