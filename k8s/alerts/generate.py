"""The alert rules, from one source: this file writes

- k8s/alerts/dispatch-retention.rules.yml, a Prometheus rules file (for a Prometheus without
  the operator: `rule_files:`),
- k8s/components/alerts/prometheusrule.yaml, the same groups as a PrometheusRule
  (prometheus-operator's CRD) in a kustomize component an overlay adds,
- k8s/alerts/dispatch-retention.tests.yml, `promtool test rules` cases that feed the series
  the job really pushes and say which alert fires and which does not.

Metric names come from `dispatch_retention.metrics` (never retyped); the run's and the
verify's schedule and deadline from the CronJobs in k8s/base. Regenerate after changing any
of them: `make alerts`. tests/unit/test_alerts.py fails while the files differ from what this
writes, and runs promtool on them; .ci/ship-checks runs promtool too.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dispatch_retention import metrics as m
from dispatch_retention.vocabulary import Status

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "alerts" / "dispatch-retention.rules.yml"
TESTS = ROOT / "k8s" / "alerts" / "dispatch-retention.tests.yml"
COMPONENT = ROOT / "k8s" / "components" / "alerts" / "prometheusrule.yaml"
NAMESPACE = "dispatch-retention"
#: where each alert's `runbook_url` points: a section of docs/operations.md per alert
RUNBOOK = "docs/operations.md#"
DAY = 86_400
JOB = f'job="{m.JOB}"'


@dataclass(frozen=True)
class Schedule:
    """A CronJob's period (s) and `activeDeadlineSeconds`."""

    period_s: int
    deadline_s: int


def cronjob(name: str) -> Schedule:
    """The schedule of k8s/base/NAME.yaml: a daily cron ("M H * * *") and its deadline."""
    document = yaml.safe_load((ROOT / "k8s" / "base" / f"{name}.yaml").read_text())
    fields = document["spec"]["schedule"].split()
    if (
        len(fields) != 5
        or fields[2:] != ["*", "*", "*"]
        or not all(f.isdigit() for f in fields[:2])
    ):
        raise SystemExit(f"{name}: the rules assume a daily schedule (M H * * *), not {fields}")
    deadline = document["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    return Schedule(DAY, int(deadline))


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    def __post_init__(self) -> None:
        # a summary stays on one line (its labels expanded or not); a description holds no
        # label, so the tests' expected text is the rule's as written
        assert len(self.summary) <= WRAP and "{{" not in self.description, self.name

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": self.annotations(),
        }

    def annotations(self, labels: Mapping[str, str] | None = None) -> dict[str, str]:
        """The annotations; with `labels`, as Prometheus expands `{{ $labels.X }}`."""
        out = {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": RUNBOOK + self.name.lower(),
        }
        for key, value in (labels or {}).items():
            placeholder = "{{ $labels." + key + " }}"
            out = {k: v.replace(placeholder, value) for k, v in out.items()}
        return out


