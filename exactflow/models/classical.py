"""Classical density models as flows: a Gaussian and a Gaussian mixture.

Each is a :class:`~exactflow.Flow` whose transform is the identity (or a fixed
standardization) and whose base is a :class:`~exactflow.Gaussian` or
:class:`~exactflow.GaussianMixture` fitted in closed form or by EM, so it is saved, loaded,
scored, sampled, checked and reported exactly like any flow, and it is the baseline every
flow is measured against: :func:`exactflow.fit` sets its parameters from the training data
without gradient steps. The Gaussian also comes conditional: with ``context=k`` it is the
linear-Gaussian regression ``x | c ~ N(W c + b, Sigma)`` (a
:class:`~exactflow.transforms.ContextShift` before the Gaussian), fitted by least squares.
"""

from __future__ import annotations

from ..core import Compose
from ..distributions import Flow
from ..gaussians import Gaussian, GaussianMixture
from ..transforms.linear import ContextShift
from ..validation import choice, positive_int
from .registry import register

__all__ = ["gaussian", "gmm", "CLOSED_FORM"]

#: The models fitted in closed form (no layers, no training steps).
CLOSED_FORM = ("gaussian", "gmm")


def _unconditional(name: str, context: int) -> None:
    if context != 0:
        raise ValueError(f"the {name} model is unconditional: context must be 0, got {context!r}")


@register
def gaussian(features: int, *, covariance: str = "full", context: int = 0) -> Flow:
    """A multivariate normal with a full (or diagonal) covariance, fitted in closed form.

    The maximum-likelihood mean and covariance of the training data, with a ridge of 1e-14
    on the correlation matrix (always; it keeps a degenerate covariance finite).
    ``log_prob`` costs O(d^2) per row.

    With ``context=k`` it is conditional: ``x | c ~ N(W c + b, Sigma)``, the mean linear in
    the context (least squares of the rows on their contexts, standardized where the
    builder's ``standardize`` says) and ``Sigma`` the covariance of the residuals. This is
    the classical baseline of conditional density estimation, and the first rung of
    :func:`exactflow.fit_auto` with a context.

    Args:
        features: data dimension.
        covariance: ``"full"`` or ``"diag"``.
        context: the size of the conditioning vector (0: unconditional).

    Example:
        >>> import torch, exactflow as ef
        >>> x = torch.randn(400, 3) * torch.tensor([1.0, 2.0, 3.0])
        >>> model = ef.models.gaussian(3)
        >>> history = ef.fit(model, x, progress=False)
        >>> history.total_steps  # closed form: no gradient steps
        0
    """
    choice(covariance, "covariance", ("full", "diag"))
    d = positive_int(features, "features")
    base = Gaussian(d, covariance, trainable=False)
    if not context:
        return Flow(Compose(), base)
    return Flow(ContextShift(d, context, trainable=False), base, context=context)


@register
def gmm(features: int, *, components: int = 4, covariance: str = "full", context: int = 0) -> Flow:
    """A mixture of ``components`` Gaussians, fitted by EM.

    ``log_prob`` costs O(components d^2) per row. Pick ``components`` and ``covariance`` on
    validation data (``exactflow.fit_auto`` does). EM adds a ridge of 1e-6 of each
    column's variance to every component's covariance, which keeps components from
    collapsing onto a few rows but floors the variance of a column given the others:
    nearly collinear columns lose by it (2.1 nats a row where two columns differ by 1e-4
    of their spread, 4.4 at 1e-5; :meth:`exactflow.GaussianMixture.fit_to`). One
    component is fitted in closed form, as :func:`gaussian`, without it.

    Args:
        features: data dimension.
        components: the number of mixture components.
        covariance: ``"full"`` or ``"diag"``.
        context: must be 0 (unconditional).
    """
    _unconditional("gmm", context)
    choice(covariance, "covariance", ("full", "diag"))
    d = positive_int(features, "features")
    return Flow(Compose(), GaussianMixture(d, positive_int(components, "components"),
                                           covariance, trainable=False))
