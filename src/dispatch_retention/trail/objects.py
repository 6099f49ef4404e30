"""The trail's catalog as the migrations make it, and what differs from it in a database.

`audit verify` trusts the trail's triggers and functions to have stamped and chained every
row. The schema's owner may change them: turn a trigger off, give it a `WHEN (false)`, point
it at another function, rewrite a function's body, add a rule that sends a hold elsewhere,
drop a CHECK constraint. `read()` describes the catalog of the trail's schema in a few words
per object, the same on every PostgreSQL version the job supports (a function by the digest
of its body as written, its rights and settings; a trigger by its function, its events and
timing, whether it has a `WHEN`; a constraint by its kind; a rule by its
existence); `differences()` names what is not as `EXPECTED` says: gone, changed, or not the
job's. A change made and undone between two checks shows only through the rows written
meanwhile (checks/audit_verify.py).

`EXPECTED` is written from a schema the migrations just made (tests/trail/test_trail_catalog.py
holds it equal, and prints the new value after a migration changes the catalog).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, text

from dispatch_retention.names import quoted_name
from dispatch_retention.printable import shown_name
from dispatch_retention.trail import replica_lag

#: Each object of the trail's schema -> how it stands (see `read`), as revision 0008 leaves it.
EXPECTED: Mapping[str, str] = {
    'constraint chunks.chunks_by_policy_bounded': 'kind c',
    'constraint chunks.chunks_kind_bounded': 'kind c',
    'constraint chunks.chunks_kind_known': 'kind c',
    'constraint chunks.chunks_pkey': 'kind p',
    'constraint chunks.chunks_run_id_fkey': 'kind f',
    'constraint events.events_body_bounded': 'kind c',
    'constraint events.events_hash_bounded': 'kind c',
    'constraint events.events_hash_key': 'kind u',
    'constraint events.events_kind_bounded': 'kind c',
    'constraint events.events_kind_check': 'kind c',
    'constraint events.events_pkey': 'kind p',
    'constraint events.events_prev_hash_bounded': 'kind c',
    'constraint events.events_subject_bounded': 'kind c',
    'constraint events_head.events_head_hash_bounded': 'kind c',
    'constraint events_head.events_head_only_row_check': 'kind c',
    'constraint events_head.events_head_pkey': 'kind p',
    'constraint legal_holds.legal_holds_created_by_bounded': 'kind c',
    'constraint legal_holds.legal_holds_pkey': 'kind p',
    'constraint legal_holds.legal_holds_reason_bounded': 'kind c',
    'constraint legal_holds.legal_holds_reason_given': 'kind c',
    'constraint legal_holds.legal_holds_released_by_bounded': 'kind c',
    'constraint legal_holds.legal_holds_requested_by_bounded': 'kind c',
    'constraint runs.runs_config_path_bounded': 'kind c',
    'constraint runs.runs_config_sha256_bounded': 'kind c',
    'constraint runs.runs_config_text_bounded': 'kind c',
    'constraint runs.runs_copy_risks_at_end_bounded': 'kind c',
    'constraint runs.runs_copy_risks_bounded': 'kind c',
    'constraint runs.runs_counts_not_negative': 'kind c',
    'constraint runs.runs_db_user_bounded': 'kind c',
    'constraint runs.runs_error_bounded': 'kind c',
    'constraint runs.runs_host_bounded': 'kind c',
    'constraint runs.runs_options_bounded': 'kind c',
    'constraint runs.runs_pkey': 'kind p',
    'constraint runs.runs_policies_bounded': 'kind c',
    'constraint runs.runs_remaining_reason_bounded': 'kind c',
    'constraint runs.runs_shard_bounded': 'kind c',
    'constraint runs.runs_status_bounded': 'kind c',
    'constraint runs.runs_status_known': 'kind c',
    'constraint runs.runs_stopped_by_bounded': 'kind c',
    'constraint runs.runs_target_table_bounded': 'kind c',
    'constraint runs.runs_tool_version_bounded': 'kind c',
    'constraint runs.runs_trigger_bounded': 'kind c',
    'function append_event(kind text, subject text, fact jsonb, imported boolean)': 'definer search_path=pg_catalog, pg_temp,TimeZone=UTC body 6ea605b2af6cfd516ae54fbbb3fc2dde0b7a2ccc204e4e8a8daadcc9533cdaba',
    'function append_event(kind text, subject text, fact jsonb, imported boolean, stamped timestamp with time zone)': 'definer search_path=pg_catalog, pg_temp,TimeZone=UTC body 5dc56fb23c9bcea594ef6b1a2ceaa87c380929496810bf5d70d790b4563305a7',
    'function audit_trail_append_only()': 'invoker search_path=pg_catalog, pg_temp body 674bf0923450b88b32ab71582038f8cbb2bb647afc98124f08e70fa4d173dd5a',
    'function chunks_event()': 'definer search_path=pg_catalog, pg_temp,TimeZone=UTC body cd15d57ec9c0407ea16571bb65b3d0a4e5fe5a264decb5aa4e514c4a8a3f4861',
    'function chunks_guard()': 'invoker search_path=pg_catalog, pg_temp body f139f9c527a6b212956c97cc98e6179e3a0dbf0a1e9bcc5ead5411580a8829f6',
    'function chunks_stamp()': 'invoker search_path=pg_catalog, pg_temp body 4b6fc6d57aefe7425dcb6c82421bb076a46ec906a6b2584096b45597ab3b4eb4',
    'function events_append_only()': 'invoker search_path=pg_catalog, pg_temp body 030597fae4e13fc198e0c1982dc3ff453ec20f97ec63cee4bf334c0a880f340e',
    'function legal_holds_event()': 'definer search_path=pg_catalog, pg_temp,TimeZone=UTC body 7a82c6b31b09cb87ef5b773e1028fd925c0e45e3e204447378348d21c3c28ad3',
    'function legal_holds_guard()': 'invoker search_path=pg_catalog, pg_temp body 9b4dd71a95e0cfc0bd143f735e14ea6e6b4da38a84628a0f4b1f5793282171fb',
    'function legal_holds_stamp()': 'definer search_path=pg_catalog, pg_temp,TimeZone=UTC body c40ea93a5b679ec56c93499851ae460ef726c961b4b400befc0ce03f5076addf',
    'function runs_event()': 'definer search_path=pg_catalog, pg_temp,TimeZone=UTC body 3220a7958ee5e934999a605812c313ab37320850d5331bec41665fc6c5824d9f',
    'function runs_guard()': 'invoker search_path=pg_catalog, pg_temp body 40924e897ba2adbdc099fbd730e5d000cbe5fe177b550a7e9eb8d8d161ddc73f',
    'function runs_risks_at_end()': 'invoker search_path=pg_catalog, pg_temp body 58d801f22de7bbb2e978f2d0b939c94369bcc7be198ae72cccd03f6079717fca',
    'function runs_stamp()': 'definer search_path=pg_catalog, pg_temp,TimeZone=UTC body 883092a23456ce051fe7e6c267d97483bb3f4982077e905bcce82d2bd91d1dab',
    'trigger chunks.chunks_append_only': 'audit_trail_append_only type 11 unconditional',
    'trigger chunks.chunks_event': 'chunks_event type 21 unconditional',
    'trigger chunks.chunks_guard': 'chunks_guard type 23 unconditional',
    'trigger chunks.chunks_no_truncate': 'audit_trail_append_only type 34 unconditional',
    'trigger chunks.chunks_stamp': 'chunks_stamp type 7 unconditional',
    'trigger events.events_append_only': 'events_append_only type 27 unconditional',
    'trigger events.events_no_truncate': 'events_append_only type 34 unconditional',
    'trigger events_head.events_head_no_truncate': 'events_append_only type 42 unconditional',
    'trigger legal_holds.legal_holds_append_only': 'audit_trail_append_only type 11 unconditional',
    'trigger legal_holds.legal_holds_event': 'legal_holds_event type 21 unconditional',
    'trigger legal_holds.legal_holds_guard': 'legal_holds_guard type 23 unconditional',
    'trigger legal_holds.legal_holds_no_truncate': 'audit_trail_append_only type 34 unconditional',
    'trigger legal_holds.legal_holds_stamp': 'legal_holds_stamp type 23 unconditional',
    'trigger runs.runs_append_only': 'audit_trail_append_only type 11 unconditional',
    'trigger runs.runs_event': 'runs_event type 21 unconditional',
    'trigger runs.runs_guard': 'runs_guard type 23 unconditional',
    'trigger runs.runs_no_truncate': 'audit_trail_append_only type 34 unconditional',
    'trigger runs.runs_risks_at_end': 'runs_risks_at_end type 23 unconditional',
    'trigger runs.runs_stamp': 'runs_stamp type 23 unconditional',
}  # fmt: skip

#: Objects of the trail's schema that may be absent, and are as listed where present: the
#: replica lag function that `db grants --purpose run` prints (`replica_lag.py`).
OPTIONAL: Mapping[str, str] = dict([replica_lag.described()])

#: The names under which the trail's functions raise their refusals (`RAISE ... USING
#: CONSTRAINT = ...`), which an error then carries: no catalog table names them, only the
#: functions' bodies (tests/unit/test_one_source.py reads them there and holds this equal).
RAISED = frozenset(
    {
        "audit_trail_append_only", "runs_start_running", "runs_finished_immutable",
        "runs_start_immutable", "runs_plan_immutable", "runs_documents_bounded",
        "runs_not_revived", "runs_changed_by_their_role", "runs_abandoned_closes",
        "runs_risks_at_end",
        "chunks_immutable", "chunks_of_a_running_run", "chunks_as_cleaned",
        "legal_holds_placed_active", "legal_holds_released_once", "legal_holds_placed_immutable",
        "events_imported_first",
    }
)  # fmt: skip

#: The trail's tables: their triggers, constraints and rules are described (the schema's
#: other tables, the version table and the read-only view, are not the trail).
TABLES = ("runs", "chunks", "legal_holds", "events", "events_head")
#: Functions' bodies name the schema as the migrations quoted it: that is replaced by this
#: before hashing, so one digest serves every schema name.
SCHEMA_MARK = "{schema}"

_OBJECTS = text(
    """
