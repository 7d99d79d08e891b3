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
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Transform, check_features
from ..nn import MADE, Activation, resolve_order
from ..nn.passes import needs_recompute, recomputed_grads
from .monotonic import AffineMap, MonotonicMap, SplineMap, monotonic_map

__all__ = [
    "MaskedAutoregressive",
    "MaskedAffineAutoregressive",
    "InverseAutoregressive",
    "SplineAutoregressive",
]

_FAST = ("density", "sampling")

_tanh_backward = torch.ops.aten.tanh_backward.grad_input


def _batch_major(t: Tensor, rows: Tensor | None) -> Tensor:
    """``(features, batch)`` unit-major rows, taken in the order ``rows`` (all of them,
    as they are, if None), as a contiguous ``(batch, features)`` tensor.

    A gather of whole rows and one transposing copy: ``index_select`` along the columns of
    the transposed view gathers element by element, 2-3x slower for 10,000 rows.
    """
    if rows is not None:
        t = t.index_select(0, rows)
    out = t.new_empty(t.shape[1], t.shape[0])
    out.t().copy_(t)
    return out


class _FusedAffine(torch.autograd.Function):
    """The one-pass direction of an affine MADE layer (MAF density, IAF sampling), fused.

    ``v = u * exp(s) + t`` with ``(t, a) = MADE(u, c)`` and ``s = bound * tanh(a / bound)``
    (:class:`~exactflow.transforms.monotonic.AffineMap`), ``log|det| = sum(s)``. The map is
    applied to the MADE's unit-major output in place of a batch-major copy, and its
    derivatives are written out by hand and fed to the MADE's own backward: no autograd
    graph for the map and no transposes of the parameters or of their gradient. Under
    ``create_graph=True`` the backward recomputes the layer with differentiable ops.
    """

    @staticmethod
    def forward(
        ctx: Any, u: Tensor, context: Tensor | None, packed: Tensor, made: MADE,
        affine: AffineMap,
    ) -> tuple[Tensor, Tensor]:
        c, d, bound = made.context_features, made.features, affine.scale_bound
        u_in = made._inputs(u, context)
        ctx.made, ctx.affine = made, affine
        ctx.workspace = workspace = made._workspace(u_in)
        try:
            if workspace is None:  # saved-tensor hooks: fresh buffers, all saved
                weights = made._weights(packed)
                out, inputs = made._fused(u_in, weights)
                kept = (weights, *inputs)
            else:
                out = workspace.forward(u_in, packed, made._scatter)
                inputs, kept = workspace.inputs, ()
            u_sorted = inputs[0][1 + c :]  # (d, batch), in the order
            # The MADE's output is not kept: the map works in place on it where it can (on
            # 10,000 rows each fresh buffer costs about as much as the pass that fills it).
            shift, raw = out.view(d, 2, -1).unbind(1)
            tanh = raw.div_(bound).tanh_()
            scale = torch.mul(tanh, bound).exp_()  # AffineMap's log-scale, exponentiated
            scaled = u_sorted * scale
            v = _batch_major(shift.add_(scaled), None if made._identity_order else made._rank)
            log_det = tanh.sum(0).mul_(bound)
        finally:
            if workspace is not None:
                workspace.hold(ctx)
        ctx.save_for_backward(u, context, packed, tanh, scale, scaled, *kept)
        return v, log_det

    @staticmethod
    def backward(
        ctx: Any, grad_v: Tensor, grad_log_det: Tensor
    ) -> tuple[Tensor | None, ...]:
        u, context, packed, tanh, scale, scaled, *kept = ctx.saved_tensors
        made, affine, workspace = ctx.made, ctx.affine, ctx.workspace
        need_u, need_c, need_packed = ctx.needs_input_grad[:3]
        if needs_recompute(grad_v, grad_log_det):  # create_graph=True, or batched gradients

            def recompute(u: Tensor, context: Tensor | None, packed: Tensor) -> tuple[Tensor, ...]:
                params = made._outputs(made._composable(made._inputs(u, context), packed))
                v, log_det = affine.forward(u, params)
                return v, log_det.sum(dim=1)

            grads = recomputed_grads(
                recompute, (u, context, packed), (need_u, need_c, need_packed),
                (grad_v, grad_log_det),
            )
            return (*grads, None, None)
        # (Gradients of unused outputs arrive as zeros.) v = u exp(s) + t with
        # s = bound * tanh(a / bound): dv/dt = 1, dv/da = u exp(s) (1 - tanh^2), and
        # log|det| adds ds/da = 1 - tanh^2.
        c, d = made.context_features, made.features
        batch = grad_v.shape[0]
        if workspace is None:
            g_out = grad_v.new_empty(d, 2, batch)
        else:
            g_out = workspace.grad_out.view(d, 2, batch)
        g_v = g_out[:, 0]  # (d, batch), in the order
        g_v.copy_(grad_v.t())
        if not made._identity_order:
            g_v.copy_(g_v.index_select(0, made.order))
        _tanh_backward(
            torch.addcmul(grad_log_det, g_v, scaled), tanh, grad_input=g_out[:, 1]
        )
        need_in = need_u or need_c
        if workspace is None:
            weights, *inputs = kept
            g_in, grad_packed = made._fused_backward(
                g_out.view(2 * d, batch), weights, inputs, need_in
            )
        else:
            g_in, grad_packed = workspace.backward(need_in, made._dest)
        grad_u = grad_c = None
        if need_u:
            g_u = torch.addcmul(g_in[c:], g_v, scale)  # through the parameters, and directly
            grad_u = _batch_major(g_u, None if made._identity_order else made._rank)
        if need_c:
            grad_c = g_in[:c].t().contiguous()
        return grad_u, grad_c, grad_packed if need_packed else None, None, None


