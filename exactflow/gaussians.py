"""Gaussian densities with full covariances: one Gaussian, and a mixture of them.

Both are :class:`~exactflow.distributions.Distribution`\\ s with exact ``log_prob`` and
reparameterized ``rsample``, so they serve three ways: as classical density models of their
own (:func:`exactflow.models.gaussian`, :func:`exactflow.models.gmm`), as the trainable base
of a flow that starts from the classical fit (every transform at the identity, so at step 0
the flow *is* the classical model and training can only keep an improvement), and as
references to measure flows against.

Covariances are parameterized by their Cholesky factors ``L`` (lower triangular, positive
diagonal through ``exp``), so every parameter value is a valid density::

    log N(x; mu, L L^T) = -0.5 |L^{-1} (x - mu)|^2 - sum_i log L_ii - (d / 2) log(2 pi)

at O(d^2) per row and component (one triangular solve). :meth:`Gaussian.fit_to` and
:meth:`GaussianMixture.fit_to` set the parameters from data: the maximum-likelihood
Gaussian in closed form, the mixture by EM (scikit-learn's ``GaussianMixture``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .distributions import Distribution
from .validation import choice, non_negative_int, positive_int

__all__ = ["Gaussian", "GaussianMixture"]

_LOG_2PI = math.log(2 * math.pi)
# Ridge added to the correlation matrix of every fitted covariance (so relative to each
# column's own variance), always: keeps the Cholesky factor finite for collinear columns.
# It floors the variance of a column given the others at 1e-14 of its own, about 50 times
# float64's rounding: 1e-6 took 2.2 nats a row from a Gaussian of two columns whose
# difference is 1e-4 of their spread (0.002 nats now, as without a ridge).
_RIDGE = 1e-14
# EM's ridge (scikit-learn's ``reg_covar``), on standardized columns: it keeps a component
# from collapsing onto a few rows. It costs nearly collinear columns as the ridge above
# did (2.2 nats a row at a difference of 1e-4), but relative to the data's whole spread
# instead (EM on whitened data) it let components of the 30 correlated columns of the
# breast-cancer table overfit: test NLL 13.2 against 8.3 (``python -m
# benchmarks.gmm_folds``).
_EM_RIDGE = 1e-6


def _as_float64(data: Any) -> np.ndarray:
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    arr = np.asarray(data, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"fitting a Gaussian needs a 2-D array of at least 2 rows, got "
                         f"shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("fitting a Gaussian needs finite data (NaN or inf found)")
    return arr


def _one_blas_thread() -> Any:
    """EM's many small matrix products are fastest, and never oversubscribe a busy machine,
    on one BLAS thread (measured: a grid of fits took minutes with the default threads)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - shipped with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def _cholesky(cov: np.ndarray) -> np.ndarray:
    """The Cholesky factor of a covariance, with a small ridge if it is singular.

    The ridge is relative to each column's own variance (it is added to the correlation
    matrix): a column of spread 1e-8 beside one of spread 1 keeps its spread."""
    d = cov.shape[-1]
    spread = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    spread = np.where(spread > 0, spread, 1.0)
    corr = cov / np.outer(spread, spread)
    ridge = _RIDGE
    for _ in range(8):
        try:
            return spread[:, None] * np.linalg.cholesky(corr + ridge * np.eye(d))
        except np.linalg.LinAlgError:
            ridge *= 100.0
    raise ValueError("the data's covariance is too degenerate to factor")


#: Numbers of the ``(components, features, rows)`` tensors :func:`_log_density` makes at
#: once: more rows are taken a block at a time (16 full components of 10 features scored
#: 500,000 validation rows through 2.5 GB of such tensors).
DENSITY_BLOCK_VALUES = 1 << 22


