"""The transform contract: invertible maps that know their log-determinant.

Direction convention (as in nflows and zuko): ``forward`` goes **data -> latent** (the
normalizing direction, used by :meth:`exactflow.Flow.log_prob`); ``inverse`` goes
**latent -> data** (the generative direction, used by :meth:`exactflow.Flow.sample`).

Both directions return a pair ``(output, log_abs_det)`` where ``log_abs_det`` has shape
``(batch,)``:

* ``z, ladj = t(x, context)`` with ``ladj = log|det dz/dx|``;
* ``x, ladj_inv = t.inverse(z, context)`` with ``ladj_inv = log|det dx/dz| = -ladj``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .nn.passes import has_hooks, is_plain
from .validation import not_a_pair

__all__ = [
    "Transform", "Compose", "Inverse", "check_domain", "check_features", "check_input", "per_row",
]


class Transform(nn.Module):
    """Base class of every invertible map in exactflow.

    A transform maps data to latent in :meth:`forward` and latent to data in
    :meth:`inverse`. Both take ``x`` of shape ``(batch, features)`` and an optional
    ``context`` of shape ``(batch, context_features)``, and return the output with the
    log-absolute-determinant of the Jacobian of *that* direction, of shape ``(batch,)``.

    Every transform declares its width in :attr:`features` (``None`` for a map that works
    at any width, such as :class:`~exactflow.transforms.Sigmoid`) and the size of the
    conditioning vector it needs in :attr:`context_features` (0 for none). The shapes of
    ``x`` and ``context`` are checked here, once, before any subclass code runs: a wrong
    shape raises a ``ValueError`` that names the layer, never a torch error from deep inside
    it and never a silent broadcast. Shapes are static, so the check traces under
    ``torch.compile`` and costs no device sync. A layer that is not conditional ignores a
    ``context`` it is given (the layers of a conditional flow all receive it).

    How to implement a transform:

    1. Subclass :class:`Transform` and call ``super().__init__()``.
    2. Set ``self.features`` (the dimension ``d``, or leave ``None`` for any width) and,
       for a conditional layer, ``self.context_features``. Keep every tensor the layer owns
       in an ``nn.Parameter`` or a buffer, so ``.to(device)`` and ``state_dict`` work.
    3. Implement ``forward(x, context=None) -> (z, log|det dz/dx|)`` and
       ``inverse(z, context=None) -> (x, log|det dx/dz|)``, each log-det of shape
       ``(batch,)``; at the same point ``ladj_inv = -ladj``. Do not check shapes: the base
       class does. Avoid ``.item()`` and Python branches on tensor values in these methods,
       so they stay compilable (use :func:`check_domain` for inputs outside the domain).
    4. Set ``linear = True`` if the map is affine in ``x`` (``z = A x + b``): plots and
       diagnostics then treat it as a change of coordinates, not a warp.
    5. Prove it right with :func:`exactflow.check_transform` in float64, at random
       parameters (not only at initialization, where many layers are the identity).

    Example:
        >>> import math, torch, exactflow as ef
        >>> class Double(ef.Transform):
        ...     linear = True
        ...     def __init__(self, features):
        ...         super().__init__()
        ...         self.features = features
        ...     def forward(self, x, context=None):
        ...         return 2 * x, x.new_full(x.shape[:1], self.features * math.log(2))
        ...     def inverse(self, z, context=None):
        ...         return z / 2, z.new_full(z.shape[:1], -self.features * math.log(2))
        >>> report = ef.check_transform(Double(3), torch.randn(4, 3, dtype=torch.float64))
        >>> report.ok
        True
        >>> Double(3)(torch.randn(4, 1))
        Traceback (most recent call last):
            ...
        ValueError: Double expects input of shape (batch, 3), got (4, 1)
    """

    #: The dimension ``d`` of the data this transform maps (``None``: any width).
    features: int | None = None
    #: The size of the conditioning vector this transform needs (0: unconditional).
    context_features: int = 0
    #: Whether the map is affine in its input (``z = A x + b``, log-det constant in ``x``).
    linear: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The one place where inputs are checked: every forward and inverse a subclass
        # defines is wrapped, so layers never check shapes themselves.
        for direction in ("forward", "inverse"):
            method = cls.__dict__.get(direction)
            if method is not None and not getattr(method, "_exactflow_checked", False):
                setattr(cls, direction, _checked(method, direction))

    @property
    def _chain_direction(self) -> str | None:
        """The direction (``"forward"`` or ``"inverse"``) in which :class:`Compose` should
        offer this layer :meth:`_chain`; None: neither."""
        return None

    @property
    def _row_width(self) -> int | None:
        """For :class:`Compose`'s passes in blocks of rows (where no backward follows):
        the numbers per row of the widest tensor this layer's ``forward`` or ``inverse``
        makes, if in both directions each row's output depends on that row alone (and not
        on how many rows come with it: no batch statistics, no data-dependent
        initialization); None otherwise (the layer sees the whole batch)."""
        return None

    def _block_bytes(self, inverse: bool) -> int:
        """For :class:`Compose`'s passes in blocks of rows: the bytes the widest tensor of
        one block may take in the direction asked; :data:`SCORING_BLOCK_BYTES` (a block
        stays in cache) unless the layer runs many small steps on each block (an
        autoregressive layer's sequential direction: :data:`SEQUENTIAL_BLOCK_BYTES`). A
        stretch of layers takes the largest its layers ask for."""
        return SCORING_BLOCK_BYTES

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map data to latent: returns ``(z, log|det dz/dx|)``."""
        raise NotImplementedError

    def _chain(
        self, layers: Sequence[Transform], start: int, x: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor, int] | None:
        """Run ``layers[start:]`` (this layer first; the layers in the order a
        :class:`Compose` runs them in :attr:`_chain_direction`) as far as they fuse with
        it: ``(output, log|det|, index of the next layer)``, or None to run this layer
        alone. Layers with a fused pass over several layers override it (MAF density, IAF
        sampling)."""
        return None

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map latent to data: returns ``(x, log|det dx/dz|)``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no inverse: it cannot map latent points to data "
            "(sampling needs one; scoring runs forward only)"
        )

    @property
    def inv(self) -> Transform:
        """This transform with its two directions swapped."""
        return Inverse(self)


