"""Conditioners: the networks that output the parameters of coupling and autoregressive layers.

* :class:`MLP` is the conditioner of coupling layers: a plain fully connected network, its
  weights and biases kept in one tensor.
* :class:`MADE` is the conditioner of autoregressive layers: a fully connected network whose
  weights are masked so that the outputs for feature ``i`` depend only on the features that
  come before ``i`` in a chosen order (Germain et al. 2015). One pass gives the parameters of
  every feature.

Both can start with a zero last layer, so that a new flow layer built on them starts as the
identity map (for the affine, additive and spline maps of :mod:`exactflow.transforms.monotonic`).

Modules: ``mlp`` (:class:`MLP` and its fused ReLU pass, :class:`MaskedLinear`,
:func:`resolve_order`, the size checks), ``made`` (:class:`MADE`), ``layout`` (MADE's
degree-sorted block layout and the conversion to and from exactflow 0.1's dense masked
layers), ``passes`` (MADE's fused, composable and autoregressive passes over that layout,
and :func:`~exactflow.nn.passes.is_plain`, where hand-written passes apply), ``workspace``
(the buffers MADE's fused pass reuses from call to call, pooled).
"""

from __future__ import annotations

from .made import MADE
from .mlp import MLP, MaskedLinear, resolve_order, with_dropout

# Also importable from here: the type of ``activation=`` arguments, and the size checks.
from .mlp import Activation as Activation
from .mlp import _count as _count
from .mlp import _hidden_sizes as _hidden_sizes

__all__ = ["MLP", "MaskedLinear", "MADE", "resolve_order", "with_dropout"]
