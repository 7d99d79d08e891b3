"""Autoregressive layers: each feature is transformed conditioned on the features before it.

One mechanism, :class:`MaskedAutoregressive`, with a :class:`~exactflow.nn.MADE` conditioner
and any elementwise monotonic map (:mod:`exactflow.transforms.monotonic`)::

    v_i = g(u_i; theta_i(u_{<i}, context))       for i in the chosen order
    log|det dv/du| = sum_i log g'(u_i; theta_i)

The Jacobian is triangular in the order, so the log-det costs O(d). Computing ``v`` from
``u`` takes **one** MADE pass; recovering ``u`` from ``v`` is sequential, one feature at a
time, because ``theta_i`` needs ``u_{<i}`` first. With the MADE conditioner the sequential
direction runs in ``d`` steps that together cost the multiply-adds of one pass
(:meth:`exactflow.nn.MADE.autoregress`: step ``i`` computes only the hidden units that
``u_i`` makes computable); a conditioner without that method is re-run ``d`` times. Which
side is ``u`` picks the fast direction:

* ``fast="density"`` (MAF): ``u`` is the data. ``forward`` (data -> latent, ``log_prob``)
  is one pass; ``inverse`` (latent -> data, ``sample``) is sequential.
* ``fast="sampling"`` (IAF): ``u`` is the latent. ``inverse`` (``sample``) is one pass;
  ``forward`` (``log_prob`` of new data) is sequential.

The conditioner is pluggable (``conditioner=``): any network that maps ``(x, context)`` to
``(batch, features, params)`` autoregressively in the layer's order.

``MaskedAffineAutoregressive`` (MAF), ``InverseAutoregressive`` (IAF) and
``SplineAutoregressive`` (autoregressive NSF) are this layer with the affine or spline map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeGuard

import torch
from torch import Tensor, nn

from .. import core
from ..core import Transform, check_features
from ..nn import MADE, Activation, resolve_order
from ..nn.passes import ELEMENTWISE, has_hooks
from .fused_affine import _FusedAffine, chain
from .monotonic import (
    AdditiveMap,
    AffineMap,
    MonotonicMap,
    SplineMap,
    apply_map,
    monotonic_map,
)

__all__ = [
    "MaskedAutoregressive",
    "MaskedAffineAutoregressive",
    "InverseAutoregressive",
    "SplineAutoregressive",
]

_FAST = ("density", "sampling")

#: ``conditioner(features, outputs, context=..., order=...) -> nn.Module``: the network of
#: an autoregressive layer. The module maps ``(x, context)`` to ``(batch, features,
#: outputs)``, the parameters of feature ``order[k]`` depending only on
#: ``x[:, order[:k]]`` and the context.
ConditionerFactory = Callable[..., nn.Module]



def _own_passes(made: object) -> TypeGuard[MADE]:
    """Whether ``made`` is a MADE computing MADE's own map (not a subclass with a
    ``forward`` of its own), so that the hand-written passes over its packed weights,
    which skip ``forward``, compute what it computes."""
    return isinstance(made, MADE) and type(made).forward is MADE.forward

class MaskedAutoregressive(Transform):
    """An autoregressive layer with a MADE (or any autoregressive) conditioner and any
    elementwise monotonic map.

    With ``fast="density"``: ``z_i = g(x_i; theta_i(x_{<i}, c))``, ``forward`` in one
    conditioner pass and ``inverse`` sequential. With ``fast="sampling"``:
    ``x_i = g(z_i; theta_i(z_{<i}, c))``, ``inverse`` in one pass and ``forward``
    sequential. ``<i`` means "before ``i`` in ``order``". In both cases
    ``log|det| = sum_i log g'`` at O(d) cost on top of the conditioner.

    Cost with the default MADE (hidden width ``h``, ``p`` parameters per feature): one pass
    is O(batch * n) for its ``n`` kept weights (about half of ``d*h + h^2 + h*d*p``); the
    sequential direction is ``d`` steps of :meth:`~exactflow.nn.MADE.autoregress` with the
    same multiply-adds in all, plus ``d`` calls of the map's inverse on one feature. A
    conditioner without ``autoregress`` costs ``d`` full passes in the sequential direction
    (``d - 1`` without a context: the first pass sees zeros only and runs on one row). With
    the affine map and a ReLU MADE the one-pass direction is fused: the map is applied to
    the MADE's output where it is computed and differentiated by hand (same values and
    gradients as the generic path up to rounding).

    **Your own conditioner.** ``conditioner(features, outputs, context=..., order=...)``
    is called once with the layer's sizes and the order as a permutation tensor, and must
    return an ``nn.Module`` whose ``forward(x, context)`` maps ``(batch, features)`` (and
    ``(batch, context)`` or ``None``) to ``(batch, features, outputs)``, the parameters of
    feature ``order[k]`` depending only on ``x[:, order[:k]]`` and the context. Nothing
    checks this (:func:`exactflow.check_transform` does: a non-autoregressive network
    gives a wrong log-det and inverse). Make it output zeros at initialization (e.g. a
    zero last layer) so that the layer starts as the identity map. It is stored as
    ``self.made`` (the name exactflow 0.1 state dicts use).

    Args:
        features: the dimension ``d`` (1 is allowed: the map then depends on the context
            only, or is a learned constant map without one).
        monotonic: the elementwise map or its name (``"affine"``, ``"additive"``, ``"spline"``).
        hidden: hidden layer sizes of the MADE (ignored with ``conditioner``).
        context: size of the context vector (0 for an unconditional layer).
        order: autoregressive order: ``None`` (``0..d-1``), ``"reverse"``, ``"random"`` or a
            permutation (see :func:`exactflow.nn.resolve_order`).
        fast: ``"density"`` (MAF) or ``"sampling"`` (IAF).
        seed: seed of ``order="random"``.
        activation: constructor of the MADE's activation (default ``nn.ReLU``; ignored
            with ``conditioner``).
        conditioner: a factory of the conditioner network (default: a MADE with ``hidden``
            and ``activation`` and a zero last layer).

    References:
        Papamakarios, Pavlakou & Murray, Masked Autoregressive Flow for Density Estimation
        (2017), arXiv:1705.07057; Kingma et al., Improved Variational Inference with Inverse
        Autoregressive Flow (2016), arXiv:1606.04934; Germain, Gregor, Murray & Larochelle,
        MADE (2015), arXiv:1502.03509.
    """

    features: int
    made: nn.Module
    _order: Tensor

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
        conditioner: ConditionerFactory | None = None,
    ) -> None:
        super().__init__()
        if fast not in _FAST:
            raise ValueError(f"fast must be 'density' or 'sampling', got {fast!r}")
        self.monotonic = monotonic_map(monotonic)
        outputs = self.monotonic.params_per_feature
        if conditioner is None:
            self.made = MADE(
                features,
                outputs=outputs,
                hidden=hidden,
                context=context,
                order=order,
                seed=seed,
                activation=activation,
                zero_last=True,
            )
            perm = self.made.order
        else:
            features = check_features(features, type(self).__name__)
            if isinstance(context, bool) or not isinstance(context, int) or context < 0:
                raise ValueError(f"context must be an integer >= 0, got {context!r}")
            perm = resolve_order(features, order, seed)
            self.made = conditioner(features, outputs, context=context, order=perm.clone())
            if not isinstance(self.made, nn.Module):
                raise TypeError(
                    f"conditioner must return an nn.Module, got {type(self.made).__name__}"
                )
        # The order, for layers whose conditioner does not keep one (not saved: a MADE
        # saves its own, and 0.1 state dicts have none here).
        self.register_buffer("_order", perm.clone(), persistent=False)
        self.features = int(perm.numel())
        self.context_features = context
        self.fast = fast

    @property
    def order(self) -> Tensor:
        """The autoregressive order: ``order[k]`` is the ``k``-th feature."""
        order = getattr(self.made, "order", None)
        return order if isinstance(order, Tensor) else self._order

    @property
    def conditioner(self) -> nn.Module:
        """The conditioner network (stored as ``made``, the name in 0.1 state dicts)."""
        return self.made

    def _context(self, context: Tensor | None) -> Tensor | None:
        return context if self.context_features > 0 else None

    def _one_pass(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``v = g(u; theta(u))`` and ``log|det dv/du|``: one MADE pass."""
        made, context = self.made, self._context(context)
        if (
            type(self.monotonic) is AffineMap
            and _own_passes(made)
            and made._relu
            and made._plain(u)
            and (context is None or made._plain(context))
        ):
            recording = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (u, context, made.packed)
            )
            return _FusedAffine.apply(u, context, made.packed, made, self.monotonic, recording)
        params = made(u, context)
        v, log_det = apply_map(self.monotonic, u, params)
        return v, log_det.sum(dim=1)

    def _solve(self, v: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The ``u`` with ``g(u; theta(u)) = v`` and ``log|det du/dv|``, feature by feature.

        With a conditioner that has ``autoregress`` (the MADE): ``d`` incremental steps, the
        multiply-adds of one pass in all; step ``k`` inverts the map of feature
        ``order[k]`` with the parameters computed from the features before it.
        """
        context = self._context(context)
        autoregress = getattr(self.made, "autoregress", None)
        if autoregress is None or (isinstance(self.made, MADE) and not _own_passes(self.made)
                                   and type(self.made).autoregress is MADE.autoregress):
            # (a MADE subclass with a forward of its own: MADE's incremental steps would
            # compute MADE's map, not the subclass's)
            return self._solve_by_passes(v, context)
        order = self.order
        v_sorted = v.index_select(1, order)
        log_dets: list[Tensor] = []

        def solve(k: int, params: Tensor) -> Tensor:
            u_k, log_det = apply_map(self.monotonic, v_sorted[:, k], params, inverse=True)
            log_dets.append(log_det)
            return u_k

        u = autoregress(solve, v, context)
        return u, torch.stack(log_dets, dim=1).sum(dim=1)

    def _solve_by_passes(self, v: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`_solve` for any conditioner: ``features`` full passes.

        (Without a context the first pass runs on one row and is broadcast: ``features - 1``
        full passes.) After pass ``k`` the first ``k`` features in the order are exact,
        because ``theta`` of the ``k``-th depends only on the ``k - 1`` before it; the last
        pass uses exact inputs throughout, so its log-det is exact too.
        """
        u = torch.zeros_like(v)
        log_det = v.new_zeros(v.shape)
        passes = range(self.features)
        if context is None:
            # The first pass sees u = 0 and no context: the same parameters for every row,
            # so one row's pass does (a 2-D MAF samples in one full pass instead of two).
            params = self.made(u[:1], None).expand(v.shape[0], -1, -1)
            u, log_det = apply_map(self.monotonic, v, params, inverse=True)
            passes = range(1, self.features)
        for _ in passes:
            params = self.made(u, context)
            u, log_det = apply_map(self.monotonic, v, params, inverse=True)
        return u, log_det.sum(dim=1)

    @property
    def _chain_direction(self) -> str | None:
        """The one-pass direction (``"forward"`` for a MAF, ``"inverse"`` for an IAF) if a
        :class:`~exactflow.Compose` may run this layer there in a fused chain with the
        layers of its kind and permutations after it (:func:`~exactflow.transforms.
        fused_affine.chain`): an affine map on a ReLU MADE, this class's own passes (not a
        subclass's or an instance's), and no module hooks (the chain does not call the
        layer)."""
        made, cls = self.made, type(self)
        direction = "forward" if self.fast == "density" else "inverse"
        fused = (
            type(self.monotonic) is AffineMap
            and _own_passes(made)
            and made._relu
            and getattr(cls, direction) is getattr(MaskedAutoregressive, direction)
            and direction not in self.__dict__  # (not one of the instance's own)
            and cls._one_pass is MaskedAutoregressive._one_pass
            and not has_hooks(self)
        )
        return direction if fused else None

    @property
    def _row_width(self) -> int | None:
        # exactflow's MADE with an elementwise activation, a map of exactflow's, and this
        # class's passes in both directions: each row's output is that row's alone.
        made, cls, base = self.made, type(self), MaskedAutoregressive
        own = ("forward", "inverse", "_one_pass", "_solve", "_solve_by_passes", "_context")
        if not (
            type(made) is MADE
            and type(made.activation) in ELEMENTWISE
            and type(self.monotonic) in (AdditiveMap, AffineMap, SplineMap)
            and all(getattr(cls, name) is getattr(base, name) for name in own)
            and not any(name in self.__dict__ for name in own)  # (the instance's own)
            and "forward" not in made.__dict__
        ):
            return None
        return max((*made.hidden, made.features * made.outputs))

    def _block_bytes(self, inverse: bool) -> int:
        sequential = inverse == (self.fast == "density")
        return core.SEQUENTIAL_BLOCK_BYTES if sequential else core.SCORING_BLOCK_BYTES

    def _chain(
        self, layers: Sequence[Transform], start: int, x: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor, int] | None:
        return chain(layers, start, x, context, inverse=self.fast == "sampling")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent: one conditioner pass if ``fast="density"``, sequential otherwise."""
        if self.fast == "density":
            return self._one_pass(x, context)
        return self._solve(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data: one conditioner pass if ``fast="sampling"``, sequential otherwise."""
        if self.fast == "sampling":
            return self._one_pass(z, context)
        return self._solve(z, context)

    def extra_repr(self) -> str:
        return f"monotonic={self.monotonic!r}, fast={self.fast!r}"


class MaskedAffineAutoregressive(MaskedAutoregressive):
    """MAF: ``z_i = x_i * exp(s_i) + t_i`` with ``(t_i, a_i) = MADE(x_{<i}, context)``.

    ``log|det dz/dx| = sum_i s_i``, with ``s_i = B tanh(a_i / B)`` the soft-clamped log-scale of
    :class:`~exactflow.transforms.monotonic.AffineMap`. **Fast density**: ``forward``
    (data -> latent, ``log_prob``) is one MADE pass; ``inverse`` (``sample``) is
    sequential, ``features`` steps with the multiply-adds of one pass in all.

    Args:
        features: the dimension ``d``.
        hidden, context, order, seed, activation, conditioner: as in
            :class:`MaskedAutoregressive`.
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
        conditioner: ConditionerFactory | None = None,
    ) -> None:
        super().__init__(
            features, AffineMap(scale_bound), hidden, context, order, "density", seed,
            activation, conditioner,
        )


class InverseAutoregressive(MaskedAutoregressive):
    """IAF: ``x_i = z_i * exp(s_i) + t_i`` with ``(t_i, a_i) = MADE(z_{<i}, context)``.

    The same mechanism as :class:`MaskedAffineAutoregressive` with the directions swapped.
    **Fast sampling**: ``inverse`` (latent -> data, ``sample`` and ``sample_and_log_prob``)
    is one MADE pass with ``log|det dx/dz| = sum_i s_i``; ``forward`` (``log_prob`` of new
    data) is sequential, ``features`` steps with the multiply-adds of one pass in all.

    Args:
        features: the dimension ``d``.
        hidden, context, order, seed, activation, conditioner: as in
            :class:`MaskedAutoregressive`.
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
        conditioner: ConditionerFactory | None = None,
    ) -> None:
        super().__init__(
            features, AffineMap(scale_bound), hidden, context, order, "sampling", seed,
            activation, conditioner,
        )


