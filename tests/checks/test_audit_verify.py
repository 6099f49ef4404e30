"""The audit trail's hash chain (migration 0005) and `audit verify`.

The database writes one event per write to the trail, hashed over its canonical body and
the previous hash; the job's roles cannot write an event or call the function that does.
The owner, who can turn every trigger off, can still change the tables: `audit verify`
catches each such forgery (exit 6, naming the first bad row), and a chain cut back or
rewritten since a kept head.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from structlog.testing import capture_logs

from dispatch_retention.trail import migrate
from dispatch_retention.vocabulary import Exit
from tests.helpers import granted_role, guards_off, invoke, run_job, seed_series, settings
from tests.trail.test_guards import (
    CHUNK_COLUMNS,
    CHUNKS,
    FORGERIES,
    HOLDS,
    OWNER_ONLY,
    RUNS,
    refused,
)

EVENTS, HEAD = "dispatch_retention.events", "dispatch_retention.events_head"


def verify(base: list[str], *extra: str) -> tuple[int, dict[str, Any]]:
    result = invoke(*base, "audit", "verify", "--format", "json", *extra)
    assert result.exit_code in (Exit.OK, Exit.TAMPERED), result.output
    return result.exit_code, json.loads(result.stdout)


def events(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT seq, kind, body, prev_hash, hash FROM {EVENTS} ORDER BY seq")
        )
        return [dict(r._mapping) for r in rows]


@pytest.fixture
def trail(engine: Engine) -> str:
    """A finished run of three chunks and a placed and a released hold; the run's id."""
    seed_series(engine, range(0, 300))
    outcome = run_job(engine, settings(), chunk_size=100)
    assert outcome.status.value == "succeeded" and outcome.chunks == 3
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (4242, 'case 1')"))
        conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (4343, 'case 2')"))
        conn.execute(text(f"UPDATE {HOLDS} SET released_at = now() WHERE member_id = 4343"))
    return outcome.run_id


def test_every_write_to_the_trail_is_an_event_hashed_by_the_database(
    engine: Engine, trail: str, base: list[str]
) -> None:
    """The kinds in order, each hash the SHA-256 of its body (recomputed here), each body
    naming the previous hash; `audit verify` agrees and prints the head."""
    found = events(engine)
    assert [e["kind"] for e in found] == [
        "run_started", "run_planned", *["chunk_committed"] * 3, "run_finished",
        "hold_placed", "hold_placed", "hold_released",
    ]  # fmt: skip
    prev = "0" * 64
    for event in found:
        body = json.loads(event["body"])
        assert hashlib.sha256(event["body"].encode()).hexdigest() == event["hash"]
        assert (body["v"], body["seq"], body["prev"], event["prev_hash"]) == (
            2, event["seq"], prev, prev
        )  # fmt: skip
        assert body["imported"] is False
        prev = event["hash"]
    finished = json.loads(found[5]["body"])["fact"]
    assert (finished["run_id"], finished["status"]) == (trail, "succeeded")
    code, report = verify(base)
    assert (code, report["ok"], report["events"], report["head"]) == (0, True, 9, prev)
    assert report["chunks_counted"] == 3 and report["findings"] == []
    text_out = invoke(*base, "audit", "verify").stdout
    assert f"seq 9 {prev}" in text_out and "OK:" in text_out


def test_run_finished_logs_the_head(engine: Engine) -> None:
    seed_series(engine, range(1, 101))
    with capture_logs() as logs:
        run_job(engine, settings(), chunk_size=50)
    finished = [e for e in logs if e["event"] == "run_finished"][-1]
    with engine.connect() as conn:
        head = conn.execute(text(f"SELECT hash FROM {HEAD}")).scalar_one()
    assert finished["chain_head"] == head


