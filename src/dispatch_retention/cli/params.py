"""The option types of the command line: validation of one option, as click's `ParamType`s."""

from __future__ import annotations

import math
import os
import uuid
from typing import Any

import click

from .. import (
    shard,
)


class ShardParam(click.ParamType[shard.Shard | None]):
    """`I/N` (0 <= I < N <= 1024): a `shard.Shard`."""

    name = "I/N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, shard.Shard):
            return value
        try:
            return shard.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class RunIdParam(click.ParamType[str]):
    """A run id as `audit list` shows it (a UUID), in its canonical form."""

    name = "RUN_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            self.fail("not a run id (a UUID, as `audit list` shows)", param, ctx)


#: --max-runtime at most a week; --tolerance-hours at most ten years (anything more is a typo)
MAX_RUNTIME_S, MAX_TOLERANCE_HOURS = 7 * 24 * 3600.0, 10 * 365 * 24.0


class Bounded(click.ParamType[float]):
    """A finite number in (low, high] (or [low, high] with `allow_min`): never nan or inf."""

    name = "number"

    def __init__(self, low: float, high: float, *, allow_min: bool = False) -> None:
        self.low, self.high, self.allow_min = low, high, allow_min

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        above = number >= self.low if self.allow_min else number > self.low
        if not (math.isfinite(number) and above and number <= self.high):
            bound = "from" if self.allow_min else "above"
            self.fail(
                f"{value!r}: give a number {bound} {self.low:g} up to {self.high:g}", param, ctx
            )
        return number


def shard_from_env() -> shard.Shard | None:
    """The default of `--shard`: a Kubernetes Indexed Job's own index and count."""
    try:
        return shard.from_env(os.environ)
    except ValueError as exc:
        raise click.BadParameter(
            f"{exc} (from JOB_COMPLETION_INDEX/JOB_COMPLETIONS)", param_hint="--shard"
        ) from None
