"""A scikit-learn density estimator backed by a normalizing flow.

:class:`FlowDensity` follows :class:`sklearn.neighbors.KernelDensity` and
:class:`sklearn.mixture.GaussianMixture`: ``fit(X)``, ``score_samples(X)`` (exact
log-density per row), ``score(X)`` (total log-likelihood), ``sample(n_samples,
random_state)``. Its constructor parameters are the model and training options, so it works
with ``clone``, ``Pipeline`` and ``GridSearchCV``. Needs scikit-learn
(``pip install 'exactflow[sklearn]'``).
"""

from __future__ import annotations

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


from .scoring import log_prob

__all__ = ["FlowDensity"]

_COUPLING_MODELS = ("realnvp", "nice", "nsf")


class FlowDensity(DensityMixin, BaseEstimator):
    """Density estimation with a normalizing flow, in the style of ``KernelDensity``.

    ``fit`` builds a flow with an :mod:`exactflow.models` builder (standardization of the
    training data as its first, fixed layer when ``standardize``), trains it by maximum
    likelihood with :func:`exactflow.fit`, and keeps it in float64 for scoring, so
    ``score_samples`` is exact to float64 rounding and independent of how rows are batched.

    ``log p(x) = log N(f(x); 0, I) + log|det df/dx|`` in the units of ``X``. Scoring runs
    the flow's data -> latent direction (one pass for every builder but ``iaf``,
    ``planar`` and ``radial``); sampling runs latent -> data.

    Args:
        model: builder name: ``realnvp``, ``nice``, ``maf``, ``iaf``, ``nsf``, ``planar``,
            ``radial``. Coupling models (``realnvp``, ``nice``, ``nsf``) need at least two
            features.
        layers: number of layers; ``None`` for the builder's default.
        hidden: hidden layer sizes of the conditioners, e.g. ``(64, 64)``; ``None`` for the
            builder's default (ignored by ``planar`` and ``radial``).
        steps: optimizer steps (ignored when ``epochs`` is set).
        epochs: passes over the training rows instead of ``steps``.
        batch_size: rows per step (capped at the number of training rows).
        lr: Adam learning rate (cosine-decayed over the run).
        validation_fraction: rows held out to pick the best weights (0: none, train on all).
        standardize: put a fixed standardization layer first (the mean and standard
            deviation of the training rows).
        model_kwargs: extra builder arguments, e.g. ``{"batch_norm": False}``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` for training; scoring and sampling run
            on the CPU.
        random_state: seed of the initialization, data order and validation split.
        verbose: show a progress bar.

    Attributes:
        flow_: the trained :class:`exactflow.Flow` (float64, eval mode, CPU).
        history_: the training :class:`exactflow.History`.
        n_features_in_: number of features seen in ``fit``.

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
        model: str = "realnvp",
        *,
        layers: int | None = None,
        hidden: Sequence[int] | None = None,
        steps: int = 1000,
        epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        validation_fraction: float = 0.0,
        standardize: bool = True,
        model_kwargs: dict[str, Any] | None = None,
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
        self.standardize = standardize
        self.model_kwargs = model_kwargs
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

    # -- fitting ------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> FlowDensity:
        """Train a flow on the rows of ``X`` (``y`` is ignored).

        Raises:
            ValueError: bad data (NaN/inf, fewer than 2 rows, a constant column when
                ``standardize``), a coupling model on one feature, or bad parameters.
        """
        from . import models
        from .training import fit as train_fit

        X = _validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        n, d = X.shape
        if self.model not in models.available():
            raise ValueError(
                f"unknown model {self.model!r}; available: {', '.join(models.available())}"
            )
        if d == 1 and self.model in _COUPLING_MODELS:
            raise ValueError(
                f"model={self.model!r} is a coupling flow and needs at least 2 features, got "
                "1 feature(s); use model='maf' for one-dimensional data"
            )
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))

        n_val = int(round(float(self.validation_fraction) * n))
        order = rng.permutation(n)
        if n_val > 0 and n - n_val >= 2:
            train, val = X[order[n_val:]], X[order[:n_val]]
        else:
            train, val = X, None

        config: dict[str, Any] = {"model": self.model, "features": d}
        if self.layers is not None:
            config["layers"] = int(self.layers)
        if self.hidden is not None and self.model not in ("planar", "radial"):
            config["hidden"] = [int(h) for h in np.atleast_1d(self.hidden)]
        config.update(self.model_kwargs or {})
        config["standardize"] = bool(self.standardize)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flow = models.build(config)

        batch_size = max(1, min(int(self.batch_size), len(train)))
        # fit fills the standardization layer from the training rows (in float64).
        self.history_ = train_fit(
            flow,
            train,
            val,
            steps=None if self.epochs is not None else int(self.steps),
            epochs=None if self.epochs is None else int(self.epochs),
            batch_size=batch_size,
            val_fraction=0.0,  # the estimator holds out its own validation rows
            lr=float(self.lr),
            device=self.device,
            seed=seed,
            progress=bool(self.verbose),
        )
        # Score in float64 on the CPU: exact to float64 rounding, batch-independent.
        self.flow_ = flow.cpu().double().eval()
        return self

    # -- scoring ------------------------------------------------------------------------

    def score_samples(self, X: Any) -> np.ndarray:
        """The exact log-density of each row of ``X`` (nats, in the units of ``X``)."""
        check_is_fitted(self, "flow_")
        X = _validate_data(self, X, dtype=np.float64, reset=False)
        return log_prob(self.flow_, X)

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