def test_the_expected_head_must_still_be_in_the_chain(
    engine: Engine, trail: str, base: list[str]
) -> None:
    """A kept head is found (and how far the chain went on since); one not in the chain (a
    chain cut back past it, or any other hash) is exit 6."""
    _, first = verify(base)
    kept = first["head"]
    seed_series(engine, range(300, 400))
    run_job(engine, settings(), chunk_size=100)
    code, report = verify(base, "--expect-head", kept.upper())
    assert (code, report["expected_head_seq"]) == (0, 9) and report["head_seq"] > 9
    code, report = verify(base, "--expect-head", "ab" * 32)
    assert code == Exit.TAMPERED and report["findings"][0]["row"] == "events"
    bad = invoke(*base, "audit", "verify", "--expect-head", "not-a-hash")
    assert bad.exit_code == 2 and "64 hexadecimal digits" in bad.output


def test_a_head_file_keeps_the_last_good_head(
    engine: Engine, trail: str, base: list[str], tmp_path: Path
) -> None:
    """`--head-file`: no file is a first check (the head is kept); the next check expects it
    and keeps the new head; a chain cut back past it is exit 6 and the file keeps the last
    good head; a file that holds no head, that is not a regular file (a device it would
    replace), or that cannot be read or written, is exit 2."""
    kept = tmp_path / "chain-head"
    first = invoke(*base, "audit", "verify", "--head-file", str(kept))
    assert first.exit_code == 0, first.output
    head_9 = kept.read_text()
    assert head_9 == events(engine)[-1]["hash"] + "\n"
    seed_series(engine, range(300, 400))
    run_job(engine, settings(), chunk_size=100)
    code, report = verify(base, "--head-file", str(kept))
    assert (code, report["expected_head_seq"]) == (0, 9)
    good = kept.read_text()
    assert good == report["head"] + "\n" != head_9
    linked, real = tmp_path / "linked-head", tmp_path / "real-head"
    real.write_text("")
    real.chmod(0o640)
    linked.symlink_to(real)
    through = invoke(*base, "audit", "verify", "--head-file", str(linked))
    assert through.exit_code == 0 and "no head kept in" in through.stderr
    assert linked.is_symlink() and real.read_text().strip() == good.strip()
    assert real.stat().st_mode & 0o777 == 0o640  # written through the link, its mode kept
    unwritable = invoke(*base, "audit", "verify", "--head-file", "/proc/chain-head")  # no file
    assert unwritable.exit_code == 2 and "cannot keep the head" in unwritable.output
    with engine.begin() as conn:
        guards_off(conn)
        seq = conn.execute(text(f"SELECT max(seq) FROM {EVENTS}")).scalar_one()
        conn.execute(text(f"DELETE FROM {EVENTS} WHERE seq > 9"))
        conn.execute(text(f"UPDATE {HEAD} SET seq = 9, hash = :h"), {"h": head_9.strip()})
    assert seq > 9
    code, report = verify(base, "--head-file", str(kept))
    assert code == Exit.TAMPERED and any(
        "expected head" in f["problem"] for f in report["findings"]
    )
    assert kept.read_text() == good  # the last good head, still
    kept.write_text("not a head\n")
    bad = invoke(*base, "audit", "verify", "--head-file", str(kept))
    assert bad.exit_code == 2 and f"--head-file {kept}: holds something else" in bad.output
    both = invoke(*base, "audit", "verify", "--head-file", str(kept), "--expect-head", "a" * 64)
    assert both.exit_code == 2 and "or --expect-head, not both" in both.output
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    device = invoke(*base, "audit", "verify", "--head-file", "/dev/null")  # never replaced
    assert device.exit_code == 2 and "is not a regular file" in device.output
    unreadable = invoke(*base, "audit", "verify", "--head-file", str(blocked / "head"))
    assert unreadable.exit_code == 2 and "Not a directory" in unreadable.output


def test_the_read_only_role_verifies_the_trail(
    engine: Engine, database_url: Any, trail: str, base: list[str], config_file: Path
) -> None:
    """The auditor's role (no personal column, no write) gets the owner's answer."""
    owner = verify(base)[1]
    with granted_role(engine, database_url, "read-only") as (_role, url):
        as_auditor = verify(["--config", str(config_file), "--database-url", url])
    assert as_auditor == (0, owner)


