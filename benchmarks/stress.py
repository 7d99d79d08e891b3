"""Stress sweep: NaN in losses, log-densities or samples, by builder, data and seed.

``python -m benchmarks.stress`` trains every builder on every 2D toy for 10 seeds with the
settings of ``exactflow train`` (standardization layer first, Adam at 1e-3, batch 512,
gradient clipping at 5, cosine schedule, the builder's default architecture;
``--steps``, 2000 by default as in ``exactflow train``), then checks each model:

* **training**: NaN or inf in the recorded training/validation NLL, rollbacks (non-finite
  steps undone), a ``TrainingError``;
* **log-densities** of the test split, and of far-out rows (``|x| = 1e3`` and ``1e6`` on
  each axis and both together), in float32 (as trained) and in float64 (the model cast):
  the public ``Flow.log_prob`` (never NaN by contract), and the raw sum
  ``log p_base(z) + log|det|`` that the layers compute, to find where NaN would arise;
* **samples**: NaN or inf among 2000 draws.

Then it trains every builder, in float32 and float64, on inputs that are hard for a
flow: every row **duplicated** 10 times; two **nearly collinear** columns
(``x2 = x1 + 1e-5 noise``: ``ef.fit`` refuses 1e-6 as linearly dependent); one
**nearly constant** column (``1 + 1e-7 noise``).

The summary table (one row per builder) goes to ``benchmarks/results/stress.md`` with
every failure listed (builder, data, seed, dtype, where); the per-model records to
``stress.json``. A small version of the sweep runs in ``tests/test_stress.py``.

Examples::

    python -m benchmarks.stress                       # the full sweep (hours on one core)
    python -m benchmarks.stress --steps 100 --jobs 2  # shorter training, two processes
    python -m benchmarks.stress --builders maf,nsf --toys moons --seeds 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from .saving import save

#: name -> builder config (without features).
BUILDERS: dict[str, dict[str, Any]] = {
    "realnvp": {"model": "realnvp"},
    "nice": {"model": "nice"},
    "maf": {"model": "maf"},
    "iaf": {"model": "iaf"},
    "nsf-coupling": {"model": "nsf", "kind": "coupling"},
    "nsf-autoregressive": {"model": "nsf", "kind": "autoregressive"},
    "planar": {"model": "planar"},
    "radial": {"model": "radial"},
}
HARD = ("duplicated", "collinear", "near-constant")
FAR = (1e3, 1e6)


def far_rows(scale: float) -> np.ndarray:
    """Rows at ``|x| = scale``: on each axis, both signs, and on the diagonal."""
    s = scale
    return np.array([[s, 0], [-s, 0], [0, s], [0, -s], [s, s], [-s, -s], [s, -s]], float)


def hard_data(kind: str, n: int, seed: int) -> np.ndarray:
    """Toy-sized data that is hard for a flow (see the module docstring)."""
    import exactflow as ef

    rng = np.random.default_rng(seed)
    if kind == "duplicated":
        base = ef.datasets.toy("moons", max(n // 10, 10), seed=seed).double().numpy()
        return np.repeat(base, 10, axis=0)[rng.permutation(len(base) * 10)]
    x1 = rng.normal(size=n)
    if kind == "collinear":
        return np.stack([x1, x1 + 1e-5 * rng.normal(size=n)], axis=1)
    if kind == "near-constant":
        return np.stack([x1, 1.0 + 1e-7 * rng.normal(size=n)], axis=1)
    raise ValueError(kind)


def _count(values: torch.Tensor) -> dict[str, int]:
    v = values.detach()
    return {"nan": int(torch.isnan(v).sum()), "posinf": int((v == math.inf).sum()),
            "neginf": int((v == -math.inf).sum())}


def _raw_log_prob(flow: Any, x: torch.Tensor) -> torch.Tensor:
    # What the layers compute, before Flow.log_prob maps overflow (NaN) to -inf.
    z, ladj = flow.transform(x, None)
    return flow.base.log_prob(z) + ladj


def check_model(flow: Any, test: np.ndarray) -> dict[str, Any]:
    """NaN/inf counts of log-densities (test and far-out rows, float32 and float64, raw
    and public) and of samples."""
    out: dict[str, Any] = {}
    for dtype_name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        model = flow.to(dtype).eval()
        with torch.no_grad():
            x = torch.as_tensor(test, dtype=dtype)
            out[f"test/{dtype_name}"] = _count(model.log_prob(x))
            out[f"test/{dtype_name}/raw"] = _count(_raw_log_prob(model, x))
            for scale in FAR:
                x = torch.as_tensor(far_rows(scale), dtype=dtype)
                out[f"far{scale:.0e}/{dtype_name}"] = _count(model.log_prob(x))
                out[f"far{scale:.0e}/{dtype_name}/raw"] = _count(_raw_log_prob(model, x))
            torch.manual_seed(0)
            out[f"samples/{dtype_name}"] = _count(model.sample(2000))
    flow.float()
    return out


def train_one(task: dict[str, Any]) -> dict[str, Any]:
    """Train one model and check it; never raises (the error is recorded)."""
    import exactflow as ef
    from exactflow.training import TrainingError

    torch.set_num_threads(1)
    name, data_name, seed, dtype_name = task["builder"], task["data"], task["seed"], task["dtype"]
    record: dict[str, Any] = dict(task)
    start = time.perf_counter()
    if data_name in HARD:
        rows = hard_data(data_name, task["samples"], seed)
    else:
        rows = ef.datasets.toy(data_name, task["samples"], seed=seed).double().numpy()
    train, val, test = ef.datasets.split(rows, (0.8, 0.1, 0.1), seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = ef.models.build({**BUILDERS[name], **task.get("config", {}), "features": 2,
                                "standardize": True})
    if dtype_name == "float64":
        flow = flow.double()
    try:
        history = ef.fit(flow, train, val, steps=task["steps"],
                         batch_size=min(512, len(train)), lr=1e-3,
                         eval_every=max(1, task["steps"] // 100), seed=seed, progress=False,
                         device="cpu")
        losses = [v for v in history.train_nll + history.val_nll if v is not None]
        record["loss_nonfinite"] = sum(not math.isfinite(v) for v in losses)
        record["rollbacks"] = len(history.rollbacks)
        record["val_nll"] = history.best_val
        record["error"] = None
    except TrainingError as err:
        record["error"] = "TrainingError: " + " ".join(str(err).split())[:300]
    except Exception as err:  # noqa: BLE001 - the sweep records every failure
        record["error"] = f"{type(err).__name__}: " + " ".join(str(err).split())[:300]
    if record["error"] is None:
        record["checks"] = check_model(flow, np.asarray(test))
    record["seconds"] = time.perf_counter() - start
    return record


def tasks(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    import exactflow as ef

    toys = ef.datasets.TOYS if args.toys == "all" else tuple(args.toys.split(","))
    common = {"steps": args.steps, "samples": args.samples}
    for seed in range(args.seeds):
        for name in args.builders:
            for toy in toys:
                yield {"builder": name, "data": toy, "seed": seed, "dtype": "float32", **common}
    for seed in range(args.hard_seeds):
        for name in args.builders:
            for kind in HARD:
                for dtype in ("float32", "float64"):
                    yield {"builder": name, "data": kind, "seed": seed, "dtype": dtype,
                           **common}


def failures(record: dict[str, Any]) -> list[str]:
    """Every NaN (and training failure) of one record, as ``where: count`` strings."""
    found = []
    if record.get("error"):
        found.append(f"training: {record['error']}")
        return found
    if record.get("loss_nonfinite"):
        found.append(f"loss: {record['loss_nonfinite']} non-finite records")
    for where, counts in record.get("checks", {}).items():
        if counts["nan"]:
            found.append(f"{where}: {counts['nan']} NaN")
        if where.startswith("samples") and counts["posinf"] + counts["neginf"]:
            found.append(f"{where}: {counts['posinf'] + counts['neginf']} inf")
        if where.startswith("test") and not where.endswith("raw") and (
                counts["posinf"] + counts["neginf"]):
            found.append(f"{where}: {counts['posinf'] + counts['neginf']} inf")
    return found


def summarize(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Stress sweep: NaN in losses, log-densities and samples",
        "",
        f"`{meta['command']}`: {len(records)} models, {meta['seconds']:.0f} s "
        f"({meta['jobs']} processes, one torch thread each), torch {torch.__version__}.",
        "",
        "Columns: models trained; training failures (TrainingError); rollbacks (non-finite "
        "steps undone, summed); NaN log-densities from `Flow.log_prob` (test rows and "
        "far-out rows |x| = 1e3, 1e6, float32 and float64); NaN in the layers' raw sum "
        "(before `Flow.log_prob` maps overflow to -inf); far-out rows scored -inf; NaN or "
        "inf samples.",
        "",
        "| builder | models | training failures | rollbacks | NaN log_prob | NaN raw "
        "(layers) | far-out -inf (f32 / f64) | bad samples |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    def total(ok: list[dict[str, Any]], pred: Any, key: str = "nan") -> int:
        return sum(c[key] for r in ok for w, c in r["checks"].items() if pred(w))

    for name in meta["builders"]:
        rows = [r for r in records if r["builder"] == name]
        ok = [r for r in rows if not r.get("error")]

        nan_public = total(ok, lambda w: not w.endswith("raw") and not w.startswith("samples"))
        nan_raw = total(ok, lambda w: w.endswith("raw"))
        far32 = total(ok, lambda w: w.startswith("far") and w.endswith("float32"), "neginf")
        far64 = total(ok, lambda w: w.startswith("far") and w.endswith("float64"), "neginf")
        bad_samples = sum(c["nan"] + c["posinf"] + c["neginf"] for r in ok
                          for w, c in r["checks"].items() if w.startswith("samples"))
        lines.append(
            f"| {name} | {len(rows)} | {len(rows) - len(ok)} | "
            f"{sum(r.get('rollbacks', 0) for r in ok)} | {nan_public} | {nan_raw} | "
            f"{far32} / {far64} | {bad_samples} |"
        )
    listed = [(r, f) for r in records for f in failures(r)]
    lines += ["", f"## Failures ({len(listed)})", ""]
    if not listed:
        lines.append("None: no NaN loss, log-density or sample, and no training failure.")
    for r, f in listed[:200]:
        lines.append(f"- {r['builder']} on {r['data']}, seed {r['seed']}, {r['dtype']}: {f}")
    raw = [(r, w, c["nan"]) for r in records if not r.get("error")
           for w, c in r["checks"].items() if w.endswith("raw") and c["nan"]]
    lines += ["", f"## NaN in the layers' raw log-density, mapped to -inf ({len(raw)})", ""]
    for r, w, n in raw[:200]:
        lines.append(f"- {r['builder']} on {r['data']}, seed {r['seed']}, {r['dtype']}: "
                     f"{w}: {n} NaN")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps per model")
    p.add_argument("--seeds", type=int, default=10, help="seeds of the builder x toy grid")
    p.add_argument("--hard-seeds", type=int, default=10,
                   help="seeds of the duplicated / collinear / near-constant data")
    p.add_argument("--samples", type=int, default=20000, help="rows drawn per data set")
    p.add_argument("--builders", type=lambda s: s.split(","), default=list(BUILDERS))
    p.add_argument("--toys", default="all", help="comma-separated toys, or all")
    p.add_argument("--jobs", type=int, default=1, help="processes")
    p.add_argument("--name", default="stress", help="results file name")
    args = p.parse_args(argv)
    unknown = set(args.builders) - set(BUILDERS)
    if unknown:
        p.error(f"unknown builders {sorted(unknown)}; choose from {list(BUILDERS)}")

    start = time.perf_counter()
    todo = list(tasks(args))
    records: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, record in enumerate(pool.map(train_one, todo, chunksize=1), 1):
            records.append(record)
            bad = failures(record)
            print(f"[{i}/{len(todo)}] {record['builder']} {record['data']} seed "
                  f"{record['seed']} {record['dtype']}: {record['seconds']:.1f} s"
                  + (f"  FAIL {bad}" if bad else ""), flush=True)
    meta = {"command": "python -m benchmarks.stress " + " ".join(argv or sys.argv[1:]),
            "seconds": time.perf_counter() - start, "jobs": args.jobs,
            "builders": args.builders, "steps": args.steps}
    text = summarize(records, meta)
    print(text)
    save(args.name, text, {"meta": meta, "records": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
