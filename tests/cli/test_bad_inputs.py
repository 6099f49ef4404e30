"""Bad inputs: mutated config files, malformed arguments and environments exit 2 without a
traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given
from hypothesis import settings as hsettings

from dispatch_retention import config
from dispatch_retention.cli.main import cli
from tests.faults import UNREACHABLE, make_config
from tests.helpers import DEFAULT_POLICIES, config_text
from tests.strategies import mutated_configs

# --- bad inputs ------------------------------------------------------------------------------

#: A valid config as data: the base every mutation starts from.


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
    assert "JOB_COMPLETION_INDEX" in result.output and "--shard" not in result.output


OTHER_DIGITS = ["\u0665", "\u06f5", "\u0967", "\uff15", "1\u0660"]  # Arabic-Indic, Devanagari...


@pytest.mark.parametrize("digits", OTHER_DIGITS)
def test_numbers_are_ascii_digits_only(tmp_path: Path, digits: str) -> None:
    """Python's int() reads an Arabic-Indic five as 5; a member id or a count written so is
    refused before connecting (exit 2), not silently read as another number."""
    config_path = str(make_config(tmp_path))
    for args in (
        ["hold", "add", digits, "--reason", "case 1"],
        ["hold", "release", digits],
        ["run", "--dry-run", "--chunk-size", digits],
        ["run", "--dry-run", "--max-rows", digits],
    ):
        result = CliRunner().invoke(
            cli, ["--config", config_path, "--database-url", UNREACHABLE, *args]
        )
        assert_no_traceback(result)
        assert result.exit_code == 2, (args, result.output)
        assert "ASCII digits" in result.output
