"""The one-pass direction of affine MADE layers, fused: one layer, or a chain of them.

* ``_FusedAffine``: one MAF layer's one-pass direction (MAF density, IAF sampling) as one
  autograd node, the affine map applied to the MADE's output in place and differentiated
  by hand.
* :func:`chain`: a stretch of a :class:`~exactflow.Compose` made of MAF layers and the
  permutations between them (``ef.models.maf``'s ``MAF, Reverse, MAF, ...``) as one node;
  the same for IAF layers in the sampling direction (``ef.models.iaf``'s inverse: ``IAF``
  inverse, ``Reverse`` inverse, ...: the same map, ``v = u exp(s) + t`` with ``(t, s)``
  from a MADE of ``u``). Layer by layer, each layer turns its input unit-major, runs the
  MADE, maps, turns the result back to batch-major for the permutation, which gathers it
  again, and autograd keeps a node per layer, per permutation and per log-det sum. The
  chain keeps the features unit-major from the first layer to the last: each permutation
  becomes the row gather that loads the next layer's
  :class:`~exactflow.nn.workspace.Workspace`, and the log-dets add up in one buffer.
  Values and gradients are those of the layers one by one (the same operations on the
  same numbers; tested bitwise). Where no backward follows (scoring, sampling), the chain
  runs layer by layer, each layer's weights loaded once and its rows run in blocks small
  enough for its workspaces to stay pooled and in cache, and the affine map runs wholly
  in place.

Both run where the hand-written passes apply (:func:`~exactflow.nn.passes.is_plain`); the
chain also needs no module hooks on its layers and no saved-tensor hooks, and otherwise
leaves the layers to run one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..core import Transform, check_input
from ..nn import MADE
from ..nn.passes import has_hooks, is_plain, needs_recompute, recomputed_grads
from ..nn.workspace import Workspace, block_rows, frees_workspaces, hooks_active, take
from .linear import Permutation, Reverse
from .monotonic import AffineMap

__all__: list[str] = []

_tanh_backward = torch.ops.aten.tanh_backward.grad_input


def _batch_major(t: Tensor, rows: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``(features, batch)`` unit-major rows, taken in the order ``rows`` (all of them,
    as they are, if None), as a contiguous ``(batch, features)`` tensor.

    A gather of whole rows and one transposing copy: ``index_select`` along the columns of
    the transposed view gathers element by element, 2-3x slower for 10,000 rows.
    """
    if rows is not None:
        t = t.index_select(0, rows)
    if out is None:
        out = t.new_empty(t.shape[1], t.shape[0])
    out.t().copy_(t)
    return out


