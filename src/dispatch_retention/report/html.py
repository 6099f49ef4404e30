"""The evidence pack as one self-contained HTML page: a Jinja2 template with autoescaping
(every text from the trail or the config is escaped, its control characters shown as
escapes), the charts as inline SVG, a strict Content-Security-Policy (no script, nothing
fetched), styles inline and for print."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from dispatch_retention.printable import escaped
from dispatch_retention.report import charts


def render(pack: dict[str, Any]) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
    from markupsafe import Markup

    env = Environment(
        loader=PackageLoader("dispatch_retention.report", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_shown,
    )
    env.filters["when"] = when
    env.filters["day"] = lambda v: when(v)[:10]
    policies = [p["name"] for p in pack["schedule"]["policies"]]
    svg = {  # pygal's own output, its scripts taken out (charts.clean_svg)
        "cleaned": Markup(charts.cleaned_per_day(pack["runs"]["cleaned_per_day"], policies)),  # noqa: S704
        "backlog": Markup(charts.backlog(pack["runs"]["timeline"])),  # noqa: S704
    }
    violations = {v["policy"]: v["rows"] for v in pack["verify"]["violations"]}
    page: str = env.get_template("report.html.j2").render(
        h=pack["header"], charts=svg, violations=violations, **pack
    )
    return page


def _shown(value: Any) -> Any:
    """Each value the page shows: a text on one line, its control and format characters
    (a terminal escape in a hold's reason, a bidirectional override) shown as escapes, never
    sent raw, as on every other output (`printable.escaped`); then autoescaped as HTML."""
    from markupsafe import Markup

    if isinstance(value, str) and not isinstance(value, Markup):
        return escaped(value)
    return value


def when(value: Any) -> str:
    """A time as the report shows it: UTC, to the second."""
    at: datetime
    if isinstance(value, datetime):
        at = value
    elif isinstance(value, str):
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        return "" if value is None else str(value)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
