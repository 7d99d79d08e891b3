"""Figures of a flow and its training (matplotlib, imported only when a figure is drawn).

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot``, so
nothing touches matplotlib's global state or needs a display: save it with
:func:`save_figure` (or ``fig.savefig``). The flow is evaluated in eval mode under
``torch.no_grad`` and its modes are restored afterwards.

* :func:`data_vs_model`: data, model density and model samples side by side (2D).
* :func:`pairwise`: data against samples for the first few dimensions (any d).
* :func:`training_curves`: train and validation NLL per step.
* :func:`cartographer`: how each layer warps a regular grid and the density, from data
  space to the Gaussian (2D).
* :func:`layer_log_dets`: each layer's mean log-det contribution.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .bases import tensor_of
from .diagnostics import flatten_layers, layer_name
from .distributions import Flow
from .io import atomic_write_bytes
from .scoring import eval_mode, log_prob, module_device, module_dtype

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "data_vs_model",
    "pairwise",
    "training_curves",
    "cartographer",
    "layer_log_dets",
    "log_density_grid",
    "save_figure",
]

_DATA = "#1f4e79"
_MODEL = "#d9541e"
_CMAP = "magma"

def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def save_figure(fig: Figure, path: Any, dpi: int = 110) -> None:
    """Save a figure as PNG through a temporary file (no partial file on error)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    atomic_write_bytes(path, buf.getvalue())


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _model_tensor(flow: Flow, x: np.ndarray) -> Tensor:
    return tensor_of(x, module_dtype(flow)).to(module_device(flow))


def _sample(flow: Flow, n: int, seed: int) -> np.ndarray:
    with torch.random.fork_rng(devices=[]), eval_mode(flow):
        torch.manual_seed(seed)
        x = flow.sample(n)
    return x.cpu().double().numpy()