def test_row_level_security_on_the_dispatches_is_refused_not_miscounted(
    engine: Engine, database_url: Any, trail: str, config_file: Path
) -> None:
    """A policy hiding half the dispatches from the auditor's role would make every chunk's
    count look short (a false TAMPERED), or, the other way round, hide rows: audit verify
    refuses to count a table row-level security filters for its role (exit 2), as verify."""
    with granted_role(engine, database_url, "read-only") as (role, url):
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE dispatches ENABLE ROW LEVEL SECURITY"))
            conn.execute(
                text(
                    f"CREATE POLICY even_only ON dispatches FOR SELECT TO {role} USING (id % 2 = 0)"
                )
            )
        result = invoke("--config", str(config_file), "--database-url", url, "audit", "verify")
    assert result.exit_code == 2, result.output
    assert "row-level security" in result.stderr and result.stdout == ""


# --- the owner's forgeries: past the guards, caught by audit verify ---------------------------


def owner_forges(engine: Engine, statement: str, run_id: str) -> None:
    """`statement` as the owner with every trigger off (guards and events alike)."""
    with engine.begin() as conn:
        guards_off(conn)
        conn.execute(text(statement), {"r": run_id})


@pytest.mark.parametrize(
    ("statement", "row"),
    [
        (FORGERIES["rewrite a finished run"], "runs {r}"),
        (FORGERIES["backdate a finished run"], "runs {r}"),
        (FORGERIES["add a chunk to a finished run"], "chunks {r}/999"),
        (FORGERIES["rewrite a chunk"], "chunks {r}/1"),
        (FORGERIES["insert a forged succeeded run"], "runs "),
        (OWNER_ONLY["delete its chunks"], "chunks {r}/1"),
        (f"UPDATE {HOLDS} SET released_at = NULL, released_by = NULL", "legal_holds "),
        (f"DELETE FROM {HOLDS} WHERE member_id = 4242", "legal_holds "),
        (
            f"INSERT INTO {HOLDS} (member_id, reason, created_at, created_by) "
            "VALUES (77, 'case 9', '2020-01-01', 'the_dpo')",
            "legal_holds ",
        ),
        (
            f"UPDATE {HOLDS} SET released_at = created_at - interval '1 day' "
            "WHERE member_id = 4343",
            "legal_holds ",
        ),
    ],
    ids=[
        "rewrite a finished run", "backdate a finished run", "add a chunk",
        "rewrite a chunk", "insert a forged run", "delete chunks", "un-release a hold",
        "delete a hold", "insert a backdated hold for another", "release before the hold",
    ],
)  # fmt: skip
def test_the_owners_forgeries_of_the_tables_are_caught(
    engine: Engine, trail: str, base: list[str], statement: str, row: str
) -> None:
    assert verify(base)[0] == 0
    owner_forges(engine, statement, trail)
    code, report = verify(base)
    assert code == Exit.TAMPERED and not report["ok"]
    assert report["findings"][0]["row"].startswith(row.format(r=trail)), report["findings"]
    out = invoke(*base, "audit", "verify")
    assert out.exit_code == Exit.TAMPERED and "TAMPERED: " in out.stdout


def _rehash(conn: Any, seq: int, body: str) -> None:
    digest = hashlib.sha256(body.encode()).hexdigest()
    conn.execute(
        text(f"UPDATE {EVENTS} SET body = :b, hash = :h WHERE seq = :s"),
        {"b": body, "h": digest, "s": seq},
    )


