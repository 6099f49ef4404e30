"""Hypothesis strategies of the test suite (as attrs keeps its own in tests/strategies.py):
policies, dispatches and legal holds for the oracle property, an application's rows for the
end-count property, plan block maps for the window walk, and mutated config files for bad
inputs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from dispatch_retention.run.statements import BLOCK_IDS

#: A valid config as a document, for `mutated_configs` to break.
BASE_CONFIG: dict[str, Any] = {
    "target": {"table": "dispatches"},
    "clean": {
        "columns": ["content", "msisdn", "email", "app_token"],
        "replace": {"content": {}},
        "age_from": "created_at",
        "in_flight_grace_days": 30,
        "chunk_size": 5000,
        "lock_timeout_ms": 2000,
        "statement_timeout_ms": 60000,
        "pause_between_chunks_ms": 0,
        "max_busy_fraction": 1.0,
        "max_retries": 5,
        "retry_max_wait_s": 30.0,
    },
    "guard": {"min_retention_days": 7, "max_rows_per_run": 0, "refuse_above_rows": 0},
    "audit": {"schema": "dispatch_retention"},
    "policy": [
        {"name": "failed-sends", "retention_days": 30, "where": {"transmission_status": "failed"}},
        {"name": "sms", "retention_days": 90, "where": {"type": ["sms", "push"]}},
        {"name": "default", "retention_days": 365},
    ],
}

TYPES = st.sampled_from(["sms", "email", "push"])

TRANSMISSION = st.sampled_from(["scheduled", "transmitted", "failed", "paused", None])

DELIVERY = st.sampled_from(["pending", "delivered", "failed", "bounced", None])

EXTERNAL = st.sampled_from(["delivered", "undeliverable", "queued", None])

#: The members a case's dispatches may share, by their number in the case (a spec's None: a
#: member of its own, never held); `legal_holds` places holds on them.
MEMBERS = (1, 2, 3)

#: What happened to a member's legal hold: never placed, placed, placed and released,
#: released and placed again. Only an active hold (`placed`, `placed-again`) keeps the
#: member's dispatches.
HOLD_HISTORIES = ("none", "placed", "released", "placed-again")


@st.composite
def policy_sets(draw: st.DrawFn) -> str:
    count = draw(st.integers(1, 4))
    out = []
    for i in range(count):
        where = {}
        if draw(st.booleans()):
            key = draw(st.sampled_from(["type", "transmission_status", "delivery_status"]))
            values = {
                "type": ["sms", "email", "push"],
                "transmission_status": ["scheduled", "transmitted", "failed"],
                "delivery_status": ["pending", "delivered", "failed"],
            }[key]
            chosen = draw(st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True))
            where[key] = chosen
        if draw(st.booleans()):
            where["external_delivery_status"] = [draw(st.sampled_from(["delivered", "queued"]))]
        retention = draw(st.integers(7, 400))
        clause = ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in where.items())
        out.append(
            f'[[policy]]\nname = "p{i}"\nretention_days = {retention}\n'
            + (f"where = {{ {clause} }}\n" if where else "")
        )
    return "\n".join(out)


@st.composite
def dispatch_specs(draw: st.DrawFn) -> dict[str, Any]:
    # Ages cluster around every interesting boundary: 7..430 days, plus or minus seconds.
    age = timedelta(days=draw(st.sampled_from([0, 7, 30, 60, 90, 120, 200, 365, 400, 430])))
    age += timedelta(seconds=draw(st.sampled_from([-86400, -2, -1, 1, 2, 86400])))
    return {
        "age": age,
        "type": draw(TYPES),
        "transmission_status": draw(TRANSMISSION),
        "delivery_status": draw(DELIVERY),
        "external_delivery_status": draw(EXTERNAL),
        # "future" and "2099" on settled dispatches too: those are due by age alone
        "scheduled": draw(st.sampled_from(["null", "past", "future", "2099", "created"])),
        "delivered_after": draw(st.sampled_from([None, 0, 40])),
        "cleaned": draw(st.booleans()) and draw(st.booleans()),
        "member": draw(st.sampled_from([None, *MEMBERS])),
    }


@st.composite
def legal_holds(draw: st.DrawFn) -> dict[int, str]:
    """Each member's hold history (one of HOLD_HISTORIES)."""
    return {member: draw(st.sampled_from(HOLD_HISTORIES)) for member in MEMBERS}


