"""Pushgateway metrics, against a real Prometheus Pushgateway started on loopback."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine
from sqlalchemy import text as sql

from dispatch_retention import metrics
from dispatch_retention.cli.main import cli
from dispatch_retention.metrics import push_failure
from tests.helpers import (
    DAY,
    config_text,
    db_now,
    dispatch,
    guards_off,
    insert_rows,
    seed_series,
    write_config,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def started_gateway(directory: Path) -> Iterator[str]:
    """A real Pushgateway (Debian's prometheus-pushgateway) on a free loopback port, with
    no persistence file: Debian's build otherwise loads and saves a shared default file
    (/var/lib/prometheus/pushgateway.data), so one gateway would see another's metrics."""
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    assert binary, "install Debian's prometheus-pushgateway (.ci/run does)"
    port = _free_port()
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=directory,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("the pushgateway did not become ready")
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with started_gateway(tmp_path_factory.mktemp("pushgateway")) as url:
        yield url


def test_a_test_gateway_starts_empty_whatever_ran_before(tmp_path: Path) -> None:
    """A metric pushed to one test gateway is not there in the next one (no shared
    persistence file between gateways, on a machine where other gateways ran before)."""
    body = b"dispatch_retention_probe 1\n"
    with started_gateway(tmp_path) as url:
        request = urllib.request.Request(
            f"{url}/metrics/job/dispatch_retention", data=body, method="PUT"
        )
        urllib.request.urlopen(request, timeout=5)
        assert "dispatch_retention_probe" in metric_values(url)
    with started_gateway(tmp_path) as url:
        assert metric_values(url) == {}


def metric_values(url: str) -> dict[str, dict[str, float]]:
    """{metric name: {label string: value}} for job dispatch_retention, from the HTTP API."""
    with urllib.request.urlopen(f"{url}/api/v1/metrics", timeout=5) as response:
        groups: list[dict[str, Any]] = json.load(response)["data"]
    out: dict[str, dict[str, float]] = {}
    for group in groups:
        if group["labels"].get("job") != "dispatch_retention":
            continue
        for name, family in group.items():
            if not isinstance(family, dict) or "metrics" not in family:
                continue
            for metric in family["metrics"]:
                labels = ",".join(
                    f"{k}={v}"
                    for k, v in sorted(metric.get("labels", {}).items())
                    if k not in ("job", "instance", "target")
                )
                out.setdefault(name, {})[labels] = float(metric["value"])
    return out


def test_run_pushes_metrics(
    engine: Engine, url_string: str, tmp_path: Path, pushgateway: str
) -> None:
    """A successful run pushes per-policy counts, duration, remaining and the success time."""
    now = db_now(engine)
    insert_rows(
        engine,
        [dispatch(i, now - 500 * DAY, type="email" if i % 2 else "sms") for i in range(1, 11)],
    )
    config = write_config(tmp_path / "r.toml", config_text())
    before = time.time()
    result = CliRunner().invoke(
        cli,
        ["--config", str(config), "--database-url", url_string, "run", "--yes"],
        env={"PUSHGATEWAY_URL": pushgateway},
    )
    assert result.exit_code == 0, result.output
    values = metric_values(pushgateway)
    assert values["dispatch_retention_rows_cleaned"] == {
        "policy=default": 5.0,
        "policy=failed-sends": 0.0,
        "policy=sms": 5.0,
    }
    assert values["dispatch_retention_due_rows_remaining"] == {"": 0.0}
    assert values["dispatch_retention_last_run_status"]["status=succeeded"] == 1.0
    assert values["dispatch_retention_last_run_status"]["status=failed"] == 0.0
    assert values["dispatch_retention_run_duration_seconds"][""] > 0
    assert values["dispatch_retention_last_success_timestamp_seconds"][""] >= before - 1

    # A refused run changes the status but keeps the last success timestamp.
    success = values["dispatch_retention_last_success_timestamp_seconds"][""]
    seed_series(engine, range(11, 20))
    refusing = write_config(tmp_path / "g.toml", config_text(guard="refuse_above_rows = 1"))
    result = CliRunner().invoke(
        cli,
        ["--config", str(refusing), "--database-url", url_string, "run", "--yes"],
        env={"PUSHGATEWAY_URL": pushgateway},
    )
    assert result.exit_code == 4
    values = metric_values(pushgateway)
    assert values["dispatch_retention_last_run_status"]["status=refused"] == 1.0
    assert values["dispatch_retention_last_run_status"]["status=succeeded"] == 0.0
    assert values["dispatch_retention_last_success_timestamp_seconds"][""] == success


def test_unreachable_gateway_changes_nothing(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """A gateway that does not answer is logged with the reason; the run still succeeds
    with exit 0."""
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY)])
    config = write_config(tmp_path / "r.toml", config_text())
    result = CliRunner().invoke(
        cli,
        ["--config", str(config), "--database-url", url_string, "run", "--yes"],
        env={"PUSHGATEWAY_URL": f"http://127.0.0.1:{_free_port()}"},
    )
    assert result.exit_code == 0
    assert push_failed(result.output)["reason"] == "the connection was refused"


