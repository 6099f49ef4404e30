"""README "Configuration": every invalid file is refused with the file, the key and the
reason."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from dispatch_retention import config
from dispatch_retention.cli.main import cli
from dispatch_retention.pg import diagnosis
from tests.helpers import DEFAULT_POLICIES, config_text

ONE_POLICY = '[[policy]]\nname = "p"\nretention_days = 30\n'

BAD = [
    pytest.param(
        "[target]\ntable = 'x'\nfoo = 1\n" + ONE_POLICY,
        "target.foo",
        "unknown key",
        id="unknown-key",
    ),
    pytest.param(
        "[clean]\nchunk_size = 'big'\n" + ONE_POLICY,
        "clean.chunk_size",
        "valid integer",
        id="wrong-type",
    ),
    pytest.param(
        "[clean]\nchunk_size = 0\n" + ONE_POLICY,
        "clean.chunk_size",
        "greater than or equal to 1",
        id="zero-chunk",
    ),
    pytest.param(
        "[clean]\nchunk_size = true\n" + ONE_POLICY,
        "clean.chunk_size",
        "valid integer",
        id="bool-as-int",
    ),
    pytest.param(
        "[clean]\ncolumns = ['content', 'msisdn', 'email', 'app_token', 'shoe size']\n"
        + ONE_POLICY,
        "clean.columns",
        "'shoe size' is not a plain SQL column name",
        id="not-a-column-name",
    ),
    pytest.param(
        "[clean]\ncolumns = ['id']\n" + ONE_POLICY,
        "clean.columns",
        "'id' cannot be stripped",
        id="kept-column",
    ),
    pytest.param(
        "[clean]\ncolumns = []\n" + ONE_POLICY,
        "clean.columns",
        "at least one column",
        id="no-columns",
    ),
    pytest.param(
        "[clean]\nage_from = 'cleaned_at'\n" + ONE_POLICY,
        "clean.age_from",
        "Input should be 'created_at'",
        id="bad-age-from",
    ),
    pytest.param(
        "[clean]\nreplace = { msisdn = 5 }\n" + ONE_POLICY,
        "clean.replace.msisdn",
        "wrong type for that column",
        id="replace-wrong-type",
    ),
    pytest.param(
        "[clean]\ncolumns = ['msisdn', 'email', 'app_token']\nkeep = { content = 'why' }\n"
        "replace = { content = {} }\n" + ONE_POLICY,
        "clean.replace.content",
        "'content' is not in clean.columns",
        id="replace-not-cleaned",
    ),
    pytest.param(
        "[clean]\ncolumns = ['member_id']\nreplace = {}\n" + ONE_POLICY,
        "clean.columns",
        "content is personal data",
        id="personal-columns-neither-stripped-nor-kept",
    ),
    pytest.param(
        "[clean]\ncolumns = ['content', 'msisdn', 'email']\n" + ONE_POLICY,
        "clean.columns",
        "app_token is personal data",
        id="app-token-unclassified",
    ),
    pytest.param(
        "[clean]\ncolumns = ['content', 'msisdn', 'email', 'app_token']\n"
        "keep = { msisdn = 'x' }\n" + ONE_POLICY,
        "clean.keep.msisdn",
        "also listed in clean.columns",
        id="kept-and-stripped",
    ),
    pytest.param(
        "[clean]\nkeep = { member_id = '   ' }\n" + ONE_POLICY,
        "clean.keep.member_id",
        "at least 1 character",
        id="keep-without-reason",
    ),
    pytest.param(
        "[clean]\nkeep = { 'Recipient Name' = 'x' }\n" + ONE_POLICY,
        "clean.keep",
        "'Recipient Name' is not a plain SQL column name",
        id="keep-not-a-column-name",
    ),
    pytest.param(
        "[acknowledged]\nhist = ''\n" + ONE_POLICY,
        "acknowledged.hist",
        "at least 1 character",
        id="ack-no-reason",
    ),
    pytest.param(
        "[target]\ntable = 'Dispatches'\n" + ONE_POLICY,
        "target.table",
        "a plain SQL name",
        id="upper-case",
    ),
    pytest.param(
        "[target]\ntable = 'dispatches; DROP TABLE x'\n" + ONE_POLICY,
        "target.table",
        "a plain SQL name",
        id="injection",
    ),
    pytest.param(
        "[target]\ntable = 'a.b.c'\n" + ONE_POLICY,
        "target.table",
        "NAME or SCHEMA.NAME",
        id="three-parts",
    ),
    pytest.param(
        "[audit]\nschema = '1abc'\n" + ONE_POLICY,
        "audit.schema",
        "a plain SQL name",
        id="bad-audit-schema",
    ),
    pytest.param(
        "[audit]\nschema = 'information_schema'\n" + ONE_POLICY,
        "audit.schema",
        "information_schema is a system schema",
        id="audit-schema-information-schema",
    ),
    pytest.param(
        "[audit]\nschema = 'pg_catalog'\n" + ONE_POLICY,
        "audit.schema",
        "pg_catalog is a system schema",
        id="audit-schema-pg-catalog",
    ),
    pytest.param(
        "[audit]\nschema = 'pg_toast'\n" + ONE_POLICY,
        "audit.schema",
        "pg_toast is a system schema",
        id="audit-schema-pg-toast",
    ),
    pytest.param(
        ONE_POLICY + "where = { type = 'fax' }\n",
        "policy[0].where.type",
        "unknown value 'fax'",
        id="unknown-type",
    ),
    pytest.param(
        ONE_POLICY + "where = { delivery_status = ['delivered', 'lost'] }\n",
        "policy[0].where.delivery_status",
        "unknown value 'lost'",
        id="unknown-status",
    ),
    pytest.param(
        ONE_POLICY + "where = { colour = 'red' }\n",
        "policy[0].where",
        "unknown key 'colour'",
        id="unknown-match",
    ),
    pytest.param(
        '[[policy]]\nname = "p"\nretention_days = 3\n',
        "policy[0].retention_days",
        "3 is under guard.min_retention_days (7)",
        id="under-floor",
    ),
    pytest.param(
        "[guard]\nmin_retention_days = 60\n" + ONE_POLICY,
        "policy[0].retention_days",
        "30 is under guard.min_retention_days (60)",
        id="under-raised-floor",
    ),
    pytest.param(
        '[[policy]]\nname = "p"\nretention_days = -1\n',
        "policy[0].retention_days",
        "greater than or equal to 1",
        id="negative-retention",
    ),
    pytest.param(
        '[[policy]]\nname = "p"\nretention_days = 99999999999\n',
        "policy[0].retention_days",
        "less than or equal to 36500",
        id="huge-retention",
    ),
    pytest.param(
        "[[policy]]\nretention_days = 30\n",
        "policy[0].name",
        "required key is missing",
        id="no-name",
    ),
    pytest.param(
        ONE_POLICY + ONE_POLICY, "policy[1].name", "'p' is used twice", id="duplicate-name"
    ),
    pytest.param(
        "".join(f'[[policy]]\nname = "p{i}"\nretention_days = {30 + i}\n' for i in range(101)),
        "policy",
        "101 policies; at most 100",
        id="too-many-policies",
    ),
    pytest.param("[clean]\nchunk_size = 10\n", "policy", "required key is missing", id="no-policy"),
    pytest.param("", "policy", "required key is missing", id="empty-file"),
    pytest.param("[clean\n", "", "not valid TOML: Expected ']'", id="not-toml"),
    pytest.param(
        "[clean]\nchunk_size = 1\nchunk_size = 2\n" + ONE_POLICY,
        "",
        "not valid TOML: Cannot overwrite a value",
        id="duplicate-key",
    ),
]


@pytest.mark.parametrize(("text", "key", "says"), BAD)
def test_invalid_config_names_file_and_key(text: str, key: str, says: str) -> None:
    """Each invalid case raises ConfigError carrying the file name, the offending key (none
    for a file that is not TOML) and the case's own reason."""
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "bad.toml")
    assert info.value.path == "bad.toml"
    assert info.value.key == key
    assert str(info.value).startswith(f"bad.toml: {key}: " if key else "bad.toml: ")
    assert says in str(info.value)


