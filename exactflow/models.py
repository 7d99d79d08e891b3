"""Model builders: each returns an :class:`exactflow.Flow` over a standard normal.

Every builder takes ``(features, *, layers=..., hidden=..., context=0, ...)`` with the same
keyword names, and records its own name and arguments in ``flow.config`` so that
:func:`exactflow.save` can store a model as JSON plus weights and :func:`exactflow.load`
can rebuild it without running code from the file.

=========  ====================================================  ===========================
builder    layers                                                fast direction
=========  ====================================================  ===========================
realnvp    affine couplings, alternating masks, batch norm       both
nice       additive couplings, alternating masks, final scale    both
maf        MADE affine layers with permutations between          density (or ``fast=``)
iaf        MADE affine layers with permutations between          sampling (or ``fast=``)
nsf        spline couplings or spline MADE layers                both (coupling) / ``fast=``
planar     planar layers                                         sampling
radial     radial layers                                         sampling (density closed form)
=========  ====================================================  ===========================
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from .core import Compose, Transform
from .distributions import Flow, StandardNormal
from .transforms.autoregressive import (
    InverseAutoregressive,
    MaskedAffineAutoregressive,
    SplineAutoregressive,
)
from .transforms.coupling import AdditiveCoupling, AffineCoupling, SplineCoupling
from .transforms.elementwise import ElementwiseAffine
from .transforms.linear import Permutation, Reverse
from .transforms.normalization import BatchNorm
from .transforms.planar import Planar, Radial

__all__ = ["build", "available", "realnvp", "nice", "maf", "iaf", "nsf", "planar", "radial"]

_BUILDERS: dict[str, Callable[..., Flow]] = {}


def _register(fn: Callable[..., Flow]) -> Callable[..., Flow]:
    """Register a builder and make it record its configuration in ``flow.config``."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, standardize: bool = False, **kwargs: Any) -> Flow:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        flow = fn(*bound.args, **bound.kwargs)
        config = {"model": fn.__name__}
        for key, value in bound.arguments.items():
            config[key] = list(value) if isinstance(value, tuple) else value
        if standardize:
            flow = _standardized(flow)
            config["standardize"] = True
        flow.config = config
        return flow

    _BUILDERS[fn.__name__] = wrapper
    return wrapper


def available() -> list[str]:
    """Names of the registered builders."""
    return sorted(_BUILDERS)


def build(config: dict[str, Any]) -> Flow:
    """Rebuild a flow from its ``config`` (``{"model": name, **arguments}``).

    Raises:
        ValueError: the model name is unknown or an argument does not fit the builder.
    """
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError("a model config is a dict with a 'model' key naming the builder")
    name = config["model"]
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    kwargs = {k: v for k, v in config.items() if k not in ("model", "standardize")}
    try:
        inspect.signature(_BUILDERS[name]).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"config does not fit the {name!r} builder: {err}") from None
    return _BUILDERS[name](**kwargs, standardize=bool(config.get("standardize", False)))


def _standardized(flow: Flow) -> Flow:
    """``flow`` with a fixed :class:`~exactflow.datasets.Standardize` layer put first.

    Every builder takes ``standardize=True`` (recorded in ``flow.config``): the layer starts
    as the identity and its ``mean``/``std`` buffers are set from the training data (e.g.
    ``flow.transform[0].mean.copy_(...)``) and saved with the weights, so ``log_prob`` stays
    in the units of the data.
    """
    from .datasets import Standardize

    first = Standardize.identity(flow.features)
    return Flow(Compose(first, flow.transform), flow.base, context=flow.context_features)


# -- helpers -------------------------------------------------------------------------------

_MASKS = ("even", "odd")


def _hidden(hidden: Sequence[int] | int) -> tuple[int, ...]:
    return (hidden,) if isinstance(hidden, int) else tuple(hidden)


def _layers(layers: int) -> int:
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive integer, got {layers!r}")
    return layers


