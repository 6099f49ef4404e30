"""The figures of the docs (docs/performance.md, docs/architecture.md, bench/README.md), rendered
from bench reports.

    python -m bench.figures            # rewrite the marked figures (`make doc-figures`)
    python -m bench.figures --check    # exit 1, naming them, where the docs differ

The reports are the JSON files `python -m bench --json` writes, committed under
`docs/bench/` (one file per bench run; `bench/results/` is not committed). In the docs, a
figure sits between `<!-- figures: NAME -->` and `<!-- /figures -->`, inline in a sentence
or around whole lines; NAME is one of `RENDERERS`. Everything between the two markers is
replaced by what NAME renders from the reports, so a figure in the docs is always the one
the reports hold, and `tests/docs/test_doc_figures.py` fails when someone edits one by hand or
commits a report without running this.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import sys
from collections.abc import Callable, Iterable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import print_report

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "docs" / "bench"
DOCS = (
    REPO / "docs" / "performance.md",
    REPO / "docs" / "architecture.md",
    REPO / "bench" / "README.md",
)
MARKER = re.compile(r"<!-- figures: ([a-z0-9-]+) -->(.*?)<!-- /figures -->", re.S)
SCENARIO_ORDER = ("backlog", "nightly", "sparse", "idle")
#: the table size the prose figures are about
ROWS = 1_000_000


@dataclass(frozen=True)
class Run:
    """One committed bench report."""

    path: Path
    report: dict[str, Any]

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.report["bench"]["command"])[1:]


class Reports:
    """The committed reports, and their scenarios by table size and name."""

    def __init__(self, data: Path = DATA) -> None:
        self.runs = [Run(p, json.loads(p.read_text())) for p in sorted(data.glob("*.json"))]
        self.runs.sort(key=lambda r: (r.report["bench"]["rows"], _order(r.report["scenarios"])))
        self.scenarios: dict[tuple[int, str], dict[str, Any]] = {}
        for run in self.runs:
            for sc in run.report["scenarios"]:
                self.scenarios[(run.report["bench"]["rows"], sc["scenario"])] = sc

    def scenario(self, name: str, rows: int | None = None) -> dict[str, Any]:
        rows = ROWS if rows is None else rows
        try:
            return self.scenarios[(rows, name)]
        except KeyError:
            raise SystemExit(f"no committed bench report has {rows:,} rows, {name}") from None

    def contender(self, scenario: str, key: str, rows: int | None = None) -> dict[str, Any]:
        rows = ROWS if rows is None else rows
        found: list[dict[str, Any]] = self.scenario(scenario, rows)["contenders"]
        for c in found:
            if c["key"] == key:
                return c
        raise SystemExit(f"the {rows:,}-row {scenario} report has no contender ({key})")

    def at(self, rows: int | None = None) -> list[dict[str, Any]]:
        """Every scenario measured at `rows` (1M), in the bench's order."""
        rows = ROWS if rows is None else rows
        found = [sc for (n, _name), sc in self.scenarios.items() if n == rows]
        return sorted(found, key=lambda sc: SCENARIO_ORDER.index(sc["scenario"]))


def _shown(path: Path) -> str:
    """A path as the docs show it: from the repository's root."""
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def _order(scenarios: list[dict[str, Any]]) -> int:
    return min((SCENARIO_ORDER.index(sc["scenario"]) for sc in scenarios), default=0)


# --- formatting ------------------------------------------------------------------------------


def span(values: Iterable[float], spec: str, unit: str = "") -> str:
    """`lo-hi` (or one value when they are equal) with a unit: "0.19-0.23 s"."""
    vals = sorted(values)
    lo, hi = format(vals[0], spec), format(vals[-1], spec)
    return (lo if lo == hi else f"{lo}-{hi}") + unit


def turn_ratios(bound: dict[str, Any], other: dict[str, Any]) -> list[float]:
    """The bound's time over the other's, turn by turn (they alternate: a, b, e, a, b, e)."""
    a, o = bound["repeats"]["seconds"], other["repeats"]["seconds"]
    return [x / y for x, y in zip(a, o, strict=True)]


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


# --- the figures -----------------------------------------------------------------------------


