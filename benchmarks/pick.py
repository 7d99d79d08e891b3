"""How should ``model="auto"`` pick among its rungs? Every rung trained, the rules simulated.

``python -m benchmarks.pick`` trains every rung of the default ladder on each split, as
``benchmarks/ladder.py`` does (the real tables of ``tables.py`` and four synthetic ones
where the answer is known: Gaussian rows, on which no rung can beat the Gaussian, and
Student-t rows), records each rung's per-row NLL on the validation rows ``fit_auto`` held
out and its test log-densities, and replays the pick in ladder order: a later rung
replaces the best so far when its validation NLL is lower by more than ``z`` standard
errors of the per-row difference (``z = 0``: the lowest validation NLL, the rule before
``exactflow.training.auto.MARGIN_SE``).

The table (``benchmarks/results/pick.md``) gives, per table and ``z``, the test NLL of
the pick, averaged over the splits' test rows, and its paired difference to ``z = 0``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np
import torch

from . import tables
from .ladder import LADDERS, run_split
from .saving import command as saving_command
from .saving import publish

RULES = (0.0, 0.5, 1.0, 2.0)


def synthetic(name: str) -> tables.Table:
    """Rows where the best rung is known: correlated Gaussian rows (the Gaussian rung is
    the true model) and Student-t rows (4 degrees of freedom: heavy tails)."""
    rng = np.random.default_rng(123)
    d, n = {"gauss3": (3, 1200), "gauss8": (8, 400), "gauss5": (5, 3000), "t5": (5, 1500)}[name]
    if name == "t5":
        x = rng.standard_t(4, size=(n, d)) @ rng.normal(size=(d, d))
    else:
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    return tables.Table(name, x, [f"x{i}" for i in range(d)], source="synthetic (seed 123)")


SYNTHETIC = ("gauss3", "gauss8", "gauss5", "t5")


def pick(records: list[dict[str, Any]], z: float) -> dict[str, Any]:
    """The rung kept when a later one must beat the best so far by more than ``z``
    standard errors of the paired per-row difference of their validation NLLs."""
    rungs = LADDERS["every rung"]
    found = [r for r in records if r["rung"] in rungs and r["val_rows_nll"] is not None]
    best = found[0]
    for rec in found[1:]:
        gain = best["val_rows_nll"] - rec["val_rows_nll"]  # (> 0: this one better)
        if gain.mean() > max(z * gain.std(ddof=1) / math.sqrt(len(gain)), 1e-6):
            best = rec
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", default=",".join([*SYNTHETIC, *tables.names()]))
    p.add_argument("--splits", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    summary: list[dict[str, Any]] = []
    for name in args.tables.split(","):
        table = synthetic(name) if name in SYNTHETIC else tables.load(name)
        splits = [run_split(table, s) for s in range(args.splits)]
        base = np.concatenate([pick(sp, 0.0)["test_lp"] for sp in splits])
        row: dict[str, Any] = {"table": name, "rows": list(table.shape), "rules": {}}
        for z in RULES:
            lp = np.concatenate([pick(sp, z)["test_lp"] for sp in splits])
            diff = base - lp  # (test NLL of this rule's pick minus z = 0's; < 0: better)
            row["rules"][str(z)] = {
                "nll": float(-lp.mean()), "diff": float(diff.mean()),
                "se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
                "picks": [pick(sp, z)["rung"] for sp in splits]}
        summary.append(row)
        print(name, {z: round(v["nll"], 3) for z, v in row["rules"].items()}, flush=True)
    lines = [
        "# How model=\"auto\" picks: every rung trained, the rules replayed",
        "",
        f"`{saving_command('pick', argv)}`: {args.splits} splits per table, "
        f"{time.perf_counter() - start:.0f} s. Test NLL (nats) of the pick when a later rung "
        "must beat the best so far on validation by more than z standard errors of the "
        "per-row difference; in brackets the paired difference to z = 0 (the lowest "
        "validation NLL) ± its standard error (test rows, splits pooled; negative: better).",
        "",
        "| table | rows x columns | " + " | ".join(f"z = {z:g}" for z in RULES) + " |",
        "| --- | --- |" + " ---: |" * len(RULES),
    ]
    for row in summary:
        cells = [f"{v['nll']:.3f} ({v['diff']:+.3f} ± {v['se']:.3f})"
                 for v in row["rules"].values()]
        lines.append(f"| {row['table']} | {row['rows'][0]} x {row['rows'][1]} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Picks per split:", "", "| table | " + " | ".join(
        f"z = {z:g}" for z in RULES) + " |", "| --- |" + " --- |" * len(RULES)]
    for row in summary:
        lines.append(f"| {row['table']} | " + " | ".join(
            ", ".join(v["picks"]) for v in row["rules"].values()) + " |")
    publish("pick", lines, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
