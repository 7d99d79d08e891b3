"""Does choosing the Gaussian mixture by k-fold cross-validation beat one validation split?

``python -m benchmarks.gmm_folds`` takes the real tables of up to 1,000 rows
(``tables.py``) and, on each of the six splits of ``realdata.py``, chooses the mixture's
size (1 to 20) and covariance type (full or diagonal) twice with
``exactflow.training.auto.select_gmm``: on the validation rows, as ``model="auto"`` does,
and by 5-fold cross-validation over the training and validation rows pooled. Each choice
is then fitted on the training rows and scored on the test rows. The table
(``benchmarks/results/gmm-folds.md``) gives the mean test NLL of both, the paired
difference (cross-validation minus validation) with its standard error over the splits,
and the selection time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np
import torch

from . import realdata, tables
from .saving import command as saving_command
from .saving import publish


def compare(name: str, folds: int = 5, splits: int = realdata.BLOCKS) -> dict[str, Any]:
    """Test NLLs of the mixture chosen on validation and by ``folds``-fold CV."""
    from exactflow.gaussians import GaussianMixture
    from exactflow.training.auto import select_gmm

    table = tables.load(name)
    nll: dict[int, list[float]] = {1: [], folds: []}
    seconds: dict[int, float] = {1: 0.0, folds: 0.0}
    for s in range(splits):
        sp = realdata.make_split(table, s)
        for k in nll:
            clock = time.perf_counter()
            spec, _, _ = select_gmm(sp.train, sp.val, seed=s, folds=k)
            seconds[k] += time.perf_counter() - clock
            mix = GaussianMixture(sp.features, spec["components"], spec["covariance"])
            mix = mix.double().fit_to(sp.train, seed=s)
            with torch.no_grad():
                nll[k].append(float(-mix.log_prob(torch.as_tensor(sp.test)).mean()))
    diff = np.array(nll[folds]) - np.array(nll[1])
    return {
        "table": name, "rows": len(table.data), "splits": splits, "folds": folds,
        "val_nll": float(np.mean(nll[1])), "cv_nll": float(np.mean(nll[folds])),
        "diff": float(diff.mean()), "diff_se": float(diff.std(ddof=1) / math.sqrt(splits)),
        "val_seconds": seconds[1] / splits, "cv_seconds": seconds[folds] / splits,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", default="iris,wine,penguins,diabetes,cancer,quakes")
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.tables.split(","):
        r = compare(name, args.folds)
        rows.append(r)
        print(f"{name}: validation {r['val_nll']:.3f}, {args.folds}-fold {r['cv_nll']:.3f}, "
              f"difference {r['diff']:+.3f} ± {r['diff_se']:.3f}", flush=True)
    command = saving_command("gmm_folds", argv)
    lines = [
        "# Choosing the Gaussian mixture: one validation split or k-fold cross-validation",
        "",
        f"`{command}`: test NLL (nats) of the chosen mixture fitted on the training rows, "
        f"mean over {rows[0]['splits']} splits; difference = cross-validation minus "
        "validation, paired by split (negative: cross-validation better).",
        "",
        "| table | rows | validation | cross-validation | difference | "
        "seconds (validation / CV) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['table']} | {r['rows']} | {r['val_nll']:.3f} | {r['cv_nll']:.3f} | "
            f"{r['diff']:+.3f} ± {r['diff_se']:.3f} | {r['val_seconds']:.1f} / "
            f"{r['cv_seconds']:.1f} |"
        )
    publish("gmm-folds", lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
