"""The HTML report in a real headless browser (tests/report/browser.py): it loads with no
console message and no request but its own file, each chart's SVG is visible and drawn
(a screenshot of it, in the test's temporary folder, has many colours, not a blank box), and
it prints (a PDF through the print stylesheet)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from sqlalchemy import Engine

from tests.helpers import invoke, seed_series
from tests.report.browser import opened


def test_the_report_loads_offline_and_draws_its_charts(
    engine: Engine, base: list[str], tmp_path: Path
) -> None:
    seed_series(engine, range(1, 201), mixed=True)
    assert invoke(*base, "run", "--yes", "--max-rows", "120").exit_code == 0
    assert invoke(*base, "run", "--yes").exit_code == 0
    report = tmp_path / "report.html"
    assert invoke(*base, "report", "--output", str(report)).exit_code == 0
    with opened(report) as visit:
        page = visit.page
        charts = page.locator("figure svg")
        assert charts.count() == 2
        for n in range(charts.count()):
            chart = charts.nth(n)
            assert chart.is_visible()
            box = chart.bounding_box()
            assert box is not None and box["width"] > 400 and box["height"] > 150
            shot = tmp_path / f"chart-{n}.png"
            chart.screenshot(path=str(shot))
            assert shot.stat().st_size > 5_000
            colours = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB").getcolors(1 << 16)
            assert colours is not None and len(colours) > 20  # drawn, not a blank box
        page.emulate_media(media="print")
        pdf = page.pdf(format="A4")
        assert pdf.startswith(b"%PDF") and len(pdf) > 20_000
        assert visit.console == []
        assert visit.requests == [report.resolve().as_uri()]