@st.composite
def app_rows(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "age": draw(st.sampled_from([10, 100, 200, 500])),
        "delivery_status": draw(st.sampled_from(["delivered", "pending", "failed"])),
        "type": draw(st.sampled_from(["sms", "email", "push"])),
        "block": draw(st.integers(0, 3)),
    }


@st.composite
def block_maps(draw: st.DrawFn) -> tuple[tuple[int, int], ...]:
    numbers = draw(st.lists(st.integers(-5, 60), min_size=1, max_size=25, unique=True))
    return tuple((b, draw(st.integers(1, BLOCK_IDS))) for b in sorted(numbers))


INJECTIONS = [
    "dispatches; DROP TABLE dispatches; --",
    'x" OR "1"="1',
    "Robert'); DROP TABLE dispatch_retention.runs;--",
    "dispatches\x00",
    "Dispätches",
    "ディスパッチ",
    "public.dispatches",
    "pg_catalog.pg_authid",
    "a.b.c",
    "",
    " ",
    "$1",
    "${DATABASE_URL}",
    "%s%s%s",
    "0dispatches",
    "dispatches--",
    "x" * 64,
]

KNOWN_KEYS = sorted(
    {"table", "schema", "columns", "replace", "where", "name", "retention_days", "policy"}
    | set(BASE_CONFIG["clean"])
    | set(BASE_CONFIG["guard"])
)

TEXT_CHARS = st.characters(exclude_categories=["Cs"])  # any unicode but lone surrogates

SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, -5, 1, 6, 2**31, 2**62 + 1, 2**63 - 1, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(TEXT_CHARS, max_size=20),
    st.sampled_from(INJECTIONS),
    st.datetimes(timezones=st.just(UTC)),
)

VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def toml_value(value: Any) -> str:
    """A TOML inline value (the writer knows only what the strategies make)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def toml_document(document: dict[str, Any]) -> str:
    """Tables as [sections], the policies as [[policy]], anything else inline."""
    lines = [
        f"{json.dumps(k)} = {toml_value(v)}"
        for k, v in document.items()
        if not isinstance(v, dict) and not (k == "policy" and _tables(v))
    ]
    for key, value in document.items():
        if isinstance(value, dict):
            lines.append(f"\n[{json.dumps(key)}]")
            lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        elif key == "policy" and _tables(value):
            for entry in value:
                lines.append("\n[[policy]]")
                lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in entry.items())
    return "\n".join(lines) + "\n"


def _tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in a document, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    found: list[tuple[Any, Any]] = []
    for key, value in list(items):
        found.append((node, key))
        if isinstance(value, dict | list):
            found.extend(_slots(value))
    return found


@st.composite
def mutated_configs(draw: st.DrawFn) -> bytes:
    """A config file made wrong (or, by chance, still right) in one to three ways."""
    kind = draw(st.sampled_from(["structure", "structure", "text", "bytes", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"# nothing\n", b"[clean]\n", b"\xef\xbb\xbf"]))
    document = json.loads(json.dumps(BASE_CONFIG))
    for _ in range(draw(st.integers(1, 3))):
        container, key = draw(st.sampled_from(_slots(document)))
        operation = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if operation == "set":
            container[key] = draw(VALUES)
        elif operation == "delete":
            del container[key]
        else:
            tables = [c for c, _k in _slots(document) if isinstance(c, dict)] or [document]
            target = draw(st.sampled_from(tables))
            target[draw(st.sampled_from(KNOWN_KEYS) | st.text(min_size=1, max_size=8))] = draw(
                VALUES
            )
    text = toml_document(document)
    if kind == "text":
        lines = text.splitlines(keepends=True)
        at = draw(st.integers(0, len(text)))
        line = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["truncate", "insert", "duplicate-line", "append"]))
        if how == "truncate":
            text = text[:at]
        elif how == "insert":
            text = text[:at] + draw(st.text(TEXT_CHARS, max_size=10)) + text[at:]
        elif how == "duplicate-line":  # a duplicate key, or a duplicate [table]
            text = "".join([*lines[: line + 1], lines[line], *lines[line + 1 :]])
        else:
            text += draw(st.sampled_from(INJECTIONS))
    return text.encode("utf-8")
