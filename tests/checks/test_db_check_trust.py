"""`db check` on trust: copy risks, unclassified columns, refused targets (docs/operations.md,
"`db check`: copy risks, unclassified columns, `[acknowledged]`")."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention import config
from dispatch_retention.catalog import risks
from dispatch_retention.checks import db_check
from dispatch_retention.checks.db_check import Finding
from dispatch_retention.config import Settings
from tests.helpers import (
    assert_no_marker,
    config_text,
    run_script,
    seed_series,
    settings,
    write_config,
)

HISTORY_TRIGGER = "dispatches_history_copy"
REVIEWED = "history purged nightly, reviewed"

HISTORY_TABLE = (
    "CREATE TABLE dispatches_history "
    "(dispatch_id bigint, msisdn text, content jsonb, copied_at timestamptz DEFAULT now())"
)
COPY_OLD = f"""
CREATE FUNCTION copy_old_dispatch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO dispatches_history (dispatch_id, msisdn, content)
  VALUES (OLD.id, OLD.msisdn, OLD.content);
  RETURN NEW;
END $$;
CREATE TRIGGER {HISTORY_TRIGGER} AFTER UPDATE ON dispatches
  FOR EACH ROW EXECUTE FUNCTION copy_old_dispatch();
"""
KEEP_TOKEN = """
CREATE FUNCTION keep_app_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.app_token := OLD.app_token;
  RETURN NEW;
END $$;
CREATE TRIGGER dispatches_keep_token BEFORE UPDATE ON dispatches
  FOR EACH ROW EXECUTE FUNCTION keep_app_token();
