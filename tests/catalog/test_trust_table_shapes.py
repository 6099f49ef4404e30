"""Table shapes the job cannot clean truthfully (README "Real tables"): refused on
connecting (exit 2 naming the child table, column, key or rule and the fix) by `run`,
`run --dry-run` and `verify`, listed by `db check` as an error (exit 1), never a run that
fails every night with an opaque error or succeeds while a column escapes it; and their
neighbours that keep working. The roles are made as `db grants` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention import config
from dispatch_retention.catalog import risks
from dispatch_retention.config import Settings
from tests.helpers import (
    MARK,
    assert_no_marker,
    config_text,
    granted_role,
    invoke,
    run_script,
    seed_series,
    snapshot,
    write_config,
)

DUE = range(1, 9)
PERSONAL = '"content", "msisdn", "email", "app_token"'


@dataclass(frozen=True)
class Shaped:
    """A table shape made from the seeded dispatches table: the statements that make it
    (run by the table's owner), the config's `[clean]` lines and `[acknowledged]` table,
    the `db check` check that fails, and what the refusal says."""

    ddl: tuple[str, ...]
    check: str
    says: tuple[str, ...]
    clean: str = ""
    acknowledged: dict[str, str] = field(default_factory=dict)

    def config(self) -> str:
        lines = "".join(f'{name} = "{why}"\n' for name, why in self.acknowledged.items())
        return config_text(self.clean) + (f"\n[acknowledged]\n{lines}" if lines else "")

    def settings(self) -> Settings:
        return config.parse(self.config(), "shape.toml")


def execute(engine: Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


HISTORY = "CREATE TABLE dispatches_history (dispatch_id bigint, msisdn text)"
CHILD = "CREATE TABLE archive (recipient_name text) INHERITS (dispatches)"

# --- item 6: an inheritance child's own columns ----------------------------------------------

CHILDREN = [
    pytest.param(
        Shaped((CHILD,), "column classification", ("archive", "recipient_name", "clean.keep")),
        id="child-own-column",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE TABLE archive () INHERITS (dispatches)",
                "CREATE TABLE archive_2020 (recipient_name text, note text) INHERITS (archive)",
            ),
            "column classification",
            ("archive_2020", "recipient_name, note"),
        ),
        id="grandchild-own-columns",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE TABLE archive () INHERITS (dispatches)",
                "ALTER TABLE archive ADD COLUMN recipient_phone text",
            ),
            "column classification",
            ("archive", "recipient_phone"),
        ),
        id="child-column-added-later",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE SCHEMA cold",
                "CREATE TABLE cold.archive (recipient_name text) INHERITS (dispatches)",
            ),
            "column classification",
            ("cold.archive", "recipient_name"),
        ),
        id="child-in-a-schema-the-role-cannot-use",
    ),
    pytest.param(
        Shaped(
            (
                CHILD,
                "CREATE TABLE archive_2020 () INHERITS (archive)",
            ),
            "column classification",
            ("archive", "recipient_name"),
            clean='keep = { member_id = "pseudonymous" }',
        ),
        id="child-column-unclassified-by-a-keep",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE TABLE archive () INHERITS (dispatches)",
                "ALTER TABLE archive ALTER COLUMN msisdn SET NOT NULL",
            ),
            "columns",
            ("archive", "msisdn", "NOT NULL"),
        ),
        id="child-not-null-on-a-personal-column",
    ),
]

# --- item 10: columns cleaning cannot set, keys the windows cannot walk -----------------------

COLUMNS = [
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches ADD COLUMN email_domain text "
                "GENERATED ALWAYS AS (split_part(email, '@', 2)) STORED",
            ),
            "columns",
            ("email_domain", "generated"),
            clean=f'columns = [{PERSONAL}, "email_domain"]',
        ),
        id="generated-column",
    ),
    pytest.param(
        Shaped(
            ("ALTER TABLE dispatches ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY",),
            "columns",
            ("seq", "GENERATED ALWAYS"),
            clean=f'columns = [{PERSONAL}, "seq"]\nreplace = {{ content = {{}}, seq = 0 }}',
        ),
        id="identity-always-column",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE DOMAIN phone AS character varying NOT NULL",
                "ALTER TABLE dispatches ALTER COLUMN msisdn TYPE phone",
            ),
            "columns",
            ("msisdn", "phone", "NULL"),
        ),
        id="not-null-domain",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE DOMAIN mail AS character varying CHECK (VALUE IS NOT NULL)",
                "ALTER TABLE dispatches ALTER COLUMN email TYPE mail",
            ),
            "columns",
            ("email", "mail", "NULL"),
        ),
        id="check-domain-refusing-null",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE SCHEMA app_types",
                "CREATE DOMAIN app_types.token AS text NOT NULL",
                "CREATE DOMAIN app_types.push_token AS app_types.token CHECK (VALUE <> '')",
                "ALTER TABLE dispatches ALTER COLUMN app_token TYPE app_types.push_token",
            ),
            "columns",
            ("app_token", "push_token", "NULL"),
        ),
        id="domain-over-a-not-null-domain-in-a-schema-the-role-cannot-use",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE DOMAIN token AS text CHECK (VALUE LIKE 'PIIMARK%')",
                "ALTER TABLE dispatches ALTER COLUMN app_token TYPE token",
            ),
            "columns",
            ("clean.replace.app_token", "token"),
            clean='replace = { content = {}, app_token = "redacted" }',
        ),
        id="replacement-the-domain-refuses",
    ),
]

UNIQUE = [
    pytest.param(
        Shaped(
            ("CREATE UNIQUE INDEX dispatches_email_key ON dispatches (email)",),
            "columns",
            ("dispatches_email_key", "email", "clean.replace"),
            clean='replace = { content = {}, email = "" }',
        ),
        id="unique-index-on-a-replaced-column",
    ),
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches ADD CONSTRAINT one_token_per_msisdn "
                "UNIQUE (msisdn, app_token)",
            ),
            "columns",
            ("one_token_per_msisdn", "msisdn, app_token"),
            clean='replace = { content = {}, msisdn = "-", app_token = "-" }',
        ),
        id="unique-constraint-over-two-replaced-columns",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE TABLE archive () INHERITS (dispatches)",
                "CREATE UNIQUE INDEX archive_email_key ON archive (email)",
            ),
            "columns",
            ("archive_email_key", "archive"),
            clean='replace = { content = {}, email = "" }',
        ),
        id="a-childs-unique-index-on-a-replaced-column",
    ),
]

KEYS = [
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches ALTER COLUMN id DROP DEFAULT",
                "ALTER TABLE dispatches ALTER COLUMN id TYPE uuid "
                "USING CAST(lpad(to_hex(id), 32, '0') AS uuid)",
            ),
            "key",
            ("id", "uuid"),
        ),
        id="uuid-primary-key",
    ),
    pytest.param(
        Shaped(
            ("ALTER TABLE dispatches ALTER COLUMN id TYPE text",),
            "key",
            ("id", "text"),
        ),
        id="bigint-in-text-primary-key",
    ),
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches DROP CONSTRAINT dispatches_pkey",
                "ALTER TABLE dispatches ALTER COLUMN id TYPE numeric",
            ),
            "key",
            ("id", "numeric"),
        ),
        id="numeric-id-without-primary-key",
    ),
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches DROP CONSTRAINT dispatches_pkey",
                "ALTER TABLE dispatches ALTER COLUMN id DROP NOT NULL",
            ),
            "key",
            ("id", "NULL"),
        ),
        id="nullable-id-without-primary-key",
    ),
]

# --- item 11: rules on UPDATE ----------------------------------------------------------------

RULES = [
    pytest.param(
        Shaped(
            (
                HISTORY,
                "CREATE RULE keep_history AS ON UPDATE TO dispatches DO ALSO "
                "INSERT INTO dispatches_history VALUES (OLD.id, OLD.msisdn)",
            ),
            "rule",
            ("keep_history", "DO ALSO"),
        ),
        id="do-also",
    ),
    pytest.param(
        Shaped(
            (
                HISTORY,
                "CREATE RULE keep_history AS ON UPDATE TO dispatches DO ALSO "
                "INSERT INTO dispatches_history VALUES (OLD.id, OLD.msisdn)",
            ),
            "rule",
            ("keep_history", "DO ALSO"),
            acknowledged={"keep_history": "history purged nightly"},
        ),
        id="do-also-acknowledged",
    ),
    pytest.param(
        Shaped(
            ("CREATE RULE frozen AS ON UPDATE TO dispatches DO INSTEAD NOTHING",),
            "rule",
            ("frozen", "DO INSTEAD"),
        ),
        id="do-instead-nothing",
    ),
    pytest.param(
        Shaped(
            (
                HISTORY,
                "CREATE RULE sms_only AS ON UPDATE TO dispatches WHERE OLD.type = 'sms' "
                "DO INSTEAD INSERT INTO dispatches_history VALUES (OLD.id, OLD.msisdn)",
            ),
            "rule",
            ("sms_only", "DO INSTEAD"),
        ),
        id="conditional-do-instead",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE TABLE dispatches_shadow (LIKE dispatches)",
                "CREATE RULE redirect AS ON UPDATE TO dispatches DO INSTEAD "
                "UPDATE dispatches_shadow SET msisdn = NEW.msisdn WHERE id = OLD.id "
                "RETURNING dispatches_shadow.*",
            ),
            "rule",
            ("redirect", "DO INSTEAD"),
        ),
        id="do-instead-with-returning",
    ),
]


def refused_everywhere(engine: Engine, database_url: URL, tmp_path: Path, shape: Shaped) -> None:
    """The shape made on a table holding due rows: `run` (the console script), `run
    --dry-run` and `verify` exit 2 naming what `shape.says`, with no traceback and no row
    touched; `db check` lists it as an error of `shape.check` and exits 1. All as the role
    `db grants --purpose run` makes."""
    seed_series(engine, DUE)
    execute(engine, *shape.ddl)
    path = write_config(tmp_path / "shape.toml", shape.config())
    with granted_role(engine, database_url, "run", shape.settings()) as (_, url):
        run = run_script(url, path, "run", "--yes")
        assert run.returncode == 2, run.stdout + run.stderr
        assert "Traceback" not in run.stderr
        assert all(part in run.stderr for part in shape.says), run.stderr
        assert_no_marker(run.stdout, run.stderr)
        base = ["--config", str(path), "--database-url", url]
        for command in (["run", "--dry-run"], ["verify"]):
            result = invoke(*base, *command)
            assert result.exit_code == 2, (command, result.stdout, result.stderr)
            assert all(part in result.stderr for part in shape.says), result.stderr
        checked = invoke(*base, "db", "check")
        assert checked.exit_code == 1, checked.stdout + checked.stderr
        listed = [
            line
            for line in checked.stdout.splitlines()
            if line.startswith(f"[error] {shape.check}: ") and all(p in line for p in shape.says)
        ]
        assert len(listed) == 1, checked.stdout
    assert all(row["cleaned_at"] is None for row in snapshot(engine).values())


@pytest.mark.parametrize("shape", CHILDREN)
def test_an_inheritance_childs_own_columns_are_classified_or_refused(
    engine: Engine, database_url: URL, tmp_path: Path, shape: Shaped
) -> None:
    """A table inheriting from dispatches with columns of its own (a grandchild, one added
    later, one in another schema) is refused naming it and them: the cleaning UPDATE of the
    parent cannot strip them and nothing checks them; so is a child whose NOT NULL refuses
    what cleaning writes."""
    refused_everywhere(engine, database_url, tmp_path, shape)


@pytest.mark.parametrize("shape", COLUMNS)
def test_a_column_cleaning_cannot_set_is_refused(
    engine: Engine, database_url: URL, tmp_path: Path, shape: Shaped
) -> None:
    """A generated or GENERATED ALWAYS identity column in clean.columns, a domain that
    refuses NULL (NOT NULL, a CHECK, through another domain, in a schema the role cannot
    use) or the clean.replace value: refused on connecting, not a run failing every night."""
    refused_everywhere(engine, database_url, tmp_path, shape)


@pytest.mark.parametrize("shape", UNIQUE)
def test_a_unique_index_over_replaced_columns_is_refused(
    engine: Engine, database_url: URL, tmp_path: Path, shape: Shaped
) -> None:
    """A UNIQUE index (or constraint) every column of which cleaning sets to one
    `clean.replace` value: the second row cleaned would violate it, so every run would fail;
    refused naming the index."""
    refused_everywhere(engine, database_url, tmp_path, shape)


@pytest.mark.parametrize("shape", KEYS)
def test_an_id_the_windows_cannot_walk_is_refused(
    engine: Engine, database_url: URL, tmp_path: Path, shape: Shaped
) -> None:
    """The chunk windows walk integer ids: a uuid, text or numeric id, or one that may be
    NULL, is refused naming the key."""
    refused_everywhere(engine, database_url, tmp_path, shape)


@pytest.mark.parametrize("shape", RULES)
def test_a_rule_on_update_is_refused_acknowledged_or_not(
    engine: Engine, database_url: URL, tmp_path: Path, shape: Shaped
) -> None:
    """Any rule on UPDATE (DO ALSO, DO INSTEAD, NOTHING, conditional, with RETURNING) makes
    PostgreSQL refuse the job's cleaning statement: refused on connecting naming the rule,
    and a failing check of `db check` even when acknowledged."""
    refused_everywhere(engine, database_url, tmp_path, shape)


# --- neighbours that keep working ------------------------------------------------------------

WORKING = [
    pytest.param(
        ("CREATE TABLE archive () INHERITS (dispatches)",),
        "",
        id="child-without-columns-of-its-own",
    ),
    pytest.param(
        (CHILD, "CREATE TABLE archive_2020 () INHERITS (archive)"),
        'keep = { member_id = "pseudonymous", recipient_name = "a team name, not a person" }',
        id="child-columns-kept-with-a-reason",
    ),
    pytest.param(
        ("ALTER TABLE dispatches ADD COLUMN seq bigint GENERATED BY DEFAULT AS IDENTITY",),
        'keep = { member_id = "pseudonymous", seq = "a counter" }',
        id="identity-column-kept",
    ),
    pytest.param(
        (
            "ALTER TABLE dispatches DROP CONSTRAINT dispatches_pkey",
            "ALTER TABLE dispatches ADD PRIMARY KEY (id, created_at)",
        ),
        "",
        id="composite-primary-key",
    ),
    pytest.param(
        ("ALTER TABLE dispatches DROP CONSTRAINT dispatches_pkey",),
        "",
        id="no-primary-key-id-not-null",
    ),
    pytest.param(
        (
            "CREATE DOMAIN phone AS character varying CHECK (VALUE LIKE '+%')",
            "ALTER TABLE dispatches ALTER COLUMN msisdn TYPE phone",
            "CREATE DOMAIN token AS text NOT NULL CHECK (VALUE <> '')",
            "ALTER TABLE dispatches ALTER COLUMN app_token TYPE token",
        ),
        'replace = { content = {}, app_token = "tok_redacted" }',
        id="domains-that-take-what-cleaning-writes",
    ),
    pytest.param(
        (
            "CREATE UNIQUE INDEX dispatches_email_key ON dispatches (email)",
            "CREATE UNIQUE INDEX dispatches_token_key ON dispatches (app_token, id)",
            "CREATE UNIQUE INDEX dispatches_live_msisdn ON dispatches (msisdn) "
            "WHERE cleaned_at IS NULL",
        ),
        'replace = { content = {}, app_token = "-", msisdn = "-" }',
        id="unique-indexes-cleaning-keeps-unique",
    ),
    pytest.param(
        (
            HISTORY,
            "CREATE RULE keep_history AS ON UPDATE TO dispatches DO ALSO "
            "INSERT INTO dispatches_history VALUES (OLD.id, OLD.msisdn)",
            "ALTER TABLE dispatches DISABLE RULE keep_history",
            "CREATE RULE no_insert AS ON INSERT TO dispatches DO INSTEAD NOTHING",
            "CREATE RULE no_delete AS ON DELETE TO dispatches DO INSTEAD NOTHING",
        ),
        "",
        id="disabled-update-rule-and-insert-delete-rules",
    ),
]


@pytest.mark.parametrize(("ddl", "clean"), WORKING)
def test_neighbouring_shapes_are_cleaned(
    engine: Engine, database_url: URL, tmp_path: Path, ddl: tuple[str, ...], clean: str
) -> None:
    """What the refusals must not catch: a child without columns of its own or with its
    columns kept, an identity column kept, a composite or no primary key over an integer id,
    domains that accept NULL or the replacement, a disabled UPDATE rule and rules on INSERT
    and DELETE: `db check` has no error and the run role cleans every due row."""
    seed_series(engine, DUE)
    execute(engine, *ddl)
    s = config.parse(config_text(clean), "shape.toml")
    path = write_config(tmp_path / "shape.toml", config_text(clean))
    with granted_role(engine, database_url, "run", s) as (_, url):
        checked = invoke("--config", str(path), "--database-url", url, "db", "check")
        assert "[error]" not in checked.stdout, checked.stdout
        done = run_script(url, path, "run", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.last("run_finished")["rows_cleaned"] == len(DUE)
    for row in snapshot(engine).values():
        assert row["cleaned_at"] is not None
        assert all(MARK not in str(row[c]) for c in ("content", "msisdn", "email", "app_token"))


def test_a_rows_in_a_child_with_kept_columns_are_cleaned_through_the_parent(
    engine: Engine, database_url: URL, tmp_path: Path
) -> None:
    """A child whose own column is kept with a reason: its due rows are cleaned by the
    parent's UPDATE like the parent's own."""
    execute(engine, CHILD)
    execute(
        engine,
        "INSERT INTO archive (id, type, msisdn, email, transmission_status, delivery_status, "
        "created_at, recipient_name) VALUES (900, 'sms', 'PIIMARK-900', 'x@example.invalid', "
        "'transmitted', 'delivered', now() - interval '500 days', 'Team A')",
    )
    clean = 'keep = { member_id = "pseudonymous", recipient_name = "a team name" }'
    s = config.parse(config_text(clean), "shape.toml")
    path = write_config(tmp_path / "shape.toml", config_text(clean))
    with granted_role(engine, database_url, "run", s) as (_, url):
        done = run_script(url, path, "run", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
    with engine.connect() as conn:
        row = conn.execute(text("SELECT msisdn, cleaned_at FROM archive")).one()
    assert row.msisdn is None and row.cleaned_at is not None


# --- item 12: a replica identity that carries a personal column --------------------------------

REPLICA = [
    pytest.param(
        (
            "UPDATE dispatches SET email = 'x' || id WHERE email IS NULL",
            "ALTER TABLE dispatches ALTER COLUMN email SET NOT NULL",
            "CREATE UNIQUE INDEX dispatches_email_key ON dispatches (email, id)",
            "ALTER TABLE dispatches REPLICA IDENTITY USING INDEX dispatches_email_key",
        ),
        'replace = { content = {}, email = "" }',
        ("dispatches_email_key", "email"),
        id="using-an-index-on-email",
    ),
    pytest.param(
        (
            "ALTER TABLE dispatches ALTER COLUMN msisdn SET NOT NULL",
            "ALTER TABLE dispatches DROP CONSTRAINT dispatches_pkey",
            "ALTER TABLE dispatches ADD CONSTRAINT dispatches_pkey PRIMARY KEY (id, msisdn)",
        ),
        'replace = { content = {}, msisdn = "" }',
        ("dispatches_pkey", "msisdn"),
        id="default-over-a-primary-key-holding-msisdn",
    ),
    pytest.param(
        (
            "CREATE TABLE archive () INHERITS (dispatches)",
            "ALTER TABLE archive ALTER COLUMN email SET NOT NULL",
            "CREATE UNIQUE INDEX archive_email_key ON archive (email, id)",
            "ALTER TABLE archive REPLICA IDENTITY USING INDEX archive_email_key",
        ),
        'replace = { content = {}, email = "" }',
        ("archive", "archive_email_key", "email"),
        id="a-childs-index-on-email",
    ),
]


@pytest.mark.parametrize(("ddl", "clean", "says"), REPLICA)
def test_a_replica_identity_holding_a_personal_column_is_a_copy_risk(
    engine: Engine,
    database_url: URL,
    tmp_path: Path,
    ddl: tuple[str, ...],
    clean: str,
    says: tuple[str, ...],
) -> None:
    """A replica identity index (USING INDEX, or the primary key under DEFAULT) holding a
    column cleaning changes ships its old value to logical decoding: a copy risk named
    replica_identity, listed by `db check` (warn until acknowledged), logged and recorded
    by the run, which still cleans."""
    seed_series(engine, DUE)
    execute(engine, *ddl)
    s = config.parse(config_text(clean), "shape.toml")
    with engine.connect() as conn, conn.begin():
        found = [r for r in risks.copy_risks(conn, s) if r.kind == risks.REPLICA_IDENTITY]
    [risk] = found
    assert risk.name == risks.REPLICA_IDENTITY
    assert all(part in risk.detail for part in says), risk.detail
    path = write_config(tmp_path / "shape.toml", config_text(clean))
    with granted_role(engine, database_url, "run", s) as (_, url):
        checked = invoke("--config", str(path), "--database-url", url, "db", "check")
        [line] = [
            line for line in checked.stdout.splitlines() if line.startswith("[warn ] copy risk")
        ]
        assert all(part in line for part in says) and "replica_identity" in line, line
        done = run_script(url, path, "run", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        [logged] = [e for e in done.events("copy_risk") if e["kind"] == risks.REPLICA_IDENTITY]
        assert all(part in logged["detail"] for part in says)
    with engine.connect() as conn:
        recorded = conn.execute(
            text("SELECT copy_risks FROM dispatch_retention.runs WHERE status = 'succeeded'")
        ).scalar_one()
    assert [r["kind"] for r in recorded] == [risks.REPLICA_IDENTITY]


def test_a_replica_identity_without_a_personal_column_is_no_copy_risk(engine: Engine) -> None:
    """The default identity over `id`, or an index over kept columns only: cleaning changes
    no key, so the WAL carries no old value; nothing is listed."""
    execute(
        engine,
        "CREATE UNIQUE INDEX dispatches_id_created ON dispatches (id, created_at)",
        "ALTER TABLE dispatches REPLICA IDENTITY USING INDEX dispatches_id_created",
        "CREATE TABLE archive () INHERITS (dispatches)",
    )
    s = config.parse(config_text(), "shape.toml")
    with engine.connect() as conn, conn.begin():
        assert risks.copy_risks(conn, s) == []


# --- item 10, neighbours: constraints that refuse what cleaning writes ------------------------

#: The seeded dispatches table made partitioned by id, its rows moved into two partitions.
PARTITIONED_BY_ID = (
    "ALTER TABLE dispatches RENAME TO dispatches_plain",
    "CREATE TABLE dispatches (LIKE dispatches_plain INCLUDING DEFAULTS) PARTITION BY RANGE (id)",
    "ALTER SEQUENCE dispatches_id_seq OWNED BY dispatches.id",
    "ALTER TABLE dispatches ADD PRIMARY KEY (id)",
    "CREATE TABLE dispatches_low PARTITION OF dispatches FOR VALUES FROM (MINVALUE) TO (5)",
    "CREATE TABLE dispatches_high PARTITION OF dispatches FOR VALUES FROM (5) TO (MAXVALUE)",
    "INSERT INTO dispatches SELECT * FROM dispatches_plain",
    "DROP TABLE dispatches_plain",
)

CONSTRAINTS = [
    pytest.param(
        Shaped(
            ("ALTER TABLE dispatches ADD CONSTRAINT msisdn_required CHECK (msisdn IS NOT NULL)",),
            "columns",
            ("msisdn_required", "msisdn", "NULL"),
        ),
        id="check-not-null",
    ),
    pytest.param(
        Shaped(
            ("ALTER TABLE dispatches ADD CONSTRAINT email_given CHECK (email <> '')",),
            "columns",
            ("email_given", "clean.replace"),
            clean='replace = { content = {}, email = "" }',
        ),
        id="check-refusing-the-replacement",
    ),
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches ADD CONSTRAINT reachable "
                "CHECK (num_nonnulls(email, msisdn, app_token) > 0)",
            ),
            "columns",
            ("reachable", "NULL"),
        ),
        id="check-over-several-personal-columns",
    ),
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches ADD CONSTRAINT kept_until_cleaned "
                "CHECK (cleaned_at IS NULL OR content IS NOT NULL)",
            ),
            "columns",
            ("kept_until_cleaned", "content"),
            clean='replace = { app_token = "-" }',
        ),
        id="check-over-cleaned-at-and-a-personal-column",
    ),
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches ADD CONSTRAINT token_shape "
                "CHECK (app_token LIKE 'tok\\_%') NOT VALID",
            ),
            "columns",
            ("token_shape", "clean.replace"),
            clean='replace = { content = {}, app_token = "redacted" }',
        ),
        id="not-valid-check-refusing-the-replacement",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE TABLE archive () INHERITS (dispatches)",
                "ALTER TABLE archive ADD CONSTRAINT archive_msisdn CHECK (msisdn IS NOT NULL)",
            ),
            "columns",
            ("archive_msisdn", "archive"),
        ),
        id="check-on-an-inheritance-child",
    ),
    pytest.param(
        Shaped(
            (
                *PARTITIONED_BY_ID,
                "ALTER TABLE dispatches_low ADD CONSTRAINT low_email CHECK (email IS NOT NULL)",
            ),
            "columns",
            ("low_email", "dispatches_low"),
        ),
        id="check-on-a-partition",
    ),
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches ADD CONSTRAINT token_prefix "
                "CHECK (app_token::text <> 'urn:x' "
                "AND (app_token LIKE 'tok%' OR app_token LIKE 'PIIMARK%'))",
            ),
            "columns",
            ("token_prefix", "clean.replace.app_token"),
            clean='replace = { content = {}, app_token = "redacted:1" }',
        ),
        id="check-with-colons-and-percent-signs",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE FUNCTION reachable(v text) RETURNS boolean LANGUAGE plpgsql "
                "IMMUTABLE AS $$BEGIN IF v IS NULL THEN RAISE EXCEPTION 'no phone: %', v; "
                "END IF; RETURN true; END$$",
                "ALTER TABLE dispatches ADD CONSTRAINT phone_reachable CHECK (reachable(msisdn))",
            ),
            "columns",
            ("phone_reachable", "msisdn NULL"),
        ),
        id="check-calling-a-function-that-raises",
    ),
    pytest.param(
        Shaped(
            ("ALTER TABLE dispatches ALTER COLUMN msisdn SET NOT NULL",),
            "columns",
            ("msisdn", "NOT NULL"),
        ),
        id="not-null-on-the-target",
    ),
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches ADD CONSTRAINT one_per_email "
                "EXCLUDE USING btree (email WITH =)",
            ),
            "columns",
            ("one_per_email", "email", "clean.replace"),
            clean='replace = { content = {}, email = "" }',
        ),
        id="exclusion-over-a-replaced-column",
    ),
    pytest.param(
        Shaped(
            (
                "CREATE TABLE archive () INHERITS (dispatches)",
                "ALTER TABLE archive ADD CONSTRAINT one_per_token "
                "EXCLUDE USING hash (app_token WITH =)",
            ),
            "columns",
            ("one_per_token", "archive"),
            clean='replace = { content = {}, app_token = "-" }',
        ),
        id="a-childs-hash-exclusion-over-a-replaced-column",
    ),
]


@pytest.mark.parametrize("shape", CONSTRAINTS)
def test_a_constraint_refusing_what_cleaning_writes_is_refused(
    engine: Engine, database_url: URL, tmp_path: Path, shape: Shaped
) -> None:
    """A table CHECK (NOT VALID too: it applies to every write) over the columns cleaning
    writes that refuses NULL or the replacement, on the target, a child or a partition; a
    column NOT NULL on the target; an exclusion constraint that two cleaned rows violate:
    refused naming the constraint (or column), not a run failing every night."""
    refused_everywhere(engine, database_url, tmp_path, shape)


def server_version(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SHOW server_version_num")).scalar_one())


NULLS_NOT_DISTINCT = [
    pytest.param(
        Shaped(
            ("CREATE UNIQUE INDEX dispatches_email_key ON dispatches (email) NULLS NOT DISTINCT",),
            "columns",
            ("dispatches_email_key", "email", "NULLS NOT DISTINCT"),
        ),
        id="over-a-column-set-to-null",
    ),
    pytest.param(
        Shaped(
            (
                "ALTER TABLE dispatches ADD CONSTRAINT one_token_per_msisdn "
                "UNIQUE NULLS NOT DISTINCT (msisdn, app_token)",
            ),
            "columns",
            ("one_token_per_msisdn", "msisdn, app_token"),
            clean='replace = { content = {}, app_token = "-" }',
        ),
        id="constraint-over-a-null-and-a-replaced-column",
    ),
]


@pytest.mark.parametrize("shape", NULLS_NOT_DISTINCT)
def test_a_nulls_not_distinct_unique_index_over_cleaned_columns_is_refused(
    engine: Engine, database_url: URL, tmp_path: Path, shape: Shaped
) -> None:
    """UNIQUE NULLS NOT DISTINCT (PostgreSQL 15+) over columns cleaning sets to NULL (or to
    a replacement): every cleaned row holds the same key, so the second violates it."""
    if server_version(engine) < 150000:
        pytest.skip("UNIQUE NULLS NOT DISTINCT is PostgreSQL 15+")
    refused_everywhere(engine, database_url, tmp_path, shape)


UNDECIDED = [
    pytest.param(
        (
            "ALTER TABLE dispatches ADD CONSTRAINT sms_needs_msisdn "
            "CHECK (type <> 'sms' OR msisdn IS NOT NULL)",
        ),
        "",
        "sms_needs_msisdn",
        id="check-over-a-personal-and-a-kept-column",
    ),
    pytest.param(
        ("ALTER TABLE dispatches ADD CONSTRAINT members_negative CHECK (member_id < 0) NOT VALID",),
        "",
        "members_negative",
        id="not-valid-check-over-kept-columns",
    ),
    pytest.param(
        (
            "ALTER TABLE dispatches ADD CONSTRAINT one_email_per_type "
            "EXCLUDE USING btree (email WITH =, type WITH =)",
        ),
        'replace = { content = {}, email = "" }',
        "one_email_per_type",
        id="exclusion-over-a-replaced-and-a-kept-column",
    ),
    pytest.param(
        (
            "CREATE SCHEMA app_private",
            "CREATE FUNCTION app_private.given(v text) RETURNS boolean LANGUAGE sql "
            "IMMUTABLE AS 'SELECT v IS NOT NULL'",
            "ALTER TABLE dispatches ADD CONSTRAINT email_given CHECK (app_private.given(email))",
        ),
        "",
        "email_given",
        id="check-calling-a-function-in-a-schema-the-role-cannot-use",
    ),
]


@pytest.mark.parametrize(("ddl", "clean", "name"), UNDECIDED)
def test_a_constraint_only_the_rows_decide_is_warned_and_fails_the_run_by_name(
    engine: Engine, database_url: URL, tmp_path: Path, ddl: tuple[str, ...], clean: str, name: str
) -> None:
    """A CHECK whose outcome depends on columns cleaning keeps as well, a NOT VALID one
    (old rows were never checked), an exclusion over a kept column too: what the rows
    decide cannot be told on connecting. `db check` warns naming the constraint; the run
    that meets it fails (exit 1) naming it, without a traceback or the server's text, and
    the chunk's rows stay as they were."""
    seed_series(engine, DUE)
    execute(engine, *ddl)
    s = config.parse(config_text(clean), "shape.toml")
    path = write_config(tmp_path / "shape.toml", config_text(clean))
    with granted_role(engine, database_url, "run", s) as (_, url):
        checked = invoke("--config", str(path), "--database-url", url, "db", "check")
        assert checked.exit_code == 0, checked.stdout + checked.stderr
        [warned] = [
            line for line in checked.stdout.splitlines() if line.startswith("[warn ] columns: ")
        ]
        assert name in warned, checked.stdout
        run = run_script(url, path, "run", "--yes")
        assert run.returncode == 1, run.stdout + run.stderr
        assert "Traceback" not in run.stderr
        assert name in run.stderr, run.stderr
        assert "violates" not in run.stdout + run.stderr  # the server's own text
        assert_no_marker(run.stdout, run.stderr)
    assert all(row["cleaned_at"] is None for row in snapshot(engine).values())


CONSTRAINTS_THAT_TAKE_IT = [
    pytest.param(
        (
            "ALTER TABLE dispatches ADD CONSTRAINT email_short CHECK (char_length(email) < 300)",
            "ALTER TABLE dispatches ADD CONSTRAINT msisdn_shape "
            "CHECK (msisdn IS NULL OR msisdn LIKE '+%')",
            "ALTER TABLE dispatches ADD CONSTRAINT positive_id CHECK (id > 0)",
            "ALTER TABLE dispatches ADD CONSTRAINT updated_later CHECK (updated_at >= created_at)",
            "ALTER TABLE dispatches ADD CONSTRAINT no_mailto "
            "CHECK (email IS NULL OR email::text NOT LIKE 'mailto:%')",
            "ALTER TABLE dispatches ADD CONSTRAINT token_shape "
            "CHECK (app_token LIKE 'tok%' OR app_token LIKE 'PIIMARK%')",
        ),
        'replace = { content = {}, app_token = "tok_redacted" }',
        id="checks-that-take-null-and-the-replacement",
    ),
    pytest.param(
        ("ALTER TABLE dispatches ADD CONSTRAINT one_per_email EXCLUDE USING btree (email WITH =)",),
        "",
        id="exclusion-over-a-column-set-to-null",
    ),
    pytest.param(
        (
            *PARTITIONED_BY_ID,
            "ALTER TABLE dispatches_low ADD CONSTRAINT low_id CHECK (id < 5)",
        ),
        "",
        id="partition-check-over-the-id",
    ),
]


@pytest.mark.parametrize(("ddl", "clean"), CONSTRAINTS_THAT_TAKE_IT)
def test_constraints_that_take_what_cleaning_writes_are_cleaned(
    engine: Engine, database_url: URL, tmp_path: Path, ddl: tuple[str, ...], clean: str
) -> None:
    """CHECKs that take NULL and the replacement (or concern kept columns only, validated)
    and an exclusion over a column set to NULL (NULLs never conflict): neither an error nor
    a warning of `db check`, and the run cleans every due row."""
    seed_series(engine, DUE)
    execute(engine, *ddl)
    s = config.parse(config_text(clean), "shape.toml")
    path = write_config(tmp_path / "shape.toml", config_text(clean))
    with granted_role(engine, database_url, "run", s) as (_, url):
        checked = invoke("--config", str(path), "--database-url", url, "db", "check")
        assert not [
            line
            for line in checked.stdout.splitlines()
            if line.startswith(("[error]", "[warn ] columns"))
        ], checked.stdout
        done = run_script(url, path, "run", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.last("run_finished")["rows_cleaned"] == len(DUE)
    assert all(row["cleaned_at"] is not None for row in snapshot(engine).values())
