"""MADE's passes over its block layout (:mod:`exactflow.nn.layout`).

* :func:`fused_pass` and :func:`fused_backward`: one pass without autograd, activations
  unit-major and every block written in place, and its hand-written backward (ReLU only);
* :func:`composable_pass`: the same blocked products as differentiable torch ops (any
  activation, ``torch.compile``, ``torch.func``, autocast, double backward);
* :func:`autoregress_inplace` and :func:`autoregress_graph`: the sequential direction, one
  degree of units per step, written in place or concatenated in differentiable ops.

Every function here works in the layout's sorted order (context first, then the features
in the autoregressive order); :class:`~exactflow.nn.MADE` puts its inputs and outputs in
and out of that order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .layout import Layer, Layout

__all__ = [
    "is_functorch",
    "is_plain",
    "has_hooks",
    "needs_recompute",
    "recomputed_grads",
    "recomputed_backward",
    "expand_weights",
    "layer_weights",
    "fused_pass",
    "fused_backward",
    "composable_pass",
    "degree_steps",
    "autoregress_inplace",
    "autoregress_graph",
    "ELEMENTWISE",
    "in_eval_mode",
]

#: Activations that act on each number alone (a network of them maps rows one by one).
ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Softplus, nn.Identity,
)

#: ``solve(k, theta) -> u_k``: the value of the ``k``-th feature in the order from its
#: parameters ``theta`` of shape ``(batch, outputs)``.
Solve = Callable[[int, Tensor], Tensor]

#: Per layer, the ``(units, 1 + prefix)`` block of the units of each degree that has any.
Steps = list[dict[int, Tensor]]

_threshold_backward = torch.ops.aten.threshold_backward.grad_input


def is_functorch(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a ``torch.func`` transform (vmap, grad, jacrev...) or
    batched by the vmap of ``torch.autograd`` (``is_grads_batched``, ``vectorize=True``)."""
    try:
        return bool(
            torch._C._functorch.is_functorch_wrapped_tensor(t)
            or torch._C._functorch.is_legacy_batchedtensor(t)
        )
    except AttributeError:  # a torch without these internals: treat as plain
        return False


def is_plain(t: Tensor, *others: Tensor) -> bool:
    """Plain eager computation, where hand-written passes apply: no ``torch.compile``
    trace and no ``torch.jit.trace`` (a trace records torch ops, not pooled buffers or
    batch-sized loops), no autocast on ``t``'s device (its ops follow autocast's rules), no
    ``torch.func`` transform active or wrapping any of the tensors, no forward-mode AD
    (the hand-written passes have no forward derivative), and no global module hooks."""
    return not (
        t.device.type == "meta"  # (no data: shapes only, which torch's own ops give)
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.is_autocast_enabled(t.device.type)
        or _functorch_active()
        or _global_hooks()
        or torch.autograd.forward_ad._current_level >= 0
        or is_functorch(t)
        or any(is_functorch(o) for o in others)
    )


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple(f"_global{name}" for name in _HOOKS)


