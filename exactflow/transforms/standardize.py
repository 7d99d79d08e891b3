"""The fixed standardization layer that a model puts first, and how its scale is chosen.

:class:`Standardize` is an affine map per column, fixed after it is filled from the
training data: one mean and standard deviation per column, or one pooled pair for columns
on one common scale (:meth:`Standardize.choose_scale` says when). ``standardize=`` values of
the builders, :func:`exactflow.fit_auto`, ``FlowDensity`` and the command line are read by
:func:`scale_of` and :func:`resolve_standardize`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core import Transform
from ..stats import RunningMoments
from ..validation import DataError, index_list, nonfinite_rows_error

__all__ = ["Standardize", "SCALES", "scale_of", "resolve_standardize", "describe_standardize",
           "narrow_columns"]

#: Rows per chunk when :meth:`Standardize.fit` walks over (possibly memory-mapped) data.
_CHUNK_ROWS = 65536

#: How a :class:`Standardize` layer scales: each column by its own mean and standard
#: deviation, or every column by one pooled pair (columns measured on one common scale).
SCALES = ("columns", "pooled")

#: The widest span of all columns together, in median column ranges, for which
#: :meth:`Standardize.choose_scale` still calls the columns "on one range".
ONE_RANGE_SPAN = 1.5
#: The narrowest column's range, in median column ranges, below which a pooled scale may
#: squeeze a column into a sliver (:func:`narrow_columns`).
NARROWEST_RANGE = 0.01


def scale_of(standardize: Any, auto: bool = False) -> str | None:
    """The scale a ``standardize=`` value asks for: ``None`` (no layer) for ``False``,
    ``"columns"`` for ``True`` or ``"columns"``, ``"pooled"`` for ``"pooled"``.

    Raises:
        ValueError: any other value, ``"auto"`` included (it is resolved by a caller that
            has the data, see :func:`resolve_standardize`; ``auto=True`` names it in the
            message as a choice).
    """
    if not isinstance(standardize, str):  # True, False, None, numpy's bools, 0 and 1...
        return "columns" if standardize else None
    if standardize in SCALES:
        return standardize
    choices = "'auto', " if auto else ""
    raise ValueError(
        f"standardize must be {choices}True or 'columns' (one scale per column), 'pooled' "
        f"(one scale for every column) or False, got {standardize!r}"
    )


def resolve_standardize(standardize: Any, data: Any, name: str = "training data") -> bool | str:
    """A builder's ``standardize=`` value for ``data``: ``"auto"`` becomes ``"pooled"`` where
    the columns lie on one range (:meth:`Standardize.choose_scale`) and ``True`` elsewhere;
    ``True``, ``"columns"``, ``"pooled"`` and ``False`` are checked and kept (``"columns"``
    as ``True``).
    """
    if isinstance(standardize, str) and standardize == "auto":
        return "pooled" if Standardize.choose_scale(data, name) == "pooled" else True
    scale = scale_of(standardize, auto=True)
    return "pooled" if scale == "pooled" else scale is not None


def describe_standardize(standardize: Any) -> str:
    """One line for the log: what a resolved ``standardize=`` value puts first."""
    scale = scale_of(standardize)
    if scale is None:
        return "standardization: none"
    return "standardization: one mean and scale " + (
        "for all columns (pooled)" if scale == "pooled" else "per column")


def _float64(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _column_summary(data: Any, name: str, constant_ok: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Column means, variances (``ddof=0``), minima and maxima, in float64, read in chunks
    of rows; the checks of :meth:`Standardize.statistics`."""
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    elif not hasattr(data, "shape"):
        data = np.asarray(data)
    n = int(data.shape[0])
    if len(data.shape) != 2 or n == 0:
        raise DataError(f"{name}: expected a non-empty 2-D array, got shape {data.shape}")
    moments = RunningMoments()
    bad: list[int] = []
    n_bad = 0
    lo = np.full(data.shape[1], np.inf)
    hi = np.full(data.shape[1], -np.inf)
    for start in range(0, n, _CHUNK_ROWS):
        block = np.asarray(data[start : start + _CHUNK_ROWS], dtype=np.float64)
        ok = np.isfinite(block).all(axis=1)
        if not ok.all():
            rows = np.flatnonzero(~ok)
            n_bad += len(rows)
            bad.extend((start + rows[:5]).tolist())
            continue
        lo = np.minimum(lo, block.min(axis=0))
        hi = np.maximum(hi, block.max(axis=0))
        moments.update(block)
    if n_bad:
        raise nonfinite_rows_error(name, n_bad, bad)
    constant = np.flatnonzero(lo == hi) if n > 1 else np.zeros(0, dtype=int)
    if len(constant) and not constant_ok:
        cols = "column" if len(constant) == 1 else "columns"
        raise DataError(
            f"{name}: constant (zero-variance) {cols} {index_list(constant, len(constant))} "
            "(column indices): a density has no width there; drop them"
        )
    var = np.asarray(moments.var(ddof=0), dtype=np.float64)
    return np.asarray(moments.mean, dtype=np.float64), var, lo, hi