def test_the_owners_forgeries_of_the_chain_are_caught(
    engine: Engine, trail: str, base: list[str]
) -> None:
    """An event's body changed (hash mismatch); changed and rehashed (the next event's
    previous hash no longer matches); the last events cut off (events_head says more); cut
    off with the head rewritten too (only a kept head shows it)."""
    kept = verify(base)[1]["head"]
    found = events(engine)
    chunk = found[2]
    forged = chunk["body"].replace('"rows": 100', '"rows": 500')
    assert forged != chunk["body"]
    with engine.begin() as conn:
        guards_off(conn)
        conn.execute(text(f"UPDATE {EVENTS} SET body = :b WHERE seq = 3"), {"b": forged})
    code, report = verify(base)
    assert code == Exit.TAMPERED
    assert report["findings"][0] == {
        "row": "events seq 3",
        "problem": "its hash is not the SHA-256 of its body: the event was changed",
        "changed": "trail",
    }
    with engine.begin() as conn:
        guards_off(conn)
        _rehash(conn, 3, forged)
    report = verify(base)[1]
    assert report["findings"][0]["row"] == "events seq 4"
    assert "previous hash is not the hash of seq 3" in report["findings"][0]["problem"]
    with engine.begin() as conn:
        guards_off(conn)
        _rehash(conn, 3, chunk["body"])  # back as it was
        conn.execute(text(f"DELETE FROM {EVENTS} WHERE seq >= 8"))
    report = verify(base)[1]
    assert report["findings"][0]["row"] == "events_head", report
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {HEAD} SET seq = 7, hash = :h"), {"h": found[6]["hash"]})
    code, report = verify(base)
    rows = [f["row"] for f in report["findings"]]
    assert code == Exit.TAMPERED and rows[0].startswith("legal_holds ")  # rows without events
    expected = verify(base, "--expect-head", kept)[1]["findings"]
    assert any(f["row"] == "events" and "expected head" in f["problem"] for f in expected)


def test_a_rewrite_covered_by_fitting_events_is_caught_by_the_rows_history(
    engine: Engine, trail: str, base: list[str]
) -> None:
    """The owner rewrites a finished run and a chunk with the triggers off, then appends
    events in good form that record the forged rows (the kept head stays in the chain, the
    rows equal their newest events): each row's events no longer tell a story the guards
    allow. An event's recorded_at moved away from its body is caught too."""
    kept = verify(base)[1]["head"]
    with engine.begin() as conn:
        guards_off(conn)
        conn.execute(
            text(
                f"UPDATE {RUNS} SET status = 'failed', started_at = '2020-01-01' WHERE run_id = :r"
            ),
            {"r": trail},
        )
        conn.execute(
            text(
                f"UPDATE {CHUNKS} SET by_policy = '{{\"forged\": 1}}' WHERE run_id = :r AND seq = 1"
            ),
            {"r": trail},
        )
        conn.execute(
            text(
                "SELECT dispatch_retention.append_event('run_finished', 'run:' || r.run_id, "
                f"to_jsonb(r), false) FROM {RUNS} r WHERE run_id = :r"
            ),
            {"r": trail},
        )
        conn.execute(
            text(
                "SELECT dispatch_retention.append_event('chunk_committed', "
                "'chunk:' || c.run_id || '/' || c.seq, to_jsonb(c), false) "
                f"FROM {CHUNKS} c WHERE run_id = :r AND seq = 1"
            ),
            {"r": trail},
        )
    code, report = verify(base, "--expect-head", kept)
    problems = [f["problem"] for f in report["findings"]]
    assert code == Exit.TAMPERED and report["expected_head_seq"] == 9, report
    assert any(f"run:{trail}: an event after the run ended succeeded" in p for p in problems)
    assert any(f"chunk:{trail}/1: a second event for the chunk" in p for p in problems)
    with engine.begin() as conn:
        guards_off(conn)
        conn.execute(text(f"UPDATE {EVENTS} SET recorded_at = '1970-01-01' WHERE seq = 1"))
    first = verify(base)[1]["findings"][0]
    assert first == {
        "row": "events seq 1",
        "problem": "its columns differ from its body: the event was changed",
        "changed": "trail",
    }


def test_a_chunk_the_dispatches_do_not_bear_out_is_caught(
    engine: Engine, trail: str, base: list[str]
) -> None:
    """With every trigger on, the owner can add a chunk with a valid event to a run it
    starts: the chain holds, and the dispatches show the chunk's count is not theirs."""
    with engine.begin() as conn:
        run_id = conn.execute(
            text(
                f"INSERT INTO {RUNS} (run_id, status, started_at, trigger, host, tool_version, "
                "db_user, target_table, options, config_path, config_sha256, config_text) "
                "VALUES (gen_random_uuid(), 'running', now(), 'cron', 'h', '0', current_user, "
                "'public.dispatches', '{}', 'x', 'x', 'x') RETURNING run_id"
            )
        ).scalar_one()
        conn.execute(
            text(
                f"INSERT INTO dispatch_retention.chunks {CHUNK_COLUMNS} VALUES "
                """(:r, 1, 1, 300, 5000, now(), '{"sms": 5000}'::jsonb, false)"""
            ),
            {"r": run_id},
        )
    code, report = verify(base)
    assert code == Exit.TAMPERED and len(report["findings"]) == 1
    assert report["findings"][0]["row"] == f"chunks {run_id}/1"
    assert "says 5000 dispatches were cleaned" in report["findings"][0]["problem"]