#: ``conditioner(features, outputs, context=..., order=...) -> nn.Module``: the network of
#: an autoregressive layer. The module maps ``(x, context)`` to ``(batch, features,
#: outputs)``, the parameters of feature ``order[k]`` depending only on
#: ``x[:, order[:k]]`` and the context.
ConditionerFactory = Callable[..., nn.Module]


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
            and isinstance(made, MADE)
            and made._relu
            and made._plain(u)
            and (context is None or made._plain(context))
        ):
            return _FusedAffine.apply(u, context, made.packed, made, self.monotonic)
        params = made(u, context)
        v, log_det = self.monotonic.forward(u, params)
        return v, log_det.sum(dim=1)

    def _solve(self, v: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The ``u`` with ``g(u; theta(u)) = v`` and ``log|det du/dv|``, feature by feature.

        With a conditioner that has ``autoregress`` (the MADE): ``d`` incremental steps, the
        multiply-adds of one pass in all; step ``k`` inverts the map of feature
        ``order[k]`` with the parameters computed from the features before it.
        """
        context = self._context(context)
        autoregress = getattr(self.made, "autoregress", None)
        if autoregress is None:
            return self._solve_by_passes(v, context)
        order = self.order
        v_sorted = v.index_select(1, order)
        log_dets: list[Tensor] = []

        def solve(k: int, params: Tensor) -> Tensor:
            u_k, log_det = self.monotonic.inverse(v_sorted[:, k], params)
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
            u, log_det = self.monotonic.inverse(v, params)
            passes = range(1, self.features)
        for _ in passes:
            params = self.made(u, context)
            u, log_det = self.monotonic.inverse(v, params)
        return u, log_det.sum(dim=1)

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
    """MAF: ``z_i = x_i * exp(s_i) + t_i`` with ``(s_i, t_i) = MADE(x_{<i}, context)``.

    ``log|det dz/dx| = sum_i s_i``, with the soft-clamped log-scale of
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
    """IAF: ``x_i = z_i * exp(s_i) + t_i`` with ``(s_i, t_i) = MADE(z_{<i}, context)``.

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
