"""Which rungs should ``model="auto"`` climb? Every rung trained, the pick simulated.

``python -m benchmarks.ladder`` runs ``exactflow.fit_auto`` on the real tables of
``tables.py`` (the training and validation rows of each split of ``realdata.py``, from
which it holds out its own validation rows, as ``FlowDensity()`` does) with a budget
large enough that no rung is cut short, and with every rung of the default ladder plus
the alternatives in ``EXTRA``. Each trained rung is scored on the split's test rows.
Ladders (subsets of the rungs, ``LADDERS``) are then compared as ``fit_auto`` would pick
among them: the rung with the lowest validation NLL, split by split.

The table (``benchmarks/results/ladder.md``) gives, per table, the mean test NLL of each
ladder's pick and its paired difference to the first ladder's pick (per test row, all
splits pooled) with its standard error; a second table gives each rung's test NLL and
mean fit seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any

import numpy as np
import torch

from . import realdata, tables
from .saving import command as saving_command
from .saving import publish

#: Rungs measured beside the default ladder: ``(name, config, options)``.
EXTRA: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("nsf (coupling)", {"model": "nsf", "kind": "coupling", "bins": 8, "layers": 5,
                        "hidden": [64, 64]}, {}),
]

#: Ladders to compare: name -> rung names (missing rungs, e.g. for d = 1, are skipped).
LADDERS: dict[str, list[str]] = {
    "coupling NSF on N(0, I)": ["gaussian", "gmm", "nsf on the mixture", "nsf (coupling)"],
    "autoregressive NSF on N(0, I)": ["gaussian", "gmm", "nsf on the mixture",
                                      "nsf-autoregressive"],
    "every rung": ["gaussian", "gmm", "nsf on the mixture", "nsf-autoregressive",
                   "nsf-autoregressive on the mixture", "maf on the mixture",
                   "realnvp on the mixture"],
}


def run_split(
    table: tables.Table, s: int, standardize: bool | str = "auto",
    hidden: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Fit every rung on split ``s``; one record per rung with its test log-densities and
    its validation rows' NLLs (those ``fit_auto`` held out and chose on)."""
    import exactflow.training.auto as auto

    sp = realdata.make_split(table, s)
    built: list[torch.nn.Module] = []
    build, ladder, row_nll = auto.build, auto.ladder, auto.row_nll
    val_nll: dict[int, np.ndarray] = {}

    def scored(flow: Any, rows: Any, context: Any = None) -> torch.Tensor:
        each = row_nll(flow, rows, context)
        val_nll[id(flow)] = each.numpy()
        return each

    def keep(config: dict[str, Any]) -> Any:
        model = build(config)
        built.append(model)
        return model

    def rungs(n: int, d: int, context: int = 0, gmm: Any = None) -> list[Any]:
        extra = [auto.Candidate(name, config, options) for name, config, options in EXTRA]
        out = ladder(n, d, context, gmm) + extra
        if hidden is not None:  # every flow rung with other conditioner sizes
            for rung in out:
                rung.config = {**rung.config, "hidden": list(hidden)}
        return out

    auto.build, auto.ladder, auto.row_nll = keep, rungs, scored  # type: ignore[assignment]
    try:
        result = auto.fit_auto(np.concatenate([sp.train, sp.val]), budget=3600.0, seed=sp.seed,
                               standardize=standardize)
    finally:
        auto.build, auto.ladder, auto.row_nll = build, ladder, row_nll  # type: ignore[assignment]
    out = []
    test = torch.as_tensor(sp.test)
    for entry, model in zip(result.leaderboard, built, strict=True):
        model.eval()
        dtype = next(iter(model.parameters()), test).dtype
        with torch.no_grad():
            lp = model.log_prob(test.to(dtype)).double().numpy()
        name = "gmm" if entry.name.startswith("gmm") else entry.name
        out.append({"rung": name, "val_nll": entry.val_nll, "test_lp": lp,
                    "val_rows_nll": val_nll.get(id(model)), "seconds": entry.seconds,
                    "steps": entry.steps})
    return out


