"""Importance weights ``w = log p~(x) - log q(x)`` of a flow's samples: the bound, the
estimate of ``log Z`` and how far the weights can be trusted.

:func:`estimate_log_normalizer` and :func:`importance_sample` draw the weights of a flow's
fresh samples; :func:`summarize` turns the log-weights into the numbers
:func:`~exactflow.fit_reverse_kl` and :func:`~exactflow.estimate_log_normalizer` report,
with two diagnostics of the weights: the effective sample size and the Pareto ``k`` of
their upper tail (Vehtari et al., Pareto Smoothed Importance Sampling, 2015-2024,
arXiv:1507.02646: above 0.7 the estimate's error is far larger than its standard error
says). :func:`warn_if_unreliable` says so when either is bad; :func:`warn_if_bounded`
when the flow cannot reach where the target may have mass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..distributions import Flow
from ..scoring import eval_mode
from ..validation import positive_int, warn_user
from .loop import forked_rng, resolve_device

__all__ = ["estimate_log_normalizer", "importance_sample", "log_weights", "target_fn",
           "summarize", "bound", "pareto_k", "warn_if_unreliable", "warn_if_bounded",
           "K_UNRELIABLE", "ESS_LOW", "EDGE_SHARE"]

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
    log_z = float(w.logsumexp(0) - math.log(n))
    shifted = (w - w.max()).exp()
    mean_e = shifted.mean()
    log_z_se = float(shifted.std() / (math.sqrt(n) * mean_e)) if n > 1 else math.nan
    ess = float(shifted.sum() ** 2 / (shifted * shifted).sum())
    elbo = bound(w, bad)
    return {
        "elbo": elbo["elbo"],
        "elbo_se": elbo["elbo_se"],
        "log_z_is": log_z,
        "log_z_is_se": log_z_se,
        "ess": ess,
        "pareto_k": pareto_k(w),
        "n": n,
        "n_nonfinite": bad,
    }


def bound(w: Tensor, bad: int) -> dict[str, float]:
    """The bound alone from the log-weights ``w`` of ``n`` samples (``bad`` not finite):
    ``elbo``, the mean weight, its standard error ``elbo_se``, ``n`` and ``n_nonfinite``
    (what an amortized fit reports: each context has its own ``log Z``)."""
    n = int(w.numel())
    return {"elbo": float(w.mean()),
            "elbo_se": float(w.std() / math.sqrt(n)) if n > 1 else math.nan,
            "n": n, "n_nonfinite": bad}


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


def warn_if_bounded(flow: Flow, n: int = 4096,
                    contexts: Callable[[int], Tensor] | None = None) -> None:
    """Warn when the flow's data-side layer is a spline whose range its samples crowd the
    edge of: beyond ``[-bound, bound]`` a spline is the identity, so the flow puts there
    only its base's tails, and a target's mass there is out of reach, unseen by every
    diagnostic (the samples never go where they would show it). A conditional flow draws
    one sample under each of ``contexts(n)``."""
    monotonic: Any = getattr(Flow._first_layer(flow.transform), "monotonic", None)
    if not hasattr(monotonic, "bins"):  # (a spline map)
        return
    bound = float(monotonic.bound)
    with eval_mode(flow), forked_rng(resolve_device(None, flow), 0):  # (the caller's
        # random stream is left as it was)
        x = flow.sample(n) if contexts is None else flow.sample(1, contexts(n))[0]
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


def target_fn(target: Any, conditional: bool = False) -> Callable[..., Tensor]:
    """The target's log-density, checked to give one value per row: a sum over the batch
    (a scalar) would train silently toward a wrong answer. ``conditional``: the target
    takes ``(x, context)``, one context row per row of ``x``."""
    fn = getattr(target, "log_prob", target)
    if not callable(fn):
        form = "(x, context) -> log p~(x | context)" if conditional else "x -> log p~(x)"
        raise TypeError(
            f"log_prob_target must be a callable {form} or an object with .log_prob, "
            f"got {type(target).__name__}"
        )

    def checked(x: Tensor, *context: Tensor) -> Tensor:
        out = fn(x, *context)
        if isinstance(out, Tensor) and (not out.is_floating_point() or out.is_complex()):
            raise TypeError(
                f"log_prob_target must return real floating-point log-densities; it returned "
                f"a {out.dtype} tensor"
            )
        if not isinstance(out, Tensor) or out.shape != x.shape[:1]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"log_prob_target must return one log-density per row, a tensor of shape "
                f"({x.shape[0]},) for {x.shape[0]} rows; it returned {shape}"
            )
        return out

    return checked


def estimate_log_normalizer(
    flow: Flow,
    log_prob_target: Any,
    n: int = 100_000,
    *,
    context: Any = None,
    batch_size: int = 16384,
    seed: int | None = None,
) -> dict[str, float]:
    """The evidence lower bound and an importance-sampling estimate of ``log Z``.

    With ``x_i ~ q`` (the flow) and log-weights ``w_i = log p~(x_i) - log q(x_i)``:

    * ``elbo = (1/n) sum_i w_i <= log Z``, standard error ``sd(w) / sqrt(n)``; the gap
      ``log Z - elbo`` is ``KL(q || p)``;
    * ``log_z_is = logsumexp(w) - log n``, an estimate of ``log Z`` (biased low by
      Jensen, consistent); its standard error by the delta method is
      ``sd(exp w) / (sqrt(n) mean(exp w))``;
    * ``ess = (sum e^w)^2 / sum e^(2w)``, the effective sample size;
    * ``pareto_k``, the shape of a generalized Pareto fit to the largest weights (PSIS,
      Vehtari et al.): above 0.7 the estimate's error can be many times ``log_z_is_se``.

    Computed in float64 from samples drawn under ``torch.inference_mode`` in eval mode.
    A warning says when the estimate is unreliable: non-finite weights, ``pareto_k`` above
    0.7, or an effective sample size below 1% of ``n``. The weights cannot show mass that
    ``q`` never puts where ``p`` has it: a flow that missed a mode has even weights and a
    ``log Z`` too low by the missed mass. Compare fits from several seeds.

    Args:
        flow: the proposal ``q``.
        log_prob_target: ``x -> log p~(x)`` or an object with ``.log_prob``.
        n: number of samples.
        context: for a conditional flow, the one context to draw under, ``(c,)``: with
            a posterior ``q(theta | x_obs)`` and the target ``theta -> log p(theta) +
            log p(x_obs | theta)``, ``log_z_is`` estimates the log evidence
            ``log p(x_obs)``.
        batch_size: samples per pass.
        seed: seeds the draw (in a forked RNG); ``None`` uses the current RNG.

    Returns:
        ``{"elbo", "elbo_se", "log_z_is", "log_z_is_se", "ess", "pareto_k", "n",
        "n_nonfinite"}``
        (``n_nonfinite`` counts non-finite ``log q`` or ``log p~``; a ``-inf`` target
        density, outside its support, is kept as a zero weight).
    """
    w, bad = _draw("estimate_log_normalizer", flow, log_prob_target, n, batch_size, seed,
                   context=context)
    summary = summarize(w, bad)
    warn_if_unreliable(summary)
    return summary


def log_weights(
    flow: Flow, fn: Callable[..., Tensor], n: int, batch_size: int,
    samples: list[Tensor] | None = None, context: Tensor | None = None,
    contexts: Callable[[int], Tensor] | None = None,
) -> tuple[Tensor, int]:
    """``n`` log-weights ``log p~(x) - log q(x)`` (float64, CPU) of fresh samples, and how
    many were not finite (a ``-inf`` target outside its support counts as a zero weight).
    The samples themselves are appended to ``samples`` when it is given. A conditional flow
    draws under the one ``context``, or one sample under each of the rows that
    ``contexts(k)`` draws, scored by ``fn(x, rows)``."""
    parts: list[Tensor] = []
    bad = 0
    with eval_mode(flow, grad=True), torch.inference_mode():
        done = 0
        while done < n:
            k = min(batch_size, n - done)
            if contexts is None:
                x, log_q = flow.sample_and_log_prob(k, context)
                log_p = fn(x)
            else:
                rows = contexts(k)
                x, log_q = (t[0] for t in flow.sample_and_log_prob(1, rows))
                log_p = fn(x, rows)
            w = (log_p.to(torch.float64) - log_q.to(torch.float64)).cpu()
            ok = torch.isfinite(w) | ((w == -math.inf) & torch.isfinite(log_q.cpu()))
            bad += int((~ok).sum())
            parts.append(w)
            if samples is not None:
                samples.append(x)
            done += k
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)), bad


def importance_sample(
    flow: Flow, log_prob_target: Any, n: int, *, context: Any = None, batch_size: int = 16384,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``n`` samples ``x ~ q`` of the flow and their log-weights ``w = log p~(x) - log q(x)``
    (float64, on the CPU), to reweight expectations to the target ``p``:
    ``E_p[f] ~ sum_i softmax(w)_i f(x_i)``. The same draw as
    :func:`estimate_log_normalizer` with the same ``seed`` (whose numbers come from these
    weights, with the warnings that say when they cannot be trusted). A conditional flow
    draws under one ``context`` ``(c,)``, as there.

    Example:
        >>> import torch, exactflow as ef
        >>> flow = ef.models.maf(2)
        >>> x, w = ef.importance_sample(flow, lambda x: -0.5 * (x**2).sum(1), 1000, seed=0)
        >>> x.shape, w.shape, round(float((torch.softmax(w, 0) * x[:, 0]).sum()), 6)
        (torch.Size([1000, 2]), torch.Size([1000]), ...)
    """
    samples: list[Tensor] = []
    w, _ = _draw("importance_sample", flow, log_prob_target, n, batch_size, seed, samples,
                 context=context)
    return torch.cat(samples), w


