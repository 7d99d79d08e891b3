"""``model="auto"``: try a short ladder of models within a time budget, keep the best on
validation, and say what was tried.

The ladder (measured on eight real tables of 150 to 1,800 rows: ``benchmarks/README.md``,
"Real tables") climbs from the classical estimators to flows:

1. a full-covariance Gaussian (closed form);
2. a Gaussian mixture whose number of components (1 to 20) and covariance type (full or
   diagonal) are chosen on the validation rows (EM). Choosing them by 5-fold
   cross-validation instead was measured on the six tables of up to 1,000 rows and changed
   the test NLL by -0.10 to +0.25 nats, never beyond two standard errors
   (``python -m benchmarks.gmm_folds``), so the single split stays;
3. a neural spline flow (5 coupling layers, conditioners 2 x 64, 8 bins) on that mixture as
   its fixed base, every layer starting at the identity, at learning rate 3e-4: at step 0
   it *is* the mixture, and validation-based stopping keeps only what improves on it;
4. an autoregressive neural spline flow (3 layers, MADE 2 x 64, 8 bins) on a standard
   normal base at learning rate 1e-3, which wins where data allow (1,000 rows and more);
5. with budget left: the same autoregressive flow on the mixture base, then MAF and
   RealNVP on it.

With a context the ladder is the linear-Gaussian regression ``x | c ~ N(W c + b, Sigma)``
(closed form), then a spline flow, MAF and an autoregressive spline flow.

The conditioners are 2 x 64 whatever the number of rows: with 2 x 32 instead
(``python -m benchmarks.ladder --hidden 32,32``) the pick gains 0.03 to 0.15 nats on the
four tables of 100 to 320 training rows and loses 0.58 on cancer (400 rows, 30 columns),
so no rule in the rows alone separates them.

The two flows of 3 and 4 share the budget; those of 5 run on what they leave. With one
column there are no couplings: the autoregressive flow on the mixture takes the place
of rung 3. Measured with every rung trained to its stopping point and the pick made on
validation (``python -m benchmarks.ladder``, eight tables, 3 splits): the autoregressive
flow of 4 in place of a 5-layer coupling one gains 2.5 nats on digits (64 columns; 4.3
with the pooled scale below) and 0.15 on quakes and changes no other table by more than
0.01; the rung of 5 gains 0.2-0.5 nats on cancer and diabetes where it runs.

Every model standardizes its input in one space, chosen from the training rows: one
scale per column, or with ``standardize="auto"`` (the default) one mean and scale for all
columns where they lie on one range with a nearly constant column among them, as an
image's border pixels (:meth:`~exactflow.transforms.Standardize.choose_scale`; 4.1 nats
per row on the digit images, the same ladder's pick).

Every candidate is scored on the same validation rows; the winner is the lowest validation
NLL, where a later (larger) candidate must beat the best so far by more than
:data:`MARGIN_SE` standard errors of the per-row difference (and more than rounding,
:data:`TIE_NATS`): the validation rows also chose the mixture and every flow's stopping
step, and a gain within noise was kept half the time, on data where the simplest rung is
right (3-D Gaussian rows: 0.1 nats a row worse on test data, ``benchmarks/pick.py``). With
fewer than :data:`MIN_VAL_ROWS` validation rows (below about 100 rows with a 15% split,
150 with 10%) a choice among flows is noise: the mixture is then chosen by 5-fold cross-
validation over all rows and no flow is tried (2.3-2.8 nats better on 20-row tables,
``benchmarks/tiny.py``).
The leaderboard, one entry per candidate (its config, validation NLL, steps, kept step,
seconds, and why it was skipped if it was), is returned for the run folder and the report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..datasets import check_full_rank, column_names
from ..distributions import Flow
from ..gaussians import GaussianMixture, em_class
from ..models import build, with_bounds
from ..transforms.standardize import Standardize, describe_standardize, resolve_standardize
from ..transforms.support import Support, bounds_spec, map_rows
from ..validation import (
    DataError,
    counted,
    device_named,
    positive_float,
)
from .advice import TrainingError
from .batches import Rows, hold_out, width_of, wrap
from .history import History
from .likelihood import fit
from .loop import adam, clone
from .metrics import row_nll, warn_dominant_rows
from .mixtures import GMM_COMPONENTS, SEARCH_ROWS, search_gmm, select_gmm

__all__ = ["fit_auto", "ladder", "select_gmm", "Candidate", "Entry", "AutoResult",
           "MIN_VAL_ROWS", "MARGIN_SE", "TIE_NATS"]

#: With fewer validation rows than this, ``fit_auto`` keeps a Gaussian mixture chosen by
#: 5-fold cross-validation and tries no flow: a choice among flows on a dozen rows is
#: noise (``benchmarks/README.md``, "Tiny tables": ``python -m benchmarks.tiny``).
MIN_VAL_ROWS = 15

#: A candidate must beat the best so far by more than this (relative to the validation
#: NLL, in nats; absolute below 1 nat) to be kept: the candidates come simplest first, and
#: a flow on the mixture that kept its step 0 *is* that mixture, scored through identity
#: layers in float32, a few 1e-8 nats either side of it.
TIE_NATS = 1e-6

#: A candidate must beat the best so far by more than this many standard errors of the
#: paired per-row difference of their validation NLLs (``benchmarks/pick.py``).
MARGIN_SE = 0.5


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
        held_out: the row numbers of ``train`` held out for validation (the rows the model
            kept never trained on, for conformal p-values), or ``None``.
    """

    flow: Flow
    leaderboard: list[Entry]
    history: History
    #: Row numbers of ``train`` held out for validation and not trained on by the model
    #: kept (``None`` where ``val`` was given, or too few to choose on refitted on all).
    held_out: np.ndarray | None = None

    @property
    def chosen(self) -> Entry:
        return next(e for e in self.leaderboard if e.chosen)