def pick(records: list[dict[str, Any]], rungs: list[str]) -> dict[str, Any]:
    """The record ``fit_auto`` would keep among ``rungs``: the lowest validation NLL."""
    found = [r for r in records if r["rung"] in rungs and r["val_nll"] is not None]
    return min(found, key=lambda r: r["val_nll"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", default=",".join(tables.names()))
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--standardize", default="auto", choices=["auto", "columns", "pooled"],
                   help="the models' standardization layer (fit_auto's standardize=)")
    p.add_argument("--no-standardize", dest="standardize", action="store_const", const=False,
                   help="no standardization layer in the models (the splits are already "
                   "standardized, per column or, for digits, by one global scale)")
    p.add_argument("--hidden", type=lambda v: [int(h) for h in v.split(",")],
                   help="conditioner sizes for every flow rung, e.g. 32,32 (default: the "
                   "ladder's)")
    p.add_argument("--split-scale", choices=["table", "global"], default="table",
                   help="how the splits are scaled before the models see them: as "
                   "realdata.py scales the table, or by one global mean and scale")
    p.add_argument("--name", default="ladder", help="results/<name>.md and .json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    names = list(LADDERS)
    summary: list[dict[str, Any]] = []
    for name in args.tables.split(","):
        table = tables.load(name)
        if args.split_scale == "global":
            table = dataclasses.replace(table, scale="global")
        splits = [run_split(table, s, args.standardize, args.hidden)
                  for s in range(args.splits)]
        row: dict[str, Any] = {"table": name, "ladders": {}, "rungs": {}}
        first = np.concatenate([pick(sp, LADDERS[names[0]])["test_lp"] for sp in splits])
        for ladder in names:
            lp = np.concatenate([pick(sp, LADDERS[ladder])["test_lp"] for sp in splits])
            diff = first - lp  # NLL difference to the first ladder's pick
            row["ladders"][ladder] = {
                "nll": float(-lp.mean()), "diff": float(diff.mean()),
                "se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
                "picks": [pick(sp, LADDERS[ladder])["rung"] for sp in splits],
            }
        for rung in dict.fromkeys(r["rung"] for sp in splits for r in sp):
            recs = [r for sp in splits for r in sp if r["rung"] == rung]
            row["rungs"][rung] = {
                "nll": float(-np.concatenate([r["test_lp"] for r in recs]).mean()),
                "seconds": float(np.mean([r["seconds"] for r in recs])),
            }
        summary.append(row)
        print(name, {k: round(v["nll"], 3) for k, v in row["ladders"].items()}, flush=True)
    command = saving_command("ladder", argv)
    lines = [
        "# The rungs of model=\"auto\": every rung trained, the pick simulated",
        "",
        f"`{command}`: {args.splits} splits per table, {time.perf_counter() - start:.0f} s. "
        "Test NLL (nats) of the rung each ladder picks on validation; in brackets the "
        f"paired difference to the pick of \"{names[0]}\" ± its standard error "
        "(per test row, splits pooled; negative: better).",
        "",
        "| table | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for row in summary:
        cells = [f"{v['nll']:.3f} ({v['diff']:+.2f} ± {v['se']:.2f})"
                 for v in row["ladders"].values()]
        lines.append(f"| {row['table']} | " + " | ".join(cells) + " |")
    rungs = list(dict.fromkeys(r for row in summary for r in row["rungs"]))
    lines += ["", "Each rung's test NLL and mean fit seconds:", "",
              "| table | " + " | ".join(rungs) + " |", "| --- |" + " ---: |" * len(rungs)]
    for row in summary:
        cells = [f"{row['rungs'][r]['nll']:.3f}, {row['rungs'][r]['seconds']:.1f} s"
                 if r in row["rungs"] else "" for r in rungs]
        lines.append(f"| {row['table']} | " + " | ".join(cells) + " |")
    publish(args.name, lines, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