def test_a_column_of_the_applications_own_is_left_to_the_table() -> None:
    """A plain column name the seed model lacks passes the config (an application's own
    personal column); the job refuses it when it connects and the table lacks it
    (test_table_fit, test_errors: "which the table does not have")."""
    text = "[clean]\ncolumns = ['content', 'msisdn', 'email', 'app_token', 'shoe_size']\n"
    settings = config.parse(text + ONE_POLICY, "ok.toml")
    assert settings.clean.columns == ("content", "msisdn", "email", "app_token", "shoe_size")


@pytest.mark.parametrize(("text", "key", "says"), BAD)
def test_cli_refuses_invalid_config_before_connecting(
    tmp_path: Path, text: str, key: str, says: str
) -> None:
    """The CLI exits 2 naming file, key and reason, without any connection (the URL is
    unreachable)."""
    path = tmp_path / "retention.toml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(
        cli,
        ["--config", str(path), "--database-url", "postgresql://nobody@127.0.0.1:1/none", "run"],
    )
    assert result.exit_code == 2, result.output
    assert str(path) in result.output
    assert key in result.output and says in result.output
    assert "Traceback" not in result.output


def test_missing_file_exits_2(tmp_path: Path) -> None:
    """A config path that does not exist is a usage error naming the path."""
    missing = tmp_path / "nope.toml"
    result = CliRunner().invoke(cli, ["--config", str(missing), "run", "--dry-run"])
    assert result.exit_code == 2
    assert str(missing) in result.output


