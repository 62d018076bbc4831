"""Small helpers every command line shares: the recorded invocation and the one batch-list parser.

The top-level CLI (``ddpm.cli``) records argv here; a command anywhere below (bench, export) reads it back
without importing the CLI that sits above it.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from .errors import InvalidArgumentError

__all__ = ["record_invocation", "invocation", "parse_int_list"]

_argv: list[str] = []


def record_invocation(argv: Sequence[str]) -> None:
    _argv[:] = [str(a) for a in argv]


def invocation() -> str:
    """The command line being run, shell-quoted (benchmarks record it next to their figures)."""
    return " ".join(shlex.quote(a) for a in ["ddpm", *_argv])


def parse_int_list(text: str | Sequence[int], *, option: str = "--batch", hi: int | None = None) -> list[int]:
    """``"1,64"`` (or a sequence of ints) -> ``[1, 64]``: the one parser of batch lists (run, bench, export).

    Values must be integers >= 1 (and <= ``hi`` when given); the message names ``option`` and the bad value.
    """
    parts = [
        p.strip() if isinstance(p, str) else p for p in (text.split(",") if isinstance(text, str) else text)
    ]
    what = (
        "a comma-separated list of positive integers"
        if hi is None
        else f"comma-separated integers in 1..{hi}"
    )
    values: list[int] = []
    for p in parts:
        try:
            if isinstance(p, (bool, float)):
                raise ValueError
            values.append(int(p))
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{option} must be {what}, got {text!r}") from None
    if not values:
        raise InvalidArgumentError(f"{option} must be {what}, got {text!r}")
    for v in values:
        if v < 1 or (hi is not None and v > hi):
            if hi is None:
                raise InvalidArgumentError(f"{option} must be {what}, got {text!r}")
            raise InvalidArgumentError(f"{option}: batch sizes must be in 1..{hi}, got {v} in {text!r}")
    return values
