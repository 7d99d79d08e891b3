"""Planar and radial flows (Rezende & Mohamed 2015): rank-one and radial perturbations.

Both layers are defined by a closed-form map ``g`` that Rezende & Mohamed apply to latent
samples, so here ``g`` is the **inverse** (latent -> data, used by ``Flow.sample`` and
reverse-KL fitting): one pass, O(d) per row, exact log-det. The **forward** (data -> latent,
used by ``Flow.log_prob`` and maximum likelihood) is ``g^{-1}``, which has no closed form for
the planar map and is computed by a safeguarded Newton solve of one scalar equation per row
(a fixed number of iterations, vectorized over the batch), and by a closed-form root of a
quadratic for the radial map. Wrap a layer in :class:`exactflow.Inverse` to swap the roles.

Gradients through the planar solve are exact: the converged root is detached and one final
Newton step is taken with the autograd graph, which is the implicit-function derivative
``dy/dtheta = -(dF/dtheta) / (dF/dy)`` at the root.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Transform, check_features
from ..nn.passes import is_plain

__all__ = ["Planar", "Radial"]

# m(a) = -1 + softplus(a + _SHIFT) satisfies m(0) = 0; see Planar.
_SHIFT = math.log(math.e - 1.0)
_ONE_MINUS_INV_E = 1.0 - 1.0 / math.e

# Steps of the planar solve. Over 1.8e5 random and adversarial rows per dtype (|w.u| up to
# 1e5, |t| from 1e-25 to 1e8, s within rounding of -1, t within a few units of s) the
# safeguarded iteration reached 1e-12 (float64) / 1e-6 (float32) relative error, or the
# rounding floor of an ill-conditioned row, within 12 and 10 steps; the defaults leave margin.
_DEFAULT_ITERATIONS = {torch.float64: 30, torch.float32: 20, torch.float16: 20, torch.bfloat16: 20}


def _m(a: Tensor) -> Tensor:
    """``m(a) = -1 + softplus(a + log(e - 1))``, accurate near ``a = 0`` (where ``m(a) ~ 0.632 a``).

    For ``a <= 1`` it uses the identity ``m(a) = log1p((1 - 1/e) expm1(a))``, which has no
    cancellation at small ``a``; above, the softplus form (no overflow).
    """
    small = torch.log1p(_ONE_MINUS_INV_E * torch.expm1(a.clamp_max(1.0)))
    return torch.where(a > 1.0, F.softplus(a + _SHIFT) - 1.0, small)


def _log_one_plus_s_sech2(y: Tensor, one_plus_s: Tensor) -> Tensor:
    """``log(1 + s sech^2(y))`` without cancellation, for ``s = one_plus_s - 1 >= -1``.

    With ``q = exp(-2|y|)``: ``sech^2 y = 4q / (1 + q)^2`` and ``tanh^2 y = (1 - q)^2 / (1 + q)^2``,
    so ``1 + s sech^2 y = (1 + s) sech^2 y + tanh^2 y = (4 (1+s) q + (1-q)^2) / (1+q)^2``, a sum
    of non-negative terms. It is zero only at ``s = -1, y = 0`` (the constraint's boundary,
    reached only when the softplus underflows); there the value is clamped to the smallest
    positive float so the log-det stays finite (very negative) rather than ``-inf``.
    """
    two_abs = 2.0 * y.abs()
    q = torch.exp(-two_abs)
    one_minus_q = -torch.expm1(-two_abs)
    inner = 4.0 * one_plus_s * q + one_minus_q * one_minus_q
    tiny = torch.finfo(y.dtype).tiny
    return torch.log(inner.clamp_min(tiny)) - 2.0 * torch.log1p(q)


# y - tanh(y) = y^3 (1/3 - 2/15 y^2 + 17/315 y^4 - ...), the Taylor series of tanh. Nine
# terms reach the dtype's precision below the switch point, where the plain difference
# y - tanh(y) loses about log10(3 / y^2) digits.
_Y_MINUS_TANH = (
    1.0 / 3.0,
    -2.0 / 15.0,
    17.0 / 315.0,
    -62.0 / 2835.0,
    1382.0 / 155925.0,
    -21844.0 / 6081075.0,
    929569.0 / 638512875.0,
    -6404582.0 / 10854718875.0,
    443861162.0 / 1856156927625.0,
)
# float64: truncation 1e-16 at 0.2, difference 2e-14 above; float32: 3e-8 at 0.6, 1e-6 above.
_SERIES_BELOW = {torch.float64: 0.2}


def _y_minus_tanh(y: Tensor, tanh_y: Tensor) -> Tensor:
    """``y - tanh(y)`` for ``y >= 0`` with near full relative precision (series near 0)."""
    y_sq = y * y
    poly = torch.full_like(y, _Y_MINUS_TANH[-1])
    for coefficient in _Y_MINUS_TANH[-2::-1]:
        poly = poly * y_sq + coefficient
    below = _SERIES_BELOW.get(y.dtype, 0.6)
    return torch.where(y < below, y * y_sq * poly, y - tanh_y)


def _solve_planar(
    t: Tensor, one_plus_s: Tensor, iterations: int, early_exit: bool = False
) -> Tensor:
    """Solve ``y + s tanh(y) = t`` for ``y``, with ``s = one_plus_s - 1 >= -1`` (increasing).

    The equation is defined by ``one_plus_s`` alone (``s`` is derived from it), so the
    bracket below and the residual describe the same equation to the last bit.

    The left side is odd in ``y``, so the solve runs on ``T = |t|`` with a root ``y* >= 0`` and
    the sign is put back at the end. The root lies in a bracket from ``|tanh| <= 1`` and
    ``tanh(y) <= y``:

    * ``s >= 0``: ``max(T - s, T / (1 + s)) <= y* <= T`` (the map is concave on y >= 0, so
      Newton from the lower end climbs monotonically);
    * ``s < 0``: ``T <= y* <= min(T - s, T / (1 + s))`` (convex on y >= 0; after at most one
      step Newton descends monotonically).

    The residual is evaluated as ``(1 + s) tanh(y) + (y - tanh(y)) - T``, two non-negative
    terms for ``s >= -1`` and ``y >= 0``, so it keeps its relative precision even when
    ``s`` is at the boundary ``-1`` (where ``y + s tanh(y)`` would cancel to rounding noise).

    Each iteration takes the Newton step when it stays inside the bracket and is at most
    3/4 of the step before last (a looser form of Numerical Recipes' ``rtsafe`` test, so a
    step that exactly halves, as after a bisection next to the root, is not rejected by
    rounding), else bisects. The iterate with the smallest residual is returned, so a
    converged row stays converged whatever later steps do; a row whose residual is within
    rounding (``8 eps |t|``) keeps that iterate, so each row's root is its own, whatever
    the rest of the batch. At most ``iterations`` steps, ``torch.where`` updates: no
    data-dependent control flow, unless ``early_exit``, which stops once every row is
    within rounding (checked every other step, a host sync each: for eager runs, where
    the steps' many small operations cost more than the checks; the roots are the same
    either way). Inputs must carry no autograd graph (the caller differentiates by one
    final Newton step).
    """
    tiny = torch.finfo(t.dtype).tiny
    eps = torch.finfo(t.dtype).eps
    T = t.abs()
    s = one_plus_s - 1.0
    pos = s >= 0
    ratio = T / one_plus_s.clamp_min(tiny)  # may be inf when 1 + s underflows: never chosen then
    # Bounds computed in floating point may miss the root by an ulp: widen them by two.
    lo = torch.where(pos, torch.maximum(T - s, ratio), T) * (1.0 - 2.0 * eps)
    hi = torch.where(pos, T, torch.minimum(T - s, ratio)) * (1.0 + 2.0 * eps)
    lo = torch.minimum(lo, hi)
    # s > 0 and large, where tanh saturates: there Newton from below only creeps (about 1/2
    # per step) and the bracket [lo, T] is far too wide to bisect, so tighten hi with
    # tanh(y) >= 1 - 2 exp(-2y), i.e. f(Y) >= Y + s - 2 s exp(-2Y). Two upper bounds follow:
    # (a) Y = log(2s / (s - T + lo)) / 2 has f(Y) >= T + (Y - lo), valid when Y >= lo;
    # (b) Y = D + delta with D = T - s, K = 2 s exp(-2D) and delta exp(2 delta) >= K, which holds
    #     for delta = softplus(log K) / 2 when K > e^2 and for delta = sqrt(K) otherwise.
    saturated = 0.5 * torch.log(2.0 * s / (s - T + lo))
    hi = torch.where(pos & (saturated >= lo), torch.minimum(hi, saturated), hi)
    log_k = torch.log(2.0 * s) - 2.0 * (T - s)
    delta = torch.where(log_k > 2.0, 0.5 * F.softplus(log_k), torch.exp(0.5 * log_k.clamp_max(2.0)))
    hi = torch.where(pos, torch.minimum(hi, torch.maximum(T - s + delta, lo)), hi)
    # Start where the small-y model (1 + s) y + y^3 / 3 = T puts the root when s < 0: near the
    # boundary s = -1 the root sits in a flat cubic region that Newton only leaves linearly.
    cubic_guess = torch.minimum(ratio, torch.pow(3.0 * T, 1.0 / 3.0))
    y = torch.where(pos, lo, torch.minimum(torch.maximum(cubic_guess, lo), hi))
    step_before = hi - lo
    step_last = step_before
    best = y
    best_residual = torch.full_like(y, math.inf)
    converged = 8.0 * eps * T
    for i in range(iterations):
        two_y = 2.0 * y
        q = torch.exp(-two_y)
        one_minus_q = -torch.expm1(-two_y)
        tanh_y = torch.tanh(y)
        residual = one_plus_s * tanh_y + _y_minus_tanh(y, tanh_y) - T
        slope = (4.0 * one_plus_s * q + one_minus_q * one_minus_q) / (1.0 + q) ** 2
        # A row within rounding keeps that iterate: its root then does not depend on how
        # long the other rows of its batch take (or on an early exit).
        improved = (residual.abs() < best_residual) & (best_residual > converged)
        best = torch.where(improved, y, best)
        best_residual = torch.where(improved, residual.abs(), best_residual)
        if early_exit and i % 2 == 1 and bool((best_residual <= converged).all()):
            break
        above = residual > 0
        hi = torch.where(above, y, hi)
        lo = torch.where(above, lo, y)
        newton_step = residual / slope  # inf/nan when slope == 0: rejected below
        candidate = y - newton_step
        # A step that lands on a bracket end up to rounding (the root is often at an end
        # when tanh saturates) counts as inside; it is then clamped into the bracket.
        slack = 4.0 * eps * torch.maximum(lo.abs(), hi.abs())
        accept = (
            (candidate >= lo - slack)
            & (candidate <= hi + slack)
            & (newton_step.abs() <= 0.75 * step_before.abs())
        )
        candidate = torch.minimum(torch.maximum(candidate, lo), hi)
        middle = 0.5 * (lo + hi)
        y_next = torch.where(accept, candidate, middle)
        step_before = step_last
        step_last = y - y_next
        y = y_next
    return torch.where(t < 0, -best, best)


def _may_stop_early(t: Tensor) -> bool:
    """Whether the solve may stop on the data (a host sync): plain eager runs only, not
    traced (a trace would fix the step count of its example), compiled, under torch.func
    or captured into a CUDA graph."""
    return (
        is_plain(t)
        and not torch.jit.is_tracing()
        and not (t.is_cuda and torch.cuda.is_current_stream_capturing())
    )


class Planar(Transform):
    """Planar flow: a rank-one, tanh-shaped perturbation of the identity.

    The closed-form map (latent ``z`` -> data ``x``, this layer's **inverse**)::

        x = g(z) = z + u_hat tanh(w . z + b)
        log|det dx/dz| = log|1 + u_hat . psi(z)|,  psi(z) = tanh'(w . z + b) w

    by the matrix determinant lemma (``det(I + u psi^T) = 1 + psi . u``), O(d) per row.

    **Invertibility.** ``g`` is invertible iff ``w . u_hat >= -1``. The raw parameters
    ``u, w, b`` are unconstrained and ``u_hat = u + (m(w . u) - w . u) w / |w|^2`` with
    ``m(a) = -1 + softplus(a + log(e - 1))``, so ``w . u_hat = m(w . u) > -1`` for any raw
    parameters. (Rezende & Mohamed use ``m(a) = -1 + softplus(a)``; the shift makes
    ``m(0) = 0``, so the correction ``(m(a) - a) w / |w|^2`` stays bounded by ``|u|`` as
    ``w -> 0`` instead of growing like ``0.31 / |w|``, and ``u = 0`` is the identity.)
    ``|w|^2`` is clamped to the smallest positive float, so ``w = 0`` gives ``u_hat = u``.

    **Directions and cost.**

    * ``inverse`` (latent -> data; sampling, reverse KL as in Rezende & Mohamed): the closed
      form above, one pass, O(d).
    * ``forward`` (data -> latent; ``log_prob``, maximum likelihood): with ``y = w . z + b``,
      ``g`` gives ``w . x + b = y + s tanh(y)``, ``s = w . u_hat >= -1``, a monotone scalar
      equation. It is solved per row by safeguarded Newton with a bisection bracket
      (:func:`_solve_planar`, at most ``iterations`` steps, default 30 in float64 and 20 in
      float32, converging to rounding; eager runs stop once every row has), then
      ``z = x - u_hat tanh(y)`` and
      ``log|det dz/dx| = -log(1 + s tanh'(y))``. Cost O(d + iterations) per row. The root is
      differentiated implicitly (one Newton step with the graph), so gradients are exact.

    Args:
        features: the dimension ``d``.
        iterations: Newton steps of the forward solve; ``None`` picks by dtype.

    References:
        Rezende & Mohamed, Variational Inference with Normalizing Flows (2015),
        arXiv:1505.05770.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.transforms.Planar(3).double()
        >>> with torch.no_grad():
        ...     _ = t.u.normal_()
        >>> z = torch.randn(4, 3, dtype=torch.float64)
        >>> x, ladj_inv = t.inverse(z)          # closed form (sampling)
        >>> z_back, ladj = t(x)                 # Newton solve (density)
        >>> bool(torch.allclose(z_back, z)), bool(torch.allclose(ladj, -ladj_inv))
        (True, True)
    """

    features: int

    def __init__(self, features: int, iterations: int | None = None) -> None:
        super().__init__()
        self.features = check_features(features, "Planar")
        if iterations is not None and (not isinstance(iterations, int) or iterations < 1):
            raise ValueError(f"Planar: iterations must be a positive int, got {iterations!r}")
        self.iterations = iterations
        bound = 1.0 / math.sqrt(features)
        self.w = nn.Parameter(torch.empty(features).uniform_(-bound, bound))
        self.u = nn.Parameter(torch.zeros(features))
        self.b = nn.Parameter(torch.zeros(()))

    def constrained(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(u_hat, s, 1 + s)`` with ``s = w . u_hat = m(w . u) >= -1``.

        ``1 + s = softplus(w . u + log(e - 1))`` is computed directly so it keeps its
        relative precision near the boundary ``s = -1``.
        """
        a = self.w @ self.u
        s = _m(a)
        one_plus_s = F.softplus(a + _SHIFT)
        w_sq = (self.w @ self.w).clamp_min(torch.finfo(self.w.dtype).tiny)
        u_hat = self.u + ((s - a) / w_sq) * self.w
        return u_hat, s, one_plus_s

    def _iterations(self, dtype: torch.dtype) -> int:
        if self.iterations is not None:
            return self.iterations
        return _DEFAULT_ITERATIONS.get(dtype, 30)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent by the Newton solve: returns ``(z, -log(1 + s tanh'(y)))``."""
        u_hat, s, one_plus_s = self.constrained()
        t = x @ self.w + self.b
        with torch.no_grad():
            y = _solve_planar(t.detach(), one_plus_s.detach(), self._iterations(x.dtype),
                              early_exit=_may_stop_early(t))
        # Implicit differentiation of F(y) = y + s tanh(y) - t = 0 at the root: attach the
        # graph as a Newton step whose value is exactly zero, so y keeps the solved value and
        # gets the derivative -(dF/dtheta) / (dF/dy).
        slope = torch.exp(_log_one_plus_s_sech2(y, one_plus_s.detach()))
        residual = y + s * torch.tanh(y) - t
        y = y - (residual - residual.detach()) / slope
        z = x - torch.tanh(y).unsqueeze(-1) * u_hat
        return z, -_log_one_plus_s_sech2(y, one_plus_s)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data in closed form: returns ``(g(z), log(1 + s tanh'(w . z + b)))``."""
        u_hat, _, one_plus_s = self.constrained()
        y = z @ self.w + self.b
        x = z + torch.tanh(y).unsqueeze(-1) * u_hat
        return x, _log_one_plus_s_sech2(y, one_plus_s)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Radial(Transform):
    """Radial flow: contracts or expands space around a learnable centre ``z0``.

    The closed-form map (latent ``z`` -> data ``x``, this layer's **inverse**), with
    ``r = |z - z0|``::

        x = g(z) = z + beta h(r) (z - z0),   h(r) = 1 / (alpha + r)
        log|det dx/dz| = (d - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r)
                       = (d - 1) log((gamma + r) / (alpha + r))
                         + log((r (r + 2 alpha) + gamma alpha) / (alpha + r)^2)

    where ``alpha = softplus(raw_alpha) > 0``, ``gamma = softplus(raw_beta) > 0`` and
    ``beta = gamma - alpha >= -alpha`` (the invertibility condition). Writing the log-det
    through ``gamma = alpha + beta`` avoids cancelling ``alpha`` against ``beta``.

    **Directions and cost.** Both O(d) per row, both closed form.

    * ``inverse`` (latent -> data; sampling, reverse KL): ``g`` above.
    * ``forward`` (data -> latent; ``log_prob``): ``g`` moves points along rays from
      ``z0`` and sends the radius ``r`` to ``rho = r (gamma + r) / (alpha + r)``, increasing
      in ``r``. Given ``rho = |x - z0|``, ``r`` is the positive root of
      ``r^2 + (gamma - rho) r - alpha rho = 0``, taken in the cancellation-free form
      (``2 alpha rho / (p + sqrt(p^2 + 4 alpha rho))`` for ``p = gamma - rho >= 0``,
      ``(sqrt(...) - p) / 2`` otherwise); then ``z = z0 + (x - z0) (alpha + r) / (gamma + r)``
      and ``log|det dz/dx|`` is minus the log-det of ``g`` at ``r``. At ``x = z0`` the norm
      is guarded (``r = 0``, finite gradients).

    Starts as the identity (``beta = 0``) with ``z0`` drawn from a standard normal.

    Args:
        features: the dimension ``d``.

    References:
        Rezende & Mohamed, Variational Inference with Normalizing Flows (2015),
        arXiv:1505.05770.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.transforms.Radial(2).double()
        >>> with torch.no_grad():
        ...     _ = t.raw_beta.fill_(2.0)
        >>> x = torch.randn(5, 2, dtype=torch.float64)
        >>> ef.check_transform(t, x).ok
        True
    """

    features: int

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = check_features(features, "Radial")
        self.z0 = nn.Parameter(torch.randn(features))
        self.raw_alpha = nn.Parameter(torch.zeros(()))
        self.raw_beta = nn.Parameter(torch.zeros(()))

    def constrained(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(alpha, beta, gamma)`` with ``alpha > 0``, ``gamma = alpha + beta > 0``."""
        alpha = F.softplus(self.raw_alpha)
        gamma = F.softplus(self.raw_beta)
        return alpha, gamma - alpha, gamma

    @staticmethod
    def _radius(v: Tensor) -> Tensor:
        # |v| with a finite (zero) gradient at v = 0, where the plain norm's is NaN.
        sq = (v * v).sum(-1)
        return torch.sqrt(sq.clamp_min(torch.finfo(v.dtype).tiny))

    def _log_det_g(self, r: Tensor, alpha: Tensor, gamma: Tensor) -> Tensor:
        log_alpha_r = torch.log(alpha + r)
        radial_part = torch.log(r * (r + 2.0 * alpha) + gamma * alpha) - 2.0 * log_alpha_r
        return (self.features - 1) * (torch.log(gamma + r) - log_alpha_r) + radial_part

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent by the closed-form root for the radius."""
        alpha, _, gamma = self.constrained()
        diff = x - self.z0
        rho = self._radius(diff)
        p = gamma - rho
        disc = torch.sqrt((p * p + 4.0 * alpha * rho).clamp_min(torch.finfo(x.dtype).tiny))
        nonneg = p >= 0
        # Both branches are finite for every input, so torch.where keeps gradients clean.
        denom = torch.where(nonneg, p + disc, torch.ones_like(p))
        r = torch.where(nonneg, 2.0 * alpha * rho / denom, 0.5 * (disc - p))
        z = self.z0 + diff * ((alpha + r) / (gamma + r)).unsqueeze(-1)
        return z, -self._log_det_g(r, alpha, gamma)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data in closed form: ``(g(z), log|det dg/dz|)``."""
        alpha, _, gamma = self.constrained()
        diff = z - self.z0
        r = self._radius(diff)
        x = self.z0 + diff * ((gamma + r) / (alpha + r)).unsqueeze(-1)
        return x, self._log_det_g(r, alpha, gamma)

    def extra_repr(self) -> str:
        return f"features={self.features}"
