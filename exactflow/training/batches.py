"""Training data a batch at a time: row access that never reads lazy data whole, and a
shuffled order that a checkpoint can resume exactly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..datasets import Subset, validate
from ..validation import DataError, nonfinite_rows_error

__all__ = ["Rows", "Order", "wrap", "wrap_context"]

# Rows per chunk when scanning arrays (finiteness checks, evaluation of memmaps).
SCAN_ROWS = 65536


class Rows:
    """Rows of a 2-D tensor, array, ``np.memmap`` or :class:`~exactflow.datasets.Subset`,
    gathered a batch at a time.

    Lazy data (a memmap, a ``Subset``) is never read whole: a batch copies only its own rows
    (indices sorted, for locality) and the checks scan it chunk by chunk.

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
        if strict:
            validate(data, features=features, batch_size=batch_size, name=name)
        if isinstance(data, Tensor):
            if data.is_complex():
                raise DataError(f"{name}: complex values are not supported (dtype {data.dtype})")
            array: Any = data.detach()
        elif isinstance(data, (np.ndarray, Subset)):
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
            raise DataError(
                f"{name} has {array.shape[1]} columns but the flow has {features} features"
            )
        if array.shape[0] == 0:
            raise DataError(f"{name} has no rows")
        self.data = array
        self.name = name
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
                part = torch.from_numpy(np.ascontiguousarray(np.asarray(part)))
            yield start, part

    def share(self, lo: int, hi: int) -> Rows:
        """Rows ``lo:hi`` as a new :class:`Rows`, without reading them."""
        return self.subset(np.arange(lo, hi))

    def subset(self, index: np.ndarray, name: str | None = None) -> Rows:
        """The rows at ``index`` (sorted row numbers) as a new :class:`Rows`, already checked:
        lazy data stays lazy (nothing is read), arrays and tensors are copied."""
        data = self.data
        if isinstance(data, Tensor):
            part: Any = data[torch.from_numpy(np.asarray(index)).to(data.device)]
        elif isinstance(data, (np.memmap, Subset)):
            part = Subset(data, rows=np.asarray(index))
        else:
            part = np.asarray(data)[index]
        out = object.__new__(Rows)
        out.data, out.name = part, self.name if name is None else name
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


def wrap_context(flow: Any, context: Any, name: str, rows: int) -> Rows | None:
    """The context rows of a conditional flow (``None`` for an unconditional one), checked."""
    need = int(getattr(flow, "context_features", 0))
    if need == 0:
        if context is not None:
            raise ValueError(f"the flow is unconditional (context=0) but {name} was given")
        return None
    if context is None:
        raise ValueError(
            f"the flow is conditional (context={need}): pass {name} with one row per data row"
        )
    return wrap(context, name, need, rows)


class Order:
    """Shuffled mini-batches, epoch by epoch, reproducible from ``(seed, epoch, position)``.

    The permutation of epoch ``e`` is drawn from a generator seeded by ``(seed, e)`` only, so
    the data order state is two integers and a resumed run sees the same batches. Each epoch
    holds ``n // batch_size`` full batches (the remainder rows of that epoch's shuffle are
    skipped, which keeps batch statistics of batch norm well defined).
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self.epoch = 0
        self.position = 0
        self._perm: Tensor | None = None

    def next(self) -> Tensor:
        """The sorted row indices of the next batch."""
        if self._perm is None:
            words = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint32)
            gen = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
            self._perm = torch.randperm(self.n, generator=gen)
        start = self.position * self.batch_size
        index = torch.sort(self._perm[start : start + self.batch_size]).values
        self.position += 1
        if self.position == self.per_epoch:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return index

    def peek(self) -> Tensor:
        """The next batch's indices, without moving on."""
        twin = Order(self.n, self.batch_size, self.seed)
        twin.load_state_dict(self.state_dict())
        return twin.next()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None
