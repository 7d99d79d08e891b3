"""The parts of a model set from the training data, not by gradients.

* :func:`prepare`, before the first step: a builder's ``standardize=True`` layer gets the
  columns' means and standard deviations (float64), the context scaler those of the context,
  and a Gaussian or mixture base its closed-form or EM fit to the latent of the training
  rows (every transform is still the identity there, so the flow then *is* that classical
  model).
* :func:`warn_if_unstandardized`, before the first step: data far from standardized for a
  flow without a standardization layer.
* :func:`recalibrate_batch_norm`, after the last: every :class:`~exactflow.transforms.BatchNorm`
  gets the population statistics of its input over the whole training set, layer by layer,
  in place of the running averages of the last batches (which on small data can collapse
  a variance toward 0 and make eval-mode densities far from the trained ones). In eval
  mode the flow then scores the training rows as training mode does on the whole set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core import Compose
from ..distributions import Flow
from ..gaussians import Gaussian, GaussianMixture
from ..models import standardize_layer, support_layer
from ..scoring import eval_mode, module_device
from ..stats import RunningMoments
from ..transforms.linear import ContextShift
from ..transforms.normalization import ActNorm, BatchNorm
from ..transforms.standardize import Standardize
from ..transforms.support import map_rows
from ..validation import DataError, counted, non_negative_float, warn_user
from .advice import STANDARDIZE_ADVICE
from .batches import Rows, wrap, wrap_context
from .loop import clone

__all__ = ["prepare", "noise_std", "supported", "warn_if_unstandardized",
           "recalibrate_batch_norm", "far_context_error", "warn_if_far_training_context",
           "MAX_FIT_ROWS"]

#: Rows used to fit a classical base (a seeded subsample beyond this).
MAX_FIT_ROWS = 200_000
_CHUNK = 8192


def _sample_rows(rows: Rows, limit: int, seed: int) -> Tensor:
    n = len(rows)
    if n <= limit:
        index = torch.arange(n)
    else:
        gen = torch.Generator().manual_seed(seed)
        index = torch.sort(torch.randperm(n, generator=gen)[:limit]).values
    return rows.take(index)


def prepare(flow: Flow, train: Any, context: Any = None, seed: int = 0) -> list[str]:
    """Set a flow's data-dependent parts from the training rows; returns what was set.

    :func:`exactflow.fit` calls it before its first step; call it yourself before a
    training loop of your own, or a builder's ``standardize=True`` layer stays the
    identity. It fills the standardization layer with the columns' means and standard
    deviations (float64), the context scaler with the context's, and a Gaussian or mixture
    base with its fit to the latent of the training rows. Only parts still at their
    initial state are set (a standardization at mean 0 and scale 1, a base not fitted
    yet), so calling it on a flow prepared already, or on a resumed run, changes nothing.

    Args:
        flow: the flow to prepare.
        train: ``(n, features)`` training rows (tensor, array, memmap).
        context: ``(n, context_features)`` context rows for a conditional flow.
        seed: seeds the subsample a classical base is fitted to.

    Example:
        >>> import torch, exactflow as ef
        >>> flow = ef.models.maf(2, layers=1, hidden=(8,), standardize=True)
        >>> ef.prepare(flow, 5 + 3 * torch.randn(500, 2))
        ['standardization']
    """
    if not isinstance(train, Rows):
        train = wrap(train, "training data", flow.features, strict=True)
        context = wrap_context(flow, context, "context", len(train))
    flow._checked_prepared = True  # (its training-mode calls need not ask for this)
    done = []
    layer = standardize_layer(flow)
    if layer is not None and layer.is_identity():
        mean, std = Standardize.statistics(supported(flow, train.data), name="training data",
                                           pooled=layer.pooled)
        layer.set_statistics(mean, std)
        done.append("standardization")
    scaler = flow.context_scaler
    if isinstance(scaler, Standardize) and context is not None and scaler.is_identity():
        mean, std = Standardize.statistics(context.data, name="context", constant_ok=True)
        scaler.set_statistics(mean, std)
        done.append("context standardization")
    shift = (_flat(flow.transform) or [None])[-1]
    if isinstance(shift, ContextShift) and context is not None and not bool(shift.fitted):
        shift.fit_to(*_latent(flow, _sample_rows(train, MAX_FIT_ROWS, seed),
                              _sample_rows(context, MAX_FIT_ROWS, seed), before_last=True))
        done.append("ContextShift regression")
    base = flow.base
    if isinstance(base, (Gaussian, GaussianMixture)) and not bool(base.fitted):
        x = _sample_rows(train, MAX_FIT_ROWS, seed)
        ctx = None
        if context is not None:
            ctx = _sample_rows(context, MAX_FIT_ROWS, seed)
        latent = _latent(flow, x, ctx)[0]
        if isinstance(base, GaussianMixture):
            base.fit_to(latent, seed=seed)
        else:
            base.fit_to(latent)
        done.append(f"{type(base).__name__} base")
    return done


def _latent(flow: Flow, x: Tensor, context: Tensor | None, before_last: bool = False
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """``f(x)`` in float64 for a batch of rows, in eval mode, chunk by chunk, and the
    context as the layers see it (embedded); ``before_last``: the input of the last layer
    instead."""
    device = module_device(flow)
    layers = _flat(flow.transform)
    run = Compose(*layers[:-1]) if before_last else flow.transform
    parts, contexts = [], []
    with eval_mode(flow):
        for start in range(0, len(x), _CHUNK):
            xb = x[start : start + _CHUNK].to(device, flow.input_dtype)
            cb = None
            if context is not None:
                cb = flow._embed(context[start : start + _CHUNK].to(device, flow.context_dtype))
                assert cb is not None
                contexts.append(cb.double().cpu().numpy())
            parts.append(run(xb, cb if run.context_features else None)[0].double().cpu().numpy())
    return np.concatenate(parts), np.concatenate(contexts) if contexts else None


def _flat(transform: Any) -> list[Any]:
    if isinstance(transform, Compose):
        return [layer for t in transform for layer in _flat(t)]
    return [transform]


@torch.no_grad()
def recalibrate_batch_norm(
    flow: Flow, train: Rows, context: Rows | None = None, seed: int = 0,
    max_rows: int = MAX_FIT_ROWS, *, score: Callable[[], float] | None = None,
    best: float | None = None,
) -> float | None:
    """Replace every ``BatchNorm``'s running averages by the population statistics of its
    input over the training rows (a seeded subsample of ``max_rows`` beyond that).

    The layers are visited in data -> latent order, each one's input computed with the
    layers before it already set, so the statistics are exactly those the eval-mode flow
    sees. Flows nested in other modules than ``Compose`` are left alone.

    ``score`` (the validation NLL of the flow as it is) and ``best`` (that of the flow
    before): the new statistics are kept only where they score no worse, else the running
    averages come back, so that the flow :func:`exactflow.fit` returns scores on validation
    what its history says. Returns the validation NLL of the flow kept (``best`` where
    nothing was set or scored).
    """
    layers = _flat(flow.transform)
    if not any(isinstance(layer, BatchNorm) for layer in layers):
        return best
    if score is None:
        _set_batch_norm(flow, layers, train, context, seed, max_rows)
        return best
    before = clone(flow.state_dict())
    _set_batch_norm(flow, layers, train, context, seed, max_rows)
    now = score()
    if best is not None and not now <= best:  # (worse, or NaN)
        flow.load_state_dict(before)
        return best
    return now


def _set_batch_norm(flow: Flow, layers: list[Any], train: Rows, context: Rows | None,
                    seed: int, max_rows: int) -> None:
    x = _sample_rows(train, max_rows, seed)
    ctx_all = None if context is None else _sample_rows(context, max_rows, seed)
    device = module_device(flow)
    with eval_mode(flow):
        chunks = [x[s : s + _CHUNK].to(device, flow.input_dtype)
                  for s in range(0, len(x), _CHUNK)]
        contexts: list[Tensor | None] = [None] * len(chunks)
        if ctx_all is not None:
            contexts = [flow._embed(ctx_all[s : s + _CHUNK].to(device, flow.context_dtype))
                        for s in range(0, len(x), _CHUNK)]
        for layer in layers:
            if isinstance(layer, BatchNorm):
                moments = RunningMoments()
                for part in chunks:
                    moments.update(part.double().cpu().numpy())
                var = np.asarray(moments.var(ddof=0))
                layer.running_mean.copy_(torch.as_tensor(np.asarray(moments.mean),
                                                         dtype=layer.running_mean.dtype))
                layer.running_var.copy_(torch.as_tensor(var, dtype=layer.running_var.dtype))
            chunks = [layer(part, c)[0] for part, c in zip(chunks, contexts, strict=True)]


def supported(flow: Flow, data: Any) -> Any:
    """``data`` as the layers after a flow's :class:`~exactflow.transforms.Support` layer
    see it (float64, :func:`~exactflow.transforms.support.map_rows`), or ``data`` itself
    for a flow without one."""
    support = support_layer(flow)
    return data if support is None else map_rows(support, data, "training data")


def _first_rows(rows: Rows, flow: Flow | None = None) -> np.ndarray:
    sample = rows.data[: min(len(rows), 10_000)]
    if isinstance(sample, Tensor):
        sample = sample.detach().cpu().numpy()
    sample = np.asarray(sample, dtype=np.float64)
    return sample if flow is None else supported(flow, sample)


def warn_if_unstandardized(flow: Flow, rows: Rows, context: Rows | None = None) -> None:
    """Warn when the data (or the context) are far from standardized and the flow does not
    standardize them."""
    trains = any(p.requires_grad for p in flow.parameters())  # (closed form: any scale)
    if context is not None and getattr(flow, "context_scaler", None) is None and trains:
        spread = _first_rows(context).std(axis=0)
        varying = spread[spread > 0]
        if len(varying) and not 1e-3 <= varying.min() <= varying.max() <= 1e3:
            warn_user(
                f"the context's columns spread by {varying.min():.3g} to {varying.max():.3g} "
                "and this flow does not standardize its context: its conditioner networks "
                "work on values of order 1, so the fit will be poor. Build the flow with "
                "standardize=True, which standardizes the context too."
            )
    if standardize_layer(flow) is not None:
        return
    layers = _flat(flow.transform)
    if (layers and isinstance(layers[0], (ActNorm, BatchNorm))) or not trains:
        return  # (scaled from the data, or in closed form)
    sample = _first_rows(rows, flow)
    if not len(sample):
        return
    scale = float(np.abs(sample).max())
    spread = sample.std(axis=0)
    maps: list[Any] = [getattr(m, "monotonic", None) for m in flow.modules()]
    bounds = [float(f.bound) for f in maps if hasattr(f, "bins")]  # (spline layers)
    bound = min(bounds) if bounds else math.inf
    outside = float(np.mean(np.abs(sample) > bound))
    what = None
    if scale > 1e3:
        what = f"the training data reach {scale:.3g} in absolute value"
    elif outside > 0.1:  # (splines are the identity there: training moves nothing)
        what = (f"{outside:.0%} of the training values lie outside [-{bound:g}, {bound:g}], "
                "where this flow's splines are the identity,")
    elif 0 < (narrow := spread[spread > 0]).size and narrow.min() < 1e-3:
        what = (f"column {int(np.flatnonzero(spread == narrow.min())[0])} of the training "
                f"data spreads by {narrow.min():.3g} (a standard deviation)")
    if what is not None:
        warn_user(
            f"{what} and this flow has no standardization layer: its layers work on "
            "values of order 1 (splines act on [-bound, bound], affine scales are bounded "
            f"per layer), so the fit will be poor. {STANDARDIZE_ADVICE}."
        )


#: How far (in training standard deviations) a validation context may lie from the
#: training contexts: beyond it the flow extrapolates, and such a row's NLL (1e10, or inf)
#: outweighs the others at every step.
FAR_CONTEXT_SDS = 1e4


def _far_rows(rows: Rows, center: np.ndarray, spread: np.ndarray
              ) -> tuple[int, tuple[int, int, float] | None]:
    """How many rows lie more than :data:`FAR_CONTEXT_SDS` ``spread`` from ``center`` (in
    a column whose spread is above 0), and the farthest one: ``(row, column, value)``."""
    worst: tuple[float, int, int, float] | None = None
    count = 0
    scale = np.where(spread > 0, spread, 1.0)
    for start, part in rows.chunks(65536):
        values = part.detach().cpu().double().numpy()
        z = np.where(spread > 0, np.abs(values - center) / scale, 0.0)
        far = z > FAR_CONTEXT_SDS
        count += int(far.any(axis=1).sum())
        if far.any() and (worst is None or z.max() > worst[0]):
            i, j = np.unravel_index(np.argmax(z), z.shape)
            worst = (float(z.max()), start + int(i), int(j), float(values[i, j]))
    return count, None if worst is None else worst[1:]


def far_context_error(train: Rows, val: Rows, name: str = "val_context") -> DataError | None:
    """The error for validation contexts more than :data:`FAR_CONTEXT_SDS` standard
    deviations from the training contexts (in a column that varies in training); the model
    before training ignores its context, so the validation NLL of step 0 cannot show it."""
    moments = RunningMoments()
    for _, part in train.chunks(65536):
        moments.update(part.detach().cpu().double().numpy())
    mean, std = np.asarray(moments.mean), np.sqrt(np.asarray(moments.var(ddof=0)))
    count, worst = _far_rows(val, mean, std)
    if worst is None:
        return None
    row, column, value = worst
    return DataError(
        f"{name}: {counted(count, 'row')} {'lies' if count == 1 else 'lie'} more than "
        f"{FAR_CONTEXT_SDS:,.0f} standard deviations from the training contexts (row {row}: "
        f"{value:.3g} in column {column}, where the training contexts have mean "
        f"{mean[column]:.3g} and standard deviation {std[column]:.3g}): the flow "
        "extrapolates there, and such rows outweigh the others in the validation NLL at "
        "every step; drop them, or clip their values"
    )


def warn_if_far_training_context(context: Rows, name: str = "context") -> None:
    """Warn about training contexts more than :data:`FAR_CONTEXT_SDS` robust standard
    deviations (1.4826 median absolute deviations, estimated on the first 10,000 rows) from
    the median of their column: one such row sets the scale of a standardized context, and
    the flow's conditioning on the others is lost. (A warning: a heavy tail, a parameter
    drawn log-uniformly over many decades, can lie that far out too.)"""
    head = _first_rows(context)
    center = np.median(head, axis=0)
    spread = 1.4826 * np.median(np.abs(head - center), axis=0)
    count, worst = _far_rows(context, center, spread)
    if worst is None:
        return
    row, column, value = worst
    warn_user(
        f"{name}: {counted(count, 'row')} {'lies' if count == 1 else 'lie'} more than "
        f"{FAR_CONTEXT_SDS:,.0f} robust standard deviations from the other contexts (row "
        f"{row}: {value:.3g} in column {column}, whose median is {center[column]:.3g} and "
        f"robust standard deviation {spread[column]:.3g}): such rows set the context's "
        "scale, and the flow's conditioning on the others can be lost; drop an outlier, "
        "or take the logarithm of a column that spans many decades"
    )


def noise_std(noise: float | str | None, flow: Flow, rows: Rows) -> Tensor | None:
    """The per-feature standard deviation of the noise added to training inputs, or None.

    ``noise`` is in units of each column's standard deviation; ``"auto"`` follows the rule
    ``h = 0.25 n^(-1 / (4 + d))`` (the kernel-density bandwidth rate, Rothfuss et al.
    2019), which shrinks as rows grow.
    """
    if noise is None or noise == 0:
        return None
    if support_layer(flow) is not None:
        raise ValueError("noise= adds noise to the rows themselves, which can carry them "
                         "across the limits of a flow built with bounds=; leave it out")
    n, d = len(rows), flow.features
    if noise == "auto":
        h = 0.25 * n ** (-1.0 / (4 + d))
    else:
        h = non_negative_float(noise, "noise")
    layer = standardize_layer(flow)
    if layer is not None and not layer.pooled:
        std = layer.std.detach().double().cpu()
    else:  # each column's own spread, also under one pooled scale
        std = torch.as_tensor(Standardize.statistics(rows.data, name="training data")[1])
    return (h * std).float()
