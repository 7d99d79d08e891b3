"""The run report: one self-contained HTML page with the numbers, the figures and the checks.

:func:`build_report` turns a run folder (:mod:`exactflow.runs`) into ``report/index.html``
with PNG figures beside it and ``report/metrics.json``. The page is filled from template
files packaged here (``page.html`` and the fragments it repeats, ``style.css`` inlined) with
:class:`string.Template`, every value HTML-escaped; it has no scripts and no external URL,
so it opens in a browser with no network.
"""

from __future__ import annotations

import html
import json
import math
import os
from functools import cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import torch

from ..diagnostics import (
    LayerCheck,
    check_base,
    check_layers,
    default_check_points,
    flatten_layers,
    format_error,
    layer_name,
    propagate,
)
from ..io import atomic_write_json, atomic_write_text, json_safe
from ..models import CLOSED_FORM
from ..runs import REPORT_DIR, Run, RunError, load_run
from ..scoring import module_dtype
from ..training import evaluate

__all__ = ["build_report", "compute_metrics", "FIGURES", "RunError"]

#: The figures and the layers' mean log-dets use at most this many rows of a split (its
#: first: the splits are random).
FIGURE_ROWS = 20_000

#: The report's figure files (rebuilt on every run of :func:`build_report`).
FIGURES = ("data_vs_model.png", "pairwise.png", "training.png", "cartographer.png",
           "layer_log_dets.png")


@cache
def _template(name: str) -> Template:
    return Template(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))


def _fill(template: str, **values: Any) -> str:
    return _template(template).substitute(**values).strip()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = ".4f") -> str:
    if value is None:
        return "n/a"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    return "n/a" if not math.isfinite(v) else format(v, fmt)


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "n/a"
    s = float(seconds)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def compute_metrics(run: Run, checks: list[LayerCheck] | None = None) -> dict[str, Any]:
    """The report's numbers: test metrics, parameter count, training time, check verdict."""
    if run.flow is None:
        raise RunError(f"the run {str(run.path)!r} was read without its model")
    ev = evaluate(run.flow, run.data("test"))
    info = run.info
    recorded = info.get("metrics", {})
    out: dict[str, Any] = {
        "test": dict(ev),
        "parameters": int(sum(p.numel() for p in run.flow.parameters())),
        "train_time_s": recorded.get("train_time_s"),
        "steps": recorded.get("steps"),
        "best_step": recorded.get("best_step"),
        "model": info.get("model", {}).get("model"),
        "data": info.get("data", {}).get("name"),
    }
    entropy = info.get("data", {}).get("entropy")
    if entropy is not None:
        out["true_entropy"] = entropy
        out["test_nll_minus_entropy"] = float(ev["nll"]) - float(entropy)
    if checks is not None:
        out["check"] = {
            "ok": all(r.ok for r in checks),
            "points": None,  # filled in by build_report
            "layers": [r.to_dict() for r in checks],
        }
    return out


def _base_sentence(base: dict[str, Any]) -> str:
    """What the report says of the base distribution's check."""
    if not base["checked"]:
        return (f"The base distribution ({base['name']}) is one of your own: "
                "torch.distributions has no reference for it, so it is not checked.")
    verdict = "passes" if base["ok"] else "FAILED"
    return (f"The base distribution ({base['name']}) {verdict}: its log-density at the "
            "latent points of the same rows against torch.distributions', largest error "
            f"{base['error']:.2e}.")


