"""The built-in flow builders: each returns an :class:`exactflow.Flow` over a standard normal.

Every builder takes ``features`` and the keywords ``standardize``, ``embedding`` and
``base``; those with conditioner networks (realnvp, nice, maf, iaf, nsf) also take
``layers``, ``hidden`` and ``context`` (planar and radial: ``layers``; they are
unconditional, ``context=0``), with the same names everywhere. Each records its own name
and arguments in ``flow.config`` so that :func:`exactflow.save` can store a model as JSON
plus weights and :func:`exactflow.load` can rebuild it without running code from the file.

A user's own builder joins them with :func:`register`: the flows it makes then record their
config, save and load like the built-in ones (the loading process must have registered the
same builder, as a class must be importable to unpickle it).

=========  ====================================================  ===========================
builder    layers                                                fast direction
=========  ====================================================  ===========================
realnvp    affine couplings, alternating masks, batch norm       both
nice       additive couplings, alternating masks, final scale    both
maf        MADE affine layers with permutations between          density
iaf        MADE affine layers with permutations between          sampling
nsf        spline couplings or spline MADE layers                both (coupling) / ``fast=``
planar     planar layers                                         sampling
radial     radial layers                                         both (closed form)
=========  ====================================================  ===========================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..core import Compose, Transform
from ..distributions import Flow, StandardNormal
from ..nn import with_dropout
from ..transforms.autoregressive import (
    InverseAutoregressive,
    MaskedAffineAutoregressive,
    SplineAutoregressive,
)
from ..transforms.coupling import AdditiveCoupling, AffineCoupling, SplineCoupling
from ..transforms.elementwise import ElementwiseAffine
from ..transforms.linear import Permutation, Reverse
from ..transforms.normalization import BatchNorm
from ..transforms.planar import Planar, Radial
from ..validation import choice, hidden_sizes, positive_int
from .registry import register

__all__ = ["realnvp", "nice", "maf", "iaf", "nsf", "planar", "radial"]


# -- helpers -------------------------------------------------------------------------------

_MASKS = ("even", "odd")


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


@register
def realnvp(
    features: int,
    *,
    layers: int = 8,
    hidden: Sequence[int] = (64, 64),
    batch_norm: bool = True,
    context: int = 0,
    dropout: float = 0.0,
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
        dropout: dropout probability after each hidden activation of the conditioners,
            in training mode only (:func:`exactflow.nn.with_dropout`).

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2016),
        arXiv:1605.08803.

    Example:
        >>> import torch, exactflow as ef
        >>> flow = ef.models.realnvp(2, layers=4, hidden=(16, 16))
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """
    layers = positive_int(layers, "layers")
    transforms: list[Transform] = []
    for i in range(layers):
        if i > 0 and batch_norm:
            transforms.append(BatchNorm(features))
        transforms.append(
            AffineCoupling(
                features, hidden=hidden_sizes(hidden), mask=_MASKS[i % 2], context=context,
                activation=with_dropout(dropout),
            )
        )
    return _flow(transforms, features, context)


