"""The marked figures of docs/performance.md, docs/architecture.md and bench/README.md are
the ones the committed bench reports (docs/bench/*.json) render (`make doc-figures`), so
they cannot drift from the measurements."""

from __future__ import annotations

import pytest
from bench import figures

DOCS = {path.relative_to(figures.REPO).as_posix(): path for path in figures.DOCS}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_the_docs_hold_the_figures_the_reports_render(name: str) -> None:
    """Each marked figure is what `make doc-figures` renders from docs/bench/*.json."""
    text = DOCS[name].read_text()

    assert figures.render(text, figures.Reports()) == text


def test_every_figure_is_in_the_docs_and_every_marker_names_one() -> None:
    """No renderer goes unused and no marker names a figure that does not exist."""
    used = {
        match.group(1)
        for path in figures.DOCS
        for match in figures.MARKER.finditer(path.read_text())
    }

    assert used == set(figures.RENDERERS)


def test_the_reports_are_complete_bench_runs() -> None:
    """Each committed report finished (no error) and measured every contender it names."""
    reports = figures.Reports()

    assert reports.runs
    for run in reports.runs:
        assert "error" not in run.report
        for scenario in run.report["scenarios"]:
            keys = {c["key"] for c in scenario["contenders"]}
            assert keys == set(run.report["bench"]["contenders"])


def test_a_changed_report_changes_the_rendered_figure() -> None:
    """The check can fail: a report with another SKIP LOCKED ratio renders another page."""
    reports = figures.Reports()
    readme = DOCS["docs/architecture.md"].read_text()

    reports.contender("backlog", "c")["ratio_to_bound"] = 0.001

    rendered = figures.render(readme, reports)

    assert rendered != readme
    assert "<!-- figures: skiplock-span -->0.00-" in rendered