def alerts() -> list[Alert]:
    run, verify = cronjob("cronjob-run"), cronjob("cronjob-verify")
    # the longest a healthy schedule leaves between two successes: a period, then the next
    # Job's whole deadline
    run_gap = run.period_s + run.deadline_s
    verify_gap = verify.period_s + verify.deadline_s
    # three nights: the first incomplete run's end, two periods, and the third's deadline
    nights = 2 * run.period_s + run.deadline_s
    kube = f'kube_job_status_failed{{namespace="{NAMESPACE}", job_name=~'
    return [
        Alert(
            "DispatchRetentionNoSuccessfulRun",
            f"time() - max by (target, shard) ({m.LAST_SUCCESS}{{{JOB}}}) > {run_gap}",
            "15m",
            "ticket",
            "No successful run of {{ $labels.target }} in a period and a deadline",
            f"The last run that ended succeeded is more than {run_gap} s old: runs fail, stop "
            "incomplete, or no longer start.",
        ),
        Alert(
            "DispatchRetentionRunFailed",
            f"max by (target, shard, status) ({m.LAST_RUN_STATUS}"
            f'{{{JOB}, status=~"failed|refused"}}) == 1',
            "5m",
            "ticket",
            "The last run of {{ $labels.target }} ended {{ $labels.status }}",
            "Read the run's record (audit show) and the Job's log: the error or the guard "
            "that refused it.",
        ),
        Alert(
            "DispatchRetentionJobFailed",
            f'max by (job_name) ({kube}"dispatch-retention-(run-.+|first-run)"}}) > 0',
            "5m",
            "ticket",
            "The Job {{ $labels.job_name }} failed",
            "A run Job (the CronJob's, or the documented first run) failed: exit 1, 2 or 4, or "
            "it never started. Delete the Job once handled.",
        ),
        Alert(
            "DispatchRetentionIncompleteNightAfterNight",
            f"max by (target, shard) (min_over_time({m.LAST_RUN_STATUS}"
            f'{{{JOB}, status="incomplete"}}[{nights}s])) == 1',
            "10m",
            "ticket",
            "The runs of {{ $labels.target }} end incomplete night after night",
            "Three runs in a row left due rows (due_rows_remaining): the backlog is not "
            "shrinking. Raise the budget, add shards, or find what the reason names.",
        ),
        Alert(
            "DispatchRetentionRunNearDeadline",
            f"max by (target, shard) ({m.RUN_DURATION}{{{JOB}}}) > {int(0.8 * run.deadline_s)}",
            "5m",
            "ticket",
            "The last run of {{ $labels.target }} took more than 80 % of its deadline",
            f"The CronJob stops a run at {run.deadline_s} s: size --max-runtime, the chunk "
            "settings or the shards before runs end interrupted.",
        ),
        Alert(
            "DispatchRetentionVerifyFailed",
            f'max by (target) ({m.VERIFY_OK}{{{JOB}, command="verify"}}) == 0',
            "5m",
            "page",
            "verify found personal data past its retention window in {{ $labels.target }}",
            "verify exited 5: dispatches past their window still hold personal data "
            f"({m.VERIFY_VIOLATIONS}).",
        ),
        Alert(
            "DispatchRetentionVerifyJobFailed",
            f'max by (job_name) ({kube}"dispatch-retention-verify-.+"}}) > 0',
            "5m",
            "page",
            "The verify Job {{ $labels.job_name }} failed",
            "Exit 5 (data past its window), 6 (the audit trail changed), or verify could not "
            "check at all.",
        ),
        Alert(
            "DispatchRetentionReportJobFailed",
            f'max by (job_name) ({kube}"dispatch-retention-report-.+"}}) > 0',
            "5m",
            "ticket",
            "The report Job {{ $labels.job_name }} failed",
            "The monthly evidence report was not written: exit 2 (a config, a role without its "
            "rights, a file it cannot write) or it could not run.",
        ),
        Alert(
            "DispatchRetentionAuditChainBroken",
            f'max by (target) ({m.CHAIN_OK}{{{JOB}, command="audit_verify"}}) == 0',
            "5m",
            "page",
            "audit verify found the audit trail of {{ $labels.target }} changed",
            "audit verify exited 6: the hash chain or the tables no longer match what was "
            "written. Keep the head file and the log for the investigation.",
        ),
        Alert(
            "DispatchRetentionVerifyNotSucceeding",
            f"time() - max by (target) ({m.VERIFY_LAST_SUCCESS}"
            f'{{{JOB}, command="verify"}}) > {verify_gap}',
            "15m",
            "page",
            "No passing verify of {{ $labels.target }} in a period and a deadline",
            "verify fails, cannot run, or is no longer scheduled.",
        ),
        Alert(
            "DispatchRetentionAuditVerifyNotSucceeding",
            f"time() - max by (target) ({m.CHAIN_LAST_SUCCESS}"
            f'{{{JOB}, command="audit_verify"}}) > {verify_gap}',
            "15m",
            "page",
            "No passing audit verify of {{ $labels.target }} in a period and a deadline",
            "audit verify fails, cannot run, or is no longer scheduled.",
        ),
        Alert(
            "DispatchRetentionMetricsStale",
            f"time() - max by (target, shard, command) ({m.PUSH_TIME}{{{JOB}}}) > {run_gap}",
            "15m",
            "ticket",
            "Nothing pushed for {{ $labels.target }} for longer than a period and a deadline",
            "The job no longer pushes: the CronJob is suspended or its pods never start, or "
            "pushes fail (metrics_push_failed in the log).",
        ),
        Alert(
            "DispatchRetentionMetricsAbsent",
            f"absent({m.PUSH_TIME}{{{JOB}}})",
            f"{(run_gap + 3600) // 3600}h",
            "ticket",
            "No metric of the job in the Pushgateway",
            "Nothing has been pushed since the Pushgateway started (or it lost its metrics): "
            "PUSHGATEWAY_URL unset, a NetworkPolicy, or no run at all.",
        ),
    ]


def groups() -> dict[str, Any]:
    return {"groups": [{"name": "dispatch-retention", "rules": [a.rule() for a in alerts()]}]}


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "dispatch-retention"},
        "spec": groups(),
    }


# --- the promtool tests --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Series the job pushes, and at each time which of `watched` fire (with which labels)."""

    name: str
    series: Sequence[tuple[str, Mapping[str, str], str]]  # metric, labels, promtool values
    expect: Sequence[tuple[str, str, Sequence[Mapping[str, str]]]]  # at, alert, fired labels
    interval: str = "1m"


