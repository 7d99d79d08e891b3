"""How far a float32 log-determinant is from the truth, for 32-layer flows at d = 2, 16, 64.

``python -m benchmarks.logdet_precision`` builds each builder with 32 layers, moves every
parameter away from its initialization (``N(0, 0.05^2)`` noise; many layers start as the
identity), and compares the log-determinant the flow computes in float32 with the
brute-force one: ``exactflow.log_abs_det_jacobian`` of the same flow in float64 (a dense
autograd Jacobian and its LU), at the same points (drawn in float32, so input rounding is
not counted). It also reports the float64 analytic log-det's error (rounding only).

The table (``benchmarks/results/logdet-precision.md``) gives, per builder and dimension,
the largest error over the points, the typical size of the log-det itself, and the ratio
of the error to ``d``, the quantity the documented bound is stated in.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any

import torch

from .saving import publish

BUILDERS: dict[str, dict[str, Any]] = {
    "realnvp": {"model": "realnvp", "batch_norm": False},
    "nice": {"model": "nice"},
    "maf": {"model": "maf"},
    "iaf": {"model": "iaf"},
    "nsf-coupling": {"model": "nsf", "kind": "coupling"},
    "nsf-autoregressive": {"model": "nsf", "kind": "autoregressive"},
}


def measure(name: str, features: int, layers: int = 32, points: int = 32, seed: int = 0,
            scale: float = 0.05) -> dict[str, Any]:
    """The float32 and float64 log-det errors of one perturbed ``layers``-layer flow."""
    import exactflow as ef

    torch.manual_seed(seed)
    config = {**BUILDERS[name], "features": features, "layers": layers}
    flow = ef.models.build(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    flow64 = copy.deepcopy(flow).double()
    x32 = torch.randn(points, features, generator=gen)
    x64 = x32.double()
    with torch.no_grad():
        ladj32 = flow.transform(x32)[1].double()
        ladj64 = flow64.transform(x64)[1]
    truth = ef.log_abs_det_jacobian(flow64.transform, x64)
    err32 = (ladj32 - truth).abs()
    err64 = (ladj64 - truth).abs()
    return {
        "builder": name, "features": features, "layers": layers, "points": points,
        "max_err_float32": float(err32.max()), "median_err_float32": float(err32.median()),
        "max_err_float64": float(err64.max()), "typical_abs_logdet": float(truth.abs().median()),
        "max_err_float32_per_feature": float(err32.max()) / features,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default="2,16,64")
    p.add_argument("--builders", default=",".join(BUILDERS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--points", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for name in args.builders.split(","):
        for d in (int(v) for v in args.features.split(",")):
            runs = [measure(name, d, points=args.points, seed=s) for s in range(args.seeds)]
            worst = max(runs, key=lambda r: r["max_err_float32"])
            worst["max_err_float64"] = max(r["max_err_float64"] for r in runs)
            rows.append(worst)
            print(f"{name} d={d}: float32 max err {worst['max_err_float32']:.2e} "
                  f"(per feature {worst['max_err_float32_per_feature']:.2e}), float64 "
                  f"{worst['max_err_float64']:.1e}, |log det| ~ "
                  f"{worst['typical_abs_logdet']:.3g}", flush=True)
    command = "python -m benchmarks.logdet_precision " + " ".join(argv or sys.argv[1:])
    lines = [
        "# float32 log-determinants of 32-layer flows against the float64 brute force",
        "",
        f"`{command}`: parameters perturbed by N(0, 0.05^2), {args.points} standard-normal "
        f"points, worst of {args.seeds} seeds; {time.perf_counter() - start:.0f} s.",
        "",
        "| builder | d | max error float32 (nats) | median | max error / d | "
        "max error float64 | median abs log-det |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['builder']} | {r['features']} | {r['max_err_float32']:.2e} | "
            f"{r['median_err_float32']:.2e} | {r['max_err_float32_per_feature']:.2e} | "
            f"{r['max_err_float64']:.1e} | {r['typical_abs_logdet']:.3g} |"
        )
    publish("logdet-precision", lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
