"""Buffers that MADE's fused pass reuses from call to call, with every block's view made once.

:func:`~exactflow.nn.passes.fused_pass` and :func:`~exactflow.nn.passes.fused_backward`
allocate their activations, the dense weights (zero-filled) and every gradient afresh, and
slice a view of each operand of each GEMM block. At batch 512 those allocations and views
are most of the tensor operations of a pass: a MADE of a 10-D MAF (width 128) runs about
50 of them around its 15 products, forward and backward. A :class:`Workspace` holds the
buffers of one layout at one batch size and the views of every block, made when it is
built; a pass through it is its products, its ReLUs and the copies in and out. The values
are the same operations on the same numbers: identical to the fresh-buffer pass.

Workspaces live in one pool, shared by every MADE of the same layout (MADEs of equal sizes
share their :class:`~exactflow.nn.layout.Layout`). A pass *takes* one; it stays taken while
the autograd graph that recorded the pass can still run its backward through it, that is
until that backward has run (without ``retain_graph``) or the graph is gone. Passes without
autograd give it back at once (a chain of layers scores layer by layer through one), and
one larger than :data:`KEEP_LARGEST` leaves the pool at the end of such a pass. Free
workspaces are kept up to :data:`POOL_BYTES` in all, the least recently used dropped
first; :func:`clear` drops every free one.

The backward's buffers (the gradients of the output, the weights and every layer's
input) are not a workspace's own: a backward uses them from start to end and the caller
copies out what it keeps, so the workspaces of a layout share one :class:`Gradients` per
thread and batch size.

Nothing a pass returns is a view of a workspace: callers copy out what they keep.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from .layout import Layout

__all__ = [
    "POOL_BYTES", "KEEP_LARGEST", "KEEP_GRADIENTS", "Workspace", "Gradients", "take",
    "gradients", "frees_workspaces", "clear", "hooks_active", "block_rows",
]

#: Bytes of free workspaces the pool keeps, all layouts together (a workspace in use is
#: never dropped). At batch 512 a layer of a 10-D MAF of width 128 takes about 0.6 MB, one
#: of a 64-D MAF of width 256 about 1.8 MB (and each layout one :class:`Gradients` of about
#: as much for training).
POOL_BYTES = 64 * 2**20

#: Passes without autograd give back workspaces larger than this (bytes) to the allocator
#: at their end. Held between calls, the buffers of scoring 10,000 rows kept glibc's
#: malloc from raising its mmap threshold, and every large tensor after them (sampling's)
#: was mapped and faulted in afresh: sampling a 10-D MAF ran 1.2-1.5x slower.
KEEP_LARGEST = 4 * 2**20

_threshold_backward = torch.ops.aten.threshold_backward.grad_input

# (products, ReLU'd output or None) per hidden layer: each product (weight view, input
# rows, output rows).
_Hidden = list[tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor | None]]


def block_rows(layout: Layout, like: Tensor) -> int:
    """The most rows a pass without autograd should run at once: two workspaces of this
    many rows (a scoring chain's blocks' and its last block's) fit in
    :data:`KEEP_LARGEST`, so they stay pooled and in the core's cache. A multiple of 64
    (at 1,667 rows the products of a 10-D MAF ran 1.2x slower than at 1,664), and at
    least 256."""
    per_row = 1 + layout.fused[0][0]
    per_row += sum(n_out + (1 if hidden else 0) for _, n_out, hidden, *_ in layout.fused)
    rows = (KEEP_LARGEST // (2 * like.element_size()) - layout.weights_size) // per_row
    return max(256, rows // 64 * 64)


def _bytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Gradients:
    """The backward's buffers for one layout at one batch size: the gradient of the
    output, the weight gradients in the gradients layout, and every layer's input
    gradient (``inputs[i]``, ``(n_in, batch)``).

    A backward writes them from its first step to its last, and its caller copies out
    what it keeps before the next backward starts. Backwards on one thread run one after
    another, so the workspaces of a layout share one set per thread (:func:`gradients`)
    instead of holding one each: a 64-D MAF of width 256 at batch 512 keeps about 1.7 MB
    per layer less. ``nbytes``: the memory of the set.
    """

    def __init__(self, layout: Layout, batch: int, dtype: torch.dtype, device: torch.device):
        self.layout = layout  # (kept alive: the key of the set is its id)
        with torch.inference_mode(False):
            self.grad_out = torch.empty(layout.fused[-1][1], batch, dtype=dtype, device=device)
            self.weights = torch.empty(layout.grads_size, dtype=dtype, device=device)
            # Inputs that no unit sees keep a zero gradient: those rows are never written.
            self.inputs = [
                torch.zeros(n_in, batch, dtype=dtype, device=device)
                for n_in, *_ in layout.fused
            ]
        self.nbytes = _bytes(self.grad_out, self.weights, *self.inputs)


#: Sets of :class:`Gradients` each thread keeps, the least recently used dropped first.
KEEP_GRADIENTS = 4

_local = threading.local()


def gradients(layout: Layout, batch: int, dtype: torch.dtype, device: torch.device) -> Gradients:
    """This thread's :class:`Gradients` for ``layout`` at ``batch`` rows (made if new)."""
    sets: dict[tuple[Any, ...], Gradients] | None = getattr(_local, "sets", None)
    if sets is None:
        sets = _local.sets = {}
    key = (id(layout), batch, dtype, device)
    found = sets.pop(key, None)
    if found is None:
        found = Gradients(layout, batch, dtype, device)
        while len(sets) >= KEEP_GRADIENTS:
            del sets[next(iter(sets))]
    sets[key] = found  # (the most recently used last)
    return found


def hooks_active() -> bool:
    """Whether saved-tensor hooks (``save_on_cpu``, checkpointing...) are active: they must
    see what a pass saves, so the pass keeps its tensors in fresh buffers instead."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class Workspace:
    """The buffers of one fused pass of ``layout`` at ``batch`` rows, and their views.

    The forward buffers (weights in the weights layout, with the masked entries zero once
    and for all, and every layer's unit-major input with its row of ones) are made with
    the workspace; the backward writes into the thread's :class:`Gradients` for the
    layout, through views made at its first backward with that set.
    """

    def __init__(self, layout: Layout, batch: int, like: Tensor) -> None:
        self.layout, self.batch, self.dtype, self.device = layout, batch, like.dtype, like.device
        self.owner: weakref.ref[Any] | None = None
        self.busy = False
        with torch.inference_mode(False):  # normal tensors, usable with autograd later
            self._build_forward()
        self._gradients: Gradients | None = None
        self._backward: list[Any] | None = None
        self.nbytes = _bytes(self.weights, *self.inputs, self.out)

    def _new(self, *shape: int) -> Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def _build_forward(self) -> None:
        layout, batch = self.layout, self.batch
        self.weights = torch.zeros(layout.weights_size, dtype=self.dtype, device=self.device)
        h = self._new(1 + layout.fused[0][0], batch)
        h[0] = 1
        #: The rows the input is copied into: ``[context, x in the order]``.
        self.x_rows = h[1:]
        self.inputs = [h]
        hidden: _Hidden = []
        for n_in, n_out, is_hidden, at, groups, _ in layout.fused:
            top = 1 if is_hidden else 0
            y = self._new(top + n_out, batch)
            if is_hidden:
                y[0] = 1
            stride = 1 + n_in
            blocks = [
                (
                    self.weights.as_strided((e - s, 1 + cols), (stride, 1), at + s * stride),
                    h[: 1 + cols],
                    y[top + s : top + e],
                    s,
                )
                for s, e, cols, _ in groups
            ]
            if is_hidden:
                hidden.append(([(w, x, o) for w, x, o, _ in blocks], y))
                self.inputs.append(y)
            else:
                self.out, self._last = y, blocks
            h = y
        self._hidden = hidden

    def forward(
        self, x_in: Tensor, packed: Tensor, scatter: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """The pass of ``x_in`` (``(batch, inputs)``, context first then the order) with the
        weights ``packed``: the output ``(outputs, batch)``, written into ``out`` if given
        (a fresh tensor the caller keeps), else into the workspace's own."""
        self.x_rows.copy_(x_in.t())
        return self.run(packed, scatter, out)

    def run(self, packed: Tensor, scatter: Tensor, out: Tensor | None = None) -> Tensor:
        """:meth:`forward` of the input the caller wrote into :attr:`x_rows` itself."""
        self.load(packed, scatter)
        return self.products(out)

    def load(self, packed: Tensor, scatter: Tensor) -> None:
        """Write the weights ``packed`` into the weights layout (``scatter``: where each
        goes), for passes through :meth:`products`."""
        self.weights.index_copy_(0, scatter, packed)

    def products(self, out: Tensor | None = None) -> Tensor:
        """:meth:`run` with the weights loaded before (several blocks of rows through one
        layer load them once)."""
        mm = torch.mm
        for blocks, y in self._hidden:
            for w, x, o in blocks:
                mm(w, x, out=o)
            y.relu_()  # type: ignore[union-attr]
        if out is None:
            for w, x, o, _ in self._last:
                mm(w, x, out=o)
            return self.out
        for w, x, o, s in self._last:
            mm(w, x, out=out[s : s + o.shape[0]])
        return out

    @property
    def grad_out(self) -> Tensor:
        """Where the caller writes the gradient of the output, ``(outputs, batch)``: a
        buffer of this thread's :class:`Gradients` for the layout, until the caller has
        run :meth:`backward` and used what it returned."""
        grads = gradients(self.layout, self.batch, self.dtype, self.device)
        if self._gradients is not grads:
            self._build_backward(grads)
        return grads.grad_out

    def _build_backward(self, grads: Gradients) -> None:
        # Views of the forward buffers (this workspace's) and of the gradient buffers
        # (shared), one list per layer from the last.
        with torch.inference_mode(False):
            self._backward = self._backward_steps(grads)
        self._gradients = grads

    def _backward_steps(self, grads: Gradients) -> list[Any]:
        steps = []
        g = grads.grad_out
        for i in range(len(self.layout.fused) - 1, -1, -1):
            n_in, n_out, _, at, groups, columns = self.layout.fused[i]
            h, g_in = self.inputs[i], grads.inputs[i]
            weight_grads = [
                (h[: 1 + cols], g[s:e].t(),
                 grads.weights.as_strided((1 + cols, e - s), (e - s, 1), grad_at))
                for s, e, cols, grad_at in groups
            ]
            stride = 1 + n_in
            input_grads = [
                (
                    self.weights.as_strided(
                        (n_out - first, b - a), (stride, 1), at + first * stride + 1 + a
                    ).t(),
                    g[first:],
                    g_in[a:b],
                )
                for a, b, first in columns
                if first < n_out
            ]
            steps.append((weight_grads, input_grads, h[1:] if i > 0 else None, g_in))
            g = g_in
        return steps

    def backward(self, need_x: bool, dest: Tensor) -> tuple[Tensor | None, Tensor]:
        """Gradients of the last :meth:`forward` for :attr:`grad_out`: ``(grad of x_in,
        unit-major (inputs, batch), or None; grad of packed)``. The first is a shared
        buffer (copy it out before the next backward); the second is fresh."""
        steps, grads = self._backward, self._gradients
        assert steps is not None and grads is not None, "grad_out builds the backward"
        mm = torch.mm
        last = len(steps) - 1
        for i, (weight_grads, input_grads, activations, g_in) in enumerate(steps):
            for x, g, o in weight_grads:
                mm(x, g, out=o)
            if i == last and not need_x:
                return None, grads.weights.index_select(0, dest)
            for w, g, o in input_grads:
                mm(w, g, out=o)
            if activations is not None:  # through the ReLU, in place
                _threshold_backward(g_in, activations, 0, grad_input=g_in)
        return grads.inputs[0], grads.weights.index_select(0, dest)

    def free(self) -> bool:
        """Whether no pass holds the workspace: not running, and no graph that recorded
        it can still run its backward."""
        if self.busy:
            return False
        # (Not probed through the owner's saved tensors: read from another thread while
        # that thread's backward frees them, they crashed the interpreter.)
        return self.owner is None or self.owner() is None

    def hold(self, ctx: Any) -> None:
        """End of a pass that autograd recorded: ``ctx`` (its context) keeps the workspace
        while its graph can still run the backward through it (until
        :func:`frees_workspaces` frees it, or ``ctx`` is gone)."""
        self.owner = weakref.ref(ctx)
        self.busy = False

    def give_back(self, keep: bool = False) -> None:
        """End of a pass without autograd: free at once. A workspace of more than
        :data:`KEEP_LARGEST` bytes leaves the pool unless ``keep``."""
        self.owner = None
        self.busy = False
        if not keep:
            self.drop_if_large()

    def drop_if_large(self) -> None:
        """Leave the pool if larger than :data:`KEEP_LARGEST` and free (another pass may
        have taken it since it was given back)."""
        if self.nbytes > KEEP_LARGEST:
            with _lock:
                if self.free() and self in _pool:
                    _pool.remove(self)


_Backward = TypeVar("_Backward", bound=Callable[..., Any])


def frees_workspaces(backward: _Backward) -> _Backward:
    """Decorate the ``backward`` of an autograd Function whose forward held workspaces
    (``ctx.workspaces``): at its end they are free again, unless the graph is kept for
    another backward (``retain_graph``). The thread that ran the backward frees them, so
    no other thread inspects its graph."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        try:
            return backward(ctx, *grads)
        finally:
            if not torch._C._autograd._get_current_graph_task_keep_graph():
                for ws in ctx.workspaces:
                    if ws.owner is not None and ws.owner() is ctx:
                        ws.owner = None

    return cast(_Backward, wrapper)


_pool: list[Workspace] = []  # least recently used first
_lock = threading.Lock()


def take(layout: Layout, like: Tensor) -> Workspace:
    """A free workspace of ``layout`` for ``like``'s rows, dtype and device (a new one if
    none is free), marked busy until :meth:`Workspace.hold`."""
    batch, dtype, device = like.shape[0], like.dtype, like.device
    with _lock:
        for i, ws in enumerate(_pool):
            if (
                ws.layout is layout and ws.batch == batch and ws.dtype == dtype
                and ws.device == device and ws.free()
            ):
                del _pool[i]
                break
        else:
            ws = Workspace(layout, batch, like)
            _trim()  # (the pool grows only here)
        ws.busy = True
        _pool.append(ws)
    return ws


def _trim() -> None:
    # Keep the most recently used free workspaces up to POOL_BYTES.
    kept = 0
    for ws in reversed(_pool[:]):
        if ws.free():
            kept += ws.nbytes
            if kept > POOL_BYTES:
                _pool.remove(ws)


def clear() -> None:
    """Drop every free workspace, and this thread's :class:`Gradients` (the memory goes
    back once no tensor refers to it)."""
    with _lock:
        _pool[:] = [ws for ws in _pool if not ws.free()]
    _local.sets = {}
