"""What every command shares: the errors users can fix, and printing for text mode."""

from __future__ import annotations

import argparse
import math
from typing import Any

__all__ = ["CommandError", "UsageError", "with_key", "say", "fmt"]


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
