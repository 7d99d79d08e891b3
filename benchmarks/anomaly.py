"""False-alarm rate of ``exactflow score --threshold-quantile q`` on new normal rows.

For each seed: draw a table from a known distribution (a 5-D mixture of three correlated
Gaussians, or a 2-D toy), train a run on it with the defaults (``model="auto"``), draw
3,000 *new* rows from the same distribution, and count the rows flagged at ``q``. The
conformal p-values (against the run's held-out test rows) should flag about ``q``; the old
rule (a threshold at the ``q``-quantile of the training rows' log-densities) is shown for
comparison: it flags more, since a model scores its own training rows optimistically.

    python -m benchmarks.anomaly                       # 5 seeds, q = 0.05
    python -m benchmarks.anomaly --seeds 10 --q 0.01 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

import exactflow as ef
from exactflow.runs import anomaly, train_run
from exactflow.scoring import log_prob


def mixture(n: int, rng: np.random.Generator) -> np.ndarray:
    centres = np.array([[0, 0, 0, 0, 0], [4, 1, -2, 0, 3], [-3, 3, 1, 2, -1]], dtype=float)
    mix = np.array([[1.0, 0.5, 0.0, 0.0, 0.2], [0.0, 1.0, 0.4, 0.0, 0.0],
                    [0.0, 0.0, 1.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.5, 0.1],
                    [0.0, 0.0, 0.0, 0.0, 0.7]])
    k = rng.integers(0, 3, n)
    return centres[k] + rng.normal(size=(n, 5)) @ mix


def one(seed: int, q: float, n_train: int, n_new: int, budget: float) -> dict:
    rng = np.random.default_rng(seed)
    rows, new = mixture(n_train, rng), mixture(n_new, rng)
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "rows.npy")
        np.save(data, rows)
        start = time.perf_counter()
        run = train_run(data, os.path.join(folder, "run"), budget=budget, seed=seed,
                        progress=False, log=lambda text: None)
        seconds = time.perf_counter() - start
        scores = run.score(new)
        _, flags = anomaly.flag(scores, run.calibration(), q)
        test_only = log_prob(run.flow, run.data("test"))
        _, flags_test = anomaly.flag(scores, test_only, q)
        train_scores = log_prob(run.flow, run.data("train"))
        old = scores < np.quantile(train_scores, q)
    return {"seed": seed, "model": run.info["model"]["model"],
            "calibration": len(run.calibration()), "conformal": float(flags.mean()),
            "conformal_test_only": float(flags_test.mean()),
            "training_quantile": float(old.mean()), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--q", type=float, default=0.05)
    parser.add_argument("--rows", type=int, default=5000, help="rows of each training table")
    parser.add_argument("--new", type=int, default=3000, help="new normal rows scored")
    parser.add_argument("--budget", type=float, default=60.0, help="fit_auto budget (s)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()}, "
          f"exactflow {ef.__version__}")
    results = []
    for seed in range(args.seeds):
        r = one(seed, args.q, args.rows, args.new, args.budget)
        results.append(r)
        print(f"seed {seed}: {r['model']:<6} flagged {r['conformal']:.2%} (conformal, "
              f"{r['calibration']} held-out rows; {r['conformal_test_only']:.2%} against the "
              f"test rows alone) vs {r['training_quantile']:.2%} (training quantile); "
              f"{r['seconds']:.0f} s")
    conformal = np.array([r["conformal"] for r in results])
    test_only = np.array([r["conformal_test_only"] for r in results])
    old = np.array([r["training_quantile"] for r in results])
    print(f"q = {args.q}: conformal {conformal.mean():.2%} (range {conformal.min():.2%}-"
          f"{conformal.max():.2%}); test rows alone {test_only.mean():.2%} (range "
          f"{test_only.min():.2%}-{test_only.max():.2%}); training quantile {old.mean():.2%} "
          f"(range {old.min():.2%}-{old.max():.2%})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"q": args.q, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
