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
from typing import NamedTuple

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


class _Layer(NamedTuple):
    """The static structure of one MADE layer in degree-sorted unit order."""

    n_in: int
    n_out: int
    #: Whether the activation follows (every layer but the output layer).
    hidden: bool
    #: Per output unit (sorted): how many inputs it sees, always a prefix of the sorted inputs.
    prefix: tuple[int, ...]
    #: One GEMM block per entry: (first unit, end unit, columns = the largest prefix in it).
    groups: tuple[tuple[int, int, int], ...]
    #: The input gradient's blocks: (first input, end input, first unit that sees them).
    columns: tuple[tuple[int, int, int], ...]
    #: Per degree ``k = 0 .. d``: (first unit, end unit, prefix) of the units of degree ``k``.
    degrees: tuple[tuple[int, int, int], ...]


class _MADEFunction(torch.autograd.Function):
    """One fused pass through MADE's blocked layers with a hand-written backward.

    Outputs are written into preallocated tensors block by block, the ReLU is applied in
    place and its backward is one in-place ``threshold_backward``; the weight gradients land
    straight in a buffer laid out like the blocks and are gathered into the packed layout
    once. Under ``create_graph=True`` the backward recomputes the pass with differentiable
    torch ops, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx, x_in: Tensor, packed: Tensor, made: MADE) -> Tensor:  # type: ignore[override]
        weights = made._weights(packed)
        out, inputs = made._fused(x_in, weights)
        ctx.made = made
        ctx.weights = weights
        ctx.inputs = inputs
        ctx.save_for_backward(x_in, packed)
        return out.t()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x_in, packed = ctx.saved_tensors
        made: MADE = ctx.made
        need_x, need_packed = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            with torch.enable_grad():
                out = made._composable(x_in, packed)
            wanted = [t for t, need in ((x_in, need_x), (packed, need_packed)) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
            return (next(grads) if need_x else None, next(grads) if need_packed else None, None)
        g = grad.t().contiguous()
        grad_x, grad_packed = made._fused_backward(g, ctx.weights, ctx.inputs, need_x)
        return (None if grad_x is None else grad_x.t().contiguous()), grad_packed, None


_threshold_backward = torch.ops.aten.threshold_backward.grad_input


def _is_functorch(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a ``torch.func`` transform (vmap, grad, jacrev...)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # a torch without these internals: treat as plain
        return False


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: an autoregressive conditioner.

    Maps ``x`` of shape ``(batch, features)`` (and an optional context ``(batch, c)``) to
    parameters of shape ``(batch, features, outputs)`` such that the parameters of feature
    ``order[k]`` depend only on ``x[:, order[:k]]`` and on the context. The Jacobian of any
    elementwise map driven by these parameters is then triangular in that order.

    Construction (Germain et al. 2015): feature ``order[k]`` gets degree ``k + 1``; hidden
    units get degrees cycling through ``1 .. d-1``; a weight from a unit of degree ``a``
    into a hidden unit of degree ``b`` exists iff ``b >= a``, and into an output of degree
    ``b`` iff ``b > a``. The context is not masked: it feeds every unit of the first hidden
    layer. So that the first feature (which sees no other feature) can depend on the context
    too, a conditional MADE also has hidden units of degree 0, which see only the context and
    feed every output. With ``features == 1`` the network depends on the context alone.

    **Only the weights the masks keep are stored.** Inputs are taken in ``order`` (context
    first) and hidden units sorted by degree, so every unit sees a *prefix* of the previous
    layer. :attr:`packed`, the one trainable tensor, holds layer after layer each unit's
    weights from the prefix it sees (unit by unit, in sorted order), then the layer's
    biases: ``sum(p.numel() for p in made.parameters())`` is the number of weights a dense
    masked MADE keeps (its mask's ones, context weights included) plus its biases, about
    half of the dense count that libraries storing full masked matrices report. Compare
    models by this number. :meth:`masked_weights` rebuilds the dense masked matrices of
    exactflow 0.1, and 0.1 state dicts (``layers.K.weight``, ``layers.K.bias``,
    ``layers.K.mask``, ``context_layer.weight``) are converted on load.

    **Most masked multiply-adds are skipped.** The masks are block triangular in the sorted
    order. A layer runs as one GEMM per block of consecutive degrees (at least
    ``block_rows`` units), each against only the prefix of inputs its units see; the
    backward does the same for the weight gradients and, block of inputs by block of
    inputs, for the input gradient. With blocks of ``1/B`` of a layer, about
    ``(B - 1) / (2B)`` of its dense multiply-adds are skipped (the rest of the masked ones
    are zeros inside the diagonal blocks); the result is the dense masked product exactly.

    **Autoregression in one pass.** :meth:`autoregress` runs the sequential direction (MAF
    sampling, IAF density): step ``k`` computes only the units of degree ``k``, which need
    nothing but the features before it, so all ``d`` steps together cost the multiply-adds
    of one pass instead of ``d`` passes.

    Cost: one pass is O(batch * n) for the ``n`` kept weights (about half of
    ``d*h + h^2 + h*d*o``) in a few GEMMs per layer; :meth:`autoregress` the same in ``d``
    steps of small GEMMs. ReLU networks run a fused pass (activations stored unit-major,
    every block written in place) with a hand-written backward; other activations,
    ``torch.compile``, ``torch.func`` transforms and autocast run the same blocked
    products as differentiable torch ops, and so does the backward under
    ``create_graph=True``.

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
        block_rows: the fewest units per GEMM block (blocks follow degree boundaries):
            smaller blocks skip more masked multiply-adds at the price of more, smaller
            GEMMs. A speed setting only: outputs and parameters do not depend on it.

    Warning:
        Forward-mode AD (``torch.autograd.forward_ad``) is not supported by the fused
        ReLU pass; ``torch.func.jvp`` and ``jacfwd`` are (they take the composable path).

    References:
        Germain, Gregor, Murray & Larochelle, MADE: Masked Autoencoder for Distribution
        Estimation (2015), arXiv:1502.03509.

    Example:
        >>> import torch
        >>> from exactflow.nn import MADE
        >>> made = MADE(3, outputs=2, hidden=(8,), order="reverse", zero_last=False)
        >>> made(torch.randn(4, 3)).shape
        torch.Size([4, 3, 2])
        >>> sum(p.numel() for p in made.parameters())  # kept weights and biases
        50
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
        block_rows: int = 64,
    ):
        super().__init__()
        self.features = _count(features, "features", 1)
        self.outputs = _count(outputs, "outputs", 1)
        self.context_features = _count(context, "context", 0)
        self.hidden = _hidden_sizes(hidden)
        self.block_rows = _count(block_rows, "block_rows", 1)
        self.register_buffer("order", resolve_order(self.features, order, seed))
        self.register_buffer("_rank", torch.argsort(self.order), persistent=False)
        self._identity_order = bool(torch.equal(self.order, torch.arange(self.features)))
        self.activation = activation()
        self._relu = type(self.activation) is nn.ReLU

        d, c = self.features, self.context_features
        # Degree-0 hidden units see only the context (and biases); they are needed when the
        # first feature must depend on the context, and are the only choice when d == 1.
        self._low = 0 if (c > 0 or d == 1) else 1
        self._build_plan()

        # Initialize exactly as exactflow 0.1 did (dense nn.Linear layers, drawn in the
        # same order), then keep the weights the masks keep: a seed gives the 0.1 network.
        sizes = (d, *self.hidden, d * self.outputs)
        dense = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        context_weight = (
            nn.Linear(c, sizes[1], bias=False).weight if c > 0 else None
        )
        if zero_last:
            nn.init.zeros_(dense[-1].weight)
            nn.init.zeros_(dense[-1].bias)
        with torch.no_grad():
            packed = self._pack(
                [m.weight for m in dense], [m.bias for m in dense], context_weight, self.order
            )
        self.packed = nn.Parameter(packed)
        self.register_load_state_dict_pre_hook(_convert_v01_state)
        self.register_load_state_dict_post_hook(_refresh_order)

    # -- structure -----------------------------------------------------------------------

    def _hidden_degrees(self, width: int) -> Tensor:
        """Degrees of a hidden layer's units in exactflow 0.1's (unsorted) unit order."""
        return self._low + torch.arange(width) % (self.features - self._low)

    def _unit_orders(self, order: Tensor) -> list[Tensor]:
        """Per layer, the 0.1 unit index of each sorted unit (the last entry: outputs)."""
        o = self.outputs
        perms = [torch.argsort(self._hidden_degrees(h), stable=True) for h in self.hidden]
        outputs = (order[:, None] * o + torch.arange(o)).reshape(-1)
        return [*perms, outputs]

    def _build_plan(self) -> None:
        d, o, c = self.features, self.outputs, self.context_features
        degrees_in = torch.cat([torch.zeros(c, dtype=torch.long), torch.arange(1, d + 1)])
        layers: list[_Layer] = []
        widths = (*self.hidden, d * o)
        for i, width in enumerate(widths):
            hidden = i < len(self.hidden)
            if hidden:
                degrees_out = torch.sort(self._hidden_degrees(width)).values
                prefix = torch.searchsorted(degrees_in, degrees_out, right=True)
            else:
                degrees_out = torch.arange(1, d + 1).repeat_interleave(o)
                prefix = torch.searchsorted(degrees_in, degrees_out, right=False)
            per_degree = []
            for k in range(d + 1):
                rows = (degrees_out == k).nonzero().flatten()
                if rows.numel() == 0:
                    start = int((degrees_out < k).sum())
                    per_degree.append((start, start, 0))
                else:
                    s, e = int(rows[0]), int(rows[-1]) + 1
                    per_degree.append((s, e, int(prefix[s])))
            groups = self._blocks_along(degrees_out)
            groups = [(s, e, int(prefix[e - 1])) for s, e in groups]
            columns = []
            for a, b in self._blocks_along(degrees_in):
                # The units that see input a (prefixes are sorted) see all of [a, b) or some.
                first = int(torch.searchsorted(prefix, a, right=True))
                columns.append((a, b, first))
            layers.append(
                _Layer(
                    n_in=degrees_in.numel(),
                    n_out=width,
                    hidden=hidden,
                    prefix=tuple(int(p) for p in prefix),
                    groups=tuple(groups),
                    columns=tuple(columns),
                    degrees=tuple(per_degree),
                )
            )
            degrees_in = degrees_out
        self._plan = tuple(layers)

        # Index maps between three layouts of the same numbers:
        # * packed (the parameter): layer by layer, each unit's kept weights, then the biases;
        # * weights (what the pass multiplies): layer by layer the dense sorted matrix
        #   (outputs, 1 + inputs), the bias in column 0 (the pass keeps a row of ones above
        #   the inputs), masked entries zero, so that every block is a strided view;
        # * gradients (what the backward writes): each row block transposed, a contiguous
        #   (1 + columns, units) matrix.
        src, masked, dest, fused = [], [], [], []
        packed_at = weights_at = grads_at = 0
        for layer in self._plan:
            n_in, n_out = layer.n_in, layer.n_out
            prefix = torch.tensor(layer.prefix, dtype=torch.long)
            row_start = packed_at + torch.cumsum(prefix, 0) - prefix
            bias_at = packed_at + int(prefix.sum())
            j = torch.arange(n_in)[None, :]
            keep = j < prefix[:, None]
            index = torch.cat(
                [torch.arange(bias_at, bias_at + n_out)[:, None],
                 torch.where(keep, row_start[:, None] + j, 0)], dim=1,
            )
            seen = torch.cat([torch.ones(n_out, 1, dtype=torch.bool), keep], dim=1)
            src.append(index.reshape(-1))
            masked.append(weights_at + (~seen).reshape(-1).nonzero().flatten())
            # Packed position -> position in the gradients layout.
            to_grads = torch.empty(bias_at + n_out - packed_at, dtype=torch.long)
            groups = []
            for s, e, cols in layer.groups:
                block = index[s:e, : 1 + cols] - packed_at
                kept = seen[s:e, : 1 + cols]
                # Blocks of weight gradients are stored transposed, (1 + cols, units): the
                # backward computes them as inputs @ grad^T, the faster GEMM of the two.
                to_grads[block.t()[kept.t()]] = grads_at + kept.t().reshape(-1).nonzero().flatten()
                groups.append((s, e, cols, grads_at))
                grads_at += (e - s) * (1 + cols)
            dest.append(to_grads)
            # The fused pass walks plain tuples.
            fused.append((n_in, n_out, layer.hidden, weights_at, tuple(groups), layer.columns))
            weights_at += n_out * (1 + n_in)
            packed_at = bias_at + n_out
        src_index, masked_index = torch.cat(src), torch.cat(masked)
        kept = torch.ones(src_index.numel(), dtype=torch.bool)
        kept[masked_index] = False
        scatter = torch.empty(packed_at, dtype=torch.long)
        scatter[src_index[kept]] = kept.nonzero().flatten()
        # Packed position -> weights position (the forward), -> gradients position.
        self.register_buffer("_scatter", scatter, persistent=False)
        self.register_buffer("_dest", torch.cat(dest), persistent=False)
        self._weights_size = weights_at
        self._weights_sizes = tuple(layer.n_out * (1 + layer.n_in) for layer in self._plan)
        self._grads_size = grads_at
        self._packed_size = packed_at
        self._fused_plan = tuple(fused)

    def _blocks_along(self, degrees: Tensor) -> list[tuple[int, int]]:
        """Consecutive ranges of units, cut at degree changes, of at least ``block_rows``."""
        ranges = []
        values = degrees.tolist()
        start, n = 0, len(values)
        for i in range(1, n + 1):
            if i == n or (values[i] != values[i - 1] and i - start >= self.block_rows):
                ranges.append((start, i))
                start = i
        return ranges

    # -- conversion from and to the dense masked layout of exactflow 0.1 ---------------------

    def _sorted_masks(self) -> list[Tensor]:
        return [
            torch.arange(layer.n_in)[None, :] < torch.tensor(layer.prefix)[:, None]
            for layer in self._plan
        ]

    def _pack(
        self,
        weights: Sequence[Tensor],
        biases: Sequence[Tensor],
        context_weight: Tensor | None,
        order: Tensor,
    ) -> Tensor:
        """The packed vector from 0.1's dense weights (masked entries are ignored)."""
        units = self._unit_orders(order)
        columns = [order, *units[:-1]]
        parts = []
        for i, (w, b, mask) in enumerate(zip(weights, biases, self._sorted_masks(), strict=True)):
            w = w.detach()[units[i]][:, columns[i]]
            if i == 0 and context_weight is not None:
                w = torch.cat([context_weight.detach()[units[0]], w], dim=1)
            parts += [w[mask], b.detach()[units[i]]]
        return torch.cat(parts)

    def masked_weights(self) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """The network as exactflow 0.1 stored it: dense masked matrices in feature order.

        Returns ``([(weight, bias), ...], context_weight)``: layer ``K`` computes
        ``h_K = act(weight @ h_{K-1} + bias)`` (no activation after the last), with
        ``weight`` of shape ``(out, in)`` and zeros wherever the mask forbids a connection,
        and ``context_weight @ c`` added to the first layer (``None`` without a context).
        Units are in 0.1's order (hidden degrees cycling, outputs ``feature * o + p``).
        Detached copies: for inspection, export and tests.
        """
        units = self._unit_orders(self.order)
        columns = [self.order, *units[:-1]]
        c = self.context_features
        pieces = iter(self.packed.detach().split(self._packed_split()))
        result, context_weight = [], None
        for i, (layer, mask) in enumerate(zip(self._plan, self._sorted_masks(), strict=True)):
            kept, bias = next(pieces), next(pieces)
            w_sorted = kept.new_zeros(layer.n_out, layer.n_in)
            w_sorted[mask] = kept
            if i == 0:
                context_sorted, w_sorted = w_sorted[:, :c], w_sorted[:, c:]
                if c > 0:
                    context_weight = torch.empty_like(context_sorted)
                    context_weight[units[0]] = context_sorted
            weight = torch.empty_like(w_sorted)
            weight[units[i][:, None], columns[i][None, :]] = w_sorted
            b = torch.empty_like(bias)
            b[units[i]] = bias
            result.append((weight, b))
        return result, context_weight

    def _packed_split(self) -> list[int]:
        sizes = []
        for layer in self._plan:
            sizes += [sum(layer.prefix), layer.n_out]
        return sizes

    # -- the forward pass ----------------------------------------------------------------

    def _weights(self, packed: Tensor) -> Tensor:
        """The weights layout: per layer ``[bias | dense sorted weights]``, masked entries 0."""
        return packed.new_zeros(self._weights_size).index_copy_(0, self._scatter, packed)

    def _layer_weights(self, weights: Tensor) -> list[Tensor]:
        """Per layer the ``(outputs, 1 + inputs)`` matrix (differentiable views)."""
        return [
            w.view(layer.n_out, 1 + layer.n_in)
            for w, layer in zip(weights.split(self._weights_sizes), self._plan, strict=True)
        ]

    def _fused(self, x_in: Tensor, weights: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The pass without autograd in unit-major layout, written in place, ReLU in place.

        Activations are kept transposed, ``(1 + units, batch)``, with a row of ones on top
        that multiplies the biases: a block of units is then a contiguous slab of rows, the
        inputs a unit sees a contiguous prefix of rows, and every block is one GEMM that
        writes its slab in place (a column block of a batch-major tensor would go through
        a temporary, and a broadcast bias add is another pass).
        Returns the output ``(outputs, batch)`` and every layer's input.
        """
        batch, width = x_in.shape
        h = x_in.new_empty(1 + width, batch)
        h[0] = 1
        h[1:] = x_in.t()
        inputs = [h]
        for n_in, n_out, hidden, at, groups, _ in self._fused_plan:
            y = h.new_empty(1 + n_out if hidden else n_out, batch)
            top = 1 if hidden else 0
            stride = 1 + n_in
            for s, e, cols, _ in groups:
                w = weights.as_strided((e - s, 1 + cols), (stride, 1), at + s * stride)
                torch.mm(w, h[: 1 + cols], out=y[top + s : top + e])
            if hidden:
                y[0] = 1
                y.relu_()
                inputs.append(y)
            h = y
        return h, inputs

    def _fused_backward(
        self, g: Tensor, weights: Tensor, inputs: list[Tensor], need_x: bool
    ) -> tuple[Tensor | None, Tensor]:
        """Gradients of :meth:`_fused` for ``g``, the output gradient ``(outputs, batch)``.

        Returns ``(grad of x_in, unit-major (inputs, batch) or None, grad of packed)``.
        Weight gradients are written block by block, input gradients by blocks of inputs
        (each against the units that see them), so every gradient entry is written once.
        """
        batch = g.shape[1]
        grads = g.new_empty(self._grads_size)
        grad_x = None
        for i in range(len(self._fused_plan) - 1, -1, -1):
            n_in, n_out, _, at, groups, columns = self._fused_plan[i]
            h = inputs[i]
            for s, e, cols, grad_at in groups:
                gw = grads.as_strided((1 + cols, e - s), (e - s, 1), grad_at)
                torch.mm(h[: 1 + cols], g[s:e].t(), out=gw)
            if i == 0 and not need_x:
                break
            g_in = g.new_empty(n_in, batch)
            stride = 1 + n_in
            for a, b, first in columns:
                if first == n_out:  # no unit sees these inputs
                    g_in[a:b] = 0
                    continue
                offset = at + first * stride + 1 + a
                w = weights.as_strided((n_out - first, b - a), (stride, 1), offset)
                torch.mm(w.t(), g[first:], out=g_in[a:b])
            if i == 0:
                grad_x = g_in
            else:  # through the ReLU, in place
                g = _threshold_backward(g_in, h[1:], 0, grad_input=g_in)
        return grad_x, grads.index_select(0, self._dest)

    def _composable(self, x_in: Tensor, packed: Tensor) -> Tensor:
        """The same blocked pass in differentiable torch ops (vmap, compile, any activation).

        Batch-major: returns ``(batch, outputs)``.
        """
        h = x_in
        for layer, w in zip(self._plan, self._layer_weights(self._weights(packed)), strict=True):
            blocks = w.split([e - s for s, e, _ in layer.groups])
            outs = []
            for (s, e, cols), block in zip(layer.groups, blocks, strict=True):
                if cols == 0:
                    outs.append(block[:, 0].expand(h.shape[0], e - s))
                else:
                    seen = h if cols == layer.n_in else h[:, :cols]
                    outs.append(torch.addmm(block[:, 0], seen, block[:, 1 : 1 + cols].t()))
            h = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
            if layer.hidden:
                h = self.activation(h)
        return h

    def _inputs(self, x: Tensor, context: Tensor | None) -> Tensor:
        """``[context, x in order]``: every unit sees a prefix of these columns."""
        if self.context_features > 0 and context is None:
            raise ValueError(
                f"this MADE is conditional: pass a context of shape "
                f"(batch, {self.context_features})"
            )
        xs = x if self._identity_order else x.index_select(1, self.order)
        if self.context_features > 0:
            xs = torch.cat([context, xs], dim=1)
        return xs

    def _outputs(self, out: Tensor) -> Tensor:
        """``(batch, features * outputs)`` in sorted order to ``(batch, features, outputs)``."""
        params = out.reshape(out.shape[0], self.features, self.outputs)
        return params if self._identity_order else params.index_select(1, self._rank)

    def _plain(self, t: Tensor) -> bool:
        """Plain eager float computation: no ``torch.compile`` trace, no ``torch.func``
        transform, no autocast (whose ops the composable pass leaves to autocast's rules)."""
        return not (
            torch.compiler.is_compiling()
            or torch.is_autocast_enabled(t.device.type)
            or _is_functorch(t)
            or _is_functorch(self.packed)
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Parameters ``(batch, features, outputs)``; row ``i`` depends on ``x[:, order[:k]]``."""
        x_in = self._inputs(x, context)
        if not (self._relu and self._plain(x_in)):
            out = self._composable(x_in, self.packed)
        elif torch.is_grad_enabled() and (x_in.requires_grad or self.packed.requires_grad):
            out = _MADEFunction.apply(x_in, self.packed, self)
        else:
            out = self._fused(x_in, self._weights(self.packed))[0].t()
        return self._outputs(out)

    # -- the sequential direction ----------------------------------------------------------

    def autoregress(
        self,
        solve: Callable[[int, Tensor], Tensor],
        like: Tensor,
        context: Tensor | None = None,
    ) -> Tensor:
        """Generate features one at a time, each from the parameters of those before it.

        For ``k = 0 .. d-1``: ``theta = MADE(u)[:, order[k]]`` (which depends only on
        ``u[:, order[:k]]`` and the context) and ``u[:, order[k]] = solve(k, theta)``, with
        ``theta`` of shape ``(batch, outputs)`` and ``solve`` returning ``(batch,)``. This is
        the sequential direction of an autoregressive flow (MAF sampling, IAF density):
        ``solve`` inverts the elementwise map of one feature.

        Step ``k`` computes only the hidden units of degree ``k`` (those that see features
        up to the ``k``-th and no further) from the units of earlier steps, which are kept:
        all ``d`` steps together do the multiply-adds of **one** pass, where re-running the
        network would do ``d`` passes. The values equal those of the ``d``-pass loop up to
        floating-point rounding. Without autograd the units are written in place into
        preallocated tensors; with autograd or under ``torch.func`` each step's units are
        concatenated instead, so the result is differentiable (O(d^2 * h) extra copying).

        Args:
            solve: ``solve(k, theta) -> u_k``, the value of feature ``order[k]``.
            like: the tensor being inverted (or any tensor with its batch size); the run is
                differentiable when autograd or a ``torch.func`` transform could track it.
            context: ``(batch, context_features)`` for a conditional MADE.

        Returns:
            ``u`` of shape ``(batch, features)`` in feature order.
        """
        c, d = self.context_features, self.features
        batch = like.shape[0]
        if c > 0:
            if context is None:
                raise ValueError(
                    f"this MADE is conditional: pass a context of shape (batch, {c})"
                )
            start = context
        else:
            start = self.packed.new_empty(batch, 0)
        inplace = not torch.is_grad_enabled() and self._plain(like) and self._plain(start)
        # Per layer and degree k, the (units, 1 + prefix) block of the units of degree k:
        # bias in column 0, then the weights of the inputs they see.
        steps: list[list[Tensor | None]] = []
        for layer, w in zip(
            self._plan, self._layer_weights(self._weights(self.packed)),
            strict=True,
        ):
            present = [(k, s, e, p) for k, (s, e, p) in enumerate(layer.degrees) if e > s]
            rows = w.split([e - s for _, s, e, _ in present])
            per_degree: list[Tensor | None] = [None] * (d + 1)
            for (k, _, _, p), wk in zip(present, rows, strict=True):
                per_degree[k] = wk[:, : 1 + p]
            steps.append(per_degree)
        if inplace:
            return self._autoregress_inplace(solve, start, steps)
        return self._autoregress_graph(solve, start, steps)

    def _autoregress_inplace(
        self, solve: Callable[[int, Tensor], Tensor], start: Tensor, steps: list
    ) -> Tensor:
        """:meth:`autoregress` without autograd: units written into unit-major buffers."""
        c, d = self.context_features, self.features
        batch = start.shape[0]
        below = start.new_empty(1 + c + d, batch)  # ones, context, u in order
        below[0] = 1
        below[1 : 1 + c] = start.t()
        inputs = below
        units = []
        for width in self.hidden:
            buffer = start.new_empty(1 + width, batch)
            buffer[0] = 1
            units.append(buffer)
        for k in range(d):
            seen = inputs
            for i, layer in enumerate(self._plan[:-1]):
                s, e, p = layer.degrees[k]
                if e > s:
                    new = units[i][1 + s : 1 + e]
                    torch.mm(steps[i][k], seen[: 1 + p], out=new)
                    if self._relu:
                        new.relu_()
                    else:
                        new.copy_(self.activation(new))
                seen = units[i]
            s, e, p = self._plan[-1].degrees[k + 1]
            theta = torch.mm(steps[-1][k + 1], seen[: 1 + p]).t().contiguous()
            inputs[1 + c + k] = solve(k, theta)
        out = inputs[1 + c :].t()
        return out.contiguous() if self._identity_order else out.index_select(1, self._rank)

    def _autoregress_graph(
        self, solve: Callable[[int, Tensor], Tensor], start: Tensor, steps: list
    ) -> Tensor:
        """:meth:`autoregress` in differentiable ops: each step's units are concatenated."""
        d = self.features
        batch = start.shape[0]
        inputs = start  # context, then u in order
        units = [start.new_empty(batch, 0) for _ in self.hidden]
        us = []

        def affine(w: Tensor, seen: Tensor) -> Tensor:
            if w.shape[1] == 1:  # units that see nothing: their bias
                return w[:, 0].expand(batch, -1)
            p = w.shape[1] - 1
            return torch.addmm(w[:, 0], seen if p == seen.shape[1] else seen[:, :p], w[:, 1:].t())

        for k in range(d):
            seen = inputs
            for i, layer in enumerate(self._plan[:-1]):
                s, e, _ = layer.degrees[k]
                if e > s:
                    new = self.activation(affine(steps[i][k], seen))
                    units[i] = torch.cat([units[i], new], dim=1)
                seen = units[i]
            u = solve(k, affine(steps[-1][k + 1], seen))
            us.append(u)
            inputs = torch.cat([inputs, u.unsqueeze(1)], dim=1)
        out = torch.stack(us, dim=1)
        return out if self._identity_order else out.index_select(1, self._rank)

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, outputs={self.outputs}, hidden={self.hidden}, "
            f"context={self.context_features}, order={self.order.tolist()}, "
            f"parameters={self._packed_size}"
        )


def _convert_v01_state(
    module: MADE,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load hook: turn an exactflow 0.1 MADE state dict (dense masked layers) into ``packed``."""
    if prefix + "layers.0.weight" not in state_dict:
        return
    count = len(module._plan)
    keys = [prefix + f"layers.{i}.{name}" for i in range(count) for name in ("weight", "bias")]
    if not all(key in state_dict for key in keys):
        error_msgs.append(f"{prefix}: an exactflow 0.1 MADE state dict with other layers")
        return
    order = state_dict.get(prefix + "order", module.order)
    weights = [state_dict[prefix + f"layers.{i}.weight"] for i in range(count)]
    biases = [state_dict[prefix + f"layers.{i}.bias"] for i in range(count)]
    context_weight = state_dict.get(prefix + "context_layer.weight")
    sizes = (module.features, *module.hidden, module.features * module.outputs)
    shapes = [tuple(w.shape) for w in weights]
    if shapes != [(b, a) for a, b in zip(sizes[:-1], sizes[1:], strict=True)] or (
        (context_weight is None) != (module.context_features == 0)
    ):
        error_msgs.append(
            f"{prefix}: exactflow 0.1 MADE weights of shapes {shapes} do not fit "
            f"this MADE ({module.extra_repr()})"
        )
        return
    packed = module._pack(weights, biases, context_weight, torch.as_tensor(order).cpu())
    for key in list(state_dict):
        if key.startswith(prefix + "layers.") or key == prefix + "context_layer.weight":
            del state_dict[key]
    state_dict[prefix + "packed"] = packed


def _refresh_order(module: MADE, incompatible_keys: object) -> None:
    """Load hook: a loaded ``order`` may differ from the constructed one."""
    module._rank = torch.argsort(module.order)
    module._identity_order = bool(
        torch.equal(module.order.cpu(), torch.arange(module.features))
    )
