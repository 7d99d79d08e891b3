"""Elementwise monotonic maps: the part of a coupling or autoregressive layer that transforms.

A coupling or autoregressive layer is a conditioner (a network that outputs parameters)
plus one of these maps, applied feature by feature with the parameters it is given. A map
knows how many parameters per feature it needs and provides both directions with their
elementwise log-derivatives::

    y, log_dy_dx = map.forward(x, params)     # params: (..., params_per_feature)
    x, log_dx_dy = map.inverse(y, params)     # log_dx_dy = -log_dy_dx at the same point

Every map is the identity when all its parameters are zero, so a layer whose conditioner
starts with a zero last layer starts as the identity. A new map slots into
:class:`~exactflow.transforms.coupling.Coupling` and
:class:`~exactflow.transforms.autoregressive.MaskedAutoregressive` without a new layer class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .splines import rational_quadratic

__all__ = [
    "MonotonicMap",
    "AffineMap",
    "AdditiveMap",
    "SplineMap",
    "monotonic_map",
    "register_map",
    "available_maps",
    "apply_map",
]


class MonotonicMap:
    """An increasing elementwise map ``y = g(x; params)`` with a closed-form inverse.

    Subclasses set :attr:`params_per_feature` and implement :meth:`forward` and
    :meth:`inverse`. ``params`` has shape ``x.shape + (params_per_feature,)``.
    """

    #: How many parameters the conditioner must output for each transformed feature.
    params_per_feature: int = 0

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log|dy/dx|)``, both shaped like ``x``."""
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|dx/dy|)``, both shaped like ``y``."""
        raise NotImplementedError

    def config(self) -> dict[str, float | int]:
        """The map's hyperparameters (for ``repr``)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def apply_map(
    g: MonotonicMap, x: Tensor, params: Tensor, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """``g.forward(x, params)`` (``g.inverse`` with ``inverse``), its two outputs checked to
    be shaped like ``x``: a map of the user's that returns one log-derivative per row, not
    per feature, is named here, not found by an index error further on."""
    y, log_det = g.inverse(x, params) if inverse else g.forward(x, params)
    if torch.jit.is_tracing():  # (a trace records sizes as tensors: no Python test of them)
        return y, log_det
    if y.shape != x.shape or log_det.shape != x.shape:
        name = f"{type(g).__name__}.{'inverse' if inverse else 'forward'}"
        raise ValueError(
            f"{name} returned values of shape {tuple(y.shape)} and log-derivatives of shape "
            f"{tuple(log_det.shape)} for input of shape {tuple(x.shape)}: both must be "
            "shaped like the input (one log-derivative per feature, not summed)"
        )
    return y, log_det


class AdditiveMap(MonotonicMap):
    """A shift, ``y = x + t`` (NICE): one parameter ``t`` per feature, ``log|dy/dx| = 0``.

    References:
        Dinh, Krueger & Bengio, NICE: Non-linear Independent Components Estimation (2014),
        arXiv:1410.8516.
    """

    params_per_feature = 1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return x + params.squeeze(-1), torch.zeros_like(x)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return y - params.squeeze(-1), torch.zeros_like(y)


class AffineMap(MonotonicMap):
    """A scale and shift, ``y = x * exp(s) + t`` (RealNVP, MAF), two parameters per feature.

    The parameters are ``(t, a)`` and the log-scale is soft-clamped,
    ``s = scale_bound * tanh(a / scale_bound)``, so every layer scales by a factor in
    ``[exp(-scale_bound), exp(scale_bound)]``. This bounds the parameterization (training
    cannot blow a scale up to inf or down to 0); it does not approximate anything: the
    log-density is exact for the ``s`` actually used, ``log|dy/dx| = s``.

    Args:
        scale_bound: the largest ``|s|`` (default 3, a factor of about 20 per layer).

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2016),
        arXiv:1605.08803.
    """

    params_per_feature = 2

    def __init__(self, scale_bound: float = 3.0) -> None:
        if not (isinstance(scale_bound, (int, float)) and math.isfinite(scale_bound)) or not (
            scale_bound > 0
        ):
            raise ValueError(f"scale_bound must be a positive finite number, got {scale_bound!r}")
        self.scale_bound = float(scale_bound)

    def _shift_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        # unbind/split rather than indexing: their backward is one stack/cat instead of a
        # zero-filled tensor per slice.
        shift, raw = params.unbind(dim=-1)
        log_scale = self.scale_bound * torch.tanh(raw / self.scale_bound)
        return shift, log_scale

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(params)
        return x * torch.exp(log_scale) + shift, log_scale

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(params)
        return (y - shift) * torch.exp(-log_scale), -log_scale

    def config(self) -> dict[str, float | int]:
        return {"scale_bound": self.scale_bound}


