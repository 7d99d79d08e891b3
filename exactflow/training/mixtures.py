"""The Gaussian mixture of ``model="auto"``: its size (1 to 20) and covariance type (full or
diagonal), chosen by EM on validation rows or by k-fold cross-validation.

Choosing by 5-fold cross-validation instead of on one validation split was measured on the
six real tables of up to 1,000 rows and changed the test NLL by -0.10 to +0.25 nats, never
beyond two standard errors (``python -m benchmarks.gmm_folds``), so the ladder keeps the
single split and cross-validates only tables too small for one. On large tables each
setting is fitted on a subset of the rows, sizes coarse first, and the choice then on the
rows its time allows (``python -m benchmarks.gmm_search``).
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..datasets import cut_between_copies, shuffled_rows
from ..gaussians import GaussianMixture
from ..validation import positive_int
from .loop import clone

__all__ = ["GMM_COMPONENTS", "SEARCH_ROWS", "select_gmm", "search_gmm"]

#: The mixture sizes tried on validation.
GMM_COMPONENTS = tuple(range(1, 21))

#: A larger training set is searched on a random subset of this many rows; the chosen
#: mixture is then fitted to as many rows as the search's time allows.
SEARCH_ROWS = 20_000



class Search(NamedTuple):
    """What :func:`search_gmm` found: the setting, its validation NLL, the number of EM
    fits, the chosen mixture's state and the number of training rows it was fitted on."""

    spec: dict[str, Any]
    nll: float
    fits: int
    state: dict[str, Tensor] | None
    rows: int


def select_gmm(
    train: Any, val: Any, *, components: tuple[int, ...] = GMM_COMPONENTS, seed: int = 0,
    deadline: float | None = None, folds: int = 1,
) -> tuple[dict[str, Any], float, int]:
    """The mixture size and covariance type with the best held-out NLL, by EM; returns
    ``(spec, nll, fits)``. Stops early at ``deadline`` (``time.perf_counter()``) and keeps
    the best so far.

    With ``folds == 1`` each setting is fitted on ``train`` and scored on ``val``; above
    :data:`SEARCH_ROWS` training rows each is fitted on a random subset of that many, and
    the chosen one then on every row, or on as many as the last quarter of the time to the
    ``deadline`` allows (``nll`` is that fit's). With ``folds = k > 1`` the rows of
    ``train`` and ``val`` are pooled and each setting is scored by k-fold cross-validation
    (the mean NLL of every row when held out), for a small table whose validation split
    holds only a few dozen rows. Sizes are tried coarse first (1, 2, 4, 8, ..., then those
    between), each with both covariance types, so a search cut short spans the range.
    """
    found = search_gmm(train, val, components=components, seed=seed, deadline=deadline,
                        folds=folds)
    return found.spec, found.nll, found.fits


def search_gmm(
    train: Any, val: Any, *, components: tuple[int, ...], seed: int, deadline: float | None,
    folds: int,
) -> Search:
    """:func:`select_gmm`, with the chosen mixture's state as fitted on ``train`` (``None``
    with folds: no one fit covers every row) and the number of rows of that fit."""
    folds = positive_int(folds, "folds")
    x = np.asarray(train, dtype=np.float64)
    v = np.asarray(val, dtype=np.float64)
    if folds > 1:
        pooled = np.concatenate([x, v])
        order, starts = shuffled_rows(pooled, rng=np.random.default_rng(seed))
        sizes = [len(p) for p in np.array_split(order, folds)]  # copies of a row in one fold
        parts = [np.sort(p) for p in np.split(order, cut_between_copies(
            np.cumsum(sizes)[:-1], starts)) if len(p)]
        splits = [(np.delete(pooled, p, axis=0), torch.as_tensor(pooled[p])) for p in parts]
    else:
        subset = x
        if len(x) > SEARCH_ROWS:
            rng = np.random.default_rng(seed)
            subset = x[np.sort(rng.choice(len(x), SEARCH_ROWS, replace=False))]
        splits = [(subset, torch.as_tensor(v))]
    best: tuple[float, dict[str, Any]] | None = None
    chosen: GaussianMixture | None = None
    fits, took = 0, 0.0
    coarse_first = sorted(components, key=lambda k: (k & (k - 1) != 0, k))
    search_until = deadline  # (a subset's search leaves a quarter of its time for the refit)
    if deadline is not None and folds == 1 and len(splits[0][0]) < len(x):
        search_until = deadline - 0.25 * max(deadline - time.perf_counter(), 0.0)
    for k, covariance in ((k, c) for k in coarse_first for c in ("full", "diag")):
        if search_until is not None and time.perf_counter() > search_until and best:
            break
        total, held = 0.0, 0
        for fit_rows, score_rows in splits:
            if k > len(fit_rows):
                break
            mix = GaussianMixture(x.shape[1], k, covariance).double()
            clock = time.perf_counter()
            try:
                mix.fit_to(fit_rows, seed=seed)
            except ValueError:
                break
            clock = time.perf_counter() - clock
            fits += 1
            with torch.no_grad():
                total += float(-mix.log_prob(score_rows).sum())
            held += len(score_rows)
        else:
            nll = total / held
            if math.isfinite(nll) and (best is None or nll < best[0]):
                best = (nll, {"components": k, "covariance": covariance})
                chosen, took = mix, clock
    if best is None or chosen is None:
        raise ValueError("no Gaussian mixture could be fitted to the training rows")
    n_fit = len(splits[0][0]) if folds == 1 else 0
    if folds == 1 and n_fit < len(x):  # chosen on a subset: EM on as many rows as time allows
        room = math.inf if deadline is None else deadline - time.perf_counter()
        rows = int(min(len(x), n_fit * room / max(took, 1e-3)))  # (EM's time ~ its rows)
        if rows > n_fit:
            more = x if rows == len(x) else x[np.sort(np.random.default_rng(seed + 1).choice(
                len(x), rows, replace=False))]
            mix = GaussianMixture(x.shape[1], chosen.components, chosen.covariance).double()
            chosen, n_fit = mix.fit_to(more, seed=seed, start=chosen), rows
            fits += 1
            with torch.no_grad():
                best = (float(-chosen.log_prob(splits[0][1]).mean()), best[1])
    return Search(best[1], best[0], fits, clone(chosen.state_dict()) if folds == 1 else None,
                  n_fit)