def push_failed(output: str) -> dict[str, Any]:
    """The `metrics_push_failed` event of a run's log."""
    (event,) = [json.loads(line) for line in output.splitlines() if '"metrics_push_failed"' in line]
    return dict(event)


def test_a_push_the_gateway_refuses_is_logged_with_its_status(
    engine: Engine, url_string: str, tmp_path: Path, pushgateway: str
) -> None:
    """A gateway that answers an HTTP error: the push failure names the status, never the
    URL (which can hold a password); the run keeps exit 0."""
    config = write_config(tmp_path / "r.toml", config_text())
    result = CliRunner().invoke(
        cli,
        ["--config", str(config), "--database-url", url_string, "run", "--yes"],
        env={"PUSHGATEWAY_URL": f"{pushgateway}/no/such/prefix"},
    )
    assert result.exit_code == 0, result.output
    assert push_failed(result.output)["reason"] == "the gateway answered HTTP 404"
    assert "/no/such/prefix" not in result.output


def test_no_gateway_configured_pushes_nothing(
    engine: Engine, url_string: str, tmp_path: Path, pushgateway: str
) -> None:
    """Without PUSHGATEWAY_URL nothing is pushed (the gateway's metrics stay as they were)."""
    before = metric_values(pushgateway)
    config = write_config(tmp_path / "r.toml", config_text())
    result = CliRunner().invoke(
        cli,
        ["--config", str(config), "--database-url", url_string, "run", "--yes"],
        env={"PUSHGATEWAY_URL": ""},
    )
    assert result.exit_code == 0
    assert "metrics_" not in result.output
    assert metric_values(pushgateway) == before