@register
def nice(
    features: int,
    *,
    layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    context: int = 0,
    dropout: float = 0.0,
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
        dropout: dropout probability in the conditioners, in training mode only.

    References:
        Dinh, Krueger & Bengio, NICE: Non-linear Independent Components Estimation (2014),
        arXiv:1410.8516.
    """
    layers = positive_int(layers, "layers")
    transforms: list[Transform] = [
        AdditiveCoupling(
            features, hidden=hidden_sizes(hidden), mask=_MASKS[i % 2], context=context,
            activation=with_dropout(dropout),
        )
        for i in range(layers)
    ]
    transforms.append(ElementwiseAffine(features))
    return _flow(transforms, features, context)


# -- autoregressive flows ------------------------------------------------------------------


def _autoregressive(
    layer_type: type[MaskedAffineAutoregressive] | type[InverseAutoregressive],
    features: int,
    layers: int,
    hidden: Sequence[int],
    context: int,
    permutation: str,
    batch_norm: bool,
    dropout: float = 0.0,
) -> Flow:
    layers = positive_int(layers, "layers")
    choice(permutation, "permutation", ("reverse", "random"))
    transforms: list[Transform] = []
    for i in range(layers):
        if i > 0:
            if batch_norm:
                transforms.append(BatchNorm(features))
            transforms.append(_permutation(features, permutation, i))
        transforms.append(layer_type(features, hidden=hidden_sizes(hidden), context=context,
                                     activation=with_dropout(dropout)))
    return _flow(transforms, features, context)


_AUTOREGRESSIVE_ARGS = """
    Args:
        features: data dimension (1 is allowed).
        layers: number of autoregressive layers.
        hidden: hidden layer sizes of each MADE.
        context: size of the conditioning vector.
        permutation: ``"reverse"`` or ``"random"`` (seeded, so rebuilds are identical)
            between layers.
        batch_norm: add batch normalization between layers, as in the MAF paper.
        dropout: dropout probability in the MADEs, in training mode only (the MADE then
            runs its composable pass instead of the fused ReLU one).
"""


def _autoregressive_builder(
    name: str,
    layer_type: type[MaskedAffineAutoregressive] | type[InverseAutoregressive],
    doc: str,
) -> Callable[..., Flow]:
    """A registered builder of ``layer_type`` layers: MAF and IAF share everything else."""

    def builder(
        features: int,
        *,
        layers: int = 5,
        hidden: Sequence[int] = (64, 64),
        context: int = 0,
        permutation: str = "reverse",
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> Flow:
        return _autoregressive(
            layer_type, features, layers, hidden, context, permutation, batch_norm, dropout
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc.replace("{args}", _AUTOREGRESSIVE_ARGS.strip("\n"))
    return register(builder)


maf = _autoregressive_builder("maf", MaskedAffineAutoregressive, """MAF: masked affine \
autoregressive layers with permutations between them, fast for density.

    :class:`~exactflow.transforms.MaskedAffineAutoregressive` layers: ``log_prob`` takes one
    MADE pass per layer; ``sample`` is sequential, ``features`` steps per layer
    (:meth:`~exactflow.nn.MADE.autoregress`) that together cost about the multiply-adds of
    one pass, in ``features`` rounds of small products. For the reverse trade (fast
    sampling, as in variational inference) use :func:`iaf`.
{args}
    References:
        Papamakarios, Pavlakou & Murray, Masked Autoregressive Flow for Density Estimation
        (2017), arXiv:1705.07057.

    Example:
        >>> import exactflow as ef
        >>> flow = ef.models.maf(3, layers=2, hidden=(16,), context=2)
        >>> flow.sample(4, context=[0.0, 1.0]).shape
        torch.Size([4, 3])
    """)

iaf = _autoregressive_builder("iaf", InverseAutoregressive, """IAF: inverse \
autoregressive layers with permutations between them, fast for sampling.

    :class:`~exactflow.transforms.InverseAutoregressive` layers: ``sample`` and
    ``rsample_and_log_prob`` take one MADE pass per layer (the natural fit for variational
    inference and reverse-KL fitting); ``log_prob`` of new data is sequential, ``features``
    steps per layer (:meth:`~exactflow.nn.MADE.autoregress`) that together cost about the
    multiply-adds of one pass, in ``features`` rounds of small products. For fast density
    use :func:`maf`.
{args}
    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, Improved Variational
        Inference with Inverse Autoregressive Flow (2016), arXiv:1606.04934.
    """)


# -- spline flows --------------------------------------------------------------------------


@register
def nsf(
    features: int,
    *,
    layers: int = 5,
    hidden: Sequence[int] = (64, 64),
    context: int = 0,
    kind: str = "coupling",
    bins: int = 8,
    bound: float = 5.0,
    fast: str | None = None,
    permutation: str | None = None,
    dropout: float = 0.0,
) -> Flow:
    """Neural spline flow: rational-quadratic spline couplings or autoregressive layers.

    * ``kind="coupling"``: :class:`~exactflow.transforms.SplineCoupling` layers with
      alternating checkerboard masks (every feature is transformed; ``features >= 2``),
      fast in both directions. ``permutation="random"`` adds a seeded random permutation
      between layers (by default none: the alternating masks already swap the roles of the
      two halves). ``fast`` does not apply and is refused.
    * ``kind="autoregressive"``: :class:`~exactflow.transforms.SplineAutoregressive`
      layers with a permutation between them (``"reverse"`` by default, or ``"random"``);
      ``fast`` picks the one-pass direction, ``"density"`` (default) or ``"sampling"``.

    Warning:
        The splines act on ``[-bound, bound]`` and are the identity outside: standardize
        the data first (``standardize=True``), or features far outside the interval pass
        through untransformed.

    Args:
        features: data dimension.
        layers: number of spline layers.
        hidden: hidden layer sizes of each conditioner.
        context: size of the conditioning vector.
        kind: ``"coupling"`` or ``"autoregressive"``.
        bins: spline bins per feature.
        bound: the splines' interval is ``[-bound, bound]``.
        fast: for ``kind="autoregressive"``: ``"density"`` or ``"sampling"``.
        permutation: between layers: ``None`` (the default for the kind), ``"reverse"``
            (autoregressive only) or ``"random"``.
        dropout: dropout probability in the conditioners, in training mode only.

    References:
        Durkan, Bekasov, Murray & Papamakarios, Neural Spline Flows (2019),
        arXiv:1906.04032.
    """
    layers = positive_int(layers, "layers")
    choice(kind, "kind", ("coupling", "autoregressive"))
    transforms: list[Transform] = []
    if kind == "coupling":
        if fast is not None:
            raise ValueError(
                "fast applies to kind='autoregressive' only: spline couplings are fast in "
                f"both directions (got fast={fast!r})"
            )
        choice(permutation, "permutation", (None, "random"))
        for i in range(layers):
            if i > 0 and permutation == "random":
                transforms.append(_permutation(features, "random", i))
            transforms.append(
                SplineCoupling(
                    features, bins, bound, hidden=hidden_sizes(hidden), mask=_MASKS[i % 2],
                    context=context, activation=with_dropout(dropout),
                )
            )
    else:
        fast = choice("density" if fast is None else fast, "fast", ("density", "sampling"))
        order = choice("reverse" if permutation is None else permutation, "permutation",
                       ("reverse", "random"))
        for i in range(layers):
            if i > 0:
                transforms.append(_permutation(features, order, i))
            transforms.append(
                SplineAutoregressive(
                    features, bins, bound, hidden=hidden_sizes(hidden), context=context,
                    fast=fast, activation=with_dropout(dropout),
                )
            )
    return _flow(transforms, features, context)


# -- residual flows of Rezende & Mohamed ---------------------------------------------------


@register
def planar(features: int, *, layers: int = 16, context: int = 0) -> Flow:
    """Planar flow: ``layers`` :class:`~exactflow.transforms.Planar` layers.

    Each layer's closed form runs latent -> data, so ``sample`` is one O(d) pass per layer;
    ``log_prob`` solves one scalar equation per row and layer (Newton). Unconditional.

    References:
        Rezende & Mohamed, Variational Inference with Normalizing Flows (2015),
        arXiv:1505.05770.
    """
    _unconditional("planar", context)
    layers = positive_int(layers, "layers")
    return _flow([Planar(features) for _ in range(layers)], features, context)


@register
def radial(features: int, *, layers: int = 16, context: int = 0) -> Flow:
    """Radial flow: ``layers`` :class:`~exactflow.transforms.Radial` layers.

    Each layer's closed form runs latent -> data (``sample``, one O(d) pass per layer);
    ``log_prob`` inverts it per row by a closed-form scalar root. Unconditional.

    References:
        Rezende & Mohamed, Variational Inference with Normalizing Flows (2015),
        arXiv:1505.05770.
    """
    _unconditional("radial", context)
    layers = positive_int(layers, "layers")
    return _flow([Radial(features) for _ in range(layers)], features, context)
