"""The block layout of a MADE: its units sorted by degree, and where each weight lives.

Inputs are taken in the autoregressive order (context first) and hidden units sorted by
degree, so every unit sees a *prefix* of the previous layer and the masks are block
triangular. :func:`build_layout` plans a MADE of given sizes once:

* per layer (:class:`Layer`), the prefix each unit sees, the GEMM blocks of the forward
  pass, the blocks of inputs of the input gradient, and the units of each degree (the
  steps of :meth:`~exactflow.nn.MADE.autoregress`);
* index maps between three layouts of the same numbers: *packed* (the parameter: each
  unit's kept weights, then the biases), *weights* (what the passes multiply: the dense
  sorted matrix with the bias in column 0 and zeros where the mask is) and *gradients*
  (what the fused backward writes: each block transposed).

:class:`Layout` also converts between the packed vector and the dense masked matrices of
exactflow 0.1 (units in 0.1's order: hidden degrees cycling, outputs ``feature * o + p``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Layer", "FusedLayer", "Layout", "build_layout"]


class Layer(NamedTuple):
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
    #: Multiply-adds per row that the blocks skip against one dense product (bias included).
    skipped: int


#: A layer as the fused pass walks it, a plain tuple: ``(n_in, n_out, hidden, offset of its
#: matrix in the weights layout, blocks (first unit, end unit, columns, offset in the
#: gradients layout), the input gradient's blocks)``.
FusedLayer = tuple[
    int, int, bool, int, tuple[tuple[int, int, int, int], ...], tuple[tuple[int, int, int], ...]
]


def _hidden_degrees(width: int, features: int, low: int) -> Tensor:
    """Degrees of a hidden layer's units in exactflow 0.1's (unsorted) unit order."""
    return low + torch.arange(width) % (features - low)


def _blocks_along(degrees: Tensor, block_rows: int) -> list[tuple[int, int]]:
    """Consecutive ranges of units, cut at degree changes, of at least ``block_rows``."""
    ranges = []
    values = degrees.tolist()
    start, n = 0, len(values)
    for i in range(1, n + 1):
        if i == n or (values[i] != values[i - 1] and i - start >= block_rows):
            ranges.append((start, i))
            start = i
    return ranges


@dataclass(frozen=True)
class Layout:
    """The structure of a MADE of given sizes; built by :func:`build_layout`."""

    features: int
    outputs: int
    context: int
    hidden: tuple[int, ...]
    #: The lowest hidden degree: 0 (units that see only the context) for a conditional
    #: MADE or a single feature, else 1.
    low: int
    layers: tuple[Layer, ...]
    fused: tuple[FusedLayer, ...]
    #: Lengths of the weights layout, in all and per layer.
    weights_size: int
    weights_sizes: tuple[int, ...]
    #: Length of the gradients layout.
    grads_size: int
    #: Length of the packed parameter.
    packed_size: int

    def unit_orders(self, order: Tensor) -> list[Tensor]:
        """Per layer, the 0.1 unit index of each sorted unit (the last entry: outputs)."""
        o = self.outputs
        perms = [
            torch.argsort(_hidden_degrees(h, self.features, self.low), stable=True)
            for h in self.hidden
        ]
        outputs = (order[:, None] * o + torch.arange(o)).reshape(-1)
        return [*perms, outputs]

    def sorted_masks(self) -> list[Tensor]:
        return [
            torch.arange(layer.n_in)[None, :] < torch.tensor(layer.prefix)[:, None]
            for layer in self.layers
        ]

    def packed_split(self) -> list[int]:
        """Lengths of the packed pieces: per layer its kept weights, then its biases."""
        sizes = []
        for layer in self.layers:
            sizes += [sum(layer.prefix), layer.n_out]
        return sizes

    def pack(
        self,
        weights: Sequence[Tensor],
        biases: Sequence[Tensor],
        context_weight: Tensor | None,
        order: Tensor,
    ) -> Tensor:
        """The packed vector from 0.1's dense weights (masked entries are ignored)."""
        units = self.unit_orders(order)
        columns = [order, *units[:-1]]
        parts = []
        for i, (w, b, mask) in enumerate(zip(weights, biases, self.sorted_masks(), strict=True)):
            w = w.detach()[units[i]][:, columns[i]]
            if i == 0 and context_weight is not None:
                w = torch.cat([context_weight.detach()[units[0]], w], dim=1)
            parts += [w[mask], b.detach()[units[i]]]
        return torch.cat(parts)

    def unpack(
        self, packed: Tensor, order: Tensor
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """0.1's dense masked ``([(weight, bias), ...], context_weight)`` from ``packed``.

        See :meth:`exactflow.nn.MADE.masked_weights`.
        """
        units = self.unit_orders(order)
        columns = [order, *units[:-1]]
        c = self.context
        pieces = iter(packed.detach().split(self.packed_split()))
        result, context_weight = [], None
        for i, (layer, mask) in enumerate(zip(self.layers, self.sorted_masks(), strict=True)):
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


def _layers(
    features: int, outputs: int, context: int, hidden: tuple[int, ...], low: int,
    block_rows: int,
) -> tuple[Layer, ...]:
    d, o, c = features, outputs, context
    degrees_in = torch.cat([torch.zeros(c, dtype=torch.long), torch.arange(1, d + 1)])
    layers: list[Layer] = []
    widths = (*hidden, d * o)
    for i, width in enumerate(widths):
        is_hidden = i < len(hidden)
        if is_hidden:
            degrees_out = torch.sort(_hidden_degrees(width, d, low)).values
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
        groups = [(s, e, int(prefix[e - 1])) for s, e in _blocks_along(degrees_out, block_rows)]
        columns = []
        for a, b in _blocks_along(degrees_in, block_rows):
            # The units that see input a (prefixes are sorted) see all of [a, b) or some.
            first = int(torch.searchsorted(prefix, a, right=True))
            columns.append((a, b, first))
        layers.append(
            Layer(
                n_in=degrees_in.numel(),
                n_out=width,
                hidden=is_hidden,
                prefix=tuple(int(p) for p in prefix),
                groups=tuple(groups),
                columns=tuple(columns),
                degrees=tuple(per_degree),
                skipped=width * (1 + degrees_in.numel())
                - sum((e - s) * (1 + cols) for s, e, cols in groups),
            )
        )
        degrees_in = degrees_out
    return tuple(layers)


def build_layout(
    features: int, outputs: int, context: int, hidden: tuple[int, ...], block_rows: int
) -> tuple[Layout, Tensor, Tensor]:
    """The layout of a MADE of these sizes, and its two index maps.

    Returns ``(layout, scatter, dest)``: ``scatter[i]`` is the weights-layout position of
    packed entry ``i`` (the forward), ``dest[i]`` its gradients-layout position (the fused
    backward). The MADE keeps the maps as buffers, so that they follow it to its device.
    """
    d, c = features, context
    # Degree-0 hidden units see only the context (and biases); they are needed when the
    # first feature must depend on the context, and are the only choice when d == 1.
    low = 0 if (c > 0 or d == 1) else 1
    layers = _layers(features, outputs, context, hidden, low, block_rows)

    # Index maps between three layouts of the same numbers:
    # * packed (the parameter): layer by layer, each unit's kept weights, then the biases;
    # * weights (what the pass multiplies): layer by layer the dense sorted matrix
    #   (outputs, 1 + inputs), the bias in column 0 (the pass keeps a row of ones above
    #   the inputs), masked entries zero, so that every block is a strided view;
    # * gradients (what the backward writes): each row block transposed, a contiguous
    #   (1 + columns, units) matrix.
    src, masked, dest = [], [], []
    fused: list[FusedLayer] = []
    packed_at = weights_at = grads_at = 0
    for layer in layers:
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
    layout = Layout(
        features=features,
        outputs=outputs,
        context=context,
        hidden=hidden,
        low=low,
        layers=layers,
        fused=tuple(fused),
        weights_size=weights_at,
        weights_sizes=tuple(layer.n_out * (1 + layer.n_in) for layer in layers),
        grads_size=grads_at,
        packed_size=packed_at,
    )
    return layout, scatter, torch.cat(dest)
