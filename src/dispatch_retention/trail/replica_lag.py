"""The replica lag function: how far the physical standbys replay behind, and nothing more.

The run role may not read the positions in `pg_stat_replication` (PostgreSQL shows them to
superusers and members of `pg_read_all_stats` only, and shows every other column as NULL).
Granting it `pg_monitor` would also show it every session's query text. Instead, when
`clean.max_replica_lag_s` is set, `db grants --purpose run` prints this small SECURITY
DEFINER function, made by a role that may read them, with a fixed `search_path` and no
argument, and grants the run role EXECUTE on it. It answers one row of numbers:

- `standbys`: physical standbys streaming or catching up (a walsender of a logical slot, a
  CDC reader say, is not a replica: a stalled one must not stop the run);
- `unseen`: walsenders whose state or replay position the function's owner cannot read
  (it lacks the right: the job then warns and does not pretend the lag is zero);
- `wal_bytes`: the primary's current WAL position, `replayed_bytes`: the least replay
  position among the standbys (both as bytes from 0/0);
- `replay_lag_s`: the largest `replay_lag` PostgreSQL reports (it goes stale when a standby
  is idle or paused: the job measures the delay itself, `run/throttle.py`);
- `idle_slots`: physical replication slots with no standby connected (their WAL piles up,
  and their standby's lag cannot be seen).

It lives in the audit schema, where `trail/objects.py` knows it as an optional object:
absent is fine, any other body is reported by `audit verify`.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import TextClause, text

from dispatch_retention.names import quoted_name

FUNCTION = "replica_lag"
COLUMNS = ("standbys", "unseen", "wal_bytes", "replayed_bytes", "replay_lag_s", "idle_slots")
#: Its parameters, as `CREATE FUNCTION` and `pg_get_function_identity_arguments` write them.
SIGNATURE = (
    "OUT standbys integer, OUT unseen integer, OUT wal_bytes numeric, "
    "OUT replayed_bytes numeric, OUT replay_lag_s double precision, OUT idle_slots integer"
)
#: Its settings as `pg_proc.proconfig` holds them.
SEARCH_PATH = "pg_catalog, pg_temp"

BODY = """
WITH sender AS (
  SELECT r.state, r.replay_lsn, r.replay_lag
  FROM pg_stat_replication r
  WHERE NOT EXISTS (SELECT FROM pg_replication_slots s
                    WHERE s.active_pid = r.pid AND s.slot_type = 'logical')
), standby AS (
  SELECT * FROM sender WHERE state IN ('streaming', 'catchup')
)
SELECT (SELECT count(*) FROM standby WHERE replay_lsn IS NOT NULL)::integer,
       (SELECT count(*) FROM sender
        WHERE state IS NULL OR (state IN ('streaming', 'catchup') AND replay_lsn IS NULL))::integer,
       pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'),
       (SELECT pg_wal_lsn_diff(min(replay_lsn), '0/0') FROM standby),
       (SELECT extract(epoch FROM max(replay_lag))::double precision FROM standby),
       (SELECT count(*) FROM pg_replication_slots
        WHERE slot_type = 'physical' AND NOT active)::integer
"""


def qualified(schema: str) -> str:
    return quoted_name(schema, FUNCTION)


def create(schema: str, role_q: str) -> list[str]:
    """The statements that make the function (as the role running them, who must be able to
    read `pg_stat_replication`: a superuser or a member of `pg_read_all_stats`) and let
    `role_q` (quoted) call it, and nobody else."""
    name = qualified(schema)
    return [
        f"CREATE OR REPLACE FUNCTION {name}({SIGNATURE})\n"
        f"LANGUAGE sql STABLE SECURITY DEFINER SET search_path = {SEARCH_PATH}\n"
        f"AS $lag${BODY}$lag$;",
        f"REVOKE ALL ON FUNCTION {name}() FROM PUBLIC;",
        f"GRANT EXECUTE ON FUNCTION {name}() TO {role_q};",
    ]


def call(schema: str) -> TextClause:
    """One read of the lag, as the job's role."""
    return text(f"SELECT {', '.join(COLUMNS)} FROM {qualified(schema)}()")


def described() -> tuple[str, str]:
    """The function as `trail/objects.py` describes an object of the trail's schema."""
    digest = hashlib.sha256(BODY.encode()).hexdigest()
    return f"function {FUNCTION}({SIGNATURE})", f"definer search_path={SEARCH_PATH} body {digest}"
