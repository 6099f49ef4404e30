"""TOML -> validated, immutable settings (README "Configuration").

This module is also the one registry of what is personal data: `PERSONAL_COLUMNS` lists the
columns of a dispatch that may be stripped, `KEPT_COLUMNS` every other column with the reason it
stays. Nothing else in the project names those columns. A config classifies every personal
column of the seed model (`SEED_PERSONAL`): stripped (`clean.columns`) or kept with a reason
(`clean.keep`, which keeps `member_id` by default); `Settings.unclassified()` names the
columns of a real table that are neither (docs/architecture.md "What the job refuses").

Every way a file can be wrong raises `ConfigError` naming the file, the key and the reason,
before any database connection exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from dispatch_retention.errors import ConfigError
from dispatch_retention.names import IDENTIFIER, MAX_IDENTIFIER, name_parts, quoted_name

if TYPE_CHECKING:
    from dispatch_retention.rule.shape import Shape

DEFAULT_CONFIG_PATH = Path("config/retention.toml")
CONFIG_ENV = "DISPATCH_RETENTION_CONFIG"

# --- the registry of personal data -----------------------------------------------------------

#: Columns that may be listed in `clean.columns`, with the JSON type a `clean.replace` value
#: for them must have.
PERSONAL_COLUMNS: Mapping[str, type | tuple[type, ...]] = {
    "content": (dict, list, str, int, float, bool),  # jsonb: any JSON value
    "msisdn": str,
    "email": str,
    "app_token": str,
    "member_id": int,  # pseudonymous personal data, kept by default for per-member statistics
}

#: Every other column of the dispatches table, and why it is never stripped.
KEPT_COLUMNS: Mapping[str, str] = {
    "id": "the primary key: the audit trail and the chunk windows refer to it",
    "type": "not personal data; policies match on it; delivery statistics",
    "transmission_status": "not personal data; decides whether a dispatch is settled",
    "delivery_status": "not personal data; decides whether a dispatch is settled",
    "external_delivery_status": "not personal data; policies match on it",
    "created_at": "timestamp: retention age and delivery statistics",
    "updated_at": "timestamp: stamped with the cleaning time",
    "scheduled_at": "timestamp: a dispatch scheduled in the future is never due",
    "transmitted_at": "timestamp: delivery statistics",
    "delivered_at": "timestamp: delivery statistics",
    "cleaned_at": "timestamp: marks a cleaned dispatch, never touched again",
}

#: The seed model's personal data: each must be stripped or kept with a reason.
SEED_PERSONAL = ("content", "msisdn", "email", "app_token")
DEFAULT_CLEAN_COLUMNS = SEED_PERSONAL
MEMBER_ID_REASON = (
    "pseudonymous personal data, kept for per-member statistics and legal holds "
    "(add it to clean.columns to strip it)"
)

TYPES = ("sms", "email", "push")
TRANSMISSION_STATUSES = ("scheduled", "transmitted", "failed")
DELIVERY_STATUSES = ("pending", "delivered", "failed")
#: The API's words of each column a policy may match on but the free-text external status:
#: what a policy names and `[target.codes]` maps.
API_WORDS: Mapping[str, tuple[str, ...]] = {
    "type": TYPES,
    "transmission_status": TRANSMISSION_STATUSES,
    "delivery_status": DELIVERY_STATUSES,
}
#: Keys of a policy's `where`, with the values each accepts (None: any non-empty text).
MATCH_KEYS: Mapping[str, tuple[str, ...] | None] = {**API_WORDS, "external_delivery_status": None}

MAX_RETENTION_DAYS = 36_500  # a hundred years: anything longer is a typo


def _identifier(value: str, what: str) -> str:
    try:
        parts = name_parts(value)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if len(parts) > 2:
        raise ValueError(f"{what} must be NAME or SCHEMA.NAME")
    return value


# --- the file's shape ------------------------------------------------------------------------

#: The largest count a config or an option may give: the run record's documents hold no
#: number past 10^15 (migration 0006), and no table holds that many rows.
MAX_COUNT = 10**15
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_COUNT)]
#: A reason (`[acknowledged]`, `clean.keep`): a sentence or two. The run record keeps every
#: acknowledged reason in its copy risks, a document of at most 64 KiB (migration 0006).
MAX_REASON_CHARS = 1000
MAX_ACKNOWLEDGED_BYTES = 16 * 1024


def _no_nul(value: str) -> str:
    """PostgreSQL's text and jsonb cannot hold a NUL: refused here, not at run time."""
    if "\x00" in value:
        raise ValueError("holds a NUL character (\\u0000)")
    return value


