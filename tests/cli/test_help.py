"""Every command of the README's command line is reached by a walk of the click group, takes
its options, and documents itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest

from dispatch_retention.cli.main import cli
from tests.helpers import invoke

# --- 2. every command documents itself -------------------------------------------------------


def _walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _walk(sub, (*path, name))


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


COMMAND_PATHS = list(_walk(cli))


#: README "Command line": every command and the options it must take.
CONTRACT_SURFACE: dict[tuple[str, ...], tuple[str, ...]] = {
    (): ("--config", "--database-url", "--log-format"),
    ("run",): (
        "--dry-run",
        "--yes",
        "--force",
        "--reclean",
        "--chunk-size",
        "--max-rows",
        "--max-runtime",
        "--shard",
        "--format",
    ),
    ("verify",): ("--format", "--strict"),
    ("audit", "list"): ("--since", "--limit", "--format", "--wide"),
    ("audit", "show"): ("--format",),
    ("hold", "add"): ("--reason",),
    ("hold", "release"): (),
    ("hold", "list"): ("--format",),
    ("db", "upgrade"): (),
    ("db", "check"): ("--strict", "--purpose"),
    ("demo",): ("--rows",),
}
SURFACE = [
    pytest.param(path, option, id=" ".join([*path, option or ""]).strip() or "(root)")
    for path, options in CONTRACT_SURFACE.items()
    for option in options or (None,)
]


@pytest.mark.parametrize(("path", "option"), SURFACE)
def test_the_walk_finds_every_contract_command_and_option(
    path: tuple[str, ...], option: str | None
) -> None:
    """Each command of README "Command line" is reached by the walk and takes its options."""
    assert path in COMMAND_PATHS, f"no command {' '.join(path)!r}"
    if option is not None:
        assert option in [o for p in _command(path).params for o in p.opts]


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "(root)")
def test_every_command_has_help_and_help_exits_0(path: tuple[str, ...]) -> None:
    """Each command and group has help text, and its --help prints it and exits 0."""
    command = _command(path)
    assert (command.help or "").strip(), f"{' '.join(path) or 'cli'} has no help text"
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(" ".join(["Usage: dispatch-retention", *path]))
    first_paragraph = " ".join(command.help.strip().split("\n\n")[0].split())
    assert first_paragraph in " ".join(result.stdout.split())
