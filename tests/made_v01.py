"""exactflow 0.1's MADE, frozen: the dense masked reference the blocked MADE is tested against.

A verbatim copy of ``exactflow.nn.MaskedLinear`` and ``exactflow.nn.MADE`` as of exactflow
0.1 (commit d37b829): dense weight matrices multiplied by fixed 0/1 masks. Its state dicts
have the 0.1 layout (``layers.K.weight``, ``layers.K.bias``, ``layers.K.mask``, ``order``,
``context_layer.weight``) that the current MADE converts on load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactflow.nn import _count, _hidden_sizes, resolve_order

Activation = Callable[[], nn.Module]


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



class MADEv01(nn.Module):
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
