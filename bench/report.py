"""What a contender measured (`Result`), how repeated runs reduce to one, and the report.

The report is one dict, written as JSON with `--json` and printed as tables by
`print_report()`; `bench/README.md` ("What it reports") describes its fields, and
`bench/figures.py` renders the figures of docs/performance.md from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def chunk_stats(ms: list[float]) -> dict[str, Any]:
    return {
        "count": len(ms),
        "p50_ms": _r(percentile(ms, 50)),
        "p95_ms": _r(percentile(ms, 95)),
        "max_ms": _r(max(ms) if ms else None),
        "sum_ms": _r(sum(ms)),
    }


@dataclass
class Result:
    key: str
    name: str
    rows: int = 0
    seconds: float = 0.0
    chunk_ms: list[float] = field(default_factory=list)
    extrapolated: bool = False
    sample_rows: int | None = None
    peak_rss_mb: float | None = None
    wal: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    verified_rows: int | None = None
    still_due: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.seconds if self.rows and self.seconds > 0 else None

    def as_dict(self, bound: Result | None) -> dict[str, Any]:
        wal_bytes = self.wal.get("bytes")
        per = self.sample_rows if self.extrapolated else self.rows
        out: dict[str, Any] = {
            "key": self.key,
            "name": self.name,
            "rows": self.rows,
            "seconds": _r(self.seconds, 3),
            "rows_per_s": _r(self.rows_per_s),
            "ratio_to_bound": ratio(bound, self),
            "chunks": chunk_stats(self.chunk_ms),
            "peak_rss_mb": _r(self.peak_rss_mb),
            "wal_bytes": wal_bytes,
            "wal_bytes_per_row": _r(wal_bytes / per) if wal_bytes is not None and per else None,
            "wal_fpi_per_row": _r(self.wal["fpi"] / per, 2) if "fpi" in self.wal and per else None,
            "wal_records_per_row": (
                _r(self.wal["records"] / per, 2) if "records" in self.wal and per else None
            ),
            "checkpoints_during_run": self.wal.get("checkpoints"),
            "wal_disturbed": bool(
                self.wal.get("other_databases_created")
                or self.wal.get("other_databases_rows_written")
            ),
            "wal_other_activity": {
                "databases_created": self.wal.get("other_databases_created"),
                "rows_written": self.wal.get("other_databases_rows_written"),
            },
            "extrapolated": self.extrapolated,
            "sample_rows": self.sample_rows,
            "verified_rows": self.verified_rows,
            "still_due_after": self.still_due,
            "problems": self.problems,
        }
        out.update(self.detail)
        return out


def median_run(measured: list[Result]) -> Result:
    """The run of median time stands for a repeated contender; the others are kept beside it.

    Every run's problems count (each run is verified on its own copy), and the chunk
    figures also give the worst chunk of any run."""
    chosen = sorted(measured, key=lambda r: r.seconds)[(len(measured) - 1) // 2]
    if len(measured) > 1:
        chosen.detail["repeats"] = {
            "runs": len(measured),
            "seconds": [_r(r.seconds, 3) for r in measured],
            "chunk_max_ms_all_runs": _r(max(max(r.chunk_ms, default=0.0) for r in measured)),
            "chunk_p95_ms_each_run": [chunk_stats(r.chunk_ms)["p95_ms"] for r in measured],
        }
        for i, run in enumerate(measured):
            if run is not chosen:
                chosen.problems.extend(f"run {i + 1}: {problem}" for problem in run.problems)
    return chosen


def ratio(bound: Result | None, other: Result, seconds: float | None = None) -> float | None:
    """Throughput relative to the bound: its time over ours (rows are equal when verified)."""
    mine = other.seconds if seconds is None else seconds
    if bound is None or bound.seconds <= 0 or mine <= 0:
        return None
    return round(bound.seconds / mine, 3)


def fmt(value: Any, spec: str = "", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def print_report(report: dict[str, Any]) -> None:
    meta = report["bench"]
    print(
        f"\ndispatch-retention bench: {meta['rows']:,} rows, PostgreSQL {meta['server_version']}, "
        f"{meta['cpus']} CPUs, shared_buffers {meta['server_settings']['shared_buffers']}, "
        f"max_wal_size {meta['server_settings']['max_wal_size']}, "
        f"autovacuum on the table {meta['autovacuum']}"
    )
    job = meta.get("job", {})
    print(
        f"job: {job.get('bin')} (Python {job.get('python', '?')} at {job.get('executable', '?')},"
        f" {job.get('install', 'unknown')} install)"
    )
    for sc in report["scenarios"]:
        for line in scenario_lines(sc):
            print(line)
    print(
        f"\nx(a): the bound's time over the contender's (throughput ratio). Chunk times: (a) the "
        f"one statement, (b) the job's chunk_committed ms, (c) measured per chunk, (d) per "
        f"{report['bench']['naive_commit']}-row commit. WAL is cluster-wide (pg_current_wal_lsn "
        f"diff); ~ marks a figure that other databases' writes during the run may inflate. "
        f"*: extrapolated from a sample. Total wall time {meta['wall_s']:.0f}s."
    )


HEADER = (
    f"{'contender':<16}{'rows':>11}{'seconds':>10}{'rows/s':>10}{'x(a)':>7}"
    f"{'chunks':>8}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'RSS MB':>8}"
    f"{'WAL B/row':>10}{'FPI/row':>8}"
)


def scenario_lines(sc: dict[str, Any]) -> list[str]:
    """One scenario's table as printed: a blank line, its title, the table, the notes."""
    shape = ", ".join(f"{k}={v}" for k, v in sc["shape"].items())
    lines = [
        "",
        f"== {sc['scenario']}: {sc['rows']:,} rows ({sc['table_mib']:,.0f} MiB), "
        f"{sc['due_rows']:,} due ({sc['due_fraction'] * 100:.2f} %); {shape}; "
        f"load {sc['loadavg_before']} -> {sc['loadavg_after']}",
        HEADER,
        "-" * len(HEADER),
    ]
    for c in sc["contenders"]:
        label = f"({c['key']}) {c['name']}" + ("*" if c["extrapolated"] else "")
        ch = c["chunks"]
        lines.append(
            f"{label:<16}{c['rows']:>11,}{fmt(c['seconds'], '.2f'):>10}"
            f"{fmt(c['rows_per_s'], ',.0f'):>10}{fmt(c['ratio_to_bound'], '.2f'):>7}"
            f"{ch['count']:>8}{fmt(ch['p50_ms'], '.0f'):>9}{fmt(ch['p95_ms'], '.0f'):>9}"
            f"{fmt(ch['max_ms'], '.0f'):>9}{fmt(c['peak_rss_mb'], '.0f'):>8}"
            f"{fmt(c['wal_bytes_per_row'], ',.0f') + ('~' if c['wal_disturbed'] else ''):>10}"
            f"{fmt(c['wal_fpi_per_row'], '.2f'):>8}"
        )
    for c in sc["contenders"]:
        lines.extend(_notes(c))
    for c in sc["contenders"]:
        lines.extend(f"   WARNING ({c['key']}) {c['name']}: {problem}" for problem in c["problems"])
    return lines


