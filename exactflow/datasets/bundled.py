"""Real data shipped inside packages: scikit-learn's 8x8 digits as a 64-D density benchmark."""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["digits"]


@functools.lru_cache(maxsize=1)
def _digits_raw() -> np.ndarray:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "exactflow.datasets.digits() needs scikit-learn: pip install 'exactflow[sklearn]'"
        ) from None
    x = np.asarray(load_digits().data, dtype=np.float64)
    x.setflags(write=False)
    return x


def digits(dequantize: bool = True, seed: int = 0) -> np.ndarray:
    """scikit-learn's 8x8 handwritten digits as a 64-dimensional density benchmark.

    The 1797 images of ``sklearn.datasets.load_digits`` (shipped with scikit-learn, no
    download) hold integers 0..16. Uniform dequantization turns them into a continuous
    density on ``(0, 1)^64``: ``y = (x + u) / 17`` with ``u ~ U[0, 1)``. The log-likelihood
    of ``x + u`` lower-bounds that of the discrete data (Theis et al. 2016,
    arXiv:1511.01844), and ``log p(x + u) = log p(y) - 64 log 17``: a model's mean
    ``log p(y)`` less 181.3 nats bounds the digits' log-probability. The values
    are kept in ``[2^-20, 1 - 2^-20]`` (about 2 of the 115,008 values move, by less than
    1e-6) so that they stay strictly inside (0, 1) after a cast to float32, as a logit layer
    needs.

    Args:
        dequantize: add the uniform noise and scale to (0, 1); ``False`` returns the raw
            integers 0..16 as floats.
        seed: seed of the dequantization noise (a local generator).

    Returns:
        A ``(1797, 64)`` float64 array.

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'exactflow[sklearn]'``).
    """
    x = _digits_raw().copy()
    if not dequantize:
        return x
    rng = np.random.default_rng(seed)
    y = (x + rng.random(x.shape)) / 17.0
    eps = 2.0**-20
    return np.clip(y, eps, 1.0 - eps)
