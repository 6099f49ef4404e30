"""Bad inputs: mutated config files, malformed arguments and environments exit 2 without a
traceback.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from dispatch_retention import config
from dispatch_retention.cli import cli

from .faults import (
    UNREACHABLE,
    make_config,
)
from .helpers import (
    DEFAULT_POLICIES,
    config_text,
)

# --- bad inputs ------------------------------------------------------------------------------

#: A valid config as data: the base every mutation starts from.
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


def invoke_run(config_path: Path, *args: str) -> Any:
    return CliRunner().invoke(
        cli,
        [
            "--config",
            str(config_path),
            "--database-url",
            UNREACHABLE,
            "--log-format",
            "json",
            "run",
            "--yes",
            *args,
        ],
    )


def assert_no_traceback(result: Any) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    assert "Traceback" not in result.output
    assert "internal_error" not in result.output


@hsettings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=mutated_configs())
@example(raw=b"")
@example(raw=b"\xff\xfe\x00garbage")
@example(raw=config_text().encode() + b"\n[clean]\nchunk_size = 10\n")  # a duplicate table
@example(raw=config_text(clean="chunk_size = 10\nchunk_size = 20").encode())  # duplicate key
@example(raw=config_text(clean="chunk_size = 99999999999999999999999").encode())
@example(raw=config_text(clean="chunk_size = -5").encode())
@example(raw=config_text(guard="min_retention_days = 400").encode())
@example(raw=b'[target]\ntable = "dispatches; DROP TABLE dispatches"\n' + DEFAULT_POLICIES.encode())
@example(raw=b'[audit]\nschema = "x\\"; DROP SCHEMA public; --"\n' + DEFAULT_POLICIES.encode())
@example(raw=config_text().encode())  # valid: tries to connect, exit 1
def test_mutated_config_files_exit_2_without_a_traceback(tmp_path: Path, raw: bytes) -> None:
    """Any mutated config file: exit 2 with a message naming the file, never a traceback;
    a mutation that happens to be valid gets as far as connecting (exit 1)."""
    path = tmp_path / "mutated.toml"
    path.write_bytes(raw)
    try:
        config.load(path)
        valid = True
    except config.ConfigError:
        valid = False
    event("valid config" if valid else "invalid config")
    result = invoke_run(path)
    assert_no_traceback(result)
    if valid:
        assert result.exit_code == 1, result.output
    else:
        assert result.exit_code == 2, result.output
        assert f"invalid configuration: {path}" in result.output


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--shard", "4/4"], id="shard-index-not-below-count"),
        pytest.param(["--shard", "-1/2"], id="shard-negative"),
        pytest.param(["--shard", "x"], id="shard-not-i-of-n"),
        pytest.param(["--shard", "1/0"], id="shard-zero-count"),
        pytest.param(["--shard", "0/2000"], id="shard-too-many"),
        pytest.param(["--shard", ""], id="shard-empty"),
        pytest.param(["--chunk-size", "0"], id="chunk-size-zero"),
        pytest.param(["--chunk-size", "-3"], id="chunk-size-negative"),
        pytest.param(["--chunk-size", "ten"], id="chunk-size-not-a-number"),
        pytest.param(["--chunk-size", "1000001"], id="chunk-size-too-big"),
        pytest.param(["--max-runtime", "-5"], id="max-runtime-negative"),
        pytest.param(["--max-runtime", "0"], id="max-runtime-zero"),
        pytest.param(["--max-runtime", "soon"], id="max-runtime-not-a-number"),
        pytest.param(["--max-rows", "0"], id="max-rows-zero"),
        pytest.param(["--max-rows", "1.5"], id="max-rows-not-an-integer"),
        pytest.param(["--no-such-option"], id="unknown-option"),
    ],
)
def test_malformed_run_arguments_exit_2(tmp_path: Path, args: list[str]) -> None:
    """Malformed `run` arguments: exit 2 before any connection, no traceback."""
    result = invoke_run(make_config(tmp_path), *args)
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output


def test_malformed_shard_from_the_environment_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken JOB_COMPLETION_INDEX / JOB_COMPLETIONS pair is bad usage too (exit 2)."""
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "7")
    monkeypatch.setenv("JOB_COMPLETIONS", "4")
    result = invoke_run(make_config(tmp_path))
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output
