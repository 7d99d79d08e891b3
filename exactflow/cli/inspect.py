"""``exactflow check`` and ``exactflow report``: every layer against brute force, and the page."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .. import models
from ..datasets import toy
from ..diagnostics import check_base, check_layers, default_check_points, format_check_table
from ..report import build_report
from ..runs import RunError, load_run
from .common import CommandError, UsageError, say

__all__ = ["cmd_check", "cmd_report"]


def _build_seeded(config: dict[str, Any], seed: int) -> Any:
    """Build a model with its initialization drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return models.build(config)
        except (TypeError, ValueError) as err:
            raise CommandError(f"cannot build model {config['model']!r}: {err}") from None


def _perturb(flow: Any, scale: float, seed: int) -> None:
    """Move every parameter away from its initialization (many layers start as identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))


def cmd_check(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    if (args.run is None) == (args.model is None):
        raise UsageError("give either RUN_DIR or --model NAME")
    if args.run is not None:
        given = [f"--{name}" for name in ("features", "layers", "hidden")
                 if getattr(args, name) is not None]
        if given or args.seed != 0:
            raise UsageError(f"{', '.join(given + (['--seed'] if args.seed else []))} "
                             "describe a new model (--model NAME); a run is checked as it "
                             "was trained, on its test rows")
    if args.run is not None:
        run = load_run(args.run)
        flow = run.flow
        try:
            x = run.data("test")
        except RunError:  # fall back to the model's own samples
            x = None
        what = f"run {args.run}"
    else:
        features = 2 if args.features is None else args.features
        config: dict[str, Any] = {"model": args.model, "features": features}
        if args.layers is not None:
            config["layers"] = args.layers
        if args.hidden is not None:
            config["hidden"] = args.hidden
        flow = _build_seeded(config, args.seed)
        _perturb(flow, 0.1, args.seed)
        x = None
        if features == 2:  # (standardized on enough points, whatever --points)
            x = toy("moons", max(args.points or 256, 256), seed=args.seed).double().numpy()
            x = ((x - x.mean(0)) / x.std(0))[: args.points]
        what = f"new {args.model} model ({features} features, perturbed parameters)"
    assert flow is not None
    wanted = default_check_points(flow.features) if args.points is None else args.points
    if x is None:
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(wanted, flow.features, generator=gen, dtype=torch.float64).numpy()
    rows = check_layers(flow, x, max_points=wanted)
    base = check_base(flow, x, max_points=wanted)
    ok = all(r.ok for r in rows) and base["ok"] is not False
    points = int(min(len(x), wanted))
    if not args.json:
        fewer = " (all of the run's test rows)" if points < wanted else ""
        if args.points is None and wanted < 256:
            fewer += f" (the default at {flow.features} features; --points checks more)"
        print(f"check_transform layer by layer on {what}: {points} points{fewer}, float64, "
              "eval mode")
        if rows:
            print(format_check_table(rows))
        for r in rows:
            for f in r.failures:
                print(f"layer {r.index} ({r.name}): {f}")
        if not rows:
            print(f"no layers: the model is its base distribution ({base['name']})")
        elif all(r.ok for r in rows):
            what = "the layer passes" if len(rows) == 1 else f"all {len(rows)} layers pass"
            print(f"{what} (log-determinant against autograd, round trip)")
        else:
            print(f"{sum(not r.ok for r in rows)} layer(s) FAILED")
        if base["checked"]:
            verdict = "passes" if base["ok"] else "FAILED"
            print(f"base distribution {base['name']} {verdict}: its log-density at the "
                  f"latent points against torch.distributions, largest error "
                  f"{base['error']:.2e}")
        else:
            print(f"base distribution {base['name']}: not checked (one of your own: "
                  "torch.distributions has no reference for it)")
    result = {"ok": ok, "layers": [r.to_dict() for r in rows], "points": points,
              "base": base}
    return result, (0 if ok else 1)


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    index = build_report(args.run)
    say(args, f"report: {index}")
    return {"ok": True, "report": str(index)}
