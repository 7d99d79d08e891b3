"""Ground truth: dense Jacobians by autograd and the checker that proves a transform right.

Nothing here trusts a transform's own log-determinant. :func:`jacobian` differentiates the
map itself (vectorized with ``torch.func``), :func:`log_abs_det_jacobian` takes
``log|det J|`` by LU factorization (``torch.linalg.slogdet``, never the raw determinant, so
``d = 1000`` with entries of size 10 does not overflow), and :func:`check_transform`
compares the two and checks the inverse.

These are O(d^3) per sample: use them to verify, not to train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .core import Transform

__all__ = ["jacobian", "log_abs_det_jacobian", "check_transform", "CheckError", "CheckReport"]

# Batched LU/slogdet on the CPU has been seen to return wrong log-determinants for
# matrices of this size and above (oneMKL, after torch.set_num_threads), silently.
# Unbatched calls are right, so large matrices are factored one at a time.
_BATCHED_SLOGDET_MAX = 96


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
    updates of buffers) fall back to a loop of ``torch.autograd.functional.jacobian``, which
    gives the same numbers, more slowly. Cost: one batched reverse pass per output
    coordinate, O(d_out) passes in all, vectorized.

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

    try:
        # Outside no_grad, the result would also carry a graph back to every parameter of
        # fn; jacrev differentiates with respect to x either way.
        with contextlib.nullcontext() if create_graph else torch.no_grad():
            return torch.func.vmap(torch.func.jacrev(row, argnums=0))(*args)
    except Exception:  # noqa: BLE001 - any tracing failure falls back to the exact loop
        return _jacobian_loop(row, args, create_graph)


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


class CheckError(AssertionError):
    """Raised by :func:`check_transform` when a transform fails a check.

    The message names every failed check and the size of its error; ``report`` holds the
    full :class:`CheckReport`.
    """

    def __init__(self, message: str, report: CheckReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class CheckReport:
    """What :func:`check_transform` measured.

    Attributes:
        name: the transform's class name.
        dtype: the dtype the check ran in.
        batch, features: the shape of the input.
        errors: the largest error of each check (``log_det``, ``inverse_log_det``,
            ``round_trip``, ``output_shape``...), in absolute units.
        tolerances: the tolerance each error was held to.
        failures: a readable line for each check that failed.
    """

    name: str
    dtype: torch.dtype
    batch: int
    features: int
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.failures

    def __str__(self) -> str:
        lines = [
            f"check_transform({self.name}) on {self.batch} x {self.features} "
            f"{str(self.dtype).replace('torch.', '')}: {'OK' if self.ok else 'FAILED'}"
        ]
        failed = {f.split(":", 1)[0] for f in self.failures}
        for key, err in self.errors.items():
            tol = self.tolerances.get(key)
            verdict = "FAIL" if key in failed else "ok"
            tol_s = "" if tol is None else f" (tolerance {tol:.1e})"
            lines.append(f"  {key:<16} max error {err:.3e}{tol_s}  {verdict}")
        lines.extend(f"  - {f}" for f in self.failures)
        return "\n".join(lines)


_DEFAULT_TOL = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (2e-3, 2e-3),
    torch.float16: (5e-2, 5e-2),
    torch.bfloat16: (1e-1, 1e-1),
}


def _max_abs(t: Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    v = t.detach().abs().max()
    return float("inf") if not torch.isfinite(v) else float(v)


def check_transform(
    transform: Transform,
    x: Tensor,
    context: Tensor | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    check_inverse: bool = True,
    raise_on_failure: bool = True,
) -> CheckReport:
    """Prove a transform right at the points ``x``, against brute force.

    Nothing the transform says about itself is trusted. The checks, each named in the report:

    1. ``output_shape``, ``log_det_shape``, ``finite``: ``forward`` returns ``z`` shaped
       like ``x`` and a log-det of shape ``(batch,)``, with no NaN or inf;
    2. ``log_det``: the transform's own ``log|det dz/dx|`` equals ``log|det J|`` of the
       dense autograd Jacobian of ``forward`` (:func:`log_abs_det_jacobian`), which must
       be finite: a singular Jacobian (a map that is not invertible, or whose output
       autograd cannot trace to its input) fails;
    3. ``round_trip``: ``inverse(forward(x))`` gives back ``x``;
    4. ``inverse_log_det``: the inverse's log-det is minus the forward one.

    Each error is judged elementwise: it passes when ``|error| <= atol + rtol * |truth|``.
    The tolerances default by dtype (float64: 1e-7, float32: 2e-3). Prove a transform in
    float64 (``transform.double()``, ``x.double()``) at random parameters, not only at its
    initialization, where many layers are the identity; float32 checks catch gross errors.

    Rows are independent samples, so the checks run in eval mode, the map that scores
    rows (``BatchNorm`` by its running statistics, ``ActNorm`` without initializing on the
    check's points); the transform's modes, parameters and buffers are left as they were.
    Cost: a dense Jacobian and an LU factorization per row, O(batch d^3); a batch of a few
    rows is enough.

    Args:
        transform: any :class:`Transform`, a user's own subclass included (conditional
            ones too: pass ``context``).
        x: points in the transform's domain, ``(batch, features)``.
        context: ``(batch, context_features)``, passed to every call.
        atol, rtol: override the dtype's default tolerances.
        check_inverse: ``False`` skips checks 3 and 4 (transforms without an inverse).
        raise_on_failure: raise :class:`CheckError` (default), or only return the report.

    Returns:
        A :class:`CheckReport`: ``report.ok``, the largest error of each check
        (``report.errors``), a line per failure (``report.failures``); ``print(report)``
        shows them all.

    Raises:
        CheckError: a check failed; the message names each failed check and the size of
            its error, and ``err.report`` holds the report.
        TypeError: ``transform`` is not a :class:`Transform` (a flow: check ``flow.transform``).
        ValueError: ``x`` is not a floating-point ``(batch, features)`` tensor or has no
            rows, or ``x`` or ``context`` is not in the dtype of the transform's parameters.
        NotImplementedError: the transform has no inverse and ``check_inverse`` is True.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.transforms.LULinear(3).double()
        >>> with torch.no_grad():  # random parameters, away from the identity
        ...     _ = t.lower.normal_(), t.upper.normal_(), t.log_diag.normal_()
        >>> print(ef.check_transform(t, torch.randn(8, 3, dtype=torch.float64)))
        ... # doctest: +ELLIPSIS
        check_transform(LULinear) on 8 x 3 float64: OK
          log_det          max error ... ok
          round_trip       max error ... ok
          inverse_log_det  max error ... ok

        A map ``z = A x`` whose log-det is read off the diagonal of ``A`` fails (here
        ``A = [[2, 1], [1, 1]]``: ``det A = 1``, but the diagonal says ``log 2``):

        >>> class Mix(ef.Transform):
        ...     def forward(self, x, context=None):
        ...         z = torch.stack([2 * x[:, 0] + x[:, 1], x[:, 0] + x[:, 1]], 1)
        ...         return z, x.new_full(x.shape[:1], 0.6931471805599453)
        ...     def inverse(self, z, context=None):
        ...         x = torch.stack([z[:, 0] - z[:, 1], 2 * z[:, 1] - z[:, 0]], 1)
        ...         return x, z.new_full(z.shape[:1], -0.6931471805599453)
        >>> ef.check_transform(Mix(), torch.randn(4, 2, dtype=torch.float64))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        exactflow.groundtruth.CheckError: check_transform(Mix) on 4 x 2 float64: FAILED
          log_det          max error 6.931e-01 (tolerance 1.0e-07)  FAIL
        ...
          - log_det: max error 6.931e-01 exceeds tolerance (atol=1.0e-07, rtol=1.0e-07)
    """
    if not isinstance(transform, Transform):
        flow = hasattr(transform, "transform") and isinstance(transform.transform, Transform)
        raise TypeError(
            f"check_transform checks an exactflow Transform, got {type(transform).__name__}"
            + ("; for a flow, check its transform: check_transform(flow.transform, x)"
               if flow else "; subclass ef.Transform (forward and inverse return the output "
               "and a log-det per row)")
        )
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(
            f"x must be a tensor of shape (batch, features), got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point (float64 to prove a layer), got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x has no rows: a check on an empty batch proves nothing")
    own = next((p for p in transform.parameters() if p.is_floating_point()), None)
    for name, value in (("x", x), ("context", context)):
        if own is not None and isinstance(value, Tensor) and value.dtype != own.dtype:
            raise ValueError(
                f"{name} is {value.dtype} but {type(transform).__name__}'s parameters are "
                f"{own.dtype}: check them in one dtype (float64: transform.double(), "
                "x.double() and context.double())"
            )
    with _unchanged(transform):  # eval mode: the map that scores rows, one row at a time
        report = _run_checks(transform, x, context, atol, rtol, check_inverse)
    return _finish(report, raise_on_failure)


def _run_checks(transform: Transform, x: Tensor, context: Tensor | None, atol: float | None,
                rtol: float | None, check_inverse: bool) -> CheckReport:
    default_atol, default_rtol = _DEFAULT_TOL.get(x.dtype, (1e-5, 1e-5))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    report = CheckReport(
        name=type(transform).__name__, dtype=x.dtype, batch=x.shape[0], features=x.shape[1]
    )

    def fail(msg: str) -> None:
        report.failures.append(msg)

    def within(key: str, err: Tensor, scale: Tensor) -> None:
        # Elementwise |err| <= atol + rtol * |truth|; a NaN error fails (NaN <= b is False).
        bound = atol + rtol * scale.detach().abs()
        report.errors[key] = _max_abs(err)
        report.tolerances[key] = atol + rtol * _max_abs(scale)
        if not bool((err.detach().abs() <= bound).all()):
            fail(
                f"{key}: max error {report.errors[key]:.3e} exceeds tolerance "
                f"(atol={atol:.1e}, rtol={rtol:.1e})"
            )

    with torch.no_grad():
        z, ladj = transform(x, context)
    if z.shape != x.shape:
        fail(f"output_shape: forward returned {tuple(z.shape)} for input {tuple(x.shape)}")
    if ladj.shape != x.shape[:1]:
        fail(f"log_det_shape: forward returned log-det of shape {tuple(ladj.shape)}, "
             f"expected ({x.shape[0]},)")
    bad_z = int((~torch.isfinite(z)).sum())
    bad_ladj = int((~torch.isfinite(ladj)).sum())
    if bad_z or bad_ladj:
        fail(f"finite: forward returned NaN or inf in {bad_z} of {z.numel()} outputs and "
             f"{bad_ladj} of {ladj.numel()} log-dets")
    if report.failures:
        return report

    truth = log_abs_det_jacobian(transform, x, context).detach()
    singular = int(torch.isneginf(truth).sum())
    undefined = int(torch.isnan(truth).sum())
    if singular or undefined:
        # An infinite truth would make the relative tolerance infinite too.
        report.errors["log_det"] = float("inf")
        report.tolerances["log_det"] = atol
        if singular:
            fail(
                f"log_det: the autograd Jacobian is singular in {singular} of "
                f"{truth.numel()} rows (log|det J| = -inf): the map is not invertible there, "
                f"or its output does not depend on the input through autograd (detach, "
                f"round, an integer cast...)"
            )
        if undefined:
            fail(
                f"log_det: the autograd Jacobian is NaN in {undefined} of {truth.numel()} "
                f"rows: the map is not differentiable there (sqrt or abs at 0, a NaN "
                f"derivative)"
            )
    else:
        within("log_det", ladj.reshape(-1) - truth, truth)

    if check_inverse:
        with torch.no_grad():
            try:
                x_back, ladj_inv = transform.inverse(z, context)
            except NotImplementedError as err:
                said = f" ({err})" if str(err) and "has no inverse" not in str(err) else ""
                raise NotImplementedError(
                    f"{report.name} has no inverse{said}: pass check_inverse=False to check "
                    f"the forward direction only"
                ) from err
        if x_back.shape != x.shape or ladj_inv.shape != x.shape[:1]:
            fail(f"inverse_shape: inverse returned {tuple(x_back.shape)} and log-det "
                 f"{tuple(ladj_inv.shape)}")
        elif not bool(torch.isfinite(x_back).all()) or not bool(torch.isfinite(ladj_inv).all()):
            fail("inverse_finite: inverse returned NaN or inf")
        else:
            within("round_trip", x_back - x, x)
            within("inverse_log_det", ladj_inv + ladj, ladj)
    return report


@contextlib.contextmanager
def _unchanged(transform: Transform) -> Iterator[None]:
    """``transform`` in eval mode inside the block; its modes, parameters and buffers as
    they were after it (a layer of the user's may change its state in a call)."""
    modes = [(m, m.training) for m in transform.modules()]
    saved = {k: v.detach().clone() for k, v in transform.state_dict().items()}
    transform.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for key, value in transform.state_dict().items():
                if key in saved:
                    value.copy_(saved[key])


def _finish(report: CheckReport, raise_on_failure: bool) -> CheckReport:
    if raise_on_failure and not report.ok:
        raise CheckError(str(report), report)
    return report