RUN = {"job": m.JOB, "target": "dispatches"}
VERIFY = {**RUN, "command": "verify"}
CHAIN = {**RUN, "command": "audit_verify"}
TARGET = {"target": "dispatches"}


def daily(days: int) -> str:
    """A timestamp pushed once a day, sampled every minute for `days` days (promtool's
    notation: `a x n` is n + 1 samples of a)."""
    return " ".join(f"{d * DAY}x1439" for d in range(days))


def cases() -> list[Case]:
    run, verify = cronjob("cronjob-run"), cronjob("cronjob-verify")
    run_gap = (run.period_s + run.deadline_s) // 60  # minutes
    verify_gap = (verify.period_s + verify.deadline_s) // 60
    nights_h = (2 * run.period_s + run.deadline_s) // 3600
    quiet = (
        "DispatchRetentionNoSuccessfulRun",
        "DispatchRetentionMetricsStale",
        "DispatchRetentionRunFailed",
        "DispatchRetentionIncompleteNightAfterNight",
        "DispatchRetentionRunNearDeadline",
        "DispatchRetentionMetricsAbsent",
    )
    return [
        Case(
            "a run that succeeds every night: nothing fires",
            [
                (m.LAST_SUCCESS, RUN, daily(3)),
                (m.PUSH_TIME, RUN, daily(3)),
                (m.RUN_DURATION, RUN, f"600x{3 * 1440}"),
                *(
                    (
                        m.LAST_RUN_STATUS,
                        {**RUN, "status": str(s)},
                        f"{int(s is Status.SUCCEEDED)}x{3 * 1440}",
                    )
                    for s in m.STATUSES
                ),
            ],
            [(f"{h}h", alert, []) for h in (25, 49, 71) for alert in quiet],
        ),
        Case(
            "no success since time 0: fires once a period, a deadline and its for: have passed",
            [(m.LAST_SUCCESS, RUN, f"0x{run_gap + 60}"), (m.PUSH_TIME, RUN, f"0x{run_gap + 60}")],
            [
                (f"{run_gap + 10}m", "DispatchRetentionNoSuccessfulRun", []),
                (f"{run_gap + 20}m", "DispatchRetentionNoSuccessfulRun", [TARGET]),
                (f"{run_gap + 20}m", "DispatchRetentionMetricsStale", [TARGET]),
            ],
        ),
        Case(
            "a failed run, then a refused one, then a success",
            [
                (m.LAST_RUN_STATUS, {**RUN, "status": "failed"}, "1x20 0x40"),
                (m.LAST_RUN_STATUS, {**RUN, "status": "refused"}, "0x20 1x20 0x20"),
                (m.LAST_RUN_STATUS, {**RUN, "status": "succeeded"}, "0x40 1x20"),
            ],
            [
                ("10m", "DispatchRetentionRunFailed", [{**TARGET, "status": "failed"}]),
                ("30m", "DispatchRetentionRunFailed", [{**TARGET, "status": "refused"}]),
                ("55m", "DispatchRetentionRunFailed", []),
            ],
        ),
        Case(
            "failed Jobs: the first run, a verify and a report Job; not another namespace's",
            [
                ("kube_job_status_failed", {"namespace": NAMESPACE, "job_name": name}, values)
                for name, values in (
                    ("dispatch-retention-first-run", "1x20"),
                    ("dispatch-retention-run-29000000", "0x20"),
                    ("dispatch-retention-verify-29000000", "1x20"),
                    ("dispatch-retention-report-29000000", "1x20"),
                )
            ]
            + [
                (
                    "kube_job_status_failed",
                    {"namespace": "elsewhere", "job_name": "dispatch-retention-run-1"},
                    "1x20",
                )
            ],
            [
                (
                    "10m",
                    "DispatchRetentionJobFailed",
                    [{"job_name": "dispatch-retention-first-run"}],
                ),
                (
                    "10m",
                    "DispatchRetentionVerifyJobFailed",
                    [{"job_name": "dispatch-retention-verify-29000000"}],
                ),
                (
                    "10m",
                    "DispatchRetentionReportJobFailed",
                    [{"job_name": "dispatch-retention-report-29000000"}],
                ),
            ],
        ),
        Case(
            "incomplete two nights, then a success, then incomplete three nights (hourly samples)",
            [(m.LAST_RUN_STATUS, {**RUN, "status": "incomplete"}, "0x4 1x47 0x23 1x71")],
            [
                ("52h", "DispatchRetentionIncompleteNightAfterNight", []),  # two nights
                ("76h", "DispatchRetentionIncompleteNightAfterNight", []),
                (f"{76 + nights_h - 1}h", "DispatchRetentionIncompleteNightAfterNight", []),
                (f"{76 + nights_h + 1}h", "DispatchRetentionIncompleteNightAfterNight", [TARGET]),
            ],
            interval="1h",
        ),
        Case(
            "a run near its deadline",
            [(m.RUN_DURATION, RUN, f"600x10 {int(0.9 * run.deadline_s)}x20")],
            [
                ("5m", "DispatchRetentionRunNearDeadline", []),
                ("25m", "DispatchRetentionRunNearDeadline", [TARGET]),
            ],
        ),
        Case(
            "verify finds violations, then passes",
            [
                (m.VERIFY_OK, VERIFY, "0x20 1x20"),
                (m.VERIFY_VIOLATIONS, VERIFY, "12x20 0x20"),
                (m.VERIFY_LAST_SUCCESS, VERIFY, "0x40"),
            ],
            [
                ("10m", "DispatchRetentionVerifyFailed", [TARGET]),
                ("35m", "DispatchRetentionVerifyFailed", []),
            ],
        ),
        Case(
            "no passing verify or audit verify for longer than a period and a deadline",
            [
                (m.VERIFY_LAST_SUCCESS, VERIFY, f"0x{verify_gap + 60}"),
                (m.CHAIN_LAST_SUCCESS, CHAIN, f"0x{verify_gap + 60}"),
            ],
            [
                (f"{verify_gap + 10}m", "DispatchRetentionVerifyNotSucceeding", []),
                (f"{verify_gap + 20}m", "DispatchRetentionVerifyNotSucceeding", [TARGET]),
                (f"{verify_gap + 20}m", "DispatchRetentionAuditVerifyNotSucceeding", [TARGET]),
            ],
        ),
        Case(
            "audit verify finds the trail changed",
            [(m.CHAIN_OK, CHAIN, "1x10 0x20")],
            [
                ("8m", "DispatchRetentionAuditChainBroken", []),
                ("25m", "DispatchRetentionAuditChainBroken", [TARGET]),
            ],
        ),
        Case(
            "nothing pushed at all",
            [("up", {"job": "pushgateway"}, f"1x{30 * 60}")],
            [
                ("20h", "DispatchRetentionMetricsAbsent", []),
                ("28h", "DispatchRetentionMetricsAbsent", [{"job": m.JOB}]),
            ],
        ),
    ]