SELECT 'function ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       concat_ws(' ', CASE WHEN p.prosecdef THEN 'definer' ELSE 'invoker' END,
                 array_to_string(p.proconfig, ','), 'body', :body_digest_of_p)
FROM pg_proc p WHERE p.pronamespace = to_regnamespace(:schema)
UNION ALL
SELECT 'trigger ' || c.relname || '.' || g.tgname,
       concat_ws(' ', CASE WHEN f.pronamespace = c.relnamespace THEN f.proname
                           ELSE 'another schema''s ' || f.proname END, 'type', g.tgtype::text,
                 CASE WHEN g.tgqual IS NULL THEN 'unconditional' ELSE 'when' END,
                 CASE WHEN g.tgdeferrable THEN 'deferrable' END)
FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid JOIN pg_proc f ON f.oid = g.tgfoid
WHERE c.relnamespace = to_regnamespace(:schema) AND c.relname = ANY(:tables)
  AND NOT g.tgisinternal
UNION ALL
SELECT 'constraint ' || c.relname || '.' || k.conname, 'kind ' || k.contype::text
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
WHERE c.relnamespace = to_regnamespace(:schema) AND c.relname = ANY(:tables)
  AND k.contype <> 'n'  -- NOT NULL: a column's property, a constraint row from PostgreSQL 18 on
