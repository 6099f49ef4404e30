"""`hold add`, `hold release`, `hold list`: legal holds."""

from __future__ import annotations

import click

from dispatch_retention import render
from dispatch_retention.cli.params import Whole
from dispatch_retention.cli.root import State, audit_session, cli, table_or_json
from dispatch_retention.trail import holds


@cli.group("hold")
def hold_group() -> None:
    """Legal holds: exempt every dispatch of a member from cleaning until released."""


@hold_group.command("add")
@click.argument("member_id", type=Whole(min=0, max=2**63 - 1))
@click.option("--reason", required=True, help="Why (a case number, not personal data).")
@click.option("--by", default=None, help="Who asks for it [default: OS user@host].")
@click.pass_obj
def hold_add(state: State, member_id: int, reason: str, by: str | None) -> None:
    """Put a member's dispatches under legal hold."""
    with audit_session(state, "holds", write=True) as (conn, _settings, tables):
        hold_id = holds.add(conn, tables, member_id, reason, by or holds.operator())
    click.echo(f"hold {hold_id}: member {member_id} is under legal hold")


@hold_group.command("release")
@click.argument("member_id", type=Whole(min=0, max=2**63 - 1))
@click.option("--by", default=None, help="Who releases it [default: OS user@host].")
@click.pass_obj
def hold_release(state: State, member_id: int, by: str | None) -> None:
    """Release a member's active hold (the hold is kept, stamped released_at)."""
    with audit_session(state, "holds", write=True) as (conn, _settings, tables):
        hold_id = holds.release(conn, tables, member_id, by or holds.operator())
    click.echo(f"hold {hold_id}: member {member_id} released")


@hold_group.command("list")
@click.option("--all", "include_released", is_flag=True, help="Include released holds.")
@table_or_json
@click.pass_obj
def hold_list(state: State, include_released: bool, fmt: str) -> None:
    """List active legal holds (with --all, released ones too)."""
    with audit_session(state, "holds", "holds") as (conn, _settings, tables):
        found = holds.list_holds(conn, tables, include_released=include_released)
    click.echo(render.holds(found, fmt))
