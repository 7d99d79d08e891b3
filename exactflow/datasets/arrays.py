"""Array views for data larger than memory: lazy row/column subsets and chunked reads.

Every function that walks over data does so in chunks of :data:`CHUNK_ROWS` rows, so a
memory-mapped array larger than memory is checked, split and standardized without being
copied whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["CHUNK_ROWS", "LazyTable", "Subset", "ArrayLike", "is_lazy", "as_numpy", "chunks",
           "not_rows",
           "mix64", "row_hashes"]

#: Rows per chunk when a function walks over (possibly memory-mapped) data.
CHUNK_ROWS = 65536


class LazyTable:
    """A read-only 2-D table whose rows are read from disk on demand.

    The protocol every consumer of data in exactflow relies on (training, evaluation,
    checks, standardization, splits): ``len``, ``shape``, ``ndim``, ``dtype``, and
    ``table[i]`` / ``table[i:j]`` / ``table[index_array]``, which read only those rows and
    return an ``ndarray``. ``np.asarray(table)`` reads all of it: only do this when it fits
    in memory. :class:`Subset` (rows or columns of one array) and
    :class:`~exactflow.datasets.Shards` (many files as one table) are the two kinds.
    """

    @property
    def shape(self) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


class Subset(LazyTable):
    """Selected rows and/or columns of an array, read lazily (for memory-mapped data).

    ``split`` returns these for ``np.memmap`` input and ``load`` for a column selection of a
    memory-mapped ``.npy`` that is not a plain slice, so that nothing is read whole. Rows are
    kept in increasing file order (sequential reads); shuffle when batching.

    It behaves like a read-only 2-D array for what training needs: ``len``, ``shape``,
    ``ndim``, ``dtype``, ``subset[i]``/``subset[i:j]``/``subset[index_array]`` (reads only those
    rows, returns an ``ndarray``) and ``np.asarray(subset)`` (reads all of it: only do this when
    it fits in memory).

    Args:
        base: the underlying array (``np.memmap`` or ``ndarray``), 2-D.
        rows: row indices into ``base`` (``None``: all rows).
        columns: column indices into ``base`` (``None``: all columns).
    """

    base: np.ndarray | LazyTable
    rows: np.ndarray | None
    columns: np.ndarray | None

    def __init__(
        self,
        base: np.ndarray | LazyTable,
        rows: np.ndarray | None = None,
        columns: np.ndarray | None = None,
    ) -> None:
        if isinstance(base, Subset):
            rows = base.rows if rows is None else (
                np.asarray(rows) if base.rows is None else base.rows[np.asarray(rows)]
            )
            columns = base.columns if columns is None else (
                np.asarray(columns) if base.columns is None else base.columns[np.asarray(columns)]
            )
            base = base.base
        if base.ndim != 2:
            raise ValueError(f"Subset needs a 2-D array, got shape {tuple(base.shape)}")
        self.base = base
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.base.shape[0] if self.rows is None else len(self.rows)
        d = self.base.shape[1] if self.columns is None else len(self.columns)
        return (n, d)

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, tuple):
            raise TypeError("Subset takes row indices only (a slice, an int or an index array)")
        if self.rows is None:
            out = self.base[index]
        else:
            out = self.base[self.rows[index]]
        out = np.asarray(out)
        if self.columns is not None:
            out = out[..., self.columns]
        return out

    def __repr__(self) -> str:
        return f"Subset(shape={self.shape}, dtype={self.dtype}, base={type(self.base).__name__})"


ArrayLike = np.ndarray | Tensor | LazyTable


def is_lazy(data: Any) -> bool:
    """Whether ``data`` is read from disk on demand (a memmap or a :class:`LazyTable`)."""
    return isinstance(data, (np.memmap, LazyTable))


def as_numpy(data: Any) -> np.ndarray | LazyTable:
    """A numpy view of ``data`` (no copy for arrays, memmaps, lazy tables and CPU tensors)."""
    if isinstance(data, (np.ndarray, LazyTable)):
        return data
    if isinstance(data, Tensor):
        return data.detach().cpu().numpy()
    return np.asarray(data)


def not_rows(data: Any) -> str | None:
    """What to tell a user who gave a container of tables where rows belong (a DataLoader,
    a TensorDataset, a tuple of tensors, a dict, a generator); None for anything else,
    which ``np.asarray`` then reads as rows (arrays, tensors, tables, lists of rows, other
    sequences of rows)."""
    if isinstance(data, (np.ndarray, Tensor, LazyTable)) or hasattr(data, "__array__"):
        return None
    kind = type(data).__name__
    if isinstance(data, (tuple, list)):
        if not any(getattr(item, "ndim", 0) >= 2 for item in data):
            return None  # (rows: lists or 1-D tensors)
        return (f"a {kind} of tables is not rows: give one table of shape (rows, "
                "features), or join them first (torch.cat, np.concatenate)")
    if isinstance(getattr(data, "tensors", None), tuple):  # (a TensorDataset)
        return (f"a {kind} is not rows: give its tensor of shape (rows, features) "
                "(dataset.tensors[0])")
    if (isinstance(data, (Mapping, Iterator))
            or (hasattr(data, "dataset") and hasattr(data, "batch_size"))):  # (a DataLoader)
        return (f"a {kind} is not rows: give the rows themselves (a tensor, an array, a "
                "memory-mapped file), which are batched here")
    return None


def column_names(table: Any) -> list[str] | None:
    """The names of the columns of a table that has them (a pandas DataFrame), else None."""
    if isinstance(table, (np.ndarray, Tensor, LazyTable)):
        return None
    names = getattr(table, "columns", None)
    return None if names is None else [str(c) for c in names]


def chunks(data: np.ndarray | LazyTable) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block)`` with ``block = data[start:start + CHUNK_ROWS]`` as an ndarray."""
    n, rows = len(data), CHUNK_ROWS
    for start in range(0, n, rows):
        yield start, np.asarray(data[start : start + rows])


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 (wrapping arithmetic): a bijection that scatters
    nearby inputs over all 64 bits."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_hashes(tables: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """A 64-bit hash of each row of the aligned 2-D ``tables``, a function of ``seed`` and
    the row's values as float64 alone (``-0.0`` as ``0.0``): :func:`mix64` of the hash so
    far and each column's bits in turn."""
    h = mix64(np.full(len(tables[0]), seed & (2**64 - 1), dtype=np.uint64))
    for table in tables:
        for j in range(table.shape[1]):
            h = mix64(h ^ (np.asarray(table[:, j], dtype=np.float64) + 0.0).view(np.uint64))
    return h

