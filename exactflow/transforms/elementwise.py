"""Elementwise transforms: each output coordinate depends on one input coordinate.

Their Jacobians are diagonal, so ``log|det J| = sum_i log|f_i'(x_i)|`` costs O(d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Transform, check_domain, check_features

__all__ = ["ElementwiseAffine", "Sigmoid", "Logit"]


class ElementwiseAffine(Transform):
    """A learnable per-dimension affine map, ``z = x * exp(log_scale) + shift``.

    ``log|det dz/dx| = sum_i log_scale_i`` (the same for every row). Both directions are
    closed form and cost O(d). Starts as the identity.

    Args:
        features: the dimension ``d``.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.transforms.ElementwiseAffine(2)
        >>> with torch.no_grad():
        ...     _ = t.log_scale.copy_(torch.tensor([0.0, 1.0]).log1p())  # scales 1 and 2
        ...     _ = t.shift.fill_(1.0)
        ...     z, ladj = t(torch.tensor([[1.0, 3.0]]))
        >>> z, ladj  # ladj = log 1 + log 2
        (tensor([[2., 7.]]), tensor([0.6931]))
    """

    linear = True

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = check_features(features, "ElementwiseAffine")
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = x * torch.exp(self.log_scale) + self.shift
        return z, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = (z - self.shift) * torch.exp(-self.log_scale)
        return x, (-self.log_scale.sum()).expand(z.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Sigmoid(Transform):
    """The logistic sigmoid, ``z = 1 / (1 + exp(-x))``, mapping R^d to (0, 1)^d.

    ``log|det dz/dx| = sum_i [log s(x_i) + log(1 - s(x_i))]
    = -sum_i [softplus(-x_i) + softplus(x_i)]``.
    The inverse is the logit; a value outside (0, 1) given to ``inverse`` raises
    ``ValueError`` rather than returning NaN.

    Args:
        features: the dimension ``d``, or ``None`` (default) for any width.
    """

    def __init__(self, features: int | None = None) -> None:
        super().__init__()
        self.features = None if features is None else check_features(features, "Sigmoid")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ladj = -(F.softplus(-x) + F.softplus(x)).sum(-1)
        return torch.sigmoid(x), ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_domain(
            (z > 0) & (z < 1), "Sigmoid.inverse (logit) needs values strictly inside (0, 1)"
        )
        x = torch.log(z) - torch.log1p(-z)
        return x, -(torch.log(z) + torch.log1p(-z)).sum(-1)


class Logit(Transform):
    """The logit for data in (0, 1): ``z = log(y) - log(1 - y)``, ``y = alpha + (1 - 2 alpha) x``.

    The usual first layer for bounded data (pixels, fractions): it maps (0, 1)^d onto R^d.
    ``alpha`` (RealNVP uses 0.05 for images) keeps the map away from the infinite ends.
    ``log|det dz/dx| = sum_i [log(1 - 2 alpha) - log y_i - log(1 - y_i)]``.

    With ``alpha > 0`` the map covers only ``[logit(alpha), logit(1 - alpha)]`` of each
    latent axis: a flow's density on [0, 1]^d integrates to less than 1 (its log-densities
    are lower bounds: 0.946 of the mass for a trained 1-D flow with alpha 0.05), and its
    samples fall outside [0, 1] as often as the latent falls beyond that interval (5.3%
    there). ``alpha = 0`` gives a normalized density whose samples stay in (0, 1): in the
    sampling direction ``sigmoid`` is held inside the open interval (float32 rounds it to
    exactly 1.0 from ``z`` of about 17 on, which the density direction refuses). Where it
    saturates so, in float32, a sample's log-density from ``sample_and_log_prob`` (that of
    its latent) and ``log_prob`` of the rounded sample differ: compute in float64 where
    samples reach that far.

    Input outside (0, 1) raises ``ValueError`` naming the problem, never a silent NaN.

    Args:
        alpha: squeeze toward 0.5, in [0, 0.5).
        features: the dimension ``d``, or ``None`` (default) for any width.
    """

    def __init__(self, alpha: float = 0.0, features: int | None = None) -> None:
        super().__init__()
        self.features = None if features is None else check_features(features, "Logit")
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.alpha == 0.0:
            check_domain((x > 0) & (x < 1), "Logit needs data strictly inside (0, 1); "
                         "rescale the data or use Logit(alpha=...) for values at 0 or 1")
        else:
            check_domain((x >= 0) & (x <= 1), "Logit needs data inside [0, 1]")
        y = self.alpha + (1 - 2 * self.alpha) * x
        z = torch.log(y) - torch.log1p(-y)
        ladj = (math.log1p(-2 * self.alpha) - torch.log(y) - torch.log1p(-y)).sum(-1)
        return z, ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = torch.sigmoid(z)
        if self.alpha == 0.0 and z.is_floating_point():  # (strictly inside (0, 1))
            info = torch.finfo(z.dtype)
            y = y.clamp(info.tiny, 1.0 - info.eps / 2)
        x = (y - self.alpha) / (1 - 2 * self.alpha)
        ladj = (-(F.softplus(-z) + F.softplus(z)) - math.log1p(-2 * self.alpha)).sum(-1)
        return x, ladj

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
