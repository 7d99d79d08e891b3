"""The plain networks and the small pieces both conditioners share.

:class:`MLP` (the coupling layers' conditioner), :class:`MaskedLinear` (a linear layer with
a fixed 0/1 mask), :func:`resolve_order` (the autoregressive order as a permutation) and the
checks of sizes and counts that :class:`~exactflow.nn.MADE` uses too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .passes import has_hooks, is_plain, recomputed_backward

__all__ = ["MLP", "MaskedLinear", "resolve_order", "Activation", "with_dropout"]

Activation = Callable[[], nn.Module]

_threshold_backward = torch.ops.aten.threshold_backward.grad_input


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


class _MLPFunction(torch.autograd.Function):
    """A ReLU :class:`MLP`'s pass with a hand-written backward (one graph node).

    The weight and bias gradients are written straight into one tensor laid out like
    :attr:`MLP.packed`. Under ``create_graph=True`` the backward recomputes the pass with
    differentiable ops, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, packed: Tensor, net: MLP) -> Tensor:
        out, inputs = relu_pass(x, net._views(packed))
        ctx.net = net
        # Activations too go through save_for_backward: freed after the backward, and
        # seen by saved-tensor hooks.
        ctx.save_for_backward(x, packed, *inputs[1:])
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, packed, *hidden = ctx.saved_tensors
        net: MLP = ctx.net
        recomputed = recomputed_backward(ctx, grad, net._composable, x, packed)
        if recomputed is not None:  # create_graph=True, or batched gradients
            return recomputed
        need_x, need_packed = ctx.needs_input_grad[:2]
        grads = torch.empty_like(packed) if need_packed else None
        grad_views = None if grads is None else net._views(grads)
        grad_x = relu_backward(grad, [x, *hidden], net._views(packed), need_x, grad_views)
        return grad_x, grads, None