@dataclass
class Candidate:
    """One rung of the ladder: a model config and the training options it gets.

    ``priority`` rungs share the time budget among themselves; the others run only on
    what is left.
    """

    name: str
    config: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    priority: bool = True


def ladder(n: int, d: int, context: int = 0, gmm: dict[str, Any] | None = None) -> list[Candidate]:
    """The flow rungs of the ladder for ``n`` rows of ``d`` columns (see the module doc);
    ``gmm`` is the chosen mixture base (``None`` for a conditional model)."""
    del n  # no measured rule for sizes that follow n (see the module doc)
    net = {"layers": 5, "hidden": [64, 64]}
    kind = "coupling" if d >= 2 else "autoregressive"
    spline = {"model": "nsf", "bins": 8, "hidden": [64, 64]}
    autoregressive = {**spline, "kind": "autoregressive", "layers": 3}
    out: list[Candidate] = []
    if gmm is not None and context == 0:
        base = {"base": {"name": "gmm", **gmm}}
        slow = {"lr": 3e-4}
        on_mixture = Candidate("nsf-autoregressive on the mixture",
                               {**autoregressive, **base}, slow, priority=d < 2)
        if d >= 2:
            out.append(Candidate("nsf on the mixture",
                                 {**spline, "kind": "coupling", "layers": 5, **base}, slow))
        else:  # one column: no coupling; the autoregressive flow on the mixture goes first
            out.append(on_mixture)
        out.append(Candidate("nsf-autoregressive", dict(autoregressive)))
        if d >= 2:
            out.append(on_mixture)
        out.append(Candidate("maf on the mixture", {"model": "maf", **net, **base}, slow,
                             priority=False))
        if d >= 2:
            out.append(Candidate("realnvp on the mixture",
                                 {"model": "realnvp", "layers": 8, "hidden": [64, 64],
                                  "batch_norm": False, **base}, slow, priority=False))
    else:
        out.append(Candidate("nsf", {**spline, "kind": kind, **net}))
        out.append(Candidate("maf", {"model": "maf", **net}, priority=False))
        if d >= 2:
            out.append(Candidate("nsf-autoregressive", dict(autoregressive), priority=False))
    return out


