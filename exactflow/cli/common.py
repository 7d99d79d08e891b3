"""What every command shares: the errors users can fix, and printing for text mode."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["CommandError", "UsageError", "with_key", "say", "fmt", "positions_named"]


class CommandError(Exception):
    """A failure the user can fix (bad data, bad run folder): printed as one line, exit 1."""


class UsageError(CommandError):
    """A usage error found after parsing (exit 2)."""


# -- entry point ----------------------------------------------------------------------


def with_key(args: argparse.Namespace) -> None:
    """``--key NAME`` is ``DATA:NAME``: the array of an .npz holding several."""
    if getattr(args, "key", None):
        if not str(args.data).lower().endswith(".npz"):
            raise UsageError(f"--key picks an array of an .npz file; {args.data!r} is not one")
        args.data = f"{args.data}:{args.key}"


def say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "n/a"
    v = float(value)
    return format(v, spec) if math.isfinite(v) else str(v)


def positions_named(flag: str, chosen: Sequence[int | str] | None,
                    header: Sequence[str] | None) -> None:
    """Say, on stderr, which column a number in ``--columns`` or ``--drop`` picks where it
    is also the name of another column of ``header``: numbers are positions, and pandas
    writes ``,0,1,2`` (``--drop 1`` takes the column named ``'0'``, silently, where the
    user may have meant the one named ``'1'``; ``--drop 0`` is how to leave out its
    unnamed index)."""
    for c in chosen or ():
        if (isinstance(c, int) and header is not None and str(c) in header
                and -len(header) <= c < len(header) and header.index(str(c)) != c % len(header)):
            at = header.index(str(c))
            print(f"note: {flag} {c} is position {c} (numbers are positions, from 0), the "
                  f"column named {header[c]!r}; the column named {str(c)!r} is position {at}",
                  file=sys.stderr)
