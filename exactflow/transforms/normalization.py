"""Normalization layers: batch normalization (RealNVP) and activation normalization
(Glow); the fixed standardization layer lives in :mod:`exactflow.transforms.standardize`
and is importable from here too.

All are per-dimension affine maps, so their Jacobians are diagonal and
``log|det J| = sum_i log(scale_i)`` costs O(d), the same for every row. Their state (running
statistics, the "initialized" flag, the fixed mean and scale) lives in buffers, so
``state_dict`` save -> load -> continue training is identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..core import Transform, check_features, check_input
from ..validation import warn_user
from .standardize import Standardize

__all__ = ["Standardize", "BatchNorm", "ActNorm"]


class BatchNorm(Transform):
    """Batch normalization as an invertible flow layer (the RealNVP layer).

    ``forward`` (data -> latent)::

        z = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta
        log|det dz/dx| = sum_i [log_gamma_i - 0.5 log(var_i + eps)]

    * **training mode**: ``mean`` and ``var`` are the statistics of the batch (``var`` the
      biased one, as in the normalization itself), and the running averages are updated
      in place, ``running <- (1 - momentum) running + momentum batch`` (the variance with
      Bessel's correction, as ``torch.nn.BatchNorm1d`` does). The log-det is that of the
      per-row map with the batch statistics held fixed, which is what the RealNVP objective
      uses; the rows of a batch are then not independent. A batch needs at least 2 rows.
    * **eval mode**: ``mean`` and ``var`` are the running averages, so rows are independent
      and the layer is an ordinary elementwise affine map (check it with
      :func:`exactflow.check_transform` in this mode).

    ``inverse`` (latent -> data) always uses the running averages, in both modes: it is the
    exact inverse of the eval-mode forward. In training mode it is *not* the inverse of that
    batch's forward; sampling a flow in training mode therefore samples the eval-mode model.

    Both directions are closed form and cost O(d) per row. Starts with ``log_gamma = 0``,
    ``beta = 0`` and running statistics (0, 1): the identity up to ``eps``.

    Args:
        features: the dimension ``d``.
        momentum: weight of the new batch in the running averages, in (0, 1].
        eps: added to the variance before the square root, > 0.

    References:
        Dinh, Sohl-Dickstein & Bengio, Density Estimation using Real NVP (2016),
        arXiv:1605.08803; Ioffe & Szegedy, Batch Normalization (2015), arXiv:1502.03167.

    Example:
        >>> import torch, exactflow as ef
        >>> bn = ef.transforms.BatchNorm(2)
        >>> z, ladj = bn(3 * torch.randn(256, 2) + 1)     # training mode: batch statistics
        >>> z.mean(0).abs().max() < 1e-5, z.std(0, unbiased=False).sub(1).abs().max() < 1e-4
        (tensor(True), tensor(True))
        >>> bn.running_mean.shape
        torch.Size([2])
    """

    linear = True
    features: int
    running_mean: Tensor
    running_var: Tensor

    _warned_no_grad: bool = False  # (scoring in training mode: said once a layer)

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.features = check_features(features, "BatchNorm")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"BatchNorm: momentum must be in (0, 1], got {momentum}")
        if not eps > 0.0:
            raise ValueError(f"BatchNorm: eps must be positive, got {eps}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent with batch statistics (training) or running averages (eval)."""
        if self.training and x.shape[0] > 0:  # (no rows: the eval map, nothing to learn)
            batch = x.shape[0]
            if batch < 2:
                raise ValueError(
                    "BatchNorm in training mode needs at least 2 rows to estimate the batch "
                    f"variance, got a batch of {batch}; call .eval() to use the running averages"
                )
            if not (torch.is_grad_enabled() or torch.compiler.is_compiling() or _ON_PURPOSE):
                _warn_scoring_in_training_mode(self)
            mean = x.mean(0)
            var = x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * (batch / (batch - 1)), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        z = (x - mean) * torch.exp(log_scale) + self.beta
        return z, log_scale.sum().expand(x.shape[0])

    @property
    def _row_width(self) -> int | None:
        # (Training mode normalizes by the statistics of the batch.)
        return None if self.training or type(self) is not BatchNorm else self.features

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data with the running averages (in both modes)."""
        log_scale = self.log_gamma - 0.5 * torch.log(self.running_var + self.eps)
        x = (z - self.beta) * torch.exp(-log_scale) + self.running_mean
        return x, (-log_scale.sum()).expand(z.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}, momentum={self.momentum}, eps={self.eps}"


def _sync_initialized(module: ActNorm, incompatible_keys: object) -> None:
    # After load_state_dict, mirror the loaded buffer in the Python-side flag.
    module._needs_init = not bool(module.initialized)


#: Set while exactflow itself runs BatchNorm layers in training mode without gradients
#: (initializing ActNorm layers on a whole batch): no warning then.
_ON_PURPOSE: list[bool] = []


@contextmanager
def batch_statistics_on_purpose() -> Iterator[None]:
    """Run BatchNorm layers in training mode without gradients, on purpose: no warning."""
    _ON_PURPOSE.append(True)
    try:
        yield
    finally:
        _ON_PURPOSE.pop()


def _warn_scoring_in_training_mode(layer: BatchNorm) -> None:
    """Warn, once per layer, of a pass without gradients in training mode: scoring, most
    likely, where each row's log-density then depends on the other rows of its batch (up
    to nats) and the running averages move with data that is not being trained on."""
    if layer._warned_no_grad:
        return
    layer._warned_no_grad = True
    warn_user(
        "a BatchNorm layer ran in training mode without gradients (torch.no_grad: scoring?):"
        " it normalizes by the statistics of this batch, so each row's log-density depends "
        "on the other rows, and its running averages moved; call flow.eval() before "
        "scoring or sampling (ef.fit returns the flow in eval mode), or, to move them on "
        "purpose, silence this warning"
    )


class ActNorm(Transform):
    """Activation normalization (Glow): a per-dimension affine map with data-dependent init.

    ``forward`` (data -> latent)::

        z = (x + bias) * exp(log_scale)
        log|det dz/dx| = sum_i log_scale_i

    ``inverse`` (latent -> data): ``x = z * exp(-log_scale) - bias``. Both O(d) per row.

    **Initialization.** The first ``forward`` call in training mode sets
    ``bias = -mean(x)`` and ``log_scale = -0.5 log(var(x) + eps)`` from that batch, so its
    output has zero mean and unit variance per dimension; afterwards both are ordinary
    parameters. ``eps`` keeps a constant dimension finite. A batch of fewer than 2 rows has
    no variance and does not initialize (a one-row check of a new flow would otherwise fix
    the layer's scale at 1 and its shift at that row, for good). Calls in eval mode and
    calls to ``inverse`` never initialize: before initialization the layer uses its current
    parameters, the identity for a new layer (so sampling an untrained flow is well
    defined). Call :meth:`initialize` to initialize from a chosen batch explicitly.

    The "initialized" flag is a buffer (``state_dict`` saves and restores it, so a loaded
    layer continues exactly where it stopped) mirrored by a Python bool, so the check costs
    no device sync. The initialization runs eagerly, outside any compiled graph: under
    ``torch.compile`` it is skipped, so run one eager training batch (or :meth:`initialize`)
    before compiling (``ef.fit(..., compile=True)`` runs its first step eagerly for this).

    Args:
        features: the dimension ``d``.
        eps: added to the variance at initialization, > 0.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions (2018),
        arXiv:1807.03039.

    Example:
        >>> import torch, exactflow as ef
        >>> act = ef.transforms.ActNorm(3)
        >>> z, ladj = act(5 * torch.randn(100, 3) - 2)     # first batch: initializes
        >>> bool(act.initialized), z.mean(0).abs().max() < 1e-5
        (True, tensor(True))
    """

    linear = True
    features: int
    initialized: Tensor

    def __init__(self, features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.features = check_features(features, "ActNorm")
        if not eps > 0.0:
            raise ValueError(f"ActNorm: eps must be positive, got {eps}")
        self.eps = float(eps)
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))
        self._needs_init = True
        self.register_load_state_dict_post_hook(_sync_initialized)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``bias`` and ``log_scale`` so that ``forward(x)`` has zero mean, unit variance
        (``x``: at least 2 rows)."""
        check_input(x, self.features, "ActNorm.initialize")
        if x.shape[0] < 2:
            raise ValueError(f"ActNorm.initialize needs at least 2 rows to estimate a "
                             f"variance, got {x.shape[0]}")
        x = x.detach()
        self.bias.copy_(-x.mean(0))
        self.log_scale.copy_(-0.5 * torch.log(x.var(0, unbiased=False) + self.eps))
        self.initialized.fill_(True)
        self._needs_init = False

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent; the first call in training mode initializes from ``x``."""
        if self._needs_init and self.training and not torch.compiler.is_compiling():
            if bool(self.initialized):  # set by hand or by a load that bypassed the hook
                self._needs_init = False
            elif x.shape[0] > 1:
                self.initialize(x)
        z = (x + self.bias) * torch.exp(self.log_scale)
        return z, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent -> data with the current parameters (never initializes)."""
        x = z * torch.exp(-self.log_scale) - self.bias
        return x, (-self.log_scale.sum()).expand(z.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}"
