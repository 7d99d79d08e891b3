"""Seeded train/validation/test splits, lazy for memory-mapped data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..validation import DataError
from .arrays import ArrayLike, LazyTable, Subset, as_numpy, is_lazy, row_hashes
from .checks import validate

__all__ = ["split", "split_indices", "split_counted", "as_tensor", "shuffled_rows",
           "cut_between_copies"]


def split(
    data: ArrayLike, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[ArrayLike, ...]:
    """Split rows at random into parts of the given fractions (train, validation, test).

    One seeded permutation of the rows is cut at ``round(n * cumsum(fractions))``, so the
    parts are disjoint, cover every row and are the same for the same seed and data. The
    copies of a row go to one part (:func:`shuffled_rows`; each cut moves to the nearest
    place between two distinct rows): a copy on each side would let a model that memorizes
    its training rows look good on the held-out ones.

    * ``ndarray`` and ``Tensor`` input: each part is a copy of its rows, in random order.
    * ``np.memmap`` or lazy-table input (:class:`Subset`, :class:`~exactflow.datasets.Shards`):
      each part is a lazy :class:`Subset` holding only its row indices (sorted, for
      sequential disk reads; 8 bytes a row); nothing is read until it is indexed.

    Args:
        data: ``(rows, features)`` data.
        fractions: non-negative fractions summing to 1 (two for train/validation, three for
            train/validation/test, or any number).
        seed: seed of the permutation (a local generator).

    Returns:
        A tuple with one part per fraction.

    Raises:
        ValueError: fractions that are negative or do not sum to 1.
        DataError: data with fewer rows than parts or not 2-D.
    """
    if not isinstance(data, (np.ndarray, Tensor, LazyTable)):
        data = np.asarray(data)
    parts = split_indices(data, fractions, seed)
    if is_lazy(data):
        return tuple(Subset(data, rows=np.sort(p)) for p in parts)  # type: ignore[arg-type]
    if isinstance(data, Tensor):
        return tuple(data[torch.from_numpy(p).to(data.device)] for p in parts)
    arr = np.asarray(data)
    return tuple(arr[p] for p in parts)


def split_indices(
    data: ArrayLike, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> list[np.ndarray]:
    """The row numbers of each part :func:`split` makes (the same arguments, the same
    parts), in the parts' order."""
    return split_counted(data, fractions, seed)[0]


def split_counted(
    data: ArrayLike, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[np.ndarray], int]:
    """:func:`split_indices`, and the number of distinct rows the split found (the rows'
    number where it found no copies, and for lazy data, which it does not read whole)."""
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) < 1 or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    n = len(data)
    if len(data.shape) != 2:
        raise DataError(f"split needs a 2-D array (rows, features), got shape {tuple(data.shape)}")
    if n < len(fr):
        raise DataError(f"cannot split {n} rows into {len(fr)} parts")
    cuts = np.rint(np.cumsum(fr) * n).astype(np.int64)
    cuts[-1] = n
    perm, starts = shuffled_rows(data, rng=np.random.default_rng(seed))
    distinct = n if starts is None else len(starts) - 1
    return np.split(perm, cut_between_copies(cuts[:-1], starts)), distinct


def shuffled_rows(*tables: ArrayLike | None, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """A random order of the rows of ``tables`` (aligned: row ``i`` of each, such as data
    and its context; None entries are left out) in which the copies of a row are adjacent,
    and where each set of copies starts in it (None where every row is distinct: then the
    order is ``rng.permutation(n)``).

    Lazy data (a memmap, a :class:`Subset`, shards) are never read whole for this: their
    order is ``rng.permutation(n)``. Cost for the others: a 64-bit hash of each row and a
    sort of the hashes, O(n log n + n * d); rows whose hashes agree are compared, so the
    copies found are exact ones (2 million rows of 8 columns: about 1 s).
    """
    given = [np.asarray(as_numpy(t)) for t in tables if t is not None and not is_lazy(t)]
    n = len(as_numpy(next(t for t in tables if t is not None)))
    if len(given) == sum(t is not None for t in tables):
        copies = _copies([t.reshape(n, -1) for t in given])
        if copies is not None:
            inverse, counts = copies
            groups = rng.permutation(len(counts))
            rank = np.empty_like(groups)
            rank[groups] = np.arange(len(groups))
            order = np.argsort(rank[inverse], kind="stable")
            return order, np.concatenate([[0], np.cumsum(counts[groups])])
    return rng.permutation(n), None


def _copies(tables: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """The sets of equal rows of the aligned ``tables``: each row's set number and each
    set's size, or None when every row is distinct. Rows are ordered by hash; where two
    distinct rows share one (or the cells are not numbers) by the rows themselves."""
    n, exact = len(tables[0]), False
    if all(t.dtype.kind in "biuf" for t in tables):
        order = np.argsort(hashes := row_hashes(tables))
        same = hashes[order[1:]] == hashes[order[:-1]]
        if not same.any():
            return None
        first, second = order[:-1][same], order[1:][same]
        exact = all((t[first] == t[second]).all() for t in tables)  # (else a collision)
    if not exact:
        order = np.lexsort([t[:, j] for t in tables[::-1] for j in range(t.shape[1])[::-1]])
        same = np.ones(n - 1, dtype=bool)
        for t in tables:
            same &= (t[order[1:]] == t[order[:-1]]).all(axis=1)
        if not same.any():
            return None
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(np.concatenate([[True], ~same])) - 1
    return inverse, np.bincount(inverse)


def cut_between_copies(cuts: np.ndarray, starts: np.ndarray | None) -> np.ndarray:
    """``cuts`` (positions in an order of :func:`shuffled_rows`) moved each to the nearest
    start of a set of copies, so that no set is cut in two."""
    if starts is None:
        return np.asarray(cuts)
    cuts = np.asarray(cuts)
    nearest = np.abs(starts[:, None] - cuts[None, :]).argmin(0)
    return starts[nearest]


def as_tensor(data: ArrayLike, dtype: torch.dtype = torch.float32) -> Tensor:
    """``data`` as a tensor of ``dtype`` (a memmap or :class:`Subset` is read whole: it must
    fit in memory; batch large files by indexing them instead)."""
    if isinstance(data, Tensor):
        return data.to(dtype)
    arr = np.asarray(data)
    if arr.dtype.kind not in "biuf":
        validate(arr)  # names the non-numeric cell
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype, np.float64)
    return torch.from_numpy(np.array(arr, dtype=np_dtype)).to(dtype)
