"""Argument checks shared by the whole package: one home for each rule and its message.

Every public function that takes a size, a count, a rate or a choice checks it here, so a
bad argument gets the same clear ``ValueError`` wherever it is passed (never a deep torch
error later); :func:`warn_user` points a warning at the user's own line.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "DataError",
    "nonfinite_rows_error",
    "index_list",
    "counted",
    "column_list",
    "FilePositions",
    "training_rows_error",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "fraction",
    "choice",
    "hidden_sizes",
    "seed_value",
    "warn_user",
]

T = TypeVar("T")

#: The package folder: frames of files in it are exactflow's own (:func:`warn_user`).
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

#: How many offending rows or cells an error message lists before "...".
SHOW = 5


class DataError(ValueError):
    """Data that a flow cannot be trained on or scored, or a data file that cannot be read.

    The message names the problem and where it is (rows, columns, file lines).
    """


def counted(n: int, noun: str) -> str:
    """``"1 row"``, ``"2 rows"``: a number and its noun (plural by an ``s``)."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def index_list(indices: Iterable[int], total: int) -> str:
    """The first few of ``indices`` as ``"3, 7, 9, ..."`` (the dots when ``total`` is more)."""
    shown = [str(int(i)) for i in list(indices)[:SHOW]]
    return ", ".join(shown) + (", ..." if total > len(shown) else "")


class FilePositions(list[str]):
    """Labels of columns picked by position from a file without a header (``--columns``,
    ``--drop``): each one's index in the file, so that messages name the file's columns,
    not positions among the picked ones (:func:`column_list` says which they are)."""

    @classmethod
    def of(cls, picked: Sequence[int | str] | None) -> FilePositions | None:
        """The labels of ``picked`` positions (None unless all are positions)."""
        if not picked or not all(isinstance(c, int) for c in picked):
            return None
        return cls(str(c) for c in picked)


def column_list(
    indices: Iterable[int], columns: Sequence[str] | None = None, most: int | None = SHOW
) -> str:
    """Columns for a message: by name (``'a', 'b'``) where ``columns`` names them, else as
    0-based indices said to be such (of the file, with :class:`FilePositions`); the first
    ``most`` of them (all with ``None``), then dots."""
    chosen = [int(i) for i in indices]
    shown = chosen if most is None else chosen[:most]
    positions = columns is None or isinstance(columns, FilePositions)
    listed = ", ".join(str(i) if columns is None else columns[i] if positions
                       else repr(columns[i]) for i in shown)
    listed += ", ..." if len(chosen) > len(shown) else ""
    if not positions:
        return listed
    return f"{listed} (column indices{' in the file' if columns is not None else ''})"


def not_a_flow(caller: str, given: Any) -> TypeError:
    """The error for ``caller`` given something that is not an exactflow ``Flow``."""
    hint = ""
    if hasattr(given, "_orig_mod"):  # (what torch.compile returns)
        hint = ("; pass the flow itself, not torch.compile(flow) (the compiled module holds "
                "it as ._orig_mod; ef.fit(flow, x, compile=True) trains it compiled)")
    return TypeError(f"{caller} expects an exactflow Flow, got {type(given).__name__}{hint}")


def nonfinite_rows_error(name: str, count: int, rows: Iterable[int]) -> DataError:
    """The error for ``count`` rows holding NaN or inf, listing the first row indices."""
    return DataError(
        f"{name}: NaN or inf in {counted(count, 'row')} (row indices "
        f"{index_list(rows, count)}); drop or impute them"
    )


def training_rows_error(held: str, rows: int, columns: int) -> DataError:
    """The error for a split that leaves ``rows`` training rows for ``columns`` columns,
    after holding out ``held`` (e.g. ``"2 validation rows"``)."""
    return DataError(
        f"after holding out {held}, {counted(rows, 'training row')} remain for {columns} "
        "columns: too few for a density of every column; add rows or use fewer columns"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` if it is an integer >= 1, else ``ValueError`` naming ``name``."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` if it is an integer >= 0, else ``ValueError`` naming ``name``."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def positive_float(value: Any, name: str) -> float:
    """``value`` as a ``float`` if it is a finite number > 0, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def non_negative_float(value: Any, name: str) -> float:
    """``value`` as a ``float`` if it is a finite number >= 0, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(float(value)) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def fraction(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a ``float`` in ``(0, 1)`` (``[0, 1)`` with ``allow_zero``)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    low_ok = ok and (value >= 0 if allow_zero else value > 0)
    if not (ok and low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def choice(value: T, name: str, options: Iterable[T]) -> T:
    """``value`` if it is one of ``options``, else ``ValueError`` listing them."""
    options = tuple(options)
    if value not in options:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}"
        )
    return value


def hidden_sizes(hidden: Sequence[int] | int, name: str = "hidden") -> tuple[int, ...]:
    """Hidden layer sizes as a tuple of positive ints (an int is one layer)."""
    if _is_int(hidden):
        hidden = (int(hidden),)  # type: ignore[arg-type]
    message = f"{name} must be a sequence of positive integers, got {hidden!r}"
    try:
        sizes = tuple(hidden)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(message) from None
    if any(not _is_int(h) or h < 1 for h in sizes):
        raise ValueError(message)
    return tuple(int(h) for h in sizes)


def device_named(device: Any, name: str = "device") -> Any:
    """``device`` as a ``torch.device``, refused with a ValueError when torch does not know
    the name or this machine has no such device (torch raises deep inside a later call)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got "
                         f"{device!r}") from None
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps}.get(dev.type)
    if dev.type != "cpu" and (backend is None or not backend.is_available()):
        raise ValueError(f"{name}={str(device)!r} was requested but this machine has no "
                         f"{dev.type.upper()} device (torch sees: cpu"
                         f"{', cuda' if torch.cuda.is_available() else ''}"
                         f"{', mps' if torch.backends.mps.is_available() else ''})")
    return dev


def seed_value(value: Any, name: str = "seed") -> int:
    """A seed: an integer from 0 to ``2**63 - 1`` (torch's generators take 64 bits)."""
    if not _is_int(value) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be an integer from 0 to 2**63 - 1, got {value!r}")
    return int(value)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside exactflow: the line of the
    user's that led to it, however deep in the package it was found."""
    level, frame = 2, sys._getframe(1)  # (stacklevel 2: warn_user's caller)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


def not_a_pair(returned: Any, layer: str, direction: str) -> TypeError:
    """The error for a layer whose ``forward`` or ``inverse`` did not return the pair
    ``(output, log_det)`` (a layer returning only ``z`` is unpacked row by row otherwise,
    into a confusing shape error, or none for a batch of two)."""
    shape = getattr(returned, "shape", None)
    if isinstance(returned, (tuple, list)) and len(returned) == 2:
        what = "a pair of " + " and ".join(type(r).__name__ for r in returned)
    elif shape is not None:
        what = f"a {type(returned).__name__} of shape {tuple(shape)}"
    else:
        what = f"a {type(returned).__name__}" + (
            f" of {len(returned)} items" if isinstance(returned, tuple) else "")
    return TypeError(f"{layer}.{direction} returned {what}; a layer returns the pair (output, "
                     "log_det): the output, shaped like its input, and a tensor of one log-det "
                     "per row, shape (batch,)")