def build_report(
    run_dir: str | os.PathLike[str], *, check_points: int | None = None, seed: int = 0
) -> Path:
    """(Re)build ``report/`` of a run folder: ``index.html``, PNG figures, ``metrics.json``.

    The page is self-contained: inline CSS, no scripts, images referenced by relative file
    name beside it, no external URL. Figures need matplotlib (``pip install
    'exactflow[plot]'``); every file is written atomically.

    Args:
        run_dir: a finished run folder.
        check_points: test rows used by the layer-by-layer check (float64, O(d^3) each);
            by default :func:`exactflow.diagnostics.default_check_points` of the flow's features
            (256, fewer past 128 features).
        seed: seed of the model samples drawn for the figures.

    Returns:
        The path of ``index.html``.

    Raises:
        RunError: the run folder is incomplete or corrupt, or ``report`` in it is not a
            folder of its own.
        ImportError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "the report needs matplotlib: pip install 'exactflow[plot]'", name="matplotlib"
        ) from None
    from .. import plotting

    run = load_run(run_dir)
    flow = run.flow
    assert flow is not None
    out_dir = run.path / REPORT_DIR
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise RunError(
            f"{str(out_dir)!r} is not a folder of the run (a link or a file); remove it and "
            "build the report again"
        )
    test = run.data("test")
    train = run.data("train")
    d = test.shape[1]
    names = run.columns
    if check_points is None:
        check_points = default_check_points(d)

    checks = check_layers(flow, test, max_points=check_points)
    metrics = compute_metrics(run, checks)
    metrics["check"]["points"] = int(min(check_points, len(test)))
    base = check_base(flow, test, max_points=check_points)
    metrics["check"]["base"] = base
    metrics["check"]["ok"] = metrics["check"]["ok"] and base["ok"] is not False
    out_dir.mkdir(exist_ok=True)  # (after the checks: a report stopped there leaves none)

    # Mean log-det of each layer on the test split (the model as trained; its first
    # FIGURE_ROWS rows: the split is random, and a million rows would take a minute).
    steps = propagate(flow, torch.as_tensor(test[:FIGURE_ROWS], dtype=module_dtype(flow)))
    layers = flatten_layers(flow.transform)
    layer_ld = [float(ladj.double().mean()) for _, ladj in steps[1:]]
    metrics["layer_mean_log_det"] = [
        {"index": i, "name": layer_name(t), "mean_log_det": v}
        for i, (t, v) in enumerate(zip(layers, layer_ld, strict=True), start=1)
    ]

    entropy = run.info["data"].get("entropy")
    sections: list[tuple[str, list[tuple[str, str, str]]]] = []
    shown = train[:FIGURE_ROWS]  # (as many model samples are drawn for the figures)
    if d == 2:
        plotting.save_figure(plotting.data_vs_model(flow, shown, seed=seed, names=names),
                             out_dir / "data_vs_model.png")
        sections.append(("Data and model", [(
            "data_vs_model.png", "data, model density and model samples",
            f"Left: the training data ({len(shown):,} points) as a 2D histogram. Middle: a "
            "histogram of samples drawn from the model. Right: the model's exact density "
            "p(x) on a grid, with its colour scale beside it. The three panels share one "
            "box; the two histograms each have their own colour scale.",
        )]))
    else:
        plotting.save_figure(plotting.pairwise(flow, shown, seed=seed, names=names),
                             out_dir / "pairwise.png")
        sections.append(("Data and model", [(
            "pairwise.png", "pairwise marginals of data and model samples",
            f"Pairwise marginals of the first {min(d, 4)} of {d} dimensions: training data "
            f"(up to {FIGURE_ROWS:,} rows) below the diagonal, as many model samples above "
            "it, and both histograms on the diagonal.",
        )]))
    if run.history and run.history.get("total_steps", 1) > 0:  # (closed-form fits: no curve)
        plotting.save_figure(
            plotting.training_curves(run.history, entropy=entropy), out_dir / "training.png"
        )
        kept = run.history.get("best_step")
        sections.append(("Training", [(
            "training.png", "training and validation NLL",
            "Negative log-likelihood (nats per example) during training: each training point "
            "is the mean over the mini-batches since the previous point; each validation "
            "point is the whole validation split."
            + (f" The vertical line marks step {kept}, whose weights were kept (the best "
               "validation NLL)." if kept is not None else "")
            + (" The dashed line is the true entropy of the generator, the best any model "
               "can reach." if entropy is not None else ""),
        )]))
    flow_figures = []
    if d == 2:
        plotting.save_figure(plotting.cartographer(flow, test, seed=seed),
                             out_dir / "cartographer.png")
        flow_figures.append((
            "cartographer.png", "the flow warping a grid layer by layer",
            "The flow as a cartographer. Each column is the representation after some of "
            "the layers (numbered from 1, the layer that sees the data), from the data (left) "
            "to the latent (right). Top: a regular grid of data space and the test points, "
            "carried along. Bottom: the exact density of that representation (base density "
            "pulled back through the remaining layers), turning from the data density into "
            "the base density.",
        ))
    plotting.save_figure(plotting.layer_log_dets([layer_name(t) for t in layers], layer_ld),
                         out_dir / "layer_log_dets.png")
    flow_figures.append((
        "layer_log_dets.png", "mean log-determinant per layer",
        f"Each layer's mean log|det dz/dx| on the test split (up to {FIGURE_ROWS:,} of its "
        "rows; layers numbered from 1): its "
        "contribution to the log-likelihood. They add up to the flow's total log-det; the "
        "base density supplies the rest.",
    ))
    sections.append(("The flow as a cartographer" if d == 2 else "The flow, layer by layer",
                     flow_figures))
    figures = [f for _, group in sections for f, _, _ in group]
    for stale in FIGURES:
        if stale not in figures and (out_dir / stale).exists():
            (out_dir / stale).unlink()

    metrics["figures"] = figures
    atomic_write_json(out_dir / "metrics.json", metrics)
    index = out_dir / "index.html"
    atomic_write_text(index, _render(run, metrics, checks, sections) + "\n")
    return index


def _render(
    run: Run,
    metrics: dict[str, Any],
    checks: list[LayerCheck],
    sections: list[tuple[str, list[tuple[str, str, str]]]],
) -> str:
    info = run.info
    data = info.get("data", {})
    model = info.get("model", {})
    test = metrics["test"]
    title = f"exactflow report: {run.path.resolve().name}"
    sizes = data.get("rows", {})
    board = info.get("metrics", {}).get("leaderboard")
    cards = [
        ("test NLL (nats)", f"{_num(test.get('nll'))} ± {_num(test.get('nll_se'))}"),
        ("bits / dim", _num(test.get("bpd"))),
    ]
    if "test_nll_minus_entropy" in metrics:
        cards.append(("test NLL − true entropy", _num(metrics["test_nll_minus_entropy"])))
    if board:
        cards.append(("time of all candidates",
                      _duration(sum(e.get("seconds") or 0.0 for e in board))))
    cards += [
        ("parameters", f"{metrics['parameters']:,}"),
        ("training time" if not board else "training time of the kept model",
         _duration(metrics.get("train_time_s"))),
        ("model check", "all ok" if metrics["check"]["ok"] else "FAILED"),
    ]
    kept = next((e for e in board or () if e.get("chosen")), None)
    name = model.get("model", "?")
    if board:
        what = f"{name if kept is None else kept.get('name', name)} (kept by the auto ladder)"
    else:
        what = name if name in CLOSED_FORM else f"{name} flow"
    subtitle = (
        f'{_e(what)} on {_e(data.get("name", "?"))} '
        f'({_e(data.get("features", "?"))} features; {_e(sizes.get("train", "?"))} train / '
        f'{_e(sizes.get("val", "?"))} validation / {_e(sizes.get("test", "?"))} test rows), '
        f'trained {_e(info.get("finished", ""))}'
    )
    section_html = [
        _fill("section.html", heading=_e(heading), figures="\n".join(
            _fill("figure.html", file=_e(f), alt=_e(alt), caption=_e(caption))
            for f, alt, caption in group))
        for heading, group in sections
    ]
    config = {k: info.get(k) for k in ("model", "options", "data")}
    return _fill(
        "page.html",
        title=_e(title),
        css=_template("style.css").template,
        subtitle=subtitle,
        cards="\n".join(_fill("card.html", value=_e(v), label=_e(k)) for k, v in cards),
        numbers="\n".join(_fill("row.html", label=_e(k), value=v)
                          for k, v in _numbers(metrics, info)),
        leaderboard=_leaderboard(board),
        notes_section=_notes(data.get("notes")),
        sections="\n".join(section_html),
        check_points=_e(metrics["check"]["points"]),
        check_rows="\n".join(_check_row(r) for r in checks),
        base_check=_e(_base_sentence(metrics["check"]["base"])),
        configuration=_e(json.dumps(json_safe(config), indent=2)),
        versions=_e(json.dumps(info.get("versions", {}), indent=2)),
        run_path=_e(run.path),
        units_note=" (the standardization is part of the model)" if (model or {}).get(
            "standardize") else "",
    )


def _notes(notes: list[str] | None) -> str:
    """The notes ``exactflow train`` said of the data, as a section ('' without any)."""
    if not notes:
        return ""
    items = "\n".join(f"<li>{_e(note)}</li>" for note in notes)
    return (f"<h2>Notes on the data</h2>\n<p>What <code>exactflow train</code> said of the "
            f"data before training it; they bear on the numbers below.</p>\n<ul>\n{items}"
            "\n</ul>")


def _leaderboard(board: list[dict[str, Any]] | None) -> str:
    if not board:
        return ""
    rows = []
    for e in board:
        rows.append(_fill(
            "leaderboard_row.html",
            attrs=' class="ok"' if e.get("chosen") else "",
            name=_e(e.get("name", "?")) + (" (kept)" if e.get("chosen") else ""),
            val_nll=_num(e.get("val_nll")), steps=_e(e.get("steps", "")),
            best_step=_e("" if e.get("best_step") is None else e["best_step"]),
            seconds=_num(e.get("seconds"), ".1f"), status=_e(e.get("status", "")),
        ))
    intro = ("The model was chosen automatically: each candidate was trained on the training "
             "split and scored on the validation split, and the lowest validation NLL was "
             "kept. A flow \"on the mixture\" starts as the chosen Gaussian mixture (every layer "
             "at the identity), so it keeps only what improves on it; the other flows start "
             "from a standard normal.")
    if any(str(e.get("status", "")).startswith("skipped: in the mixtures' cross-validation")
           for e in board):
        intro = ("The model was chosen automatically. The validation split held too few rows "
                 "to choose among flows, so none was trained: the Gaussian mixture (one full "
                 "component is the Gaussian) was chosen by 5-fold cross-validation over the "
                 "training and validation rows, and fitted on all of them.")
    return _fill("leaderboard.html", intro=_e(intro), rows="\n".join(rows))


def _check_row(r: LayerCheck) -> str:
    verdict = '<span class="ok">ok</span>' if r.ok else (
        f'<span class="fail" title="{_e("; ".join(r.failures))}">FAIL</span>'
    )
    return _fill(
        "check_row.html", index=r.index, name=_e(r.name),
        log_det_error=_e(format_error(r.log_det_error)),
        round_trip_error=_e(format_error(r.round_trip_error)),
        mean_log_det=_num(r.mean_log_det), verdict=verdict,
    )


def _numbers(metrics: dict[str, Any], info: dict[str, Any]) -> list[tuple[str, str]]:
    test = metrics["test"]
    rows = [
        ("test NLL (nats per example)", _num(test.get("nll"))),
        ("standard error of the test NLL", _num(test.get("nll_se"))),
        ("bits per dimension", _num(test.get("bpd"))),
        ("test rows", _e(test.get("n", "?"))),
    ]
    if test.get("n_nonfinite"):
        rows.append(("test rows with non-finite log-density", _e(test["n_nonfinite"])))
    if "true_entropy" in metrics:
        rows += [
            ("true entropy of the generator (nats)", _num(metrics["true_entropy"])),
            ("test NLL − true entropy (0 is perfect)", _num(metrics["test_nll_minus_entropy"])),
        ]
    val = info.get("metrics", {}).get("val") or {}
    if val.get("nll") is not None:
        rows.append(("validation NLL (nats per example)", _num(val.get("nll"))))
    steps = metrics.get("steps")
    rows += [
        ("parameters", f"{metrics['parameters']:,}"),
        ("training steps", _e(steps if steps is not None else "?")),
    ]
    if metrics.get("best_step") is not None:
        rows.append(("weights kept", _e(f"step {metrics['best_step']} of {steps} (the best "
                                        "validation NLL)")))
    rows += [
        ("training time", _e(_duration(metrics.get("train_time_s")))),
        ("device", _e(info.get("options", {}).get("device", "?"))),
    ]
    return rows
