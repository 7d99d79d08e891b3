"""Invertible layers. Every one maps data -> latent in ``forward`` and back in ``inverse``."""

from .autoregressive import (
    InverseAutoregressive,
    MaskedAffineAutoregressive,
    MaskedAutoregressive,
    SplineAutoregressive,
)
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, SplineCoupling
from .elementwise import ElementwiseAffine, Logit, Sigmoid
from .linear import ContextShift, LULinear, Permutation, Reverse
from .monotonic import (
    AdditiveMap,
    AffineMap,
    MonotonicMap,
    SplineMap,
    available_maps,
    monotonic_map,
    register_map,
)
from .normalization import ActNorm, BatchNorm
from .planar import Planar, Radial
from .standardize import Standardize
from .support import Support

__all__ = [
    "ElementwiseAffine",
    "Sigmoid",
    "Logit",
    "Permutation",
    "Reverse",
    "LULinear",
    "ContextShift",
    "Coupling",
    "AdditiveCoupling",
    "AffineCoupling",
    "SplineCoupling",
    "MaskedAutoregressive",
    "MaskedAffineAutoregressive",
    "InverseAutoregressive",
    "SplineAutoregressive",
    "MonotonicMap",
    "AffineMap",
    "AdditiveMap",
    "SplineMap",
    "monotonic_map",
    "register_map",
    "available_maps",
    "Planar",
    "Radial",
    "Standardize",
    "Support",
    "BatchNorm",
    "ActNorm",
]
