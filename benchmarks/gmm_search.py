"""The mixture search of ``model="auto"`` on large tables: a subset of rows, or every row?

``python -m benchmarks.gmm_search`` draws tables of 100,000 training rows (and 10,000
validation and test rows) from known Gaussian mixtures and runs the search of the auto
ladder (``exactflow.training.mixtures.search_gmm``, sizes 1 to 20, full and diagonal
covariances, on standardized columns) within its share of a budget (a quarter of
``--budget``, 45 s by default as in ``FlowDensity``) three ways: as it runs, each setting
fitted on ``SEARCH_ROWS`` (20,000) of the training rows and the choice then on as many
as the last quarter of its time allows; with every setting fitted on every training row;
and as it ran before, sizes in increasing order on every row. The table
(``benchmarks/results/gmm-search.md``) gives the size and covariance chosen, the number
of mixtures fitted, the seconds taken, and the test NLL of the result against the true
mixture's (the best any model can do on those rows).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np
import torch

from .saving import command as saving_command
from .saving import publish

#: (columns, clusters) of the tables.
TABLES = ((6, 8), (16, 6), (3, 16))
#: The searches compared.
SEARCHES = ("subset", "every row", "in order")


def draw(features: int, clusters: int, rows: int, seed: int) -> tuple[np.ndarray, Any]:
    """``rows`` points of an equal-weight mixture of ``clusters`` Gaussians with random
    means and covariances, and the function giving the true log-density of points."""
    rng = np.random.default_rng(seed)
    means = 3.0 * rng.normal(size=(clusters, features))
    factors = 0.6 * rng.normal(size=(clusters, features, features))
    which = rng.integers(0, clusters, rows)
    x = means[which] + np.einsum("nij,nj->ni", factors[which], rng.normal(size=(rows, features)))

    def log_density(points: np.ndarray) -> np.ndarray:
        covs = factors @ factors.transpose(0, 2, 1)
        parts = []
        for mean, cov in zip(means, covs, strict=True):
            lower = np.linalg.cholesky(cov)
            y = np.linalg.solve(lower, (points - mean).T)
            parts.append(-0.5 * (y**2).sum(0) - np.log(np.diag(lower)).sum()
                         - 0.5 * features * math.log(2 * math.pi))
        stacked = np.stack(parts)
        top = stacked.max(0)
        return top + np.log(np.exp(stacked - top).mean(0))

    return x, log_density


def in_order(train: np.ndarray, val: np.ndarray, deadline: float) -> tuple[Any, int]:
    """The search as exactflow 0.2's development builds ran it before the subset: sizes
    1, 2, ..., 20 with full covariances, then diagonal, every setting on every row, until
    the deadline; returns the best mixture on validation and the number of fits."""
    from exactflow.gaussians import GaussianMixture

    best, fits = None, 0
    for covariance in ("full", "diag"):
        for k in range(1, 21):
            if best is not None and time.perf_counter() > deadline:
                return best[1], fits
            mix = GaussianMixture(train.shape[1], k, covariance).double().fit_to(train, seed=0)
            fits += 1
            with torch.no_grad():
                nll = float(-mix.log_prob(torch.as_tensor(val)).mean())
            if best is None or nll < best[0]:
                best = (nll, mix)
    assert best is not None
    return best[1], fits


def run(features: int, clusters: int, budget: float, search: str) -> dict[str, Any]:
    """One search (``subset``, ``every row`` or ``in order``) on a drawn table: what it
    chose and how well that scores the test rows."""
    from exactflow.gaussians import GaussianMixture
    from exactflow.training import mixtures

    x, truth = draw(features, clusters, 120_000, seed=features * 100 + clusters)
    train, val, test = x[:100_000], x[100_000:110_000], x[110_000:]
    mean, std = train.mean(0), train.std(0)
    z_train, z_val = (train - mean) / std, (val - mean) / std
    clock = time.perf_counter()
    rows = len(train)
    if search == "in order":
        mix, fits = in_order(z_train, z_val, clock + budget / 4)
    else:
        saved = mixtures.SEARCH_ROWS
        mixtures.SEARCH_ROWS = len(train) if search == "every row" else saved
        try:
            spec, _, fits, state, rows = mixtures.search_gmm(
                z_train, z_val, components=mixtures.GMM_COMPONENTS, seed=0,
                deadline=clock + budget / 4, folds=1)
        finally:
            mixtures.SEARCH_ROWS = saved
        mix = GaussianMixture(features, spec["components"], spec["covariance"]).double()
        mix.load_state_dict(state)
    seconds = time.perf_counter() - clock
    with torch.no_grad():  # (in the raw units: the standardization's log-Jacobian added)
        nll = float(-mix.log_prob(torch.as_tensor((test - mean) / std)).mean())
    spec = {"components": mix.components, "covariance": mix.covariance}
    return {
        "features": features, "clusters": clusters, "search": search,
        "components": spec["components"], "covariance": spec["covariance"], "fits": fits,
        "rows": rows,
        "seconds": seconds, "test_nll": nll + float(np.log(std).sum()),
        "true_nll": float(-truth(test).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=45.0,
                   help="the ladder's budget; the search gets a quarter of it")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for features, clusters in TABLES:
        for search in SEARCHES:
            r = run(features, clusters, args.budget, search)
            rows.append(r)
            print(f"d={features} K={clusters} {search}: "
                  f"{r['components']} {r['covariance']}, {r['fits']} fits in "
                  f"{r['seconds']:.1f} s, test NLL {r['test_nll']:.3f} "
                  f"(true {r['true_nll']:.3f})", flush=True)
    command = saving_command("gmm_search", argv)
    lines = [
        "# The mixture search on 100,000 training rows: a subset, or every row",
        "",
        f"`{command}` (torch {torch.__version__}, 1 thread): tables drawn from an "
        "equal-weight mixture of K Gaussians in d columns; the search gets a quarter of "
        f"the budget ({args.budget / 4:g} s) to choose among sizes 1-20, full and diagonal. "
        "`subset`: each setting fitted on 20,000 rows in three quarters of the time, the "
        "choice then on as many rows as the last quarter allows (`rows`; as the ladder "
        "runs); `every row`: each setting fitted on all 100,000 (both try the sizes "
        "coarse first: 1, 2, 4, 8, 16, then those between, each full and diagonal); `in "
        "order`: the search before the subset, sizes 1, 2, 3, ... full, then diagonal, "
        "every setting on every row. Test NLL in nats on 10,000 new rows; `true`: the "
        "generating mixture's.",
        "",
        "| d | K | search | chosen | rows | mixtures fitted | seconds | test NLL | true NLL |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['features']} | {r['clusters']} | "
            f"{r['search']} | {r['components']} "
            f"{r['covariance']} | {r['rows']:,} | {r['fits']} | {r['seconds']:.1f} | "
            f"{r['test_nll']:.3f} | {r['true_nll']:.3f} |"
        )
    publish("gmm-search", lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
