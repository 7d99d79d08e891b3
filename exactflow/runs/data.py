"""The data a run trains on: built-in data sets, files and arrays, read into float64 rows."""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..datasets import (
    TOY_ENTROPY,
    TOYS,
    Shards,
    column_names,
    digits,
    load,
    read_cells,
    read_header,
    row_lines,
    toy,
    validate,
)
from ..datasets.arrays import mix64, row_hashes
from ..datasets.files import split_key
from ..datasets.shards import is_shards
from ..datasets.splits import split_counted
from ..validation import DataError, index_list, warn_user

__all__ = ["read_data", "versions", "BUILTIN", "integer_columns", "dequantize", "split_rows"]

#: Names of the built-in data sets :func:`read_data` accepts besides files.
BUILTIN = (*TOYS, "digits")


def read_data(
    spec: Any, columns: Sequence[int | str] | None = None, *, samples: int = 20000, seed: int = 0,
    missing: str = "error", finite: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows named by ``spec`` as a float64 array, with a description of their source.

    ``spec`` is a toy name (:data:`exactflow.datasets.TOYS`, ``samples`` points drawn with
    ``seed``), ``"digits"`` (scikit-learn's 8x8 digits, dequantized), a path to a CSV,
    ``.npy`` or ``.npz`` file (``columns`` picks columns by header name or index), or an
    array of rows (a pandas DataFrame keeps its column names, and ``columns`` may name
    them). ``missing="nan"`` reads a CSV's missing values as NaN (``datasets.load``);
    ``finite=True`` refuses a CSV's ``inf`` (or overflowing) cell by its line and column, as
    training must (scoring keeps it: a density of zero there).

    Raises:
        DataError: a missing or unreadable file, or columns that do not fit.
    """
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text in TOYS and not Path(text).exists():
            if columns is not None:
                raise DataError(f"columns do not apply to the toy dataset {text!r}")
            arr = toy(text, samples, seed=seed).double().numpy()
            return arr, {"source": "toy", "name": text, "path": None, "columns": None,
                         "column_names": None, "samples": samples, "seed": seed,
                         "entropy": TOY_ENTROPY.get(text)}
        if text == "digits" and not Path(text).exists():
            if columns is not None:
                raise DataError("columns do not apply to the built-in digits dataset")
            arr = digits(seed=seed)
            return arr, {"source": "builtin", "name": "digits", "path": None, "columns": None,
                         "column_names": [f"pixel{i}" for i in range(arr.shape[1])],
                         "seed": seed, "entropy": None}
        return _read_file(Path(text), columns, missing, finite)
    names = column_names(spec)
    arr = np.asarray(spec)
    if arr.dtype.kind not in "biuf":
        validate(arr, name="array", columns=names)  # names the non-numeric cell
    arr = np.array(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise DataError(f"array: expected a 2-D array (rows, features), got shape "
                        f"{tuple(arr.shape)}")
    if columns is not None:
        picked = [_column_index(c, names) for c in columns]
        arr = arr[:, picked]
        names = None if names is None else [names[j] for j in picked]
    _unique_names(names, "array")
    return arr, {"source": "array", "name": "array", "path": None, "columns": None,
                 "column_names": names, "entropy": None}


def without_missing(rows: np.ndarray, info: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """``rows`` without those holding a NaN (a missing value read as NaN), and a note of
    how many and which (none: no note); ``info["missing_rows"]`` records the count.

    Raises:
        DataError: every row has a missing value.
    """
    holes = np.flatnonzero(np.isnan(rows).any(axis=1))
    info["missing_rows"] = int(len(holes))
    if not len(holes):
        return rows, []
    if len(holes) == len(rows):
        raise DataError(f"every row of {info['name']} has a missing value: none to train on")
    note = (f"{len(holes):,} of the {len(rows):,} rows of {info['name']} have a missing value "
            f"and are left out (rows {index_list(holes, len(holes))}, counting data rows "
            "from 0)")
    return np.delete(rows, holes, axis=0), [note]


def _unique_names(names: list[str] | None, name: str) -> None:
    """Refuse a column name given twice: a run matches columns by name when it scores."""
    twice = sorted({c for c in names if names.count(c) > 1}) if names else []
    if twice:
        raise DataError(f"{name}: the columns are named {', '.join(map(repr, twice))} more than "
                        "once; rename them (a run finds its columns by name when it scores)")


def _column_index(column: int | str, names: list[str] | None) -> int:
    if isinstance(column, str):
        if names is None or column not in names:
            known = "the array has no column names" if names is None else f"it has {names}"
            raise DataError(f"no column {column!r} ({known})")
        return names.index(column)
    return int(column)


def _read_file(
    path: Path, columns: Sequence[int | str] | None, missing: str = "error",
    finite: bool = False,
) -> tuple[np.ndarray, dict]:
    file, _ = split_key(path)  # "data.npz:name" picks one array of an .npz
    if not Path(file).exists():
        raise DataError(
            f"{str(path)!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor an "
            "existing file"
        )
    lazy = is_shards(file)
    table = Shards(str(path), columns=columns) if lazy else load(path, columns=columns,
                                                                  missing=missing)
    arr = np.asarray(table)  # (shards, a Parquet file: read whole, as every file here)
    if arr.dtype.kind not in "biuf":
        validate(arr, name=path.name)
    arr = np.array(arr, dtype=np.float64)  # a writable in-memory copy (memmaps are read-only)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise DataError(f"{path.name}: expected a 2-D array (rows, features), got shape "
                        f"{tuple(arr.shape)}")
    header = table.column_names if isinstance(table, Shards) else read_header(path)
    if columns is not None and header:
        names: list[str] | None = [
            str(c) if isinstance(c, str) else header[c] for c in columns
        ]
    elif columns is not None:  # (no names to match by: the columns are matched by position)
        names = None
    else:
        names = header if header and arr.ndim == 2 and len(header) == arr.shape[1] else None
    _unique_names(names, path.name)
    if finite and not lazy and not isinstance(arr, np.memmap) and np.isinf(arr).any():
        _refuse_infinite(path, arr, columns, header)
    info = {"source": "file", "name": path.name, "path": str(path.resolve()),
            "columns": list(columns) if columns is not None else None, "column_names": names,
            "entropy": None}
    return arr, info


def _refuse_infinite(
    path: Path, arr: np.ndarray, columns: Sequence[int | str] | None, header: list[str] | None
) -> None:
    """Name the first infinite cell of a text table by its file line and column."""
    if path.suffix.lower() not in (".csv", ".tsv", ".txt", ".dat"):
        return  # (.npy and .npz rows: validate names them by index)
    bad = np.argwhere(np.isinf(arr))
    i, j = (int(v) for v in bad[0])
    column = columns[j] if columns is not None else j
    if header:
        k = header.index(column) if isinstance(column, str) else int(column) % len(header)
        where = f"column {k + 1} ({header[k]!r})"
    else:
        k = int(column)
        where = f"column {k + 1}" if k >= 0 else f"column {k} (counted from the end)"
    rows = int(np.isinf(arr).any(axis=1).sum())
    more = f"; {rows} rows hold one" if rows > 1 else ""
    fix = "those rows or replace the values" if rows > 1 else "that row or replace the value"
    cell = read_cells(path, [column])[i][0]
    read = "" if cell.lower().lstrip("+-") in ("inf", "infinity") else f" (read as {arr[i, j]:g})"
    raise DataError(
        f"{path.name}: {cell!r}{read} at line {row_lines(path)[i]}, {where}{more}: a density "
        f"needs finite values; drop {fix}"
    )


def versions() -> dict[str, str]:
    """The versions a run records: exactflow, torch, numpy, Python and the platform."""
    return {
        "exactflow": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


def integer_columns(rows: np.ndarray) -> list[int]:
    """The columns whose every value is an integer (counts, ratings, pixel levels...).

    A continuous density on such a column is unbounded (it can pile its mass onto the
    integers), so its log-likelihood means nothing until the column is dequantized.
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or len(rows) == 0:
        return []
    # (beyond 2^53 every float64 is an integer: such a column is continuous data)
    whole = np.all((rows == np.round(rows)) & (np.abs(rows) <= 2.0**53), axis=0)
    return [int(j) for j in np.flatnonzero(whole)]


def dequantize(
    rows: np.ndarray, columns: Sequence[int], seed: int = 0, keyed: bool = False
) -> np.ndarray:
    """``rows`` with uniform noise in ``[0, 1)`` added to ``columns`` (a copy; seeded).

    For integer data ``k``, the density ``p`` of ``k + u`` with ``u ~ U[0, 1)`` gives a lower
    bound of the discrete log-probability, ``log P(k) >= E_u[log p(k + u)]`` (Theis, van den
    Oord & Bethge 2016, arXiv:1511.01844): the log-densities of dequantized rows are that
    bound, in nats.

    With ``keyed=True`` each row's noise is a hash of its own values and ``seed`` (still
    uniform over rows), not the next draws of a stream: a row gets the same noise wherever
    it sits in a file, so scoring it twice, or among other rows, gives one log-density.
    Identical rows then share one draw: a mean over many copies of few distinct rows keeps
    the spread of those few draws.
    """
    if not columns:
        return rows
    out = np.array(rows, dtype=np.float64, copy=True)
    cols = list(columns)
    if keyed:
        out[:, cols] += _keyed_uniforms(out, len(cols), seed)
    else:
        rng = np.random.default_rng([seed, 0xDE0])
        out[:, cols] += rng.random((len(out), len(cols)))
    return out


def dequantize_to_score(rows: np.ndarray, columns: Sequence[int], seed: int = 0,
                        names: Sequence[str] | None = None, where: str = "") -> np.ndarray:
    """Rows to score with a model trained on dequantized ``columns``: those columns get
    keyed noise (:func:`dequantize` with ``keyed=True``, so a row scores the same wherever
    it is). Warns when the rows hold non-integers there (they would get noise again);
    ``where`` says where the dequantized rows are, for the warning."""
    cols = list(columns)
    part = rows[:, cols]
    if cols and bool((np.isfinite(part) & (part != np.floor(part))).any()):
        named = [names[c] for c in cols] if names else cols
        warn_user(
            f"the model was trained on the integer columns {named} dequantized (integers "
            "plus uniform noise) and these rows hold other values there, which get noise "
            f"added again: score the raw integer rows{f' ({where})' if where else ''}"
        )
    return dequantize(rows, cols, seed, keyed=True)


def _keyed_uniforms(rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``(n, k)`` numbers in ``[0, 1)``, each row's a function of that row's values and
    ``seed`` alone."""
    h = row_hashes([rows], seed)
    with np.errstate(over="ignore"):
        draws = [mix64(h + np.uint64(j + 1)) >> np.uint64(11) for j in range(k)]
    return np.stack(draws, axis=1).astype(np.float64) * 2.0**-53


def split_rows(rows: np.ndarray, fractions: Sequence[float], seed: int,
               recorded: dict[str, Any] | None = None) -> tuple[list[np.ndarray], int]:
    """The row numbers of the train, validation and test parts of ``rows`` and the number
    of distinct rows (:func:`~exactflow.datasets.split_counted`), and a digest of the parts
    in ``recorded["split"]`` where given: a run resumed on a split other than the one it
    started on is refused, as its test rows would not be held out any more."""
    parts, distinct = split_counted(rows, fractions, seed=seed)
    if recorded is not None:
        digest = hashlib.sha256()
        for part in parts:
            digest.update(np.asarray(part, dtype="<i8").tobytes() + b"|")
        recorded["split"] = digest.hexdigest()[:16]
    return parts, distinct


def stored_parts(**parts: np.ndarray) -> dict[str, Any]:
    """The split's parts as the run folder stores them: in float32 where every value is
    exactly a float32 (data read from a float32 file), so the file is half the size and
    :meth:`~exactflow.runs.Run.data` gives back the same float64 values; else float64."""
    if all(np.array_equal(part, part.astype(np.float32)) for part in parts.values()):
        return {name: part.astype(np.float32) for name, part in parts.items()}
    return parts


def split_changed(n: int, fractions: Sequence[float], seed: int,
                  before: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether the split recorded in ``before`` (a run's ``data``) of ``n`` rows differs
    from ``now``'s.
    A run written before splits were recorded put repeated rows elsewhere than today's
    split does; its split is today's only when the rows are distinct (both are then one
    seeded permutation of the rows, cut at the same places)."""
    if "split" in before:
        return bool(before["split"] != now.get("split"))
    plain: dict[str, Any] = {}
    split_rows(np.arange(n)[:, None], fractions, seed, plain)
    return bool(plain["split"] != now.get("split"))
