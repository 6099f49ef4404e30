"""Results for stdout: plain tables, one JSON document, or CSV. Logs go to stderr, not here.

The output gate: every text that came from the database or a file (a trigger's or a lock
holder's name, a hold's reason, a recorded error or reason, the config's text, a chain's
finding) goes through `printable.escaped` before it is printed, so it stays on its line and
sends no terminal escape: the only line breaks in a result are the ones these functions
write. Table cells are escaped by `table`; text set in a line by `_text`; a JSON document has
every character that is not printable written as its `\\u` escape (`to_json`: lossless); a
CSV cell is escaped and guarded against formulas (`_csv_cell`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dispatch_retention.printable import escaped, shown_name

if TYPE_CHECKING:  # annotations only: `run` need not import `db_check` or `verify`
    from dispatch_retention.checks.audit_verify import ChainReport
    from dispatch_retention.checks.db_check import Finding
    from dispatch_retention.checks.verify import Report
    from dispatch_retention.rule.plans import Limits, Plan
    from dispatch_retention.rule.schedule import Schedule
    from dispatch_retention.vocabulary import Outcome


def _cell(value: Any) -> str:
    """A value as a table shows it, on one line: control characters (a terminal escape
    sequence, a bell, a newline faking a row) are shown escaped, never sent raw."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return escaped(str(value))


def _text(value: Any) -> str:
    """Text from the database or a file, set in a line the job writes: escaped."""
    return escaped(str(value))


