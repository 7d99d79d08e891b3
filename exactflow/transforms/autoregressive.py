"""Autoregressive layers: each feature is transformed conditioned on the features before it.

One mechanism, :class:`MaskedAutoregressive`, with a :class:`~exactflow.nn.MADE` conditioner
and any elementwise monotonic map (:mod:`exactflow.transforms.monotonic`)::

    v_i = g(u_i; theta_i(u_{<i}, context))       for i in the chosen order
    log|det dv/du| = sum_i log g'(u_i; theta_i)

The Jacobian is triangular in the order, so the log-det costs O(d). Computing ``v`` from
``u`` takes **one** MADE pass; recovering ``u`` from ``v`` takes ``d`` passes, one per
feature, because ``theta_i`` needs ``u_{<i}`` first. Which side is ``u`` picks the fast
direction:

* ``fast="density"`` (MAF): ``u`` is the data. ``forward`` (data -> latent, ``log_prob``)
  is one pass; ``inverse`` (latent -> data, ``sample``) is ``d`` passes.
* ``fast="sampling"`` (IAF): ``u`` is the latent. ``inverse`` (``sample``) is one pass;
  ``forward`` (``log_prob`` of new data) is ``d`` passes.

``MaskedAffineAutoregressive`` (MAF), ``InverseAutoregressive`` (IAF) and
``SplineAutoregressive`` (autoregressive NSF) are this layer with the affine or spline map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core import Transform
from ..nn import MADE, Activation
from .monotonic import AffineMap, MonotonicMap, SplineMap, monotonic_map

__all__ = [
    "MaskedAutoregressive",
    "MaskedAffineAutoregressive",
    "InverseAutoregressive",
    "SplineAutoregressive",
]

_FAST = ("density", "sampling")


class MaskedAutoregressive(Transform):
    """An autoregressive layer with a MADE conditioner and any elementwise monotonic map.

    With ``fast="density"``: ``z_i = g(x_i; theta_i(x_{<i}, c))``, ``forward`` in one MADE
    pass and ``inverse`` in ``features`` passes. With ``fast="sampling"``:
    ``x_i = g(z_i; theta_i(z_{<i}, c))``, ``inverse`` in one pass and ``forward`` in
    ``features`` passes. ``<i`` means "before ``i`` in ``order``". In both cases
    ``log|det| = sum_i log g'`` at O(d) cost on top of the MADE passes, each
    O(batch * (d * h + h^2 + h * d * p)) for hidden width ``h`` and ``p`` parameters per
    feature. The MADE's last layer starts at zero, so a new layer is the identity.

    Args:
        features: the dimension ``d`` (1 is allowed: the map then depends on the context
            only, or is a learned constant map without one).
        monotonic: the elementwise map or its name (``"affine"``, ``"additive"``, ``"spline"``).
        hidden: hidden layer sizes of the MADE.
        context: size of the context vector (0 for an unconditional layer).
        order: autoregressive order: ``None`` (``0..d-1``), ``"reverse"``, ``"random"`` or a
            permutation (see :func:`exactflow.nn.resolve_order`).
        fast: ``"density"`` (MAF) or ``"sampling"`` (IAF).
        seed: seed of ``order="random"``.
        activation: constructor of the MADE's activation (default ``nn.ReLU``).

    References:
        Papamakarios, Pavlakou & Murray, Masked Autoregressive Flow for Density Estimation
        (2017), arXiv:1705.07057; Kingma et al., Improved Variational Inference with Inverse
        Autoregressive Flow (2016), arXiv:1606.04934.
    """

    def __init__(
        self,
        features: int,
        monotonic: str | MonotonicMap = "affine",
        hidden: Sequence[int] | int = (64, 64),
        context: int = 0,
        order: str | Sequence[int] | Tensor | None = None,
        fast: str = "density",
        seed: int | None = None,
        activation: Activation = nn.ReLU,
    ):
        super().__init__()
        if fast not in _FAST:
            raise ValueError(f"fast must be 'density' or 'sampling', got {fast!r}")
        self.monotonic = monotonic_map(monotonic)
        self.made = MADE(
            features,
            outputs=self.monotonic.params_per_feature,
            hidden=hidden,
            context=context,
            order=order,
            seed=seed,
            activation=activation,
            zero_last=True,
        )
        self.features = self.made.features
        self.context_features = self.made.context_features
        self.fast = fast

    @property
    def order(self) -> Tensor:
        """The autoregressive order: ``order[k]`` is the ``k``-th feature."""
        return self.made.order

    def _context(self, context: Tensor | None) -> Tensor | None:
        return context if self.context_features > 0 else None

    def _one_pass(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``v = g(u; theta(u))`` and ``log|det dv/du|``: one MADE pass."""
        params = self.made(u, self._context(context))
        v, log_det = self.monotonic.forward(u, params)
        return v, log_det.sum(dim=1)

    def _solve(self, v: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The ``u`` with ``g(u; theta(u)) = v`` and ``log|det du/dv|``: ``features`` passes.

        (Without a context the first pass runs on one row and is broadcast: ``features - 1``
        full passes.)

        After pass ``k`` the first ``k`` features in the order are exact, because
        ``theta`` of the ``k``-th depends only on the ``k - 1`` before it; the last pass
        uses exact inputs throughout, so its log-det is exact too.
        """
        context = self._context(context)
        u = torch.zeros_like(v)
        log_det = v.new_zeros(v.shape)
        passes = range(self.features)
        if context is None:
            # The first pass sees u = 0 and no context: the same parameters for every row,
            # so one row's pass does (a 2-D MAF samples in one full pass instead of two).
            params = self.made(u[:1], None).expand(v.shape[0], -1, -1)
            u, log_det = self.monotonic.inverse(v, params)
            passes = range(1, self.features)
        for _ in passes:
            params = self.made(u, context)
            u, log_det = self.monotonic.inverse(v, params)
        return u, log_det.sum(dim=1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent: one MADE pass if ``fast="density"``, ``features`` passes otherwise."""
        if self.fast == "density":
            return self._one_pass(x, context)
        return self._solve(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data: one MADE pass if ``fast="sampling"``, ``features`` passes otherwise."""
        if self.fast == "sampling":
            return self._one_pass(z, context)
        return self._solve(z, context)

    def extra_repr(self) -> str:
        return f"monotonic={self.monotonic!r}, fast={self.fast!r}"


class MaskedAffineAutoregressive(MaskedAutoregressive):
    """MAF: ``z_i = x_i * exp(s_i) + t_i`` with ``(s_i, t_i) = MADE(x_{<i}, context)``.

    ``log|det dz/dx| = sum_i s_i``, with the soft-clamped log-scale of
    :class:`~exactflow.transforms.monotonic.AffineMap`. **Fast density**: ``forward``
    (data -> latent, ``log_prob``) is one MADE pass; ``inverse`` (``sample``) takes
    ``features`` sequential passes.

    Args:
        features: the dimension ``d``.
        hidden, context, order, seed, activation: as in :class:`MaskedAutoregressive`.
        scale_bound: the largest ``|s|``.

    References:
        Papamakarios, Pavlakou & Murray, Masked Autoregressive Flow for Density Estimation
        (2017), arXiv:1705.07057.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.transforms.MaskedAffineAutoregressive(3, hidden=(16,))
        >>> z, ladj = t(torch.randn(4, 3))
        >>> z.shape, ladj.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] | int = (64, 64),
        context: int = 0,
        order: str | Sequence[int] | Tensor | None = None,
        scale_bound: float = 3.0,
        seed: int | None = None,
        activation: Activation = nn.ReLU,
    ):
        super().__init__(
            features, AffineMap(scale_bound), hidden, context, order, "density", seed, activation
        )


