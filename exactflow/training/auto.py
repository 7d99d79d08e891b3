"""``model="auto"``: try a short ladder of models within a time budget, keep the best on
validation, and say what was tried.

The ladder climbs from the classical estimators to flows: a full-covariance Gaussian
(closed form), Gaussian mixtures whose size and covariance type are chosen on the
validation rows (EM), then flows sized to the number of rows, each starting from the
Gaussian fit (``base="gaussian"``: at step 0 the flow *is* the Gaussian, and validation-based
stopping keeps only what improves on it). Every candidate is scored on the same validation
rows; the winner is the lowest validation NLL. The leaderboard, one entry per candidate
(its config, validation NLL, steps, kept step, seconds, and why it was skipped if it
was), is returned for the run folder and the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..distributions import Flow
from ..models import build
from ..validation import positive_float
from .batches import wrap
from .history import History
from .likelihood import fit, hold_out
from .metrics import evaluate

__all__ = ["fit_auto", "ladder", "Candidate", "Entry", "AutoResult"]


@dataclass
class Candidate:
    """One rung of the ladder: a model config and the training options it gets."""

    name: str
    config: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Entry:
    """One line of the leaderboard."""

    name: str
    config: dict[str, Any]
    val_nll: float | None = None
    seconds: float = 0.0
    steps: int = 0
    best_step: int | None = None
    status: str = "ok"
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AutoResult:
    """What :func:`fit_auto` returns.

    Attributes:
        flow: the chosen model, trained, in eval mode.
        leaderboard: one :class:`Entry` per candidate, in the order tried; the chosen one
            has ``chosen=True``.
        history: the chosen model's training :class:`History`.
    """

    flow: Flow
    leaderboard: list[Entry]
    history: History

    @property
    def chosen(self) -> Entry:
        return next(e for e in self.leaderboard if e.chosen)


def _gmm_sizes(n: int, d: int) -> list[int]:
    # A full covariance has d (d + 3) / 2 numbers per component: keep at least ~5 rows each.
    per_component = d * (d + 3) / 2 + 1
    most = max(1, int(n / (5 * per_component)))
    return [k for k in (2, 3, 4, 6, 8, 12, 16, 24, 32) if k <= max(most, 2)]


def _width(n: int, d: int) -> int:
    """Hidden width that follows the rows and the columns: small tables get small nets."""
    if n < 500:
        return 32
    if n < 5000:
        return 64 if d <= 32 else 128
    return 128 if d <= 16 else 256


def ladder(n: int, d: int, context: int = 0) -> list[Candidate]:
    """The candidates ``fit_auto`` tries for ``n`` training rows of ``d`` columns, in order."""
    out: list[Candidate] = []
    if context == 0:
        out.append(Candidate("gaussian", {"model": "gaussian"}))
        for k in _gmm_sizes(n, d):
            for covariance in ("full", "diag"):
                out.append(Candidate(f"gmm-{k}-{covariance}",
                                     {"model": "gmm", "components": k, "covariance": covariance}))
    h = _width(n, d)
    base = {"base": "gaussian"} if context == 0 else {}
    options = {"weight_decay": 1e-4, "noise": "auto"} if n < 2000 else {}
    out.append(Candidate("maf", {"model": "maf", "layers": 5, "hidden": [h, h], **base},
                         options))
    out.append(Candidate("nsf-autoregressive", {"model": "nsf", "kind": "autoregressive",
                                                "layers": 4, "hidden": [h, h], **base}, options))
    if d >= 2:
        out.append(Candidate("nsf-coupling", {"model": "nsf", "layers": 6,
                                              "hidden": [h, h], **base}, options))
        out.append(Candidate("realnvp", {"model": "realnvp", "layers": 8, "hidden": [h, h],
                                         "batch_norm": False, **base}, options))
    return out


def fit_auto(
    train: Any,
    val: Any = None,
    *,
    context: Any = None,
    val_context: Any = None,
    budget: float = 300.0,
    val_fraction: float = 0.15,
    standardize: bool = True,
    candidates: list[Candidate] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> AutoResult:
    """Fit a short ladder of models, keep the best on validation; returns it with the
    leaderboard.

    Args:
        train: ``(n, d)`` training rows (array, tensor or memmap).
        val: validation rows; default ``val_fraction`` of ``train`` held out (seeded).
        context, val_context: conditioning rows for conditional models (the classical
            candidates are then skipped: they are unconditional).
        budget: seconds the whole ladder may take. Candidates run in order; one that
            starts is stopped at its share of the time left (keeping its best weights), and
            those that no longer fit are listed as skipped.
        val_fraction: the share held out when ``val`` is not given.
        standardize: give every model a standardization layer filled from the data.
        candidates: the ladder (default :func:`ladder` for the data's size).
        seed: seeds the split, every initialization and the batches.
        device: where to train.
        progress: show each candidate's progress bar.
        log: called with a line per candidate (default: silent).

    Returns:
        An :class:`AutoResult`: the best model (trained on ``train`` with early stopping on
        ``val``, in eval mode), the leaderboard (one :class:`Entry` per candidate, the
        chosen one marked) and the chosen model's history.

    Example:
        >>> import torch, exactflow as ef
        >>> x = torch.randn(300, 2) @ torch.tensor([[1.0, 0.0], [0.9, 0.4]])
        >>> result = ef.fit_auto(x, budget=20)
        >>> result.chosen.val_nll == min(e.val_nll for e in result.leaderboard if e.val_nll)
        True
    """
    budget = positive_float(budget, "budget")
    say = log or (lambda text: None)
    rows = wrap(train, "training data", _width_of(train), strict=True)
    ctx = None
    if context is not None:
        ctx = wrap(context, "context", _width_of(context), len(rows))
    if val is None:
        rows, ctx, val_rows, val_ctx = hold_out(rows, ctx, val_fraction, seed)
        if val_rows is None:
            raise ValueError(f"{len(rows)} rows are too few to hold out validation rows")
    else:
        val_rows = wrap(val, "validation data", rows.data.shape[1], strict=True)
        val_ctx = None if val_context is None else wrap(
            val_context, "val_context", _width_of(val_context), len(val_rows))
    n, d = len(rows), int(rows.data.shape[1])
    c = 0 if ctx is None else int(ctx.data.shape[1])
    ladder_ = candidates if candidates is not None else ladder(n, d, c)
    start = time.perf_counter()
    board: list[Entry] = []
    best: tuple[float, Flow, History] | None = None
    for i, cand in enumerate(ladder_):
        entry = Entry(cand.name, dict(cand.config))
        board.append(entry)
        left = budget - (time.perf_counter() - start)
        if left <= 0:
            entry.status = "skipped: out of budget"
            continue
        config = {**cand.config, "features": d, "standardize": standardize}
        if c:
            config["context"] = c
        clock = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                flow = build(config)
            share = left / max(1, sum(1 for other in ladder_[i:] if _is_flow(other)))
            deadline = clock + (share if _is_flow(cand) else left)
            history = fit(
                flow, rows, val_rows, context=ctx, val_context=val_ctx, seed=seed,
                device=device, progress=progress,
                callback=_deadline(deadline), **cand.options,
            )
            val_nll = evaluate(flow, val_rows, val_ctx)["nll"]
        except Exception as err:  # noqa: BLE001 - a failed candidate is listed, not fatal
            entry.status = f"failed: {type(err).__name__}: {err}"[:300]
            entry.seconds = time.perf_counter() - clock
            say(f"{cand.name}: {entry.status}")
            continue
        entry.seconds = time.perf_counter() - clock
        entry.val_nll = val_nll if math.isfinite(val_nll) else None
        entry.steps, entry.best_step = history.total_steps, history.best_step
        if history.stopped_early and time.perf_counter() >= deadline:
            entry.status = "stopped at its share of the budget"
        say(f"{cand.name}: validation NLL {val_nll:.4f} in {entry.seconds:.1f} s")
        if math.isfinite(val_nll) and (best is None or val_nll < best[0]):
            best = (val_nll, flow, history)
            for other in board:
                other.chosen = other is entry
    if best is None:
        raise RuntimeError("no candidate of the ladder could be fitted: " + "; ".join(
            f"{e.name}: {e.status}" for e in board))
    return AutoResult(best[1], board, best[2])


def _is_flow(candidate: Candidate) -> bool:
    return candidate.config.get("model") not in ("gaussian", "gmm")


def _width_of(data: Any) -> int:
    shape = getattr(data, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {shape}")
    return int(shape[1])


def _deadline(when: float) -> Callable[[History], bool]:
    def stop(history: History) -> bool:
        return time.perf_counter() >= when

    return stop
