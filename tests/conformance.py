"""One registry of every layer exactflow ships, for the conformance suite.

Each entry builds the layer at ``features`` (and ``context``, for the layers that take one)
and says where its inputs live. ``tests/transforms/test_conformance.py`` runs every entry
through the same checks over the ``--dtype`` and ``--device`` fixtures; a new layer is
covered by adding one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import exactflow as ef
from exactflow import transforms as T


@dataclass(frozen=True)
class Entry:
    """How to build one layer and feed it.

    Attributes:
        make: ``make(features, context) -> Transform``.
        conditional: whether the layer takes a context (``make`` gets ``context > 0``).
        unit_interval: inputs must lie in (0, 1) (the logit layers).
        min_features: the smallest width the layer supports.
        perturb: scale of the random parameter noise (0 keeps the layer as built).
        batch_statistics: training mode depends on the batch (checked in eval mode).
    """

    make: Callable[[int, int], ef.Transform]
    conditional: bool = False
    unit_interval: bool = False
    min_features: int = 1
    perturb: float = 0.3
    batch_statistics: bool = False


LAYERS: dict[str, Entry] = {
    "ElementwiseAffine": Entry(lambda d, c: T.ElementwiseAffine(d)),
    "Sigmoid": Entry(lambda d, c: T.Sigmoid(d)),
    "Logit": Entry(lambda d, c: T.Logit(features=d), unit_interval=True),
    "Logit(alpha)": Entry(lambda d, c: T.Logit(0.05, features=d), unit_interval=True),
    "Support": Entry(lambda d, c: T.Support(
        [[(0, 1), (0, None), (None, 1), None, (-1, 2)][j % 5] for j in range(d)], d),
        unit_interval=True),
    "Permutation": Entry(lambda d, c: T.Permutation(d, seed=3)),
    "Reverse": Entry(lambda d, c: T.Reverse(d)),
    "LULinear": Entry(lambda d, c: T.LULinear(d, permutation="random")),
    "ContextShift": Entry(lambda d, c: T.ContextShift(d, context=c), conditional=True),
    "Standardize": Entry(lambda d, c: T.Standardize(torch.linspace(-1, 2, d),
                                                    torch.linspace(0.5, 3, d))),
    "BatchNorm": Entry(lambda d, c: T.BatchNorm(d), batch_statistics=True),
    "ActNorm": Entry(lambda d, c: T.ActNorm(d)),
    "Planar": Entry(lambda d, c: T.Planar(d)),
    "Radial": Entry(lambda d, c: T.Radial(d)),
    "AdditiveCoupling": Entry(lambda d, c: T.AdditiveCoupling(d, hidden=(8,), context=c),
                              conditional=True, min_features=2),
    "AffineCoupling": Entry(lambda d, c: T.AffineCoupling(d, hidden=(8,), context=c),
                            conditional=True, min_features=2),
    "SplineCoupling": Entry(lambda d, c: T.SplineCoupling(d, bins=4, hidden=(8,), context=c),
                            conditional=True, min_features=2, perturb=0.2),
    "MaskedAffineAutoregressive": Entry(
        lambda d, c: T.MaskedAffineAutoregressive(d, hidden=(8,), context=c), conditional=True),
    "InverseAutoregressive": Entry(
        lambda d, c: T.InverseAutoregressive(d, hidden=(8,), context=c), conditional=True),
    "SplineAutoregressive": Entry(
        lambda d, c: T.SplineAutoregressive(d, bins=4, hidden=(8,), context=c),
        conditional=True, perturb=0.2),
    "SplineAutoregressive(sampling)": Entry(
        lambda d, c: T.SplineAutoregressive(d, bins=4, hidden=(8,), context=c,
                                            fast="sampling"),
        conditional=True, perturb=0.2),
    "Inverse(LULinear)": Entry(lambda d, c: ef.Inverse(T.LULinear(d, permutation="random"))),
    "Compose": Entry(lambda d, c: ef.Compose(T.ElementwiseAffine(d), T.Reverse(d),
                                             T.LULinear(d))),
}


def every_public_layer() -> set[str]:
    """The names of the Transform classes ``exactflow.transforms`` exports."""
    return {
        name for name in T.__all__
        if isinstance(getattr(T, name), type) and issubclass(getattr(T, name), ef.Transform)
    }
