"""README "Real tables": what depends on the table (the columns' types, the codes, the
personal columns) is checked when the job connects, refused with exit 2 naming the column,
and listed by `db check`; quoted names; plain timestamps whatever the session time zone.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention import config
from tests import oracle
from tests.docs.test_docs_auditor import AWAY, PAGE_ENV
from tests.helpers import db_now, run_job, script, write_config
from tests.real_tables import (
    CODES_TOML,
    ENUMS,
    LABELS_TOML,
    POLICIES,
    RAILS_CODES,
    UPPER_ENUMS,
    VARIANTS,
    Variant,
    _plain,
    api_rows,
    insert,
)

REFUSALS = [
    (
        _plain(transmission="smallint", delivery="integer"),
        "",
        "delivery_status is integer: say which code stands for each of the API's words",
    ),
    (
        ENUMS.replace("'sms', 'email', 'push'", "'sms', 'email'")
        + _plain(
            type_="dispatch_type", transmission="transmission_status", delivery="delivery_status"
        ),
        "",
        "type: a policy names push, which the enum dispatch_type (sms, email) has no label",
    ),
    (
        UPPER_ENUMS + _plain(type_="dispatch_kind", transmission="sending", delivery="delivery"),
        LABELS_TOML.replace('"DELIVERED"', '"DONE"'),
        "delivery_status: [target.codes] names DONE, not labels of the enum delivery",
    ),
    (
        _plain(transmission="smallint", delivery="integer"),
        LABELS_TOML,
        "delivery_status is integer: its [target.codes] must be integers",
    ),
    (_plain(), CODES_TOML, "its [target.codes] must be its text values or labels"),
]


@pytest.mark.parametrize(("ddl", "codes", "reason"), REFUSALS)
@pytest.mark.parametrize("command", [["run", "--yes"], ["run", "--dry-run"], ["verify"]])
def test_a_table_the_config_does_not_fit_is_refused_naming_the_column(
    engine: Engine, url_string: str, tmp_path: Path, ddl: str, codes: str, reason: str,
    command: list[str],
) -> None:  # fmt: skip
    """Statuses the policies' words cannot be stored in: exit 2 before anything is read or
    written, naming the column and the fix; no run record."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(ddl))
    path = write_config(tmp_path / "r.toml", f"{codes}\n[clean]\n{POLICIES}")
    proc = script("--config", str(path), "--database-url", url_string, *command)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert reason in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM dispatch_retention.runs")).scalar() == 0


def test_cutoffs_on_plain_timestamps_do_not_depend_on_the_session_time_zone(
    engine: Engine, tmp_path: Path
) -> None:
    """`timestamp without time zone` holds UTC: the rows due are the same whatever
    `TimeZone` the server or a pooler gives the session (here Pacific/Kiritimati, +14 h)."""
    naive = next(v for v in VARIANTS if v.naive)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(naive.ddl))
        conn.execute(text("SELECT set_config('TimeZone', 'Pacific/Kiritimati', false)"))
    now = db_now(engine)
    rows = api_rows(now, 400, seed=7)
    insert(engine, naive, rows)
    with engine.begin() as conn:
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        conn.execute(text(f"ALTER DATABASE \"{database}\" SET TimeZone = 'Pacific/Kiritimati'"))
    settings = config.parse(f"[clean]\n{POLICIES}")
    outcome = run_job(engine, settings)
    assert outcome.plan is not None
    expected = {r["id"] for r in rows if oracle.is_due(r, settings, outcome.plan.rules.now)}
    with engine.connect() as conn:
        cleaned = set(
            conn.execute(text("SELECT id FROM dispatches WHERE cleaned_at IS NOT NULL")).scalars()
        )
    assert cleaned == expected and expected


COLUMN_REFUSALS = [
    ('columns = ["content", "msisdn", "email", "app_token", "nickname"]',
     "clean.columns names nickname, which the table does not have"),
    ('columns = ["content", "msisdn", "email", "app_token", "recipient_name"]',
     "recipient_name is NOT NULL (character varying) but clean.columns sets it to NULL"),
    ('columns = ["content", "msisdn", "email", "app_token", "attempts"]\n'
     'replace = { content = {}, attempts = "none" }',
     "clean.replace.attempts: 'none' does not fit attempts (integer)"),
]  # fmt: skip