def measured(r: Reports) -> str:
    """The commands the reports came from, and what they ran on."""
    lines = ["", "```sh"]
    for run in r.runs:
        if make := _make_command(run):
            lines.append(make)
    if len(lines) > 2:
        lines.append("# which is, once make has built bench/.job-venv:")
    lines += [".venv/bin/python -m bench " + shlex.join(run.argv) for run in r.runs]
    lines.append("make doc-figures   # the figures in this file, from the reports in docs/bench/")
    lines += ["```", ""]
    for run in r.runs:
        meta = run.report["bench"]
        st, job = meta["server_settings"], meta["job"]
        loads = "; ".join(
            f"{sc['scenario']} {sc['loadavg_before']} -> {sc['loadavg_after']}"
            for sc in run.report["scenarios"]
        )
        lines.append(
            f"- `{_shown(run.path)}`: started {meta['started_at']}, {meta['wall_s']:.0f} s in "
            f"all; PostgreSQL {meta['server_version']}, {meta['cpus']} CPUs, shared_buffers "
            f"{st['shared_buffers']}, max_wal_size {st['max_wal_size']}, wal_compression "
            f"{st['wal_compression']}; the job on Python {job.get('python', '?')} "
            f"({job.get('install', '?')} install); load average {loads}."
        )
    return "\n".join(lines) + "\n"


#: what `make bench` passes, by its variable (--job-bin is always the bench's own virtualenv)
MAKE_OPTIONS = {
    "--rows": "BENCH_ROWS",
    "--scenario": "BENCH_SCENARIO",
    "--shards": "BENCH_SHARDS",
    "--repeat": "BENCH_REPEAT",
    "--job-bin": "",
    "--json": "BENCH_JSON",
}


def _make_command(run: Run) -> str | None:
    """The `make bench` that runs `run`'s command, if make can say it."""
    args = dict(zip(run.argv[::2], run.argv[1::2], strict=False))
    if (
        set(args) != set(MAKE_OPTIONS)
        or args["--job-bin"] != "bench/.job-venv/bin/dispatch-retention"
    ):
        return None
    defaults = {"--scenario": "all", "--shards": "2", "--repeat": "3"}
    return "make bench " + " ".join(
        f"{var}={args[opt]}"
        for opt, var in MAKE_OPTIONS.items()
        if var and defaults.get(opt) != args[opt]
    )


def results(r: Reports) -> str:
    """The bench's own printout of every committed report at 1M rows."""
    parts = []
    for run in r.runs:
        if run.report["bench"]["rows"] != ROWS:
            continue
        out = io.StringIO()
        with redirect_stdout(out):
            print_report(run.report)
        parts.append(out.getvalue().strip("\n"))
    return "\n```\n" + "\n\n".join(parts) + "\n```\n"


def bound_spread(r: Reports) -> str:
    seconds = r.contender("backlog", "a")["repeats"]["seconds"]
    apart = (max(seconds) / min(seconds) - 1) * 100
    return f"{span(seconds, '.2f', ' s')} over {len(seconds)} turns ({apart:.0f} % apart)"


def job_startup(r: Reports) -> str:
    """The job's start-up (spawn to `run_started`) in each scenario's median run of (b)."""
    return span(
        (r.contender(sc["scenario"], "b")["job"]["startup_s"] for sc in r.at()), ".2f", " s"
    )


def targets(r: Reports) -> str:
    rows = ["", "| target | 1M | verdict |", "|---|---|---|"]
    for name in ("backlog", "nightly"):
        a, b = r.contender(name, "a"), r.contender(name, "b")
        turns = turn_ratios(a, b)
        below = sum(1 for t in turns if t < 0.9)
        cell = (
            f"{b['ratio_to_bound']:.3f}x wall (turns {span(turns, '.3f', 'x')}: "
            f"{below} of {len(turns)} below 0.9), {b['job']['ratio_in_run']:.3f}x in-run"
        )
        shards = r.contender(name, "e")
        cell += f"; 2 shards {shards['ratio_to_bound']:.3f}x"
        verdict = _met(b["ratio_to_bound"] >= 0.9)
        if b["ratio_to_bound"] >= 0.9:
            verdict += ", aim reached" if b["ratio_to_bound"] >= 0.95 else ", aim not reached"
        rows.append(f"| {name} >= 0.9x the bound (aim 0.95x) | {cell} | {verdict} |")
    cells, ok = [], True
    for sc in r.at():
        b = r.contender(sc["scenario"], "b")
        ch, rep = b["chunks"], b["repeats"]
        if ch["count"] == 0:
            continue
        p95s = [p for p in rep["chunk_p95_ms_each_run"] if p is not None]
        cells.append(
            f"{sc['scenario']} {ch['p95_ms']:.0f} / {ch['max_ms']:.0f} ms (all turns: p95 "
            f"{span(p95s, '.0f')}, max {rep['chunk_max_ms_all_runs']:.0f})"
        )
        ok = ok and max(p95s) <= 300 and rep["chunk_max_ms_all_runs"] <= 1000
    e = r.contender("backlog", "e")["repeats"]
    rows.append(
        f"| chunk p95 <= 300 ms, max <= 1 s (one process) | {'; '.join(cells)} | {_met(ok)}; "
        f"two shards on 2 cores: 1M backlog p95 {span(e['chunk_p95_ms_each_run'], '.0f')} ms, "
        f"max {e['chunk_max_ms_all_runs']:.0f} ms |"
    )
    rss = [c["peak_rss_mb"] for sc in r.at() for c in sc["contenders"] if c["peak_rss_mb"]]
    rows.append(
        f"| peak RSS <= 150 MB | {span(rss, '.0f', ' MB')} | {_met(max(rss) <= 150)} at 1M |"
    )
    return "\n".join(rows) + "\n"


