"""The shipped alert rules (k8s/alerts/generate.py): the committed files are what the
generator writes from `dispatch_retention.metrics` and the CronJobs; `promtool check rules`
accepts both forms; `promtool test rules` runs the generated cases (which alert fires and
which does not, on the series the job pushes); every rule reads metrics the job (or the
Pushgateway, or kube-state-metrics) really has; each alert's runbook link is a section of
docs/operations.md."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from dispatch_retention import metrics

ROOT = Path(__file__).parents[2]
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="install Debian's prometheus (.ci/run does) for promtool"
)


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "k8s/alerts/generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_committed_files_are_what_the_generator_writes() -> None:
    """Regenerate with `make alerts`."""
    for path, text in generator().outputs().items():
        assert path.read_text() == text, f"{path}: run `make alerts`"


def test_the_prometheusrule_and_the_rules_file_hold_the_same_groups() -> None:
    g = generator()
    rules = yaml.safe_load(g.RULES.read_text())
    crd = yaml.safe_load(g.COMPONENT.read_text())
    assert crd["kind"] == "PrometheusRule" and crd["spec"] == rules


def test_every_rule_reads_metrics_that_exist_and_has_for_and_a_runbook() -> None:
    g = generator()
    known = {*metrics.METRICS, metrics.PUSH_TIME, "kube_job_status_failed"}
    page = (ROOT / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", page, re.M)
    }
    (group,) = yaml.safe_load(g.RULES.read_text())["groups"]
    used: set[str] = set()
    for rule in group["rules"]:
        names = set(re.findall(r"\b([a-z_]+)\{", rule["expr"]))
        assert names and names <= known, (rule["alert"], names - known)
        used |= names
        assert rule["for"] and rule["labels"]["severity"] in ("page", "ticket")
        anchor = rule["annotations"]["runbook_url"].split("docs/operations.md#", 1)[1]
        assert anchor in anchors, f"docs/operations.md has no section #{anchor}"
    # the run's and the checks' outcomes are each watched
    assert {metrics.LAST_SUCCESS, metrics.LAST_RUN_STATUS, metrics.VERIFY_OK,
            metrics.CHAIN_OK, metrics.PUSH_TIME} <= used  # fmt: skip


def test_the_thresholds_follow_the_cronjobs() -> None:
    g = generator()
    run = g.cronjob("cronjob-run")
    (group,) = yaml.safe_load(g.RULES.read_text())["groups"]
    expr = {r["alert"]: " ".join(r["expr"].split()) for r in group["rules"]}
    assert f"> {run.period_s + run.deadline_s}" in expr["DispatchRetentionNoSuccessfulRun"]
    assert f"> {int(0.8 * run.deadline_s)}" in expr["DispatchRetentionRunNearDeadline"]
    assert "first-run" in expr["DispatchRetentionJobFailed"]


@needs_promtool
def test_promtool_checks_both_forms_and_passes_the_cases(tmp_path: Path) -> None:
    g = generator()
    assert promtool is not None
    spec = tmp_path / "from-prometheusrule.yml"
    spec.write_text(yaml.safe_dump(yaml.safe_load(g.COMPONENT.read_text())["spec"]))
    for rules in (g.RULES, spec):
        done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                              text=True, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([promtool, "test", "rules", g.TESTS.name], cwd=g.TESTS.parent,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_a_rule_that_watches_the_wrong_threshold_fails_the_cases(tmp_path: Path) -> None:
    """The cases can fail: with the near-deadline threshold moved, promtool says so."""
    g = generator()
    assert promtool is not None
    rules = g.RULES.read_text().replace(" > 2880", " > 99999")
    assert rules != g.RULES.read_text()
    (tmp_path / g.RULES.name).write_text(rules)
    cases = yaml.safe_load(g.TESTS.read_text())
    cases["tests"] = [t for t in cases["tests"] if "deadline" in t["name"]]  # only its case
    assert cases["tests"]
    (tmp_path / g.TESTS.name).write_text(yaml.safe_dump(cases))
    done = subprocess.run([promtool, "test", "rules", g.TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "DispatchRetentionRunNearDeadline" in done.stdout + done.stderr