def _choice(value: str, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def _permutation(features: int, kind: str, index: int) -> Transform:
    # A fixed seed per position, so build(config) makes the same flow every time.
    return Reverse(features) if kind == "reverse" else Permutation(features, seed=index)


def _flow(transforms: list[Transform], features: int, context: int) -> Flow:
    return Flow(Compose(*transforms), StandardNormal(features), context=context)


def _unconditional(name: str, context: int) -> None:
    if context != 0:
        raise ValueError(
            f"{name} flows are unconditional: context must be 0, got {context!r}; use "
            f"realnvp, nice, maf, iaf or nsf for a conditional flow"
        )


# -- coupling flows ------------------------------------------------------------------------


@_register
def realnvp(
    features: int,
    *,
    layers: int = 8,
    hidden: Sequence[int] = (64, 64),
    batch_norm: bool = True,
    context: int = 0,
) -> Flow:
    """RealNVP: affine coupling layers with alternating checkerboard masks.

    ``layers`` :class:`~exactflow.transforms.AffineCoupling` layers, the first transforming
    the even features given the odd ones, the next the odd given the even, and so on (every
    feature is transformed, for odd ``features`` too), with a
    :class:`~exactflow.transforms.BatchNorm` between consecutive couplings when
    ``batch_norm``. Fast in both directions: density and sampling each take one
    conditioner pass per layer.

    Args:
        features: data dimension (at least 2).
        layers: number of coupling layers.
        hidden: hidden layer sizes of each conditioner MLP.
        batch_norm: put batch normalization between couplings (call ``flow.eval()``
            before evaluating or sampling).
        context: size of the conditioning vector (0 for an unconditional flow).

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2016),
        arXiv:1605.08803.

    Example:
        >>> import torch, exactflow as ef
        >>> flow = ef.models.realnvp(2, layers=4, hidden=(16, 16))
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """
    layers = _layers(layers)
    transforms: list[Transform] = []
    for i in range(layers):
        if i > 0 and batch_norm:
            transforms.append(BatchNorm(features))
        transforms.append(
            AffineCoupling(features, hidden=_hidden(hidden), mask=_MASKS[i % 2], context=context)
        )
    return _flow(transforms, features, context)


@_register
def nice(
    features: int,
    *,
    layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    context: int = 0,
) -> Flow:
    """NICE: additive (volume-preserving) couplings with alternating masks and a final scale.

    ``layers`` :class:`~exactflow.transforms.AdditiveCoupling` layers with alternating
    checkerboard masks, then a learned diagonal scaling
    (:class:`~exactflow.transforms.ElementwiseAffine`), the only layer that changes volume.
    Fast in both directions.

    Args:
        features: data dimension (at least 2).
        layers: number of coupling layers.
        hidden: hidden layer sizes of each conditioner MLP.
        context: size of the conditioning vector.

    References:
        Dinh, Krueger & Bengio, NICE: Non-linear Independent Components Estimation (2014),
        arXiv:1410.8516.
    """
    layers = _layers(layers)
    transforms: list[Transform] = [
        AdditiveCoupling(features, hidden=_hidden(hidden), mask=_MASKS[i % 2], context=context)
        for i in range(layers)
    ]
    transforms.append(ElementwiseAffine(features))
    return _flow(transforms, features, context)


# -- autoregressive flows ------------------------------------------------------------------


def _autoregressive(
    features: int,
    layers: int,
    hidden: Sequence[int],
    context: int,
    fast: str,
    permutation: str,
    batch_norm: bool,
) -> Flow:
    layers = _layers(layers)
    _choice(fast, "fast", ("density", "sampling"))
    _choice(permutation, "permutation", ("reverse", "random"))
    layer_type = MaskedAffineAutoregressive if fast == "density" else InverseAutoregressive
    transforms: list[Transform] = []
    for i in range(layers):
        if i > 0:
            if batch_norm:
                transforms.append(BatchNorm(features))
            transforms.append(_permutation(features, permutation, i))
        transforms.append(layer_type(features, hidden=_hidden(hidden), context=context))
    return _flow(transforms, features, context)


@_register
def maf(
    features: int,
    *,
    layers: int = 5,
    hidden: Sequence[int] = (64, 64),
    context: int = 0,
    fast: str = "density",
    permutation: str = "reverse",
    batch_norm: bool = False,
) -> Flow:
    """MAF: masked affine autoregressive layers with permutations between them.

    With ``fast="density"`` (the default) the layers are
    :class:`~exactflow.transforms.MaskedAffineAutoregressive`: ``log_prob`` takes one MADE
    pass per layer and ``sample`` ``features`` passes per layer. With ``fast="sampling"``
    they are :class:`~exactflow.transforms.InverseAutoregressive` (an IAF): the reverse.

    Args:
        features: data dimension (1 is allowed).
        layers: number of autoregressive layers.
        hidden: hidden layer sizes of each MADE.
        context: size of the conditioning vector.
        fast: ``"density"`` or ``"sampling"``.
        permutation: ``"reverse"`` or ``"random"`` (seeded, so rebuilds are identical)
            between layers.
        batch_norm: add batch normalization between layers, as in the MAF paper.

    References:
        Papamakarios, Pavlakou & Murray, Masked Autoregressive Flow for Density Estimation
        (2017), arXiv:1705.07057.

    Example:
        >>> import exactflow as ef
        >>> flow = ef.models.maf(3, layers=2, hidden=(16,), context=2)
        >>> flow.sample(4, context=[0.0, 1.0]).shape
        torch.Size([4, 3])
    """
    return _autoregressive(features, layers, hidden, context, fast, permutation, batch_norm)


@_register
def iaf(
    features: int,
    *,
    layers: int = 5,
    hidden: Sequence[int] = (64, 64),
    context: int = 0,
    fast: str = "sampling",
    permutation: str = "reverse",
    batch_norm: bool = False,
) -> Flow:
    """IAF: :func:`maf` with the fast direction on sampling by default.

    :class:`~exactflow.transforms.InverseAutoregressive` layers: ``sample`` and
    ``sample_and_log_prob`` take one MADE pass per layer (the natural fit for variational
    inference and reverse-KL fitting), ``log_prob`` of new data ``features`` passes per
    layer. Arguments as in :func:`maf`.

    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, Improved Variational
        Inference with Inverse Autoregressive Flow (2016), arXiv:1606.04934.
    """
    return _autoregressive(features, layers, hidden, context, fast, permutation, batch_norm)


# -- spline flows --------------------------------------------------------------------------


@_register
def nsf(
    features: int,
    *,
    layers: int = 5,
    hidden: Sequence[int] = (64, 64),
    context: int = 0,
    kind: str = "coupling",
    bins: int = 8,
    bound: float = 5.0,
    fast: str = "density",
    permutation: str = "reverse",
) -> Flow:
    """Neural spline flow: rational-quadratic spline couplings or autoregressive layers.

    * ``kind="coupling"``: :class:`~exactflow.transforms.SplineCoupling` layers with
      alternating checkerboard masks (every feature is transformed; ``features >= 2``),
      fast in both directions. ``permutation="random"`` adds a seeded random permutation
      between layers; ``"reverse"`` adds nothing (the alternating masks already swap the
      roles of the two halves).
    * ``kind="autoregressive"``: :class:`~exactflow.transforms.SplineAutoregressive`
      layers with a ``permutation`` between them; ``fast`` picks the one-pass direction
      as in :func:`maf`.

    The splines act on ``[-bound, bound]`` and are the identity outside: standardize the
    data first.

    Args:
        features: data dimension.
        layers: number of spline layers.
        hidden: hidden layer sizes of each conditioner.
        context: size of the conditioning vector.
        kind: ``"coupling"`` or ``"autoregressive"``.
        bins: spline bins per feature.
        bound: the splines' interval is ``[-bound, bound]``.
        fast: for ``kind="autoregressive"``: ``"density"`` or ``"sampling"``.
        permutation: ``"reverse"`` or ``"random"``.

    References:
        Durkan, Bekasov, Murray & Papamakarios, Neural Spline Flows (2019),
        arXiv:1906.04032.
    """
    layers = _layers(layers)
    _choice(kind, "kind", ("coupling", "autoregressive"))
    _choice(fast, "fast", ("density", "sampling"))
    _choice(permutation, "permutation", ("reverse", "random"))
    transforms: list[Transform] = []
    for i in range(layers):
        if kind == "coupling":
            if i > 0 and permutation == "random":
                transforms.append(_permutation(features, permutation, i))
            transforms.append(
                SplineCoupling(
                    features, bins, bound, hidden=_hidden(hidden), mask=_MASKS[i % 2],
                    context=context,
                )
            )
        else:
            if i > 0:
                transforms.append(_permutation(features, permutation, i))
            transforms.append(
                SplineAutoregressive(
                    features, bins, bound, hidden=_hidden(hidden), context=context, fast=fast
                )
            )
    return _flow(transforms, features, context)


# -- residual flows of Rezende & Mohamed ---------------------------------------------------


@_register
def planar(features: int, *, layers: int = 16, context: int = 0) -> Flow:
    """Planar flow: ``layers`` :class:`~exactflow.transforms.Planar` layers.

    Each layer's closed form runs latent -> data, so ``sample`` is one O(d) pass per layer;
    ``log_prob`` solves one scalar equation per row and layer (Newton). Unconditional.

    References:
        Rezende & Mohamed, Variational Inference with Normalizing Flows (2015),
        arXiv:1505.05770.
    """
    _unconditional("planar", context)
    return _flow([Planar(features) for _ in range(_layers(layers))], features, context)


@_register
def radial(features: int, *, layers: int = 16, context: int = 0) -> Flow:
    """Radial flow: ``layers`` :class:`~exactflow.transforms.Radial` layers.

    Each layer's closed form runs latent -> data (``sample``, one O(d) pass per layer);
    ``log_prob`` inverts it per row by a closed-form scalar root. Unconditional.

    References:
        Rezende & Mohamed, Variational Inference with Normalizing Flows (2015),
        arXiv:1505.05770.
    """
    _unconditional("radial", context)
    return _flow([Radial(features) for _ in range(_layers(layers))], features, context)