def test_shipped_example_is_valid() -> None:
    """config/retention.toml parses and carries the example policies docs/auditor.md shows."""
    settings = config.load(Path(__file__).parents[2] / "config" / "retention.toml")
    assert [p.name for p in settings.policies] == ["failed-sends", "sms", "default"]
    assert settings.clean.columns == ("content", "msisdn", "email", "app_token")
    assert settings.clean.replace == {"content": {}}


def test_defaults_and_lists() -> None:
    """A value or a list of values both match; defaults fill what the file leaves out."""
    settings = config.parse(
        config_text(
            policies=DEFAULT_POLICIES
            + "[[policy]]\nname='x'\nretention_days=40\nwhere={type=['sms','push']}\n"
        )
    )
    assert settings.policies[-1].where == {"type": ("sms", "push")}
    assert settings.policies[0].where == {"transmission_status": ("failed",)}
    assert settings.clean.chunk_size == 5000
    assert settings.audit.schema_ == "dispatch_retention"


def test_every_column_is_cleaned_or_kept_with_a_reason() -> None:
    """The registry covers every column of the dispatches table, each exactly once."""
    from dispatch_retention.rule.dispatch_table import dispatches_table

    columns = {c.name for c in dispatches_table(config.Target()).columns}
    registered = set(config.PERSONAL_COLUMNS) | set(config.KEPT_COLUMNS)
    assert columns == registered
    assert not set(config.PERSONAL_COLUMNS) & set(config.KEPT_COLUMNS)
    assert all(reason for reason in config.KEPT_COLUMNS.values())


def test_content_kept_gets_no_default_replacement() -> None:
    """`columns` without content (content kept with a reason) and no `replace` line: valid,
    and no replacement for a column that is not stripped (it used to fail on
    `clean.replace.content`, a key the user never wrote)."""
    s = config.parse(
        '[clean]\ncolumns = ["msisdn", "email", "app_token"]\n'
        'keep = { content = "templates only, reviewed", member_id = "statistics" }\n' + ONE_POLICY,
        "keep-content.toml",
    )
    assert s.clean.replace == {}
    assert config.parse(ONE_POLICY, "default.toml").clean.replace == {"content": {}}


def test_a_hundred_policies_are_fine() -> None:
    text = "".join(f'[[policy]]\nname = "p{i}"\nretention_days = {30 + i}\n' for i in range(100))
    assert len(config.parse(text, "many.toml").policies) == config.MAX_POLICIES


def test_a_statement_libpq_would_not_send_is_not_retried() -> None:
    """Too many parameters: libpq refuses before anything reaches the server (no SQLSTATE,
    an OperationalError like a dropped connection's), and the same statement would be
    refused again: not a retry (it was retried as a lost connection, 2 minutes long)."""
    not_sent = psycopg.OperationalError(
        "sending query and params failed: number of parameters must be between 0 and 65535"
    )
    assert not diagnosis.is_transient(not_sent)
    assert diagnosis.is_transient(
        psycopg.OperationalError("server closed the connection unexpectedly")
    )