#: What a spreadsheet reads as the start of a formula (OWASP's CSV injection list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet would run as a formula gets a leading quote; a text is
    escaped (a line break or an escape sequence would reach the terminal that shows it)."""
    if isinstance(value, datetime):
        return _json_default(value)
    if isinstance(value, str):
        return escaped("'" + value if value.startswith(_FORMULA_START) else value)
    return value


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int) for row in rows) and rows for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if numeric[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def to_json(document: Any) -> str:
    """One JSON document, every character that is not printable in it written as its
    `\\u` escape (json.dumps leaves DEL, the C1 controls and the Unicode separators and
    format characters raw; outside a string a document holds none)."""
    text = json.dumps(document, indent=2, default=_json_default, ensure_ascii=False)
    return "\n".join(
        line if line.isprintable() else "".join(map(_json_char, line)) for line in text.split("\n")
    )


def _json_char(char: str) -> str:
    if char.isprintable():
        return char
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_csv(headers: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(headers), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return buffer.getvalue()


def plan_text(plan: Plan, limits: Limits | None = None) -> str:
    """The plan as a person reads it; with `limits`, what a run of it would clean."""
    rows = [[p.name, p.retention_days, p.cutoff, p.due_rows] for p in plan.policies]
    lines = [
        f"Plan as of {plan.rules.now.isoformat(timespec='seconds')} (database clock)",
        table(["policy", "retention_days", "cutoff", "due"], rows),
        "",
        f"due in total:                      {plan.due_rows}",
        f"held back by legal holds:          {plan.held_rows}",
        f"unsettled, waiting out the grace:  {plan.waiting_grace_rows}",
    ]
    if limits is not None and limits.refused:
        lines.append(
            f"a run would be refused:            {plan.due_rows} due rows exceed "
            f"guard.refuse_above_rows ({limits.refuse_above_rows}); --force runs it"
        )
    elif limits is not None and limits.to_clean < plan.due_rows:
        flag = "--max-rows" if limits.budget_name == "max_rows" else "guard.max_rows_per_run"
        lines.append(
            f"a run would clean:                 up to {limits.to_clean} of them ({flag}); "
            "the next run carries on"
        )
    return "\n".join(lines)


def run_document(outcome: Outcome, limits: Limits | None, exit_status: int) -> dict[str, Any]:
    """`run --format json`: the plan (per policy: retention, cutoffs, due; held; in the
    grace), what the run may clean (`limits`), and for a run that was not a dry run, how it
    ended. The keys are documented in docs/operations.md ("run --format json")."""
    doc: dict[str, Any] = {
        "run_id": outcome.run_id,
        "status": str(outcome.status),
        "exit_code": exit_status,
        "plan": outcome.plan.as_dict() if outcome.plan is not None else None,
        "limits": limits.as_dict() if limits is not None else None,
    }
    if str(outcome.status) != "planned":
        doc["outcome"] = {
            "rows_cleaned": outcome.rows_cleaned,
            "rows_recleaned": outcome.rows_recleaned,
            "chunks": outcome.chunks,
            "by_policy": dict(outcome.by_policy),
            "remaining_due_rows": outcome.remaining_due_rows,
            "remaining_reason": outcome.remaining_reason,
            "stopped_by": outcome.stopped_by,
            "error": outcome.error,
            "missed_rows": outcome.missed_rows,
            "written_back_rows": outcome.written_back_rows,
            "replica_wait_s": outcome.replica_wait_s,
            "chain_head": outcome.chain_head,
        }
    return doc


def outcome_text(outcome: Outcome) -> str:
    rows = [[name, outcome.by_policy.get(name, 0)] for name in _policy_names(outcome)]
    lines = [f"Run {outcome.run_id}: {outcome.status}"]
    if rows:
        lines += [table(["policy", "cleaned"], rows), ""]
    lines.append(f"cleaned in total: {outcome.rows_cleaned} in {outcome.chunks} chunks")
    if outcome.rows_recleaned:
        lines.append(f"cleaned again:    {outcome.rows_recleaned} (written back, --reclean)")
    if outcome.remaining_due_rows is not None:
        lines.append(f"still due:        {outcome.remaining_due_rows} (counted at the end)")
    if outcome.remaining_reason:
        lines.append(f"why:              {_text(outcome.remaining_reason.replace(',', ', '))}")
    if outcome.error:
        lines.append(f"reason:           {_text(outcome.error)}")
    return "\n".join(lines)


def _policy_names(outcome: Outcome) -> list[str]:
    if outcome.plan is not None:
        return [p.name for p in outcome.plan.policies]
    return sorted(outcome.by_policy)


def chain_text(report: ChainReport) -> str:
    """`audit verify`: the chain's size and head, each check, then the verdict."""
    imported = (
        f" ({report.imported} imported by the upgrade that began the chain)"
        if report.imported
        else ""
    )
    lines = [
        f"events: {report.events}{imported}",
        f"head:   seq {report.head_seq} {_text(report.head)}",
    ]
    if report.expected_head is not None:
        where = (
            f"seq {report.expected_seq}, {report.head_seq - report.expected_seq} events since"
            if report.expected_seq is not None
            else "NOT in the chain"
        )
        lines.append(f"expected head {_text(report.expected_head)}: {where}")
    lines.append(f"chunks counted against the dispatches: {report.chunks_counted}")
    if report.not_counted:  # chunks of another target this role cannot count in: never OK silently
        lines.append(f"chunks NOT counted (another target's runs): {report.chunks_not_counted}")
        lines += [f"  {_cell(n.table)}: {n.chunks}: {_cell(n.why)}" for n in report.not_counted]
    if report.rows_not_read is not None:  # never OK silently
        lines.append(f"chunks' rows NOT read for personal data: {_cell(report.rows_not_read)}")
    else:
        lines.append(f"clean chunks whose rows were read for personal data: {report.chunks_read}")
    if report.written_after_chunk:
        lines.append(
            f"cleaned rows holding personal data written after their chunk: "
            f"{report.written_after_chunk} (`verify` reports them)"
        )
    if report.ok:
        lines += [
            "",
            "OK: every hash recomputed, the chain whole to its head; runs, chunks and holds "
            "match it",
        ]
        return "\n".join(lines)
    lines += ["", table(["row", "problem"], [[f.row, f.problem] for f in report.findings])]
    if report.unlisted:
        lines.append(f"... and {report.unlisted} more")
    first = report.findings[0]
    lines += ["", f"TAMPERED: {_text(first.row)}: {_text(first.problem)}"]
    return "\n".join(lines)


