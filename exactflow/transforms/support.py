"""Bounded data onto the real line: the first layer of a flow whose columns have limits.

A column that is positive, or lies between two limits (a fraction, a parameter with a
uniform prior), has no density outside them; a flow on the raw values puts mass there all
the same (a MAF posterior fitted to parameters drawn from U(0, 1) drew 6% of its samples
outside the box). :class:`Support` maps each bounded column onto R before the other
layers, as ``torch.distributions.biject_to`` does: ``logit((x - a) / (b - a))`` for
``a < x < b``, ``log(x - a)`` for ``x > a``, ``log(b - x)`` for ``x < b``. Samples then
always respect the limits, and the density is exact inside them. Builders take it as
``bounds=`` (:func:`exactflow.models.register`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Transform, _is_vmapped, check_features
from ..validation import DataError

__all__ = ["Support", "bounds_spec", "map_rows"]

_CHUNK = 8192


def _limit(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number or None, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite (None for no limit), got {value!r}")
    return float(value)


def bounds_spec(bounds: Any, features: int) -> list[list[float | None]] | None:
    """``bounds`` as a JSON config: one ``[low, high]`` per column (``None`` where a column
    has no limit on that side); ``None`` where no column has a limit.

    ``bounds`` is ``None``, one pair ``(low, high)`` for every column, or a sequence of
    ``features`` pairs (or ``None`` for a column without limits).

    Raises:
        ValueError: a pair that is not two numbers or ``None``, ``low >= high``, or a
            sequence whose length is not ``features``.
    """
    if bounds is None:
        return None
    if not isinstance(bounds, Sequence) or isinstance(bounds, str):
        raise ValueError(f"bounds must be a pair (low, high) or one pair per column, got "
                         f"{bounds!r}")
    one_pair = len(bounds) == 2 and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in bounds)
    pairs = [bounds] * features if one_pair else list(bounds)
    if len(pairs) != features:
        raise ValueError(f"bounds gives {len(pairs)} pairs for {features} columns: give one "
                         "(low, high) for every column (None for a column without limits), "
                         "or a single pair for all")
    spec: list[list[float | None]] = []
    for j, pair in enumerate(pairs):
        if pair is None:
            pair = (None, None)
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"bounds of column {j} must be a pair (low, high), got {pair!r}")
        low = _limit(pair[0], f"the lower bound of column {j}")
        high = _limit(pair[1], f"the upper bound of column {j}")
        if low is not None and high is not None and not low < high:
            raise ValueError(f"bounds of column {j}: the lower bound {low:g} is not below the "
                             f"upper bound {high:g}")
        spec.append([low, high])
    return spec if any(v is not None for pair in spec for v in pair) else None


class Support(Transform):
    """Maps columns with limits onto the real line; columns without pass unchanged.

    Per column ``j`` with limits ``(a, b)``: ``z = logit((x - a) / (b - a))``, ``log|dz/dx|
    = -log(b - a) - log t - log(1 - t)`` with ``t = (x - a) / (b - a)``; with a lower limit
    only, ``z = log(x - a)``, ``log|dz/dx| = -z``; with an upper limit only, ``z = log(b -
    x)``, ``log|dz/dx| = -z``. The inverse maps any ``z`` inside the limits (held strictly
    inside where the floating-point sigmoid or exponential would reach them).

    Data on or outside a limit raises ``ValueError`` naming the column (its density is 0:
    no flow through this layer puts mass there), never a silent NaN.

    Args:
        bounds: as :func:`bounds_spec` takes them.
        features: the dimension ``d``.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.transforms.Support([(0.0, 1.0), (0.0, None)], features=2)
        >>> z, ladj = t(torch.tensor([[0.5, 1.0]]))
        >>> z, ladj  # logit(0.5) = 0, log(1) = 0; ladj = -log 0.25 - log 1
        (tensor([[0., 0.]]), tensor([1.3863]))
    """

    low: Tensor
    high: Tensor
    names: list[str] | None  # (the columns' names, for messages)
    lower_only: Tensor
    upper_only: Tensor
    both: Tensor

    def __init__(self, bounds: Any, features: int) -> None:
        super().__init__()
        self.features = check_features(features, "Support")
        spec = bounds_spec(bounds, features) or [[None, None]] * features
        self.bounds = spec
        self.names = None
        has_low = torch.tensor([lo is not None for lo, _ in spec])
        has_high = torch.tensor([hi is not None for _, hi in spec])
        for name, value in (("low", [0.0 if lo is None else lo for lo, _ in spec]),
                            ("high", [1.0 if hi is None else hi for _, hi in spec])):
            self.register_buffer(name, torch.tensor(value), persistent=False)
        for name, mask in (("lower_only", has_low & ~has_high),
                           ("upper_only", has_high & ~has_low), ("both", has_low & has_high)):
            self.register_buffer(name, mask, persistent=False)

    def inside(self, x: Tensor) -> Tensor:
        """Which rows of ``x`` lie strictly inside every limit, ``(batch,)`` booleans."""
        return self._inside(x, self.low.to(x.dtype), self.high.to(x.dtype)).all(-1)

    def _inside(self, x: Tensor, low: Tensor, high: Tensor) -> Tensor:
        return ((x > low) | ~(self.lower_only | self.both)) & (
            (x < high) | ~(self.upper_only | self.both))

    def _check(self, x: Tensor, low: Tensor, high: Tensor) -> None:
        ok = self._inside(x, low, high)
        if torch.compiler.is_compiling() or _is_vmapped(ok) or bool(ok.all()):
            return
        bad = (~ok).any(0).nonzero().flatten().tolist()
        said = []
        names = self.names
        for j in bad[:4]:
            lo, hi = self.bounds[j]
            limits = (f"in ({lo:g}, {hi:g})" if lo is not None and hi is not None
                      else f"above {lo:g}" if lo is not None else f"below {hi:g}")
            rows = int((~ok[:, j]).sum())
            said.append(f"{repr(names[j]) if names else f'column {j}'} must lie {limits}: "
                        + ("1 row does not" if rows == 1 else f"{rows} rows do not"))
        more = f"; {len(bad) - 4} more columns" if len(bad) > 4 else ""
        raise ValueError(f"Support: values on or outside the bounds ({'; '.join(said)}{more}): "
                         "the density there is 0 (a value on a limit too: widen the bounds "
                         "past such values, or drop those rows)")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not x.is_floating_point():
            x = x.to(self.low.dtype)
        low, high = self.low.to(x.dtype), self.high.to(x.dtype)
        self._check(x, low, high)
        one = torch.ones_like(x)  # (safe values where a formula does not apply: no NaN
        # reaches a gradient through torch.where)
        above = torch.log(torch.where(self.lower_only, x - low, one))
        below = torch.log(torch.where(self.upper_only, high - x, one))
        width = high - low
        t = torch.where(self.both, (x - low) / width, 0.5 * one)
        log_t, log_rest = torch.log(t), torch.log1p(-t)
        z = torch.where(self.lower_only, above, torch.where(
            self.upper_only, below, torch.where(self.both, log_t - log_rest, x)))
        ladj = torch.where(self.lower_only, -above, torch.where(
            self.upper_only, -below,
            torch.where(self.both, -torch.log(width) - log_t - log_rest, 0.0 * one)))
        # (float64 rows reach a float32 flow's first layer as they are: mapped in float64,
        # then given to the next layer in the flow's dtype, as Standardize does)
        return z.to(self.low.dtype), ladj.sum(-1).to(self.low.dtype)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        low, high = self.low.to(z.dtype), self.high.to(z.dtype)
        # (held strictly inside the limits, and finite: exp underflows to 0 below z of
        # about -104 in float32 and overflows past 88, sigmoid rounds to 1.0 from z of
        # about 17, and a sum to its limit)
        width = high - low
        step = torch.exp(z).clamp(max=torch.finfo(z.dtype).max / 2)  # (finite past z = 88)
        x = torch.where(self.lower_only, low + step, torch.where(
            self.upper_only, high - step,
            torch.where(self.both, low + width * torch.sigmoid(z), z)))
        inf = torch.full_like(low, math.inf)
        x = torch.where(self.lower_only | self.both,
                        torch.maximum(x, torch.nextafter(low, inf)), x)
        x = torch.where(self.upper_only | self.both,
                        torch.minimum(x, torch.nextafter(high, -inf)), x)
        log_sig = -F.softplus(-z) - F.softplus(z)
        ladj = torch.where(self.lower_only | self.upper_only, z, torch.where(
            self.both, torch.log(width) + log_sig, torch.zeros_like(z)))
        return x, ladj.sum(-1)

    def extra_repr(self) -> str:
        return f"features={self.features}, bounds={self.bounds}"


def map_rows(support: Support, data: Any, name: str = "data",
             columns: Sequence[str] | None = None) -> np.ndarray:
    """The rows of ``data`` (array, tensor, memmap, lazy table) as the layers after
    ``support`` see them: float64, mapped in chunks of rows (``columns`` names the columns
    in a message).

    Raises:
        DataError: a row on or outside a limit (the message names ``name`` and the column).
    """
    mapped = copy.deepcopy(support).double().cpu()
    mapped.names = None if columns is None else list(columns)
    parts = []
    with torch.no_grad():
        for start in range(0, len(data), _CHUNK):
            block = data[start : start + _CHUNK]
            if isinstance(block, Tensor):
                block = block.detach().cpu()
            try:
                parts.append(mapped(torch.as_tensor(np.asarray(block, dtype=np.float64)))[0])
            except ValueError as err:
                raise DataError(f"{name}: {str(err).removeprefix('Support: ')}") from None
    return torch.cat(parts).numpy() if parts else np.zeros((0, len(support.bounds)))
