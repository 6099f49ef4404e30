"""`make report-screenshot`: docs/img/report.png, the report of the simulated history
(tests/report/history.py) as the browser shows it. The tests never write into the tree; this
does, when asked.

    python -m tests.report.screenshot [--output docs/img/report.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.helpers import invoke
from tests.report import history
from tests.report.browser import opened

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "img" / "report.png")
    parser.add_argument("--height", type=int, default=3400, help="pixels from the top")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, history.made(Path(folder)) as made:
        report = Path(folder) / "report.html"
        owner = made.url.render_as_string(hide_password=False)
        done = invoke("--config", str(made.config), "--database-url", owner, "report",
                      "--since", made.since, "--output", str(report))  # fmt: skip
        assert done.exit_code == 0, done.output
        with opened(report, width=1100) as visit:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            visit.page.screenshot(
                path=str(args.output),
                full_page=True,
                clip={"x": 0, "y": 0, "width": 1100, "height": args.height},
            )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
