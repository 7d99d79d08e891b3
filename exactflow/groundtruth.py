"""Ground truth: the checker that proves a transform right.

Nothing here trusts a transform's own log-determinant. :func:`check_transform` compares it
with the brute force of :mod:`~exactflow.jacobians` (the dense autograd Jacobian of the map
itself and its ``log|det|`` by LU factorization, re-exported here), and checks the inverse,
the rows' independence and the agreement of the recorded and unrecorded code paths.

These are O(d^3) per sample: use them to verify, not to train.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checkcalls import (
    ROWS_ALONE,
    call,
    changed_state,
    close,
    identity_layers,
    max_abs,
    parameter_failures,
    rows_and_recording,
    state_of,
    unchanged,
)
from .core import Transform
from .jacobians import (
    _slogabsdet,
    autograd_gap,
    jacobian,
    log_abs_det_jacobian,
    rounding_note,
)

__all__ = ["jacobian", "log_abs_det_jacobian", "check_transform", "CheckError", "CheckReport"]


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
        tolerances: the tolerance of each check at its element nearest to failing (or
            furthest past it): ``atol + rtol * |truth|`` there.
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
        if self.failures and self.dtype != torch.float64:
            eps = torch.finfo(self.dtype).eps if self.dtype.is_floating_point else 1.0
            lines.append(f"  ({str(self.dtype).replace('torch.', '')} rounds at {eps:.0e} of a "
                         "value, float64 at 2e-16: rerun in float64 (transform.double(), "
                         "x.double()) to tell rounding from a mistake)")
        return "\n".join(lines)


#: The ``autograd`` check's tolerance: finite differences in float64 reach about 1e-4 of
#: ``1 + |J v|`` on perturbed spline, MADE and coupling flows (rounding, kinks).
_FD_TOL = 1e-3

_DEFAULT_TOL = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (2e-3, 2e-3),
    torch.float16: (5e-2, 5e-2),
    torch.bfloat16: (1e-1, 1e-1),
}


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

    1. ``in_place``, ``output_shape``, ``log_det_shape``, ``dtype``, ``finite``:
       ``forward`` leaves its input as it was and returns ``z`` shaped like ``x`` and a
       log-det of shape ``(batch,)``, both in ``x``'s dtype, with no NaN or inf;
       ``repeat``: a second call on the same rows gives the same values (a map that
       changes from call to call, through a counter or random numbers, fails here alone);
    2. ``log_det``: the transform's own ``log|det dz/dx|`` equals ``log|det J|`` of the
       dense autograd Jacobian of ``forward`` (:func:`log_abs_det_jacobian`), which must
       be finite: a singular Jacobian (a map that is not invertible, or whose output
       autograd cannot trace to its input) fails;
    3. ``round_trip``: ``inverse(forward(x))`` gives back ``x`` (an inverse that refuses
       ``z`` fails here);
    4. ``inverse_log_det``: the inverse's log-det is minus ``log|det J|`` (minus the
       forward's own where ``log|det J|`` is not finite), so a wrong formula in one
       direction fails that direction's check alone;
    5. ``rows``: each row run alone (the first 16) gives what it gave in the batch, in
       both directions (a row's density must not depend on the rows scored with it);
    6. ``recording``: both directions give the same values while autograd records, as
       in training, as without it, as in scoring (a layer with a fast path for each
       must agree with itself);
    7. ``autograd`` (float64): the autograd Jacobian agrees with finite differences along a
       random direction at the first 16 rows, so that a ``.detach()`` hiding part of the
       map from autograd cannot make checks 2 and 4 agree with a log-det that leaves it out;
    8. ``parameters`` (float64, after every other check passed): the autograd gradient of
       each direction's output and log-det with respect to the trainable parameters agrees
       with finite differences along a random direction, row by row at the first 16 rows
       (a parameter ``.detach()``-ed in a log-det, or a hand-written backward with a
       mistake, leaves every value right and training's gradient wrong). One row alone may
       differ: a kink within a step of it (a radial layer's centre).

    A failure where the Jacobian is ill-conditioned says how large an error rounding alone
    can make there; a log-det that is the true one with its sign flipped says so. A
    transform that is the identity at the points (within the tolerances) warns: a check
    there cannot tell a right log-det formula from a wrong one.

    Each error is judged elementwise: it passes when ``|error| <= atol + rtol * |truth|``
    (the report: each check's largest error, and that bound at its point), tolerances by
    dtype (float64: 1e-7, float32: 2e-3). Prove a transform in float64 at random
    parameters, not only at its start (often the identity); float32 catches gross errors
    only (its tolerance grows with ``|log det|``: 2.4 nats at a log-det of 1,200).

    Rows are independent samples, so the checks run in eval mode, the map that scores
    rows (``BatchNorm`` by its running statistics, ``ActNorm`` without initializing on the
    check's points); the transform's modes, parameters and buffers are left as they were.
    Cost: a dense Jacobian and an LU per row, O(batch d^3): a few rows are enough.

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
        (``report.errors``), a line per failure (``report.failures``); ``print`` it.

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
        ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        check_transform(LULinear) on 8 x 3 float64: OK
          log_det          max error ... ok
          autograd         max error ... ok
          round_trip       max error ... ok
          inverse_log_det  max error ... ok
          rows             max error ... ok
          recording        max error ... ok
          parameters       max error ... ok

        A map ``z = A x`` whose log-det is read off the diagonal of ``A`` fails both ways
        (here ``A = [[2, 1], [1, 1]]``: ``det A = 1``, but the diagonal says ``log 2``):

        >>> class Mix(ef.Transform):
        ...     def forward(self, x, context=None):
        ...         z = torch.stack([2 * x[:, 0] + x[:, 1], x[:, 0] + x[:, 1]], 1)
        ...         return z, x.new_full(x.shape[:1], 0.6931471805599453)
        ...     def inverse(self, z, context=None):
        ...         x = torch.stack([z[:, 0] - z[:, 1], 2 * z[:, 1] - z[:, 0]], 1)
        ...         return x, z.new_full(z.shape[:1], -0.6931471805599453)
        >>> ef.check_transform(Mix(), torch.randn(4, 2, dtype=torch.float64))
        ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
            ...
        exactflow.groundtruth.CheckError: check_transform(Mix) on 4 x 2 float64: FAILED
          log_det          max error 6.931e-01 (tolerance 1.0e-07)  FAIL
        ...
          - log_det: max error 6.931e-01 exceeds tolerance (atol=1.0e-07, rtol=1.0e-07) (row 0:
        the layer's 0.693147, autograd's 0)
          - inverse_log_det: max error 6.931e-01 exceeds tolerance (atol=1.0e-07, rtol=1.0e-07)
        (row 0: the layer's -0.693147, autograd's 0)
    """
    if not isinstance(transform, Transform):
        flow = hasattr(transform, "transform") and isinstance(transform.transform, Transform)
        raise TypeError(
            f"check_transform checks an exactflow Transform, got {type(transform).__name__}"
            + ("; for a flow, check its transform: check_transform(flow.transform, x[, "
               "flow.encode_context(context)])" if flow else "; subclass ef.Transform "
               "(forward and inverse return the output and a log-det per row)")
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
    with unchanged(transform):  # eval mode: the map that scores rows, one row at a time
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

    def within(key: str, err: Tensor, scale: Tensor) -> Tensor:
        # Elementwise |err| <= atol + rtol * |truth|; a NaN error fails (NaN <= b is False).
        # Returns where it failed.
        bound = atol + rtol * scale.detach().abs()
        bad = ~(err.detach().abs() <= bound)
        report.errors[key] = max_abs(err)
        # The tolerance shown: at the element nearest to failing (or furthest past it).
        ratio = torch.nan_to_num(err.detach().abs() / bound, nan=math.inf).reshape(-1)
        report.tolerances[key] = float(bound.reshape(-1)[ratio.argmax()]) if ratio.numel() \
            else atol
        if bool(bad.any()):
            fail(f"{key}: max error {report.errors[key]:.3e} exceeds tolerance "
                 f"(atol={atol:.1e}, rtol={rtol:.1e})")
        return bad

    z, ladj = call(transform.forward, x, context, record=False)
    if z is None:
        fail(f"in_place: forward changed its input in place ({ladj}): inside a Flow it would "
             "change the caller's data; compute the output out of place")
        return report
    kept = state_of(transform)
    again, ladj_again = call(transform.forward, x, context, record=False)
    if again is not None and again.shape == z.shape and ladj_again.shape == ladj.shape and not (
            close(again, z, atol, rtol) and close(ladj_again, ladj, atol, rtol)):
        moved = changed_state(transform, kept)
        drift = max(max_abs(again - z), max_abs(ladj_again - ladj))
        report.errors["repeat"], report.tolerances["repeat"] = drift, atol
        fail(f"repeat: forward gave other values when called again on the same rows (by up "
             f"to {drift:.3e}){'; a call changed its state: ' + moved if moved else ''}: the map "
             "changes from call to call (a counter, a cache, random numbers), so no check of "
             "it holds; a layer's result must follow from its input, context, parameters and "
             "buffers (the checks run in eval mode: updates made in training mode only, as "
             "BatchNorm's running statistics, are fine)")
        return report
    if z.shape != x.shape:
        fail(f"output_shape: forward returned {tuple(z.shape)} for input {tuple(x.shape)}")
    if ladj.shape != x.shape[:1]:
        fail(f"log_det_shape: forward returned log-det of shape {tuple(ladj.shape)}, "
             f"expected ({x.shape[0]},)")
    if z.dtype != x.dtype or ladj.dtype != x.dtype:
        fail(f"dtype: forward returned {z.dtype} values and a {ladj.dtype} log-det for "
             f"{x.dtype} input: a flow keeps its dtype through its layers (in float64 a "
             "float32 layer loses its precision; in float32 a float64 one changes the output)")
    bad_z = int((~torch.isfinite(z)).sum())
    bad_ladj = int((~torch.isfinite(ladj)).sum())
    if bad_z or bad_ladj:
        fail(f"finite: forward returned NaN or inf in {bad_z} of {z.numel()} outputs and "
             f"{bad_ladj} of {ladj.numel()} log-dets")
    if report.failures:
        return report
    # (up to the tolerance: sinh(asinh(x)) is x only up to rounding)
    if bool(((z - x).abs() <= atol + rtol * x.abs()).all()) and bool(
            (ladj.abs() <= atol).all()):
        cure = ("check it at random parameters too, in float64 (t.double(); with "
                "torch.no_grad(): for p in t.parameters(): p.add_(0.3 * torch.randn_like(p)))"
                if any(
                    True for _ in transform.parameters()) else "it has no parameters: check "
                "it with other values in its buffers, or at other points")
        warnings.warn(
            f"check_transform({report.name}): the transform is the identity at these "
            f"parameters and points, so the check cannot tell a right log-det from a wrong "
            f"one; {cure}", UserWarning, stacklevel=3,
        )
    elif plain := identity_layers(transform, x, context, atol, rtol):
        one = len(plain) == 1
        warnings.warn(
            f"check_transform({report.name}): its layer{'' if one else 's'} {', '.join(plain)} "
            f"{'is' if one else 'are'} the identity at the points {'it' if one else 'they'} "
            f"receive{'s' if one else ''}, where a wrong log-det formula cannot show; check "
            f"{'it' if one else 'them'} alone at random parameters too", UserWarning,
            stacklevel=3)
    extra: dict[str, list[tuple[str, Tensor, Tensor]]] = {"rows": [], "recording": []}
    rows_and_recording(transform.forward, x, context, z, ladj, extra, "forward")

    jac = jacobian(transform, x, context).detach()
    truth = _slogabsdet(jac)
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
        bad = within("log_det", ladj.reshape(-1) - truth, truth)
        _add(report, _values_at(bad, ladj.reshape(-1), truth))
        _add(report, rounding_note(jac, bad, None, None, _bound_at(bad, truth, atol, rtol)))
        _add(report, _flipped(ladj.reshape(-1), -truth, bad, atol, rtol, "forward",
                              "log|det dz/dx| (data -> latent)"))
    if x.dtype == torch.float64 and jac.shape[-1] == jac.shape[-2]:  # (differences: float64)
        n = min(x.shape[0], ROWS_ALONE)
        try:
            gap = autograd_gap(transform, x[:n], jac[:n], None if context is None else context[:n])
        except ValueError:  # (a step beyond the domain: Logit at 1e-9 from 0)
            gap = None
        if gap is not None:
            report.errors["autograd"], report.tolerances["autograd"] = max_abs(gap), _FD_TOL
            if not bool((gap <= _FD_TOL).all()):
                fail(f"autograd: the autograd Jacobian differs from finite differences by up "
                     f"to {max_abs(gap):.1e} (relative): part of the output does not reach "
                     "autograd (a .detach(), .item() or no_grad block), so the brute force "
                     "cannot see that part of the Jacobian; compute it with tracked operations")

    if check_inverse:
        try:
            x_back, ladj_inv = call(transform.inverse, z, context, record=False)
        except NotImplementedError as err:
            said = f" ({err})" if str(err) and "has no inverse" not in str(err) else ""
            raise NotImplementedError(
                f"{report.name} has no inverse{said}: pass check_inverse=False to check "
                f"the forward direction only"
            ) from err
        except ValueError as err:  # (a domain check of the inverse: Sigmoid's at 1.0)
            fail(f"round_trip: the inverse refused forward's output: {err}")
            return report
        if x_back is None:
            fail(f"in_place: inverse changed its input in place ({ladj_inv}): inside a Flow "
                 "it would change the latent points it is given; compute the output out of "
                 "place")
        elif x_back.shape != x.shape or ladj_inv.shape != x.shape[:1]:
            fail(f"inverse_shape: inverse returned {tuple(x_back.shape)} and log-det "
                 f"{tuple(ladj_inv.shape)}")
        elif not bool(torch.isfinite(x_back).all()) or not bool(torch.isfinite(ladj_inv).all()):
            fail("inverse_finite: inverse returned NaN or inf")
        else:
            bad = within("round_trip", x_back - x, x)
            _add(report, rounding_note(jac, bad.any(1), x, z, _bound_at(bad, x, atol, rtol)))
            finite = bool(torch.isfinite(truth).all())
            true_fwd = truth if finite else ladj.reshape(-1)  # (a singular Jacobian failed)
            bad = within("inverse_log_det", ladj_inv + true_fwd, true_fwd)
            _add(report, _values_at(bad, ladj_inv, -true_fwd))
            _add(report, rounding_note(jac, bad, x, z, _bound_at(bad, true_fwd, atol, rtol)))
            if finite:
                _add(report, _flipped(ladj_inv, true_fwd, bad, atol, rtol, "inverse",
                                      "log|det dx/dz| = -log|det dz/dx| (latent -> data)"))
            rows_and_recording(transform.inverse, z, context, x_back, ladj_inv, extra,
                                "inverse")
    for key, why in _WHY.items():
        parts = extra[key]
        if not parts:
            continue
        error = torch.stack([e for _, e, _ in parts])  # (directions, rows, d + 1)
        scale = torch.stack([scale for _, _, scale in parts])
        bad = within(key, error, scale)
        failed = [d for (d, _, _), b in zip(parts, bad, strict=True) if bool(b.any())]
        if failed:
            verb = "give" if len(failed) > 1 else "gives"
            rows = torch.zeros(x.shape[0], dtype=torch.bool)
            rows[: bad.shape[1]] = bad.any(-1).any(0).cpu()
            note = rounding_note(jac, rows.to(jac.device), x, z, _bound_at(bad, scale, atol, rtol))
            report.failures[-1] += note + ("; if it fails at such points too" if note else "")
            report.failures[-1] += why.format(" and ".join(failed), verb)
    if report.errors.get("rows", 0.0) > report.tolerances.get("rows", math.inf):
        report.failures = [f + _MIXED if f.startswith(("log_det:", "autograd:")) else f
                           for f in report.failures]
    if x.dtype == torch.float64 and not report.failures:
        found = parameter_failures(transform, x, z, context, check_inverse, _FD_TOL)
        if found is not None:
            report.errors["parameters"], report.tolerances["parameters"] = found[0], _FD_TOL
            report.failures.extend(found[1])
    return report


_MIXED = "; the rows check fails too, and a map that mixes rows has no Jacobian row by row"
_WHY = {
    "rows": ": {} {} a row other values alone than in the batch, so a row's result "
            "depends on the rows computed with it (rows must be mapped independently: no "
            "mixing across dim 0, each context kept with its row)",
    "recording": ": {} {} other values while autograd records (training) than without "
                 "it (scoring): one of its two code paths is wrong",
}


def _bound_at(bad: Tensor, scale: Tensor, atol: float, rtol: float) -> float:
    """The largest tolerance ``atol + rtol |scale|`` among the failed elements."""
    return float((atol + rtol * scale.detach().abs())[bad].max()) if bool(bad.any()) else atol


def _flipped(got: Tensor, opposite: Tensor, bad: Tensor, atol: float, rtol: float,
             direction: str, wanted: str) -> str:
    """The note for a failed log-det that equals ``opposite`` (the true one, sign flipped)
    within the tolerance, else ""."""
    if bool(bad.any()) and bool(((got - opposite).abs() <= atol + rtol * opposite.abs()).all()):
        return (f"; it is the true value with its sign flipped at every row: {direction} "
                f"returns {wanted}")
    return ""


def _values_at(bad: Tensor, got: Tensor, truth: Tensor) -> str:
    """The values at the first failed row: the layer's log-det and autograd's."""
    if not bool(bad.any()):
        return ""
    i = int(bad.nonzero()[0, 0])
    return (f" (row {i}: the layer's {float(got[i]) + 0.0:.6g}, autograd's "
            f"{float(truth[i]) + 0.0:.6g})")


def _add(report: CheckReport, note: str) -> None:
    """``note`` (may be empty) added to the last failure."""
    if note:
        report.failures[-1] += note


def _finish(report: CheckReport, raise_on_failure: bool) -> CheckReport:
    if raise_on_failure and not report.ok:
        raise CheckError(str(report), report)
    return report
