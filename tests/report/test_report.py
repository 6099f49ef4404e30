"""`report` on a history of simulated days (tests/report/history.py, CONTRACT section 10):
every figure of the HTML and the JSON equals what a query of the audit tables and the
dispatches gives, computed here apart from the job (an oracle, not a snapshot of the report
itself); no personal data in either; the read-only role's report equals the owner's; an empty
history reports too; member ids only when asked.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from dispatch_retention import config
from tests import oracle
from tests.helpers import assert_no_marker, granted_role, invoke, snapshot
from tests.report import history as history_module
from tests.report.history import History

pytestmark = pytest.mark.skipif(
    not history_module.FAKETIME.exists(), reason="install Debian's faketime (.ci/run does)"
)
HELD, TOLERANCE = history_module.HELD, timedelta(hours=24)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    with history_module.made(tmp_path_factory.mktemp("history")) as made:
        yield made


# --- the oracle: the audit tables and the dispatches, read here -----------------------------


def expected(h: History) -> dict[str, Any]:
    s = config.load(str(h.config))
    with h.engine.connect() as conn:
        now = conn.execute(text("SELECT now()")).scalar_one()
        since = datetime.fromisoformat(h.since + "T00:00:00+00:00")
        runs = conn.execute(
            text("SELECT run_id::text, status, started_at FROM dispatch_retention.runs "
                 "WHERE started_at >= :s ORDER BY started_at"), {"s": since}
        ).all()  # fmt: skip
        chunks = conn.execute(
            text("SELECT run_id::text, rows, kind, cleaned_at, by_policy "
                 "FROM dispatch_retention.chunks")
        ).all()  # fmt: skip
        holds = conn.execute(
            text("SELECT hold_id, member_id, released_at FROM dispatch_retention.legal_holds")
        ).all()
        head = conn.execute(text("SELECT hash FROM dispatch_retention.events_head")).scalar_one()
    per_day: Counter[tuple[str, str]] = Counter()
    cleaned_by_run: Counter[str] = Counter()
    for run_id, n, kind, at, by_policy in chunks:
        if kind == "clean":
            cleaned_by_run[run_id] += n
            if at >= since:
                for policy, rows in by_policy.items():
                    per_day[(at.astimezone(UTC).strftime("%Y-%m-%d"), policy)] += rows
    held = {m for _, m, released in holds if released is None}
    violations: Counter[str] = Counter()
    held_rows = unmatched = 0
    for row in snapshot(h.engine).values():
        binding = oracle.binding_policy(row, s)
        if binding is None:
            unmatched += 1
        elif row["cleaned_at"] is None and oracle.is_due(row, s, now - TOLERANCE):
            if row["member_id"] in held:
                held_rows += 1
            else:
                violations[binding.name] += 1
    return {
        "statuses": Counter(str(status) for _, status, _ in runs),
        "run_ids": [r for r, _, _ in runs],
        "cleaned_by_run": cleaned_by_run,
        "per_day": per_day,
        "violations": violations,
        "held_rows": held_rows,
        "unmatched": unmatched,
        "active_holds": sorted(h_id for h_id, _, released in holds if released is None),
        "released_holds": sorted(h_id for h_id, _, released in holds if released is not None),
        "head": head,
    }


def report(h: History, *args: str, url: str | None = None) -> str:
    target = url or h.url.render_as_string(hide_password=False)
    done = invoke("--config", str(h.config), "--database-url", target, "report",
                  "--since", h.since, *args)  # fmt: skip
    assert done.exit_code == 0, done.output
    return done.stdout


# --- the HTML, read back as tables ----------------------------------------------------------


class Tables(HTMLParser):
    """Each <section id>'s tables, as rows of cell texts; and every <svg> met."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[list[list[str]]]] = {}
        self.section = ""
        self.cell: list[str] | None = None
        self.svgs = 0
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self.section = dict(attrs).get("id") or ""
        elif tag == "table":
            self.sections.setdefault(self.section, []).append([])
        elif tag == "tr":
            self.sections[self.section][-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "svg":
            self.svgs += 1
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.sections[self.section][-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def tables(page: str) -> Tables:
    parsed = Tables()
    parsed.feed(page)
    return parsed


def body(table: list[list[str]]) -> list[list[str]]:
    return [row for row in table[1:] if len(row) > 1]


# --- the tests ---------------------------------------------------------------------------------


def test_the_json_holds_what_the_trail_and_the_table_say(history: History) -> None:
    want = expected(history)
    pack = json.loads(report(history, "--format", "json"))
    assert pack["format"] == "dispatch-retention-evidence/1"
    runs = pack["runs"]
    assert Counter(runs["by_status"]) == want["statuses"]
    assert set(want["statuses"]) == {
        "incomplete", "refused", "cancelled", "interrupted", "abandoned", "failed", "succeeded"
    }  # fmt: skip
    assert [r["run_id"] for r in runs["timeline"]] == want["run_ids"]
    assert {r["run_id"]: r["rows_cleaned"] for r in runs["timeline"]} == {
        r: want["cleaned_by_run"].get(r, 0) for r in want["run_ids"]
    }
    assert {(d["day"], d["policy"]): d["rows"] for d in runs["cleaned_per_day"]} == dict(
        want["per_day"]
    )
    assert len({d["day"] for d in runs["cleaned_per_day"]}) >= 3  # the simulated days
    assert {f["status"] for f in runs["failures"]} >= {"failed", "refused", "abandoned"}
    assert all(f["reason"] for f in runs["failures"] if f["status"] in ("failed", "refused"))
    verify = pack["verify"]
    assert {v["policy"]: v["rows"] for v in verify["violations"]} == dict(want["violations"])
    assert verify["violation_rows"] > 0 and not pack["verdict"]["ok"]
    assert (
        verify["held_rows"] == want["held_rows"] and verify["unmatched_rows"] == want["unmatched"]
    )
    exceptions = pack["exceptions"]
    assert [x["hold_id"] for x in exceptions["active_holds"]] == want["active_holds"]
    assert [x["hold_id"] for x in exceptions["released_holds"]] == want["released_holds"]
    assert all(
        "member_id" not in x for x in exceptions["active_holds"] + exceptions["released_holds"]
    )
    assert pack["audit_chain"]["ok"] and pack["header"]["chain_head"] == want["head"]
    assert pack["backups"]["retention_days"] == 35 and "until" in pack["backups"]["statement"]
    assert pack["erasure_requests"]["requests"] == []
    recorded = [r for r in runs["timeline"] if r["oldest_due_age_days"] is not None]
    assert recorded and all(r["oldest_due_age_days"] > 87 for r in recorded)
    assert_no_marker(json.dumps(pack))


def test_the_html_shows_the_same_figures(history: History) -> None:
    want = expected(history)
    page = report(history)
    found = tables(page)
    assert found.scripts == 0 and found.svgs == 2
    assert "Content-Security-Policy" in page and "http://" not in page.replace(
        "http://www.w3.org/", ""
    ).replace("http-equiv", "")
    per_day, timeline, failures = found.sections["runs"]
    assert {(r[0], r[1]): int(r[2]) for r in body(per_day)} == dict(want["per_day"])
    assert len(body(timeline)) == len(want["run_ids"])
    assert Counter(r[1] for r in body(timeline)) == want["statuses"]
    assert sum(int(r[4]) for r in body(timeline)) == sum(
        want["cleaned_by_run"].get(r, 0) for r in want["run_ids"]
    )
    assert {r[2] for r in body(failures)} >= {"failed", "refused", "abandoned"}
    violations = found.sections["verify"][0]
    assert {r[0]: int(r[1]) for r in body(violations)} == {
        name: want["violations"].get(name, 0) for name in ("failed-sends", "sms", "email")
    }
    holds_active, holds_released, _risks = found.sections["exceptions"]
    assert [int(r[0]) for r in body(holds_active)] == want["active_holds"]
    assert [int(r[0]) for r in body(holds_released)] == want["released_holds"]
    assert want["head"] in page
    assert "Attention:" in page and "past their retention window" in page
    # a text from the config is escaped, never markup
    assert "&lt;legitimate interests&gt; &amp; support" in page
    assert "<legitimate interests>" not in page
    assert_no_marker(page)


def test_member_ids_only_when_asked(history: History) -> None:
    without = json.loads(report(history, "--format", "json"))
    asked = json.loads(report(history, "--format", "json", "--include-member-ids"))
    assert [x.get("member_id") for x in without["exceptions"]["active_holds"]] == [None]
    assert [x["member_id"] for x in asked["exceptions"]["active_holds"]] == [HELD]
    assert str(HELD) not in report(history).split("Active legal holds", 1)[1].split("</table>")[0]


def _comparable(pack: dict[str, Any]) -> dict[str, Any]:
    pack["header"].pop("generated_at")
    pack["header"]["period"].pop("until")
    pack["verify"].pop("checked_at")
    return pack


def test_the_read_only_roles_report_equals_the_owners(history: History) -> None:
    owners = json.loads(report(history, "--format", "json"))
    with granted_role(history.engine, history.url, "read-only") as (_, url):
        readers = json.loads(report(history, "--format", "json", url=url))
    assert _comparable(readers) == _comparable(owners)


def test_the_report_is_written_with_its_sha256_and_writes_nothing_to_the_database(
    history: History, tmp_path: Path
) -> None:
    with history.engine.connect() as conn:
        before = conn.execute(text("SELECT hash FROM dispatch_retention.events_head")).scalar_one()
    out = tmp_path / "report.html"
    owner = history.url.render_as_string(hide_password=False)
    done = invoke(
        "--config", str(history.config), "--database-url", owner, "report", "--output", str(out)
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digest in done.stdout
    assert (tmp_path / "report.html.sha256").read_text() == f"{digest}  report.html\n"
    with history.engine.connect() as conn:
        after = conn.execute(text("SELECT hash FROM dispatch_retention.events_head")).scalar_one()
    assert after == before


def test_an_empty_history_reports_too(engine: Engine, base: list[str]) -> None:
    done = invoke(*base, "report", "--format", "json")
    assert done.exit_code == 0, done.output
    pack = json.loads(done.stdout)
    assert pack["runs"]["count"] == 0 and pack["runs"]["cleaned_per_day"] == []
    assert pack["verdict"]["ok"] and pack["backups"]["retention_days"] is None
    page = invoke(*base, "report")
    assert page.exit_code == 0 and "no run in the period" in page.stdout


def test_a_since_in_the_future_is_a_usage_error(base: list[str]) -> None:
    done = invoke(*base, "report", "--since", "2999-01-01")
    assert done.exit_code == 2 and "--since" in done.stderr


def test_the_output_is_named_for_the_day_and_a_folder_that_is_not_there_is_exit_2(
    base: list[str], tmp_path: Path
) -> None:
    named = invoke(*base, "report", "--output", str(tmp_path / "report-{date}.html"))
    assert named.exit_code == 0, named.output
    (written,) = [p.name for p in tmp_path.glob("report-*.html")]
    assert written == f"report-{datetime.now(UTC):%Y-%m-%d}.html"
    assert (tmp_path / f"{written}.sha256").exists()
    missing = invoke(*base, "report", "--output", str(tmp_path / "no" / "such" / "r.html"))
    assert missing.exit_code == 2
    assert "--output" in missing.stderr and "No such file or directory" in missing.stderr
    assert "Traceback" not in missing.output


def test_a_control_character_in_a_holds_reason_is_shown_escaped(base: list[str]) -> None:
    """A terminal escape and a bidirectional override typed into a reason never reach the
    page (or the terminal it is printed on) raw."""
    reason = "case \x1b[31m9\u202e"
    assert invoke(*base, "hold", "add", "5", "--reason", reason).exit_code == 0
    for fmt in ("html", "json"):
        done = invoke(*base, "report", "--format", fmt)
        assert done.exit_code == 0, done.output
        assert "\x1b" not in done.stdout and "\u202e" not in done.stdout
        assert ("\\x1b" if fmt == "html" else "\\u001b") in done.stdout


def test_the_documented_keys_are_the_packs(history: History) -> None:
    """docs/auditor.md's table of the evidence pack names every key the JSON has."""
    page = (Path(__file__).parents[2] / "docs" / "auditor.md").read_text()
    table = page.split("| key | what it holds |", 1)[1].split("\n\n", 1)[0]
    documented = {}
    for line in table.splitlines()[2:]:
        key, what = line.strip("|").split("|", 1)
        documented[key.strip().strip("`")] = set(re.findall(r"`([a-z_0-9]+)`", what))
    pack = json.loads(report(history, "--format", "json", "--include-member-ids"))
    assert set(documented) == set(pack)
    for key, value in pack.items():
        if isinstance(value, dict) and key not in ("schedule", "verify", "audit_chain"):
            assert set(value) <= documented[key], (key, set(value) - documented[key])
    nested = [*pack["runs"]["timeline"][0], *pack["runs"]["failures"][0],
              *pack["runs"]["cleaned_per_day"][0], *pack["exceptions"]["released_holds"][0],
              *pack["remnants"]["tables"][0]]  # fmt: skip
    assert set(nested) <= documented["runs"] | documented["exceptions"] | documented["remnants"]