@contextmanager
def not_http() -> Iterator[str]:
    """A loopback server that answers every connection with bytes that are not HTTP."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def answer() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize(
    ("gateway", "reason"),
    [
        ("http://[::1", "the URL is not one the job can push to"),
        ("not-http", "the gateway's answer is not HTTP"),
        ("http://probe:s3cret@[::1", "the URL is not one the job can push to"),
    ],
)
def test_a_bad_gateway_never_changes_the_outcome(
    engine: Engine, url_string: str, tmp_path: Path, gateway: str, reason: str
) -> None:
    """A malformed PUSHGATEWAY_URL (`http://[::1`) or a gateway that answers something other
    than HTTP: the push fails, is logged, and the run keeps its summary and exit 0."""
    insert_rows(engine, [dispatch(1, db_now(engine) - 500 * DAY)])
    config = write_config(tmp_path / "r.toml", config_text())
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(not_http()) if gateway == "not-http" else gateway
        result = CliRunner().invoke(
            cli,
            ["--config", str(config), "--database-url", url_string, "run", "--yes"],
            env={"PUSHGATEWAY_URL": url},
        )
    assert result.exit_code == 0, result.output
    assert ": succeeded" in result.stdout
    assert push_failed(result.output)["reason"] == reason
    assert "s3cret" not in result.output


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        pytest.param(URLError(TimeoutError("timed out")), "the gateway did not answer in time",
                     id="timeout"),
        pytest.param(URLError(socket.gaierror(-2, "x")), "the gateway's host name did not resolve",
                     id="no-such-host"),
        pytest.param(OSError("error talking to pushgateway: 502 Bad Gateway"),
                     "the gateway answered HTTP 502", id="status-from-prometheus-client"),
        pytest.param(URLError(OSError(errno.ENETUNREACH, "http://u:s3cret@h")),
                     "the connection failed (Network is unreachable)", id="errno"),
        pytest.param(URLError("unknown url type: http://u:s3cret@h"),
                     "the URL is not one the job can push to (http:// or https://)",
                     id="urllib-words"),
        pytest.param(RuntimeError("http://u:s3cret@h"), "RuntimeError (its text is not shown)",
                     id="unknown"),
    ],
)  # fmt: skip
def test_a_push_failure_is_said_in_the_jobs_words(exc: BaseException, reason: str) -> None:
    """`metrics.push_failure` words each failure itself, never quoting the exception."""
    assert push_failure(exc) == reason


def test_verify_and_audit_verify_push_whether_they_passed(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """`verify` pushes verify_ok, the violation rows and, only when it passes, its success
    time; `audit verify` pushes chain_ok and its success time, which a broken chain leaves as
    it was; each in a group of its own (`command`), beside the run's."""
    seed_series(engine, range(1, 21))
    config = write_config(tmp_path / "r.toml", config_text())
    base = ["--config", str(config), "--database-url", url_string]
    names = {"ok": metrics.VERIFY_OK, "rows": metrics.VERIFY_VIOLATIONS}
    with started_gateway(tmp_path) as gateway:
        env = {"PUSHGATEWAY_URL": gateway}
        assert CliRunner().invoke(cli, [*base, "verify"], env=env).exit_code == 5
        values = metric_values(gateway)
        assert values[names["ok"]] == {"command=verify": 0.0}
        assert values[names["rows"]] == {"command=verify": 20.0}
        assert metrics.VERIFY_LAST_SUCCESS not in values

        assert CliRunner().invoke(cli, [*base, "run", "--yes"], env=env).exit_code == 0
        before = time.time()
        assert CliRunner().invoke(cli, [*base, "verify"], env=env).exit_code == 0
        values = metric_values(gateway)
        assert values[names["ok"]] == {"command=verify": 1.0}
        assert values[names["rows"]] == {"command=verify": 0.0}
        assert values[metrics.VERIFY_LAST_SUCCESS]["command=verify"] >= before - 1
        assert values[metrics.LAST_RUN_STATUS]["status=succeeded"] == 1.0  # the run's group

        assert CliRunner().invoke(cli, [*base, "audit", "verify"], env=env).exit_code == 0
        values = metric_values(gateway)
        assert values[metrics.CHAIN_OK] == {"command=audit_verify": 1.0}
        good = values[metrics.CHAIN_LAST_SUCCESS]["command=audit_verify"]
        with engine.begin() as conn:
            guards_off(conn)
            conn.execute(
                sql("UPDATE dispatch_retention.events SET body = body || '{}' WHERE seq = 2")
            )
        broken = CliRunner().invoke(cli, [*base, "audit", "verify"], env=env)
        assert broken.exit_code == 6, broken.output
        values = metric_values(gateway)
        assert values[metrics.CHAIN_OK] == {"command=audit_verify": 0.0}
        assert values[metrics.CHAIN_LAST_SUCCESS]["command=audit_verify"] == good
