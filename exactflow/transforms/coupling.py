"""Coupling layers: half of the features condition an elementwise map of the other half.

One mechanism, :class:`Coupling`, with any elementwise monotonic map
(:mod:`exactflow.transforms.monotonic`)::

    z_A = x_A                                   (A: the conditioning features)
    z_B = g(x_B; theta(x_A, context))           (B: the transformed features)
    log|det dz/dx| = sum_{i in B} log g'(x_i; theta)

The Jacobian is block triangular with identity on ``A``, so the log-det costs O(d) and both
directions take one pass of the conditioner (an :class:`~exactflow.nn.MLP` by default, or
any network given as ``conditioner=``): coupling layers are fast for density *and*
sampling. ``AdditiveCoupling`` (NICE), ``AffineCoupling``
(RealNVP) and ``SplineCoupling`` (NSF) are this layer with the additive, affine and spline
maps. A layer leaves ``A`` unchanged, so stack layers with alternating masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Transform
from ..nn import MLP, Activation
from ..nn.mlp import relu_backward, relu_pass
from ..nn.passes import (
    ELEMENTWISE,
    has_hooks,
    is_plain,
    needs_recompute,
    recomputed_grads,
)
from .monotonic import AdditiveMap, AffineMap, MonotonicMap, SplineMap, apply_map, monotonic_map

__all__ = ["Coupling", "AdditiveCoupling", "AffineCoupling", "SplineCoupling", "coupling_mask"]

#: ``conditioner(in_features, out_features) -> nn.Module``: the network of a coupling
#: layer, mapping ``(batch, in_features)`` to ``(batch, out_features)``.
ConditionerFactory = Callable[[int, int], nn.Module]


def coupling_mask(features: int, mask: str | Sequence[bool] | Tensor) -> Tensor:
    """The boolean mask of the features a coupling layer transforms (True = transformed).

    ``mask`` is a boolean tensor or sequence of length ``features``, or one of:

    * ``"even"``: features 0, 2, 4, ... are transformed (a checkerboard);
    * ``"odd"``: features 1, 3, 5, ...;
    * ``"left"``: the first ``features // 2`` features;
    * ``"right"``: the last ``features - features // 2`` features.

    ``"even"``/``"odd"`` and ``"left"``/``"right"`` are complementary pairs: alternating
    them between layers transforms every feature, for odd ``features`` too.

    Raises:
        ValueError: ``features < 2`` (a coupling needs something to condition on), an
            unknown name, or a mask that transforms all or none of the features.
    """
    if isinstance(features, bool) or not isinstance(features, int) or features < 2:
        raise ValueError(
            f"a coupling layer needs features >= 2 (one half conditions the other), got "
            f"{features!r}; for one feature use a spline, which takes any shape "
            f"(SplineAutoregressive(1), ef.models.nsf(1, kind='autoregressive')): an affine "
            f"layer on one feature (MaskedAffineAutoregressive(1)) is a Gaussian unless it "
            f"is conditional"
        )
    index = torch.arange(features)
    if isinstance(mask, str):
        if mask == "even":
            m = index % 2 == 0
        elif mask == "odd":
            m = index % 2 == 1
        elif mask == "left":
            m = index < features // 2
        elif mask == "right":
            m = index >= features // 2
        else:
            raise ValueError(
                f"mask must be 'even', 'odd', 'left', 'right' or a boolean mask, got {mask!r}"
            )
    else:
        m = torch.as_tensor(mask)
        if m.dtype != torch.bool:
            raise ValueError(f"a coupling mask must be boolean, got dtype {m.dtype}")
        m = m.reshape(-1)
        if m.numel() != features:
            raise ValueError(f"the mask has {m.numel()} entries but features={features}")
    n = int(m.sum())
    if n == 0 or n == features:
        raise ValueError(
            "a coupling mask must transform some features and condition on the others; "
            f"this one transforms {n} of {features}"
        )
    return m.clone()


_tanh_backward = torch.ops.aten.tanh_backward.grad_input

class _FusedAffineCoupling(torch.autograd.Function):
    """The density direction of an affine coupling with a ReLU :class:`MLP`, fused.

    ``z_B = x_B * exp(s) + t`` with ``(t, a) = MLP(x_A, context)`` and
    ``s = bound * tanh(a / bound)`` (:class:`~exactflow.transforms.monotonic.AffineMap`),
    ``log|det| = sum(s)``. The network runs without autograd (ReLUs in place) and the
    derivatives of the map and the network are written out by hand, the network's
    straight into one gradient of its packed parameters: one graph node per layer instead
    of one per operation. Under ``create_graph=True`` the backward recomputes the layer
    with differentiable ops.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, context: Tensor | None, packed: Tensor, layer: Coupling
    ) -> tuple[Tensor, Tensor]:
        net: MLP = layer.conditioner  # type: ignore[assignment]
        x_a = x.index_select(1, layer.identity_index)
        x_b = x.index_select(1, layer.transformed_index)
        inputs = x_a if context is None else torch.cat([x_a, context], 1)
        views = net._views(packed)
        out, saved = relu_pass(inputs, views)
        shift, raw = out.view(x.shape[0], x_b.shape[1], 2).unbind(2)
        bound = layer.monotonic.scale_bound  # type: ignore[attr-defined]
        tanh = torch.tanh(raw / bound)
        log_scale = tanh * bound  # the values of AffineMap
        scale = torch.exp(log_scale)
        scaled = x_b * scale
        z = torch.cat([x_a, scaled + shift], dim=1)
        ctx.layer = layer
        # Activations too go through save_for_backward: freed after the backward, and
        # seen by saved-tensor hooks.
        ctx.save_for_backward(x, context, packed, tanh, scale, scaled, *views, *saved)
        return z.index_select(1, layer.unshuffle), log_scale.sum(dim=1)

    @staticmethod
    def backward(ctx: Any, grad_z: Tensor, grad_log_det: Tensor) -> tuple[Tensor | None, ...]:
        x, context, packed, tanh, scale, scaled, *rest = ctx.saved_tensors
        layer: Coupling = ctx.layer
        net: MLP = layer.conditioner  # type: ignore[assignment]
        views, inputs = rest[: 2 * net.layers], rest[2 * net.layers :]
        need_x, need_c, need_packed = ctx.needs_input_grad[:3]
        if needs_recompute(grad_z, grad_log_det):  # create_graph=True, or batched gradients
            grads = recomputed_grads(
                lambda x, c, p: layer._couple_generic(x, c, p, inverse=False),
                (x, context, packed), (need_x, need_c, need_packed), (grad_z, grad_log_det),
            )
            return (*grads, None)
        # (Gradients of unused outputs arrive as zeros.) z_B = x_B * exp(s) + t with
        # s = bound * tanh(a / bound): dz_B/dt = 1, dz_B/da = x_B exp(s) (1 - tanh^2), and
        # log|det| adds ds/da = 1 - tanh^2.
        g_a = grad_z.index_select(1, layer.identity_index)
        g_b = grad_z.index_select(1, layer.transformed_index)
        g_out = g_b.new_empty(*g_b.shape, 2)  # (t, a) feature by feature, as the net gives them
        g_out[:, :, 0] = g_b
        _tanh_backward(
            torch.addcmul(grad_log_det.unsqueeze(1), g_b, scaled), tanh,
            grad_input=g_out[:, :, 1],
        )
        grad_packed = torch.empty_like(packed) if need_packed else None
        g_in = relu_backward(
            g_out.view(g_b.shape[0], -1), inputs, views, need_x or need_c,
            None if grad_packed is None else net._views(grad_packed),
        )
        grad_x = grad_c = None
        if g_in is not None and need_c:
            grad_c = g_in[:, g_a.shape[1] :]
        if g_in is not None and need_x:
            g_a.add_(g_in[:, : g_a.shape[1]])  # directly, and through the network
            grad_x = torch.cat([g_a, g_b.mul_(scale)], dim=1).index_select(1, layer.unshuffle)
        return grad_x, grad_c, grad_packed, None