# --- the job's own roles -------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        f"INSERT INTO {EVENTS} (seq, kind, subject, recorded_at, body, prev_hash, hash) "
        "VALUES (99, 'run_started', 'run:x', now(), '{{}}', 'x', 'y')",
        f"UPDATE {HEAD} SET seq = 0",
        f"UPDATE {EVENTS} SET body = body",
        f"DELETE FROM {EVENTS}",
        "SELECT dispatch_retention.append_event('run_finished', 'run:' || :r, '{}', false)",
    ],
    ids=["insert an event", "move the head", "change an event", "delete events", "append"],
)
@pytest.mark.parametrize("purpose", ["run", "holds", "read-only"])
def test_the_roles_cannot_write_the_chain(
    engine: Engine, database_url: Any, trail: str, purpose: str, statement: str
) -> None:
    with granted_role(engine, database_url, purpose) as (_role, url):
        error = refused(url, statement.replace("{{}}", "{}"), run_id=trail)
    assert "InsufficientPrivilege" in error, error


def test_the_chain_lock_is_taken_for_the_event_only(engine: Engine) -> None:
    """A transaction holds the chain from its event to its end: another writer's event
    waits for that (here: gives up after lock_timeout), not for its earlier statements."""
    seed_series(engine, range(1, 11))
    first = engine.connect()
    try:
        tx = first.begin()
        first.execute(text("UPDATE dispatches SET updated_at = now() WHERE id <= 5"))
        with engine.begin() as other:  # no event yet in `first`: no wait
            other.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (1, 'a')"))
        first.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (2, 'b')"))
        with pytest.raises(DBAPIError, match="lock timeout"), engine.begin() as other:
            other.execute(text("SET LOCAL lock_timeout = '200ms'"))
            other.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (3, 'c')"))
        waiting = threading.Thread(target=_hold, args=(engine, 4))
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive()  # waits for `first`
        tx.commit()
        waiting.join(10)
        assert not waiting.is_alive()
    finally:
        first.close()
    assert [e["kind"] for e in events(engine)] == ["hold_placed"] * 3


def _hold(engine: Engine, member_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (:m, 'w')"), {"m": member_id}
        )


# --- the upgrade that begins the chain -------------------------------------------------------


def test_the_upgrade_seeds_the_chain_from_the_trail_there(engine: Engine, base: list[str]) -> None:
    """A trail made before the chain (here: made, then its chain dropped by a downgrade to
    0004) is seeded into it by the upgrade, oldest first, each event marked imported; runs
    after it go on from there."""
    from alembic import command

    seed_series(engine, range(0, 200))
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {HOLDS} (member_id, reason) VALUES (4242, 'case 1')"))
    assert run_job(engine, settings(), chunk_size=100).chunks == 2
    cfg = migrate.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["schema"] = "dispatch_retention"
        command.downgrade(cfg, "0004")
    assert migrate.upgrade(engine, "dispatch_retention") == ("0004", migrate.HEAD)
    found = events(engine)
    assert [e["kind"] for e in found] == ["hold_placed", "run_finished", *["chunk_committed"] * 2]
    assert all(json.loads(e["body"])["imported"] for e in found)
    code, report = verify(base)
    assert (code, report["imported_events"], report["chunks_counted"]) == (0, 4, 2)
    seed_series(engine, range(200, 300))
    run_job(engine, settings(), chunk_size=100)  # the chain goes on from the imported events
    code, report = verify(base)
    assert (code, report["imported_events"], report["events"]) == (0, 4, 8)
