"""The run report: layer-by-layer checks, the numbers, and one self-contained HTML page.

A run folder (written by ``exactflow train`` / ``exactflow demo``) holds the model, the data
split and the training history; :func:`build_report` turns it into ``report/index.html``
with PNG figures beside it and ``report/metrics.json``. The page has inline CSS, no scripts
and no external URL, so it opens in a browser with no network.

The layer helpers here (:func:`flatten_layers`, :func:`propagate`, :func:`check_layers`)
need no plotting library; :mod:`exactflow.plotting` (matplotlib) is imported only when the
figures are drawn.
"""

from __future__ import annotations

import copy
import html
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .core import Compose, Transform
from .distributions import Flow
from .jacobian import check_transform

__all__ = [
    "LayerCheck",
    "flatten_layers",
    "propagate",
    "check_layers",
    "format_check_table",
    "build_report",
    "write_text_atomic",
    "write_json_atomic",
]


# -- layers ---------------------------------------------------------------------------


def flatten_layers(transform: Transform) -> list[Transform]:
    """The layers of a transform in data -> latent order, nested ``Compose`` unrolled."""
    if isinstance(transform, Compose):
        out: list[Transform] = []
        for t in transform:
            out.extend(flatten_layers(t))
        return out
    return [transform]


def layer_name(layer: Transform) -> str:
    """A short readable name for a layer (its class name)."""
    return type(layer).__name__


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``module`` in eval mode and under ``torch.no_grad`` and restore its modes after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, mode in modes:
            m.training = mode


def propagate(flow: Flow, x: Tensor, context: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """Push ``x`` through the flow's layers one at a time (eval mode, no gradients).

    Returns ``[(x_0, 0), (x_1, ladj_1), ..., (x_K, ladj_K)]`` where ``x_0 = x`` is the data,
    ``x_K`` the latent, and ``ladj_k = log|det d x_k / d x_{k-1}|`` per row.
    """
    out = [(x, x.new_zeros(x.shape[0]))]
    with evaluating(flow):
        for layer in flatten_layers(flow.transform):
            x, ladj = layer(x, context)
            out.append((x, ladj))
    return out


@dataclass
class LayerCheck:
    """One row of the layer-by-layer check table.

    Attributes:
        index: the layer's position (0 is the layer that sees the data).
        name: the layer's class name.
        log_det_error: largest |analytic - autograd| log-determinant error.
        round_trip_error: largest |inverse(forward(x)) - x|.
        mean_log_det: the layer's mean log-det contribution on the points (nats).
        ok: whether every check passed.
        failures: readable lines for the failed checks.
    """

    index: int
    name: str
    log_det_error: float
    round_trip_error: float
    mean_log_det: float
    ok: bool
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("log_det_error", "round_trip_error", "mean_log_det"):
            d[key] = _json_float(d[key])
        return d


def check_layers(
    flow: Flow, x: Any, context: Any = None, *, max_points: int = 256
) -> list[LayerCheck]:
    """Run :func:`exactflow.check_transform` on each layer, on the data that reaches it.

    The flow is copied, cast to float64 and put in eval mode (batch statistics frozen), so
    the caller's model is untouched. Layer ``k`` is checked at ``x_{k-1}``, the first
    ``max_points`` rows of ``x`` pushed through layers ``1..k-1``: the points the layer
    really sees, not a standard normal that may sit far outside its working range.

    Returns:
        One :class:`LayerCheck` per layer, in data -> latent order.
    """
    model = copy.deepcopy(flow).double().eval()
    x = torch.as_tensor(np.asarray(x, dtype=np.float64)[:max_points])
    ctx = None
    if context is not None:
        ctx = torch.as_tensor(np.asarray(context, dtype=np.float64)[:max_points])
    rows: list[LayerCheck] = []
    for i, layer in enumerate(flatten_layers(model.transform)):
        try:
            rep = check_transform(layer, x, ctx, raise_on_failure=False)
            failures = list(rep.failures)
            ld_err = rep.errors.get("log_det", math.nan)
            rt_err = rep.errors.get("round_trip", math.nan)
        except Exception as err:  # noqa: BLE001 - a layer that crashes is a failed check
            failures = [f"{type(err).__name__}: {err}"]
            ld_err = rt_err = math.nan
        with torch.no_grad():
            try:
                x_next, ladj = layer(x, ctx)
                mean_ld = float(ladj.mean())
            except Exception:  # noqa: BLE001 - reported above; keep the points as they are
                x_next, mean_ld = x, math.nan
        rows.append(
            LayerCheck(i, layer_name(layer), ld_err, rt_err, mean_ld, not failures, failures)
        )
        x = x_next
    return rows


def format_check_table(rows: list[LayerCheck]) -> str:
    """The check table as aligned plain text."""
    head = f"{'layer':>5}  {'name':<28} {'log-det error':>13} {'round-trip error':>16} " \
           f"{'mean log-det':>12}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.index:>5}  {r.name:<28} {_fmt_err(r.log_det_error):>13} "
            f"{_fmt_err(r.round_trip_error):>16} {r.mean_log_det:>12.4f}  "
            f"{'ok' if r.ok else 'FAIL'}"
        )
    return "\n".join(lines)


