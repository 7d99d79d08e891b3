"""The base densities of a flow: :class:`StandardNormal`, :class:`DiagonalNormal`,
:class:`StudentT` and :class:`Uniform`, and :class:`Distribution`, the interface they share
with a flow."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .validation import positive_int

__all__ = ["Distribution", "StandardNormal", "DiagonalNormal", "StudentT", "Uniform",
           "tensor_of", "seeded_from"]

_LOG_2PI = math.log(2 * math.pi)


def tensor_of(values: Any, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.as_tensor`` of an array (its memory shared where the dtype allows), with a
    read-only array (a pandas column, a memmap opened for reading) copied first: torch
    cannot promise not to write to memory it shares, and warns about it; a view with a
    negative stride (``x[::-1]``, ``np.flip``), which torch cannot share, is copied too, and
    one in the other byte order (FITS files are big-endian) into the machine's."""
    arr = np.asarray(values)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.writeable or any(step < 0 for step in arr.strides):
        arr = np.array(arr)
    return torch.as_tensor(arr, dtype=dtype)


class Distribution(nn.Module):
    """A density over ``R^features`` with ``log_prob`` and reparameterized sampling.

    Subclasses implement :meth:`log_prob` and :meth:`rsample`. As in
    ``torch.distributions``, :meth:`sample` draws without autograd (the result has no graph,
    so ``.numpy()`` works) and :meth:`rsample` is the differentiable, reparameterized draw.
    Every tensor a distribution owns is a parameter or a buffer, so ``.to(device)`` and
    ``state_dict`` just work.
    """

    features: int

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([self.features])

    @property
    def batch_shape(self) -> torch.Size:
        """Empty, as for one ``torch.distributions`` density: a batch of contexts is an
        argument of the calls, not a shape of the distribution."""
        return torch.Size()

    def log_prob(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def rsample(self, n: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:
        """``n`` samples of shape ``(n, features)``, drawn without autograd."""
        with torch.no_grad():
            return self.rsample(n)

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """Differentiable samples and their log-density."""
        x = self.rsample(n)
        return x, self.log_prob(x)

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """Samples and their log-density, without autograd."""
        with torch.no_grad():
            return self.rsample_and_log_prob(n)

    def _ref(self) -> Tensor:
        # A tensor on the distribution's device and dtype.
        return next(iter(self.buffers()))


class StandardNormal(Distribution):
    """The standard normal ``N(0, I)`` on ``R^features``.

    ``log p(z) = -0.5 |z|^2 - (features / 2) log(2 pi)``.

    Example:
        >>> import torch, exactflow as ef
        >>> ef.StandardNormal(2).log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
    """

    _anchor: Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = positive_int(features, "features")
        self.register_buffer("_anchor", torch.zeros(()))

    def log_prob(self, x: Tensor) -> Tensor:
        return -0.5 * (x * x).sum(-1) - 0.5 * self.features * _LOG_2PI

    def rsample(self, n: int) -> Tensor:
        ref = self._anchor
        return torch.randn(n, self.features, device=ref.device, dtype=ref.dtype)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class DiagonalNormal(Distribution):
    """A normal with learnable mean and per-dimension scale, ``N(loc, diag(exp(log_scale))^2)``.

    Starts as the standard normal.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = positive_int(features, "features")
        self.loc = nn.Parameter(torch.zeros(self.features))
        self.log_scale = nn.Parameter(torch.zeros(self.features))

    def _ref(self) -> Tensor:
        return self.loc

    def log_prob(self, x: Tensor) -> Tensor:
        u = (x - self.loc) * torch.exp(-self.log_scale)
        return -0.5 * (u * u).sum(-1) - self.log_scale.sum() - 0.5 * self.features * _LOG_2PI

    def rsample(self, n: int) -> Tensor:
        eps = torch.randn(n, self.features, device=self.loc.device, dtype=self.loc.dtype)
        return self.loc + eps * torch.exp(self.log_scale)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class StudentT(Distribution):
    """Independent Student-t coordinates, ``p(z) = prod_i t_{nu_i}(z_i)``: a base with
    polynomial tails.

    A flow whose layers become affine far out (affine and spline couplings, MAF) keeps its
    base's tails there: from a normal base it gives Gaussian tails, whatever the data, and a
    far row of heavy-tailed data scores thousands of nats too low (a MAF on a 2-D Student-t
    with 1.5 degrees of freedom, at (1e3, 1e3): -48,073 against the true -35.7; -61.2 with
    this base: ``python -m benchmarks.tails``). Here each coordinate's degrees of freedom
    ``nu_i = 1 + softplus(raw_i)`` (above 1: a finite mean) start at ``df`` and are trained
    with the flow unless ``trainable=False`` (Jaini et al. 2020, Laszkiewicz et al. 2022:
    tail-adaptive flows).

    ``log t_nu(z) = lgamma((nu + 1) / 2) - lgamma(nu / 2) - log(nu pi) / 2
    - (nu + 1) / 2 log(1 + z^2 / nu)``.

    Args:
        features: the dimension.
        df: the degrees of freedom to start from (above 1).
        trainable: whether training moves them.

    References:
        Jaini et al., Tails of Lipschitz Triangular Flows (2020), arXiv:1907.04481;
        Laszkiewicz et al., Marginal Tail-Adaptive Normalizing Flows (2022),
        arXiv:2206.10311.

    Example:
        >>> import torch, exactflow as ef
        >>> base = ef.StudentT(2, df=3.0)
        >>> base.df
        tensor([3., 3.], grad_fn=<AddBackward0>)
        >>> torch.allclose(base.log_prob(torch.ones(1, 2)),
        ...                torch.distributions.StudentT(3.0).log_prob(torch.ones(1, 2)).sum(-1))
        True
    """

    def __init__(self, features: int, df: float = 5.0, trainable: bool = True) -> None:
        super().__init__()
        self.features = positive_int(features, "features")
        if not (isinstance(df, (int, float)) and math.isfinite(df) and df > 1):
            raise ValueError(f"df must be a number above 1 (a finite mean), got {df!r}")
        raw = math.log(math.expm1(df - 1.0)) if df - 1.0 < 30 else df - 1.0  # softplus^-1
        self.raw_df = nn.Parameter(torch.full((self.features,), raw), requires_grad=trainable)

    def _ref(self) -> Tensor:
        return self.raw_df

    @property
    def df(self) -> Tensor:
        """The degrees of freedom, one per coordinate."""
        return 1.0 + torch.nn.functional.softplus(self.raw_df)

    def log_prob(self, x: Tensor) -> Tensor:
        nu = self.df
        half = 0.5 * (nu + 1.0)
        norm = torch.lgamma(half) - torch.lgamma(0.5 * nu) - 0.5 * torch.log(nu * math.pi)
        # log(1 + z^2 / nu), without z^2 (which overflows float32 from |z| = 1.8e19): for
        # |z| > sqrt(nu) as 2 log(|z| / sqrt(nu)) + log1p(nu / z^2); each side clamped to its
        # own range so that neither makes an inf (nor a NaN gradient) where it is not used.
        root, a = torch.sqrt(nu), x.abs()
        near, far = torch.minimum(a, root), torch.maximum(a, root)
        tail = 2 * torch.log(far / root) + torch.log1p(nu / (far * far))
        return (norm - half * torch.where(a > root, tail, torch.log1p(near * near / nu))).sum(-1)

    def rsample(self, n: int) -> Tensor:
        nu = self.df.expand(n, self.features)
        # z = g / sqrt(v / nu), g ~ N(0, 1), v ~ chi2(nu) = 2 Gamma(nu / 2): reparameterized
        # in nu through torch's Gamma sampler.
        gamma = torch._standard_gamma(0.5 * nu)
        g = torch.randn_like(nu)
        return g * torch.rsqrt(2.0 * gamma / nu)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Uniform(Distribution):
    """The uniform density on the box ``[low, high]`` (``-inf`` log-density outside it).

    Args:
        low, high: scalars or sequences of length ``features``.
        features: the dimension when ``low`` and ``high`` are scalars.

    Example:
        >>> import torch, exactflow as ef
        >>> ef.Uniform(0.0, 2.0, features=2).log_prob(torch.tensor([[1.0, 1.0]]))
        tensor([-1.3863])
    """

    low: Tensor
    high: Tensor

    def __init__(self, low: Any = 0.0, high: Any = 1.0, features: int | None = None) -> None:
        super().__init__()
        low_t = torch.as_tensor(low, dtype=torch.get_default_dtype()).reshape(-1)
        high_t = torch.as_tensor(high, dtype=torch.get_default_dtype()).reshape(-1)
        if features is None:
            n = max(low_t.numel(), high_t.numel())
        else:
            n = positive_int(features, "features")
        for name, bound in (("low", low_t), ("high", high_t)):
            if bound.numel() not in (1, n):
                raise ValueError(
                    f"{name} has {bound.numel()} entries; expected 1 or {n} "
                    f"(features={n})"
                )
        low_t, high_t = low_t.expand(n).clone(), high_t.expand(n).clone()
        if not bool((high_t > low_t).all()):
            hint = ""
            if features is None and isinstance(low, int) and not isinstance(low, bool):
                hint = f" (its first argument is low: for {low} features, Uniform(features={low}))"
            raise ValueError(f"Uniform needs high > low in every dimension{hint}")
        self.features = n
        self.register_buffer("low", low_t)
        self.register_buffer("high", high_t)

    def log_prob(self, x: Tensor) -> Tensor:
        inside = ((x >= self.low) & (x <= self.high)).all(-1)
        value = -torch.log(self.high - self.low).sum()
        return torch.where(inside, value.expand(inside.shape), torch.full_like(value, -math.inf))

    def rsample(self, n: int) -> Tensor:
        u = torch.rand(n, self.features, device=self.low.device, dtype=self.low.dtype)
        return self.low + u * (self.high - self.low)

    def extra_repr(self) -> str:
        return f"features={self.features}"


@contextmanager
def seeded_from(generator: torch.Generator, like: Tensor | None = None) -> Iterator[None]:
    """Torch's global random state (and that of ``like``'s CUDA device) seeded with one
    number drawn from ``generator``, restored afterwards: a draw that a generator sets,
    whatever draws inside take no generator of their own."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    devices = [] if like is None or like.device.type != "cuda" else [
        like.device.index if like.device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
