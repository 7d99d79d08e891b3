"""Dense Jacobians by autograd and ``log|det J|`` by LU factorization: the brute force
that :func:`~exactflow.check_transform` holds every transform's own log-determinant to.

:func:`jacobian` differentiates a row-wise map itself (vectorized with ``torch.func``),
:func:`log_abs_det_jacobian` takes ``log|det J|`` by LU factorization
(``torch.linalg.slogdet``, never the raw determinant, so ``d = 1000`` with entries of size
10 does not overflow). These are O(d^3) per sample: use them to verify, not to train.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .nn.passes import in_eval_mode

__all__ = ["jacobian", "log_abs_det_jacobian", "autograd_gap", "parameter_gap", "rounding_note"]

# Batched LU/slogdet on the CPU has been seen to return wrong log-determinants for
# matrices of this size and above (oneMKL, after torch.set_num_threads), silently.
# Unbatched calls are right, so large matrices are factored one at a time.
_BATCHED_SLOGDET_MAX = 96

# Rows differentiated together by one vmap: reverse mode holds every intermediate of a row
# once per output coordinate, so memory grows as rows x d_out x (the map's width). A chunk
# of rows whose Jacobians hold about 2^22 numbers (32 MiB in float64) keeps a 784-D spline
# coupling near 1 GB (it grew by 180 MB a row, unchunked), and small maps in one chunk.
_CHUNK_NUMBERS = 1 << 22


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CPU allocators raise a plain RuntimeError)."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _first(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def jacobian(
    fn: Callable[..., Tensor | tuple[Tensor, ...]],
    x: Tensor,
    context: Tensor | None = None,
    *,
    create_graph: bool = False,
) -> Tensor:
    """Dense Jacobian of a row-wise map, by autograd.

    ``fn`` maps a batch ``(batch, d_in)`` to ``(batch, d_out)`` (or to a tuple whose first
    element is that, such as a :class:`Transform`'s ``(z, ladj)``), treating rows
    independently. Returns ``J`` of shape ``(batch, d_out, d_in)`` with
    ``J[b, i, j] = d fn(x)[b, i] / d x[b, j]``. A single vector ``x`` of shape ``(d_in,)``
    gives the textbook ``(d_out, d_in)`` matrix.

    The computation is vectorized over the batch with ``torch.func.vmap(jacrev(...))``;
    functions that vmap cannot trace (``.item()``, data-dependent Python branches, in-place
    updates of buffers) fall back, with a warning, to a loop of
    ``torch.autograd.functional.jacobian``, which gives the same numbers, more slowly; an
    allocation failure is raised, not retried that way. Cost: one batched reverse pass per
    output coordinate, O(d_out) passes in all, vectorized over chunks of rows whose
    Jacobians hold about 4 million numbers (so memory stays flat in the number of rows:
    6 rows at a time for d = 784). A module (or a module's method, such as
    a layer's ``inverse``; not a lambda or a ``functools.partial``) runs in eval mode, as
    :func:`~exactflow.check_transform` runs it: in training mode batch normalization would
    couple the rows (and update its running statistics); dropout is off then, with
    ``create_graph`` too.

    Autograd sees only what is computed with tracked operations: a ``.detach()``,
    ``.item()`` or ``torch.no_grad()`` block inside ``fn`` hides that dependence from the
    result (:func:`autograd_gap` compares with finite differences, as
    :func:`~exactflow.check_transform` does in float64).

    Args:
        fn: the map; called as ``fn(x)`` or, with a context, ``fn(x, context)``.
        x: the points, ``(batch, d_in)`` or ``(d_in,)``.
        context: optional ``(batch, c)`` tensor passed row by row alongside ``x``.
        create_graph: as in ``torch.autograd.functional.jacobian``: by default the result
            is a constant (no graph back to ``fn``'s parameters is recorded); ``True``
            makes it differentiable with respect to the parameters, ``x`` and ``context``.

    Example:
        >>> import torch, exactflow as ef
        >>> f = lambda x: torch.stack([2 * x[..., 0], x[..., 0] ** 2 + 3 * x[..., 1]], -1)
        >>> ef.jacobian(f, torch.tensor([4.0, 1.0]))
        tensor([[2., 0.],
                [8., 3.]])
    """
    if isinstance(fn, nn.Module) and isinstance(getattr(fn, "transform", None), nn.Module) \
            and hasattr(fn, "base"):  # (a flow: calling it gives log p(x), one number a row)
        raise TypeError(
            f"jacobian of a {type(fn).__name__}: calling a flow gives its log-density, one "
            "number per row; the map x -> z is its transform: jacobian(flow.transform, x[, "
            "flow.encode_context(context)])")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 1:
        ctx = None if context is None else context.reshape(1, -1)
        return jacobian(fn, x.unsqueeze(0), ctx, create_graph=create_graph)[0]
    if x.dim() != 2:
        raise ValueError(
            f"x must have shape (batch, features) or (features,), got {tuple(x.shape)}"
        )
    if context is not None and (context.dim() != 2 or context.shape[0] != x.shape[0]):
        raise ValueError(
            f"context must have shape ({x.shape[0]}, context_features), got {tuple(context.shape)}"
        )

    if context is None:

        def row(xi: Tensor) -> Tensor:
            return _first(fn(xi.unsqueeze(0))).squeeze(0)

        args: tuple[Tensor, ...] = (x,)
    else:

        def row(xi: Tensor, ci: Tensor) -> Tensor:  # type: ignore[misc]
            return _first(fn(xi.unsqueeze(0), ci.unsqueeze(0))).squeeze(0)

        args = (x, context)
    if not create_graph:
        args = tuple(a.detach() for a in args)
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    # (rows one by one: in training mode batch statistics would couple them)
    with in_eval_mode(owner) if isinstance(owner, nn.Module) else contextlib.nullcontext():
        try:
            # Outside no_grad, the result would also carry a graph back to every parameter
            # of fn; jacrev differentiates with respect to x either way.
            with contextlib.nullcontext() if create_graph else torch.no_grad():
                one = _first(fn(x[:1]) if context is None else fn(x[:1], context[:1]))
                chunk = max(1, _CHUNK_NUMBERS // max(1, one.shape[-1] * x.shape[-1]))
                return torch.func.vmap(torch.func.jacrev(row, argnums=0),
                                       chunk_size=chunk if chunk < x.shape[0] else None)(*args)
        except Exception as err:  # noqa: BLE001 - a tracing failure falls back to the loop
            if _out_of_memory(err):
                raise
            looped = _jacobian_loop(row, args, create_graph)  # (its own error, if any,
            # is the map's: raised without a word of vmap)
            warnings.warn(f"jacobian: torch.func.vmap could not trace the map "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                          f"); computed it row by row instead (the same numbers, slower)",
                          RuntimeWarning, stacklevel=2)
            return looped


def _jacobian_loop(
    row: Callable[..., Tensor], args: tuple[Tensor, ...], create_graph: bool
) -> Tensor:
    rows = []
    for i in range(args[0].shape[0]):
        rest = tuple(a[i] for a in args[1:])
        rows.append(
            torch.autograd.functional.jacobian(
                lambda xi, rest=rest: row(xi, *rest), args[0][i], create_graph=create_graph
            )
        )
    return torch.stack(rows)


def _slogabsdet(matrices: Tensor) -> Tensor:
    """``log|det A|`` for a batch of square matrices, robust to the batched-LU defect."""
    d = matrices.shape[-1]
    if d <= _BATCHED_SLOGDET_MAX or matrices.shape[0] <= 1:
        return torch.linalg.slogdet(matrices)[1]
    return torch.stack([torch.linalg.slogdet(m)[1] for m in matrices])


def log_abs_det_jacobian(
    fn: Callable[..., Tensor | tuple[Tensor, ...]],
    x: Tensor,
    context: Tensor | None = None,
    *,
    create_graph: bool = False,
) -> Tensor:
    """``log|det J_fn(x)|`` for each row, by autograd and LU factorization.

    Returns shape ``(batch,)`` (a scalar for a single vector). A singular Jacobian gives
    ``-inf``. Matrices larger than 96 x 96 are factored one at a time: batched LU on some
    CPU builds of torch returns wrong log-determinants for large matrices. ``context`` and
    ``create_graph`` are as in :func:`jacobian`. Cost: O(d^3) per row.

    Example:
        >>> import torch, exactflow as ef
        >>> f = lambda x: torch.stack([2 * x[..., 0], x[..., 0] ** 2 + 3 * x[..., 1]], -1)
        >>> round(float(ef.log_abs_det_jacobian(f, torch.tensor([4.0, 1.0]))), 4)  # log 6
        1.7918
    """
    jac = jacobian(fn, x, context, create_graph=create_graph)
    if jac.shape[-1] != jac.shape[-2]:
        raise ValueError(f"the Jacobian is not square: {tuple(jac.shape[-2:])}")
    if jac.dim() == 2:
        return _slogabsdet(jac.unsqueeze(0))[0]
    return _slogabsdet(jac)


def autograd_gap(
    fn: Callable[..., Tensor | tuple[Tensor, ...]],
    x: Tensor,
    jac: Tensor,
    context: Tensor | None = None,
    *,
    step: float = 1e-8,
    seed: int = 0,
) -> Tensor:
    """How far the autograd Jacobian ``jac`` of ``fn`` at the rows ``x`` is from finite
    differences, per row: along a random unit direction ``v`` scaled by each element's
    size (``u_ij = v_ij max(|x_ij|, |x_j|_median / 1000)``: a column in units of 1e-6
    beside one in units of 1e6 gets steps of its own size, a far row does not coarsen the
    others', an element near 0 gets a step of its column's scale), the smallest of the
    forward, backward and central difference's gaps to ``J u``, relative to ``1 + |J u|``
    (largest over the outputs).

    Autograd sees only what is computed with tracked operations: a ``.detach()``, an
    ``.item()`` or a ``torch.no_grad()`` block in the map hides a dependence from it, and
    every brute force built on it (:func:`jacobian`, :func:`log_abs_det_jacobian`) then
    agrees with a log-det that leaves that dependence out. Differences see it. One side
    suffices where the other crosses a kink (a ReLU, a spline's knot), so a gap on both
    sides is the map's, not the kink's. For float64 maps: ``step`` (relative to the
    columns' scale) is set for float64's rounding; gaps of 1e-4 and more are not rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    size = x.detach().abs()
    floor = size.median(dim=0, keepdim=True).values / 1000
    floor = torch.where(floor > 0, floor, torch.ones_like(floor))  # (mostly zeros: 1)
    v = v * torch.maximum(size, floor)
    h = step
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    args = () if context is None else (context,)
    with torch.no_grad(), (in_eval_mode(owner) if isinstance(owner, nn.Module)
                           else contextlib.nullcontext()):
        here, ahead, behind = (_first(fn(p, *args)) for p in (x, x + h * v, x - h * v))
    slope = (jac @ v.unsqueeze(-1)).squeeze(-1)
    scale = 1 + slope.abs()
    gaps = [(((a - b) / (h * span) - slope).abs() / scale).amax(dim=1)
            for a, b, span in ((ahead, here, 1), (here, behind, 1), (ahead, behind, 2))]
    return torch.stack(gaps).amin(dim=0)


def rounding_note(jac: Tensor, bad: Tensor, x: Tensor | None, z: Tensor | None,
                  tolerance: float) -> str:
    """What :func:`~exactflow.check_transform` adds to a failure: how ill-conditioned the
    Jacobian is at the failed rows ``bad``, when rounding alone could explain errors of the
    tolerance's size (else ""): for ``log|det|``, ``eps cond(J)``; for values that go
    through the inverse (points ``x``, outputs ``z``), ``eps (cond(J) |x| + |z| /
    sigma_min(J))``."""
    if not bool(bad.any()) or jac.shape[-1] != jac.shape[-2] or not bool(
            torch.isfinite(jac[bad]).all()):  # (NaN: a layer that divides by batch spread)
        return ""
    values = torch.linalg.svdvals(jac[bad])
    cond = float((values[:, 0] / values[:, -1]).max())
    smallest = float(values[:, -1].min())
    rounding = cond
    if x is not None and z is not None:
        rows = bad.nonzero().reshape(-1)
        rounding = cond * max(float(x[rows].abs().max()), 1.0) + float(
            (z[rows].abs().amax(1) / values[:, -1]).max())
    rounding *= torch.finfo(jac.dtype).eps
    if not math.isfinite(rounding) or rounding < 0.1 * tolerance:
        return ""  # (a singular Jacobian has no condition number to blame)
    return (
        f"; rounding alone can reach about {rounding:.1e} at the failed rows (the "
        f"Jacobian's condition number is up to {cond:.1e}, its smallest singular value down "
        f"to {smallest:.1e}), so this need not be a wrong formula: retry at "
        "better-conditioned points or parameters (smaller weights)"
    )


def parameter_gap(
    fn: Callable[..., tuple[Tensor, Tensor]],
    params: list[Tensor],
    x: Tensor,
    context: Tensor | None = None,
    *,
    step: float = 1e-7,
    seed: int = 0,
    tolerance: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor]:
    """How far the gradient autograd gives for the parameters ``params`` of ``fn`` (a
    layer's ``forward`` or ``inverse``, returning ``(y, log_det)``) at the rows ``x`` is
    from finite differences, row by row.

    Each row's score ``s_i = a_i . y_i + b_i log_det_i``, with random weights ``a`` and
    ``b``, is differentiated along a random unit direction ``v`` of the parameters, by
    autograd (``g_i``) and by differences (forward, backward and central, as
    :func:`autograd_gap` takes them, so that one kink crossed is not a gap), each parameter
    moved by ``step`` or ``step / 100`` times ``1 + |p|`` (its own size: a shift of -1e4
    beside weights of 0.1 gets a step of its own): a row within a step of a
    kink (a radial layer's centre) is smooth at the smaller one or fails alone, where a
    wrong gradient is wrong at both, at every row it reaches. The rows' sum is compared
    first (one backward pass); where it differs by more than ``tolerance`` (relative), row
    by row. Returns the gap of the difference nearest ``g`` relative to ``1 + |g|``, ``g``
    and that difference: for the sum, shape ``(1,)``, where it agrees; else one per row.
    Training follows the autograd gradient, which a parameter ``.detach()``-ed in a
    log-det, or a hand-written backward with a mistake, makes wrong while every value stays
    right. Float64 maps; the parameters are restored exactly.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    v = [draw(p) for p in params]
    norm = math.sqrt(sum(float((u * u).sum()) for u in v)) or 1.0
    v = [u / norm * (1 + p.detach().abs()) for u, p in zip(v, params, strict=True)]
    args = () if context is None else (context,)
    with torch.no_grad():
        y, ladj = fn(x, *args)
    a, b = draw(y), draw(ladj)

    def score(y: Tensor, ladj: Tensor) -> Tensor:
        return (a * y).reshape(len(y), -1).sum(1) + b * ladj

    kept = [p.detach().clone() for p in params]
    values = {}
    try:  # (the differences first: the recorded pass after, on the parameters restored)
        with torch.no_grad():
            for t in (0, 1, -1, 0.01, -0.01):
                for p, k, u in zip(params, kept, v, strict=True):
                    p.copy_(k + t * step * u)  # (u carries the parameter's size)
                values[t] = score(*fn(x, *args))
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept, strict=True):
                p.copy_(k)
    rows = score(*fn(x, *args))

    def along_v(s: Tensor) -> float:
        grads = torch.autograd.grad(s, params, retain_graph=True, allow_unused=True)
        return sum(float((d * u).sum()) for d, u in zip(grads, v, strict=True) if d is not None)

    g = rows.new_tensor([along_v(rows.sum())])  # (the rows' sum first: one pass)
    h = step

    def nearest(values: dict[float, Tensor], g: Tensor) -> Tensor:
        diffs = torch.stack([diff for t in (1, 0.01) for diff in (
            (values[t] - values[0]) / (t * h), (values[0] - values[-t]) / (t * h),
            (values[t] - values[-t]) / (2 * t * h))])
        return diffs.gather(0, (diffs - g).abs().argmin(0, keepdim=True))[0]

    total = nearest({t: value.sum(0, keepdim=True) for t, value in values.items()}, g)
    if (total - g).abs() / (1 + g.abs()) <= tolerance:
        return (total - g).abs() / (1 + g.abs()), g, total
    g = rows.new_tensor([along_v(rows[i]) for i in range(len(rows))])  # (row by row)
    by_rows = nearest(values, g)
    return (by_rows - g).abs() / (1 + g.abs()), g, by_rows