def _global_hooks() -> bool:
    # Hooks registered for every module: a hand-written pass calls no module, so it would
    # skip them.
    return any(getattr(_module, name, None) for name in _GLOBAL_HOOKS)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own (a hand-written pass
    that does not call it would skip them)."""
    return any(getattr(module, name, None) for name in _HOOKS)


def _functorch_active() -> bool:
    try:
        return bool(torch._C._are_functorch_transforms_active())
    except AttributeError:  # a torch without these internals: tensors are checked one by one
        return False


@contextmanager
def in_eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, and after it every submodule's own
    ``training`` flag as it was (not only the top one's)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def needs_recompute(*grads: Tensor) -> bool:
    """Whether a hand-written backward must give way to :func:`recomputed_grads`: under
    ``create_graph=True`` (grad mode on in the backward) or for batched gradients."""
    return torch.is_grad_enabled() or any(is_functorch(g) for g in grads)


def recomputed_backward(
    ctx: Any, grad: Tensor, composable: Callable[[Tensor, Tensor], Tensor], x: Tensor,
    packed: Tensor,
) -> tuple[Tensor | None, Tensor | None, None] | None:
    """The backward of a ``(x, packed, module)`` pass by :func:`recomputed_grads` where the
    hand-written one cannot serve (``create_graph=True``, batched gradients); None where it
    can."""
    if not needs_recompute(grad):
        return None
    grad_x, grad_packed = recomputed_grads(composable, (x, packed), ctx.needs_input_grad[:2], grad)
    return grad_x, grad_packed, None


def recomputed_grads(
    recompute: Callable[..., Tensor | tuple[Tensor, ...]],
    inputs: Sequence[Tensor | None],
    needed: Sequence[bool],
    grad_outputs: Tensor | tuple[Tensor, ...],
) -> list[Tensor | None]:
    """The backward of a hand-written pass where it must be differentiable again
    (``create_graph=True``) or runs batched (``is_grads_batched``, ``vectorize=True``).

    ``recompute(*inputs)`` gives the outputs in differentiable ops. Returns, for each input
    that is ``needed``, the vector-Jacobian product with ``grad_outputs`` (None for the
    others) as a *partial* derivative: each input is a variable of its own, as autograd
    expects of a backward (it adds the paths through the inputs' own histories itself;
    ``torch.autograd.grad`` on the recomputed outputs would count them twice when one
    input depends on another). The results are differentiable.
    """
    positions = [
        i for i, (t, need) in enumerate(zip(inputs, needed, strict=True)) if need and t is not None
    ]

    def partial(*wanted: Tensor) -> Tensor | tuple[Tensor, ...]:
        args = list(inputs)
        for i, t in zip(positions, wanted, strict=True):
            args[i] = t
        return recompute(*args)

    grads: list[Tensor | None] = [None] * len(inputs)
    if not positions:
        return grads
    with torch.enable_grad():
        vjp = torch.func.vjp(partial, *(inputs[i] for i in positions))[1]
        found = vjp(grad_outputs)
    for i, g in zip(positions, found, strict=True):
        grads[i] = g
    return grads


def expand_weights(packed: Tensor, layout: Layout, scatter: Tensor) -> Tensor:
    """The weights layout: per layer ``[bias | dense sorted weights]``, masked entries 0."""
    return packed.new_zeros(layout.weights_size).index_copy_(0, scatter, packed)


def layer_weights(weights: Tensor, layout: Layout) -> list[Tensor]:
    """Per layer the ``(outputs, 1 + inputs)`` matrix (differentiable views)."""
    return [
        w.view(layer.n_out, 1 + layer.n_in)
        for w, layer in zip(weights.split(layout.weights_sizes), layout.layers, strict=True)
    ]


def fused_pass(x_in: Tensor, weights: Tensor, layout: Layout) -> tuple[Tensor, list[Tensor]]:
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
    for n_in, n_out, hidden, at, groups, _ in layout.fused:
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


def fused_backward(
    g: Tensor,
    weights: Tensor,
    inputs: list[Tensor],
    need_x: bool,
    layout: Layout,
    dest: Tensor,
) -> tuple[Tensor | None, Tensor]:
    """Gradients of :func:`fused_pass` for ``g``, the output gradient ``(outputs, batch)``.

    Returns ``(grad of x_in, unit-major (inputs, batch) or None, grad of packed)``, with
    ``dest`` the packed -> gradients index map of :func:`~exactflow.nn.layout.build_layout`.
    Weight gradients are written block by block, input gradients by blocks of inputs
    (each against the units that see them), so every gradient entry is written once.
    """
    batch = g.shape[1]
    grads = g.new_empty(layout.grads_size)
    grad_x = None
    for i in range(len(layout.fused) - 1, -1, -1):
        n_in, n_out, _, at, groups, columns = layout.fused[i]
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
    return grad_x, grads.index_select(0, dest)


#: :func:`composable_pass` multiplies a layer block by block only where the blocks skip at
#: least this many multiply-adds in a call (skipped per row times rows); below it, one
#: product with the dense masked matrix is faster than the blocks' slices, concatenation
#: and their backward (``benchmarks/NOTES.md``: a 10-D MADE of width 128 trains 1.2x
#: faster dense, a 128-D one of width 1,024 1.1x faster in blocks).
BLOCKS_FROM = 2**26


def composable_pass(
    x_in: Tensor, weights: list[Tensor], layout: Layout, activation: nn.Module
) -> Tensor:
    """The pass in differentiable torch ops (vmap, compile, any activation): each layer as
    one product with its dense masked matrix, or in blocks where they skip enough
    multiply-adds (:data:`BLOCKS_FROM`); for finite inputs the values are the same up to
    rounding. (A dense product multiplies the masked zeros too: an inf or NaN input makes
    every output of its row NaN, where blocks keep the outputs that do not see it.)

    ``weights`` per layer as :func:`layer_weights` gives them. Batch-major: returns
    ``(batch, outputs)``.
    """
    h = x_in
    rows = x_in.shape[0]
    # A symbolic batch (torch.export with a dynamic batch size) or a traced one
    # (torch.jit.trace): the dense products, without a guard on the batch's size.
    dense = isinstance(rows, torch.SymInt) or torch.jit.is_tracing()
    for layer, w in zip(layout.layers, weights, strict=True):
        if dense or layer.skipped * rows < BLOCKS_FROM:
            h = torch.addmm(w[:, 0], h, w[:, 1:].t())
        else:
            h = _blocked_product(h, w, layer)
        if layer.hidden:
            h = activation(h)
    return h


def _blocked_product(h: Tensor, w: Tensor, layer: Layer) -> Tensor:
    """``h @ w[:, 1:].T + w[:, 0]``, one product per block of units against the inputs
    it sees."""
    outs = []
    for (s, e, cols), block in zip(layer.groups, w.split([e - s for s, e, _ in layer.groups]),
                                   strict=True):
        if cols == 0:
            outs.append(block[:, 0].expand(h.shape[0], e - s))
        else:
            seen = h if cols == layer.n_in else h[:, :cols]
            outs.append(torch.addmm(block[:, 0], seen, block[:, 1 : 1 + cols].t()))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def degree_steps(weights: list[Tensor], layout: Layout) -> Steps:
    """Per layer and degree ``k``, the ``(units, 1 + prefix)`` block of the units of degree
    ``k``: bias in column 0, then the weights of the inputs they see."""
    steps: Steps = []
    for layer, w in zip(layout.layers, weights, strict=True):
        present = [(k, s, e, p) for k, (s, e, p) in enumerate(layer.degrees) if e > s]
        rows = w.split([e - s for _, s, e, _ in present])
        per_degree: dict[int, Tensor] = {}
        for (k, _, _, p), wk in zip(present, rows, strict=True):
            per_degree[k] = wk[:, : 1 + p]
        steps.append(per_degree)
    return steps


def autoregress_inplace(
    solve: Solve, start: Tensor, steps: Steps, layout: Layout, activation: nn.Module,
    relu: bool,
) -> Tensor:
    """The sequential direction without autograd: units written into unit-major buffers.

    ``start`` is the context ``(batch, c)`` (``(batch, 0)`` without one). Returns ``u``
    ``(batch, features)`` in the order, a transposed view.
    """
    c, d = layout.context, layout.features
    batch = start.shape[0]
    below = start.new_empty(1 + c + d, batch)  # ones, context, u in order
    below[0] = 1
    below[1 : 1 + c] = start.t()
    inputs = below
    units = []
    for width in layout.hidden:
        buffer = start.new_empty(1 + width, batch)
        buffer[0] = 1
        units.append(buffer)
    for k in range(d):
        seen = inputs
        for i, layer in enumerate(layout.layers[:-1]):
            s, e, p = layer.degrees[k]
            if e > s:
                new = units[i][1 + s : 1 + e]
                torch.mm(steps[i][k], seen[: 1 + p], out=new)
                if relu:
                    new.relu_()
                else:
                    new.copy_(activation(new))
            seen = units[i]
        s, e, p = layout.layers[-1].degrees[k + 1]
        theta = torch.mm(steps[-1][k + 1], seen[: 1 + p]).t().contiguous()
        inputs[1 + c + k] = solve(k, theta)
    return inputs[1 + c :].t()


def autoregress_graph(
    solve: Solve, start: Tensor, steps: Steps, layout: Layout, activation: nn.Module
) -> Tensor:
    """The sequential direction in differentiable ops: each step's units are concatenated.

    Arguments as in :func:`autoregress_inplace`; returns ``u`` ``(batch, features)`` in the
    order.
    """
    d = layout.features
    batch = start.shape[0]
    inputs = start  # context, then u in order
    units = [start.new_empty(batch, 0) for _ in layout.hidden]
    us = []

    def affine(w: Tensor, seen: Tensor) -> Tensor:
        if w.shape[1] == 1:  # units that see nothing: their bias
            return w[:, 0].expand(batch, -1)
        p = w.shape[1] - 1
        return torch.addmm(w[:, 0], seen if p == seen.shape[1] else seen[:, :p], w[:, 1:].t())

    for k in range(d):
        seen = inputs
        for i, layer in enumerate(layout.layers[:-1]):
            s, e, _ = layer.degrees[k]
            if e > s:
                new = activation(affine(steps[i][k], seen))
                units[i] = torch.cat([units[i], new], dim=1)
            seen = units[i]
        u = solve(k, affine(steps[-1][k + 1], seen))
        us.append(u)
        inputs = torch.cat([inputs, u.unsqueeze(1)], dim=1)
    return torch.stack(us, dim=1)