"""
COPY_RULE = (
    "CREATE RULE dispatches_copy_rule AS ON UPDATE TO dispatches DO ALSO "
    "INSERT INTO dispatches_history (dispatch_id, msisdn, content) "
    "VALUES (OLD.id, OLD.msisdn, OLD.content)"
)


def execute(engine: Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def with_acknowledged(acknowledged: dict[str, str], clean: str = "") -> str:
    lines = "".join(f'{name} = "{reason}"\n' for name, reason in acknowledged.items())
    return f"{config_text(clean)}\n[acknowledged]\n{lines}"


def acknowledging(acknowledged: dict[str, str], clean: str = "") -> Settings:
    return config.parse(with_acknowledged(acknowledged, clean), "test.toml")


def check(engine: Engine, s: Settings | None = None) -> list[Finding]:
    with engine.connect() as conn, conn.begin():
        return db_check.check(conn, s or settings())


def copy_risks(engine: Engine, s: Settings | None = None) -> list[risks.Risk]:
    with engine.connect() as conn, conn.begin():
        return risks.copy_risks(conn, s or settings())


def about(findings: list[Finding], name: str) -> list[Finding]:
    return [f for f in findings if name in f.message]


# --- copy risks ------------------------------------------------------------------------------


def test_after_update_copy_trigger_warns_until_acknowledged(engine: Engine) -> None:
    """An AFTER UPDATE trigger copying OLD into a history table is a warn, then ok with the
    reason once named in [acknowledged]."""
    seed_series(engine, range(1, 6))
    execute(engine, HISTORY_TABLE, COPY_OLD)
    [risk] = copy_risks(engine)
    assert (risk.kind, risk.name, risk.when, risk.acknowledged) == (
        "trigger",
        HISTORY_TRIGGER,
        "AFTER",
        None,
    )
    assert "row" in risk.detail and "copy_old_dispatch" in risk.detail
    [warned] = about(check(engine), HISTORY_TRIGGER)
    assert warned.level == "warn" and warned.check == "copy risk"
    assert "AFTER UPDATE" in warned.message and "[acknowledged]" in warned.message
    [acknowledged] = about(
        check(engine, acknowledging({HISTORY_TRIGGER: REVIEWED})), HISTORY_TRIGGER
    )
    assert acknowledged.level == "ok" and REVIEWED in acknowledged.message
    [risk] = copy_risks(engine, acknowledging({HISTORY_TRIGGER: REVIEWED}))
    assert risk.acknowledged == REVIEWED
    assert risk.as_dict() == {
        "kind": "trigger",
        "name": HISTORY_TRIGGER,
        "when": "AFTER",
        "detail": risk.detail,
        "acknowledged": REVIEWED,
    }


def test_before_update_trigger_may_write_back(engine: Engine) -> None:
    """A BEFORE UPDATE trigger that restores app_token is listed with BEFORE and write-back."""
    execute(engine, KEEP_TOKEN)
    [risk] = copy_risks(engine)
    assert (risk.kind, risk.name, risk.when) == ("trigger", "dispatches_keep_token", "BEFORE")
    assert "write" in risk.detail and "back" in risk.detail and "skip" in risk.detail
    [warned] = about(check(engine), "dispatches_keep_token")
    assert warned.level == "warn" and "BEFORE UPDATE" in warned.message


def test_statement_level_trigger_is_noted_as_such(engine: Engine) -> None:
    """A statement-level AFTER UPDATE trigger is listed, and said to be statement-level."""
    execute(
        engine,
        "CREATE FUNCTION note_update() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RETURN NULL; END $$",
        "CREATE TRIGGER dispatches_note AFTER UPDATE ON dispatches "
        "FOR EACH STATEMENT EXECUTE FUNCTION note_update()",
    )
    [risk] = copy_risks(engine)
    assert (risk.name, risk.when) == ("dispatches_note", "AFTER")
    assert "statement" in risk.detail


def test_update_rule_is_listed(engine: Engine) -> None:
    """A DO ALSO rule on UPDATE that inserts the old row elsewhere is a copy risk, and an
    error of `db check` (the job refuses such a table: test_trust_table_shapes.py)."""
    execute(engine, HISTORY_TABLE, COPY_RULE)
    [risk] = copy_risks(engine)
    assert (risk.kind, risk.name, risk.when) == ("rule", "dispatches_copy_rule", None)
    [refused] = about(check(engine), "dispatches_copy_rule")
    assert refused.level == "error" and refused.check == "rule"


@pytest.mark.parametrize(
    "publication",
    [
        pytest.param("FOR TABLE dispatches", id="for-table"),
        pytest.param("FOR ALL TABLES", id="all-tables"),
        pytest.param("FOR TABLES IN SCHEMA public", id="tables-in-schema"),
    ],
)
def test_publication_that_publishes_updates_is_listed(engine: Engine, publication: str) -> None:
    """A publication that includes the table and publishes updates is listed."""
    execute(engine, f"CREATE PUBLICATION dispatches_cdc {publication}")
    [risk] = copy_risks(engine)
    assert (risk.kind, risk.name) == ("publication", "dispatches_cdc")
    assert "subscriber" in risk.detail
    [warned] = about(check(engine), "dispatches_cdc")
    assert warned.level == "warn"


def test_insert_only_publication_is_not_listed(engine: Engine) -> None:
    """A publication that publishes inserts only receives nothing from cleaning: of two
    publications of the table, only the one that publishes updates is listed."""
    execute(
        engine,
        "CREATE PUBLICATION new_dispatches FOR TABLE dispatches WITH (publish = 'insert')",
        "CREATE PUBLICATION dispatches_cdc FOR TABLE dispatches WITH (publish = 'update')",
    )
    assert [r.name for r in copy_risks(engine)] == ["dispatches_cdc"]
    found = check(engine)
    assert about(found, "new_dispatches") == [] and len(about(found, "dispatches_cdc")) == 1


def test_replica_identity_full_is_listed(engine: Engine) -> None:
    """REPLICA IDENTITY FULL is listed under the name replica_identity, and acknowledgeable."""
    execute(engine, "ALTER TABLE dispatches REPLICA IDENTITY FULL")
    [risk] = copy_risks(engine)
    assert (risk.kind, risk.name, risk.when) == ("replica_identity", "replica_identity", None)
    assert "WAL" in risk.detail
    [warned] = [f for f in check(engine) if f.check == "copy risk"]
    assert warned.level == "warn" and "REPLICA IDENTITY FULL" in warned.message
    s = acknowledging({"replica_identity": "no logical decoding here"})
    [ok] = [f for f in check(engine, s) if f.check == "copy risk"]
    assert ok.level == "ok" and "no logical decoding here" in ok.message


def test_disabled_internal_and_unrelated_triggers_are_not_listed(engine: Engine) -> None:
    """A disabled trigger, the internal triggers of a foreign key to dispatches and an
    INSERT-only trigger are no copy risk: nothing is listed and db check says so."""
    assert copy_risks(engine) == []
    execute(
        engine,
        HISTORY_TABLE,
        COPY_OLD,
        f"ALTER TABLE dispatches DISABLE TRIGGER {HISTORY_TRIGGER}",
        "CREATE TABLE dispatch_receipts (id bigint PRIMARY KEY, "
        "dispatch_id bigint REFERENCES dispatches (id) ON UPDATE CASCADE)",
        "CREATE TRIGGER dispatches_on_insert AFTER INSERT ON dispatches "
        "FOR EACH ROW EXECUTE FUNCTION copy_old_dispatch()",
    )
    with engine.connect() as conn:
        internal = conn.execute(
            text(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'dispatches'::regclass "
                "AND tgisinternal"
            )
        ).scalar_one()
    assert internal > 0  # the foreign key's triggers exist and fire on UPDATE of dispatches
    assert copy_risks(engine) == []
    [ok] = [f for f in check(engine) if f.check == "copy risk"]
    assert ok.level == "ok"


def test_partition_triggers_and_publications_are_listed(engine: Engine) -> None:
    """On a partitioned target, a trigger on one partition and a publication of a partition
    are listed once; a trigger of the parent, cloned to each partition, is listed once."""
    execute(
        engine,
        HISTORY_TABLE,
        "CREATE TABLE parted (id bigint, msisdn text, content jsonb) PARTITION BY RANGE (id)",
        "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)",
        "CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (100) TO (200)",
        "CREATE FUNCTION copy_parted() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO dispatches_history (dispatch_id) VALUES (OLD.id); RETURN NEW; END $$",
        "CREATE TRIGGER parted_copy AFTER UPDATE ON parted "
        "FOR EACH ROW EXECUTE FUNCTION copy_parted()",
        "CREATE TRIGGER parted_2_keep BEFORE UPDATE ON parted_2 "
        "FOR EACH ROW EXECUTE FUNCTION copy_parted()",
        "CREATE PUBLICATION parted_2_cdc FOR TABLE parted_2",
        "ALTER TABLE parted_1 REPLICA IDENTITY FULL",
    )
    found = copy_risks(engine, settings(table="public.parted"))
    assert [(r.kind, r.name, r.when) for r in found] == [
        ("trigger", "parted_copy", "AFTER"),
        ("trigger", "parted_2_keep", "BEFORE"),
        ("publication", "parted_2_cdc", None),
        ("replica_identity", "replica_identity", None),
    ]
    assert "parted_2" in found[1].detail and "parted_1" in found[3].detail


def test_stale_acknowledgement_is_a_warn(engine: Engine) -> None:
    """A name in [acknowledged] that matches no copy risk is a warn naming it."""
    s = acknowledging({"dispatches_old_trigger": "dropped last year"})
    assert risks.stale_acknowledgements(s, copy_risks(engine, s)) == ["dispatches_old_trigger"]
    [stale] = about(check(engine, s), "dispatches_old_trigger")
    assert stale.level == "warn" and stale.check == "acknowledged"
    execute(engine, HISTORY_TABLE, COPY_OLD)
    s = acknowledging({HISTORY_TRIGGER: REVIEWED})
    assert risks.stale_acknowledgements(s, copy_risks(engine, s)) == []
    assert [f for f in check(engine, s) if f.check == "acknowledged"] == []


# --- unclassified columns -------------------------------------------------------------------


def test_unclassified_columns_warn_until_kept(engine: Engine) -> None:
    """Columns the application added are named as unclassified until clean.keep has them."""
    [ok] = [f for f in check(engine) if f.check == "column classification"]
    assert ok.level == "ok"
    execute(
        engine,
        "ALTER TABLE dispatches ADD COLUMN recipient_name text, ADD COLUMN provider_error text",
    )
    [warned] = [f for f in check(engine) if f.check == "column classification"]
    assert warned.level == "warn"
    assert "recipient_name, provider_error" in warned.message and "clean.keep" in warned.message
    kept = settings(
        clean='keep = { member_id = "statistics", recipient_name = "reviewed: display only", '
        'provider_error = "reviewed: no personal data" }'
    )
    [ok] = [f for f in check(engine, kept) if f.check == "column classification"]
    assert ok.level == "ok"


def test_missing_column_is_an_error_and_privileges_still_checked(engine: Engine) -> None:
    """A seed column the table lacks is an error, and the other checks still run."""
    execute(engine, "ALTER TABLE dispatches DROP COLUMN email")
    found = check(
        engine,
        settings(
            clean='columns = ["content", "msisdn", "app_token"]\n'
            'keep = { email = "gone", member_id = "stats" }'
        ),
    )
    [columns] = [f for f in found if f.check == "columns"]
    assert columns.level == "error" and "email" in columns.message
    assert any(f.check == "privileges" for f in found)


# --- end to end through the console script --------------------------------------------------


def test_strict_fails_on_unacknowledged_risk_and_unclassified_column(
    engine: Engine, database_url: URL, run_role: tuple[str, str], tmp_path: Path
) -> None:
    """db check --strict exits 1 naming an unacknowledged trigger or an unclassified column,
    and 0 under the run role once both are settled (on a database set up as docs/deploy.md
    says: TEMPORARY revoked from PUBLIC, else that warn fails --strict; test_temp_grant.py)."""
    seed_series(engine, range(1, 6))
    execute(engine, HISTORY_TABLE, COPY_OLD)
    execute(engine, f'REVOKE TEMPORARY ON DATABASE "{database_url.database}" FROM PUBLIC')
    url = run_role[1]
    plain = write_config(tmp_path / "plain.toml", config_text())
    job = run_script(url, plain, "db", "check", "--strict")
    assert job.returncode == 1, job.stdout + job.stderr
    assert HISTORY_TRIGGER in job.stdout
    reviewed = write_config(tmp_path / "ack.toml", with_acknowledged({HISTORY_TRIGGER: REVIEWED}))
    job = run_script(url, reviewed, "db", "check", "--strict")
    assert job.returncode == 0, job.stdout + job.stderr
    assert REVIEWED in job.stdout
    execute(engine, "ALTER TABLE dispatches ADD COLUMN recipient_name text")
    job = run_script(url, reviewed, "db", "check", "--strict")
    assert job.returncode == 1, job.stdout + job.stderr
    assert "recipient_name" in job.stdout
    job = run_script(url, reviewed, "db", "check")
    assert job.returncode == 0, job.stdout + job.stderr


def test_db_check_refuses_a_view(engine: Engine, url_string: str, tmp_path: Path) -> None:
    """db check exits 2 naming the view when the target is a view."""
    execute(
        engine,
        "CREATE VIEW dispatches_live AS SELECT * FROM dispatches WHERE cleaned_at IS NULL",
    )
    cfg = write_config(tmp_path / "v.toml", config_text(table="dispatches_live"))
    job = run_script(url_string, cfg, "db", "check")
    assert job.returncode == 2, job.stdout + job.stderr
    assert "view" in job.stderr and "dispatches_live" in job.stderr


def test_db_check_refuses_rls_for_a_non_owner(
    engine: Engine, run_role: tuple[str, str], tmp_path: Path
) -> None:
    """db check exits 2 naming row-level security when RLS applies to the job's role."""
    execute(
        engine,
        "ALTER TABLE dispatches ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY sms_only ON dispatches USING (type = 'sms')",
    )
    cfg = write_config(tmp_path / "r.toml", config_text())
    job = run_script(run_role[1], cfg, "db", "check")
    assert job.returncode == 2, job.stdout + job.stderr
    assert "row-level security" in job.stderr and "BYPASSRLS" in job.stderr


