"""Training data a batch at a time: row access that never reads lazy data whole, the
validation rows held out of it, a shuffled order that a checkpoint can resume exactly, and
batches moved to the device."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..datasets import (
    LazyTable,
    Shards,
    Subset,
    column_names,
    cut_between_copies,
    open_table,
    shuffled_rows,
    validate,
)
from ..datasets.arrays import not_rows, row_hashes
from ..distributions import tensor_of
from ..validation import (
    DataError,
    counted,
    nonfinite_rows_error,
    training_rows_error,
    warn_user,
)

__all__ = ["Rows", "Order", "wrap", "wrap_context", "hold_out", "to_device", "width_of",
           "IN_MEMORY_SHUFFLE_ROWS", "default_batch_size"]

# Rows per chunk when scanning arrays (finiteness checks, evaluation of memmaps).
SCAN_ROWS = 65536


class Rows:
    """Rows of a 2-D tensor, array, ``np.memmap``, lazy table
    (:class:`~exactflow.datasets.Subset`, :class:`~exactflow.datasets.Shards`) or path,
    gathered a batch at a time.

    Lazy data is never read whole: a batch copies only its own rows (indices sorted, for
    locality) and the checks scan it chunk by chunk. A path is opened with
    :func:`exactflow.datasets.open_table` (a folder of ``.npy`` or Parquet shards, or a file).

    With ``strict`` (training and validation data) the data must pass
    :func:`exactflow.datasets.validate` (2-D, numeric, ``features`` columns, at least
    ``batch_size`` rows, no NaN/inf, no constant column); otherwise (data to evaluate,
    contexts) only the shape, the dtype and finiteness are checked.
    """

    def __init__(
        self,
        data: Any,
        name: str,
        features: int,
        *,
        strict: bool = False,
        batch_size: int | None = None,
    ) -> None:
        if isinstance(data, (str, os.PathLike)):
            data = open_table(data)
        problem = not_rows(data)
        if problem is not None:
            raise DataError(f"{name}: {problem}")
        if strict:  # (a DataFrame's columns are named in messages)
            validate(data, features=features, batch_size=batch_size, name=name,
                     columns=column_names(data))
        if isinstance(data, Tensor):
            if data.is_complex():
                raise DataError(f"{name}: complex values are not supported (dtype {data.dtype})")
            array: Any = data.detach()
        elif isinstance(data, (np.ndarray, LazyTable)):
            array = data
        else:
            try:
                array = np.asarray(data)
            except (TypeError, ValueError) as err:
                raise DataError(f"{name} cannot be read as a numeric array: {err}") from None
        if not isinstance(array, Tensor) and array.dtype.kind not in "biuf":
            if strict:  # validate accepted it: numeric cells stored as text or objects
                array = np.asarray(array, dtype=np.float64)
            else:
                raise DataError(
                    f"{name} must be numeric, got an array of dtype {array.dtype} (load "
                    "tabular files with exactflow.datasets.load, which names bad cells)"
                )
        if array.ndim != 2:
            raise DataError(f"{name} must be 2-D (rows, features), got shape {tuple(array.shape)}")
        if array.shape[1] != features:
            takes = "takes a context of" if "context" in name else "has"
            raise DataError(
                f"{name} has {array.shape[1]} columns but the flow {takes} {features} features"
            )
        if array.shape[0] == 0:
            raise DataError(f"{name} has no rows")
        self.data = array
        self.name = name
        #: The rows' numbers in the data they were taken from (:meth:`subset`); None: all.
        self.origin: np.ndarray | None = None
        if not strict:
            self._check_finite()

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def _check_finite(self) -> None:
        bad: list[int] = []
        count = 0
        for start, chunk in self.chunks(SCAN_ROWS):
            if not chunk.is_floating_point():
                continue
            rows = (~torch.isfinite(chunk).all(1)).nonzero().flatten().cpu()
            count += rows.numel()
            bad.extend(int(r) + start for r in rows[: max(0, 5 - len(bad))])
        if count:
            raise nonfinite_rows_error(self.name, count, bad)

    def digest(self, rows: int = 4096) -> str:
        """A short fingerprint of the rows: their count, width and the values of up to
        ``rows`` of them taken evenly (a checkpoint records it, so that a resume on other
        data of the same size is refused; lazy data are read at those rows only)."""
        index = torch.from_numpy(np.unique(np.linspace(0, len(self) - 1, min(rows, len(self)))
                                           .astype(np.int64)))
        values = self.take(index).detach().cpu().double().numpy()
        words = row_hashes([values]).tobytes() + repr(tuple(self.data.shape)).encode()
        return hashlib.sha256(words).hexdigest()[:16]

    def take(self, index: Tensor) -> Tensor:
        """The rows at ``index`` (a 1-D long tensor on the CPU), as a tensor."""
        if isinstance(self.data, Tensor):
            return self.data[index.to(self.data.device)]
        rows = np.asarray(self.data[index.numpy()])
        return torch.from_numpy(np.ascontiguousarray(rows))

    def chunks(self, size: int) -> Iterator[tuple[int, Tensor]]:
        """Consecutive slices of at most ``size`` rows, as tensors."""
        for start in range(0, len(self), size):
            part = self.data[start : start + size]
            if not isinstance(part, Tensor):
                part = tensor_of(np.ascontiguousarray(np.asarray(part)))
            yield start, part

    def share(self, lo: int, hi: int) -> Rows:
        """Rows ``lo:hi`` as a new :class:`Rows`, without reading them."""
        if isinstance(self.data, Shards):  # a view of consecutive rows: no index array
            out = object.__new__(Rows)
            out.data, out.name = self.data.slice(lo, hi), self.name
            return out
        return self.subset(np.arange(lo, hi))

    def subset(self, index: np.ndarray, name: str | None = None) -> Rows:
        """The rows at ``index`` (sorted row numbers) as a new :class:`Rows`, already checked:
        lazy data stays lazy (nothing is read), arrays and tensors are copied."""
        data = self.data
        if isinstance(data, Tensor):
            part: Any = data[torch.from_numpy(np.asarray(index)).to(data.device)]
        elif isinstance(data, (np.memmap, LazyTable)):
            part = Subset(data, rows=np.asarray(index))
        else:
            part = np.asarray(data)[index]
        out = object.__new__(Rows)
        out.data, out.name = part, self.name if name is None else name
        index = np.asarray(index)
        out.origin = index if self.origin is None else self.origin[index]
        return out


def wrap(
    data: Any,
    name: str,
    features: int,
    rows: int | None = None,
    *,
    strict: bool = False,
    batch_size: int | None = None,
) -> Rows:
    """``data`` as :class:`Rows` (checked), optionally with exactly ``rows`` rows."""
    wrapped = data if isinstance(data, Rows) else Rows(
        data, name, features, strict=strict, batch_size=batch_size
    )
    if rows is not None and len(wrapped) != rows:
        raise DataError(
            f"{name} has {len(wrapped)} rows but the data has {rows}; give one per data row"
        )
    return wrapped


def wrap_context(flow: Any, context: Any, name: str, rows: int, hint: str = "") -> Rows | None:
    """The context rows of a conditional flow (``None`` for an unconditional one), checked;
    ``hint`` is added to the message that asks for a missing one."""
    need = int(getattr(flow, "context_features", 0))
    if need == 0:
        if context is not None:
            raise ValueError(f"the flow is unconditional (context=0) but {name} was given")
        return None
    if context is None:
        raise ValueError(
            f"the flow is conditional (context={need}): pass {name}=...{hint} with one row "
            "per data row"
        )
    if len(getattr(context, "shape", ())) == 1 and len(context) == need:  # one for all rows
        context = (context.expand(rows, need) if isinstance(context, Tensor)
                   else np.broadcast_to(np.asarray(context), (rows, need)))
    return wrap(context, name, need, rows)


def hold_out(
    rows: Rows, context: Rows | None, val_fraction: float, seed: int,
    fallback_steps: int | None = None,
) -> tuple[Rows, Rows | None, Rows | None, Rows | None]:
    """``(train, context, val, val_context)``: ``val_fraction`` of the rows held out at random
    (seeded), the rest kept; lazy data stays lazy. The copies of a row (with its context)
    stay on one side (:func:`~exactflow.datasets.shuffled_rows`): on both, memorizing the
    training rows would score well on validation. With fewer than 2 rows left on either
    side nothing is held out, with a warning when ``fallback_steps`` is given (the fixed
    length training then runs).

    Raises:
        DataError: the rows left for training are no more than the columns (above one).
    """
    n = len(rows)
    perm, starts = shuffled_rows(rows.data, None if context is None else context.data,
                                 rng=np.random.default_rng([seed, 0x5EED]))
    n_val = int(cut_between_copies(np.array([round(val_fraction * n)]), starts)[0])
    if n_val < 2 or n - n_val < 2:
        if fallback_steps is not None:
            warn_user(f"{counted(n, 'row')} leave no validation rows at val_fraction="
                      f"{val_fraction:g} (it needs 2 on each side): training runs a fixed "
                      f"{fallback_steps} steps and keeps the last, which overfits a small "
                      "table; pass val= (rows of your own) or steps=, or add rows")
        return rows, context, None, None
    if 1 < rows.data.shape[1] >= n - n_val:  # (a density of every column is degenerate)
        raise training_rows_error(counted(n_val, "validation row"), n - n_val, rows.data.shape[1])
    val_index, train_index = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return (
        rows.subset(train_index),
        None if context is None else context.subset(train_index),
        rows.subset(val_index, name="validation rows held out of the training data"),
        None if context is None else context.subset(val_index),
    )


#: Up to this many rows an epoch's shuffle is a stored ``torch.randperm`` (8 bytes a row);
#: above it, a keyed permutation computed a batch at a time (:class:`Permutation`).
IN_MEMORY_SHUFFLE_ROWS = 1 << 22

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finalizer of ``x ^ key``: a well-mixed 64-bit hash, elementwise."""
    with np.errstate(over="ignore"):
        z = (x ^ key) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Permutation:
    """A seeded pseudo-random permutation of ``range(n)`` evaluated pointwise in O(1) memory.

    A Feistel network on ``b`` bits (``2^(b-1) < n <= 2^b``; halves of ``ceil(b/2)`` and
    ``floor(b/2)`` bits that trade places each round; four rounds with splitmix64 round
    functions keyed by ``seed``) is a bijection of ``range(2^b)``; cycle walking (apply it
    again while the value is ``>= n``, fewer than twice on average since ``2^b < 2n``)
    restricts it to a bijection of ``range(n)``. ``perm(positions)`` costs a few dozen
    integer operations a position, whatever ``n``: the shuffle of data far larger than
    memory needs no index array. Good enough to shuffle training data; not cryptographic.

    Example:
        >>> import numpy as np
        >>> p = Permutation(10, seed=3)
        >>> sorted(p(np.arange(10)).tolist()) == list(range(10))
        True
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int | list[int]) -> None:
        if n < 1:
            raise ValueError(f"Permutation needs n >= 1, got {n}")
        self.n = int(n)
        self.bits = max(2, int(n - 1).bit_length())
        words = np.random.SeedSequence(seed).generate_state(self.ROUNDS, np.uint64)
        self.keys = [np.uint64(w) for w in words]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left_bits, right_bits = self.bits - self.bits // 2, self.bits // 2
        left, right = x >> np.uint64(right_bits), x & np.uint64((1 << right_bits) - 1)
        for key in self.keys:
            # (L, R) -> (R, L ^ F(R)): invertible whatever F; the halves swap sizes.
            mask = np.uint64((1 << left_bits) - 1)
            left, right = right, left ^ (_mix(right, key) & mask)
            left_bits, right_bits = right_bits, left_bits
        return (left << np.uint64(right_bits)) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The images of ``positions`` (integers in ``[0, n)``), as int64."""
        y = self._feistel(np.asarray(positions, dtype=np.uint64))
        out = np.flatnonzero(y >= np.uint64(self.n))
        while len(out):
            y[out] = self._feistel(y[out])
            out = out[y[out] >= np.uint64(self.n)]
        return y.astype(np.int64)