class MLP(nn.Module):
    """A fully connected network ``in_features -> hidden... -> out_features``.

    Linear layers with an activation between them (none after the last layer).

    All weights and biases live in one trainable tensor, :attr:`packed` (layer after layer,
    the ``(out, in)`` weight row by row, then the bias), so an optimizer updates one tensor
    per network instead of two per layer. :meth:`linear` gives layer ``i``'s weight and
    bias as views of it. The ``state_dict`` keeps the layout of a ``nn.Sequential`` of
    ``nn.Linear`` layers (``0.weight``, ``0.bias``, ``2.weight``, ...), so files written
    by earlier versions load and files written now have the same keys. With ``nn.ReLU``
    (the default) the pass runs without autograd inside one graph node with a hand-written
    backward; other activations, inputs that are not 2-D, and the cases
    :func:`~exactflow.nn.passes.is_plain` rules out (``torch.compile``, ``torch.func``,
    autocast, forward-mode AD, module hooks) run differentiable torch ops. A seed draws
    the same network as ``nn.Linear`` layers would (same initialization, same order).

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
        >>> [p.shape for p in net.linear(0)]
        [torch.Size([16, 3]), torch.Size([16])]
    """

    packed: nn.Parameter

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] | int = (64, 64),
        activation: Activation = nn.ReLU,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        in_features = _count(in_features, "in_features", 1)
        out_features = _count(out_features, "out_features", 1)
        self.in_features = in_features
        self.out_features = out_features
        self.hidden = _hidden_sizes(hidden)
        sizes = (in_features, *self.hidden, out_features)
        #: Per layer: the shapes of its weight and bias, in the order of ``packed``.
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self._shapes = [shape for a, b in pairs for shape in ((b, a), (b,))]
        self._numels = [int(torch.Size(s).numel()) for s in self._shapes]
        # (shape, strides, offset) of every piece, for the fused passes' views.
        offsets = [sum(self._numels[:i]) for i in range(len(self._numels))]
        self._pieces = [
            (shape, (shape[1], 1) if len(shape) == 2 else (1,), offset)
            for shape, offset in zip(self._shapes, offsets, strict=True)
        ]
        # Drawn as nn.Linear layers, in the same order: a seed gives the same network.
        linears = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            linears.append(nn.Linear(a, b))
            if i < len(sizes) - 2:  # activations sit at the odd positions of a Sequential
                self.add_module(str(2 * i + 1), activation())
        if zero_last:
            nn.init.zeros_(linears[-1].weight)
            nn.init.zeros_(linears[-1].bias)
        with torch.no_grad():
            packed = torch.cat([t.reshape(-1) for m in linears for t in (m.weight, m.bias)])
        self.packed = nn.Parameter(packed)
        self.register_load_state_dict_pre_hook(_join_layers)

    @property
    def layers(self) -> int:
        """The number of linear layers."""
        return len(self._shapes) // 2

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """``[weight, bias]`` of every layer in turn as views of ``packed`` (or of any
        tensor laid out like it, such as its gradient)."""
        parts = packed.split(self._numels)
        return [part.view(shape) for part, shape in zip(parts, self._shapes, strict=True)]

    def _views(self, t: Tensor) -> list[Tensor]:
        """:meth:`unpack` for the hand-written passes, which track no gradient through the
        views: one ``as_strided`` per piece, half the cost of ``split`` and ``view``."""
        if not t.is_contiguous() or t.numel() != self.packed.numel():
            return self.unpack(t)  # (which names a wrong size)
        base = t.storage_offset()
        return [t.as_strided(shape, strides, base + at) for shape, strides, at in self._pieces]

    def linear(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer ``i``'s ``(weight, bias)``, views of :attr:`packed` (``i = -1``: the last)."""
        views = self.unpack(self.packed)
        i = range(self.layers)[i]
        return views[2 * i], views[2 * i + 1]

    def activations(self) -> list[nn.Module]:
        """The activation modules, in order (one between consecutive layers)."""
        return [self._modules[str(2 * i + 1)] for i in range(self.layers - 1)]  # type: ignore[misc]

    @property
    def relu(self) -> bool:
        """Whether every activation is a plain ``nn.ReLU`` without hooks (the fused pass
        calls no module, so it applies only where no hook would be skipped)."""
        return all(type(m) is nn.ReLU and not has_hooks(m) for m in self._modules.values())

    def _composable(self, x: Tensor, packed: Tensor) -> Tensor:
        """The pass in differentiable torch ops (any activation, compile, torch.func)."""
        views = self.unpack(packed)
        activations = self.activations()
        h = x
        for i in range(self.layers):
            h = F.linear(h, views[2 * i], views[2 * i + 1])
            if i < len(activations):
                h = activations[i](h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in_features) -> (*, out_features)``."""
        packed = self.packed
        if not (x.dim() == 2 and self.relu and is_plain(x, packed)):
            return self._composable(x, packed)
        if torch.is_grad_enabled() and (x.requires_grad or packed.requires_grad):
            return _MLPFunction.apply(x, packed, self)
        return relu_pass(x, self._views(packed))[0]

    # -- the state dict of a Sequential of Linear layers ----------------------------------

    def _keys(self, prefix: str) -> list[str]:
        names = ("weight", "bias")
        return [f"{prefix}{2 * i}.{name}" for i in range(self.layers) for name in names]

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        packed = destination.pop(prefix + "packed", None)
        if packed is None:
            return
        for key, view in zip(self._keys(prefix), self.unpack(packed), strict=True):
            # Views, as a state dict's entries are: editing one in place edits the network
            # (an exponential moving average of the weights, for one, relies on it).
            destination[key] = view

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden={self.hidden}, "
            f"out_features={self.out_features}, parameters={self.packed.numel()}"
        )


def _join_layers(
    module: MLP,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load hook: the per-layer entries (``0.weight``, ``0.bias``, ...) into ``packed``.

    A missing or misshapen entry is reported as ``nn.Linear`` layers would report it, and
    its part of ``packed`` keeps the current values (so a ``strict=False`` load of some
    layers loads those layers).
    """
    if prefix + "packed" in state_dict:
        return
    current = module.unpack(module.packed.detach())
    pieces = []
    like: Tensor | None = None  # the first entry loaded
    for key, now in zip(module._keys(prefix), current, strict=True):
        value = state_dict.pop(key, None)
        if value is None:
            missing_keys.append(key)
            value = now
        elif not isinstance(value, Tensor) or value.shape != now.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {shape} from "
                f"checkpoint, the shape in current model is {tuple(now.shape)}."
            )
            value = now
        elif like is None:
            like = value
        pieces.append(value.detach().reshape(-1))
    # Kept entries take the dtype and device of the loaded ones (one tensor holds them all);
    # torch then converts the whole, or keeps it with assign=True, as it would each layer.
    ref = pieces[0] if like is None else like
    state_dict[prefix + "packed"] = torch.cat([p.to(ref) for p in pieces])


def relu_pass(x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """A ReLU network's forward pass without autograd, each ReLU applied in place.

    ``params`` is ``[weight, bias]`` per linear layer (:meth:`MLP.unpack`). Returns the
    output and every layer's input, which :func:`relu_backward` needs.
    """
    inputs = [x]
    h = x
    last = len(params) // 2 - 1
    for i in range(last + 1):
        h = torch.addmm(params[2 * i + 1], h, params[2 * i].t())
        if i < last:
            h.relu_()
            inputs.append(h)
    return h, inputs


def relu_backward(
    g: Tensor,
    inputs: list[Tensor],
    params: Sequence[Tensor],
    need_x: bool,
    grads: Sequence[Tensor] | None,
) -> Tensor | None:
    """The gradients of :func:`relu_pass` for the output gradient ``g``.

    Writes ``[grad of weight, grad of bias]`` per layer into ``grads`` (views laid out like
    ``params``; None: not wanted) and returns the gradient of ``x`` (None unless
    ``need_x``). The ReLU's backward runs in place on the input gradient (a unit's output
    is positive exactly where its pre-activation is).
    """
    for i in range(len(params) // 2 - 1, -1, -1):
        if grads is not None:
            torch.mm(g.t(), inputs[i], out=grads[2 * i])
            torch.sum(g, 0, out=grads[2 * i + 1])
        if i == 0:
            return g.mm(params[0]) if need_x else None
        g_in = g.mm(params[2 * i])
        g = _threshold_backward(g_in, inputs[i], 0, grad_input=g_in)
    return None


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