Reason = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_REASON_CHARS),
    AfterValidator(_no_nul),
]
#: A policy's `legal_basis` and `purpose`: plain text for the record of processing, which
#: `policy describe` prints as a Markdown table cell and the report as HTML.
MAX_PLAIN_CHARS = 500


def _plain(value: str) -> str:
    """One line of printable text: no control or format character (a newline, a terminal
    escape, a bidirectional override), which would change what a reader of the record sees."""
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        raise ValueError(f"holds the control character U+{ord(bad):04X}: plain text only")
    return value


PlainText = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PLAIN_CHARS),
    AfterValidator(_plain),
]
#: Policies a config may hold (`_File._policies`); what they cost the plan is in
#: docs/performance.md ("Finding the due rows").
MAX_POLICIES = 100
PolicyName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
]
MatchValue = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Code = (
    Annotated[str, StringConstraints(min_length=1, max_length=200)]
    | Annotated[int, Field(ge=-(2**63), lt=2**63)]
)


class Target(_Strict):
    table: str = "dispatches"
    #: where the table stores other values than the API's words: column -> word -> value
    #: (an integer code or an enum label); policies keep naming the words
    codes: dict[str, dict[str, Code]] = Field(default_factory=dict)

    @field_validator("table")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return _identifier(value, "the table name")

    @field_validator("codes")
    @classmethod
    def _known_words(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for column, mapping in value.items():
            if column not in MATCH_KEYS:
                raise ValueError(f"unknown column {column!r}; one of {', '.join(MATCH_KEYS)}")
            words = MATCH_KEYS[column]
            if not mapping:
                raise ValueError(f"{column}: map at least one word")
            for word, code in mapping.items():
                if words is not None and word not in words:
                    raise ValueError(f"{column}: unknown word {word!r}; one of {', '.join(words)}")
                if isinstance(code, str) and "\x00" in code:
                    raise ValueError(f"{column}.{word}: holds a NUL character (\\u0000)")
            stored = list(mapping.values())
            if len({(type(c), c) for c in stored}) != len(stored):
                raise ValueError(f"{column}: two words map to the same value")
            if len({type(c) for c in stored}) > 1:
                raise ValueError(f"{column}: mix of integer codes and labels; use one kind")
        return value

    @property
    def parts(self) -> list[str]:
        """The schema (if given) and table names, unquoted."""
        return name_parts(self.table)

    @property
    def schema_name(self) -> str | None:
        parts = self.parts
        return parts[0] if len(parts) == 2 else None

    @property
    def table_name(self) -> str:
        return self.parts[-1]

    @property
    def regclass(self) -> str:
        """The name quoted for `CAST(... AS regclass)` (a resolved schema may hold capitals)."""
        return quoted_name(*self.parts)


#: A TOML array read as a tuple (settings are immutable).
Listed = BeforeValidator(lambda value: tuple(value) if isinstance(value, list) else value)


class Clean(_Strict):
    columns: Annotated[tuple[str, ...], Listed] = DEFAULT_CLEAN_COLUMNS
    #: columns that hold (or may hold) personal data and are kept on purpose: column = reason
    keep: dict[str, Reason] = Field(default_factory=dict)  # filled by _defaults_for_the_columns
    replace: dict[str, Any] = Field(default_factory=lambda: {"content": {}})
    age_from: Literal["created_at", "updated_at", "scheduled_at", "transmitted_at",
                      "delivered_at"] = "created_at"  # fmt: skip
    in_flight_grace_days: Annotated[int, Field(ge=0, le=MAX_RETENTION_DAYS)] = 30
    chunk_size: Annotated[int, Field(ge=1, le=1_000_000)] = 5000
    lock_timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 2000
    row_lock_wait_ms: Annotated[int, Field(ge=1, le=600_000)] = 50
    statement_timeout_ms: Annotated[int, Field(ge=1, le=86_400_000)] = 60_000
    plan_timeout_ms: Annotated[int, Field(ge=1, le=86_400_000)] = 900_000
    target_chunk_ms: Annotated[int, Field(ge=0, le=600_000)] = 150
    min_chunk_size: Annotated[int, Field(ge=1, le=1_000_000)] = 500
    max_chunk_size: Annotated[int, Field(ge=1, le=1_000_000)] = 50_000
    pause_between_chunks_ms: Annotated[int, Field(ge=0, le=600_000)] = 0
    #: the job's duty cycle between chunks (1: off; 0.5: rest as long as each chunk took)
    max_busy_fraction: Annotated[float, Field(ge=0.01, le=1)] = 1.0
    #: wait before a chunk while a physical standby replays more than this far behind (0: off)
    max_replica_lag_s: Annotated[float, Field(ge=0, le=86_400)] = 0.0
    #: the longest one such wait: past it the run stops `incomplete` (`replica_lag`)
    max_throttle_wait_s: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    max_retries: Annotated[int, Field(ge=0, le=100)] = 5
    retry_max_wait_s: Annotated[float, Field(ge=0, le=3600)] = 30.0

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_the_columns(cls, data: Any) -> Any:
        """The defaults that depend on `columns`: `member_id` is kept (with its reason)
        unless it is stripped, and `content` becomes `{}` only where it is stripped."""
        if not isinstance(data, dict):
            return data
        columns = data.get("columns", DEFAULT_CLEAN_COLUMNS)
        listed = columns if isinstance(columns, list | tuple) else ()
        if "keep" not in data:
            data = {
                **data,
                "keep": {} if "member_id" in listed else {"member_id": MEMBER_ID_REASON},
            }
        if "replace" not in data:
            data = {**data, "replace": {"content": {}} if "content" in listed else {}}
        return data

    @field_validator("keep")
    @classmethod
    def _keep_names(cls, value: dict[str, str]) -> dict[str, str]:
        for column in value:
            if len(column) > MAX_IDENTIFIER or not IDENTIFIER.match(column):
                raise ValueError(f"{column!r} is not a plain SQL column name")
        return value

    @model_validator(mode="after")
    def _classified(self) -> Clean:
        """Every personal column of the seed model is stripped or kept with a reason."""
        for column in self.keep:
            if column in self.columns:
                raise ValueError(f"keep.{column}: also listed in clean.columns; choose one")
        for column in SEED_PERSONAL:
            if column not in self.columns and column not in self.keep:
                raise ValueError(
                    f"columns: {column} is personal data and would be neither stripped nor "
                    f"kept: list it in clean.columns, or in clean.keep with the reason it stays"
                )
        return self

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """The seed model's personal columns, or any other column of the table (an
        application's own, checked against the table when the job connects); never one the
        seed model keeps for a reason."""
        if not value:
            raise ValueError("list at least one column to strip")
        for column in value:
            reason = KEPT_COLUMNS.get(column)
            if reason:
                raise ValueError(f"{column!r} cannot be stripped ({reason})")
            if len(column) > MAX_IDENTIFIER or not IDENTIFIER.match(column):
                raise ValueError(f"{column!r} is not a plain SQL column name")
        if len(set(value)) != len(value):
            raise ValueError("a column is listed twice")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> Clean:
        if self.min_chunk_size > self.max_chunk_size:
            raise ValueError("min_chunk_size: larger than max_chunk_size")
        return self

    @model_validator(mode="after")
    def _replacements_fit(self) -> Clean:
        for column, replacement in self.replace.items():
            if column not in self.columns:
                raise ValueError(f"replace.{column}: {column!r} is not in clean.columns")
            expected = PERSONAL_COLUMNS.get(column, (dict, list, str, int, float, bool))
            if replacement is None or (isinstance(replacement, bool) and expected is int):
                raise ValueError(f"replace.{column}: leave the column out of replace for NULL")
            if not isinstance(replacement, expected):
                raise ValueError(f"replace.{column}: wrong type for that column")
            if isinstance(replacement, int) and not -(2**63) <= replacement < 2**63:
                raise ValueError(f"replace.{column}: out of range for a bigint")
            if _has_nul(replacement):
                raise ValueError(f"replace.{column}: holds a NUL character (\\u0000)")
        return self


def _has_nul(value: Any) -> bool:
    """A NUL character anywhere in a JSON value (keys included): PostgreSQL's text and jsonb
    cannot hold one, so it would fail at run time."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class Guard(_Strict):
    min_retention_days: Annotated[int, Field(ge=0, le=MAX_RETENTION_DAYS)] = 7
    max_rows_per_run: NonNegativeInt = 0
    refuse_above_rows: NonNegativeInt = 0


class Evidence(_Strict):
    """What the report (`report`) states beyond the database: how long backups keep what
    the job cleaned (None: not stated)."""

    backup_retention_days: Annotated[int, Field(ge=0, le=MAX_RETENTION_DAYS)] | None = None


#: The audit schema unless `[audit] schema` names another.
DEFAULT_AUDIT_SCHEMA = "dispatch_retention"
#: Characters a quoted audit schema name may not hold (`Audit.schema_`).
_UNSAFE_IN_AUDIT_SCHEMA = "$\\:"


class Audit(_Strict):
    schema_: str = Field(default=DEFAULT_AUDIT_SCHEMA, alias="schema")

    @field_validator("schema_")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        """One name, plain or quoted; kept unquoted (every use quotes it again)."""
        try:
            parts = name_parts(value)
        except ValueError as exc:
            raise ValueError(f"the audit schema: {exc}") from None
        if len(parts) != 1:
            raise ValueError("the audit schema must be a single SQL name")
        value = parts[0]
        unsafe = sorted(set(value) & set(_UNSAFE_IN_AUDIT_SCHEMA))
        if unsafe or not value.isprintable():
            shown = ", ".join(f"'{c}'" for c in unsafe) if unsafe else "a control character"
            raise ValueError(
                f"the audit schema's name holds {shown}: the job's functions (dollar-quoted "
                "bodies), the read-only grants and the migrations' SQL name it, where $ can "
                "end a quote and \\ or : change the text; choose a name without them"
            )
        if value.startswith("pg_") or value == "information_schema":
            raise ValueError(
                f"{value} is a system schema: pg_dump leaves it out, and the audit trail with "
                "it; name a schema of the job's own"
            )
        return value


class Policy(_Strict):
    name: PolicyName
    retention_days: Annotated[int, Field(ge=1, le=MAX_RETENTION_DAYS)]
    where: dict[str, tuple[MatchValue, ...]] = Field(default_factory=dict)
    #: for the record of processing (`policy describe`, the report): why the data may be
    #: kept this long, and what for
    legal_basis: PlainText | None = None
    purpose: PlainText | None = None

    @field_validator("where", mode="before")
    @classmethod
    def _values_as_tuples(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {
            key: (v,) if isinstance(v, str) else tuple(v) if isinstance(v, list) else v
            for key, v in value.items()
        }

    @field_validator("where")
    @classmethod
    def _known_keys(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for key, values in value.items():
            if key not in MATCH_KEYS:
                raise ValueError(f"unknown key {key!r}; one of {', '.join(MATCH_KEYS)}")
            if not values:
                raise ValueError(f"{key}: give at least one value")
            allowed = MATCH_KEYS[key]
            for v in values:
                if "\x00" in v:
                    raise ValueError(f"{key}: a value holds a NUL character (\\u0000)")
                if allowed is not None and v not in allowed:
                    raise ValueError(f"{key}: unknown value {v!r}; one of {', '.join(allowed)}")
        return value


class _File(_Strict):
    target: Target = Field(default_factory=Target)
    clean: Clean = Field(default_factory=Clean)
    guard: Guard = Field(default_factory=Guard)
    audit: Audit = Field(default_factory=Audit)
    evidence: Evidence = Field(default_factory=Evidence)
    #: copy risks (triggers, rules, publications, replica identity) reviewed: name = reason
    acknowledged: dict[
        Annotated[
            str,
            StringConstraints(min_length=1, max_length=MAX_IDENTIFIER),
            AfterValidator(_no_nul),
        ],
        Reason,
    ] = Field(default_factory=dict)
    policy: Annotated[tuple[Policy, ...], Listed]

    @field_validator("acknowledged")
    @classmethod
    def _acknowledged_fit(cls, value: dict[str, str]) -> dict[str, str]:
        size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
        if size > MAX_ACKNOWLEDGED_BYTES:
            raise ValueError(
                f"names and reasons take {size} bytes; at most {MAX_ACKNOWLEDGED_BYTES // 1024} "
                "KiB: every run records them with its copy risks"
            )
        return value

    @model_validator(mode="after")
    def _policies(self) -> _File:
        if not self.policy:
            raise ValueError("policy: define at least one [[policy]]")
        if len(self.policy) > MAX_POLICIES:
            raise ValueError(
                f"policy: {len(self.policy)} policies; at most {MAX_POLICIES}: each policy's "
                "rule names every shorter one, so the statements grow with the square of "
                "their number (at 250 they no longer fit PostgreSQL's 65,535 parameters)"
            )
        names = [p.name for p in self.policy]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"policy[{i}].name: {name!r} is used twice")
        for i, p in enumerate(self.policy):
            if p.retention_days < self.guard.min_retention_days:
                raise ValueError(
                    f"policy[{i}].retention_days: {p.retention_days} is under "
                    f"guard.min_retention_days ({self.guard.min_retention_days})"
                )
        return self


# --- what the rest of the program sees -------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """A validated configuration, plus the text and digest the audit trail records."""

    path: str
    text: str
    target: Target
    clean: Clean
    guard: Guard
    audit: Audit
    policies: tuple[Policy, ...]
    acknowledged: Mapping[str, str] = dataclasses.field(default_factory=dict)
    evidence: Evidence = dataclasses.field(default_factory=Evidence)
    #: the target table's columns as the catalog describes them, once the job has connected
    #: (`target.resolve_settings`); None before: statements then follow the seed model
    shape: Shape | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def kept(self) -> dict[str, str]:
        """Every column kept on purpose, with its reason: the seed model's non-personal
        columns and `clean.keep`."""
        return {**KEPT_COLUMNS, **self.clean.keep}

    def unclassified(self, columns: Iterable[str]) -> list[str]:
        """Of a table's `columns`, those neither stripped nor kept (in their order)."""
        kept = self.kept()
        return [c for c in columns if c not in self.clean.columns and c not in kept]


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    """`--config`, else `DISPATCH_RETENTION_CONFIG`, else `config/retention.toml`."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


#: A config file is a page of TOML; anything larger is a mistake (`/dev/zero`, a log file),
#: and the text is stored in every run record.
MAX_CONFIG_BYTES = 1024 * 1024


class NotSmallFile(Exception):
    """A path that is not a regular file of at most the size asked for (`reason` says
    which): a FIFO would block the reader for ever, a device or a huge file exhaust it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Opened without blocking (a
    FIFO opens at once), then refused unless it is a regular file; read at most `limit` + 1
    bytes, so a file that grows or a size the kernel does not report (/proc) stays bounded.
    `OSError` when it cannot be opened; `NotSmallFile` for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as handle:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise NotSmallFile("is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise NotSmallFile("is not a regular file (a FIFO, a device, a socket)")
        if info.st_size > limit:
            raise NotSmallFile(f"is larger than {_size(limit)}")
        os.set_blocking(fd, True)
        chunks, left = [], limit + 1
        while left > 0:
            chunk = handle.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    raw = b"".join(chunks)
    if len(raw) > limit:
        raise NotSmallFile(f"is larger than {_size(limit)}")
    return raw


def _size(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit % (1024 * 1024) == 0 else f"{limit // 1024} KiB"


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    file = resolve_path(path)
    name = str(file)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # the run record keeps the path: text only
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ConfigError(shown, "", "the path is not UTF-8 text: rename the file") from None
    try:
        raw = read_small_file(file, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read the file ({exc.strerror or exc})") from None
    except NotSmallFile as exc:
        raise ConfigError(name, "", f"the path {exc.reason}: not a config file") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is dropped
    except UnicodeDecodeError:
        raise ConfigError(name, "", "the file is not UTF-8 text") from None
    return parse(text, name)


def parse(text: str, name: str = "<config>") -> Settings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, "", f"not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(name, "", _TOO_DEEP) from None
    deep = _too_deep(data)
    if deep is not None:
        raise ConfigError(name, deep, _TOO_DEEP)
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        raise _first_error(name, exc) from None
    return Settings(
        path=name,
        text=text,
        target=parsed.target,
        clean=parsed.clean,
        guard=parsed.guard,
        audit=parsed.audit,
        policies=parsed.policy,
        acknowledged=parsed.acknowledged,
        evidence=parsed.evidence,
    )


#: How deep arrays and tables may nest in a config (its own keys take 3 levels; a JSON
#: value of `clean.replace` the rest): deeper, validation and the JSON of the run record
#: would recurse as deep.
MAX_DEPTH = 32
_TOO_DEEP = f"arrays and tables nest more than {MAX_DEPTH} levels deep: not a config file"


def _too_deep(data: dict[str, Any]) -> str | None:
    """The config key (`clean.replace`) of a value nested deeper than `MAX_DEPTH`, or None
    (walked without recursion)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, key, depth = stack.pop()
        if depth > MAX_DEPTH:
            return key or "(top level)"
        named = depth < 2  # the key names a config key, not a path inside its value
        if isinstance(value, dict):
            stack += [
                (v, (f"{key}.{k}" if key else str(k)) if named else key, depth + 1)
                for k, v in value.items()
            ]
        elif isinstance(value, list):
            stack += [(v, f"{key}[{i}]" if named else key, depth + 1) for i, v in enumerate(value)]
    return None


def _first_error(name: str, exc: ValidationError) -> ConfigError:
    error = exc.errors(include_url=False, include_input=False)[0]
    key = ".".join(
        f"[{part}]" if isinstance(part, int) else str(part) for part in error["loc"]
    ).replace(".[", "[")
    if not key.isprintable():  # a key of the file's own (a quoted TOML key holds anything)
        key = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in key)
    reason = error["msg"].removeprefix("Value error, ")
    # A model-level check names its key itself ("policy[1].retention_days: ..."): append it.
    named = re.match(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)*): (.*)$", reason, re.DOTALL)
    if named:
        key = f"{key}.{named[1]}" if key else named[1]
        reason = named[2]
    if error["type"] == "extra_forbidden":
        reason = "unknown key"
    elif error["type"] == "missing":
        reason = "required key is missing"
    return ConfigError(name, key or "(top level)", reason)
