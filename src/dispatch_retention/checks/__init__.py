"""Read-only answers: `verify` (`verify`), `audit verify` (`audit_verify`, with its head file
in `heads`), `db check` (`db_check`) and `db grants` (`db_grants`). Imports `trail` and the
layers below it, never `run`.
"""
