"""Checks that stop bad data before training, with a :class:`DataError` naming the problem."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..validation import DataError, column_list, counted, nonfinite_rows_error
from .arrays import ArrayLike, as_numpy, chunks, not_rows
from .shards import open_table

__all__ = ["validate", "check_full_rank"]

#: Eigenvalues of the columns' correlation matrix below this count as zero: a column whose
#: variance the others explain but for a share of 1e-12 (a residual of 1e-6 of its spread)
#: is taken as their linear combination. Float64 rounding of an exact copy leaves about
#: 1e-15, float32 sums about 1e-14.
_RANK_TOL = 1e-12


#: The largest magnitude :func:`validate` accepts: a variance of values beyond it (their
#: squares) overflows float64 (1.8e308), and standardizing them fails.
LARGEST_VALUE = 1e150
#: The narrowest spread of a column :func:`validate` accepts: the variance of values that
#: span less (their squared differences) underflows float64 (2.2e-308) to zero or to a
#: number with few digits, and the density comes out wrong (a column in units of 1e-170:
#: test NLL -12.6 where the true one is -387.2).
SMALLEST_SPREAD = 1e-150


def check_full_rank(
    data: ArrayLike, name: str = "data", columns: list[str] | None = None, *,
    first_rows: int | None = None,
) -> None:
    """Raise a :class:`DataError` when the rows of ``data`` span fewer dimensions than it
    has columns: fewer rows than columns, or columns that are (up to rounding) linearly
    dependent, such as a copy of a column or a sum of columns. A density of such data has
    no width across the missing dimension, so its log-likelihood grows without bound as a
    model narrows onto it.

    Cost: O(rows * d^2) for the ``d x d`` correlation matrix, then O(d^3). ``columns``
    names the columns in the message (0-based indices otherwise). With ``first_rows``, the
    first that many rows are checked, and all of them only when those are dependent (an
    exact dependence holds on every row; a table ordered by a column may lack some
    variation in its first rows, which is no reason to refuse it).
    """
    table = as_numpy(data)
    n, d = table.shape
    if d == 1:
        return
    if first_rows is not None and d < first_rows < n:
        try:
            check_full_rank(table[:first_rows], name, columns)
        except DataError:
            pass  # (confirmed or cleared on every row)
        else:
            return
    if n <= d:
        raise DataError(
            f"{name} has {counted(n, 'row')} for {d} columns: the rows span at most "
            f"{counted(n - 1, 'dimension')}, so a density of all {d} columns is "
            "degenerate; add rows or use fewer columns"
        )
    # Two passes over blocks of rows (the mean, then the centered products), never a copy
    # of the whole table, and no cancellation for columns far from zero.
    total, peak = np.zeros(d), np.zeros(d)
    for _, block in chunks(table):
        total += block.sum(axis=0, dtype=np.float64)
        peak = np.maximum(peak, np.abs(block).max(axis=0))
    mean = total / n
    gram = np.zeros((d, d))
    for _, block in chunks(table):
        centered = np.asarray(block, dtype=np.float64) - mean
        gram += centered.T @ centered
    scale = np.sqrt(np.diag(gram))
    varying = np.flatnonzero(scale > 0)  # (constant columns: validate names them)
    if len(varying) < 2:
        return
    corr = gram[np.ix_(varying, varying)] / np.outer(scale[varying], scale[varying])
    eigenvalues, eigenvectors = np.linalg.eigh(corr)
    # Values stored in a short float carry its rounding, relative to a column's spread
    # eps * |largest value| / std (float32 values near 1e4 with a spread of 1: 1e-3).
    dtype = np.dtype(getattr(table, "dtype", np.float64))
    eps = float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0
    rounding = eps * float(np.max(peak[varying] / (scale[varying] / math.sqrt(n))))
    missing = int((eigenvalues <= max(_RANK_TOL, (4.0 * rounding) ** 2)).sum())
    if not missing:
        return
    weights = np.abs(eigenvectors[:, :missing]).max(axis=1)
    involved = varying[weights > 0.01 * weights.max()]
    drop = "one of them" if missing == 1 else f"{missing} of them"
    residual = math.sqrt(max(float(eigenvalues[0]), 0.0))
    closeness = f", to within {residual:.0e} of their spread" if residual > 1e-12 else ""
    raise DataError(
        f"{name}: columns {column_list(involved, columns, most=None)} are linearly "
        f"dependent (a copy, a multiple or a sum of columns{closeness}): the rows lie on a "
        f"plane of {counted(len(varying) - missing, 'dimension')} in {len(varying)}, where "
        f"a density has no width; drop {drop}"
    )


def _first_non_numeric(data: np.ndarray) -> tuple[int, int, Any] | None:
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            try:
                float(data[i, j])
            except (TypeError, ValueError):
                return i, j, data[i, j]
    return None


def validate(
    data: ArrayLike | str | os.PathLike[str],
    features: int | None = None,
    batch_size: int | None = None,
    name: str = "data",
    columns: Sequence[str] | None = None,
) -> ArrayLike:
    """Check that ``data`` can be trained on; raise a :class:`DataError` naming the problem.

    Checks, in order: a 2-D array ``(rows, features)``; not empty; numeric cells; ``features``
    columns; at least ``batch_size`` rows; no NaN or inf (the message lists the first row
    indices); no constant (zero-variance) column (a density has no width there, so its
    log-likelihood is unbounded); no value beyond ``1e150`` in magnitude (its square
    overflows float64), and no column whose values span less than ``1e-150`` (their
    variance underflows). Row and column indices in messages are 0-based array
    indices; a file's cells are checked by :func:`load`, with its line numbers.

    Memory-mapped arrays are checked in chunks of rows, never copied whole.

    Args:
        data: an array, tensor, ``np.memmap``, a lazy table (:class:`Subset`,
            :class:`Shards`), or a path (a folder of shards or a file).
        features: the number of columns the model expects.
        batch_size: the training batch size (the data must hold at least one batch).
        name: how messages call the data (e.g. ``"validation data"``).
        columns: the column names, for messages (0-based indices otherwise).

    Returns:
        ``data`` itself (a path is opened first: :func:`open_table`), so calls can be chained.

    Raises:
        DataError: the first problem found.
    """
    if isinstance(data, (str, os.PathLike)):
        data = open_table(data)
    problem = not_rows(data)
    if problem is not None:
        raise DataError(f"{name}: {problem}")
    arr = as_numpy(data)
    if arr.ndim != 2:
        hint = "; for one feature use data.reshape(-1, 1)" if arr.ndim == 1 else ""
        raise DataError(
            f"{name}: expected a 2-D array (rows, features), got shape {tuple(arr.shape)}{hint}"
        )
    n, d = arr.shape
    if n == 0 or d == 0:
        raise DataError(f"{name} is empty: shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        if arr.dtype.kind == "c":
            raise DataError(f"{name}: complex values are not supported (dtype {arr.dtype})")
        bad = _first_non_numeric(np.asarray(arr))
        if bad is not None:
            i, j, cell = bad
            cell = cell.item() if isinstance(cell, np.generic) else cell
            where = f"column index {j}" if columns is None else f"column {columns[j]!r}"
            raise DataError(f"{name}: non-numeric cell {cell!r} at row index {i}, {where}")
        arr = np.asarray(arr, dtype=np.float64)
    if features is not None and d != features:
        raise DataError(f"{name}: expected {features} columns (features), got {d}")
    if batch_size is not None and n < batch_size:
        raise DataError(
            f"{name} has {counted(n, 'row')}, fewer than one batch (batch_size={batch_size}): "
            "lower batch_size or add data"
        )

    bad_rows: list[int] = []
    n_bad = 0
    lo = np.full(d, np.inf)
    hi = np.full(d, -np.inf)
    for start, block in chunks(arr):
        if block.dtype.kind == "f":
            row_ok = np.isfinite(block).all(axis=1)
            if not row_ok.all():
                idx = np.flatnonzero(~row_ok)
                n_bad += len(idx)
                bad_rows.extend((start + idx[: max(5 - len(bad_rows), 0)]).tolist())
        if not n_bad:  # column ranges, for the constant-column check
            lo = np.minimum(lo, block.min(axis=0))
            hi = np.maximum(hi, block.max(axis=0))
    if n_bad:
        raise nonfinite_rows_error(name, n_bad, bad_rows)
    if n > 1:
        constant = np.flatnonzero(lo == hi)
        if len(constant):
            raise DataError(
                f"{name}: constant (zero-variance) {_named(constant, columns, d)}: a density "
                "has no width "
                "there; drop them (or, if the "
                "columns hold integers such as pixel values or counts, dequantize: add "
                "uniform noise in [0, 1) to every integer column)"
            )
    size = np.maximum(np.abs(lo), np.abs(hi))
    huge = np.flatnonzero(size > LARGEST_VALUE)
    if len(huge):
        raise DataError(
            f"{name}: {_named(huge, columns, d)} {'holds' if len(huge) == 1 else 'hold'} "
            "values up to "
            f"{float(size[huge].max()):.3g}, beyond "
            f"{LARGEST_VALUE:.0e}: their squares (in variances and products) overflow "
            "float64; rescale them (divide by a power of ten) or take their logarithm"
        )
    narrow = np.flatnonzero((hi - lo) < SMALLEST_SPREAD) if n > 1 else np.zeros(0, int)
    if len(narrow):
        raise DataError(
            f"{name}: the values of {_named(narrow, columns, d)} span less than "
            f"{SMALLEST_SPREAD:.0e} "
            f"(down to {float((hi - lo)[narrow].min()):.3g}): their variance underflows "
            "float64 and the density would be wrong; rescale them (multiply by a power of ten)"
        )
    return data


def _named(indices: np.ndarray, columns: Sequence[str] | None, d: int) -> str:
    """``"column 'b'"`` or ``"columns 1, 3 (column indices)"``: the columns a message names
    (by name where ``columns`` names all ``d``)."""
    which = column_list(indices, columns if columns and len(columns) == d else None)
    return f"{'column' if len(indices) == 1 else 'columns'} {which}"
