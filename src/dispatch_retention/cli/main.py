"""The command line assembled: the root group with every command group registered on it.

The commands live in `run_commands` (run, demo), `trail_commands` (verify, audit),
`hold_commands` (hold), `evidence_commands` (policy) and `db_commands` (db), each importing
the root group (`root.cli`) to register on it; importing them here registers them. `params`
holds the option types.
"""

from __future__ import annotations

from dispatch_retention.cli import (  # noqa: F401 (imported to register their commands)
    db_commands,
    evidence_commands,
    hold_commands,
    run_commands,
    trail_commands,
)
from dispatch_retention.cli.root import cli


def main() -> None:
    cli(prog_name="dispatch-retention", auto_envvar_prefix=None)