def shard_chunks(r: Reports) -> str:
    e = r.contender("backlog", "e")["repeats"]
    return (
        f"p95 {span(e['chunk_p95_ms_each_run'], '.0f', ' ms')} over {e['runs']} turns, "
        f"max {e['chunk_max_ms_all_runs']:.0f} ms"
    )


def plan(r: Reports) -> str:
    parts = [
        f"{r.contender(sc['scenario'], 'b')['job']['plan_s']:.2f} s for the {sc['scenario']}"
        for sc in r.at()
    ]
    return ", ".join(parts) + " at 1M"


def plan_rate(r: Reports) -> str:
    job = r.contender("backlog", "b")["job"]
    rate = job["planned_due_rows"] / job["plan_s"] / 1e6
    return f"{job['planned_due_rows']:,} due rows in {job['plan_s']:.2f} s, {rate:.1f}M a second"


def chunks(r: Reports) -> str:
    return f"{r.contender('backlog', 'b')['chunks']['count']} at 1M"


def wal(r: Reports) -> str:
    lines = [""]
    for sc in r.at():
        a, b = r.contender(sc["scenario"], "a"), r.contender(sc["scenario"], "b")
        if not a["rows"]:
            continue
        disturbed = [c["name"] for c in (a, b) if c["wal_disturbed"]]
        lines.append(
            f"- **{sc['scenario'].capitalize()} at 1M:** the bound writes "
            f"{a['wal_bytes_per_row'] / 1000:.1f} KB of WAL per cleaned row with "
            f"{a['wal_fpi_per_row']:.2f} full-page images per row ({a['wal_bytes'] / 1e9:.2f} GB "
            f"in all, {a['checkpoints_during_run']} checkpoints on the server during its run); "
            f"the job {b['wal_bytes_per_row'] / 1000:.1f} KB and {b['wal_fpi_per_row']:.2f}."
            + (
                f" Other databases wrote during the runs of the {' and the '.join(disturbed)}"
                " (`~` in the table), so their figures may be inflated."
                if disturbed
                else ""
            )
        )
    return "\n".join(lines) + "\n"


def wal_backlog(r: Reports) -> str:
    a = r.contender("backlog", "a")
    return f"{a['wal_bytes_per_row'] / 1000:.1f} KB"


def backlog_breakdown(r: Reports) -> str:
    b, a = r.contender("backlog", "b"), r.contender("backlog", "a")
    j = b["job"]
    more = (j["chunks_s"] / a["seconds"] - 1) * 100
    return (
        f"the job's {b['seconds']:.2f} s are: start-up {j['startup_s']:.2f} s, connecting, "
        f"locking, recording and planning {j['plan_s']:.2f} s (the plan reads the arms' index "
        f"entries of every due row), the chunks {j['chunks_s']:.2f} s against the bound's "
        f"{a['seconds']:.2f} s ({more:+.0f} %), {j['between_chunks_s']:.2f} s between chunks "
        f"and after them (the end count included) and {j['exit_s']:.2f} s to exit"
    )


def small_scenarios(r: Reports) -> str:
    small = [sc for sc in r.at() if sc["scenario"] != "backlog"]
    bound_s = [r.contender(sc["scenario"], "a")["seconds"] for sc in small]
    in_run = [r.contender(sc["scenario"], "b")["job"]["ratio_in_run"] for sc in small]
    names = [sc["scenario"] for sc in small]
    named = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return (
        f"(the bound takes {span(bound_s, '.2f', ' s')} for {named}) stay far below their "
        f"in-run ratios ({span(in_run, '.2f', 'x')})"
    )