def _affine_in_place(
    out: Tensor, u_sorted: Tensor, bound: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The affine map on a MADE's unit-major output ``out`` (``(t, a)`` feature by feature,
    ``(2 d, batch)``), in place where it can: ``v = u exp(s) + t`` with ``s = bound *
    tanh(a / bound)``. Returns ``(v, tanh, exp(s), u exp(s), log|det|)``, ``v`` a strided
    view of ``out`` in the order and the middle three what the backward needs. (The MADE's
    output is not kept: on 10,000 rows each fresh buffer costs about as much as the pass
    that fills it.)"""
    shift, raw = out.view(u_sorted.shape[0], 2, -1).unbind(1)
    tanh = raw.div_(bound).tanh_()
    scale = torch.mul(tanh, bound).exp_()  # AffineMap's log-scale, exponentiated
    scaled = u_sorted * scale
    return shift.add_(scaled), tanh, scale, scaled, tanh.sum(0).mul_(bound)


def _affine_scoring(out: Tensor, u_sorted: Tensor, bound: float, v: Tensor) -> Tensor:
    """:func:`_affine_in_place` where no backward follows: writes ``u exp(s) + t`` into
    ``v`` and returns ``log|det|``, every step in place (the same operations in the same
    order, so the same values)."""
    shift, raw = out.view(u_sorted.shape[0], 2, -1).unbind(1)
    tanh = raw.div_(bound).tanh_()
    log_det = tanh.sum(0).mul_(bound)
    torch.add(shift, tanh.mul_(bound).exp_().mul_(u_sorted), out=v)
    return log_det


def _affine_backward(g_out: Tensor, grad_log_det: Tensor, tanh: Tensor, scaled: Tensor) -> None:
    """Given ``dL/dv`` in ``g_out[:, 0]`` (``g_out`` of shape ``(d, 2, batch)``), write
    ``dL/da`` into ``g_out[:, 1]``: ``dv/dt = 1``, ``dv/da = u exp(s) (1 - tanh^2)``, and
    ``log|det|`` adds ``ds/da = 1 - tanh^2``. (``dL/dt = dL/dv`` is already in place.)"""
    _tanh_backward(
        torch.addcmul(grad_log_det, g_out[:, 0], scaled), tanh, grad_input=g_out[:, 1]
    )


class _FusedAffine(torch.autograd.Function):
    """The one-pass direction of an affine MADE layer (MAF density, IAF sampling), fused.

    ``v = u * exp(s) + t`` with ``(t, a) = MADE(u, c)`` and ``s = bound * tanh(a / bound)``
    (:class:`~exactflow.transforms.monotonic.AffineMap`), ``log|det| = sum(s)``. The map is
    applied to the MADE's unit-major output in place of a batch-major copy, and its
    derivatives are written out by hand and fed to the MADE's own backward: no autograd
    graph for the map and no transposes of the parameters or of their gradient. Under
    ``create_graph=True`` the backward recomputes the layer with differentiable ops.
    """

    @staticmethod
    def forward(
        ctx: Any, u: Tensor, context: Tensor | None, packed: Tensor, made: MADE,
        affine: AffineMap, recording: bool,
    ) -> tuple[Tensor, Tensor]:
        c, bound = made.context_features, affine.scale_bound
        u_in = made._inputs(u, context)
        ctx.made, ctx.affine = made, affine
        ctx.workspace = workspace = made._workspace(u_in, scoring=not recording)
        ctx.workspaces = () if workspace is None else (workspace,)
        try:
            if workspace is None:  # saved-tensor hooks: fresh buffers, all saved
                weights = made._weights(packed)
                out, inputs = made._fused(u_in, weights)
                kept = (weights, *inputs)
            else:
                out = workspace.forward(u_in, packed, made._scatter)
                inputs, kept = workspace.inputs, ()
            u_sorted = inputs[0][1 + c :]  # (d, batch), in the order
            v_sorted, tanh, scale, scaled, log_det = _affine_in_place(out, u_sorted, bound)
            v = _batch_major(v_sorted, None if made._identity_order else made._rank)
        finally:
            if workspace is not None:
                if recording:
                    workspace.hold(ctx)
                else:
                    workspace.give_back()
        ctx.save_for_backward(u, context, packed, tanh, scale, scaled, *kept)
        return v, log_det

    @staticmethod
    @frees_workspaces
    def backward(
        ctx: Any, grad_v: Tensor, grad_log_det: Tensor
    ) -> tuple[Tensor | None, ...]:
        u, context, packed, tanh, scale, scaled, *kept = ctx.saved_tensors
        made, affine, workspace = ctx.made, ctx.affine, ctx.workspace
        need_u, need_c, need_packed = ctx.needs_input_grad[:3]
        if needs_recompute(grad_v, grad_log_det):  # create_graph=True, or batched gradients

            def recompute(u: Tensor, context: Tensor | None, packed: Tensor) -> tuple[Tensor, ...]:
                params = made._outputs(made._composable(made._inputs(u, context), packed))
                v, log_det = affine.forward(u, params)
                return v, log_det.sum(dim=1)

            grads = recomputed_grads(
                recompute, (u, context, packed), (need_u, need_c, need_packed),
                (grad_v, grad_log_det),
            )
            return (*grads, None, None, None)
        # (Gradients of unused outputs arrive as zeros.)
        c, d = made.context_features, made.features
        batch = grad_v.shape[0]
        if workspace is None:
            g_out = grad_v.new_empty(d, 2, batch)
        else:
            g_out = workspace.grad_out.view(d, 2, batch)
        g_v = g_out[:, 0]  # (d, batch), in the order
        g_v.copy_(grad_v.t())
        if not made._identity_order:
            g_v.copy_(g_v.index_select(0, made.order))
        _affine_backward(g_out, grad_log_det, tanh, scaled)
        need_in = need_u or need_c
        if workspace is None:
            weights, *inputs = kept
            g_in, grad_packed = made._fused_backward(
                g_out.view(2 * d, batch), weights, inputs, need_in
            )
        else:
            g_in, grad_packed = workspace.backward(need_in, made._dest)
        grad_u = grad_c = None
        if need_u:
            g_u = torch.addcmul(g_in[c:], g_v, scale)  # through the parameters, and directly
            grad_u = _batch_major(g_u, None if made._identity_order else made._rank)
        if need_c:  # a copy, always (at batch 1 .contiguous() would be the workspace)
            grad_c = g_in[:c].t().clone(memory_format=torch.contiguous_format)
        return grad_u, grad_c, grad_packed if need_packed else None, None, None, None


# -- a chain of MAF layers and permutations ---------------------------------------------


class _Link:
    """One MAF layer of a chain: its MADE, log-scale bound and context width, and the
    permutation that follows it (None: none)."""

    __slots__ = ("made", "bound", "context", "perm")

    def __init__(self, layer: Any, perm: Tensor | None) -> None:
        self.made: MADE = layer.made
        self.bound: float = layer.monotonic.scale_bound
        self.context: int = layer.made.context_features
        self.perm = perm


class _Plan:
    """Row maps of a chain, in each layer's sorted order (``o_k`` its order, ``r_k`` the
    rank, ``P_k`` the permutation after it): layer ``k`` reads row ``loads[k][m] =
    r_{k-1}[P_{k-1}[o_k[m]]]`` of the layer before; the output's column ``j`` is row
    ``rows[j] = r_last[P_last[j]]`` of the last layer (None: in order), ``unrows`` its
    inverse."""

    __slots__ = ("key", "loads", "rows", "unrows", "first_rank")

    def __init__(self, links: Sequence[_Link], key: tuple[int, ...]) -> None:
        self.key = key
        ranks = [link.made._rank for link in links]
        self.loads: list[Tensor | None] = [None]
        for before, link, rank in zip(links, links[1:], ranks, strict=False):
            seen = link.made.order if before.perm is None else before.perm[link.made.order]
            self.loads.append(rank[seen])
        last = links[-1]
        rows = ranks[-1] if last.perm is None else ranks[-1][last.perm]
        identity = torch.equal(rows, torch.arange(rows.numel(), device=rows.device))
        self.rows = None if identity else rows
        self.unrows = None if identity else torch.argsort(rows)
        self.first_rank = None if links[0].made._identity_order else ranks[0]


def _plan(links: Sequence[_Link], owner: Any) -> _Plan:
    """The :class:`_Plan` of ``links``, kept on ``owner`` (the first layer) while the
    orders and permutations it was made from are unchanged."""
    key: tuple[int, ...] = ()
    for link in links:
        order = link.made.order
        key += (order.data_ptr(), order._version)
        if link.perm is not None:
            key += (link.perm.data_ptr(), link.perm._version)
    plan = owner.__dict__.get("_chain_plan")
    if plan is None or plan.key != key:
        plan = _Plan(links, key)
        owner.__dict__["_chain_plan"] = plan
    return plan


def chain(
    layers: Sequence[Transform], start: int, x: Tensor, context: Tensor | None,
    inverse: bool = False,
) -> tuple[Tensor, Tensor, int] | None:
    """Run ``layers[start:]`` as far as they chain (MAF layers that can fuse, or with
    ``inverse`` the inverses of IAF layers, in the order a :class:`~exactflow.Compose`
    runs them, each optionally followed by a :class:`~exactflow.transforms.Permutation`
    or :class:`~exactflow.transforms.Reverse`, inverted with ``inverse``) as one node:
    ``(output, log|det|, index of the first layer after the chain)``, or None where the
    layers must run one by one."""
    links: list[_Link] = []
    i, n = start, len(layers)
    direction = "inverse" if inverse else "forward"
    while i < n and getattr(layers[i], "_chain_direction", None) == direction:
        layer = layers[i]
        i += 1
        perm: Tensor | None = None
        if (
            i < n
            and type(layers[i]) in (Permutation, Reverse)
            and not has_hooks(layers[i])
            and direction not in layers[i].__dict__  # (not one of the instance's own)
        ):
            found = layers[i].inverse_perm if inverse else layers[i].perm
            assert isinstance(found, Tensor)
            perm = found
            i += 1
        links.append(_Link(layer, perm))
    if not links or (len(links) == 1 and links[0].perm is None):
        return None  # one layer alone: its own fused pass
    for k, link in enumerate(links):
        check_input(x, link.made.features, type(layers[start + k]).__name__, context,
                    link.context)
    packed = [link.made.packed for link in links]
    if any(p.dtype != x.dtype for p in packed) or (
        context is not None and context.dtype != x.dtype
    ):
        return None  # (the layers one by one say what is wrong)
    if not is_plain(x, *packed) or (context is not None and not is_plain(context)):
        return None
    if hooks_active():  # (after is_plain: not under torch.compile)
        return None
    plan = _plan(links, layers[start])
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, context, *packed)
    )
    if recording:
        z, log_det = _AffineChain.apply(x, context, plan, links, *packed)
    else:
        z, log_det = _score(x, context, plan, links, packed)
    return z, log_det, i


def _score(
    x: Tensor, context: Tensor | None, plan: _Plan, links: Sequence[_Link],
    packed: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """The chain where no backward follows, layer by layer, each layer (on the CPU) in
    blocks of at most :func:`~exactflow.nn.workspace.block_rows` rows through one
    workspace that loads its weights once; the features wait unit-major between layers.
    The workspaces stay pooled and in cache. (Scoring 10,000 rows of the 10-D mixture in
    one block took 16.6-26.5 ms, by what the allocator held from earlier calls; in blocks
    16.6-17.9 ms. Running the blocks through each layer, not each block through the chain,
    loads each layer's weights once: 10% of scoring a 64-D MAF of width 256.)"""
    n = x.shape[0]
    layouts = [link.made._pass_layout(x, scoring=True) for link in links]
    rows = max(1, n)  # (an accelerator wants the whole batch)
    if x.device.type == "cpu":
        rows = max(1, min(n, *(block_rows(layout, x) for layout in layouts)))
    v = x.new_empty(links[0].made.features, n)  # in the order of the layer last run
    total = x.new_empty(n)
    used: list[Workspace] = []
    held: dict[int, Workspace] = {}  # this layer's, by rows
    try:
        for k, link in enumerate(links):
            made, c = link.made, link.context
            for s in range(0, n, rows):
                e = min(s + rows, n)
                c_rows = context[s:e] if c and context is not None else None
                ws = held.get(e - s)
                if ws is None:
                    ws = held[e - s] = take(layouts[k], x[s:e])
                    used.append(ws)
                    ws.load(packed[k], made._scatter)
                if k == 0:
                    ws.x_rows.copy_(made._inputs(x[s:e], c_rows).t())
                else:
                    if c_rows is not None:
                        ws.x_rows[:c].copy_(c_rows.t())
                    load = plan.loads[k]
                    assert load is not None
                    torch.index_select(v[:, s:e], 0, load, out=ws.x_rows[c:])
                log_det = _affine_scoring(ws.products(), ws.x_rows[c:], link.bound, v[:, s:e])
                if k == 0:
                    total[s:e] = log_det
                else:
                    total[s:e] += log_det
            while held:  # (the next layer takes them again, unless another thread has)
                held.popitem()[1].give_back(keep=True)
    finally:
        for ws in held.values():
            ws.give_back(keep=True)
        for ws in used:
            ws.drop_if_large()
    return _batch_major(v, plan.rows), total


def _chain_forward(
    x: Tensor, context: Tensor | None, plan: _Plan, links: Sequence[_Link],
    packed: Sequence[Tensor], owner: Any,
) -> tuple[Tensor, Tensor, list[Workspace], list[Tensor]]:
    """The layers' fused passes for a backward, the features unit-major in between: ``(z,
    log|det|, the workspaces, what the backward needs)``. ``owner``, the autograd context,
    holds the workspaces for the backward."""
    workspaces: list[Workspace] = []
    kept: list[Tensor] = []
    try:
        v = total = x
        for k, link in enumerate(links):
            made, c = link.made, link.context
            ws = take(made._layout, x)
            workspaces.append(ws)
            if k == 0:
                ws.x_rows.copy_(made._inputs(x, context if c else None).t())
            else:
                if c:
                    ws.x_rows[:c].copy_(context.t())  # type: ignore[union-attr]
                load = plan.loads[k]
                assert load is not None
                torch.index_select(v, 0, load, out=ws.x_rows[c:])
            res = ws.run(packed[k], made._scatter)
            # v: (d, batch), in this layer's order
            v, tanh, scale, scaled, log_det = _affine_in_place(res, ws.x_rows[c:], link.bound)
            kept += (tanh, scale, scaled)
            total = log_det if k == 0 else total.add_(log_det)
        z = _batch_major(v, plan.rows)
    finally:
        for ws in workspaces:
            ws.hold(owner)
    return z, total, workspaces, kept


class _AffineChain(torch.autograd.Function):
    """:func:`chain`'s node: the layers' fused passes with the features kept
    unit-major in between, and the backward by hand through all of them."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, context: Tensor | None, plan: _Plan, links: list[_Link],
        *packed: Tensor,
    ) -> tuple[Tensor, Tensor]:
        ctx.plan, ctx.links = plan, links
        z, total, ctx.workspaces, kept = _chain_forward(x, context, plan, links, packed, ctx)
        ctx.save_for_backward(x, context, *packed, *kept)
        return z, total

    @staticmethod
    @frees_workspaces
    def backward(ctx: Any, grad_z: Tensor, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        x, context, *rest = ctx.saved_tensors
        plan, links, workspaces = ctx.plan, ctx.links, ctx.workspaces
        depth = len(links)
        packed, kept = rest[:depth], rest[depth:]
        need_x, need_c = ctx.needs_input_grad[:2]
        need_packed = ctx.needs_input_grad[4:]
        if needs_recompute(grad_z, grad_total):  # create_graph=True, or batched gradients

            def recompute(x: Tensor, context: Tensor | None, *packed: Tensor) -> tuple[Tensor, ...]:
                return _chain_in_torch_ops(x, context, links, packed)

            grads = recomputed_grads(
                recompute, (x, context, *packed), (need_x, need_c, *need_packed),
                (grad_z, grad_total),
            )
            return (grads[0], grads[1], None, None, *grads[2:])
        d, batch = links[0].made.features, grad_z.shape[0]
        grad_packed: list[Tensor | None] = [None] * depth
        grad_x = grad_c = None
        g_v = workspaces[-1].grad_out.view(d, 2, batch)[:, 0]
        g_v.copy_(grad_z.t())
        if plan.unrows is not None:
            g_v.copy_(g_v.index_select(0, plan.unrows))
        for k in range(depth - 1, -1, -1):
            link, ws = links[k], workspaces[k]
            c = link.context
            tanh, scale, scaled = kept[3 * k : 3 * k + 3]
            g_out = ws.grad_out.view(d, 2, batch)
            g_v = g_out[:, 0]  # (d, batch), in this layer's order
            _affine_backward(g_out, grad_total, tanh, scaled)
            # Whether anything before this layer wants the gradient of its input.
            below = need_x or any(need_packed[:k]) or (
                need_c and any(other.context for other in links[:k])
            )
            g_in, grad = ws.backward(below or (need_c and c > 0), link.made._dest)
            grad_packed[k] = grad if need_packed[k] else None
            if need_c and c > 0:
                assert g_in is not None
                grad_c = g_in[:c].clone() if grad_c is None else grad_c.add_(g_in[:c])
            if not below:
                break
            assert g_in is not None
            g_u = torch.addcmul(g_in[c:], g_v, scale)
            if k == 0:
                grad_x = _batch_major(g_u, plan.first_rank)
            else:
                before = workspaces[k - 1].grad_out.view(d, 2, batch)[:, 0]
                before.index_copy_(0, plan.loads[k], g_u)
        return (
            grad_x,
            None if grad_c is None else grad_c.t().contiguous(),
            None,
            None,
            *grad_packed,
        )


def _chain_in_torch_ops(
    x: Tensor, context: Tensor | None, links: Sequence[_Link], packed: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """The chain in differentiable torch ops (the backward under ``create_graph=True``)."""
    total: Tensor | None = None
    for link, weights in zip(links, packed, strict=True):
        made = link.made
        c = context if link.context else None
        params = made._outputs(made._composable(made._inputs(x, c), weights))
        x, log_det = AffineMap(link.bound).forward(x, params)
        step = log_det.sum(dim=1)
        total = step if total is None else total + step
        if link.perm is not None:
            x = x.index_select(1, link.perm)
    assert total is not None
    return x, total
