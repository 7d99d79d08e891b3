"""Exact test metrics of a flow: the NLL with its standard error, and bits per dimension."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..scoring import eval_mode, log_prob, module_dtype
from ..stats import RunningMoments
from ..validation import SHOW, DataError, counted, index_list, positive_int, warn_user
from .batches import wrap, wrap_context
from .loop import resolve_device

__all__ = ["evaluate", "row_nll", "NLLSummary", "dominant_rows", "dominant_test_rows",
           "warn_dominant_rows"]

_LN2 = math.log(2.0)
_FAR_NLL = 1e9  # nats: a value 45,000 standard deviations from a Gaussian's mean
_FAR_RATIO = 1e6


class NLLSummary:
    """The pieces of a test NLL that merge across batches and processes.

    ``moments`` summarizes the finite per-row NLLs; ``nonfinite`` counts the others, and
    ``has_nan`` / ``has_neg_inf`` say what they were (a ``+inf`` log-density gives a
    ``-inf`` NLL, which is a wrong model, not a good one, and is reported as such).
    """

    def __init__(self) -> None:
        self.moments = RunningMoments()
        self.nonfinite = 0
        self.has_nan = False
        self.has_neg_inf = False
        self.rows = 0  # (this process's rows, in order: where the first non-finite ones are)
        self.nonfinite_at: list[int] = []

    def add(self, nll: torch.Tensor) -> None:
        """Add a batch of per-row NLLs (any dtype, any device)."""
        nll = nll.detach().to(torch.float64)
        finite = torch.isfinite(nll)
        values = nll[finite].cpu().numpy()
        self.moments.update(values)
        bad = nll[~finite]
        if bad.numel():
            where = (~finite).nonzero().flatten()[: SHOW - len(self.nonfinite_at)]
            self.nonfinite_at += (where + self.rows).tolist()
            self.nonfinite += int(bad.numel())
            self.has_nan |= bool(torch.isnan(bad).any())
            self.has_neg_inf |= bool((bad == -math.inf).any())
        self.rows += nll.numel()

    def merge(self, other: NLLSummary) -> NLLSummary:
        self.moments.merge(other.moments)
        self.nonfinite += other.nonfinite
        self.has_nan |= other.has_nan
        self.has_neg_inf |= other.has_neg_inf
        return self

    def to_list(self) -> list[float]:
        m = self.moments
        return [float(m.count), float(m.mean) if m.count else 0.0, float(m.m2) if m.count
                else 0.0, float(self.nonfinite), float(self.has_nan), float(self.has_neg_inf)]

    @classmethod
    def from_list(cls, values: list[float]) -> NLLSummary:
        out = cls()
        count, mean, m2, nonfinite, nan, neg_inf = values
        out.moments = RunningMoments(int(count), mean, m2)
        out.nonfinite, out.has_nan, out.has_neg_inf = int(nonfinite), bool(nan), bool(neg_inf)
        return out

    def metrics(self, n: int, features: int) -> dict[str, float]:
        """The metrics :func:`evaluate` reports, for ``n`` rows of ``features`` columns."""
        m = self.moments
        nll_finite = float(m.mean) if m.count else math.nan
        se_finite = m.standard_error()
        if self.nonfinite == 0:
            nll, se = nll_finite, se_finite
        elif self.has_nan:
            nll, se = math.nan, math.nan
        else:
            nll, se = (-math.inf if self.has_neg_inf else math.inf), math.nan
        scale = 1.0 / (features * _LN2)
        return {
            "nll": nll,
            "nll_se": se,
            "bpd": nll * scale,
            "bpd_se": se * scale,
            "nll_finite": nll_finite,
            "n": n,
            "n_nonfinite": self.nonfinite,
        }


def evaluate(
    flow: Any,
    data: Any,
    context: Any = None,
    *,
    batch_size: int = 8192,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Exact test metrics of a flow on data, in eval mode and under ``torch.inference_mode``.

    The NLL is ``-(1/n) sum_i log p(x_i)``; its standard error is the sample standard
    deviation of ``-log p(x_i)`` over ``sqrt(n)``; bits per dimension are ``NLL / (d ln 2)``,
    of the data as given: for images dequantized and scaled to ``(0, 1)`` (``y = (k + u) /
    K``) the usual bound on the discrete data's bits is ``bpd + log2 K``.
    Rows whose log-probability is not finite are counted in ``n_nonfinite`` and not
    hidden: then ``nll`` is ``inf`` (a ``-inf`` log-density) or ``nan``, and ``nll_finite``
    gives the mean over the finite rows only. The data are read in slices of ``batch_size``
    rows (a memmap is never loaded whole) and statistics are accumulated in float64.
    The flow's train/eval modes are restored afterwards.

    Args:
        flow: the flow to score.
        data: ``(n, features)`` tensor, array or memmap.
        context: ``(n, context_features)`` for a conditional flow.
        batch_size: rows per forward pass.
        device: where to compute; default the flow's device (a flow elsewhere is moved
            there).

    Returns:
        ``{"nll", "nll_se", "bpd", "bpd_se", "nll_finite", "n", "n_nonfinite"}``.

    Example:
        >>> import torch, exactflow as ef
        >>> flow = ef.Flow(ef.transforms.ElementwiseAffine(2), ef.StandardNormal(2))
        >>> out = ef.evaluate(flow, torch.zeros(4, 2))
        >>> round(out["nll"], 4), out["n"], out["n_nonfinite"]
        (1.8379, 4, 0)
    """
    rows = wrap(data, "data", flow.features)
    summary = summarize(flow, rows, context, batch_size=batch_size, device=device)
    return summary.metrics(len(rows), flow.features)