def _checked(method: Callable[..., Any], direction: str) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(
        self: Transform, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        name = type(self).__name__ + (".inverse" if direction == "inverse" else "")
        # (A flow hands its stack float64 rows for a first Standardize layer, which casts
        # them to the model's dtype, and the context in that dtype: the layers check.)
        check_input(x, self.features, name, context, self.context_features,
                    same_dtype=not isinstance(self, Compose))
        return method(self, x, context)

    wrapper._exactflow_checked = True  # type: ignore[attr-defined]
    return wrapper


class Inverse(Transform):
    """Swaps the two directions of a transform.

    ``Inverse(t).forward`` is ``t.inverse`` and vice versa; parameters are shared. Use it to
    turn a layer that is fast in one direction into one that is fast in the other (an IAF is
    the inverse of a MAF).
    """

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        if not isinstance(transform, Transform):
            raise TypeError(f"Inverse takes an exactflow Transform, got {type(transform).__name__}")
        self.transform = transform
        self.features = transform.features
        self.context_features = transform.context_features
        self.linear = transform.linear

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(z, context)

    @property
    def inv(self) -> Transform:
        return self.transform


class Compose(Transform):
    """A chain of transforms applied in order; the log-determinants add up.

    ``Compose(t1, t2, t3).forward`` is ``t3(t2(t1(x)))`` with
    ``log|det J| = sum_k log|det J_k|``; the inverse runs the layers in reverse order.
    The same ``context`` is passed to every layer.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.Compose(ef.transforms.ElementwiseAffine(2), ef.transforms.Reverse(2))
        >>> z, ladj = t(torch.randn(5, 2))
        >>> z.shape, ladj.shape
        (torch.Size([5, 2]), torch.Size([5]))
    """

    def __init__(self, *transforms: Transform) -> None:
        super().__init__()
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple)):
            transforms = tuple(transforms[0])
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(
                    f"Compose takes exactflow Transforms, got {type(t).__name__}"
                )
        widths = {t.features for t in transforms if t.features is not None}
        if len(widths) > 1:
            raise ValueError(
                "Compose takes transforms of one width; got features "
                + ", ".join(str(t.features) for t in transforms)
            )
        contexts = {t.context_features for t in transforms if t.context_features}
        if len(contexts) > 1:
            raise ValueError(
                "Compose passes one context to every layer, but its conditional layers take "
                "contexts of " + ", ".join(str(t.context_features) for t in transforms
                                            if t.context_features) + " features"
            )
        self.transforms = nn.ModuleList(transforms)
        self.features = widths.pop() if widths else None
        self.context_features = contexts.pop() if contexts else 0
        self.linear = all(t.linear for t in transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __iter__(self) -> Iterator[Transform]:
        return iter(self.transforms)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Transform:
        layer = self.transforms[index]
        assert isinstance(layer, Transform)
        return layer

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._through(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._through(z, context, inverse=True)

    def _through(
        self, x: Tensor, context: Tensor | None, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """The layers in order (``forward``) or in reverse order, each through its
        ``inverse``: ``(output, log|det|)``."""
        layers = list(self)[::-1] if inverse else list(self)
        way = "inverse" if inverse else "forward"
        total: Tensor | None = None
        i = 0
        # Where no backward follows, stretches of layers that take rows one by one run in
        # blocks of rows (from the first layer not tried yet). A context that no layer
        # takes is ignored, whatever it is.
        own = context if self.context_features else None
        untried = 0 if _may_block(x, own, self) else len(layers)
        while i < len(layers):
            t = layers[i]
            chained = t._chain(layers, i, x, context) if t._chain_direction == way else None
            if chained is None and i >= untried:
                untried, rows = _stretch(layers, i, x, inverse)
                if rows:
                    chained = (*_in_blocks(layers[i:untried], x, own, rows, inverse), untried)
            if chained is None:
                given, out = x, t.inverse(x, context) if inverse else t(x, context)
                if not isinstance(out, (tuple, list)) or len(out) != 2:
                    raise not_a_pair(out, type(t).__name__, way)
                x, ladj = out[0], per_row(out[1], given, out[0], type(t).__name__)
                i += 1
            else:  # several layers in one pass
                x, ladj, i = chained
            total = ladj if total is None else total + ladj
        return x, x.new_zeros(x.shape[:1]) if total is None else total


#: Bytes of the widest tensor of a layer that :class:`Compose` lets one block of rows make
#: where no backward follows (scoring, and sampling through the inverses): a block's
#: tensors then stay in the core's cache, where the whole batch's stream through memory
#: (and every fresh one is faulted in). Scoring
#: 10,000 rows (one thread, ms, whole batch / blocks of 1 / 2 / 3 MB), the benchmark's
#: models: 64-D RealNVP of width 256 183.9 / 158.0 / 154.3 / 158.4, 64-D NSF 697.7 / 525.2
#: / 516.2 / 533.0, 10-D NSF of width 128 115.2 / 103.3 / 104.2 / 107.1, 10-D RealNVP of
#: width 128 37.6 / 41.4 / 39.5 / 38.2 (40.2 / 40.2 whole / 2 MB in a rerun).
SCORING_BLOCK_BYTES = 2 * 2**20

#: The same for the sequential direction of an autoregressive layer (MAF sampling, IAF
#: scoring), whose ``d`` small steps per block cost the same whatever the block's rows, so
#: that its blocks are larger: they bound its memory (10 million 2-D points of a MAF took
#: 3.6 GB at once) and keep 10,000 rows one block for the benchmark's 2-D and 10-D MAFs.
#: Sampling 3 million points of a 2-D MAF (width 32; one thread, thread time, interleaved
#: in one process, s), blocks of 2 / 8 / 32 MB: 1.55 / 1.31 / 3.00; the whole batch before
#: took 4.05 s. At 10,000 points the differences were below the noise of the machine.
SEQUENTIAL_BLOCK_BYTES = 8 * 2**20

#: The fewest rows of a block.
_LEAST_ROWS = 256


def _may_block(x: Tensor, context: Tensor | None, module: nn.Module) -> bool:
    """Whether a :class:`Compose` call may run stretches of its layers in blocks of rows:
    a batch of more than one block (256 rows at least) on the CPU (an accelerator wants
    the whole batch), no gradient through the input or (a quick look for training: its
    first parameter) ``module``, no trace or ``torch.func`` transform. :func:`_stretch`
    checks each layer's parameters."""
    if x.dim() != 2 or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled():  # (training, the hot path, stops here)
        first = next(module.parameters(), None)
        if (
            x.requires_grad
            or (context is not None and context.requires_grad)
            or (first is not None and first.requires_grad)
        ):
            return False
    # The size last: under a trace (torch.export) no guard on the batch size.
    return is_plain(x) and x.shape[0] > _LEAST_ROWS


def _stretch(
    layers: Sequence[Transform], start: int, x: Tensor, inverse: bool
) -> tuple[int, int]:
    """``(end, rows)``: ``layers[start:end]`` take rows one by one in the direction asked
    (:attr:`Transform._row_width`), no backward follows them and no hook watches them;
    ``rows`` is the block size, 0 where they run on the whole batch (then ``end`` is at
    least ``start + 1``)."""
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:  # (a layer before trains)
        return start + 1, 0
    width, end, budget = 0, start, 0
    for t in layers[start:]:
        w = t._row_width
        if (
            w is None
            or ("inverse" if inverse else "forward") in t.__dict__  # (the instance's own)
            or (grad and any(p.requires_grad for p in t.parameters()))
            or any(has_hooks(m) for m in t.modules())  # (a hook would see blocks)
        ):
            break
        width, end, budget = max(width, w), end + 1, max(budget, t._block_bytes(inverse))
    if end == start:
        return start + 1, 0
    rows = max(_LEAST_ROWS, budget // (width * x.element_size()) // 64 * 64)
    return end, rows if x.shape[0] > rows else 0


def _in_blocks(
    layers: Sequence[Transform], x: Tensor, context: Tensor | None, rows: int, inverse: bool
) -> tuple[Tensor, Tensor]:
    """``layers`` (a stretch that :func:`_stretch` planned, in the order they run) block of
    ``rows`` rows after block, through their ``inverse`` if asked: ``(output, log|det|)``."""
    n = x.shape[0]
    z: Tensor | None = None
    total = x.new_empty(n)
    for s in range(0, n, rows):
        block = x[s : s + rows]
        c = None if context is None else context[s : s + rows]
        block_total: Tensor | None = None
        for t in layers:
            block, ladj = t.inverse(block, c) if inverse else t(block, c)
            block_total = ladj if block_total is None else block_total + ladj
        if z is None:
            z = block.new_empty(n, *block.shape[1:])
        z[s : s + rows] = block
        assert block_total is not None
        total[s : s + rows] = block_total
    assert z is not None
    return z, total


def per_row(log_det: Tensor, given: Tensor, out: Tensor, layer: str = "the transform"
            ) -> Tensor:
    """``log_det``, checked to hold one value per row of ``given`` (a layer's input), and
    ``out`` (its output) to have the input's shape: a log-det of shape ``(batch, 1)`` would
    broadcast into a ``(batch, batch)`` density, one summed over the whole batch (shape
    ``()``) would be added to every row, and an output of another width would be scored
    by a base of the flow's width."""
    if not isinstance(log_det, Tensor):
        raise TypeError(f"{layer} returned a log-det of type {type(log_det).__name__}; it must "
                        f"be a tensor of one value per row, shape ({len(given)},) "
                        "(x.new_full((len(x),), value) for a constant)")
    if torch.jit.is_tracing() or given.dim() != 2:  # (a vmapped row is 1-D)
        return log_det
    if log_det.shape != given.shape[:1] or out.shape != given.shape:
        if out.shape != given.shape:
            raise ValueError(
                f"{layer} returned an output of shape {tuple(out.shape)} for an input of "
                f"shape {tuple(given.shape)}; an invertible layer keeps the shape"
            )
        whole = " (a sum over the whole batch: sum over the features only, .sum(-1))" if (
            log_det.dim() == 0) else ""
        raise ValueError(
            f"{layer} returned a log-det of shape {tuple(log_det.shape)} for "
            f"{given.shape[0]} rows{whole}; every layer must return one value per row, shape "
            f"({given.shape[0]},) (ef.check_transform(layer, x) finds the layer that does not)"
        )
    return log_det


def library_layers_only(transform: Transform) -> bool:
    """Whether every layer of ``transform`` is one of exactflow's own."""
    if isinstance(transform, Compose):
        return all(library_layers_only(t) for t in transform)
    if isinstance(transform, Inverse):
        return library_layers_only(transform.transform)
    return type(transform).__module__.startswith("exactflow.")


def check_domain(ok: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless every element of ``ok`` is true.

    Used for inputs outside a transform's domain (e.g. ``Logit`` of a value outside (0, 1))
    so users get a clear error instead of a silent NaN. The check is skipped while
    ``torch.compile`` traces, so compiled forward paths stay free of data-dependent branches,
    and under ``torch.func.vmap``, which cannot branch on data: there an out-of-domain row
    is not caught, and :func:`exactflow.jacobian` stays vectorized for such transforms
    (:func:`exactflow.check_transform` calls the transform eagerly first, so it still
    raises).
    """
    if torch.compiler.is_compiling() or _is_vmapped(ok):
        return
    if not bool(ok.all()):
        raise ValueError(message)


def _is_vmapped(t: Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap`` (at any level of functorch wrapping)."""
    try:
        functorch = torch._C._functorch
        while functorch.is_functorch_wrapped_tensor(t):
            if functorch.is_batchedtensor(t):
                return True
            t = functorch.get_unwrapped(t)
    except AttributeError:  # a torch without these internals: keep checking eagerly
        return False
    return False


def check_features(features: int, name: str) -> int:
    """Return ``features`` if it is a positive int, else raise ``ValueError`` naming ``name``."""
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ValueError(f"{name}: features must be a positive int, got {features!r}")
    return features


def check_input(
    x: Tensor,
    features: int | None,
    name: str,
    context: Tensor | None = None,
    context_features: int = 0,
    same_dtype: bool = True,
) -> None:
    """Raise ``ValueError`` naming the layer unless ``x`` is ``(batch, features)`` and, for a
    conditional layer, ``context`` is ``(batch, context_features)`` (in ``x``'s floating
    dtype, with ``same_dtype``).

    ``features=None`` accepts any width. :class:`Transform` calls this before every
    ``forward`` and ``inverse``; shapes are static, so it costs nothing at run time and
    traces under ``torch.compile``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} takes a torch.Tensor, got {type(x).__name__}")
    if torch.jit.is_tracing():  # shapes are fixed in a trace: the checks would only warn
        return
    if x.dim() != 2 or (features is not None and x.shape[1] != features):
        width = "features" if features is None else str(features)
        raise ValueError(
            f"{name} expects input of shape (batch, {width}), got {tuple(x.shape)}"
        )
    if context_features > 0:
        if context is None:
            raise ValueError(
                f"{name} is conditional: pass a context of shape (batch, {context_features})"
            )
        if context.dim() != 2 or context.shape != (x.shape[0], context_features):
            raise ValueError(
                f"context must have shape ({x.shape[0]}, {context_features}), "
                f"got {tuple(context.shape)}"
            )
        if (same_dtype and context.dtype != x.dtype and context.is_floating_point()
                and x.is_floating_point()):
            raise ValueError(
                f"{name} got input of dtype {x.dtype} and a context of dtype "
                f"{context.dtype}: give both in the layer's dtype"
            )