def fit_auto(
    train: Any,
    val: Any = None,
    *,
    context: Any = None,
    val_context: Any = None,
    budget: float = 300.0,
    val_fraction: float = 0.15,
    standardize: bool | str = "auto",
    bounds: Any = None,
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
        context, val_context: conditioning rows for conditional models: the ladder then
            starts from the linear-Gaussian regression (``models.gaussian(d, context=k)``)
            in place of the unconditional Gaussian and mixtures.
        budget: seconds the whole ladder may take. The classical models come first (a
            mixture search stops early if it would eat the budget); the first two flows
            share what is left, the others run on what they leave. A flow stopped by its
            share keeps its best weights; candidates that no longer fit are listed as
            skipped. The one-time imports of a process (scikit-learn's EM, torch's
            optimizers: a few seconds) come before the clock.
        val_fraction: the share held out when ``val`` is not given.
        standardize: give every model a standardization layer filled from the training rows:
            ``"auto"`` one mean and scale for all columns where they lie on one range and
            some nearly constant column would otherwise be scaled far out (image pixels;
            :meth:`~exactflow.transforms.Standardize.choose_scale`), one per column
            elsewhere; ``True`` one per column, ``"pooled"`` one for all, ``False`` none.
        bounds: limits of the columns (:func:`~exactflow.transforms.support.bounds_spec`:
            ``(0, 1)`` for every column, one ``(low, high)`` per column, ``None`` for no
            limit, or a dict by column name or position): the ladder runs on the columns
            as a :class:`~exactflow.transforms.Support` layer maps them onto the real
            line, and the model kept has that layer first (its samples respect the
            limits; the NLLs are of the data as given).
        candidates: the flow rungs (default :func:`ladder` for the data).
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
        >>> best = min(e.val_nll for e in result.leaderboard if e.val_nll)
        >>> result.chosen.val_nll >= best  # (a later rung better within noise is not kept)
        True
    """
    budget = positive_float(budget, "budget")
    if device is not None and device != "auto":  # (before the ladder, not at each rung)
        device_named(device)
    if val is None and val_context is not None:
        raise ValueError("val_context was given without val")
    if val is not None and context is not None and val_context is None:
        raise ValueError("the training rows have a context: pass val_context, one row per "
                         "row of val")
    say = log or (lambda text: None)
    if context is None:  # (the mixtures' EM, imported here, not on the budget: 1-4 s)
        em_class()
    adam([torch.zeros(1, requires_grad=True)], 1e-3)  # (torch's first optimizer imports its
    # compiler, 2-3 s: here, not on the budget, which a first fit in a process would lose)
    start = time.perf_counter()
    width, names, origin = width_of(train), column_names(train), getattr(val, "origin", None)
    limits = None if bounds is None else bounds_spec(bounds, width, names)
    support = None if limits is None else Support(limits, width)
    if support is not None:  # (the columns as the Support layer maps them, from here on)
        train = map_rows(support, wrap(train, "training data", width).data, "training data",
                         names)
        if val is not None:
            val = wrap(map_rows(support, wrap(val, "validation data", width).data,
                                "validation data", names), "validation data", width)
            val.origin = origin  # (its rows named by their numbers in the file)
    rows = wrap(train, "training data", width_of(train), strict=True)
    check_full_rank(rows.data, "training data", names)
    ctx = None
    if context is not None:
        ctx = wrap(context, "context", width_of(context), len(rows))
    if val is None:
        rows, ctx, val_rows, val_ctx = hold_out(rows, ctx, val_fraction, seed)
        if val_rows is None:
            raise ValueError(f"{len(rows)} rows are too few to hold out validation rows")
    else:
        val_rows = wrap(val, "validation data", rows.data.shape[1], strict=True)
        val_ctx = None if val_context is None else wrap(
            val_context, "val_context", width_of(val_context), len(val_rows))
    n, d = len(rows), int(rows.data.shape[1])
    # (with bounds, NLLs of the data as given: those of the mapped columns, plus the mean
    # log|dx/du| of the rows)
    shifts = (0.0, 0.0) if support is None else _shifts(support, rows, val_rows)
    c = 0 if ctx is None else int(ctx.data.shape[1])
    standardize = resolve_standardize(standardize, rows.data)
    say(describe_standardize(standardize))
    board: list[Entry] = []
    best: tuple[float, Flow, History, Tensor] | None = None  # (with its rows' NLLs)
    # The chosen mixture as the search fitted it: its own rung and the rungs on it start
    # from it instead of fitting it again (the same EM on the same rows: 2.2 s on
    # 90,000 x 6).
    mixtures: dict[str, dict[str, Tensor]] = {}

    def run(name: str, config: dict[str, Any], options: dict[str, Any], deadline: float,
            spent: float = 0.0) -> None:
        nonlocal best
        entry = Entry(name, dict(config))
        board.append(entry)
        if time.perf_counter() >= deadline and not spent:  # (a mixture searched is kept)
            entry.status = "skipped: out of budget"
            return
        full = {**config, "features": d, "standardize": standardize}
        if c:
            full["context"] = c
        clock = time.perf_counter() - spent  # (a mixture's search is its fitting time too)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                flow = build(full)
            mixture = _mixture_key(config)
            if mixture in mixtures and isinstance(flow.base, GaussianMixture):
                flow.base.load_state_dict(mixtures[mixture])
            history = fit(flow, rows, val_rows, context=ctx, val_context=val_ctx, seed=seed,
                          device=device, progress=progress,
                          time_limit=max(deadline - time.perf_counter(), 1e-3), **options)
            each = row_nll(flow, val_rows, val_ctx)
            val_nll = float(each.mean())
        except DataError:  # the data's fault, not the candidate's: every one would fail
            raise
        except Exception as err:  # noqa: BLE001 - a failed candidate is listed, not fatal
            # (a divergence says what happened, then advice on settings the ladder chooses)
            entry.status = ("failed: " + str(err).split(". ")[0] if isinstance(
                err, TrainingError) else f"failed: {type(err).__name__}: {err}")[:300]
            entry.seconds = time.perf_counter() - clock
            say(f"{name}: {entry.status}")
            return
        entry.seconds = time.perf_counter() - clock
        if config.get("model") == "gmm" and isinstance(flow.base, GaussianMixture):
            mixtures[_mixture_key(config)] = clone(flow.base.state_dict())
        entry.val_nll = val_nll if math.isfinite(val_nll) else None
        entry.steps, entry.best_step = history.total_steps, history.best_step
        if history.stopped_early and time.perf_counter() >= deadline:
            entry.status = "stopped at its share of the budget"
        say(f"{name}: validation NLL {val_nll + shifts[1]:.4f} in {entry.seconds:.1f} s")
        gain = None if best is None else best[3] - each  # (per row; > 0: this one better)
        se = 0.0 if gain is None else float(gain.std() / math.sqrt(len(gain)))
        rounding = TIE_NATS * max(1.0, abs(val_nll))
        if math.isfinite(val_nll) and best is not None and val_nll < best[0] <= val_nll + max(
                rounding, MARGIN_SE * se if math.isfinite(se) else 0):
            kept = next(other.name for other in board if other.chosen)
            tie = (f"no better than {kept} beyond rounding" if best[0] - val_nll <= rounding
                   else f"better than {kept} by {best[0] - val_nll:.3g} nats, within "
                   f"{MARGIN_SE:g} standard error ({se:.2g}) of the difference")
            entry.status = (f"{tie}: {kept} is kept" if entry.status == "ok"
                            else f"{entry.status}; {tie}: {kept} is kept")
            say(f"{name}: {tie}: {kept} is kept")
        elif math.isfinite(val_nll) and (best is None or val_nll < best[0]):
            best = (val_nll, flow, history, each)
            for other in board:
                other.chosen = other is entry

    end = start + budget
    gmm = None
    # Too few validation rows to tell models apart: the mixture is chosen by
    # cross-validation over all rows (a 1-component full mixture is the Gaussian) and no
    # flow is tried.
    few = len(val_rows) < MIN_VAL_ROWS and candidates is None
    if c:  # the linear-Gaussian regression (closed form): the baseline every flow must beat
        run("gaussian", {"model": "gaussian"}, {}, end)
    else:
        if few:
            board.append(Entry("gaussian", {"model": "gaussian"},
                               status="skipped: in the mixtures' cross-validation"))
        else:
            run("gaussian", {"model": "gaussian"}, {}, end)
        clock = time.perf_counter()
        mean, std = _standardizer(rows.data, standardize)
        try:
            gmm, _, fits, fitted, fitted_rows = search_gmm(
                (_array(rows.data) - mean) / std, (_array(val_rows.data) - mean) / std,
                components=GMM_COMPONENTS, seed=seed, deadline=clock + budget / 4,
                folds=5 if few else 1)
        except ValueError as err:
            say(f"gmm: {err}")
        else:
            if fitted is not None:  # (the gmm rung takes the search's fit: no second EM)
                mixtures[_mixture_key({"model": "gmm", **gmm})] = fitted
            search = time.perf_counter() - clock
            noun = "component" if gmm["components"] == 1 else "components"
            how = "by 5-fold cross-validation" if few else "on validation"
            if not few and n > SEARCH_ROWS:
                how += f" (each fitted on {SEARCH_ROWS:,} of the {n:,} training rows; " + (
                    "the choice then on all)" if fitted_rows == n else
                    f"the choice then on {fitted_rows:,}, as many as its time allowed)"
                    if fitted_rows > SEARCH_ROWS else "no time left to fit the choice on more)")
            say(f"gmm: {fits} {'mixture' if fits == 1 else 'mixtures'} fitted in {search:.1f} s; "
                f"{gmm['components']} {gmm['covariance']} {noun} chosen {how}")
            run(f"gmm ({gmm['components']} {noun}, {gmm['covariance']})",
                {"model": "gmm", **gmm}, {}, end, spent=search)
    rungs = candidates if candidates is not None else ladder(n, d, c, gmm)
    if few:
        if best is None:  # no mixture could be fitted: the Gaussian instead
            board.remove(board[0])
            run("gaussian", {"model": "gaussian"}, {}, end)
        held = counted(len(val_rows), "validation row")
        kept = "mixture" if gmm is not None else "linear-Gaussian regression" if c else "Gaussian"
        say(f"{held} {'is' if len(val_rows) == 1 else 'are'} too few to choose a flow on "
            f"(fewer than {MIN_VAL_ROWS}): the {kept} is kept, fitted again on all "
            f"{n + len(val_rows)} rows")
        if best is not None:  # (chosen on every row: fitted on every row)
            chosen = next(entry for entry in board if entry.chosen)
            flow = build({**chosen.config, "features": d, "standardize": standardize,
                          **({"context": c} if c else {})})
            pooled = np.concatenate([_array(rows.data), _array(val_rows.data)])
            together = None if ctx is None or val_ctx is None else np.concatenate(
                [_array(ctx.data), _array(val_ctx.data)])
            best = (best[0], flow, fit(flow, pooled, context=together, val_fraction=0.0,
                                       seed=seed, device=device, progress=False), best[3])
        board += [Entry(cand.name, dict(cand.config),
                        status=f"skipped: {held}, too few to choose a flow on")
                  for cand in rungs]
        rungs = []
    for i, cand in enumerate(rungs):
        left = end - time.perf_counter()
        if cand.priority:
            sharers = sum(1 for other in rungs[i:] if other.priority)
            deadline = time.perf_counter() + max(left, 0.0) / max(sharers, 1)
        else:
            deadline = end
        run(cand.name, cand.config, cand.options, deadline)
    if best is None:
        raise TrainingError("no candidate of the ladder could be fitted: " + "; ".join(
            f"{e.name}: {e.status}" for e in board) + ".")
    if not few:
        where = ("of the training data, held out" if val is None else "of the data"
                 if val_rows.origin is not None else "of the validation data")
        warn_dominant_rows(best[1], val_rows, val_ctx, where)
    out = None if val is not None or few else val_rows.origin  # (never trained on)
    if support is None:
        return AutoResult(best[1], board, best[2], out)
    return _bounded(AutoResult(best[1], board, best[2], out), support, shifts)


def _shifts(support: Support, rows: Rows, val_rows: Rows) -> tuple[float, float]:
    """The mean ``log|dx/du|`` of the training and the validation rows (mapped columns
    ``u``): what turns an NLL of the mapped columns into one of the data as given."""
    with torch.no_grad():
        train, val = (float(support.inverse(torch.as_tensor(np.asarray(
            part.data, dtype=np.float64)))[1].double().mean()) for part in (rows, val_rows))
    return train, val


def _bounded(result: AutoResult, support: Support, shifts: tuple[float, float]
             ) -> AutoResult:
    """``result`` of a ladder run on mapped columns, for the data as given: the flow with
    the Support layer first, every NLL plus the mean ``log|dx/du|`` of its rows."""
    on_train, on_val = shifts
    for entry in result.leaderboard:
        if entry.val_nll is not None:
            entry.val_nll += on_val
    h = result.history
    h.val_nll = [None if v is None else v + on_val for v in h.val_nll]
    h.train_nll = [None if v is None else v + on_train for v in h.train_nll]
    if h.best_val is not None:
        h.best_val += on_val
    flow = with_bounds(result.flow, support.bounds)
    return AutoResult(flow.eval(), result.leaderboard, h, result.held_out)


def _mixture_key(config: dict[str, Any]) -> str:
    """The mixture a rung's config fits: the ``gmm`` model's own, or a flow's ``base``."""
    if config.get("model") == "gmm":
        mixture = {"name": "gmm", **{k: v for k, v in config.items() if k != "model"}}
    else:
        mixture = config.get("base") or {}
    return json.dumps(mixture, sort_keys=True)


def _array(data: Any) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().double().numpy()
    return np.asarray(data, dtype=np.float64)


def _standardizer(data: Any, standardize: bool | str) -> tuple[np.ndarray, np.ndarray]:
    d = int(data.shape[1])
    if not standardize:
        return np.zeros(d), np.ones(d)
    return Standardize.statistics(data, name="training data", pooled=standardize == "pooled")

