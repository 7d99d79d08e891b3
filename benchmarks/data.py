"""Benchmark data sets: 2D moons, 64-D dequantized digits, and a 10-D Gaussian mixture.

Every generator is seeded and returns a :class:`Dataset` with float32 train and test splits.
Where the true density is known (the Gaussian mixture) the dataset also carries the exact
mean negative log-likelihood of its own test points, so ``test NLL - true NLL`` is the
model's KL gap measured on the same points (no Monte Carlo error from a second sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "GaussianMixture", "moons", "digits", "gmm10", "load"]


@dataclass
class Dataset:
    """A train/test split, the hidden width used for it, and the true test NLL if known."""

    name: str
    train: Tensor
    test: Tensor
    hidden: int
    true_test_nll: float | None = None
    note: str = ""

    @property
    def features(self) -> int:
        return int(self.train.shape[1])


def moons(n_train: int = 20_000, n_test: int = 10_000, seed: int = 0) -> Dataset:
    """Two moons, as in FFJORD's toy data: ``make_moons(noise=0.1) * 2 + (-1, -0.2)``.

    Uses ``exactflow.datasets.toy("moons", ...)`` where the library provides it, and the
    FFJORD definition through scikit-learn otherwise. Its entropy (2.394 nats, Monte Carlo;
    ``shared/REFERENCES.md``) bounds any model's expected test NLL from below when the
    points are not rescaled.
    """
    try:
        from exactflow import datasets as ef_datasets  # noqa: PLC0415

        train = _as_tensor(ef_datasets.toy("moons", n_train, seed=seed))
        test = _as_tensor(ef_datasets.toy("moons", n_test, seed=seed + 1))
        note = "exactflow.datasets.toy('moons')"
    except (ImportError, AttributeError):
        from sklearn.datasets import make_moons  # noqa: PLC0415

        def draw(n: int, s: int) -> Tensor:
            x, _ = make_moons(n_samples=n, noise=0.1, random_state=s)
            return _as_tensor(x * 2 + np.array([-1.0, -0.2]))

        train, test = draw(n_train, seed), draw(n_test, seed + 1)
        note = "FFJORD moons via sklearn"
    return Dataset("moons", train, test, hidden=64, note=note)


def digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 digits (1797 x 64), dequantized and globally standardized.

    Pixel values ``v`` in ``{0, ..., 16}`` become ``(v + u) / 17`` with ``u ~ U(0, 1)``
    (``exactflow.datasets.digits`` where the library provides it), then all pixels are
    shifted and scaled by **one** mean and standard deviation of the training split. A
    per-pixel standardization would divide the always-blank border pixels by their tiny
    dequantization spread, so that one inked border pixel in a test image lands 50
    standard deviations out and dominates every library's mean test NLL. NLLs are in nats
    in these units, the same for every library.
    """
    rng = np.random.default_rng(seed)
    try:
        from exactflow import datasets as ef_datasets  # noqa: PLC0415

        x = np.asarray(ef_datasets.digits(seed=seed), dtype=np.float64)
    except (ImportError, AttributeError):
        from sklearn.datasets import load_digits  # noqa: PLC0415

        pixels = load_digits().data.astype(np.float64)
        x = (pixels + rng.uniform(size=pixels.shape)) / 17.0
    x = x[rng.permutation(len(x))]
    n_test = int(round(test_fraction * len(x)))
    train, test = x[n_test:], x[:n_test]
    mean, std = train.mean(), train.std()
    train, test = (train - mean) / std, (test - mean) / std
    return Dataset(
        "digits", _as_tensor(train), _as_tensor(test), hidden=256,
        note="sklearn digits, uniform dequantization, one global mean and scale",
    )


class GaussianMixture:
    """A mixture of full-covariance Gaussians with an exact log-density.

    ``p(x) = sum_k w_k N(x; mu_k, L_k L_k^T)``, so
    ``log p(x) = logsumexp_k [log w_k - 0.5 |L_k^{-1}(x - mu_k)|^2 - sum_i log L_k,ii
    - (d/2) log(2 pi)]``, computed in float64 with triangular solves.

    Args:
        features: the dimension ``d``.
        components: the number of components ``K``.
        seed: seeds the means, Cholesky factors and weights.
    """

    def __init__(self, features: int = 10, components: int = 8, seed: int = 0):
        rng = np.random.default_rng(1000 + seed)
        d, k = features, components
        self.means = rng.normal(scale=1.5, size=(k, d))
        chol = np.tril(rng.normal(scale=0.25, size=(k, d, d)), -1)
        chol += np.einsum("ki,ij->kij", np.exp(rng.uniform(-1.2, -0.4, size=(k, d))), np.eye(d))
        self.chol = chol
        logits = rng.normal(scale=0.5, size=k)
        self.log_weights = logits - np.logaddexp.reduce(logits)
        self.features, self.components = d, k

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        which = rng.choice(self.components, size=n, p=np.exp(self.log_weights))
        eps = rng.normal(size=(n, self.features))
        return self.means[which] + np.einsum("nij,nj->ni", self.chol[which], eps)

    def log_prob(self, x: np.ndarray | Tensor) -> np.ndarray:
        """Exact log-density of each row of ``x`` (float64)."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        means = torch.as_tensor(self.means)
        chol = torch.as_tensor(self.chol)
        diff = (x[:, None, :] - means[None]).unsqueeze(-1)  # (n, K, d, 1)
        white = torch.linalg.solve_triangular(
            chol.expand(x.shape[0], -1, -1, -1), diff, upper=False
        ).squeeze(-1)
        log_det = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        comp = (
            torch.as_tensor(self.log_weights)
            - 0.5 * (white**2).sum(-1)
            - log_det
            - 0.5 * self.features * math.log(2 * math.pi)
        )
        return torch.logsumexp(comp, dim=-1).numpy()


def gmm10(n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Dataset:
    """A 10-D, 8-component full-covariance Gaussian mixture with its exact test NLL."""
    mix = GaussianMixture(10, 8, seed)
    train = mix.sample(n_train, seed=2 * seed + 1)
    test = mix.sample(n_test, seed=2 * seed + 2)
    true_nll = float(-mix.log_prob(test).mean())
    return Dataset(
        "gmm10", _as_tensor(train), _as_tensor(test), hidden=128, true_test_nll=true_nll,
        note="10-D, 8 full-covariance components, exact log-density",
    )


def load(name: str, seed: int = 0) -> Dataset:
    """The benchmark data set ``name`` (``moons``, ``gmm10`` or ``digits``)."""
    makers = {"moons": moons, "gmm10": gmm10, "digits": digits}
    if name not in makers:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(makers)}")
    return makers[name](seed=seed)


def _as_tensor(x: np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32).contiguous()