def _pooled(mean: np.ndarray, var: np.ndarray) -> tuple[float, float]:
    """The mean and standard deviation of all values taken as one sample, from the columns'
    means and variances (the law of total variance, every column the same count)."""
    return float(mean.mean()), math.sqrt(float(var.mean() + mean.var()))


class Standardize(Transform):
    """A fixed per-feature affine map ``z = (x - mean) / std``, the first layer of a model.

    Training on standardized data changes the units of the density; putting the scaling
    inside the model instead keeps ``log_prob`` in the units of the user's data, because the
    change of variables adds ``log|det dz/dx| = -sum_i log std_i`` (the same for every row).
    Both directions are closed form and cost O(d); ``mean`` and ``std`` are buffers (saved
    with the model, not trained). Builders put one first with ``standardize=True`` and
    :func:`exactflow.fit` fills it from the training data (:func:`exactflow.prepare` does
    it before a training loop of your own).

    **Precision.** ``mean`` and ``std`` are always kept in float64 (``.float()`` on the
    model leaves them so), and ``forward`` standardizes in float64 before casting to the
    model's dtype: a column such as ``1e8 + N(0, 1)``, whose spread float32 cannot even
    represent around its mean, is standardized exactly, as long as the data reach the layer
    in float64 (a flow with this layer first takes float64 input as it is, see
    :meth:`exactflow.Flow.log_prob`). ``inverse`` returns float64 data for the same reason.

    **Scale.** By default each column is centred and divided by its own standard deviation.
    With ``pooled=True`` the statistics (:meth:`statistics`, and :func:`exactflow.fit` filling
    the layer) are those of all values of the table taken as one sample, one mean and one
    standard deviation for every column, as images are normalized: for columns measured on
    one common scale (pixel intensities, returns in percent), the columns keep their
    relative positions and spreads, where per-column scaling would blow a nearly constant
    column up to unit variance and push its rare large values far into the tails of the
    model. The density is the same function either way; what changes is the space the
    layers after it learn in.

    Args:
        mean: ``(features,)`` shift.
        std: ``(features,)`` positive scale.
        dtype: the dtype of the layer's output (the model's dtype; default torch's default).
        pooled: fill the layer with one pooled scale (see above); ``mean`` and ``std`` as
            given are used as they are.

    Example:
        >>> import torch, exactflow as ef
        >>> x = 3 + 2 * torch.randn(100, 2, dtype=torch.float64)
        >>> t = ef.transforms.Standardize.fit(x, dtype=torch.float64)
        >>> report = ef.check_transform(t, x)
        >>> report.ok
        True
    """

    linear = True
    #: Filled with one pooled scale (a class default too: layers pickled before the option
    #: existed read as per-column).
    pooled: bool = False
    features: int
    mean: Tensor
    std: Tensor
    _anchor: Tensor

    def __init__(
        self, mean: Any, std: Any, dtype: torch.dtype | None = None, pooled: bool = False
    ) -> None:
        super().__init__()
        self.pooled = bool(pooled)
        dtype = dtype or torch.get_default_dtype()
        mean_t = torch.as_tensor(_float64(mean))
        std_t = torch.as_tensor(_float64(std))
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape:
            raise ValueError(
                "Standardize needs 1-D mean and std of the same length, got shapes "
                f"{tuple(mean_t.shape)} and {tuple(std_t.shape)}"
            )
        bad = torch.nonzero(~(torch.isfinite(std_t) & (std_t > 0))).flatten().tolist()
        if bad:
            raise ValueError(f"Standardize needs finite std > 0; columns {bad} are not")
        if not bool(torch.isfinite(mean_t).all()):
            raise ValueError("Standardize needs a finite mean")
        self.features = int(mean_t.numel())
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        # Not saved: follows .to()/.float()/.double() and says the model's dtype.
        self.register_buffer("_anchor", torch.zeros(0, dtype=dtype), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> Standardize:
        # Device moves apply to the statistics too, dtype casts do not: they stay float64.
        mean, std = self.mean, self.std
        super()._apply(fn, recurse)
        self.mean = mean.to(device=self._anchor.device, dtype=torch.float64)
        self.std = std.to(device=self._anchor.device, dtype=torch.float64)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the standardized output (the model's dtype)."""
        return self._anchor.dtype

    @property
    def scale(self) -> str:
        """``"pooled"`` or ``"columns"``: how :meth:`statistics` fills this layer."""
        return "pooled" if self.pooled else "columns"

    @classmethod
    def identity(
        cls, features: int, dtype: torch.dtype | None = None, pooled: bool = False
    ) -> Standardize:
        """The identity (mean 0, std 1), to be filled by :meth:`set_statistics` later."""
        return cls(np.zeros(features), np.ones(features), dtype=dtype, pooled=pooled)

    def is_identity(self) -> bool:
        """Whether the layer is still at mean 0 and scale 1 (not filled from data yet)."""
        return bool(torch.all(self.mean == 0)) and bool(torch.all(self.std == 1))

    @staticmethod
    def statistics(
        data: Any, name: str = "data", pooled: bool = False, constant_ok: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Column means and standard deviations (``ddof=0``) of ``data``, in float64.

        With ``pooled=True`` every column gets the same shift and scale, the mean and standard
        deviation of all values of the table taken as one sample (the class doc says when
        that is the better space).

        ``data`` is anything indexable by row slices (array, tensor, ``np.memmap``, a lazy
        row subset); it is read in chunks of rows, so a memory-mapped table is never
        copied whole.

        With ``constant_ok`` (a context, which has no density: a parameter held fixed in
        every training row) a constant column is centered and left unscaled (scale 1).

        Raises:
            DataError: NaN or inf in a row, or a constant (zero-variance) column.
        """
        mean, var, _, _ = _column_summary(data, name, constant_ok)
        if pooled:
            one_mean, one_std = _pooled(mean, var)
            return np.full_like(mean, one_mean), np.full_like(var, one_std)
        return mean, np.sqrt(np.where(var > 0, var, 1.0) if constant_ok else var)

    @staticmethod
    def choose_scale(data: Any, name: str = "data") -> str:
        """``"pooled"`` where one scale for all columns is the better space, else
        ``"columns"``.

        Pooled when both hold: the columns lie on one range (the span of all columns
        together, largest maximum minus smallest minimum, is at most 1.5 times the median
        column's range: pixel intensities, counts or returns in one unit, never columns in
        different units), and per-column scaling would push some value at least twice as
        far out as one shared scale puts any value (a nearly constant column with rare
        large values: an image's border pixel that is sometimes inked). Measured on the
        tables of ``benchmarks/`` (``python -m benchmarks.ladder``): on the digit images,
        whose columns meet both conditions, the ladder's pick reaches -16.82 nats per row
        pooled against -12.70 per column; on daily returns of five currencies, on one range
        but with no such column, pooling moved each rung's test NLL by 0.02 nats at most
        and made the pick worse by 0.12 (another rung won validation on one split): no
        gain, so such tables stay per column.

        Raises:
            DataError: as :meth:`statistics`.
        """
        mean, var, lo, hi = _column_summary(data, name)
        span = float(hi.max() - lo.min())
        if span > ONE_RANGE_SPAN * float(np.median(hi - lo)):
            return "columns"
        pooled_mean, pooled_std = _pooled(mean, var)
        reach = np.maximum(hi - mean, mean - lo) / np.sqrt(var)
        pooled_reach = max(hi.max() - pooled_mean, pooled_mean - lo.min()) / pooled_std
        return "pooled" if float(reach.max()) >= 2 * pooled_reach else "columns"

    @classmethod
    def fit(cls, data: Any, dtype: torch.dtype | None = None, pooled: bool = False) -> Standardize:
        """The layer with the column means and standard deviations of ``data`` (float64
        accumulation over chunks of rows; see :meth:`statistics`)."""
        mean, std = cls.statistics(data, name="data for Standardize.fit", pooled=pooled)
        return cls(mean, std, dtype=dtype, pooled=pooled)

    @torch.no_grad()
    def set_statistics(self, mean: Any, std: Any) -> Standardize:
        """Set ``mean`` and ``std`` in place (cast to the buffers' dtype); returns ``self``."""
        fresh = Standardize(mean, std, dtype=torch.float64, pooled=self.pooled)
        if fresh.features != self.features:
            raise ValueError(
                f"Standardize has {self.features} features, the statistics have {fresh.features}"
            )
        self.mean.copy_(fresh.mean)
        self.std.copy_(fresh.std)
        return self

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = ((x.to(torch.float64) - self.mean) / self.std).to(self.dtype)
        ladj = (-torch.log(self.std).sum()).to(self.dtype)
        return z, ladj.expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = z.to(torch.float64) * self.std + self.mean
        return x, torch.log(self.std).sum().to(z.dtype).expand(z.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}" + (", pooled=True" if self.pooled else "")


def narrow_columns(data: Any) -> list[int]:
    """The columns whose range is under :data:`NARROWEST_RANGE` of the median column's: a
    pooled scale squeezes them into a sliver. Right for an image's blank border pixel,
    which is dequantization noise (8-bit images pooled: test NLL -82.8, per column -56.1),
    wrong for a quantity in other units inside the others' range (one in units of 1e-4
    beside two in units of 1: a spline flow 4.2 nats a row short pooled), which the
    numbers alone cannot tell apart: the command line names them in a note."""
    _, _, lo, hi = _column_summary(data, "data")
    ranges = hi - lo
    return [int(j) for j in np.flatnonzero(ranges < NARROWEST_RANGE * np.median(ranges))]