class Coupling(Transform):
    """A coupling layer with any elementwise monotonic map.

    ``z_B = g(x_B; theta)`` with ``theta = MLP(x_A, context)``, ``z_A = x_A``, where ``B`` is
    the set of features the ``mask`` marks True and ``A`` the rest;
    ``log|det dz/dx| = sum_{i in B} log g'(x_i; theta_i)``.

    Both directions cost one conditioner pass, O(batch * (d * h + h^2)) with hidden width
    ``h``; the inverse uses ``g``'s closed-form inverse with the same ``theta`` (``x_A`` is
    unchanged). Features are gathered with fixed index buffers (no boolean indexing), so
    the layer traces under ``torch.compile``. The default conditioner's last layer starts
    at zero, so a new layer is the identity.

    **Your own conditioner.** ``conditioner(in_features, out_features)`` is called once and
    must return an ``nn.Module`` mapping ``(batch, in_features)`` to ``(batch,
    out_features)``: the input is ``x_A`` followed by the context (``in_features = |A| +
    context``), the output the ``|B| * params_per_feature`` parameters, feature by feature.
    Make it output zeros at initialization (e.g. a zero last layer) so that the layer
    starts as the identity map. It is stored as ``self.conditioner``.

    Args:
        features: the dimension ``d >= 2``.
        monotonic: the elementwise map: a :class:`~exactflow.transforms.monotonic.MonotonicMap`
            or its name (``"affine"``, ``"additive"``, ``"spline"``).
        hidden: hidden layer sizes of the conditioner.
        mask: which features are transformed (see :func:`coupling_mask`).
        context: size of the context vector (0 for an unconditional layer); the context
            is concatenated to ``x_A`` at the conditioner's input.
        activation: constructor of the conditioner's activation (default ``nn.ReLU``;
            ignored with ``conditioner``).
        conditioner: a factory of the conditioner network (default: an :class:`MLP` with
            ``hidden`` and ``activation`` and a zero last layer; ``hidden`` is then ignored).

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.transforms.Coupling(3, "affine", hidden=(16,), mask="odd", context=2)
        >>> z, ladj = t(torch.randn(4, 3), context=torch.randn(4, 2))
        >>> z.shape, ladj.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """

    features: int
    mask: Tensor
    identity_index: Tensor
    transformed_index: Tensor
    unshuffle: Tensor
    conditioner: nn.Module

    def __init__(
        self,
        features: int,
        monotonic: str | MonotonicMap = "affine",
        hidden: Sequence[int] | int = (64, 64),
        mask: str | Sequence[bool] | Tensor = "even",
        context: int = 0,
        activation: Activation = nn.ReLU,
        conditioner: ConditionerFactory | None = None,
    ) -> None:
        super().__init__()
        m = coupling_mask(features, mask)
        if isinstance(context, bool) or not isinstance(context, int) or context < 0:
            raise ValueError(f"context must be an integer >= 0, got {context!r}")
        self.features = features
        self.context_features = context
        self.monotonic = monotonic_map(monotonic)
        index = torch.arange(features)
        identity_index = index[~m]
        transformed_index = index[m]
        self.register_buffer("mask", m)
        self.register_buffer("identity_index", identity_index)
        self.register_buffer("transformed_index", transformed_index)
        # cat([x_A, z_B]) lists the features in the order cat([identity, transformed]);
        # index_select with the inverse permutation puts them back in place.
        shuffled = torch.cat([identity_index, transformed_index])
        self.register_buffer("unshuffle", torch.argsort(shuffled))
        n_in = identity_index.numel() + context
        n_out = transformed_index.numel() * self.monotonic.params_per_feature
        if conditioner is None:
            self.conditioner = MLP(
                n_in, n_out, hidden=hidden, activation=activation, zero_last=True
            )
        else:
            self.conditioner = conditioner(n_in, n_out)
            if not isinstance(self.conditioner, nn.Module):
                raise TypeError(
                    f"conditioner must return an nn.Module, got {type(self.conditioner).__name__}"
                )

    def _params(self, x_a: Tensor, context: Tensor | None, packed: Tensor | None) -> Tensor:
        # (The call checks that a conditional layer gets its context.)
        if self.context_features == 0 or context is None:
            inputs = x_a
        else:
            inputs = torch.cat([x_a, context], dim=1)
        if packed is None:
            params = self.conditioner(inputs)
        else:  # the default network's pass with given weights (the fused layer's backward)
            params = self.conditioner._composable(inputs, packed)  # type: ignore[operator]
        n = self.transformed_index.numel()
        return params.reshape(x_a.shape[0], n, self.monotonic.params_per_feature)

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        if self.context_features == 0:
            context = None
        net = self.conditioner
        if (
            not inverse
            and type(self.monotonic) is AffineMap
            and type(net) is MLP
            and net.relu
            and not has_hooks(net)
            and type(self)._params is Coupling._params
            and is_plain(x, net.packed, *(() if context is None else (context,)))
        ):
            # The default network: the density direction runs fused (same values).
            return _FusedAffineCoupling.apply(x, context, net.packed, self)
        return self._couple_generic(x, context, None, inverse)

    @property
    def _row_width(self) -> int | None:
        # The default network with elementwise activations, a map of exactflow's, and the
        # forward and inverse of this class.
        net, cls = self.conditioner, type(self)
        if not (
            type(net) is MLP
            and type(self.monotonic) in (AffineMap, AdditiveMap, SplineMap)
            and all(type(m) in ELEMENTWISE for m in net.activations())
            and cls.forward is Coupling.forward
            and cls.inverse is Coupling.inverse
            and cls._couple is Coupling._couple
            and cls._couple_generic is Coupling._couple_generic
            and cls._params is Coupling._params
        ):
            return None
        return max(*net.hidden, net.out_features, self.features)

    def _couple_generic(
        self, x: Tensor, context: Tensor | None, packed: Tensor | None, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        x_a = x.index_select(1, self.identity_index)
        x_b = x.index_select(1, self.transformed_index)
        params = self._params(x_a, context, packed)
        if inverse:
            y_b, log_det = apply_map(self.monotonic, x_b, params, inverse=True)
        else:
            y_b, log_det = apply_map(self.monotonic, x_b, params)
        y = torch.cat([x_a, y_b], dim=1).index_select(1, self.unshuffle)
        return y, log_det.sum(dim=1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent: ``(z, log|det dz/dx|)`` in one conditioner pass."""
        return self._couple(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data: ``(x, log|det dx/dz|)`` in one conditioner pass."""
        return self._couple(z, context, inverse=True)

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, monotonic={self.monotonic!r}, "
            f"transformed={self.transformed_index.tolist()}, context={self.context_features}"
        )


class AdditiveCoupling(Coupling):
    """NICE's additive coupling, ``z_B = x_B + t(x_A, context)``, ``z_A = x_A``.

    Volume preserving: ``log|det dz/dx| = 0``. Both directions take one conditioner pass
    (fast density and fast sampling), O(batch * (d * h + h^2)).

    Args:
        features: the dimension ``d >= 2``.
        hidden, mask, context, activation, conditioner: as in :class:`Coupling`.

    References:
        Dinh, Krueger & Bengio, NICE: Non-linear Independent Components Estimation (2014),
        arXiv:1410.8516.
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] | int = (64, 64),
        mask: str | Sequence[bool] | Tensor = "even",
        context: int = 0,
        activation: Activation = nn.ReLU,
        conditioner: ConditionerFactory | None = None,
    ) -> None:
        super().__init__(features, AdditiveMap(), hidden, mask, context, activation, conditioner)


class AffineCoupling(Coupling):
    """RealNVP's affine coupling, ``z_B = x_B * exp(s) + t`` with ``(t, a) = theta(x_A, context)``.

    ``log|det dz/dx| = sum_{i in B} s_i``. The log-scale is soft-clamped,
    ``s = scale_bound * tanh(a / scale_bound)`` (see
    :class:`~exactflow.transforms.monotonic.AffineMap`): a bound on the parameterization,
    not an approximation. Both directions take one conditioner pass (fast density and fast
    sampling), O(batch * (d * h + h^2)).

    Args:
        features: the dimension ``d >= 2``.
        hidden, mask, context, activation, conditioner: as in :class:`Coupling`.
        scale_bound: the largest ``|s|``.

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2016),
        arXiv:1605.08803.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.transforms.AffineCoupling(2, hidden=(8,))
        >>> x = torch.randn(3, 2)
        >>> z, ladj = t(x)          # a new layer is the identity
        >>> bool(torch.equal(z, x)), ladj.tolist()
        (True, [0.0, 0.0, 0.0])
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] | int = (64, 64),
        mask: str | Sequence[bool] | Tensor = "even",
        context: int = 0,
        scale_bound: float = 3.0,
        activation: Activation = nn.ReLU,
        conditioner: ConditionerFactory | None = None,
    ) -> None:
        super().__init__(
            features, AffineMap(scale_bound), hidden, mask, context, activation, conditioner
        )


class SplineCoupling(Coupling):
    """Rational-quadratic spline coupling (NSF), ``z_B = RQS(x_B; theta(x_A, context))``.

    Each transformed feature goes through a monotonic rational-quadratic spline with
    ``bins`` bins on ``[-bound, bound]`` and the identity outside;
    ``log|det dz/dx| = sum_{i in B} log RQS'(x_i)``. Both directions take one conditioner
    pass (the inverse solves a quadratic per element), O(batch * (d * h + h^2 + d * bins)).

    Args:
        features: the dimension ``d >= 2``.
        bins: number of spline bins (``3 * bins - 1`` parameters per transformed feature).
        bound: the spline's interval is ``[-bound, bound]``.
        hidden, mask, context, activation, conditioner: as in :class:`Coupling`.

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
        mask: str | Sequence[bool] | Tensor = "even",
        context: int = 0,
        activation: Activation = nn.ReLU,
        conditioner: ConditionerFactory | None = None,
    ) -> None:
        super().__init__(
            features, SplineMap(bins, bound), hidden, mask, context, activation, conditioner
        )