def _fmt_err(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2e}"


def _json_float(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


# -- atomic files ---------------------------------------------------------------------


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    A reader never sees a half-written file, and an error leaves no file behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with _suppress_os_error():
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=2, allow_nan=False, default=_json_default)
    write_text_atomic(path, text + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return _json_float(float(obj))
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


@contextmanager
def _suppress_os_error() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


# -- run folders ----------------------------------------------------------------------

#: The files of a run folder (``exactflow train`` writes them; every command reads them).
RUN_JSON = "run.json"
MODEL_FILE = "model.pt"
DATA_FILE = "data.npz"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
REPORT_DIR = "report"
RUN_FORMAT = "exactflow-run"


class RunError(Exception):
    """A run folder that cannot be used: missing, incomplete or corrupt (the message says which)."""


@dataclass
class Run:
    """A finished training run read back from its folder.

    Attributes:
        path: the run folder.
        info: the parsed ``run.json`` (data source, split, options, metrics, versions).
        flow: the trained model (eval mode, CPU), or ``None`` when not asked for.
        history: the parsed ``history.json`` (``{}`` when absent).
    """

    path: Path
    info: dict[str, Any]
    flow: Flow | None = None
    history: dict[str, Any] = field(default_factory=dict)

    def data(self, part: str) -> np.ndarray:
        """The ``train``, ``val`` or ``test`` rows stored with the run, as a float64 array."""
        file = self.path / DATA_FILE
        if not file.is_file():
            raise RunError(
                f"run folder {str(self.path)!r} has no {DATA_FILE} (was it deleted?); "
                "retrain the run to recreate it"
            )
        try:
            with np.load(file, allow_pickle=False) as npz:
                if part not in npz.files:
                    raise RunError(f"{str(file)!r} has no {part!r} array (found {npz.files})")
                return np.asarray(npz[part], dtype=np.float64)
        except RunError:
            raise
        except Exception as err:  # noqa: BLE001 - zip, pickle or format errors alike
            raise RunError(f"{str(file)!r} is corrupt or not a numpy .npz file: {err}") from None

    @property
    def features(self) -> int:
        return int(self.info["data"]["features"])

    @property
    def columns(self) -> list[str]:
        """Column names of the data (``x1``, ``x2``, ... when the source had none)."""
        names = self.info["data"].get("column_names")
        if names and len(names) == self.features:
            return [str(c) for c in names]
        return [f"x{i + 1}" for i in range(self.features)]


def load_run(run_dir: str | os.PathLike[str], *, model: bool = True) -> Run:
    """Read a run folder written by ``exactflow train``.

    Args:
        run_dir: the folder.
        model: also load ``model.pt`` (with :func:`exactflow.load`, weights only).

    Raises:
        RunError: the folder or one of its files is missing, unreadable or corrupt, or the
            run did not finish.
    """
    path = Path(run_dir)
    if not path.exists():
        raise RunError(f"no such run folder: {str(path)!r}")
    if not path.is_dir():
        raise RunError(f"{str(path)!r} is not a run folder (it is a file)")
    info_file = path / RUN_JSON
    if not info_file.is_file():
        raise RunError(
            f"{str(path)!r} is not a run folder: it has no {RUN_JSON} "
            "(make one with `exactflow train DATA --model NAME --out RUN_DIR`)"
        )
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{str(info_file)!r} is corrupt: {err}") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise RunError(f"{str(info_file)!r} is not an exactflow run description")
    if info.get("status") != "done":
        raise RunError(
            f"the run in {str(path)!r} did not finish (status {info.get('status')!r}); "
            "continue it with `exactflow train ... --resume`"
        )
    history: dict[str, Any] = {}
    hist_file = path / HISTORY_FILE
    if hist_file.is_file():
        try:
            history = json.loads(hist_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{str(hist_file)!r} is corrupt: {err}") from None
    run = Run(path, info, None, history)
    if model:
        run.flow = load_model(path)
    return run


def load_model(run_dir: Path) -> Flow:
    """Load ``model.pt`` of a run folder, turning every failure into a :class:`RunError`."""
    from .io import CheckpointError, load

    file = run_dir / MODEL_FILE
    if not file.is_file():
        raise RunError(
            f"run folder {str(run_dir)!r} has no {MODEL_FILE} (was it deleted?); "
            "retrain the run to recreate it"
        )
    try:
        return load(file)
    except CheckpointError as err:
        raise RunError(str(err)) from None


# -- the report -----------------------------------------------------------------------


_CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2733;
       max-width: 1180px; margin: 2em auto; padding: 0 1.2em; background: #fbfbfc; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 1px solid #d8dde3;
     padding-bottom: 0.2em; }
.sub { color: #5a6675; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { padding: 0.3em 0.9em; border-bottom: 1px solid #e3e7eb; text-align: left; }
th { background: #eef1f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums;
         font-family: ui-monospace, Menlo, monospace; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.card { background: white; border: 1px solid #dde2e7; border-radius: 8px; padding: 0.6em 1em;
        min-width: 9em; }
.card .v { font-size: 1.35em; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .k { color: #5a6675; font-size: 0.85em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7eb; background: white; }
figcaption { color: #4a5561; font-size: 0.9em; margin-top: 0.3em; }
.ok { color: #1a7f37; font-weight: 600; }
.fail { color: #c62828; font-weight: 600; }
pre { background: #f1f3f5; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
code { font-family: ui-monospace, Menlo, monospace; font-size: 0.92em; }
footer { margin: 3em 0 1em; color: #5a6675; font-size: 0.85em; }
"""


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


def _figure_html(file: str, alt: str, caption: str) -> str:
    return (
        f'<figure><img src="{_e(file)}" alt="{_e(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _check_table_html(rows: list[LayerCheck]) -> str:
    out = [
        "<table><tr><th>layer</th><th>name</th><th>log-det error</th>"
        "<th>round-trip error</th><th>mean log-det (nats)</th><th>verdict</th></tr>"
    ]
    for r in rows:
        verdict = '<span class="ok">ok</span>' if r.ok else (
            f'<span class="fail" title="{_e("; ".join(r.failures))}">FAIL</span>'
        )
        out.append(
            f'<tr><td class="num">{r.index}</td><td>{_e(r.name)}</td>'
            f'<td class="num">{_e(_fmt_err(r.log_det_error))}</td>'
            f'<td class="num">{_e(_fmt_err(r.round_trip_error))}</td>'
            f'<td class="num">{_num(r.mean_log_det)}</td><td>{verdict}</td></tr>'
        )
    out.append("</table>")
    return "".join(out)


def compute_metrics(run: Run, checks: list[LayerCheck] | None = None) -> dict[str, Any]:
    """The report's numbers: test metrics, parameter count, training time, check verdict."""
    from .train import evaluate

    assert run.flow is not None
    test = run.data("test")
    ev = evaluate(run.flow, test)
    info = run.info
    out: dict[str, Any] = {
        "test": {k: v for k, v in ev.items()},
        "parameters": int(sum(p.numel() for p in run.flow.parameters())),
        "train_time_s": info.get("metrics", {}).get("train_time_s"),
        "steps": info.get("metrics", {}).get("steps"),
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


#: The report's figure files (rebuilt on every run of :func:`build_report`).
FIGURES = ("data_vs_model.png", "pairwise.png", "training.png", "cartographer.png",
           "layer_log_dets.png")


def build_report(
    run_dir: str | os.PathLike[str], *, check_points: int = 256, seed: int = 0
) -> Path:
    """(Re)build ``report/`` of a run folder: ``index.html``, PNG figures, ``metrics.json``.

    The page is self-contained: inline CSS, no scripts, images referenced by relative file
    name beside it, no external URL. Figures need matplotlib (``pip install
    'exactflow[plot]'``); every file is written atomically.

    Args:
        run_dir: a finished run folder.
        check_points: test rows used by the layer-by-layer check (float64, O(d^3) each).
        seed: seed of the model samples drawn for the figures.

    Returns:
        The path of ``index.html``.

    Raises:
        RunError: the run folder is incomplete or corrupt.
        ImportError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "the report needs matplotlib: pip install 'exactflow[plot]'"
        ) from None
    from . import plotting

    run = load_run(run_dir)
    flow = run.flow
    assert flow is not None
    out_dir = run.path / REPORT_DIR
    out_dir.mkdir(exist_ok=True)
    test = run.data("test")
    train = run.data("train")
    d = test.shape[1]

    checks = check_layers(flow, test, max_points=check_points)
    metrics = compute_metrics(run, checks)
    metrics["check"]["points"] = int(min(check_points, len(test)))

    # Mean log-det of each layer on the whole test split (float32, the model as trained).
    steps = propagate(flow, torch.as_tensor(test, dtype=_flow_dtype(flow)))
    layers = flatten_layers(flow.transform)
    layer_ld = [float(ladj.double().mean()) for _, ladj in steps[1:]]
    metrics["layer_mean_log_det"] = [
        {"index": i, "name": layer_name(t), "mean_log_det": _json_float(v)}
        for i, (t, v) in enumerate(zip(layers, layer_ld, strict=True))
    ]

    info = run.info
    entropy = info["data"].get("entropy")
    written: list[tuple[str, str, str]] = []
    if d == 2:
        shown = train if len(train) <= 20000 else train[:20000]
        fig = plotting.data_vs_model(flow, shown, seed=seed)
        plotting.save_figure(fig, out_dir / "data_vs_model.png")
        written.append((
            "data_vs_model.png", "data, model density and model samples",
            f"Left: the training data ({len(shown):,} points) as a 2D histogram. Middle: the "
            "model's exact density p(x) on a grid. Right: a histogram of samples drawn from "
            "the model. The three panels share one box, each with its own colour scale.",
        ))
    else:
        fig = plotting.pairwise(flow, train, seed=seed)
        plotting.save_figure(fig, out_dir / "pairwise.png")
        written.append((
            "pairwise.png", "pairwise marginals of data and model samples",
            f"Pairwise marginals of the first {min(d, 4)} of {d} dimensions: training data "
            "below the diagonal, as many model samples above it, and both histograms on the "
            "diagonal.",
        ))
    figures_data = list(written)
    written.clear()
    if run.history:
        fig = plotting.training_curves(run.history, entropy=entropy)
        plotting.save_figure(fig, out_dir / "training.png")
        written.append((
            "training.png", "training and validation NLL",
            "Negative log-likelihood (nats per example) during training: each training point "
            "is the mean over the mini-batches since the previous point; each validation "
            "point is the whole validation split."
            + (" The dashed line is the true entropy of the generator, the best any model "
               "can reach." if entropy is not None else ""),
        ))
    figures_training = list(written)
    written.clear()
    if d == 2:
        fig = plotting.cartographer(flow, test, seed=seed)
        plotting.save_figure(fig, out_dir / "cartographer.png")
        written.append((
            "cartographer.png", "the flow warping a grid layer by layer",
            "The flow as a cartographer. Each column is the representation after some of "
            "the layers, from the data (left) to the latent (right). Top: a regular grid of "
            "data space and the test points, carried along. Bottom: the exact density of "
            "that representation (base density pulled back through the remaining layers), "
            "turning from the data density into the standard normal.",
        ))
    fig = plotting.layer_log_dets([layer_name(t) for t in layers], layer_ld)
    plotting.save_figure(fig, out_dir / "layer_log_dets.png")
    written.append((
        "layer_log_dets.png", "mean log-determinant per layer",
        "Each layer's mean log|det dz/dx| on the test split: its contribution to the "
        "log-likelihood. They add up to the flow's total log-det; the base density "
        "log N(z; 0, I) supplies the rest.",
    ))
    figures_flow = list(written)
    figures = [f for f, _, _ in figures_data + figures_training + figures_flow]
    for stale in FIGURES:
        if stale not in figures and (out_dir / stale).exists():
            (out_dir / stale).unlink()

    metrics["figures"] = figures
    write_json_atomic(out_dir / "metrics.json", metrics)
    page = _render(run, metrics, checks, figures_data, figures_training, figures_flow)
    index = out_dir / "index.html"
    write_text_atomic(index, page)
    return index


def _flow_dtype(flow: Flow) -> torch.dtype:
    p = next(iter(flow.parameters()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _render(
    run: Run,
    metrics: dict[str, Any],
    checks: list[LayerCheck],
    figures_data: list[tuple[str, str, str]],
    figures_training: list[tuple[str, str, str]],
    figures_flow: list[tuple[str, str, str]],
) -> str:
    info = run.info
    data = info.get("data", {})
    model = info.get("model", {})
    test = metrics["test"]
    name = run.path.resolve().name
    title = f"exactflow report: {name}"
    sizes = data.get("rows", {})
    cards = [
        ("test NLL (nats)", f"{_num(test.get('nll'))} ± {_num(test.get('nll_se'))}"),
        ("bits / dim", _num(test.get("bpd"))),
    ]
    if "test_nll_minus_entropy" in metrics:
        cards.append(("test NLL − true entropy", _num(metrics["test_nll_minus_entropy"])))
    cards += [
        ("parameters", f"{metrics['parameters']:,}"),
        ("training time", _duration(metrics.get("train_time_s"))),
        ("layer check", "all ok" if metrics["check"]["ok"] else "FAILED"),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(model.get("model", "?"))} flow on {_e(data.get("name", "?"))} '
        f'({_e(data.get("features", "?"))} features; {_e(sizes.get("train", "?"))} train / '
        f'{_e(sizes.get("val", "?"))} validation / {_e(sizes.get("test", "?"))} test rows), '
        f'trained {_e(info.get("finished", ""))}</p>',
        '<div class="cards">',
        *(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
          for k, v in cards),
        "</div>",
        "<h2>The numbers</h2>",
        _numbers_table(metrics, info),
    ]
    if figures_data:
        parts.append("<h2>Data and model</h2>")
        parts.extend(_figure_html(*f) for f in figures_data)
    if figures_training:
        parts.append("<h2>Training</h2>")
        parts.extend(_figure_html(*f) for f in figures_training)
    parts.append("<h2>The flow as a cartographer</h2>" if len(figures_flow) > 1
                 else "<h2>The flow, layer by layer</h2>")
    parts.extend(_figure_html(*f) for f in figures_flow)
    parts += [
        "<h2>Layer-by-layer check</h2>",
        f"<p>Each layer checked with <code>check_transform</code> in float64 (eval mode) on "
        f"the first {metrics['check']['points']} test rows pushed through the layers before "
        "it: its analytic log-determinant against the log-determinant of the autograd "
        "Jacobian, and <code>inverse(forward(x))</code> against <code>x</code>.</p>",
        _check_table_html(checks),
        "<h2>Configuration</h2>",
        "<pre>" + _e(json.dumps({k: info.get(k) for k in ("model", "options", "data")},
                                indent=2, default=str)) + "</pre>",
        "<h2>Versions</h2>",
        "<pre>" + _e(json.dumps(info.get("versions", {}), indent=2)) + "</pre>",
        f"<footer>Rebuild this page with <code>exactflow report {_e(run.path)}</code>. "
        "Numbers are in nats per example in the units of the data (the standardization is "
        "part of the model).</footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _numbers_table(metrics: dict[str, Any], info: dict[str, Any]) -> str:
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
    rows += [
        ("parameters", f"{metrics['parameters']:,}"),
        ("training steps", _e(metrics.get("steps") if metrics.get("steps") is not None else "?")),
        ("training time", _e(_duration(metrics.get("train_time_s")))),
        ("device", _e(info.get("options", {}).get("device", "?"))),
    ]
    body = "".join(f'<tr><td>{k}</td><td class="num">{v}</td></tr>' for k, v in rows)
    return f"<table>{body}</table>"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "n/a"
    s = float(seconds)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"
