"""Normalization layers: fixed standardization, batch normalization (RealNVP) and
activation normalization (Glow).

All are per-dimension affine maps, so their Jacobians are diagonal and
``log|det J| = sum_i log(scale_i)`` costs O(d), the same for every row. Their state (running
statistics, the "initialized" flag, the fixed mean and scale) lives in buffers, so
``state_dict`` save -> load -> continue training is identical.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core import Transform, check_features, check_input
from ..stats import RunningMoments
from ..validation import DataError, index_list, nonfinite_rows_error

__all__ = [
    "Standardize", "BatchNorm", "ActNorm", "SCALES", "scale_of", "resolve_standardize",
    "describe_standardize",
]

#: Rows per chunk when :meth:`Standardize.fit` walks over (possibly memory-mapped) data.
_CHUNK_ROWS = 65536

#: How a :class:`Standardize` layer scales: each column by its own mean and standard
#: deviation, or every column by one pooled pair (columns measured on one common scale).
SCALES = ("columns", "pooled")

#: The widest span of all columns together, in median column ranges, for which
#: :meth:`Standardize.choose_scale` still calls the columns "on one range".
ONE_RANGE_SPAN = 1.5


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


def _column_summary(data: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    if len(constant):
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
    :func:`exactflow.fit` fills it from the training data.

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

    @staticmethod
    def statistics(
        data: Any, name: str = "data", pooled: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Column means and standard deviations (``ddof=0``) of ``data``, in float64.

        With ``pooled=True`` every column gets the same shift and scale, the mean and standard
        deviation of all values of the table taken as one sample (the class doc says when
        that is the better space).

        ``data`` is anything indexable by row slices (array, tensor, ``np.memmap``, a lazy
        row subset); it is read in chunks of rows, so a memory-mapped table is never
        copied whole.

        Raises:
            DataError: NaN or inf in a row, or a constant (zero-variance) column.
        """
        mean, var, _, _ = _column_summary(data, name)
        if pooled:
            one_mean, one_std = _pooled(mean, var)
            return np.full_like(mean, one_mean), np.full_like(var, one_std)
        return mean, np.sqrt(var)

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