class Order:
    """Shuffled mini-batches, epoch by epoch, reproducible from ``(seed, epoch, position)``.

    The permutation of epoch ``e`` is drawn from a generator seeded by ``(seed, e)`` only, so
    the data order state is two integers and a resumed run sees the same batches. Each epoch
    holds ``n // batch_size`` full batches (the remainder rows of that epoch's shuffle are
    skipped, which keeps batch statistics of batch norm well defined).

    Up to ``in_memory`` rows (default :data:`IN_MEMORY_SHUFFLE_ROWS`) the permutation is a
    stored ``torch.randperm`` (8 bytes a row); above, it is a :class:`Permutation` keyed by
    ``(seed, e)`` and evaluated a batch at a time, so the order of any number of rows costs
    no memory. The two give different (equally random) orders.
    """

    def __init__(self, n: int, batch_size: int, seed: int, in_memory: int | None = None) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.in_memory = IN_MEMORY_SHUFFLE_ROWS if in_memory is None else int(in_memory)
        self.per_epoch = n // batch_size
        self.epoch = 0
        self.position = 0
        self._perm: Tensor | Permutation | None = None

    def next(self) -> Tensor:
        """The sorted row indices of the next batch."""
        if self._perm is None:
            if self.n > self.in_memory:
                self._perm = Permutation(self.n, [self.seed, self.epoch, 1])
            else:
                words = np.random.SeedSequence([self.seed, self.epoch]).generate_state(
                    2, np.uint32)
                gen = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
                self._perm = torch.randperm(self.n, generator=gen)
        start = self.position * self.batch_size
        if isinstance(self._perm, Permutation):
            taken = self._perm(np.arange(start, start + self.batch_size))
            index = torch.from_numpy(np.sort(taken))
        else:
            index = torch.sort(self._perm[start : start + self.batch_size]).values
        self.position += 1
        if self.position == self.per_epoch:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return index

    def peek(self) -> Tensor:
        """The next batch's indices, without moving on."""
        twin = Order(self.n, self.batch_size, self.seed, self.in_memory)
        twin.load_state_dict(self.state_dict())
        return twin.next()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < max(self.per_epoch, 1):
            raise ValueError(f"the data order is at epoch {epoch}, batch {position}; an "
                             f"epoch holds batches 0 to {max(self.per_epoch, 1) - 1}")
        self.epoch, self.position, self._perm = epoch, position, None


