"""Sweep candidate recipes for exactflow's defaults on the real tables (``benchmarks.tables``).

Usage::

    # fit recipes (keyword arguments of benchmarks.realdata.Recipe) on every table, 3 splits
    python -m benchmarks.realdata_sweep fit --out sweep/a.pkl \\
        --recipes 'SM=dict(model="nsf", init="gmm", lr=3e-4); S=dict(model="nsf", init="none")'
    # selection on validation among fitted recipes (and gaussian/gmm), per table
    python -m benchmarks.realdata_sweep ladder sweep/a.pkl 'SM+S,gmm+S,SM'

``fit`` prints, per table and recipe, the mean test NLL over the splits and the paired
difference to the best classical estimator of the table (Gaussian, validation-selected
GaussianMixture or KDE, the same fits as ``benchmarks.realdata``; they are cached in
``--cache``), with its standard error, the non-finite test log-densities, the fit time
(the shared GaussianMixture selection is cached, so not included), the steps run and the
step of the best validation NLL per split. It stores every split's test log-densities and
validation NLL in ``--out`` for ``ladder``, which picks, split by split, the candidate with
the lowest validation NLL and reports the paired difference of the pick.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import realdata as rd
from . import tables as T

ORDER = T.names()
_select = rd.select_gmm
#: Where the classical fits are cached between runs (the system's temporary folder).
CACHE = Path(tempfile.gettempdir()) / "exactflow-realdata-sweep" / "classical.pkl"

_gm_cache: dict = {}


def _cached_select(train: np.ndarray, val: np.ndarray, seed: int):
    key = (hashlib.md5(train.tobytes()).hexdigest(), hashlib.md5(val.tobytes()).hexdigest(), seed)
    if key not in _gm_cache:
        _gm_cache[key] = _select(train, val, seed)
    return _gm_cache[key]


def classical(table: T.Table, s: int, cache: Path) -> dict:
    """Test log-densities and validation NLL of gaussian, gmm and kde on split ``s``."""
    store = pickle.loads(cache.read_bytes()) if cache.exists() else {}
    key = (table.name, s)
    if key not in store:
        sp = rd.make_split(table, s)
        mean = sp.train.mean(0)
        chol = rd._cholesky(np.cov(sp.train, rowvar=False, bias=True))
        out = {"gaussian": (rd.gaussian(sp).log_prob,
                            float(-rd._gauss_logpdf(sp.val, mean, chol).mean()), {})}
        f = rd.gmm(sp)
        out["gmm"] = (f.log_prob, f.info["val_nll"], f.info)
        f = rd.kde(sp)
        out["kde"] = (f.log_prob, f.info["val_nll"], f.info)
        store = pickle.loads(cache.read_bytes()) if cache.exists() else {}
        store[key] = out
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(store))
    return store[key]


def _best(cl: dict, seeds: list[int]) -> str:
    return min(("gaussian", "gmm", "kde"),
               key=lambda m: np.mean([-cl[s][m][0].mean() for s in seeds]))


def fit(args: argparse.Namespace) -> None:
    rd.select_gmm = _cached_select
    recipes = {}
    for part in args.recipes.split(";"):
        if part.strip():
            name, expr = part.split("=", 1)
            recipes[name.strip()] = rd.Recipe(**eval(expr, {"dict": dict}))  # noqa: S307
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = Path(args.cache)
    stored = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"load average {[round(v, 2) for v in os.getloadavg()]}", flush=True)
    for tname in args.tables.split(","):
        table = T.load(tname)
        if args.dequantize:
            table = T.dequantize(table)
        cl = {s: classical(table, s, cache) for s in seeds}
        best = _best(cl, seeds)
        best_nll = float(np.mean([-cl[s][best][0].mean() for s in seeds]))
        for rname, recipe in recipes.items():
            diffs, ses, nlls, times, nonfinite, steps, best_steps = [], [], [], [], 0, [], []
            for s in seeds:
                sp = rd.make_split(table, s)
                t0 = time.perf_counter()
                flow, info = rd.fit_recipe(recipe, sp.train, sp.val, sp.seed)
                dt = time.perf_counter() - t0
                lp = rd._score(flow, sp.test)
                ok = np.isfinite(lp)
                nonfinite += int((~ok).sum())
                d = (cl[s][best][0] - lp)[ok]
                diffs.append(float(d.mean()))
                ses.append(float(d.std(ddof=1) / math.sqrt(len(d))))
                nlls.append(float(-lp[ok].mean()))
                times.append(dt)
                steps.append(info["steps"])
                best_steps.append(info["best_step"])
                stored[(table.name, rname, s)] = {"lp": lp, "val": info["val_nll"], "time": dt,
                                                  "info": info}
            k = len(seeds)
            print(f"{table.name:9s} {rname:10s} NLL {np.mean(nlls):9.3f} (best {best} "
                  f"{best_nll:8.3f}) Δ {np.mean(diffs):+8.3f} ± "
                  f"{math.sqrt(sum(x * x for x in ses)) / k:.3f}  nf {nonfinite}  "
                  f"{np.mean(times):6.1f} s  steps {steps} best {best_steps}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        old = pickle.loads(Path(args.out).read_bytes()) if Path(args.out).exists() else {}
        old.update(stored)
        Path(args.out).write_bytes(pickle.dumps(old))


def ladder(args: argparse.Namespace) -> None:
    cl_all = pickle.loads(Path(args.cache).read_bytes())
    store: dict = {}
    for f in args.files.split(","):
        store.update(pickle.loads(Path(f).read_bytes()))
    names = sorted({k[0] for k in store}, key=lambda t: ORDER.index(t.split("+")[0]))
    for rungs in [x.split("+") for x in args.ladders.split(",")]:
        print("ladder", "+".join(rungs))
        for t in names:
            seeds = sorted({k[2] for k in store if k[0] == t})
            fitted = [r for r in rungs if r not in ("gmm", "gaussian")]
            if not all((t, r, s) in store for r in fitted for s in seeds):
                continue
            cl = {s: cl_all[(t, s)] for s in seeds}
            best = _best(cl, seeds)
            ds, ses, picks = [], [], []
            for s in seeds:
                c = {r: (cl[s][r][0], cl[s][r][1]) for r in rungs if r in ("gmm", "gaussian")}
                c.update({r: (store[(t, r, s)]["lp"], store[(t, r, s)]["val"]) for r in fitted})
                pick = min(c, key=lambda r: c[r][1])
                d = cl[s][best][0] - c[pick][0]
                ds.append(float(d.mean()))
                ses.append(float(d.std(ddof=1) / math.sqrt(len(d))))
                picks.append(pick)
            k = len(seeds)
            print(f"  {t:9s} Δ {np.mean(ds):+8.3f} ± {math.sqrt(sum(x * x for x in ses)) / k:.3f}"
                  f"  picks {picks}")


def flowdensity(args: argparse.Namespace) -> None:
    """``FlowDensity(model="realnvp")`` (the default before the auto ladder) against three
    changes, on train + validation of each split: ``a`` as is, ``b`` ``batch_norm=False``,
    ``c`` ``validation_fraction=0.2``, ``d`` as ``a`` with every BatchNorm's running
    statistics recomputed from all training rows in one pass (momentum 1) before
    scoring."""
    from exactflow.sklearn import FlowDensity  # noqa: PLC0415
    from exactflow.transforms import BatchNorm  # noqa: PLC0415

    for tname in args.tables.split(","):
        table = T.load(tname)
        res: dict[str, list[float]] = {k: [] for k in "abcd"}
        for s in [int(v) for v in args.seeds.split(",")]:
            sp = rd.make_split(table, s)
            x = np.concatenate([sp.train, sp.val])
            a = FlowDensity(model="realnvp", random_state=s).fit(x)
            res["a"].append(float(-a.score_samples(sp.test).mean()))
            low = [float(m.running_var.min()) for m in a.flow_.modules()
                   if isinstance(m, BatchNorm)]
            for m in a.flow_.modules():
                if isinstance(m, BatchNorm):
                    m.momentum = 1.0
            a.flow_.train()
            with torch.no_grad():
                a.flow_.log_prob(torch.as_tensor(x, dtype=torch.float64))
            a.flow_.eval()
            res["d"].append(float(-a.score_samples(sp.test).mean()))
            b = FlowDensity(model="realnvp", random_state=s,
                            model_kwargs={"batch_norm": False}).fit(x)
            res["b"].append(float(-b.score_samples(sp.test).mean()))
            c = FlowDensity(model="realnvp", random_state=s, validation_fraction=0.2).fit(x)
            res["c"].append(float(-c.score_samples(sp.test).mean()))
            print(f"  {tname} split {s}: smallest running variance per BatchNorm "
                  f"{[f'{v:.2g}' for v in low]}", flush=True)
        print(tname, {k: f"{np.mean(v):.4g}" for k, v in res.items()}, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realdata_sweep")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit recipes on the tables")
    f.add_argument("--recipes", required=True)
    f.add_argument("--tables", default=",".join(T.names()))
    f.add_argument("--seeds", default="0,1,2")
    f.add_argument("--out", default=None)
    f.add_argument("--dequantize", action="store_true")
    f.add_argument("--cache", default=str(CACHE))
    f.set_defaults(func=fit)
    g = sub.add_parser("ladder", help="select on validation among fitted recipes")
    g.add_argument("files", help="comma-separated .pkl files written by fit --out")
    g.add_argument("ladders", help="comma-separated ladders, rungs joined by +")
    g.add_argument("--cache", default=str(CACHE))
    g.set_defaults(func=ladder)
    h = sub.add_parser("flowdensity", help="FlowDensity(model='realnvp'): batch norm vs validation")
    h.add_argument("--tables", default="iris,wine")
    h.add_argument("--seeds", default="0,1,2")
    h.set_defaults(func=flowdensity)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
