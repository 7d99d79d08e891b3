"""The plain networks and the small pieces both conditioners share.

:class:`MLP` (the coupling layers' conditioner), :class:`MaskedLinear` (a linear layer with
a fixed 0/1 mask), :func:`resolve_order` (the autoregressive order as a permutation) and the
checks of sizes and counts that :class:`~exactflow.nn.MADE` uses too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "MaskedLinear", "resolve_order", "Activation", "with_dropout"]

Activation = Callable[[], nn.Module]


def with_dropout(p: float, activation: Activation = nn.ReLU) -> Activation:
    """The activation followed by dropout of probability ``p`` (``p = 0``: the activation).

    A regularizer for conditioners trained on few rows. It acts in training mode only; a
    flow with a given dropout mask is still an exact bijection (dropout acts on hidden units,
    so a MADE stays autoregressive), and in eval mode, where the density is scored and
    samples drawn, there is no dropout at all. Parameters and state-dict keys are those of
    the network without dropout.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
    if p == 0:
        return activation

    def make() -> nn.Module:
        return nn.Sequential(activation(), nn.Dropout(float(p)))

    return make


def _hidden_sizes(hidden: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    # A bool is an int but no size: like any other non-sequence, tuple() refuses it.
    sizes = tuple(hidden)  # type: ignore[arg-type]
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
    ) -> None:
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

    mask: Tensor

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
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
