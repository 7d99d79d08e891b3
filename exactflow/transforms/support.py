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
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Transform, _is_vmapped, check_features
from ..validation import DataError

__all__ = ["Support", "bounds_spec", "check_rows", "map_rows"]

_CHUNK = 8192


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _limit(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if not _number(value):
        raise ValueError(f"{what} must be a number or None, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{what} must be finite (None for no limit), got {value!r}")
    return float(value)


def bounds_spec(bounds: Any, features: int, names: Sequence[str] | None = None
                ) -> list[list[float | None]] | None:
    """``bounds`` as a JSON config: one ``[low, high]`` per column (``None`` where a column
    has no limit on that side); ``None`` where no column has a limit.

    ``bounds`` is ``None``; one pair ``(low, high)`` for every column; a sequence of
    ``features`` pairs (``None`` for a column without limits); or a dict ``{column:
    (low, high)}`` by position or, given the columns' ``names``, by name (the other
    columns without limits). Numbers may be numpy's; an array of pairs is taken as a list.

    Raises:
        ValueError: a pair that is not two numbers or ``None``, ``low >= high``, a
            sequence whose length is not ``features``, or a column that is not there.
    """
    if bounds is None:
        return None
    if isinstance(bounds, np.ndarray):
        bounds = bounds.tolist()
    label = (lambda j: repr(names[j])) if names else (lambda j: f"column {j}")
    if isinstance(bounds, dict):
        pairs: list[Any] = [None] * features
        for column, pair in bounds.items():
            if isinstance(column, str):
                if not names or column not in names:
                    known = f"its columns are {list(names)}" if names else "they have no names"
                    raise ValueError(f"bounds name a column {column!r} the data does not "
                                     f"have ({known})")
                j = list(names).index(column)
            elif _number(column) and int(column) == column and -features <= column < features:
                j = int(column) % features
            else:
                raise ValueError(f"bounds: column {column!r} is not one of the {features} "
                                 "columns (a name or a 0-based position)")
            pairs[j] = pair
    elif not isinstance(bounds, Sequence) or isinstance(bounds, str):
        raise ValueError(f"bounds must be a pair (low, high), one pair per column or a dict "
                         f"by column, got {bounds!r}")
    else:
        one_pair = len(bounds) == 2 and all(v is None or _number(v) for v in bounds)
        pairs = [bounds] * features if one_pair else list(bounds)
    if len(pairs) != features:
        raise ValueError(f"bounds gives {len(pairs)} pairs for {features} columns: give one "
                         "(low, high) for every column (None for a column without limits), "
                         "a single pair for all, or a dict by column")
    spec: list[list[float | None]] = []
    for j, pair in enumerate(pairs):
        if pair is None:
            pair = (None, None)
        if isinstance(pair, np.ndarray):
            pair = pair.tolist()
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"bounds of {label(j)} must be a pair (low, high), got {pair!r}")
        low = _limit(pair[0], f"the lower bound of {label(j)}")
        high = _limit(pair[1], f"the upper bound of {label(j)}")
        if low is not None and high is not None and not low < high:
            raise ValueError(f"bounds of {label(j)}: the lower bound {low:g} is not below "
                             f"the upper bound {high:g}")
        spec.append([low, high])
    return spec if any(v is not None for pair in spec for v in pair) else None


def _outside(bounds: list[list[float | None]], counts: Any, first: list[int],
             names: Sequence[str] | None, hint: str = "") -> str:
    """What to say of rows on or outside the limits: per column (the first four) how many,
    and the first row numbers."""
    said = []
    for j in np.flatnonzero(np.asarray(counts))[:4]:
        lo, hi = bounds[j]
        limits = (f"in ({lo:g}, {hi:g})" if lo is not None and hi is not None
                  else f"above {lo:g}" if lo is not None else f"below {hi:g}")
        rows = int(counts[j])
        said.append(f"{repr(names[j]) if names else f'column {j}'} must lie {limits}: "
                    + ("1 row does not" if rows == 1 else f"{rows:,} rows do not"))
    more = int(np.count_nonzero(np.asarray(counts))) - len(said)
    return (f"values on or outside the bounds ({'; '.join(said)}"
            f"{f'; {more} more columns' if more > 0 else ''}; rows "
            f"{', '.join(map(str, first))}{', ...' if len(first) == 5 else ''}, from 0): the "
            "density there is 0 (a value on a limit too: widen the bounds past such values, "
            f"or drop those rows{hint})")


