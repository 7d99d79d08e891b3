"""Tiny tables: what ``FlowDensity()`` keeps when the validation split holds a dozen rows.

``python -m benchmarks.tiny`` fits ``FlowDensity(budget=8)`` on the first ``n`` rows of
three small problems (a 3-D standard normal, two moons, the first five columns of
scikit-learn's wine table; the rest of each is the test set), three seeds each, twice:
with ``model="auto"`` as it is (fewer than ``MIN_VAL_ROWS`` validation rows keep a mixture
chosen by 5-fold cross-validation, no flow) and with that rule off (the whole ladder
chosen on the validation rows). The table (``benchmarks/results/tiny.md``) gives the mean
test log-density of both (higher is better) and the models kept.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from typing import Any

import numpy as np
import torch

from .saving import command as saving_command
from .saving import publish

PROBLEMS = ("normal3", "moons", "wine5")


def problem(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)``: ``n`` training rows of the problem, the rest to test on."""
    rng = np.random.default_rng(seed)
    if name == "normal3":
        x = rng.normal(size=(n + 3000, 3))
    elif name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n + 3000, noise=0.1, random_state=seed)
    elif name == "wine5":
        from sklearn.datasets import load_wine

        x = load_wine().data[:, :5]
        x = x[rng.permutation(len(x))]
    else:
        raise ValueError(f"unknown problem {name!r}")
    return x[:n], x[n:]


def fit_and_score(train: np.ndarray, test: np.ndarray, seed: int, budget: float,
                  rule: bool) -> tuple[float, str]:
    """Mean test log-density of ``FlowDensity`` and the name of the model it kept."""
    from exactflow.sklearn import FlowDensity
    from exactflow.training import auto

    saved = auto.MIN_VAL_ROWS
    auto.MIN_VAL_ROWS = saved if rule else 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = FlowDensity(budget=budget, random_state=seed).fit(train)
    finally:
        auto.MIN_VAL_ROWS = saved
    kept = next((e["name"] for e in est.leaderboard_ or () if e.get("chosen")), "?")
    return float(np.mean(est.score_samples(test))), kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20,50,100")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=float, default=8.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for name in PROBLEMS:
        for n in (int(v) for v in args.sizes.split(",")):
            result: dict[str, Any] = {"problem": name, "n": n}
            for rule in (True, False):
                scores, kept = [], []
                for seed in range(args.seeds):
                    train, test = problem(name, n, seed)
                    score, model = fit_and_score(train, test, seed, args.budget, rule)
                    scores.append(score)
                    kept.append(model)
                key = "rule" if rule else "ladder"
                result[key] = scores
                result[f"{key}_kept"] = kept
            rows.append(result)
            print(f"{name} n={n}: with the rule {statistics.mean(result['rule']):.3f}, "
                  f"whole ladder {statistics.mean(result['ladder']):.3f}", flush=True)
    lines = [
        "# Tiny tables: the mixture by cross-validation against the whole ladder",
        "",
        f"`{saving_command('tiny', argv)}`: mean test log-density (nats, higher is better) "
        f"of `FlowDensity(budget={args.budget:g})` over {args.seeds} seeds, with "
        "`model=\"auto\"`'s rule for fewer than `MIN_VAL_ROWS` validation rows and without "
        "it; the seeds' values and the models kept in brackets.",
        "",
        "| problem | rows | with the rule | whole ladder | difference |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        a, b = statistics.mean(r["rule"]), statistics.mean(r["ladder"])
        lines.append(
            f"| {r['problem']} | {r['n']} | {a:.3f} ({', '.join(f'{v:.2f}' for v in r['rule'])};"
            f" {', '.join(r['rule_kept'])}) | {b:.3f} "
            f"({', '.join(f'{v:.2f}' for v in r['ladder'])}; {', '.join(r['ladder_kept'])}) | "
            f"{a - b:+.3f} |"
        )
    publish("tiny", lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
