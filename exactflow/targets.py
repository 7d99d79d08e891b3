"""Unnormalized 2D densities for reverse-KL fitting: the energies U1-U4 of Rezende & Mohamed.

A target is known only up to its normalizer, ``p(z) = exp(-U(z)) / Z``. A flow ``q`` fitted
by reverse KL minimizes ``E_q[log q(z) + U(z)] = KL(q || p) - log Z``, so the bound it
reaches is ``-log Z`` plus the KL gap; :func:`log_normalizer` gives ``log Z`` by quadrature,
so the gap can be measured exactly.

With ``w1(z) = sin(pi z1 / 2)``, ``w2(z) = 3 exp(-((z1 - 1) / 0.6)^2 / 2)`` and
``w3(z) = 3 sigmoid((z1 - 1) / 0.3)`` (Rezende & Mohamed 2015, Table 1)::

    U1(z) = ((|z| - 2) / 0.4)^2 / 2
            - log(exp(-((z1 - 2) / 0.6)^2 / 2) + exp(-((z1 + 2) / 0.6)^2 / 2))
    U2(z) = ((z2 - w1) / 0.4)^2 / 2
    U3(z) = -log(exp(-((z2 - w1) / 0.35)^2 / 2) + exp(-((z2 - w1 + w2) / 0.35)^2 / 2))
    U4(z) = -log(exp(-((z2 - w1) / 0.4)^2 / 2) + exp(-((z2 - w1 + w3) / 0.35)^2 / 2))

U1 is normalizable on the plane. U2-U4 are periodic in ``z1`` and have no normalizer there;
they are confined to the box ``[-4, 4]^2`` (where the paper draws them) by a smooth wall that
is exactly zero inside the box and quadratic outside::

    C(z) = sum_i (max(|z_i| - 4, 0) / 0.1)^2 / 2

so inside the box the density is the paper's, outside it falls off like a Gaussian of width
0.1, and gradients stay finite everywhere (a hard ``-inf`` outside would give reverse-KL
training no gradient to come back with). The wall is part of the target: its ``log Z``
includes the little mass past the box edge.

References:
    Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015,
    arXiv:1505.05770 (Table 1, Figure 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import warn_user

__all__ = ["Target", "TARGETS", "WALL_BOUND", "WALL_WIDTH", "get", "log_normalizer"]

#: Half-width of the box [-4, 4]^2 to which U2-U4 are confined.
WALL_BOUND = 4.0
#: Width of the quadratic wall outside the box: the energy grows by ((d / 0.1)^2) / 2 at a
#: distance d past the edge.
WALL_WIDTH = 0.1

_TINY = 1e-12


def _w1(z: Tensor) -> Tensor:
    return torch.sin(0.5 * math.pi * z[..., 0])


def _w2(z: Tensor) -> Tensor:
    return 3.0 * torch.exp(-0.5 * ((z[..., 0] - 1.0) / 0.6) ** 2)


def _w3(z: Tensor) -> Tensor:
    return 3.0 * torch.sigmoid((z[..., 0] - 1.0) / 0.3)


def _u1(z: Tensor) -> Tensor:
    # Clamp before the square root: |z| has no gradient at 0.
    r = torch.sqrt(torch.clamp_min((z * z).sum(-1), _TINY))
    z1 = z[..., 0]
    ring = 0.5 * ((r - 2.0) / 0.4) ** 2
    modes = torch.logaddexp(-0.5 * ((z1 - 2.0) / 0.6) ** 2, -0.5 * ((z1 + 2.0) / 0.6) ** 2)
    return ring - modes


def _u2(z: Tensor) -> Tensor:
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2


def _u3(z: Tensor) -> Tensor:
    a = z[..., 1] - _w1(z)
    return -torch.logaddexp(-0.5 * (a / 0.35) ** 2, -0.5 * ((a + _w2(z)) / 0.35) ** 2)


def _u4(z: Tensor) -> Tensor:
    a = z[..., 1] - _w1(z)
    return -torch.logaddexp(-0.5 * (a / 0.4) ** 2, -0.5 * ((a + _w3(z)) / 0.35) ** 2)


def _wall(z: Tensor) -> Tensor:
    past = F.relu(z.abs() - WALL_BOUND) / WALL_WIDTH
    return 0.5 * (past * past).sum(-1)


class Target:
    """An unnormalized 2D density ``p_tilde(z) = exp(-U(z))`` to fit by reverse KL.

    Args:
        name: short name (``"U1"`` ...).
        energy: ``U``, mapping ``(..., 2)`` to ``(...)``.
        confined: add the smooth box wall ``C(z)`` (see the module docstring).
        box: ``((z1_min, z1_max), (z2_min, z2_max))``, the region to plot; the density's
            mass lies inside it (or within a few wall widths of it).

    Attributes:
        features: always 2.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.targets.get("U1")
        >>> t.log_prob(torch.zeros(3, 2)).shape
        torch.Size([3])
    """

    features = 2

    def __init__(
        self,
        name: str,
        energy: Callable[[Tensor], Tensor],
        confined: bool = False,
        box: tuple[tuple[float, float], tuple[float, float]] = ((-4.0, 4.0), (-4.0, 4.0)),
    ) -> None:
        self.name = name
        self._energy = energy
        self.confined = confined
        self.box = box

    def energy(self, z: Tensor) -> Tensor:
        """``U(z)`` (plus the wall when confined), shape ``z.shape[:-1]``."""
        if z.shape[-1] != 2:
            raise ValueError(
                f"target {self.name} is a 2D density: z must be (..., 2), got {tuple(z.shape)}"
            )
        u = self._energy(z)
        return u + _wall(z) if self.confined else u

    def log_prob(self, z: Tensor) -> Tensor:
        """The unnormalized log-density ``-U(z)``: ``(batch, 2)`` -> ``(batch,)``."""
        return -self.energy(z)

    __call__ = log_prob

    def __repr__(self) -> str:
        wall = ", confined to the box by a smooth wall" if self.confined else ""
        return f"Target({self.name}{wall})"


#: The four energies of Rezende & Mohamed (2015, Table 1), by name.
TARGETS: dict[str, Target] = {
    "U1": Target("U1", _u1),
    "U2": Target("U2", _u2, confined=True),
    "U3": Target("U3", _u3, confined=True),
    "U4": Target("U4", _u4, confined=True),
}


def get(name: str) -> Target:
    """The target called ``name`` (``"U1"`` to ``"U4"``, case-insensitive)."""
    target = TARGETS.get(name.upper()) if isinstance(name, str) else None
    if target is None:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return target


def log_normalizer(
    target: Target | str | Callable[[Tensor], Tensor],
    bound: float = 8.0,
    points: int = 1601,
    chunk: int = 512,
) -> float:
    """``log Z = log of the integral of exp(log_prob(z))`` over ``[-bound, bound]^2``.

    The trapezoidal rule on a ``points x points`` grid, evaluated in float64 as a log-sum-exp
    of ``log_prob + log weights``, ``chunk`` grid rows at a time (memory
    ``O(chunk * points)``, time ``O(points^2)``). For smooth densities whose mass lies well
    inside the square this converges fast: for U1, ``bound=8`` and ``points=1601`` give
    1.8775. A warning is issued when the density on the square's edge is not negligible
    (the square cuts off mass: raise ``bound``).

    Args:
        target: a :class:`Target`, its name, or any function ``(n, 2) -> (n,)`` returning an
            unnormalized log-density.
        bound: half-width of the square.
        points: grid points per axis (>= 2).
        chunk: grid rows evaluated per call.

    Returns:
        ``log Z`` as a Python float.
    """
    if isinstance(target, str):
        target = get(target)
    log_prob = target.log_prob if isinstance(target, Target) else target
    if points < 2 or bound <= 0:
        raise ValueError(f"need points >= 2 and bound > 0, got points={points}, bound={bound}")
    grid = torch.linspace(-bound, bound, points, dtype=torch.float64)
    h = 2.0 * bound / (points - 1)
    log_w = torch.full((points,), math.log(h), dtype=torch.float64)
    log_w[0] = log_w[-1] = math.log(0.5 * h)

    totals = []
    edge = []
    with torch.no_grad():
        for start in range(0, points, chunk):
            rows = grid[start : start + chunk]
            z = torch.stack(torch.broadcast_tensors(rows[:, None], grid[None, :]), dim=-1)
            lp = log_prob(z.reshape(-1, 2)).reshape(len(rows), points).to(torch.float64)
            totals.append(torch.logsumexp(lp + log_w[start : start + chunk, None] + log_w, (0, 1)))
            edge.append(torch.cat([lp[:, 0], lp[:, -1]]).max())
            if start == 0:
                edge.append(lp[0].max())
            if start + chunk >= points:
                edge.append(lp[-1].max())
    log_z = torch.logsumexp(torch.stack(totals), 0)
    if not bool(torch.isfinite(log_z)):
        raise ValueError(f"log Z is not finite ({float(log_z)}): check the target's log_prob")
    # Compare the density on the edge with its average over the square.
    if float(torch.stack(edge).max()) > float(log_z) - math.log(4 * bound * bound) + math.log(1e-6):
        warn_user(
            f"log_normalizer: the density is not negligible on the edge of [-{bound}, {bound}]^2;"
            " the square cuts off mass: raise bound"
        )
    return float(log_z)
