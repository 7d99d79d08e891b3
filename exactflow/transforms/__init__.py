"""Invertible layers. Every one maps data -> latent in ``forward`` and back in ``inverse``."""

from .elementwise import ElementwiseAffine, Logit, Sigmoid
from .linear import LULinear, Permutation, Reverse

__all__ = [
    "ElementwiseAffine",
    "Sigmoid",
    "Logit",
    "Permutation",
    "Reverse",
    "LULinear",
]
