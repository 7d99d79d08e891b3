"""The eight 2D benchmark densities of the flow literature, with their true entropies.

:func:`toy` draws them (the FFJORD definitions), and :data:`TOY_ENTROPY` gives each one's
differential entropy, so a model's ``test NLL - H`` is an absolute measure of how far it is
from perfect.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["TOYS", "TOY_ENTROPY", "toy"]


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    # scikit-learn make_moons(noise=0.1): upper arc (cos t, sin t) and lower arc
    # (1 - cos t, 0.5 - sin t), t in [0, pi], each with probability 1/2; then 2x + (-1, -0.2).
    t = rng.uniform(0.0, math.pi, n)
    lower = rng.random(n) < 0.5
    x = np.where(lower, 1.0 - np.cos(t), np.cos(t))
    y = np.where(lower, 0.5 - np.sin(t), np.sin(t))
    pts = np.stack([x, y], axis=1) + rng.normal(scale=0.1, size=(n, 2))
    return 2.0 * pts + np.array([-1.0, -0.2])


def _circles(rng: np.random.Generator, n: int) -> np.ndarray:
    # scikit-learn make_circles(factor=0.5, noise=0.08), then * 3.
    t = rng.uniform(0.0, 2 * math.pi, n)
    radius = np.where(rng.random(n) < 0.5, 0.5, 1.0)
    pts = radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    pts = pts + rng.normal(scale=0.08, size=(n, 2))
    return 3.0 * pts


def _rings(rng: np.random.Generator, n: int) -> np.ndarray:
    # Four circles of radius 3, 2.25, 1.5, 0.75 with equal weight, noise 0.08.
    t = rng.uniform(0.0, 2 * math.pi, n)
    radius = 3.0 * np.array([1.0, 0.75, 0.5, 0.25])[rng.integers(0, 4, n)]
    pts = radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    return pts + rng.normal(scale=0.08, size=(n, 2))


def _eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    # Centres at radius 4 every 45 degrees, std 0.5, everything divided by 1.414.
    angle = rng.integers(0, 8, n) * (math.pi / 4)
    centres = 4.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (centres + rng.normal(scale=0.5, size=(n, 2))) / 1.414


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    # x1 ~ U[-2, 2); x2 in the unit cell above or below, shifted by the parity of floor(x1);
    # then * 2: eight 2x2 squares in [-4, 4]^2 (density 1/32 on each).
    x1 = rng.uniform(-2.0, 2.0, n)
    x2 = rng.random(n) - 2.0 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], axis=1)


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    # Five arms; radial coordinate ~ N(1, 0.3), tangential ~ N(0, 0.1); a point is rotated by
    # its arm's angle plus 0.25 * exp(radial), then * 2.
    arm = rng.integers(0, 5, n)
    radial = 1.0 + 0.3 * rng.standard_normal(n)
    tangential = 0.1 * rng.standard_normal(n)
    angle = arm * (2 * math.pi / 5) + 0.25 * np.exp(radial)
    c, s = np.cos(angle), np.sin(angle)
    return 2.0 * np.stack([radial * c + tangential * s, -radial * s + tangential * c], axis=1)


def _two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    # Angle sqrt(U) * 3 pi, arm (-cos t * t, sin t * t) + U[0, 0.5)^2 jitter, the second arm
    # its negative, all / 3, plus N(0, 0.1^2) noise.
    t = np.sqrt(rng.random(n)) * (3 * math.pi)
    x = -np.cos(t) * t + 0.5 * rng.random(n)
    y = np.sin(t) * t + 0.5 * rng.random(n)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    pts = sign[:, None] * np.stack([x, y], axis=1) / 3.0
    return pts + rng.normal(scale=0.1, size=(n, 2))


def _swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    # scikit-learn make_swiss_roll(noise=1.0), coordinates (x, z), / 5.
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.random(n))
    pts = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return (pts + rng.standard_normal((n, 2))) / 5.0


_TOY_GENERATORS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
    "rings": _rings,
    "swissroll": _swissroll,
}

#: Names accepted by :func:`toy`.
TOYS: tuple[str, ...] = tuple(_TOY_GENERATORS)

#: True differential entropy H (nats) of each :func:`toy` generator, the best expected test NLL
#: any model can reach; ``test NLL - H >= 0`` up to sampling noise. Closed form for
#: checkerboard (ln 32); the others by Monte Carlo with exact densities (standard error about
#: 0.002). ``pinwheel`` has no reference value (its density has no closed form) and is absent.
#: Standardizing the data by ``x / s`` shifts H by ``-sum(log s)``.
TOY_ENTROPY: dict[str, float] = {
    "checkerboard": math.log(32.0),
    "8gaussians": 2.833,
    "moons": 2.394,
    "circles": 3.267,
    "rings": 2.624,
    "swissroll": 2.669,
    "2spirals": 2.646,
}


def toy(name: str, n: int, seed: int = 0) -> Tensor:
    """Draw ``n`` i.i.d. points from a 2D benchmark density.

    The definitions and parameters are FFJORD's (Grathwohl et al. 2019, ``lib/toy_data.py``),
    used across the flow literature, so :data:`TOY_ENTROPY` applies:

    * ``moons``: scikit-learn's ``make_moons(noise=0.1)``: arcs ``(cos t, sin t)`` and
      ``(1 - cos t, 0.5 - sin t)``, ``t ~ U[0, pi]``, Gaussian noise std 0.1; then
      ``2 x + (-1, -0.2)``.
    * ``circles``: ``make_circles(factor=0.5, noise=0.08)``: unit and half-unit circles,
      noise std 0.08; then ``* 3``.
    * ``8gaussians``: centres at radius 4 every 45 degrees, std 0.5, all divided by 1.414.
    * ``checkerboard``: eight 2x2 squares of a checkerboard in ``[-4, 4]^2``, uniform.
    * ``pinwheel``: five arms; radial ``N(1, 0.3^2)``, tangential ``N(0, 0.1^2)``, rotated by
      the arm's angle plus ``0.25 exp(radial)``; then ``* 2``.
    * ``2spirals``: angle ``t = sqrt(U) 3 pi``, arm ``(-t cos t, t sin t)`` plus
      ``U[0, 0.5)`` jitter per coordinate, and its mirror image; ``/ 3``, noise std 0.1.
    * ``rings``: four circles of radius 3, 2.25, 1.5, 0.75, noise std 0.08.
    * ``swissroll``: ``make_swiss_roll(noise=1.0)`` coordinates ``(x, z)``:
      ``t = 1.5 pi (1 + 2U)``, ``(t cos t, t sin t) + N(0, I)``; then ``/ 5``.

    Mixture components (moon, circle, ring, arm, centre) are chosen independently per point
    and angles are drawn uniformly, where scikit-learn and FFJORD use fixed counts and evenly
    spaced angles: the density is the same, and the points are a true i.i.d. sample of it,
    which an honest test NLL needs.

    Args:
        name: one of :data:`TOYS`.
        n: number of points (>= 1).
        seed: seed of a local ``numpy.random.Generator``; the global RNG is untouched.

    Returns:
        A ``(n, 2)`` float32 tensor.

    Raises:
        ValueError: unknown ``name`` or ``n < 1``.

    Example:
        >>> import exactflow as ef
        >>> ef.datasets.toy("moons", 5).shape
        torch.Size([5, 2])
    """
    if name not in _TOY_GENERATORS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOYS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"toy({name!r}, n) needs an integer n >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    pts = _TOY_GENERATORS[name](rng, int(n))
    return torch.from_numpy(np.ascontiguousarray(pts, dtype=np.float32))