def _with_due_rows(r: Reports) -> list[str]:
    return [sc["scenario"] for sc in r.at() if sc["due_rows"]]


def skiplock(r: Reports) -> str:
    parts = [
        f"{r.contender(name, 'c')['ratio_to_bound']:.2f}x in the {name}"
        for name in _with_due_rows(r)
    ]
    return ", ".join(parts) + " at 1M"


def skiplock_span(r: Reports) -> str:
    ratios = [r.contender(name, "c")["ratio_to_bound"] for name in _with_due_rows(r)]
    return span(ratios, ".2f", "x")


def rate(r: Reports) -> str:
    b = r.contender("backlog", "b")
    return f"{b['rows_per_s']:,.0f} rows/s, {b['ratio_to_bound']:.2f}x the bound"


def table_growth(r: Reports) -> str:
    before, after = r.scenario("backlog")["table_mib"], r.scenario("nightly")["table_mib"]
    return f"from {before:,.0f} MiB to {after:,.0f} MiB ({(after / before - 1) * 100:+.0f} %)"


def table_size(r: Reports) -> str:
    return span((sc["table_mib"] for sc in r.at()), ",.0f", " MiB")


def backlog_due(r: Reports) -> str:
    return f"{r.scenario('backlog')['due_fraction'] * 100:.1f} %"


def verified(r: Reports) -> str:
    problems = [
        f"({c['key']}) {c['name']} in the {sc['scenario']}: {problem}"
        for sc in r.at()
        for c in sc["contenders"]
        for problem in c["problems"]
    ]
    if not problems:
        return (
            "Every run of every contender cleaned exactly the rows the bound cleaned and left "
            "none due."
        )
    return "Problems the bench reported: " + "; ".join(problems) + "."


def nightly_startup(r: Reports) -> str:
    b = r.contender("nightly", "b")
    return (
        f"the job's nightly run at 1M took {b['seconds']:.2f} s, {b['job']['startup_s']:.2f} s of "
        f"it Python's start-up"
    )


def shards_ratio(r: Reports) -> str:
    parts = [
        f"{r.contender(name, 'e')['ratio_to_bound']:.2f}x in the {name}"
        for name in _with_due_rows(r)
    ]
    return ", ".join(parts) + " at 1M"


RENDERERS: dict[str, Callable[[Reports], str]] = {
    "verified": verified,
    "nightly-startup": nightly_startup,
    "shards-ratio": shards_ratio,
    "measured": measured,
    "results": results,
    "bound-spread": bound_spread,
    "job-startup": job_startup,
    "targets": targets,
    "shard-chunks": shard_chunks,
    "plan": plan,
    "plan-rate": plan_rate,
    "chunks": chunks,
    "wal": wal,
    "wal-backlog": wal_backlog,
    "backlog-breakdown": backlog_breakdown,
    "small-scenarios": small_scenarios,
    "skiplock": skiplock,
    "skiplock-span": skiplock_span,
    "rate": rate,
    "table-growth": table_growth,
    "backlog-due": backlog_due,
    "table-size": table_size,
}


def render(text: str, reports: Reports) -> str:
    """`text` with every marked figure rendered again from `reports`."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in RENDERERS:
            raise SystemExit(f"unknown figure {name!r} (known: {', '.join(RENDERERS)})")
        return f"<!-- figures: {name} -->{RENDERERS[name](reports)}<!-- /figures -->"

    return MARKER.sub(one, text)


def stale(docs: Iterable[Path] = DOCS, data: Path = DATA) -> dict[Path, str]:
    """The docs whose figures differ from what the reports render, with the rendered text."""
    reports = Reports(data)
    out = {}
    for path in docs:
        text = path.read_text()
        rendered = render(text, reports)
        if rendered != text:
            out[path] = rendered
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.figures",
        description="Render the docs' figures from the committed bench reports.",
    )
    p.add_argument("--check", action="store_true", help="only say which docs differ (exit 1)")
    p.add_argument("--data", type=Path, default=DATA, help="the reports [docs/bench]")
    args = p.parse_args(argv)
    changed = stale(DOCS, args.data)
    for path, text in changed.items():
        name = _shown(path)
        if args.check:
            print(f"{name}: figures differ from {_shown(args.data)}; run `make doc-figures`")
        else:
            path.write_text(text)
            print(f"{name}: figures rewritten")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
