"""MADE, the autoregressive conditioner: construction, forward pass and autoregression.

The block layout it runs on is :mod:`exactflow.nn.layout`; the passes over it are
:mod:`exactflow.nn.passes`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layout import Layer, Layout, build_layout
from .mlp import Activation, _count, _hidden_sizes, resolve_order
from .passes import (
    autoregress_graph,
    autoregress_inplace,
    composable_pass,
    degree_steps,
    expand_weights,
    fused_backward,
    fused_pass,
    is_plain,
    layer_weights,
    recomputed_backward,
)
from .workspace import Workspace, frees_workspaces, hooks_active, take

__all__ = ["MADE"]

_shared_layout = functools.lru_cache(maxsize=128)(build_layout)

#: The fewest units per GEMM block of a pass that autograd does not record (scoring,
#: sampling), unless ``block_rows`` is smaller. Such a pass runs blocks of many rows, so
#: more and smaller blocks pay for their calls by the masked products they skip: scoring
#: 10,000 rows with a 5-layer MAF took (one thread, ms, blocks of >= 64 / 16 units) 16.7 /
#: 14.6 for 10 features and width 128, 23.2 / 20.2 for 32 and 128, 68.0 / 63.7 for 64
#: and 256, 138.5 / 133.9 for 20 and 512, and 7.0 / 6.9 for 2 and 64. A training step at
#: batch 512 is fastest with blocks of >= 64.
SCORING_BLOCK_ROWS = 16


class _MADEFunction(torch.autograd.Function):
    """One fused pass through MADE's blocked layers with a hand-written backward.

    Outputs are written into preallocated tensors block by block, the ReLU is applied in
    place and its backward is one in-place ``threshold_backward``; the weight gradients land
    straight in a buffer laid out like the blocks and are gathered into the packed layout
    once. Under ``create_graph=True`` the backward recomputes the pass with differentiable
    torch ops, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx: Any, x_in: Tensor, packed: Tensor, made: MADE) -> Tensor:
        ctx.made = made
        ctx.workspace = workspace = made._workspace(x_in)
        ctx.workspaces = () if workspace is None else (workspace,)
        if workspace is None:
            weights = made._weights(packed)
            out, inputs = made._fused(x_in, weights)
            # Saved-tensor hooks are active: the activations go through save_for_backward
            # (freed after the backward, and seen by the hooks).
            ctx.save_for_backward(x_in, packed, weights, *inputs)
            return out.t()
        try:
            out = workspace.forward(x_in, packed, made._scatter, made._new_output(x_in))
        finally:
            workspace.hold(ctx)
        ctx.save_for_backward(x_in, packed)
        return out.t()

    @staticmethod
    @frees_workspaces
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_in, packed, *saved = ctx.saved_tensors
        made: MADE = ctx.made
        recomputed = recomputed_backward(ctx, grad, made._composable, x_in, packed)
        if recomputed is not None:  # create_graph=True, or batched gradients
            return recomputed
        workspace, need_x = ctx.workspace, ctx.needs_input_grad[0]
        if workspace is None:
            weights, *inputs = saved
            g = grad.t().contiguous()
            grad_x, grad_packed = made._fused_backward(g, weights, inputs, need_x)
        else:
            workspace.grad_out.copy_(grad.t())
            grad_x, grad_packed = workspace.backward(need_x, made._dest)
        # A copy, always: at batch 1 the transposed buffer is contiguous already, and
        # .contiguous() would hand autograd the workspace's own memory.
        grad_x = None if grad_x is None else grad_x.t().clone(memory_format=torch.contiguous_format)
        return grad_x, grad_packed, None


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
        block_rows: the fewest units per GEMM block (blocks follow degree boundaries) of
            the passes autograd records: smaller blocks skip more masked multiply-adds at
            the price of more, smaller GEMMs. Passes without autograd take blocks of
            ``min(block_rows, 16)`` (:data:`~exactflow.nn.made.SCORING_BLOCK_ROWS`). A
            speed setting only: outputs and parameters do not depend on it.

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

    order: Tensor
    packed: nn.Parameter
    _rank: Tensor
    _scatter: Tensor
    _dest: Tensor

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
    ) -> None:
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
        # MADEs of equal sizes share one layout, and so the workspaces of their passes.
        layout, scatter, dest = _shared_layout(d, self.outputs, c, self.hidden, self.block_rows)
        self._layout = layout
        self._scoring_layout = self._layout_for_scoring()
        # Packed position -> weights position (the forward), -> gradients position.
        self.register_buffer("_scatter", scatter.clone(), persistent=False)
        self.register_buffer("_dest", dest.clone(), persistent=False)

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
            packed = layout.pack(
                [m.weight for m in dense], [m.bias for m in dense], context_weight, self.order
            )
        self.packed = nn.Parameter(packed)
        self.register_load_state_dict_pre_hook(_convert_v01_state)
        self.register_load_state_dict_post_hook(_refresh_order)

    def _layout_for_scoring(self) -> Layout:
        """The same weights layout (and so ``scatter``) in smaller blocks, for passes
        without autograd; where the blocks come out the same, the training layout itself
        (one pool of workspaces)."""
        layout = self._layout
        scoring = _shared_layout(
            self.features, self.outputs, self.context_features, self.hidden,
            min(self.block_rows, SCORING_BLOCK_ROWS),
        )[0]
        return layout if scoring.fused == layout.fused else scoring

    def _pass_layout(self, like: Tensor, scoring: bool) -> Layout:
        """The layout a pass over ``like`` runs: the smaller blocks of the scoring layout
        for a pass autograd does not record (``scoring``) on the CPU; the training layout
        otherwise (an accelerator wants fewer, larger products)."""
        return self._scoring_layout if scoring and like.device.type == "cpu" else self._layout

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_scoring_layout" not in self.__dict__:  # pickled by exactflow before it had one
            self._scoring_layout = self._layout_for_scoring()

    @property
    def _plan(self) -> tuple[Layer, ...]:
        """The layers of the block layout (:class:`~exactflow.nn.layout.Layer`)."""
        return self._layout.layers

    def masked_weights(self) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """The network as exactflow 0.1 stored it: dense masked matrices in feature order.

        Returns ``([(weight, bias), ...], context_weight)``: layer ``K`` computes
        ``h_K = act(weight @ h_{K-1} + bias)`` (no activation after the last), with
        ``weight`` of shape ``(out, in)`` and zeros wherever the mask forbids a connection,
        and ``context_weight @ c`` added to the first layer (``None`` without a context).
        Units are in 0.1's order (hidden degrees cycling, outputs ``feature * o + p``).
        Detached copies: for inspection, export and tests.
        """
        return self._layout.unpack(self.packed, self.order)

    # -- the forward pass ----------------------------------------------------------------

    def _weights(self, packed: Tensor) -> Tensor:
        """The weights layout: per layer ``[bias | dense sorted weights]``, masked entries 0."""
        return expand_weights(packed, self._layout, self._scatter)

    def _layer_weights(self, weights: Tensor) -> list[Tensor]:
        """Per layer the ``(outputs, 1 + inputs)`` matrix (differentiable views)."""
        return layer_weights(weights, self._layout)

    def _fused(self, x_in: Tensor, weights: Tensor) -> tuple[Tensor, list[Tensor]]:
        """:func:`~exactflow.nn.passes.fused_pass`: ``(outputs, batch)`` and every layer's
        unit-major input."""
        return fused_pass(x_in, weights, self._layout)

    def _fused_backward(
        self, g: Tensor, weights: Tensor, inputs: list[Tensor], need_x: bool
    ) -> tuple[Tensor | None, Tensor]:
        """:func:`~exactflow.nn.passes.fused_backward`: ``(grad of x_in, grad of packed)``."""
        return fused_backward(g, weights, inputs, need_x, self._layout, self._dest)

    def _workspace(self, like: Tensor, scoring: bool = False) -> Workspace | None:
        """A pooled :class:`~exactflow.nn.workspace.Workspace` for a full fused pass over
        ``like``'s rows (every such pass takes one here; ``scoring``: a pass autograd does
        not record, see :meth:`_pass_layout`), or None while saved-tensor hooks are
        active (then the fresh-buffer pass runs, its tensors saved for the hooks)."""
        if like.dtype != self.packed.dtype:
            raise TypeError(
                f"MADE: the input is {like.dtype} but the weights are {self.packed.dtype}; "
                f"convert the input (x.to({self.packed.dtype})) or the module "
                f"(.to({like.dtype}))"
            )
        return None if hooks_active() else take(self._pass_layout(like, scoring), like)

    def _new_output(self, like: Tensor) -> Tensor:
        """A fresh unit-major output ``(features * outputs, batch)``."""
        return like.new_empty(self.features * self.outputs, like.shape[0])

    def _composable(self, x_in: Tensor, packed: Tensor) -> Tensor:
        """:func:`~exactflow.nn.passes.composable_pass`, batch-major ``(batch, outputs)``."""
        weights = self._layer_weights(self._weights(packed))
        return composable_pass(x_in, weights, self._layout, self.activation)

    def _inputs(self, x: Tensor, context: Tensor | None) -> Tensor:
        """``[context, x in order]``: every unit sees a prefix of these columns."""
        if self.context_features > 0 and context is None:
            raise ValueError(
                f"this MADE is conditional: pass a context of shape "
                f"(batch, {self.context_features})"
            )
        xs = x if self._identity_order else x.index_select(1, self.order)
        if self.context_features > 0 and context is not None:  # (checked just above)
            xs = torch.cat([context, xs], dim=1)
        return xs

    def _outputs(self, out: Tensor) -> Tensor:
        """``(batch, features * outputs)`` in sorted order to ``(batch, features, outputs)``."""
        params = out.reshape(out.shape[0], self.features, self.outputs)
        return params if self._identity_order else params.index_select(1, self._rank)

    def _plain(self, t: Tensor) -> bool:
        """Whether the hand-written passes apply (:func:`~exactflow.nn.passes.is_plain`)."""
        return is_plain(t, self.packed)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Parameters ``(batch, features, outputs)``; row ``i`` depends on ``x[:, order[:k]]``."""
        x_in = self._inputs(x, context)
        if not (self._relu and self._plain(x_in)):
            out = self._composable(x_in, self.packed)
        elif torch.is_grad_enabled() and (x_in.requires_grad or self.packed.requires_grad):
            out = _MADEFunction.apply(x_in, self.packed, self)
        elif (workspace := self._workspace(x_in, scoring=True)) is None:
            out = self._fused(x_in, self._weights(self.packed))[0].t()
        else:
            try:
                out = workspace.forward(
                    x_in, self.packed, self._scatter, self._new_output(x_in)
                ).t()
            finally:
                workspace.give_back()
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
        c = self.context_features
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
        steps = degree_steps(self._layer_weights(self._weights(self.packed)), self._layout)
        if inplace:
            u = autoregress_inplace(
                solve, start, steps, self._layout, self.activation, self._relu
            )
        else:
            u = autoregress_graph(solve, start, steps, self._layout, self.activation)
        return u.contiguous() if self._identity_order else u.index_select(1, self._rank)

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, outputs={self.outputs}, hidden={self.hidden}, "
            f"context={self.context_features}, order={self.order.tolist()}, "
            f"parameters={self._layout.packed_size}"
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
    packed = module._layout.pack(weights, biases, context_weight, torch.as_tensor(order).cpu())
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