def _notes(c: dict[str, Any]) -> list[str]:
    """The lines under a scenario's table about one contender."""
    lines = []
    if c["key"] == "b" and "job" in c:
        j = c["job"]
        lines.append(
            f"   (b) time: startup {fmt(j['startup_s'], '.2f')}s, plan "
            f"{fmt(j['plan_s'], '.2f')}s, chunks {fmt(j['chunks_s'], '.2f')}s, between "
            f"chunks {fmt(j['between_chunks_s'], '.2f')}s, exit {fmt(j['exit_s'], '.2f')}s;"
            f" in-run x(a) {fmt(j.get('ratio_in_run'), '.2f')}; job CPU "
            f"{fmt(j['cpu_user_s'], '.1f')}s user + {fmt(j['cpu_sys_s'], '.1f')}s sys"
        )
        if j.get("end_count_s") is not None:  # reports from before the phases have none
            lines.append(
                f"   (b) phases: start {fmt(j['startup_s'], '.2f')}s, plan "
                f"{fmt(j['plan_s'], '.2f')}s, chunks {fmt(j['chunks_s'], '.2f')}s (sweep "
                f"{fmt(j['sweep_s'], '.2f')}s), end count {fmt(j['end_count_s'], '.2f')}s, "
                f"close {fmt(j['close_s'], '.2f')}s, exit {fmt(j['exit_s'], '.2f')}s"
            )
        if "window_ids" in j:
            w = j["window_ids"]
            lines.append(
                f"   (b) id windows: first {w['first']:,}, min {w['min']:,}, max "
                f"{w['max']:,}; most rows in one chunk {j['rows_per_chunk_max']:,}"
            )
    if c["key"] == "e" and "shards" in c:
        parts = ", ".join(
            f"{sh['shard']}: {sh['rows']:,} rows in {fmt(sh['wall_s'], '.2f')}s "
            f"(plan {fmt(sh['plan_s'], '.2f')}s)"
            for sh in c["shards"]
        )
        lines.append(f"   (e) {parts}")
    if "repeats" in c:
        rep = c["repeats"]
        runs = ", ".join(fmt(x, ".2f") for x in rep["seconds"])
        p95s = ", ".join(fmt(x, ".0f") for x in rep["chunk_p95_ms_each_run"])
        worst = fmt(rep["chunk_max_ms_all_runs"], ".0f")
        lines.append(
            f"   ({c['key']}) {rep['runs']} runs: {runs} s (the median is shown); "
            f"chunk p95 {p95s} ms, max of all runs {worst} ms"
        )
    if c["key"] == "c":
        lines.append(f"   (c) final empty chunk {fmt(c.get('final_empty_chunk_ms'), '.0f')} ms")
    if c["key"] == "d":
        lines.append(
            f"   (d)* {c['sample_rows']:,} rows sampled in "
            f"{fmt(c.get('sample_seconds'), '.2f')}s, extrapolated to {c['rows']:,}"
        )
    return lines