class InverseAutoregressive(MaskedAutoregressive):
    """IAF: ``x_i = z_i * exp(s_i) + t_i`` with ``(s_i, t_i) = MADE(z_{<i}, context)``.

    The same mechanism as :class:`MaskedAffineAutoregressive` with the directions swapped.
    **Fast sampling**: ``inverse`` (latent -> data, ``sample`` and ``sample_and_log_prob``)
    is one MADE pass with ``log|det dx/dz| = sum_i s_i``; ``forward`` (``log_prob`` of new
    data) takes ``features`` sequential passes.

    Args:
        features: the dimension ``d``.
        hidden, context, order, seed, activation: as in :class:`MaskedAutoregressive`.
        scale_bound: the largest ``|s|``.

    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, Improved Variational
        Inference with Inverse Autoregressive Flow (2016), arXiv:1606.04934.
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] | int = (64, 64),
        context: int = 0,
        order: str | Sequence[int] | Tensor | None = None,
        scale_bound: float = 3.0,
        seed: int | None = None,
        activation: Activation = nn.ReLU,
    ):
        super().__init__(
            features, AffineMap(scale_bound), hidden, context, order, "sampling", seed, activation
        )


class SplineAutoregressive(MaskedAutoregressive):
    """Autoregressive rational-quadratic spline flow (NSF-AR).

    ``z_i = RQS(x_i; theta_i(x_{<i}, context))`` with ``bins`` bins on ``[-bound, bound]``
    and the identity outside; ``log|det dz/dx| = sum_i log RQS'(x_i)``. With the default
    ``fast="density"``, ``forward`` (``log_prob``) is one MADE pass and ``inverse``
    (``sample``) ``features`` passes; ``fast="sampling"`` swaps them.

    Args:
        features: the dimension ``d``.
        bins: number of spline bins (``3 * bins - 1`` parameters per feature).
        bound: the spline's interval is ``[-bound, bound]``.
        hidden, context, order, fast, seed, activation: as in :class:`MaskedAutoregressive`.

    References:
        Durkan, Bekasov, Murray & Papamakarios, Neural Spline Flows (2019),
        arXiv:1906.04032.
    """

    def __init__(
        self,
        features: int,
        bins: int = 8,
        bound: float = 5.0,
        hidden: Sequence[int] | int = (64, 64),
        context: int = 0,
        order: str | Sequence[int] | Tensor | None = None,
        fast: str = "density",
        seed: int | None = None,
        activation: Activation = nn.ReLU,
    ):
        super().__init__(
            features, SplineMap(bins, bound), hidden, context, order, fast, seed, activation
        )