class SplineMap(MonotonicMap):
    """A monotonic rational-quadratic spline on ``[-bound, bound]``, identity outside.

    ``3 * bins - 1`` parameters per feature: ``bins`` unnormalized widths, ``bins``
    unnormalized heights and ``bins - 1`` unnormalized derivatives at the interior knots
    (the boundary derivatives are 1, so the spline meets the identity tails smoothly).
    Both directions are closed form (the inverse solves a quadratic in the bin); the
    log-derivative is analytic. See :func:`exactflow.transforms.splines.rational_quadratic`.

    Args:
        bins: number of bins ``K``.
        bound: the spline acts on ``[-bound, bound]``; standardize data so that most of it
            falls inside, as outside the map is the identity.

    References:
        Durkan, Bekasov, Murray & Papamakarios, Neural Spline Flows (2019),
        arXiv:1906.04032.
    """

    def __init__(self, bins: int = 8, bound: float = 5.0) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins!r}")
        if not (isinstance(bound, (int, float)) and math.isfinite(bound)) or not bound > 0:
            raise ValueError(f"bound must be a positive finite number, got {bound!r}")
        self.bins = bins
        self.bound = float(bound)
        self.params_per_feature = 3 * bins - 1

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = self.bins
        widths, heights, derivatives = params.split([k, k, k - 1], dim=-1)
        return widths, heights, derivatives

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        widths, heights, derivatives = self._split(params)
        return rational_quadratic(x, widths, heights, derivatives, self.bound, inverse=False)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        widths, heights, derivatives = self._split(params)
        return rational_quadratic(y, widths, heights, derivatives, self.bound, inverse=True)

    def config(self) -> dict[str, float | int]:
        return {"bins": self.bins, "bound": self.bound}


_MAPS: dict[str, Callable[..., MonotonicMap]] = {
    "additive": AdditiveMap,
    "affine": AffineMap,
    "spline": SplineMap,
}


def register_map(
    name: str, factory: Callable[..., MonotonicMap] | None = None, *, replace: bool = False
) -> Any:
    """Register an elementwise monotonic map under ``name``, for every layer to use.

    A registered map is accepted wherever a map name is (``Coupling(d, "name")``,
    ``MaskedAutoregressive(d, "name")``, :func:`monotonic_map`), so a new elementwise map
    plugs into the coupling and autoregressive layers without a new layer class. The map
    must be the identity when all its parameters are zero for a layer to start as the
    identity. Use it as a decorator on the class, or call it with the class.

    Args:
        name: the name layers and configs use.
        factory: a :class:`MonotonicMap` subclass (or a function returning one) taking the
            map's hyperparameters as keyword arguments.
        replace: allow replacing a map registered under the same name.

    Example:
        >>> import torch, exactflow as ef
        >>> @ef.transforms.register_map("shift_doc", replace=True)
        ... class Shift(ef.transforms.MonotonicMap):
        ...     params_per_feature = 1
        ...     def forward(self, x, params):
        ...         return x + params[..., 0], torch.zeros_like(x)
        ...     def inverse(self, y, params):
        ...         return y - params[..., 0], torch.zeros_like(y)
        >>> ef.transforms.Coupling(2, "shift_doc", hidden=(8,)).monotonic
        Shift()
    """
    if factory is None:
        return lambda f: register_map(name, f, replace=replace)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a map name is a non-empty string, got {name!r}")
    if name in _MAPS and not replace:
        raise ValueError(
            f"a monotonic map named {name!r} is registered already; pass replace=True"
        )
    _MAPS[name] = factory
    return factory


def available_maps() -> list[str]:
    """The names of the registered monotonic maps."""
    return sorted(_MAPS)


def monotonic_map(name: str | MonotonicMap, **kwargs: float | int) -> MonotonicMap:
    """A map from its name (``"additive"``, ``"affine"``, ``"spline"`` or one registered
    with :func:`register_map`) and hyperparameters.

    A :class:`MonotonicMap` instance is returned as is.

    Example:
        >>> import exactflow as ef
        >>> ef.transforms.monotonic_map("spline", bins=4).params_per_feature
        11
    """
    if isinstance(name, MonotonicMap):
        if kwargs:
            raise ValueError("hyperparameters are given with a map name, not with a map instance")
        return name
    if name not in _MAPS:
        raise ValueError(
            f"unknown monotonic map {name!r}; choose from {', '.join(available_maps())} (or "
            "register your own with exactflow.transforms.register_map)"
        )
    made = _MAPS[name](**kwargs)
    if not isinstance(made, MonotonicMap):
        raise TypeError(f"the map registered as {name!r} made a {type(made).__name__}, "
                        "not a MonotonicMap")
    return made