def _draw(
    caller: str, flow: Flow, log_prob_target: Any, n: int, batch_size: int,
    seed: int | None, samples: list[Tensor] | None = None, *, context: Any = None,
) -> tuple[Tensor, int]:
    """The arguments of ``caller`` checked, then :func:`log_weights` of ``n`` samples,
    seeded with ``seed`` (in a forked RNG) unless it is None."""
    c = getattr(flow, "context_features", 0)
    if c and context is None:
        raise ValueError(f"{caller}: this flow is conditional: pass context=, the one "
                         f"context ({c},) to draw under (an observation x_obs)")
    if context is not None:
        if not c:
            raise ValueError(f"{caller}: this flow is unconditional: leave context out")
        context = torch.as_tensor(context)
        if context.numel() != c or context.dim() > 2 or (context.dim() == 2 and
                                                         context.shape[0] != 1):
            raise ValueError(f"{caller}: context must be one row of {c} values, (c,) or "
                             f"(1, c); got shape {tuple(context.shape)}")
        context = context.reshape(c)
    fn = target_fn(log_prob_target)
    n = positive_int(n, "n")
    batch_size = positive_int(batch_size, "batch_size")
    with _seeded(flow, seed):
        return log_weights(flow, fn, n, batch_size, samples, context)


@contextmanager
def _seeded(flow: Flow, seed: int | None) -> Iterator[None]:
    """Torch's RNG seeded with ``seed`` (forked: the caller's is left as it was), or as it
    is when ``seed`` is None."""
    if seed is None:
        yield
    else:
        with forked_rng(resolve_device(None, flow), int(seed)):
            yield