@pytest.mark.parametrize(("clean", "reason"), COLUMN_REFUSALS)
def test_a_personal_column_that_cannot_take_what_cleaning_writes_is_refused(
    engine: Engine, url_string: str, tmp_path: Path, clean: str, reason: str
) -> None:
    """`clean.columns` names the application's own columns; whether each exists and can
    take NULL or its replacement is checked on connecting: exit 2 naming it, and `db check`
    lists it as an error."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        extra = ",\n recipient_name varchar NOT NULL DEFAULT '',\n attempts integer"
        conn.execute(text(_plain(extra=extra)))
    path = write_config(tmp_path / "r.toml", f"[clean]\n{clean}\n{POLICIES}")
    base = ["--config", str(path), "--database-url", url_string]
    refused = script(*base, "run", "--yes")
    assert refused.returncode == 2, refused.stderr
    assert reason in refused.stderr
    checked = script(*base, "db", "check")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"[error] columns: {reason}" in checked.stdout


def test_a_quoted_audit_schema_holds_the_trail(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """`audit.schema = '"Retention Audit"'`: created by `db upgrade`, written by `run`, read
    by `audit list` and `verify`; the name is quoted in every statement, never pasted."""
    insert(engine, Variant("plain", ""), api_rows(db_now(engine), 50, seed=3))
    body = f"[audit]\nschema = '\"Retention Audit\"'\n[clean]\n{POLICIES}"
    base = ["--config", str(write_config(tmp_path / "r.toml", body)), "--database-url", url_string]
    for command in (["db", "upgrade"], ["run", "--yes"], ["audit", "list"], ["verify"]):
        done = script(*base, *command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    with engine.connect() as conn:
        runs = conn.execute(text('SELECT status FROM "Retention Audit".runs')).scalars().all()
    assert runs == ["succeeded"]


def test_a_code_no_mapping_names_is_an_unknown_status_and_db_check_says_so(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Rails codes with a code the config does not map (7: a status the application added):
    such dispatches are unsettled (they wait out the grace, as the oracle says of an unknown
    status), and `db check` names the column and counts the value, never showing it."""
    rails = next(v for v in VARIANTS if v.config == CODES_TOML)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(rails.ddl))
    now = db_now(engine)
    rows = api_rows(now, 300, seed=11)
    added = [r for r in rows if r["transmission_status"] == "failed"][:25]
    for row in added:
        row["transmission_status"], row["delivery_status"] = "bounced", None
    codes = {**RAILS_CODES, "transmission_status": {**RAILS_CODES["transmission_status"],
                                                    "bounced": 7}}  # fmt: skip
    insert(engine, replace(rails, encode=lambda c, w: codes[c][w]), rows)
    path = write_config(tmp_path / "r.toml", f"{CODES_TOML}\n[clean]\n{POLICIES}")
    checked = script("--config", str(path), "--database-url", url_string, "db", "check")
    assert (
        "[warn ] statuses: transmission_status holds 1 unknown value (not shown" in checked.stdout
    )
    outcome = run_job(engine, config.load(path))
    assert outcome.plan is not None
    s = config.load(path)
    expected = {r["id"] for r in rows if oracle.is_due(r, s, outcome.plan.rules.now)}
    with engine.connect() as conn:
        cleaned = set(
            conn.execute(text("SELECT id FROM dispatches WHERE cleaned_at IS NOT NULL")).scalars()
        )
    assert cleaned == expected
    waiting = {r["id"] for r in added} - expected
    assert waiting  # some of them are inside retention + grace: unsettled, not failed sends


AUDITOR = Path(__file__).parents[2] / "docs" / "auditor.md"
CROSS_CHECK = re.compile(r'\$ psql "\$RO_URL" -c "(SELECT c\.seq, c\.rows AS recorded.*?)"\n', re.S)
RUN_ID = re.compile(r"'[0-9a-f-]{36}'")


def test_the_auditors_cross_check_holds_on_plain_timestamps_in_any_server_time_zone(
    engine: Engine, database_url: URL
) -> None:
    """docs/auditor.md's per-chunk cross-check, run with psql as the page says (PGTZ=UTC) on
    a table whose timestamps have no time zone, on a server whose default is +14 h: every
    chunk finds the rows it recorded. Without PGTZ it would find none: the test can fail."""
    naive = next(v for v in VARIANTS if v.naive)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dispatches CASCADE"))
        conn.execute(text(naive.ddl))
        conn.execute(text(f"ALTER DATABASE \"{database_url.database}\" SET TimeZone = '{AWAY}'"))
    insert(engine, naive, api_rows(db_now(engine), 300, seed=9))
    outcome = run_job(engine, config.parse(f"[clean]\n{POLICIES}"), chunk_size=40)
    assert outcome.chunks > 1
    found = CROSS_CHECK.search(AUDITOR.read_text(encoding="utf-8"))
    assert found, "docs/auditor.md lost its per-chunk cross-check"
    query = RUN_ID.sub(f"'{outcome.run_id}'", found.group(1))
    url = database_url.set(drivername="postgresql").render_as_string(hide_password=False)

    def cross_check(env: dict[str, str]) -> list[tuple[int, int]]:
        done = subprocess.run(
            ["psql", url, "-At", "-F", ",", "-c", query],
            capture_output=True, text=True, check=True, timeout=60,
            env={**os.environ, "PSQLRC": os.devnull, **env},
        )  # fmt: skip
        rows = [line.split(",") for line in done.stdout.splitlines()]
        return [(int(recorded), int(seen)) for _seq, recorded, seen in rows]

    as_page_says = cross_check(PAGE_ENV)
    assert len(as_page_says) == outcome.chunks
    assert all(recorded == seen > 0 for recorded, seen in as_page_says)
    assert all(seen == 0 for _recorded, seen in cross_check({}))
