"""`policy describe`: the retention schedule for the record of processing (CONTRACT section
10). The shipped config's Markdown is docs/retention-schedule.md byte for byte; the JSON and
CSV hold the same facts as the config; `legal_basis` and `purpose` are plain text (a bad one
exits 2); a text that Markdown would read as markup is printed literally. No database."""

from __future__ import annotations

import csv
import io
import json
import tomllib
from pathlib import Path

import pytest

from dispatch_retention import config
from tests.helpers import assert_no_marker, invoke, write_config

ROOT = Path(__file__).parents[2]
SHIPPED = ROOT / "config" / "retention.toml"
EXPECTED = ROOT / "docs" / "retention-schedule.md"
#: the environment of a machine without a database: describe must not need one
NO_DATABASE = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "DATABASE_URL_FILE": ""}


def describe(config_path: Path, *args: str) -> str:
    result = invoke("--config", str(config_path), "policy", "describe", *args, env=NO_DATABASE)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_shipped_schedule_is_the_checked_in_page_byte_for_byte() -> None:
    """Regenerate with `dispatch-retention policy describe > docs/retention-schedule.md`."""
    printed = describe(SHIPPED)
    assert printed == EXPECTED.read_text()
    assert describe(SHIPPED) == printed  # deterministic


def test_json_and_csv_hold_what_the_config_says() -> None:
    raw = tomllib.loads(SHIPPED.read_text())
    settings = config.load(str(SHIPPED))
    document = json.loads(describe(SHIPPED, "--format", "json"))
    assert document["config_sha256"] == settings.sha256
    assert document["table"] == raw["target"]["table"]
    got = [(p["name"], p["retention_days"], p["grace_days"], p["legal_basis"], p["purpose"])
           for p in document["policies"]]  # fmt: skip
    want = [(p["name"], p["retention_days"], raw["clean"]["in_flight_grace_days"],
             p.get("legal_basis"), p.get("purpose")) for p in raw["policy"]]  # fmt: skip
    assert got == want
    assert [c["column"] for c in document["stripped"]] == raw["clean"]["columns"]
    kept = {c["column"]: c for c in document["kept"]}
    assert kept["member_id"]["personal_data"] is True
    assert kept["member_id"]["reason"] == raw["clean"]["keep"]["member_id"]
    assert not set(kept) & set(raw["clean"]["columns"])
    rows = list(csv.DictReader(io.StringIO(describe(SHIPPED, "--format", "csv"))))
    assert [(r["policy"], int(r["retention_days"]), r["legal_basis"]) for r in rows] == [
        (p["name"], p["retention_days"], p.get("legal_basis", "")) for p in raw["policy"]
    ]


def test_what_a_policy_matches_is_said_in_words(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "r.toml",
        '[[policy]]\nname = "a"\nretention_days = 40\n'
        'where = { type = ["sms", "email"], transmission_status = "failed" }\n'
        '[[policy]]\nname = "b"\nretention_days = 400\n',
    )
    policies = json.loads(describe(path, "--format", "json"))["policies"]
    assert [p["matches"] for p in policies] == [
        "dispatches whose type is sms or email, and transmission_status is failed",
        "every dispatch",
    ]
    assert [p["legal_basis"] for p in policies] == [None, None]
    assert "| not stated | not stated |" in describe(path)


def test_markup_in_a_legal_basis_is_printed_literally(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "r.toml",
        '[[policy]]\nname = "a"\nretention_days = 40\n'
        'legal_basis = "Art. 6 | <script>alert(1)</script> *x* [y](z) & `c`"\n',
    )
    line = next(ln for ln in describe(path).splitlines() if ln.startswith("| a |"))
    assert r"Art. 6 \| \<script\>alert(1)\</script\> \*x\* \[y\](z) \& \`c\`" in line
    assert line.count(" | ") == 5  # the cell's | did not open a seventh column


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ('"line one\\nline two"', "U+000A"),
        ('"\\u001b[31mred"', "U+001B"),
        ('"Art. 6\\u202e"', "U+202E"),  # a right-to-left override
        ('""', "at least 1 character"),
        ('"' + "x" * 501 + '"', "at most 500 characters"),
        ("6", "valid string"),
    ],
    ids=["newline", "escape", "bidi", "empty", "too long", "a number"],
)
@pytest.mark.parametrize("key", ["legal_basis", "purpose"])
def test_a_bad_legal_basis_or_purpose_exits_2_naming_it(
    tmp_path: Path, key: str, value: str, said: str
) -> None:
    path = write_config(
        tmp_path / "r.toml", f'[[policy]]\nname = "a"\nretention_days = 40\n{key} = {value}\n'
    )
    result = invoke("--config", str(path), "policy", "describe", env=NO_DATABASE)
    assert result.exit_code == 2, result.output
    assert key in result.stderr and said in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert_no_marker(result.output)
