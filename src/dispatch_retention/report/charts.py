"""The report's charts, as inline SVG drawn by pygal (docs/architecture.md says why pygal):
rows cleaned per policy per day, and the due backlog at each run. pygal adds a script of its
own (tooltips) and comments naming its web site: both are taken out, so the report holds no
script and no address. Each chart has a table beside it in the report, with the same figures.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

SVG = "http://www.w3.org/2000/svg"
WIDTH, HEIGHT = 900, 320


def _style() -> Any:
    from pygal.style import Style

    return Style(
        background="white",
        plot_background="white",
        font_family="sans-serif",
        colors=("#1b6ca8", "#e07b00", "#2a9d3f", "#c0392b", "#7d3c98", "#5d6d7e", "#b7950b"),
        title_font_size=16,
        legend_font_size=12,
        label_font_size=11,
        major_label_font_size=11,
    )


def _options() -> dict[str, Any]:
    return {
        "js": [],
        "disable_xml_declaration": True,
        "width": WIDTH,
        "height": HEIGHT,
        "style": _style(),
        "print_values": False,
        "show_legend": True,
        "legend_at_bottom": True,
        "x_label_rotation": 30,
        "truncate_label": -1,
        "no_data_text": "nothing in the period",
    }


def cleaned_per_day(rows: Sequence[dict[str, Any]], policies: Sequence[str]) -> str:
    """A stacked bar per UTC day: the rows each policy's chunks cleaned."""
    import pygal

    days = sorted({r["day"] for r in rows})
    chart = pygal.StackedBar(title="Dispatches cleaned per day, by policy", **_options())
    chart.x_labels = days
    counts = {(r["day"], r["policy"]): int(r["rows"]) for r in rows}
    names = [p for p in policies if any(k[1] == p for k in counts)]
    names += sorted({k[1] for k in counts} - set(names))  # a policy of an earlier config
    for name in names:
        chart.add(name, [counts.get((d, name), 0) for d in days])
    return clean_svg(str(chart.render(is_unicode=True)))


def backlog(timeline: Sequence[dict[str, Any]]) -> str:
    """Per run: the dispatches due when it planned, and those still due at its end."""
    import pygal

    runs = [r for r in timeline if r["due_rows"] is not None]
    chart = pygal.Line(title="Due backlog at each run", show_dots=True, **_options())
    chart.x_labels = [_when(r["started_at"]) for r in runs]
    chart.add("due when the run planned", [int(r["due_rows"]) for r in runs])
    chart.add(
        "still due at its end",
        [None if r["remaining_due_rows"] is None else int(r["remaining_due_rows"]) for r in runs],
    )
    return clean_svg(str(chart.render(is_unicode=True)))


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if hasattr(value, "strftime") else str(value)


def clean_svg(svg: str) -> str:
    """The SVG without its scripts and comments (pygal's tooltips and its web addresses)."""
    ET.register_namespace("", SVG)
    ET.register_namespace("xlink", "http://www.w3.org/1999/xlink")
    root = ET.fromstring(svg)  # noqa: S314 (pygal's own output, not input from outside)
    for parent in root.iter():
        for child in list(parent):
            if child.tag == f"{{{SVG}}}script":
                parent.remove(child)
    return ET.tostring(root, encoding="unicode")