def verify_text(report: Report) -> str:
    rows = [[name, count] for name, count in report.violations.items()]
    anomalies = report.anomalies
    verdicts = []
    if report.violation_rows:
        verdicts.append(
            f"VIOLATION: {report.violation_rows} dispatches past their window "
            "still hold personal data"
        )
    if anomalies.total and report.strict:
        verdicts.append(f"VIOLATION (--strict): {anomalies.total} anomalies")
    if not verdicts:
        verdicts.append("OK: no dispatch past its window holds personal data")
        if anomalies.total:
            verdicts.append(f"REVIEW: {anomalies.total} anomalies (violations under --strict)")
    label = "counted as violations: --strict" if report.strict else "violations under --strict"
    checked = ", ".join(
        f"{_text(column)} (cleaned: {'NULL' if value is None else json.dumps(value)})"
        for column, value in report.checked_columns
    )
    lines = [
        f"Checked {_text(report.target)} at {_cell(report.now)} (database clock), "
        f"tolerance {report.tolerance_hours:g} h",
        f"checked columns: {checked}",
        table(["policy", "violations"], rows),
        "",
        f"held back by legal holds (not violations): {report.held_rows}",
        f"matched by no policy (never cleaned):      {report.unmatched_rows}",
        f"cleaned so far:                            {report.cleaned_rows}",
        "",
        f"anomalies ({label}):",
        f"  undatable_rows:         {anomalies.undatable_rows:>8}  "
        "personal data and no age to measure (never due): NULL, future or infinite",
        f"  future_scheduled_rows:  {anomalies.future_scheduled_rows:>8}  "
        "unsettled, scheduled beyond the longest retention",
        f"  written_back_rows:      {anomalies.written_back_rows:>8}  "
        "cleaned, yet holding personal data again",
        "",
        *verdicts,
    ]
    return "\n".join(lines)


LIST_COLUMNS = (
    "run_id",
    "status",
    "trigger",
    "started_at",
    "finished_at",
    "rows_cleaned",
    "due_rows",
    "remaining_due_rows",
    "held_rows",
    "host",
    "shard",
    "tool_version",
)


#: `audit list`'s table without `--wide`: (column, header), within 100 characters (a run
#: id is 36, a time in UTC 19); `audit show` has the rest.
NARROW_COLUMNS = (
    ("run_id", "run_id"),
    ("status", "status"),
    ("trigger", "trigger"),
    ("started_at", "started (UTC)"),
    ("rows_cleaned", "cleaned"),
    ("remaining_due_rows", "left"),
)


def runs(found: Sequence[Mapping[str, Any]], fmt: str, *, wide: bool = False) -> str:
    if fmt == "json":
        return to_json(list(found))
    if fmt == "csv":
        return to_csv(LIST_COLUMNS, found)
    if not found:
        return "no runs recorded"
    if wide:
        return table(LIST_COLUMNS, [[r[c] for c in LIST_COLUMNS] for r in found])
    return table(
        [header for _, header in NARROW_COLUMNS],
        [[_utc(r[c]) for c, _ in NARROW_COLUMNS] for r in found],
    )


def _utc(value: Any) -> Any:
    """A time as `YYYY-MM-DD HH:MM:SS` in UTC (other values as they are)."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return value


def run_text(doc: Mapping[str, Any]) -> str:
    fields = (
        "run_id",
        "status",
        "trigger",
        "started_at",
        "finished_at",
        "planned_at",
        "rows_cleaned",
        "rows_recleaned",
        "chunks",
        "due_rows",
        "held_rows",
        "waiting_grace_rows",
        "target_table",
        "shard",
        "host",
        "db_user",
        "tool_version",
        "config_path",
        "config_sha256",
        "stopped_by",
        "remaining_due_rows",
        "remaining_reason",
        "error",
    )
    width = max(len(f) for f in fields)
    lines = [f"{f.ljust(width)}  {_cell(doc.get(f))}" for f in fields]
    policies = [
        [p["name"], p["retention_days"], p["cutoff"], p.get("due_rows"), p["rows_cleaned"]]
        for p in doc["policies"]
    ]
    lines += [
        "",
        table(["policy", "retention_days", "cutoff", "due_at_plan", "rows_cleaned"], policies)
        if policies
        else "no plan recorded",
        "",
        "copy risks (triggers, rules, publications, replica identity):",
        *_risk_lines(doc.get("copy_risks")),
        *_read_at_end_and_unreadable(doc),
        "",
        "config:",
        *(f"  {_text(line)}" for line in _lines(doc["config_text"])),
    ]
    return "\n".join(lines)


def _lines(text: str) -> list[str]:
    """A file's lines, broken at its line ends (LF, CRLF) only: any other separator
    (`str.splitlines` also breaks at VT, FF, NEL, U+2028, ...) stays in its line, escaped."""
    return text.replace("\r\n", "\n").removesuffix("\n").split("\n")


def _read_at_end_and_unreadable(doc: Mapping[str, Any]) -> list[str]:
    """The copy risks read again at the run's end, and what of the record is unreadable."""
    lines = []
    if "copy_risks_at_end" in doc:
        lines += ["copy risks read again at its end:", *_risk_lines(doc["copy_risks_at_end"])]
    if doc.get("unreadable"):
        lines += ["", "unreadable in the record:", *(f"  {_cell(u)}" for u in doc["unreadable"])]
    return lines