class SplineAutoregressive(MaskedAutoregressive):
    """Autoregressive rational-quadratic spline flow (NSF-AR).

    ``z_i = RQS(x_i; theta_i(x_{<i}, context))`` with ``bins`` bins on ``[-bound, bound]``
    and the identity outside; ``log|det dz/dx| = sum_i log RQS'(x_i)``. With the default
    ``fast="density"``, ``forward`` (``log_prob``) is one MADE pass and ``inverse``
    (``sample``) is sequential (``features`` steps, the multiply-adds of one pass, and
    ``features`` spline inversions of one feature each); ``fast="sampling"`` swaps them.

    Conditioning: the knot derivatives are at least ``1e-3``, but inside a bin the slope
    of a rational-quadratic spline can be far smaller (``1e-8`` where a narrow bin meets a
    steep one, at large random weights), and there the inverse loses that many digits; in
    the sequential direction an error in one feature also moves the parameters of the
    next. At such parameters ``check_transform``'s round trip can fail in float64 while
    the log-det agrees (a flat map is still exactly scored); trained flows and moderate
    perturbations pass (``tests/transforms``).

    Args:
        features: the dimension ``d``.
        bins: number of spline bins (``3 * bins - 1`` parameters per feature).
        bound: the spline's interval is ``[-bound, bound]``.
        hidden, context, order, fast, seed, activation, conditioner: as in
            :class:`MaskedAutoregressive`.

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
        conditioner: ConditionerFactory | None = None,
    ) -> None:
        super().__init__(
            features, SplineMap(bins, bound), hidden, context, order, fast, seed, activation,
            conditioner,
        )
