"""Conditioners: the networks that output the parameters of coupling and autoregressive layers.

* :class:`MLP` is the conditioner of coupling layers: a plain fully connected network.
* :class:`MADE` is the conditioner of autoregressive layers: a fully connected network whose
  weights are masked so that the outputs for feature ``i`` depend only on the features that
  come before ``i`` in a chosen order (Germain et al. 2015). One pass gives the parameters of
  every feature.

Both can start with a zero last layer, so that a new flow layer built on them starts as the
identity map (for the affine, additive and spline maps of :mod:`exactflow.transforms.monotonic`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "MaskedLinear", "MADE", "resolve_order"]

Activation = Callable[[], nn.Module]


def _hidden_sizes(hidden: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    sizes = tuple(hidden)
    for h in sizes:
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"hidden must be a sequence of positive integers, got {hidden!r}")
    return sizes


def _count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class MLP(nn.Sequential):
    """A fully connected network ``in_features -> hidden... -> out_features``.

    Linear layers with an activation between them (none after the last layer).

    Args:
        in_features: input size.
        out_features: output size.
        hidden: sizes of the hidden layers (may be empty for a single linear layer).
        activation: a constructor of the activation module (default ``nn.ReLU``).
        zero_last: initialize the last layer's weight and bias to zero, so the network
            outputs zeros until it is trained (a new flow layer then starts as the identity).

    Example:
        >>> import torch
        >>> from exactflow.nn import MLP
        >>> net = MLP(3, 4, hidden=(16, 16), zero_last=True)
        >>> net(torch.randn(5, 3)).abs().max()
        tensor(0., grad_fn=<MaxBackward1>)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] | int = (64, 64),
        activation: Activation = nn.ReLU,
        zero_last: bool = False,
    ):
        in_features = _count(in_features, "in_features", 1)
        out_features = _count(out_features, "out_features", 1)
        sizes = (in_features, *_hidden_sizes(hidden), out_features)
        layers: list[nn.Module] = []
        linear = nn.Linear(sizes[0], sizes[1])
        layers.append(linear)
        for a, b in zip(sizes[1:-1], sizes[2:], strict=True):
            linear = nn.Linear(a, b)
            layers += [activation(), linear]
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features
        if zero_last:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask: ``y = (W * M) x + b``.

    The mask (shape ``(out_features, in_features)``) is a buffer, so it moves with the module
    and is saved in its ``state_dict``.
    """

    def __init__(self, mask: Tensor, bias: bool = True):
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def resolve_order(
    features: int, order: str | Sequence[int] | Tensor | None, seed: int | None = None
) -> Tensor:
    """The autoregressive order as a permutation: ``order[k]`` is the ``k``-th feature.

    ``None`` or ``"forward"`` gives ``0, 1, ..., d-1``; ``"reverse"`` gives
    ``d-1, ..., 0``; ``"random"`` draws one from ``seed`` (or torch's global generator when
    ``seed`` is None); a sequence is taken as the permutation itself.
    """
    if order is None or (isinstance(order, str) and order == "forward"):
        return torch.arange(features)
    if isinstance(order, str):
        if order == "reverse":
            return torch.arange(features - 1, -1, -1)
        if order == "random":
            gen = None if seed is None else torch.Generator().manual_seed(seed)
            return torch.randperm(features, generator=gen)
        raise ValueError(
            f"order must be 'forward', 'reverse', 'random' or a permutation, got {order!r}"
        )
    perm = torch.as_tensor(order, dtype=torch.long).reshape(-1)
    if perm.numel() != features or not torch.equal(
        torch.sort(perm).values, torch.arange(features)
    ):
        raise ValueError(f"order must be a permutation of 0..{features - 1}, got {perm.tolist()}")
    return perm


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: an autoregressive conditioner.

    Maps ``x`` of shape ``(batch, features)`` (and an optional context ``(batch, c)``) to
    parameters of shape ``(batch, features, outputs)`` such that the parameters of feature
    ``order[k]`` depend only on ``x[:, order[:k]]`` and on the context. The Jacobian of any
    elementwise map driven by these parameters is then triangular in that order.

    Construction (Germain et al. 2015): feature ``order[k]`` gets degree ``k + 1``; hidden
    units get degrees cycling through ``1 .. d-1``; a weight from a unit of degree ``a``
    into a hidden unit of degree ``b`` is kept iff ``b >= a``, and into an output of degree
    ``b`` iff ``b > a``. The masks are computed once and stored as buffers.

    The context is not masked: it feeds every unit of the first hidden layer. So that the
    first feature (which sees no other feature) can depend on the context too, a
    conditional MADE also has hidden units of degree 0, which see only the context and
    feed every output. With ``features == 1`` the network depends on the context alone.

    One pass costs the same as an MLP of the same sizes, O(batch * (d * h + h^2 + h * d * o)).

    Args:
        features: the number of features ``d``.
        outputs: parameters per feature ``o``.
        hidden: sizes of the hidden layers; with fewer than ``d - 1`` units a layer leaves
            some degrees out (still autoregressive, less expressive).
        context: size of the context vector (0 for none).
        order: the autoregressive order: ``None`` / ``"forward"``, ``"reverse"``,
            ``"random"`` or a permutation of ``0..d-1``.
        seed: seed for ``order="random"``.
        activation: constructor of the activation module (default ``nn.ReLU``).
        zero_last: initialize the output layer to zero (the layer then starts as identity).

    References:
        Germain, Gregor, Murray & Larochelle, MADE: Masked Autoencoder for Distribution
        Estimation (2015), arXiv:1502.03509.

    Example:
        >>> import torch
        >>> from exactflow.nn import MADE
        >>> made = MADE(3, outputs=2, hidden=(8,), order="reverse", zero_last=False)
        >>> made(torch.randn(4, 3)).shape
        torch.Size([4, 3, 2])
    """

    def __init__(
        self,
        features: int,
        outputs: int = 1,
        hidden: Sequence[int] | int = (64, 64),
        context: int = 0,
        order: str | Sequence[int] | Tensor | None = None,
        seed: int | None = None,
        activation: Activation = nn.ReLU,
        zero_last: bool = True,
    ):
        super().__init__()
        self.features = _count(features, "features", 1)
        self.outputs = _count(outputs, "outputs", 1)
        self.context_features = _count(context, "context", 0)
        sizes = _hidden_sizes(hidden)
        perm = resolve_order(self.features, order, seed)
        self.register_buffer("order", perm)

        d = self.features
        degree_in = torch.empty(d, dtype=torch.long)
        degree_in[perm] = torch.arange(1, d + 1)
        # Degree-0 hidden units see only the context (and biases); they are needed when the
        # first feature must depend on the context, and are the only choice when d == 1.
        low = 0 if (self.context_features > 0 or d == 1) else 1
        span = d - low  # degrees low .. d-1

        degrees = [degree_in]
        layers: list[nn.Module] = []
        for h in sizes:
            degree_h = low + torch.arange(h) % span
            layers.append(MaskedLinear(degree_h[:, None] >= degrees[-1][None, :]))
            degrees.append(degree_h)
        degree_out = degree_in.repeat_interleave(self.outputs)
        layers.append(MaskedLinear(degree_out[:, None] > degrees[-1][None, :]))
        self.layers = nn.ModuleList(layers)
        self.activation = activation()
        first_width = sizes[0] if sizes else d * self.outputs
        self.context_layer = (
            nn.Linear(self.context_features, first_width, bias=False)
            if self.context_features > 0
            else None
        )
        if zero_last:
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Parameters ``(batch, features, outputs)``; row ``i`` depends on ``x[:, order[:k]]``."""
        h = self.layers[0](x)
        if self.context_layer is not None:
            if context is None:
                raise ValueError(
                    f"this MADE is conditional: pass a context of shape "
                    f"(batch, {self.context_features})"
                )
            h = h + self.context_layer(context)
        for layer in self.layers[1:]:
            h = layer(self.activation(h))
        return h.reshape(x.shape[0], self.features, self.outputs)

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, outputs={self.outputs}, "
            f"context={self.context_features}, order={self.order.tolist()}"
        )
