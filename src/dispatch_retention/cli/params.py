"""The option types of the command line: validation of one option, as click's `ParamType`s."""

from __future__ import annotations

import math
import os
import re
import uuid
from typing import Any

import click

from dispatch_retention import errors
from dispatch_retention.rule import shard


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


class HashParam(click.ParamType[str]):
    """An event hash as `audit verify` prints it: 64 hexadecimal digits, in lower case."""

    name = "HASH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        digest = str(value).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            self.fail(
                "not a head hash (64 hexadecimal digits, as `audit verify` prints)", param, ctx
            )
        return digest


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


class Whole(click.IntRange):
    """A whole number in range, written in ASCII digits: Python's `int()` also reads other
    scripts' digits (an Arabic-Indic five is 5 to it), which no operator means as an id or
    a count."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not _ASCII_WHOLE.fullmatch(value.strip()):
            self.fail(f"{value!r} is not a whole number in ASCII digits (0-9)", param, ctx)
        return super().convert(value, param, ctx)


_ASCII_WHOLE = re.compile(r"[+-]?[0-9]+")


def shard_from_env() -> shard.Shard | None:
    """The default of `--shard`: a Kubernetes Indexed Job's own index and count. A broken
    pair is named as what it is (the environment), not as the option nobody gave."""
    try:
        return shard.from_env(os.environ)
    except ValueError as exc:
        raise errors.UsageError(
            f"JOB_COMPLETION_INDEX / JOB_COMPLETIONS (the Indexed Job's shard): {exc}"
        ) from None