def row_nll(flow: Any, data: Any, context: Any = None) -> torch.Tensor:
    """``-log p`` of every row of ``data``, float64 on the CPU (as :func:`evaluate` scores
    them): the per-row numbers behind a comparison of two models on the same rows."""
    return torch.cat(list(_row_nll(flow, data, context))).double().cpu()


def summarize(
    flow: Any,
    data: Any,
    context: Any = None,
    *,
    batch_size: int = 8192,
    device: str | torch.device | None = None,
) -> NLLSummary:
    """The mergeable :class:`NLLSummary` behind :func:`evaluate`."""
    summary = NLLSummary()
    for nll in _row_nll(flow, data, context, batch_size, device):
        summary.add(nll)
    return summary


def _row_nll(flow: Any, data: Any, context: Any, batch_size: int = 8192,
             device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
    """``-log p`` of every row, a batch at a time, in eval mode without gradients."""
    batch_size = positive_int(batch_size, "batch_size")
    rows = wrap(data, "data", flow.features)
    ctx_rows = wrap_context(flow, context, "context", len(rows))
    dev = resolve_device(device, flow)
    if dev != resolve_device(None, flow):
        flow.to(dev)
    dtype = module_dtype(flow)
    in_dtype = getattr(flow, "input_dtype", dtype)
    ctx_dtype = getattr(flow, "context_dtype", dtype)
    with eval_mode(flow, grad=True), torch.inference_mode():
        for start, part in rows.chunks(batch_size):
            x = part.to(dev, in_dtype)
            ctx = None
            if ctx_rows is not None:
                ctx = ctx_rows.take(torch.arange(start, start + x.shape[0])).to(dev, ctx_dtype)
            yield -(flow.log_prob(x) if ctx is None else flow.log_prob(x, ctx))  # (-inf: beyond
            # a flow's bounds=)


def unscorable_error(flow: Any, rows: Any, context: Any, name: str, train: Any,
                     train_context: Any, nll: float | None) -> DataError | None:
    """The error for rows so far beyond the training rows (a value such as ``1e30``) that
    the model before training scores them ``-inf``, NaN, or below the first training
    rows' worst log-density by a factor of a million (and by at least ``1e9`` nats, a
    value 45,000 standard deviations out): among the validation rows they make the NLL
    infinite, or dominate it, at every step, and no step could be chosen on it. None
    where there are no such rows, or where the training rows score non-finitely too (the
    model's fault: training says what went wrong). ``nll``, the rows' mean NLL under the
    model, tells where there can be none (then the rows are not scored again)."""
    rows = wrap(rows, name, flow.features)
    if nll is not None and nll < _FAR_NLL / len(rows):
        return None
    first = torch.arange(min(len(train), 1024))
    sample = wrap(train, "training data", flow.features).take(first)
    context_rows = wrap_context(flow, train_context, "context", len(train))
    sample_context = None if context_rows is None else context_rows.take(first)
    worst = torch.cat(list(_row_nll(flow, sample, sample_context))).double()
    if not bool(worst.isfinite().all()):
        return None
    limit = max(_FAR_NLL, _FAR_RATIO * float(worst.abs().max()))
    each = torch.cat(list(_row_nll(flow, rows, context))).double().cpu()
    far = (~(each <= limit)).nonzero().flatten()
    if not len(far):
        return None
    values = rows.take(far[:SHOW])
    size = values.double().abs().nan_to_num(0.0)
    column = int(size.amax(0).argmax())
    overflow = not bool(each[far].isfinite().any())
    verb = "scores" if len(far) == 1 else "score"
    score = "-inf" if overflow else (
        f"below {-limit:.3g} (the training rows' lowest: {-float(worst.max()):.3g})")
    effect = ("with them the validation NLL is inf at every step and chooses no step"
              if overflow else "they dominate the validation NLL at every step, which then "
              "chooses no step")
    return DataError(
        f"{name}: {counted(len(far), 'row')} {verb} {score} under the model before "
        f"training, one with {float(size[:, column].max()):.3g} in column {column}, far "
        f"beyond the training rows: {effect}; drop such rows, or clip their values"
    )


#: At most this many validation rows are looked at for rows that decide the choice alone.
_DOMINANT_SCAN = 50_000
#: Far rows, at most 1% of the validation rows, adding this many nats to the mean
#: validation NLL can decide the choice (the ladder's candidates often differ by less).
_DOMINANT_NATS = 0.1


def dominant_rows(nll: np.ndarray, d: int) -> tuple[np.ndarray, float, float, float] | None:
    """The rows of ``nll`` (per-row NLLs of ``d``-column rows) that dominate their mean, by
    the rule of :func:`warn_dominant_rows`: ``(rows, nats they add to the mean, their share
    of its excess over the median row's, the distance in nats)``, or None."""
    finite = nll[np.isfinite(nll)]
    if not len(finite):
        return None
    median = float(np.median(finite))
    limit = max(50.0, 20 * math.sqrt(d / 2))
    far = np.flatnonzero(nll > median + limit)
    if not len(far):
        return None
    excess = float((nll[far] - median).sum())
    share = excess / float((nll - median).clip(min=0).sum())
    added = excess / len(nll)  # nats their excess adds to the mean NLL
    if share < 0.5 and (added < _DOMINANT_NATS or len(far) > 0.01 * len(nll)):
        return None
    return far, added, share, limit


def warn_dominant_rows(flow: Any, val_rows: Any, val_ctx: Any, where: str) -> None:
    """Warn when a few validation rows score so far below the others under the chosen
    model that the mean validation NLL, by which every candidate was chosen, is mostly
    theirs: rows more than ``max(50, 20 sqrt(d / 2))`` nats (20 standard deviations of a
    Gaussian's log-density) above the median row's NLL, making half its excess over the
    median or, at most 1% of the rows, adding 0.1 nats to it. (A row 30 standard deviations out
    on a 13-column table made the ladder pick a 1-component mixture over 3.) The rows are
    named by ``val_rows.origin`` where it is set, ``where`` saying of what."""
    n = min(len(val_rows), _DOMINANT_SCAN)
    ctx = None if val_ctx is None else val_ctx.data[:n]
    found = dominant_rows(-log_prob(flow, val_rows.data[:n], ctx), int(val_rows.data.shape[1]))
    if found is None:
        return
    far, added, share, limit = found
    numbers = far if val_rows.origin is None else val_rows.origin[far]
    one = len(far) == 1
    warn_user(
        f"{counted(len(far), 'validation row')} (row{'' if one else 's'} "
        f"{index_list(numbers, len(far))} {where}) score{'s' if one else ''} more than "
        f"{limit:.0f} nats below the median row under the chosen model, adding {added:.2f} "
        f"nats to the mean validation NLL by which the models were chosen ({share:.0%} of "
        f"its excess over the median row's): the choice may be {'its' if one else 'theirs'} "
        f"more than the other rows'. If {'it is an error' if one else 'they are errors'}, "
        "remove and fit again"
    )


def dominant_test_rows(flow: Any, test: np.ndarray) -> dict[str, Any] | None:
    """The test rows that score so far below the others that the test NLL is mostly theirs
    (:func:`dominant_rows`, on the first 50,000 test rows), with the NLL of
    the rest, or None."""
    n = min(len(test), 50_000)
    nll = -log_prob(flow, test[:n])
    found = dominant_rows(nll, int(test.shape[1]))
    if found is None:
        return None
    far, _, _, limit = found
    rest = np.delete(nll, far)
    return {"rows": int(len(far)), "of": n, "nats_below_median": limit,
            "nll_of_the_others": float(rest.mean())}