class BatchNorm(Transform):
    """Batch normalization as an invertible flow layer (the RealNVP layer).

    ``forward`` (data -> latent)::

        z = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta
        log|det dz/dx| = sum_i [log_gamma_i - 0.5 log(var_i + eps)]

    * **training mode**: ``mean`` and ``var`` are the statistics of the batch (``var`` the
      biased one, as in the normalization itself), and the running averages are updated
      in place, ``running <- (1 - momentum) running + momentum batch`` (the variance with
      Bessel's correction, as ``torch.nn.BatchNorm1d`` does). The log-det is that of the
      per-row map with the batch statistics held fixed, which is what the RealNVP objective
      uses; the rows of a batch are then not independent. A batch needs at least 2 rows.
    * **eval mode**: ``mean`` and ``var`` are the running averages, so rows are independent
      and the layer is an ordinary elementwise affine map (check it with
      :func:`exactflow.check_transform` in this mode).

    ``inverse`` (latent -> data) always uses the running averages, in both modes: it is the
    exact inverse of the eval-mode forward. In training mode it is *not* the inverse of that
    batch's forward; sampling a flow in training mode therefore samples the eval-mode model.

    Both directions are closed form and cost O(d) per row. Starts with ``log_gamma = 0``,
    ``beta = 0`` and running statistics (0, 1): the identity up to ``eps``.

    Args:
        features: the dimension ``d``.
        momentum: weight of the new batch in the running averages, in (0, 1].
        eps: added to the variance before the square root, > 0.

    References:
        Dinh, Sohl-Dickstein & Bengio, Density Estimation using Real NVP (2016),
        arXiv:1605.08803; Ioffe & Szegedy, Batch Normalization (2015), arXiv:1502.03167.

    Example:
        >>> import torch, exactflow as ef
        >>> bn = ef.transforms.BatchNorm(2)
        >>> z, ladj = bn(3 * torch.randn(256, 2) + 1)     # training mode: batch statistics
        >>> z.mean(0).abs().max() < 1e-5, z.std(0, unbiased=False).sub(1).abs().max() < 1e-4
        (tensor(True), tensor(True))
        >>> bn.running_mean.shape
        torch.Size([2])
    """

    linear = True
    features: int
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.features = check_features(features, "BatchNorm")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"BatchNorm: momentum must be in (0, 1], got {momentum}")
        if not eps > 0.0:
            raise ValueError(f"BatchNorm: eps must be positive, got {eps}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent with batch statistics (training) or running averages (eval)."""
        if self.training:
            batch = x.shape[0]
            if batch < 2:
                raise ValueError(
                    "BatchNorm in training mode needs at least 2 rows to estimate the batch "
                    f"variance, got a batch of {batch}; call .eval() to use the running averages"
                )
            mean = x.mean(0)
            var = x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * (batch / (batch - 1)), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        z = (x - mean) * torch.exp(log_scale) + self.beta
        return z, log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data with the running averages (in both modes)."""
        log_scale = self.log_gamma - 0.5 * torch.log(self.running_var + self.eps)
        x = (z - self.beta) * torch.exp(-log_scale) + self.running_mean
        return x, (-log_scale.sum()).expand(z.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}, momentum={self.momentum}, eps={self.eps}"


def _sync_initialized(module: ActNorm, incompatible_keys: object) -> None:
    # After load_state_dict, mirror the loaded buffer in the Python-side flag.
    module._needs_init = not bool(module.initialized)


class ActNorm(Transform):
    """Activation normalization (Glow): a per-dimension affine map with data-dependent init.

    ``forward`` (data -> latent)::

        z = (x + bias) * exp(log_scale)
        log|det dz/dx| = sum_i log_scale_i

    ``inverse`` (latent -> data): ``x = z * exp(-log_scale) - bias``. Both O(d) per row.

    **Initialization.** The first ``forward`` call in training mode sets
    ``bias = -mean(x)`` and ``log_scale = -0.5 log(var(x) + eps)`` from that batch, so its
    output has zero mean and unit variance per dimension; afterwards both are ordinary
    parameters. ``eps`` keeps a constant dimension finite. A batch of 1 has no variance: it
    only sets the bias (``log_scale`` stays 0). Calls in eval mode and calls to ``inverse``
    never initialize: before initialization the layer uses its current parameters, the
    identity for a new layer (so sampling an untrained flow is well defined). Call
    :meth:`initialize` to initialize from a chosen batch explicitly.

    The "initialized" flag is a buffer (``state_dict`` saves and restores it, so a loaded
    layer continues exactly where it stopped) mirrored by a Python bool, so the check costs
    no device sync. The initialization runs eagerly, outside any compiled graph: under
    ``torch.compile`` it is skipped, so run one eager training batch (or :meth:`initialize`)
    before compiling.

    Args:
        features: the dimension ``d``.
        eps: added to the variance at initialization, > 0.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions (2018),
        arXiv:1807.03039.

    Example:
        >>> import torch, exactflow as ef
        >>> act = ef.transforms.ActNorm(3)
        >>> z, ladj = act(5 * torch.randn(100, 3) - 2)     # first batch: initializes
        >>> bool(act.initialized), z.mean(0).abs().max() < 1e-5
        (True, tensor(True))
    """

    linear = True
    features: int
    initialized: Tensor

    def __init__(self, features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.features = check_features(features, "ActNorm")
        if not eps > 0.0:
            raise ValueError(f"ActNorm: eps must be positive, got {eps}")
        self.eps = float(eps)
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))
        self._needs_init = True
        self.register_load_state_dict_post_hook(_sync_initialized)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``bias`` and ``log_scale`` so that ``forward(x)`` has zero mean, unit variance."""
        check_input(x, self.features, "ActNorm.initialize")
        x = x.detach()
        self.bias.copy_(-x.mean(0))
        if x.shape[0] > 1:
            self.log_scale.copy_(-0.5 * torch.log(x.var(0, unbiased=False) + self.eps))
        else:
            self.log_scale.zero_()
        self.initialized.fill_(True)
        self._needs_init = False

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent; the first call in training mode initializes from ``x``."""
        if self._needs_init and self.training and not torch.compiler.is_compiling():
            if bool(self.initialized):  # set by hand or by a load that bypassed the hook
                self._needs_init = False
            else:
                self.initialize(x)
        z = (x + self.bias) * torch.exp(self.log_scale)
        return z, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data with the current parameters (never initializes)."""
        x = z * torch.exp(-self.log_scale) - self.bias
        return x, (-self.log_scale.sum()).expand(z.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}"