def _risk_lines(risks: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """One line per copy risk the run saw (`risks.Risk.as_dict()`), or why there are none."""
    if risks is None:
        return ["  not recorded (a run of an earlier version)"]
    if not risks:
        return ["  none"]
    return [
        f"  {_text(r['kind'])} {shown_name(str(r['name']))}"
        + (f" ({_text(r['when'])})" if r.get("when") else "")
        + (
            f": acknowledged: {_text(r['acknowledged'])}"
            if r.get("acknowledged")
            else ": not acknowledged"
        )
        for r in risks
    ]


HOLD_COLUMNS = ("hold_id", "member_id", "reason", "created_at", "created_by", "requested_by",
                "released_at", "released_by")  # fmt: skip


def holds(found: Sequence[Mapping[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return to_json(list(found))
    if not found:
        return "no legal holds"
    return table(HOLD_COLUMNS, [[h[c] for c in HOLD_COLUMNS] for h in found])


#: Where a finding's message goes on to a line of its own: a statement to run (`db check`'s
#: index advice), indented. Any other line break in a message is shown escaped.
_STATEMENT_LINE = re.compile(r"\n    (?=(?:CREATE|ALTER|DROP) )")


def findings(found: Sequence[Finding]) -> str:
    """`db check`: a line per finding, its statements to run on lines of their own below it;
    the rest of a message (names from the catalog and the config among it) on its line."""
    return "\n".join(
        f"[{f.level:5}] {f.check}: "
        + "\n    ".join(_text(part) for part in _STATEMENT_LINE.split(f.message))
        for f in found
    )


# --- the retention schedule (`policy describe`) ------------------------------------------

#: What CommonMark would read as markup inside a table cell (emphasis, code, links, HTML, an
#: entity, the cell's end): escaped with a backslash.
_MARKDOWN = re.compile(r"([\\`*_\[\]<>&|~])")


def _md(value: Any) -> str:
    """A value as a Markdown table cell shows it literally (on one line)."""
    return _MARKDOWN.sub(r"\\\1", _text("not stated" if value is None else value))


def schedule_markdown(found: Schedule, table_name: str, config_sha256: str) -> str:
    """The schedule as Markdown, to paste into the record of processing."""
    out = [
        f"# Retention schedule of {_md(table_name)}",
        "",
        f"Config SHA-256: `{config_sha256}`. Age is measured from {_md(found.age_from)}.",
        "",
        "| policy | applies to | retention (days) | grace for unsettled (days) | legal basis "
        "| purpose |",
        "| --- | --- | ---: | ---: | --- | --- |",
        *(
            f"| {_md(p.name)} | {_md(p.matches)} | {p.retention_days} | {p.grace_days} "
            f"| {_md(p.legal_basis)} | {_md(p.purpose)} |"
            for p in found.policies
        ),
        "",
        _md(found.precedence),
        "",
        "## Columns stripped",
        "",
        "| column | becomes |",
        "| --- | --- |",
        *(f"| {_md(c.name)} | {_md(c.becomes)} |" for c in found.stripped),
        "",
        "## Columns kept",
        "",
        "| column | personal data | reason |",
        "| --- | --- | --- |",
        *(
            f"| {_md(c.name)} | {'yes' if c.personal else 'no'} | {_md(c.reason)} |"
            for c in found.kept
        ),
    ]
    return "\n".join(out)


SCHEDULE_COLUMNS = (
    "policy", "applies_to", "retention_days", "grace_days", "legal_basis", "purpose",
    "age_from", "stripped", "kept_personal_data",
)  # fmt: skip


def schedule_csv(found: Schedule) -> str:
    """One row per policy, each with the columns stripped and the personal data kept."""
    stripped = "; ".join(f"{c.name} -> {c.becomes}" for c in found.stripped)
    kept = "; ".join(f"{c.name}: {c.reason}" for c in found.kept if c.personal)
    rows = [
        dict(zip(SCHEDULE_COLUMNS, (p.name, p.matches, p.retention_days, p.grace_days,
             p.legal_basis or "", p.purpose or "", found.age_from, stripped, kept), strict=True))
        for p in found.policies
    ]  # fmt: skip
    return to_csv(SCHEDULE_COLUMNS, rows)