def _series(metric: str, labels: Mapping[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{metric}{{{inner}}}"


def tests_document() -> dict[str, Any]:
    by_name = {a.name: a for a in alerts()}
    tests = []
    for case in cases():
        alert_tests = []
        for at, alert, fired in case.expect:
            rule = by_name[alert]
            alert_tests.append(
                {
                    "eval_time": at,
                    "alertname": alert,
                    "exp_alerts": [
                        {
                            "exp_labels": {**labels, "severity": rule.severity},
                            "exp_annotations": rule.annotations(labels),
                        }
                        for labels in fired
                    ],
                }
            )
        tests.append(
            {
                "name": case.name,
                "interval": case.interval,
                "input_series": [
                    {"series": Series(_series(metric, labels)), "values": values}
                    for metric, labels, values in case.series
                ],
                "alert_rule_test": alert_tests,
            }
        )
    # rules evaluated every 5 minutes: each case's times leave a `for:` that long to pass
    return {"rule_files": [RULES.name], "evaluation_interval": "5m", "tests": tests}


HEADER = "# Generated by k8s/alerts/generate.py (`make alerts`): edit that file, not this one.\n"


class _Dumper(yaml.SafeDumper):
    """Writes a text longer than `WRAP` as a literal block, its lines broken at spaces, so the
    files keep within yamllint's 120 columns (PromQL and the annotations read a line break as
    a space)."""


WRAP = 80


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if len(value) <= WRAP:
        return dumper.represent_str(value)
    lines = textwrap.wrap(value, WRAP, break_long_words=False, break_on_hyphens=False)
    return dumper.represent_scalar("tag:yaml.org,2002:str", "\n".join(lines), style="|")


class Series(str):
    """A promtool input series: its parser takes no line break, so it stays on one line."""


_Dumper.add_representer(str, _text)
_Dumper.add_representer(Series, yaml.SafeDumper.represent_str)


def dump(document: Any) -> str:
    text = yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=90, allow_unicode=True)
    return HEADER + "---\n" + text


def outputs() -> dict[Path, str]:
    return {
        RULES: dump(groups()),
        COMPONENT: dump(prometheus_rule()),
        TESTS: dump(tests_document()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    args = parser.parse_args(argv)
    stale = [
        path for path, text in outputs().items() if not path.exists() or path.read_text() != text
    ]
    if args.check:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} differs from what k8s/alerts/generate.py writes",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