class Support(Transform):
    """Maps columns with limits onto the real line; columns without pass unchanged.

    Per column ``j`` with limits ``(a, b)``: ``z = logit((x - a) / (b - a))``, ``log|dz/dx|
    = -log(b - a) - log t - log(1 - t)`` with ``t = (x - a) / (b - a)``; with a lower limit
    only, ``z = log(x - a)``, ``log|dz/dx| = -z``; with an upper limit only, ``z = log(b -
    x)``, ``log|dz/dx| = -z``. The inverse maps any ``z`` inside the limits (held strictly
    inside where the floating-point sigmoid or exponential would reach them).

    Data on or outside a limit raises ``ValueError`` naming the column, never a silent NaN;
    a :class:`~exactflow.Flow` whose first layer this is scores such rows ``-inf`` (the
    density there is 0: no flow through this layer puts mass there).

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
    _anchor: Tensor

    def __init__(self, bounds: Any, features: int) -> None:
        super().__init__()
        self.features = check_features(features, "Support")
        spec = bounds_spec(bounds, features) or [[None, None]] * features
        self.bounds = spec
        self.names = None
        has_low = torch.tensor([lo is not None for lo, _ in spec])
        has_high = torch.tensor([hi is not None for _, hi in spec])
        # The limits stay float64 whatever the model's dtype (0.3 in float32 is above 0.3,
        # 1e8 + 1 is 1e8); the anchor carries the model's dtype, that of the output.
        for name, value in (("low", [0.0 if lo is None else lo for lo, _ in spec]),
                            ("high", [1.0 if hi is None else hi for _, hi in spec])):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64),
                                 persistent=False)
        for name, mask in (("lower_only", has_low & ~has_high),
                           ("upper_only", has_high & ~has_low), ("both", has_low & has_high)):
            self.register_buffer(name, mask, persistent=False)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> Support:
        # Device moves apply to the limits too, dtype casts do not: they stay float64.
        low, high = self.low, self.high
        super()._apply(fn, recurse)
        self.low = low.to(device=self._anchor.device, dtype=torch.float64)
        self.high = high.to(device=self._anchor.device, dtype=torch.float64)
        return self

    def inside(self, x: Tensor) -> Tensor:
        """Which rows of ``x`` lie strictly inside every limit, ``(batch,)`` booleans (a
        row holding NaN counts as inside: it has no density to give, and scoring says so)."""
        return self._inside(x.to(torch.float64)).all(-1)

    def held_inside(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` in float64 with its values on or outside a limit moved inside it, and the
        rows that held such values and no NaN, ``(batch,)`` booleans: what a density maps
        before it gives those rows ``-inf`` (a row with a NaN keeps it: it has no density;
        no host sync, compilable)."""
        x = x.to(torch.float64)
        beyond = ~self._inside(x)
        centre = torch.where(self.both, self.low + (self.high - self.low) / 2, torch.where(
            self.lower_only, self.low + 1, torch.where(self.upper_only, self.high - 1, 0.0)))
        return torch.where(beyond, centre, x), beyond.any(-1) & ~torch.isnan(x).any(-1)

    def _inside(self, x: Tensor) -> Tensor:
        return ((x > self.low) | ~(self.lower_only | self.both)) & (
            (x < self.high) | ~(self.upper_only | self.both)) | torch.isnan(x)

    def _check(self, x: Tensor, given: torch.dtype) -> None:
        ok = self._inside(x)
        if torch.compiler.is_compiling() or _is_vmapped(ok) or bool(ok.all()):
            return
        rounding = ("; in float32 a value within 6e-8 of a limit rounds onto it: pass the "
                    "rows in float64" if given == torch.float32 else "")
        first = (~ok).any(1).nonzero().flatten()[:5].tolist()
        raise ValueError("Support: " + _outside(self.bounds, (~ok).sum(0).cpu().numpy(),
                                                first, self.names, rounding))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        given = x.dtype
        x = x.to(torch.float64)  # (against the float64 limits; the output in the model's dtype)
        low, high = self.low, self.high
        self._check(x, given)
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
        out = self._anchor.dtype
        return z.to(out), ladj.sum(-1).to(out)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data in float64 whatever the model's dtype (as :class:`Standardize`'s inverse):
        a sample near a limit keeps the digits that hold it inside."""
        given = z.dtype
        z = z.to(torch.float64)
        low, high = self.low, self.high
        # (held strictly inside the limits, and finite: exp overflows past z = 709,
        # sigmoid rounds to 1.0 from z of about 37, and a sum to its limit)
        width = high - low
        step = torch.exp(z).clamp(max=torch.finfo(torch.float64).max / 2)
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
        return x, ladj.sum(-1).to(given)

    def extra_repr(self) -> str:
        return f"features={self.features}, bounds={self.bounds}"


def check_rows(support: Support, data: Any, name: str = "data",
               columns: Sequence[str] | None = None) -> None:
    """Refuse rows of ``data`` on or outside ``support``'s limits, as :func:`map_rows`
    does, without mapping them (what a check before training needs)."""
    _scan(support, data, name, columns, keep=False)


def map_rows(support: Support, data: Any, name: str = "data",
             columns: Sequence[str] | None = None) -> np.ndarray:
    """The rows of ``data`` (array, tensor, memmap, lazy table) as the layers after
    ``support`` see them: float64, mapped in chunks of rows (``columns`` names the columns
    in a message).

    Raises:
        DataError: rows on or outside a limit: how many in each column (over every row)
            and the first row numbers.
    """
    parts = _scan(support, data, name, columns, keep=True)
    return torch.cat(parts).numpy() if parts else np.zeros((0, len(support.bounds)))


def _scan(support: Support, data: Any, name: str, columns: Sequence[str] | None,
          keep: bool) -> list[Tensor]:
    """One pass over ``data`` a chunk at a time: the rows outside counted (every one), the
    mapped chunks kept while none is (with ``keep``)."""
    mapped = copy.deepcopy(support).double().cpu()
    parts: list[Tensor] = []
    outside = np.zeros(len(support.bounds), dtype=np.int64)
    first: list[int] = []
    with torch.no_grad():
        for start in range(0, len(data), _CHUNK):
            block = data[start : start + _CHUNK]
            if isinstance(block, Tensor):
                block = block.detach().cpu()
            x = torch.tensor(np.asarray(block, dtype=np.float64))  # (a copy: a writable one)
            ok = mapped._inside(x)
            if not bool(ok.all()):
                outside += (~ok).sum(0).numpy()
                first += (start + (~ok).any(1).nonzero().flatten()[: 5 - len(first)]).tolist()
            if keep and not outside.any():
                parts.append(mapped(x)[0])
    if outside.any():
        raise DataError(f"{name}: " + _outside(support.bounds, outside, first, columns))
    return parts