def bounds_2d(data: np.ndarray, pad: float = 0.08, q: float = 0.002) -> tuple[float, ...]:
    """A box around the bulk of 2D data (quantiles ``q``..``1-q``, padded by ``pad``)."""
    lo = np.quantile(data, q, axis=0)
    hi = np.quantile(data, 1 - q, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def log_density_grid(
    flow: Flow, bounds: Sequence[float], resolution: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flow's log-density on a regular ``resolution x resolution`` grid over ``bounds``.

    Returns ``(xs, ys, logp)`` with ``logp[i, j] = log p(xs[j], ys[i])`` (image order).
    """
    x0, x1, y0, y1 = bounds
    xs = np.linspace(x0, x1, resolution)
    ys = np.linspace(y0, y1, resolution)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    return xs, ys, log_prob(flow, pts).reshape(resolution, resolution)


def _vmax(values: np.ndarray) -> float | None:
    """A colour-scale top that ignores a few extreme pixels."""
    v = values[np.isfinite(values) & (values > 0)]
    return float(np.quantile(v, 0.995)) if v.size else None


def _style(ax: Any, title: str | None = None) -> None:
    if title:
        ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def data_vs_model(
    flow: Flow,
    data: Any,
    *,
    n_samples: int | None = None,
    bounds: Sequence[float] | None = None,
    resolution: int = 200,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> Figure:
    """Three panels on one box: the data, model samples, and the model's density ``p(x)``.

    The data and the samples are drawn as 2D histograms with the same bins as the density
    grid, so the three panels compare pixel for pixel; the colour bar beside the last panel
    is the density's. ``names`` labels the two axes (default ``x1``, ``x2``). Needs 2D data.
    """
    data = _as_array(data)
    if data.ndim != 2 or data.shape[1] != 2:
        raise ValueError(f"data_vs_model needs 2D data, got shape {data.shape}; use pairwise()")
    n_samples = n_samples or max(len(data), 5000)
    bounds = tuple(bounds) if bounds is not None else bounds_2d(data)
    xs, ys, logp = log_density_grid(flow, bounds, resolution)
    samples = _sample(flow, n_samples, seed)
    dens = np.exp(np.clip(logp, -50, 50))
    extent = bounds
    nb = int(np.clip(np.sqrt(len(data)) * 1.5, 40, 120))
    bins = [np.linspace(bounds[0], bounds[1], nb + 1), np.linspace(bounds[2], bounds[3], nb + 1)]

    fig = _figure(12, 4.1)
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    h_data, *_ = np.histogram2d(data[:, 0], data[:, 1], bins=bins, density=True)
    h_samp, *_ = np.histogram2d(samples[:, 0], samples[:, 1], bins=bins, density=True)
    kw = dict(origin="lower", extent=extent, aspect="auto", cmap=_CMAP, vmin=0.0,
              interpolation="nearest")
    # Each panel gets its own colour scale: histograms of a few thousand points are noisy
    # and would otherwise saturate against the smooth density.
    axes[0].imshow(h_data.T, vmax=_vmax(h_data), **kw)
    _style(axes[0], f"data (n = {len(data):,})")
    axes[1].imshow(h_samp.T, vmax=_vmax(h_samp), **kw)
    _style(axes[1], f"model samples (n = {n_samples:,})")
    im = axes[2].imshow(dens, vmax=_vmax(dens), **{**kw, "interpolation": "bilinear"})
    _style(axes[2], "model density p(x)")
    label_x, label_y = _names(names, 2)
    for ax in axes:
        ax.set_xlabel(label_x, fontsize=8)
    axes[0].set_ylabel(label_y, fontsize=8)
    cb = fig.colorbar(im, ax=axes[2], shrink=0.85, pad=0.01)
    cb.set_label("p(x)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig


def pairwise(
    flow: Flow,
    data: Any,
    *,
    dims: int = 4,
    n_samples: int | None = None,
    max_points: int = 2000,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> Figure:
    """Pairwise marginals of the first ``dims`` dimensions: data below the diagonal,
    model samples above it (as many points as the data shown), both marginals overlaid on
    the diagonal (all the data, ``n_samples`` samples).

    Works for any number of features (2 included); ``names`` labels the axes with the
    columns' names (default ``x1``, ``x2``, ...).
    """
    data = _as_array(data)
    d = min(dims, data.shape[1])
    rng = np.random.default_rng(seed)
    shown = data if len(data) <= max_points else data[rng.choice(len(data), max_points, False)]
    samples = _sample(flow, n_samples or max(len(data), 5000), seed)
    shown_samples = samples[: len(shown)]
    # Markers big and opaque enough to see a few hundred points, small for thousands.
    size_pt = float(np.clip(3000.0 / len(shown), 1.5, 10.0))
    alpha = float(np.clip(150.0 / len(shown), 0.25, 0.8))
    lo = np.quantile(data[:, :d], 0.005, axis=0)
    hi = np.quantile(data[:, :d], 0.995, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - 0.1 * span, hi + 0.1 * span

    labels = _names(names, d)
    size = max(1.6, min(2.6, 10 / d))
    fig = _figure(size * d + 0.4, size * d + 0.4)
    axes = np.atleast_2d(fig.subplots(d, d, squeeze=False))
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            ax.tick_params(labelsize=6)
            if i == j:
                bins = np.linspace(lo[i], hi[i], int(np.clip(np.sqrt(len(data)), 12, 40)))
                with np.errstate(invalid="ignore", divide="ignore"):  # no sample in range
                    ax.hist(data[:, i], bins=bins, density=True, color=_DATA, alpha=0.55,
                            label="data")
                    ax.hist(samples[:, i], bins=bins, density=True, histtype="step",
                            color=_MODEL, lw=1.4, label="model")
                ax.set_yticks([])
            else:
                pts, color = (shown, _DATA) if i > j else (shown_samples, _MODEL)
                ax.scatter(pts[:, j], pts[:, i], s=size_pt, alpha=alpha, color=color,
                           linewidths=0)
                ax.set_ylim(lo[i], hi[i])
            ax.set_xlim(lo[j], hi[j])
            if i == d - 1:
                ax.set_xlabel(labels[j], fontsize=8)
            if j == 0 and i != 0:
                ax.set_ylabel(labels[i], fontsize=8)
    handles = [
        _patch(_DATA, "data (below the diagonal)"),
        _patch(_MODEL, "model samples (above the diagonal)"),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncol=2, fontsize=8, frameon=False)
    return fig


def _names(names: Sequence[str] | None, d: int) -> list[str]:
    given = list(names or [])
    return [str(given[i]) if i < len(given) else f"x{i + 1}" for i in range(d)]


def _patch(color: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)


def _series(history: Mapping[str, Any], *names: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Find a (steps, values) series in a history dict under any of ``names``."""
    for name in names:
        value = history.get(name)
        if value is None or len(value) == 0:
            continue
        if isinstance(value, Mapping):  # {"step": [...], "nll": [...]}
            steps = value.get("step") or value.get("steps")
            vals = value.get("nll") or value.get("value") or value.get("values")
            if steps is not None and vals is not None:
                return np.asarray(steps, float), np.asarray(vals, float)
            continue
        vals = np.asarray(value, dtype=float)
        for step_name in (f"{name}_step", f"{name}_steps", name.replace("nll", "step"),
                          "val_step" if "val" in name else "step", "steps"):
            steps = history.get(step_name)
            if steps is not None and len(steps) == len(vals):
                return np.asarray(steps, float), vals
        return np.arange(1, len(vals) + 1, dtype=float), vals
    return None


def training_curves(history: Mapping[str, Any], *, entropy: float | None = None) -> Figure:
    """Training and validation NLL (nats) against the optimizer step.

    The training curve is noisy (one mini-batch per point) and drawn thin with a running
    mean over it; the validation curve is the full validation set at each evaluation.
    ``entropy``, when known (the 2D toys), is drawn as the floor no model can beat, and
    a vertical line marks ``best_step``, the step whose weights training kept.
    """
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    train = _series(history, "train_nll", "train_loss", "train", "loss")
    val = _series(history, "val_nll", "val_loss", "val")
    if train is not None:
        steps, vals = train
        k = max(1, len(vals) // 100)
        if k > 1:  # many records: draw them faint, with a running mean on top
            ax.plot(steps, vals, color=_DATA, alpha=0.25, lw=0.8)
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, color=_DATA, lw=1.6, label="train (running mean)")
        else:
            ax.plot(steps, vals, color=_DATA, lw=1.6, label="train")
    if val is not None:
        ax.plot(val[0], val[1], "o-", color=_MODEL, lw=1.6, ms=3, label="validation")
    if entropy is not None:
        ax.axhline(entropy, color="0.35", ls="--", lw=1, label=f"true entropy {entropy:.3f}")
    kept = history.get("best_step")
    if kept is not None:
        ax.axvline(float(kept), color=_MODEL, ls=":", lw=1.2, label=f"weights kept (step {kept})")
    finite = np.concatenate([s[1][np.isfinite(s[1])] for s in (train, val) if s is not None]
                            or [np.zeros(1)])
    if finite.size:
        lo = float(np.min(finite))
        if entropy is not None:
            lo = min(lo, entropy)
        hi = float(np.quantile(finite, 0.98))
        pad = 0.05 * max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("NLL (nats)", fontsize=9)
    _style(ax, "training curves")
    ax.grid(alpha=0.25)
    if train is not None or val is not None:
        ax.legend(fontsize=8, frameon=False)
    return fig


def _stages(layers: Sequence[Any], max_stages: int) -> list[int]:
    """Indices k (number of layers applied) at which to draw the cartographer's panels."""
    ends = [i + 1 for i, t in enumerate(layers) if not t.linear]
    if ends:
        # Only linear layers after the last nonlinear one: show the latent in its place.
        ends[-1] = len(layers)
    else:
        ends = [len(layers)]
    stages = [0, *ends]
    if len(stages) > max_stages:
        # Every k-th stage (evenly spaced in blocks), the data and the latent always shown.
        k = -(-(len(stages) - 1) // (max_stages - 1))
        picked = stages[::k]
        if picked[-1] != stages[-1]:
            picked = picked[:-1] + [stages[-1]] if len(picked) >= max_stages else [
                *picked, stages[-1]]
        stages = picked
    return stages


def _push(layers: Sequence[Any], x: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    ladj = x.new_zeros(x.shape[0])
    for layer in layers[start:stop]:
        x, step = layer(x)
        ladj = ladj + step
    return x, ladj


def cartographer(
    flow: Flow,
    data: Any,
    *,
    max_stages: int = 6,
    lines: int = 17,
    resolution: int = 120,
    max_points: int = 1500,
    seed: int = 0,
) -> Figure:
    """The flow as a cartographer: a regular grid of data space, warped layer by layer.

    Column ``k`` shows the representation after the first few layers, from the data (left)
    to the latent (right). Top row: where the data space grid lines and the data points
    land. Bottom row: the density of that intermediate representation,
    ``p_k(u) = p_base(f_{>k}(u)) |det J_{f_>k}(u)|``, computed exactly by running the
    remaining layers; it turns from the data density into the standard normal.
    Needs 2D data.
    """
    data = _as_array(data)
    if data.ndim != 2 or data.shape[1] != 2:
        raise ValueError(f"cartographer needs 2D data, got shape {data.shape}")
    layers = flatten_layers(flow.transform)
    stages = _stages(layers, max_stages)
    rng = np.random.default_rng(seed)
    pts_np = data if len(data) <= max_points else data[rng.choice(len(data), max_points, False)]
    x0, x1, y0, y1 = bounds_2d(data, pad=0.12)
    t = np.linspace(0, 1, 240)
    grid_lines = []
    for v in np.linspace(x0, x1, lines):
        grid_lines.append(("v", np.stack([np.full_like(t, v), y0 + t * (y1 - y0)], 1)))
    for h in np.linspace(y0, y1, lines):
        grid_lines.append(("h", np.stack([x0 + t * (x1 - x0), np.full_like(t, h)], 1)))

    from matplotlib import colormaps

    cmap_v, cmap_h = colormaps["Blues"], colormaps["Oranges"]
    n = len(stages)
    fig = _figure(2.55 * n, 5.3)
    axes = np.atleast_2d(fig.subplots(2, n, squeeze=False))
    with eval_mode(flow):
        pts = _model_tensor(flow, pts_np)
        line_t = [(kind, _model_tensor(flow, seg)) for kind, seg in grid_lines]
        current = 0
        for col, k in enumerate(stages):
            pts, _ = _push(layers, pts, current, k)
            line_t = [(kind, _push(layers, seg, current, k)[0]) for kind, seg in line_t]
            current = k
            p = pts.double().cpu().numpy()
            ax = axes[0, col]
            nv = sum(1 for kind, _ in line_t if kind == "v")
            iv = ih = 0
            for kind, seg in line_t:
                s = seg.double().cpu().numpy()
                if kind == "v":
                    color = cmap_v(0.35 + 0.6 * iv / max(nv - 1, 1))
                    iv += 1
                else:
                    color = cmap_h(0.35 + 0.6 * ih / max(len(line_t) - nv - 1, 1))
                    ih += 1
                ax.plot(s[:, 0], s[:, 1], color=color, lw=0.6, alpha=0.85)
            ax.scatter(p[:, 0], p[:, 1], s=1.5, color="black", alpha=0.35, linewidths=0)
            b = _finite_box(p)
            ax.set_xlim(b[0], b[1])
            ax.set_ylim(b[2], b[3])
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                title = "data space"
            elif k == len(layers):
                title = f"latent (after all {k} layers)"
            else:
                title = f"after layers 1-{k} of {len(layers)}\n(last: {layer_name(layers[k - 1])})"
            ax.set_title(title, fontsize=8)

            # The exact density of the representation at this stage.
            xs = np.linspace(b[0], b[1], resolution)
            ys = np.linspace(b[2], b[3], resolution)
            gx, gy = np.meshgrid(xs, ys)
            u = _model_tensor(flow, np.stack([gx.ravel(), gy.ravel()], 1))
            z, ladj = _push(layers, u, k, len(layers))
            logp = (flow.base.log_prob(z) + ladj).double().cpu().numpy()
            logp = np.where(np.isfinite(logp), logp, -np.inf).reshape(resolution, resolution)
            dens = np.exp(np.clip(logp, -50, 50))
            ax2 = axes[1, col]
            ax2.imshow(dens, origin="lower", extent=b, aspect="auto", cmap=_CMAP,
                       vmin=0, vmax=float(np.quantile(dens, 0.998)) or None)
            ax2.set_xticks([])
            ax2.set_yticks([])
    axes[0, 0].set_ylabel("grid and data", fontsize=9)
    axes[1, 0].set_ylabel("density of this representation", fontsize=9)
    return fig


def _finite_box(p: np.ndarray, pad: float = 0.1) -> tuple[float, float, float, float]:
    p = p[np.isfinite(p).all(1)]
    if len(p) == 0:
        return -3.0, 3.0, -3.0, 3.0
    lo = np.quantile(p, 0.003, axis=0)
    hi = np.quantile(p, 0.997, axis=0)
    span = np.maximum(hi - lo, 1e-3)
    lo, hi = lo - pad * span, hi + pad * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def layer_log_dets(names: Sequence[str], values: Sequence[float]) -> Figure:
    """Each layer's mean log-det contribution (nats), data -> latent, top to bottom.

    Positive bars expand volume on the way to the latent (the layer concentrates
    probability), negative bars shrink it; their sum is the flow's mean log-det.
    """
    vals = np.asarray(values, dtype=float)
    n = len(vals)
    fig = _figure(7.5, max(2.2, 0.24 * n + 1.1))
    ax = fig.subplots()
    y = np.arange(n)
    colors = [_MODEL if v >= 0 else _DATA for v in np.nan_to_num(vals)]
    ax.barh(y, np.nan_to_num(vals), color=colors, height=0.7)
    ax.set_yticks(y, [f"{i}: {name}" for i, name in enumerate(names, start=1)], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", lw=0.8)
    total = float(np.nansum(vals))
    _style(ax, f"mean log|det| per layer (total {total:.3f} nats)")
    ax.set_xlabel("mean log|det dz/dx| on test data (nats)", fontsize=8)
    ax.grid(axis="x", alpha=0.25)
    if not np.all(np.isfinite(vals)):
        ax.text(0.99, 0.01, "non-finite values shown as 0", transform=ax.transAxes,
                ha="right", fontsize=7)
    return fig