UNION ALL
SELECT 'rule ' || c.relname || '.' || r.rulename, 'present'
FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
WHERE c.relnamespace = to_regnamespace(:schema) AND c.relname = ANY(:tables)
ORDER BY 1
"""
)


def read(conn: Connection, schema: str) -> dict[str, str]:
    """Each function of the trail's schema, and each trigger, constraint and rule of its
    tables, as `EXPECTED` words it."""
    digest = "encode(sha256(convert_to(replace(p.prosrc, :quoted, :mark), 'UTF8')), 'hex')"
    query = text(str(_OBJECTS).replace(":body_digest_of_p", digest))
    rows = conn.execute(
        query,
        {
            "schema": quoted_name(schema),
            "quoted": quoted_name(schema, always=True),  # as the migrations wrote it
            "mark": SCHEMA_MARK,
            "tables": list(TABLES),
        },
    )
    return {str(name): str(how) for name, how in rows}


def differences(
    found: Mapping[str, str],
    expected: Mapping[str, str] = EXPECTED,
    optional: Mapping[str, str] = OPTIONAL,
) -> list[str]:
    """What in `found` is not as `expected` (or, where present, `optional`): an object gone,
    changed, or not the job's."""
    out = [f"{name} is gone" for name in sorted(expected.keys() - found.keys())]
    known = {**optional, **expected}
    out += [
        f"{shown_name(name)} is not as "
        f"{'the migrations make' if name in expected else '`db grants` makes'} it "
        f"({shown_name(found[name])})"
        for name in sorted(known.keys() & found.keys())
        if found[name] != known[name]
    ]
    out += [f"{shown_name(name)} is not the job's" for name in sorted(found.keys() - known.keys())]
    return out


def object_names(expected: Mapping[str, str] = EXPECTED) -> frozenset[str]:
    """The name of each object `EXPECTED` lists: each function, and each trigger and
    constraint of the trail's tables (`runs_guard`, `runs_pkey`)."""
    out = set()
    for name in expected:
        kind, _, where = name.partition(" ")
        out.add(where.partition("(")[0] if kind == "function" else where.partition(".")[2])
    return frozenset(out)


def triggers(expected: Mapping[str, str] = EXPECTED) -> dict[str, list[str]]:
    """The trail's triggers by table, as `EXPECTED` names them."""
    out: dict[str, list[str]] = {}
    for name in sorted(expected):
        kind, _, where = name.partition(" ")
        if kind == "trigger":
            table, _, trigger = where.partition(".")
            out.setdefault(table, []).append(trigger)
    return out