def test_risk_output_holds_no_personal_data(
    engine: Engine, url_string: str, tmp_path: Path
) -> None:
    """Copy risks, their JSON form and db check's output never show a row's personal data."""
    seed_series(engine, range(1, 6))
    execute(
        engine,
        HISTORY_TABLE,
        COPY_OLD,
        KEEP_TOKEN,
        COPY_RULE,
        "CREATE PUBLICATION dispatches_cdc FOR TABLE dispatches",
        "ALTER TABLE dispatches REPLICA IDENTITY FULL",
        "ALTER TABLE dispatches ADD COLUMN recipient_name text",
        "UPDATE dispatches SET recipient_name = msisdn",
    )
    found = copy_risks(engine)
    assert len(found) == 5
    assert_no_marker(*(str(r.as_dict()) for r in found))
    cfg = write_config(tmp_path / "p.toml", config_text())
    job = run_script(url_string, cfg, "db", "check", "--strict")
    assert job.returncode == 1
    assert HISTORY_TRIGGER in job.stdout and "recipient_name" in job.stdout
    assert_no_marker(job.stdout, job.stderr)


def test_inheritance_children_triggers_and_replica_identity_are_listed(engine: Engine) -> None:
    """A child table (INHERITS dispatches) is updated with its parent: its row triggers
    and its REPLICA IDENTITY FULL are copy risks of the target too."""
    execute(
        engine,
        "CREATE TABLE dispatches_2023 () INHERITS (dispatches)",
        "CREATE TABLE hist (id bigint, email text)",
        "CREATE FUNCTION hist() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN INSERT INTO hist VALUES (OLD.id, OLD.email); RETURN NEW; END $$",
        "CREATE TRIGGER child_hist AFTER UPDATE ON dispatches_2023 "
        "FOR EACH ROW EXECUTE FUNCTION hist()",
        "ALTER TABLE dispatches_2023 REPLICA IDENTITY FULL",
    )
    found = {(r.kind, r.name): r for r in copy_risks(engine)}
    assert ("trigger", "child_hist") in found
    assert "dispatches_2023" in found[("trigger", "child_hist")].detail
    assert "dispatches_2023" in found[("replica_identity", "replica_identity")].detail


def test_a_name_on_the_search_path_twice_is_a_warn(engine: Engine) -> None:
    """An unqualified target.table that another schema on the search_path also holds is a
    warn (a role with another search_path would clean or verify the other table); the
    resolved table is named."""
    execute(
        engine,
        "CREATE SCHEMA reporting",
        "CREATE TABLE reporting.dispatches (LIKE public.dispatches INCLUDING ALL)",
    )
    findings = [f for f in check(engine) if f.check == "target"]
    assert [f.level for f in findings] == ["ok"]
    assert "public.dispatches" in findings[0].message
    with engine.begin() as conn:
        name = engine.url.database
        conn.execute(text(f'ALTER DATABASE "{name}" SET search_path = public, reporting'))
    engine.dispose()  # new sessions take the database's search_path
    findings = [f for f in check(engine) if f.check == "target"]
    assert [f.level for f in findings] == ["warn"]
    assert "reporting.dispatches" in findings[0].message