def _log_density(x: Tensor, loc: Tensor, log_diag: Tensor, lower: Tensor) -> Tensor:
    """``log N(x; loc, L L^T)`` for ``x (n, d)`` against components ``loc (k, d)``, ``L (k, d, d)``;
    returns ``(n, k)``."""
    rows = max(1, DENSITY_BLOCK_VALUES // (loc.shape[0] * loc.shape[1]))
    if x.shape[0] > rows:
        return torch.cat([_log_density(part, loc, log_diag, lower) for part in x.split(rows)])
    # The solve's dtype: float32 for half precision (no such triangular solve on the CPU);
    # float64 for float32 scoring, as nearly collinear columns (a column 1e-5 of its spread
    # off a copy of another) lost up to 0.71 nats a row in float32's solve at 200 columns;
    # training keeps float32, whose gradient needs no such care.
    work = (torch.float32 if lower.dtype.itemsize < 4 else torch.float64
            if lower.dtype == torch.float32 and not torch.is_grad_enabled() else lower.dtype)
    diff = (x.to(work).unsqueeze(0) - loc.to(work).unsqueeze(1)).transpose(1, 2)  # (k, d, n)
    y = torch.linalg.solve_triangular(lower.to(work), diff, upper=False)  # L^{-1} (x - mu)
    sq = (y * y).sum(1).to(lower.dtype)  # (k, n)
    d = x.shape[1]
    return (-0.5 * sq - log_diag.sum(-1, keepdim=True) - 0.5 * d * _LOG_2PI).T

class _Components(Distribution):
    """Gaussian components with Cholesky-factored covariances (full or diagonal)."""

    fitted: Tensor

    def __init__(self, features: int, components: int, covariance: str, trainable: bool) -> None:
        super().__init__()
        self.features = positive_int(features, "features")
        self.components = positive_int(components, "components")
        self.covariance = choice(covariance, "covariance", ("full", "diag"))
        k, d = self.components, self.features
        self.loc = nn.Parameter(torch.zeros(k, d), requires_grad=trainable)
        self.log_diag = nn.Parameter(torch.zeros(k, d), requires_grad=trainable)
        self.off_diag = nn.Parameter(torch.zeros(k, d, d),
                                     requires_grad=trainable and covariance == "full")
        self.register_buffer("fitted", torch.tensor(False))

    def lower(self) -> Tensor:
        """The Cholesky factors ``L`` of the covariances, ``(components, d, d)``."""
        diag = torch.diag_embed(torch.exp(self.log_diag))
        if self.covariance == "diag":
            return diag
        return torch.tril(self.off_diag, -1) + diag

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log N(x_i; mu_k, Sigma_k)`` for every row and component, ``(n, components)``."""
        return _log_density(x, self.loc, self.log_diag, self.lower())

    def _set_moments(self, x: np.ndarray) -> None:
        """One component at the maximum-likelihood mean and covariance of the rows ``x``."""
        cov = np.cov(x, rowvar=False, bias=True).reshape(self.features, self.features)
        if self.covariance == "diag":
            cov = np.diag(np.diag(cov))
        self._set(x.mean(0, keepdims=True), cov[None])

    @torch.no_grad()
    def _set(self, locs: np.ndarray, covs: np.ndarray) -> None:
        lowers = np.stack([_cholesky(c) for c in covs])
        diag = np.diagonal(lowers, axis1=1, axis2=2)
        ref = self.loc
        self.loc.copy_(torch.as_tensor(locs, dtype=ref.dtype, device=ref.device))
        self.log_diag.copy_(torch.as_tensor(np.log(diag), dtype=ref.dtype, device=ref.device))
        self.off_diag.copy_(torch.as_tensor(np.tril(lowers, -1), dtype=ref.dtype,
                                            device=ref.device))
        self.fitted.fill_(True)

    def _draw(self, index: Tensor) -> Tensor:
        eps = torch.randn(index.shape[0], self.features, dtype=self.loc.dtype,
                          device=self.loc.device)
        lower = self.lower()  # (K, d, d): one product per component, never a factor per row
        if lower.shape[0] == 1:  # (a copy per row took n d^2 floats: 3.5 GB for 1,500 x 784)
            return self.loc[index] + eps @ lower[0].T
        shifted = torch.zeros_like(eps)
        for k in index.unique().tolist():
            rows = (index == k).nonzero().squeeze(-1)
            shifted = shifted.index_copy(0, rows, eps[rows] @ lower[k].T)
        return self.loc[index] + shifted


class Gaussian(_Components):
    """A multivariate normal ``N(mu, Sigma)`` with a full (or diagonal) covariance.

    ``log_prob`` costs O(d^2) per row (a triangular solve); ``rsample`` is reparameterized.
    It starts as the standard normal; :meth:`fit_to` sets the maximum-likelihood mean and
    covariance of data in closed form.

    Args:
        features: the dimension ``d``.
        covariance: ``"full"`` or ``"diag"``.
        trainable: whether gradient training may move its parameters (a flow's base: yes;
            the classical model :func:`exactflow.models.gaussian`: no, its fit is exact).

    Example:
        >>> import torch, exactflow as ef
        >>> g = ef.Gaussian(2).double()
        >>> x = torch.randn(500, 2, dtype=torch.float64) @ torch.tensor([[2.0, 0.0], [1.0, 0.5]],
        ...                                                            dtype=torch.float64)
        >>> g.fit_to(x).log_prob(x).mean() > ef.StandardNormal(2).double().log_prob(x).mean()
        tensor(True)
    """

    def __init__(self, features: int, covariance: str = "full", trainable: bool = True) -> None:
        super().__init__(features, 1, covariance, trainable)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.component_log_prob(x)[:, 0]

    def rsample(self, n: int) -> Tensor:
        return self._draw(torch.zeros(non_negative_int(n, "n"), dtype=torch.long,
                                      device=self.loc.device))

    def fit_to(self, data: Any) -> Gaussian:
        """Set the maximum-likelihood mean and covariance of ``data``, with a ridge of 1e-14
        added to its correlation matrix (always: it keeps a degenerate covariance
        factorable; on two columns whose difference is 2e-6 of their spread it moves
        log-densities by about 0.001 nats); returns ``self``."""
        self._set_moments(_as_float64(data))
        return self

    def extra_repr(self) -> str:
        return f"features={self.features}, covariance={self.covariance!r}"


def em_class() -> Any:
    """scikit-learn's ``GaussianMixture``, which :meth:`GaussianMixture.fit_to` runs (its
    import takes a second or more: :func:`~exactflow.fit_auto` makes it before its clock
    starts)."""
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        raise ImportError("fitting a Gaussian mixture needs scikit-learn: "
                          "pip install scikit-learn") from None
    return GaussianMixture


class GaussianMixture(_Components):
    """A mixture of ``components`` Gaussians, ``p(x) = sum_k w_k N(x; mu_k, Sigma_k)``.

    ``log_prob`` is a log-sum-exp over the components, O(k d^2) per row. ``rsample`` picks
    a component per row (not differentiable in the weights: reverse-KL training moves the
    means and covariances but not the weights) and draws from it reparameterized.
    :meth:`fit_to` fits it by EM (scikit-learn's ``GaussianMixture``, with a few
    initializations).

    Args:
        features: the dimension ``d``.
        components: the number of components ``k``.
        covariance: ``"full"`` or ``"diag"``.
        trainable: whether gradient training may move its parameters.

    Example:
        >>> import torch, exactflow as ef
        >>> x = torch.cat([torch.randn(300, 2) - 3, torch.randn(300, 2) + 3]).double()
        >>> mix = ef.GaussianMixture(2, components=2).double().fit_to(x, seed=0)
        >>> sorted(round(w, 1) for w in mix.weights().detach().tolist())
        [0.5, 0.5]
    """

    def __init__(
        self, features: int, components: int = 4, covariance: str = "full",
        trainable: bool = True,
    ) -> None:
        super().__init__(features, components, covariance, trainable)
        self.logits = nn.Parameter(torch.zeros(self.components), requires_grad=trainable)

    def weights(self) -> Tensor:
        """The mixture weights ``w_k``."""
        return torch.softmax(self.logits, 0)

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(x) + torch.log_softmax(self.logits, 0),
                               dim=1)

    def rsample(self, n: int) -> Tensor:
        n = non_negative_int(n, "n")
        index = (torch.multinomial(self.weights().detach(), n, replacement=True) if n else
                 torch.zeros(0, dtype=torch.long, device=self.loc.device))
        return self._draw(index)

    def fit_to(
        self, data: Any, *, seed: int = 0, restarts: int = 1,
        start: GaussianMixture | None = None,
    ) -> GaussianMixture:
        """Fit by EM (scikit-learn's ``GaussianMixture``, ``restarts`` initializations,
        each component's covariance with a ridge of 1e-6 of each column's variance);
        returns ``self``. The ridge keeps components from collapsing onto a few rows, and
        floors the variance of a column given the others: nearly collinear columns lose
        by it (2.1 nats a row where two columns differ by 1e-4 of their spread, 4.4 at
        1e-5), where the closed-form :class:`Gaussian` does not. One component is fitted
        in closed form, as the :class:`Gaussian` is (no EM, no such ridge).

        ``start``, a mixture of the same size and covariance type (a fit to a subset of the
        rows, say), is where EM begins instead of k-means: it then climbs from that
        solution rather than looking for another.

        Raises:
            ImportError: scikit-learn is missing.
            ValueError: fewer rows than components, or a ``start`` of another shape.
        """
        x = _as_float64(data)
        if self.components == 1:  # (EM's answer in closed form, without EM's ridge: a
            # 1-component mixture lost 2.1 nats a row to the Gaussian on two columns 1e-4
            # of their spread apart, 4.4 at 1e-5)
            self._set_moments(x)
            with torch.no_grad():
                self.logits.zero_()
            return self
        EM = em_class()
        if x.shape[0] < self.components:
            raise ValueError(f"{x.shape[0]} rows are too few for {self.components} components")
        # EM on standardized columns: the ridge (reg_covar) is then relative to each
        # column's own variance, not to the mean variance, which floored small columns.
        center, spread = x.mean(0), x.std(0)
        spread = np.where(spread > 0, spread, 1.0)
        init = {} if start is None else self._init_from(start, center, spread)
        em = EM(self.components, covariance_type=self.covariance, reg_covar=_EM_RIDGE,
                n_init=1 if init else restarts, random_state=seed, max_iter=200, **init)
        with _one_blas_thread():
            em.fit((x - center) / spread)
        covs = em.covariances_
        if self.covariance == "diag":
            covs = np.stack([np.diag(c) for c in covs])
        self._set(em.means_ * spread + center, covs * np.outer(spread, spread))
        with torch.no_grad():
            self.logits.copy_(torch.as_tensor(np.log(np.clip(em.weights_, 1e-300, None)),
                                              dtype=self.logits.dtype))
        return self

    def _init_from(
        self, start: GaussianMixture, center: np.ndarray, spread: np.ndarray
    ) -> dict[str, np.ndarray]:
        """``start``'s weights, means and precisions in the standardized columns EM sees."""
        shape = (start.features, start.components, start.covariance)
        if shape != (self.features, self.components, self.covariance):
            raise ValueError(f"start has features, components, covariance {shape}; this "
                             f"mixture {(self.features, self.components, self.covariance)}")
        with torch.no_grad():
            lower = start.lower().double().cpu().numpy() / spread[:, None]
            means = (start.loc.double().cpu().numpy() - center) / spread
            weights = start.weights().double().cpu().numpy()
        if self.covariance == "diag":
            precisions = 1.0 / np.diagonal(lower, axis1=1, axis2=2) ** 2
        else:  # (L L^T)^-1 = L^-T L^-1
            inv = np.linalg.inv(lower)
            precisions = inv.transpose(0, 2, 1) @ inv
            precisions = (precisions + precisions.transpose(0, 2, 1)) / 2
        return {"weights_init": weights / weights.sum(), "means_init": means,
                "precisions_init": precisions}

    def extra_repr(self) -> str:
        return (f"features={self.features}, components={self.components}, "
                f"covariance={self.covariance!r}")
