"""Seeded train/validation/test splits, lazy for memory-mapped data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..validation import DataError
from .arrays import ArrayLike, LazyTable, Subset, is_lazy
from .checks import validate

__all__ = ["split", "as_tensor"]


def split(
    data: ArrayLike, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[ArrayLike, ...]:
    """Split rows at random into parts of the given fractions (train, validation, test).

    One seeded permutation of the rows is cut at ``round(n * cumsum(fractions))``, so the
    parts are disjoint, cover every row and are the same for the same seed and data length.

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
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) < 1 or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    if not isinstance(data, (np.ndarray, Tensor, LazyTable)):
        data = np.asarray(data)
    n = len(data)
    if len(data.shape) != 2:
        raise DataError(f"split needs a 2-D array (rows, features), got shape {tuple(data.shape)}")
    if n < len(fr):
        raise DataError(f"cannot split {n} rows into {len(fr)} parts")
    cuts = np.rint(np.cumsum(fr) * n).astype(np.int64)
    cuts[-1] = n
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.split(perm, cuts[:-1])
    if is_lazy(data):
        return tuple(Subset(data, rows=np.sort(p)) for p in parts)  # type: ignore[arg-type]
    if isinstance(data, Tensor):
        return tuple(data[torch.from_numpy(p).to(data.device)] for p in parts)
    arr = np.asarray(data)
    return tuple(arr[p] for p in parts)


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
