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


def parse_int_list(text: str | Sequence[int], *, option: str = "--batch") -> list[int]:
    """``"1,64"`` (or a sequence of ints) -> ``[1, 64]``; anything but a list of positive integers is an error
    naming ``option``."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
    else:
        parts = list(text)
    msg = f"{option} must be a comma-separated list of positive integers, got {text!r}"
    values: list[int] = []
    for p in parts:
        if isinstance(p, bool):
            raise InvalidArgumentError(msg)
        try:
            values.append(int(p))
        except (TypeError, ValueError):
            raise InvalidArgumentError(msg) from None
    if not values or any(v < 1 for v in values):
        raise InvalidArgumentError(msg)
    return values
