"""A scikit-learn density estimator backed by a normalizing flow.

:class:`FlowDensity` follows :class:`sklearn.neighbors.KernelDensity` and
:class:`sklearn.mixture.GaussianMixture`: ``fit(X)``, ``score_samples(X)`` (exact
log-density per row), ``score(X)`` (total log-likelihood), ``sample(n_samples,
random_state)``. Its constructor parameters are the model and training options, so it works
with ``clone``, ``Pipeline`` and ``GridSearchCV``. Needs scikit-learn
(``pip install 'exactflow[sklearn]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

try:
    from sklearn.base import BaseEstimator, DensityMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_is_fitted
except ImportError as err:  # pragma: no cover - optional dependency
    raise ImportError(
        "exactflow.sklearn needs scikit-learn: pip install 'exactflow[sklearn]'"
    ) from err

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _validate_data(estimator: Any, X: Any, reset: bool = True, **kwargs: Any) -> Any:
        return estimator._validate_data(X, reset=reset, **kwargs)


from . import models
from .datasets import check_full_rank, validate
from .runs import anomaly
from .runs.data import dequantize, dequantize_to_score, integer_columns
from .runs.notes import data_notes
from .scoring import log_prob
from .transforms.support import Support, bounds_spec, check_rows
from .validation import positive_float, positive_int, warn_user

__all__ = ["FlowDensity"]

_COUPLING_MODELS = ("realnvp", "nice", "nsf")


def _say(text: str) -> None:
    """``verbose``: a line per ladder candidate (or for the named model), on stderr."""
    print(text, file=sys.stderr, flush=True)


class FlowDensity(DensityMixin, BaseEstimator):
    """Density estimation with a normalizing flow, in the style of ``KernelDensity``.

    With no arguments, ``fit`` runs :func:`exactflow.fit_auto`: it holds out
    ``validation_fraction`` of the rows, tries a short ladder of models (a Gaussian,
    Gaussian mixtures of a few sizes, then neural spline flows: one that starts as the
    chosen mixture, one from a standard normal) within ``budget`` seconds, and keeps the
    best on validation
    (``leaderboard_`` says what was tried). With ``model=NAME`` it trains that builder's
    flow, its length set by validation unless ``steps`` or ``epochs`` is given. Either way
    the standardization of the training rows is the model's first, fixed layer (when
    ``standardize``), and the model is kept in float64 for scoring, so ``score_samples``
    is exact to float64 rounding and independent of how rows are batched.

    ``log p(x)`` is in the units of ``X``: behind a ``StandardScaler`` in a ``Pipeline``
    it is a density of the scaled rows, higher by ``sum(log(scaler.scale_))`` than one of
    the raw rows (no scaler is needed in front: the model standardizes exactly, in
    float64). ``score`` is the total log-likelihood of the rows, as ``KernelDensity``'s
    (``GaussianMixture.score`` is the mean). Scoring runs the model's data -> latent
    direction; sampling runs latent -> data. The density is unconditional: ``y`` is
    ignored, as in ``KernelDensity``; for ``p(x | context)`` train a builder's flow with
    ``ef.fit(flow, x, context=...)``.

    Args:
        model: ``"auto"`` (default) or a builder name: ``gaussian``, ``gmm``, ``realnvp``,
            ``nice``, ``maf``, ``iaf``, ``nsf``, ``planar``, ``radial``. Coupling models
            (``realnvp``, ``nice``, ``nsf``) need at least two features.
        layers: number of layers; ``None`` for the builder's default (not with ``auto``).
        hidden: hidden layer sizes of the conditioners, e.g. ``(64, 64)``; ``None`` for the
            builder's default (not with ``auto``).
        steps: a fixed number of optimizer steps (default: set by validation; not with
            ``auto``).
        epochs: passes over the training rows instead of ``steps`` (not with ``auto``).
        batch_size: rows per step (default: about 8 batches an epoch, 32 to 256 rows; not
            with ``auto``).
        lr: Adam learning rate (default ``1e-3``; not with ``auto``, whose ladder sets each
            candidate's own).
        validation_fraction: rows held out to stop training and to choose the model
            (0: none, train a given model on all rows for ``steps``, 1,000 unless given;
            ``auto`` needs some). The closed-form ``gaussian`` and ``gmm`` hold none out:
            they have no step to stop at.
        budget: seconds the ``auto`` ladder may take (default 45; only with ``auto``). A
            budget is wall-clock time: where it cuts a candidate short, the step it stops
            at (and so the model) depends on the machine's speed and load, and
            ``random_state`` alone does not repeat the fit (a named ``model`` does). The
            one-time imports of a process (scikit-learn's EM, torch's optimizers) come
            before the clock. In cross-validation and grid searches every fit takes the
            whole budget: pass a smaller one there, or a named ``model``.
        standardize: put a fixed standardization layer first, filled from the training
            rows: ``"auto"`` (default) one mean and scale for all columns where they lie on
            one range and some nearly constant column would otherwise be scaled far out
            (image pixels; :meth:`exactflow.transforms.Standardize.choose_scale`), one per
            column elsewhere; ``True`` one per column, ``"pooled"`` one for all columns,
            ``False`` none.
        bounds: limits of the columns: ``(low, high)`` for every column, one pair per
            column, ``None`` for no limit (``[(0, 1), (0, None), None]``), or a dict by
            column (``{"fraction": (0, 1)}``, by name for a DataFrame's columns). The model then
            maps them onto the real line first (:class:`exactflow.transforms.Support`),
            so its samples respect them; ``score_samples`` gives ``-inf`` to a row on or
            outside a limit (its density is 0), and ``fit`` refuses such rows.
        model_kwargs: extra builder arguments, e.g. ``{"batch_norm": False}``.
        dequantize: add uniform noise in ``[0, 1)`` to the columns that hold integers only
            (counts, ratings, pixel levels), in ``fit`` and (keyed by each row's values,
            :func:`exactflow.runs.dequantize`) in ``score_samples``: the score is then a
            lower bound of the discrete log-probability. Without it such columns are
            warned about: a continuous density can pile its mass onto the integers, and
            held-out rows on them score far above any real density. ``sample`` draws
            dequantized values (floor them for integers).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` for training; scoring and sampling run
            on the CPU.
        random_state: seed of the initialization, data order and validation split.
        verbose: show training progress and, with ``model="auto"``, a line per candidate
            of the ladder (on stderr).

    Attributes:
        flow_: the trained model, an :class:`exactflow.Flow` (float64, eval mode, CPU).
        history_: its training :class:`exactflow.History` (``best_step`` says which step's
            weights were kept).
        dequantized_columns_: the integer columns dequantized (``[]`` without
            ``dequantize``).
        leaderboard_: with ``model="auto"``, one dict per candidate (``name``, ``config``,
            ``val_nll``, ``seconds``, ``steps``, ``best_step``, ``status``, ``chosen``);
            ``None`` otherwise.
        n_features_in_: number of features seen in ``fit``.
        calibration_: the log-densities of the rows ``fit`` held out for validation, which
            the model never trained on: what :meth:`p_values` and :meth:`flag` rank new
            rows against (``None`` where every row was fitted on).

    Example:
        >>> import numpy as np
        >>> from exactflow.sklearn import FlowDensity
        >>> X = np.random.default_rng(0).normal(size=(200, 2))
        >>> est = FlowDensity(model="maf", layers=2, hidden=(16,), steps=20).fit(X)
        >>> est.score_samples(X[:3]).shape
        (3,)

    Scikit-learn's estimator checks (``parametrize_with_checks``) pass with no expected
    failure. One-feature data is accepted by the autoregressive and planar models and
    refused by the coupling models with a ``ValueError`` that names "1 feature(s)", as the
    checks allow. The one skipped check, ``check_array_api_input``, is skipped by
    scikit-learn itself unless ``SCIPY_ARRAY_API=1``; it does not apply (the estimator
    converts its input to NumPy and claims no array-API support).
    """

    def __init__(
        self,
        model: str = "auto",
        *,
        layers: int | None = None,
        hidden: Sequence[int] | None = None,
        steps: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        validation_fraction: float = 0.15,
        budget: float | None = None,
        standardize: bool | str = "auto",
        bounds: Any = None,
        model_kwargs: dict[str, Any] | None = None,
        dequantize: bool = False,
        device: str = "cpu",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.model = model
        self.layers = layers
        self.hidden = hidden
        self.steps = steps
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.validation_fraction = validation_fraction
        self.budget = budget
        self.standardize = standardize
        self.bounds = bounds
        self.model_kwargs = model_kwargs
        self.dequantize = dequantize
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

    # -- fitting ------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> FlowDensity:
        """Train a model on the rows of ``X`` (``y`` is ignored).

        Raises:
            ValueError: bad data (NaN/inf, fewer than 2 rows, no more rows than columns,
                a constant column, linearly dependent columns), a
                coupling model on one feature, or bad parameters.
        """
        from .training import fit as train_fit
        from .training import fit_auto
        from .training.auto import Entry
        from .transforms.standardize import resolve_standardize

        X = _validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        names = getattr(self, "feature_names_in_", None)
        names = None if names is None else [str(c) for c in names]
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        discrete = integer_columns(X)
        self.dequantized_columns_ = discrete if self.dequantize else []
        # (said once the data and options pass the checks: not beside an error)
        notes = data_notes(X, discrete, names, dequantized=bool(self.dequantize),
                           dequantize_fix="FlowDensity(dequantize=True)",
                           drop_fix="drop it from X")
        if self.dequantize:  # first: a column of 0s and 1s may look constant, not after
            X = dequantize(X, discrete, seed)
        validate(X, name="X", columns=names)  # constant columns first, as the CLI checks
        check_full_rank(X, "X", names)
        n, d = X.shape
        auto = self.model == "auto"
        if not auto and self.model not in models.available():
            raise ValueError(
                f"unknown model {self.model!r}; choose 'auto' or one of "
                f"{', '.join(models.available())}"
            )
        if auto:
            given = [name for name in ("layers", "hidden", "model_kwargs", "steps", "epochs",
                                       "batch_size", "lr")
                     if getattr(self, name) is not None and getattr(self, name) != {}]
            if given:
                raise ValueError(
                    f"{', '.join(given)} set one model and its training, which "
                    "model='auto' chooses itself: give model=NAME with them, or leave them "
                    "out")
        else:
            self._check_named_options()
        kind = (self.model_kwargs or {}).get("kind")
        if d == 1 and self.model in _COUPLING_MODELS and kind != "autoregressive":
            raise ValueError(
                f"model={self.model!r} is a coupling flow and needs at least 2 features, got "
                "1 feature(s); for one-dimensional data use model='nsf' with model_kwargs="
                "{'kind': 'autoregressive'} (a spline, any shape), or model='auto' (model="
                "'maf' on one feature is a Gaussian: its shift and scale are constants)"
            )
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        if not auto and self.budget is not None:
            raise ValueError(f"budget is the time of the auto ladder; model={self.model!r} "
                             "trains one model, for steps or epochs (or until validation "
                             "stops improving)")
        if auto and float(self.validation_fraction) == 0:
            raise ValueError("model='auto' chooses its model on held-out rows: "
                             "validation_fraction must be above 0")
        bounds = bounds_spec(self.bounds, d, names)  # (a dict by name: X's columns)
        if bounds is not None:  # (rows beyond them refused here: by column name, as X has)
            check_rows(Support(bounds, d), X, "training data", names)
        for note in notes:
            warn_user(note)
        self.leaderboard_: list[dict[str, Any]] | None = None
        if auto:
            try:
                budget = 45.0 if self.budget is None else float(self.budget)
                result = fit_auto(X, budget=budget,
                                  val_fraction=float(self.validation_fraction),
                                  standardize=self.standardize, bounds=bounds, seed=seed,
                                  device=self.device, progress=bool(self.verbose),
                                  log=_say if self.verbose else None)
            except ValueError as err:
                if "too few to hold out" not in str(err):
                    raise
                # Too few rows for a validation split: the Gaussian, fitted on all of them.
                flow = models.gaussian(d, standardize=resolve_standardize(
                    self.standardize, X), bounds=bounds)
                self.history_ = train_fit(flow, X, val_fraction=0.0, seed=seed,
                                          device=self.device, progress=False)
                self.leaderboard_ = [Entry(
                    "gaussian", {"model": "gaussian"}, chosen=True,
                    status=f"fitted on all {n} rows: too few to hold out validation rows and "
                           "choose among models").to_dict()]
            else:
                flow, self.history_ = result.flow, result.history
                self.leaderboard_ = [entry.to_dict() for entry in result.leaderboard]
                self.history_.held_out = result.held_out
            return self._finish(flow, X)

        config: dict[str, Any] = {"model": self.model, "features": d}
        if self.layers is not None:
            config["layers"] = int(self.layers)
        if self.hidden is not None:
            config["hidden"] = [int(h) for h in np.atleast_1d(self.hidden)]
        config.update(self.model_kwargs or {})
        config["standardize"] = resolve_standardize(self.standardize, X)
        if bounds is not None:
            config["bounds"] = bounds
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flow = models.build(config)
        # (a closed-form model has no step to stop at and nothing to choose: all rows)
        val_fraction = 0.0 if self.model in models.CLOSED_FORM else float(self.validation_fraction)
        n_train = n - int(round(val_fraction * n))
        batch_size = None if self.batch_size is None else max(
            1, min(int(self.batch_size), n_train))
        # fit holds out the validation rows and fills the standardization layer from the
        # training rows (in float64).
        self.history_ = train_fit(
            flow,
            X,
            steps=None if self.steps is None else int(self.steps),
            epochs=None if self.epochs is None else int(self.epochs),
            batch_size=batch_size,
            val_fraction=val_fraction,
            lr=1e-3 if self.lr is None else float(self.lr),
            device=self.device,
            seed=seed,
            progress=bool(self.verbose),
        )
        if self.verbose:  # (a progress line comes every 30 s only, off a terminal)
            h = self.history_
            kept = ("" if h.best_val is None else
                    f", kept step {h.best_step:,} (validation NLL {h.best_val:.4f})")
            spent = f" in {h.time[-1]:.1f} s" if h.time else ""
            _say(f"FlowDensity: {self.model} fitted in closed form" if self.model in
                 models.CLOSED_FORM else
                 f"FlowDensity: {self.model} trained {h.total_steps:,} steps{spent}{kept}")
        return self._finish(flow, X)

    def _finish(self, flow: Any, X: np.ndarray) -> FlowDensity:
        """Keep ``flow`` for scoring, in float64 on the CPU (exact to float64 rounding,
        batch-independent), and the log-densities of the rows held out of its training:
        the calibration of :meth:`p_values`."""
        self.flow_ = flow.cpu().double().eval()
        held = getattr(self.history_, "held_out", None)
        self.calibration_ = None if held is None else log_prob(self.flow_, X[np.asarray(held)])
        return self

    def _check_named_options(self) -> None:
        """A named model's options: numbers of the right kind, and none that the model
        would ignore (refused by name, as ``model="auto"`` refuses its own)."""
        for name in ("layers", "steps", "epochs", "batch_size"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), name)
        if self.lr is not None:
            positive_float(self.lr, "lr")
        unused, why = [], ""
        if self.model in models.CLOSED_FORM:
            unused = [name for name in ("layers", "hidden", "steps", "epochs", "batch_size",
                                        "lr") if getattr(self, name) is not None]
            why = "is fitted in closed form, without layers or steps"
        elif self.hidden is not None and not models.takes(self.model, "hidden"):
            unused, why = ["hidden"], "has no hidden layers"
        if unused:
            raise ValueError(f"{', '.join(unused)}: model={self.model!r} {why}; leave "
                             f"{'it' if len(unused) == 1 else 'them'} out")
        conditional = sorted({"context", "embedding"} & set(self.model_kwargs or {}))
        if conditional:
            raise ValueError(f"model_kwargs sets {', '.join(conditional)}: FlowDensity fits "
                             "an unconditional density p(x); for p(x | context) train a "
                             "builder's flow with ef.fit(flow, x, context=...)")
        own = sorted({"model", "features", "standardize"} & set(self.model_kwargs or {}))
        if own:
            raise ValueError(f"model_kwargs sets {', '.join(own)}, which FlowDensity sets "
                             "itself: give standardize=... to FlowDensity (the model and its "
                             "features come from model= and X)")

    # -- scoring ------------------------------------------------------------------------

    def score_samples(self, X: Any) -> np.ndarray:
        """The exact log-density of each row of ``X`` (nats, in the units of ``X``)."""
        check_is_fitted(self, "flow_")
        X = _validate_data(self, X, dtype=np.float64, reset=False)
        columns = getattr(self, "dequantized_columns_", [])  # (none in older pickles)
        if columns:
            names = getattr(self, "feature_names_in_", None)
            X = dequantize_to_score(X, columns, 0, None if names is None
                                    else [str(c) for c in names])
        return log_prob(self.flow_, X)  # (a row outside the bounds: -inf)

    def p_values(self, X: Any) -> np.ndarray:
        """Conformal p-values of the rows of ``X``: the rank of each row's log-density
        among those of the rows ``fit`` held out for validation (``calibration_``), as
        ``exactflow score`` gives them. For new rows like the training rows, ``p <= q``
        holds for about ``q`` of them; a row scored ``-inf`` gets the smallest p-value.

        Raises:
            ValueError: no rows were held out (``validation_fraction=0``, a closed-form
                model, or too few rows, all fitted on): fit with ``validation_fraction``
                above 0 and a flow or ``model="auto"``.
        """
        return anomaly.p_values(self.score_samples(X), self._calibration())

    def flag(self, X: Any, q: float = 0.05) -> np.ndarray:
        """Whether each row of ``X`` is an anomaly at level ``q``: its p-value
        (:meth:`p_values`) is at most ``q``, or it scores ``-inf``. About ``q`` of new
        normal rows are flagged (a warning where ``q`` is below the smallest p-value the
        held-out rows allow)."""
        calibration = self._calibration()
        return anomaly.flag(self.score_samples(X), calibration, q)[1]

    def _calibration(self) -> np.ndarray:
        check_is_fitted(self, "flow_")
        calibration = getattr(self, "calibration_", None)
        if calibration is None:
            raise ValueError(
                "this model was fitted on every row (validation_fraction=0, a closed-form "
                "model, or too few rows to hold some out), so no held-out rows calibrate "
                "p-values: fit a flow or model='auto' with validation_fraction above 0")
        return calibration

    def score(self, X: Any, y: Any = None) -> float:
        """Total log-likelihood of ``X`` under the model (as ``KernelDensity.score``)."""
        return float(np.sum(self.score_samples(X)))

    def sample(
        self, n_samples: int = 1, random_state: int | np.random.RandomState | None = None
    ) -> np.ndarray:
        """Draw ``n_samples`` rows from the model, shape ``(n_samples, n_features_in_)``.

        ``random_state`` seeds the draw (torch's global RNG is left as it was).
        """
        check_is_fitted(self, "flow_")
        if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self.flow_.sample(int(n_samples))
        return x.numpy().copy()