def to_device(batch: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A batch of rows on ``device`` in ``dtype``, copied asynchronously from pinned memory.

    On CUDA a CPU batch is converted to ``dtype`` on the CPU (fewer bytes to move when the
    data are float64 and the flow float32), copied into page-locked memory and sent with
    ``non_blocking=True``, so the copy overlaps the work already queued on the GPU; the
    caching host allocator reuses the pinned blocks from step to step. Elsewhere it is a
    plain ``.to``.
    """
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.to(dtype).pin_memory().to(device, non_blocking=True)
    return batch.to(device, dtype)


def width_of(data: Any) -> int:
    """The number of columns of 2-D rows (an array, a tensor, a table, a list of rows)."""
    shape = getattr(data, "shape", None)
    if shape is None and not isinstance(data, (str, os.PathLike)):  # a list of rows
        shape = np.shape(data)
    if shape is None or len(shape) != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {shape}")
    return int(shape[1])


def default_batch_size(rows: int) -> int:
    """The batch size that follows the number of training rows: about 8 batches an epoch,
    at least 32 rows (or all of them) and at most 256 (measured on eight real tables of
    150 to 1,800 rows: ``benchmarks/README.md``, "Real tables")."""
    return max(1, min(rows, max(32, min(256, rows // 8))))
