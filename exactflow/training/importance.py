"""Importance weights ``w = log p~(x) - log q(x)`` of a flow's samples: the bound, the
estimate of ``log Z`` and how far the weights can be trusted.

:func:`summarize` turns the log-weights into the numbers
:func:`~exactflow.fit_reverse_kl` and :func:`~exactflow.estimate_log_normalizer` report,
with two diagnostics of the weights: the effective sample size and the Pareto ``k`` of
their upper tail (Vehtari et al., Pareto Smoothed Importance Sampling, 2015-2024,
arXiv:1507.02646: above 0.7 the estimate's error is far larger than its standard error
says). :func:`warn_if_unreliable` says so when either is bad; :func:`warn_if_bounded`
when the flow cannot reach where the target may have mass.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

from ..distributions import Flow
from ..scoring import eval_mode
from ..validation import warn_user
from .loop import forked_rng, resolve_device

__all__ = ["summarize", "pareto_k", "warn_if_unreliable", "warn_if_bounded", "K_UNRELIABLE",
           "ESS_LOW", "EDGE_SHARE"]

#: Above this Pareto ``k`` the importance-sampling estimate is unreliable (PSIS's rule).
K_UNRELIABLE = 0.7
#: Below this fraction of the samples the effective sample size is too small to trust.
ESS_LOW = 0.01


#: Log-weights whose largest ones lie within this of each other are even: a proposal equal
#: to the target up to its dtype's rounding (float32 log-densities differ by about 1e-6).
_EVEN = 1e-3


def pareto_k(w: Tensor) -> float:
    """The shape ``k`` of a generalized Pareto distribution fitted (maximum likelihood,
    ``scipy.stats.genpareto``) to the largest ``min(n / 5, 3 sqrt(n))`` weights above the
    next one, as PSIS does: how heavy the weights' upper tail is. ``k < 0.5``: the
    estimate has a finite variance; ``k > 0.7``: it converges too slowly to be trusted.
    NaN with fewer than 25 finite weights or when the largest weights are equal to within
    0.1% (a proposal equal to the target up to rounding)."""
    finite = w[w.isfinite()].double().cpu().numpy()
    n = finite.size
    m = int(min(n / 5, 3 * math.sqrt(n)))
    if m < 5:
        return math.nan
    top = np.sort(finite)[-(m + 1):]
    if top[-1] - top[0] < _EVEN:  # (rounding of equal weights has no tail to fit)
        return math.nan
    exceed = np.exp(top[1:] - top[-1]) - np.exp(top[0] - top[-1])
    from scipy.stats import genpareto  # (here: importing scipy.stats takes about a second)

    shape, _, _ = genpareto.fit(exceed, floc=0)
    return float(shape)


def summarize(w: Tensor, bad: int) -> dict[str, float]:
    """The estimates from the log-weights ``w`` (float64) of ``n`` samples, ``bad`` of
    them not finite: ``elbo`` (the mean weight, a lower bound on ``log Z``) and its
    standard error, ``log_z_is = logsumexp(w) - log n`` and its delta-method standard
    error, ``ess = (sum e^w)^2 / sum e^(2w)``, ``pareto_k`` (:func:`pareto_k`), ``n`` and
    ``n_nonfinite``."""
    n = int(w.numel())
    elbo = float(w.mean())
    elbo_se = float(w.std() / math.sqrt(n)) if n > 1 else math.nan
    log_z = float(w.logsumexp(0) - math.log(n))
    shifted = (w - w.max()).exp()
    mean_e = shifted.mean()
    log_z_se = float(shifted.std() / (math.sqrt(n) * mean_e)) if n > 1 else math.nan
    ess = float(shifted.sum() ** 2 / (shifted * shifted).sum())
    return {
        "elbo": elbo,
        "elbo_se": elbo_se,
        "log_z_is": log_z,
        "log_z_is_se": log_z_se,
        "ess": ess,
        "pareto_k": pareto_k(w),
        "n": n,
        "n_nonfinite": bad,
    }


def warn_if_unreliable(summary: dict[str, float]) -> None:
    """Warn when :func:`summarize`'s numbers cannot be taken at face value: non-finite
    weights, a Pareto ``k`` above :data:`K_UNRELIABLE` or an effective sample size below
    :data:`ESS_LOW` of the samples."""
    n, bad, k, ess = summary["n"], summary["n_nonfinite"], summary["pareto_k"], summary["ess"]
    if bad:
        warn_user(
            f"{bad} of {n} samples had a non-finite log q or log p~ (a NaN target, or samples "
            "on the edge of a bounded support: a float32 flow through Logit/Sigmoid reaches "
            "0 and 1; float64 keeps them inside), so the estimates are not finite"
        )
        return
    why = []
    if k > K_UNRELIABLE:
        why.append(f"the Pareto k of the weights is {k:.2f} (above {K_UNRELIABLE})")
    if not ess >= ESS_LOW * n:
        why.append(f"the effective sample size is {ess:.0f} of {n}")
    if why:
        warn_user(
            "the importance-sampling estimate of log Z is unreliable: "
            + " and ".join(why)
            + "; its error can be many times log_z_is_se. Train the flow longer, with a "
            "smaller lr, or make it more expressive (the elbo stays a valid lower bound)"
        )


#: The share of a flow's samples in the outer tenth of its splines' range, in some
#: coordinate, above which :func:`fit_reverse_kl` takes the target to reach beyond that
#: range (a standard normal puts 6.8e-6 of its values past 4.5).
EDGE_SHARE = 1e-3


def warn_if_bounded(flow: Flow, n: int = 4096) -> None:
    """Warn when the flow's data-side layer is a spline whose range its samples crowd the
    edge of: beyond ``[-bound, bound]`` a spline is the identity, so the flow puts there
    only its base's tails, and a target's mass there is out of reach, unseen by every
    diagnostic (the samples never go where they would show it)."""
    monotonic: Any = getattr(Flow._first_layer(flow.transform), "monotonic", None)
    if not hasattr(monotonic, "bins"):  # (a spline map)
        return
    bound = float(monotonic.bound)
    with eval_mode(flow), forked_rng(resolve_device(None, flow), 0):  # (the caller's
        # random stream is left as it was)
        x = flow.sample(n)
    shares = (x.abs() >= 0.9 * bound).double().mean(dim=0)  # (per coordinate: any of d
    column = int(shares.argmax())                           # would grow with d)
    edge = float(shares[column])
    if edge > EDGE_SHARE:
        warn_user(
            f"in coordinate {column}, {edge:.2%} of the flow's samples lie in the outer "
            f"tenth of its splines' range [-{bound:g}, {bound:g}]: beyond it the flow is "
            "the identity and puts only its base's tails there, so a target with mass beyond "
            "it is out of reach and log Z estimates miss that mass, with good diagnostics; "
            "build the flow with a larger "
            "bound (ef.models.nsf(..., bound=...)) or scale the target into the range"
        )
