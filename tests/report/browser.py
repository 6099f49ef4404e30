"""The report in a real headless browser (Debian's chromium, driven by Playwright pointed at
that binary: no library downloads its own browser here): what it loaded, what it logged,
and each chart as a picture. Shared by the browser test and `make report-screenshot`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = ("chromium", "chromium-browser")


def chromium() -> str:
    path = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    assert path, "install Debian's chromium (.ci/run does)"
    return path


@dataclass
class Visit:
    page: Any
    console: list[tuple[str, str]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@contextmanager
def opened(report: Path, width: int = 1200, height: int = 900) -> Iterator[Visit]:
    """`report` opened from the disk, every console message and request recorded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            visit = Visit(page)
            page.on("console", lambda m: visit.console.append((m.type, m.text)))
            page.on("pageerror", lambda e: visit.console.append(("error", str(e))))
            page.on("request", lambda r: visit.requests.append(r.url))
            page.goto(report.resolve().as_uri(), wait_until="load")
            yield visit
        finally:
            browser.close()
