"""The transform contract: invertible maps that know their log-determinant.

Direction convention (as in nflows and zuko): ``forward`` goes **data -> latent** (the
normalizing direction, used by :meth:`exactflow.Flow.log_prob`); ``inverse`` goes
**latent -> data** (the generative direction, used by :meth:`exactflow.Flow.sample`).

Both directions return a pair ``(output, log_abs_det)`` where ``log_abs_det`` has shape
``(batch,)``:

* ``z, ladj = t(x, context)`` with ``ladj = log|det dz/dx|``;
* ``x, ladj_inv = t.inverse(z, context)`` with ``ladj_inv = log|det dx/dz| = -ladj``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["Transform", "Compose", "Inverse", "check_domain", "check_features", "check_input"]


class Transform(nn.Module):
    """Base class of every invertible map in exactflow.

    Subclasses implement :meth:`forward` (data -> latent) and :meth:`inverse`
    (latent -> data). Both take ``x`` of shape ``(batch, features)`` and an optional
    ``context`` of shape ``(batch, context_features)``, and return the output with the
    log-absolute-determinant of the Jacobian of *that* direction, of shape ``(batch,)``.

    A user's own transform needs only these two methods; :func:`exactflow.check_transform`
    then proves it right against a brute-force autograd Jacobian.

    Example:
        >>> import torch, exactflow as ef
        >>> class Double(ef.Transform):
        ...     def forward(self, x, context=None):
        ...         return 2 * x, x.new_full(x.shape[:1], x.shape[1] * 0.6931471805599453)
        ...     def inverse(self, z, context=None):
        ...         return z / 2, z.new_full(z.shape[:1], -z.shape[1] * 0.6931471805599453)
        >>> report = ef.check_transform(Double(), torch.randn(4, 3, dtype=torch.float64))
        >>> report.ok
        True
    """

    #: Whether the transform is strictly elementwise (used by builders and docs only).
    elementwise: bool = False

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map data to latent: returns ``(z, log|det dz/dx|)``."""
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map latent to data: returns ``(x, log|det dx/dz|)``."""
        raise NotImplementedError

    @property
    def inv(self) -> Transform:
        """This transform with its two directions swapped."""
        return Inverse(self)


class Inverse(Transform):
    """Swaps the two directions of a transform.

    ``Inverse(t).forward`` is ``t.inverse`` and vice versa; parameters are shared. Use it to
    turn a layer that is fast in one direction into one that is fast in the other (an IAF is
    the inverse of a MAF).
    """

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(z, context)

    @property
    def inv(self) -> Transform:
        return self.transform


class Compose(Transform):
    """A chain of transforms applied in order; the log-determinants add up.

    ``Compose(t1, t2, t3).forward`` is ``t3(t2(t1(x)))`` with
    ``log|det J| = sum_k log|det J_k|``; the inverse runs the layers in reverse order.
    The same ``context`` is passed to every layer.

    Example:
        >>> import torch, exactflow as ef
        >>> t = ef.Compose(ef.transforms.ElementwiseAffine(2), ef.transforms.Reverse(2))
        >>> z, ladj = t(torch.randn(5, 2))
        >>> z.shape, ladj.shape
        (torch.Size([5, 2]), torch.Size([5]))
    """

    def __init__(self, *transforms: Transform):
        super().__init__()
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple)):
            transforms = tuple(transforms[0])
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(
                    f"Compose takes exactflow Transforms, got {type(t).__name__}"
                )
        self.transforms = nn.ModuleList(transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __iter__(self) -> Iterator[Transform]:
        return iter(self.transforms)

    def __getitem__(self, index: int) -> Transform:
        return self.transforms[index]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[:1])
        for t in self.transforms:
            x, ladj = t(x, context)
            total = total + ladj
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[:1])
        for t in reversed(self.transforms):
            z, ladj = t.inverse(z, context)
            total = total + ladj
        return z, total


def check_domain(ok: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless every element of ``ok`` is true.

    Used for inputs outside a transform's domain (e.g. ``Logit`` of a value outside (0, 1))
    so users get a clear error instead of a silent NaN. The check is skipped while
    ``torch.compile`` traces, so compiled forward paths stay free of data-dependent branches,
    and under ``torch.func.vmap``, which cannot branch on data: there an out-of-domain row
    is not caught, and :func:`exactflow.jacobian` stays vectorized for such transforms
    (:func:`exactflow.check_transform` calls the transform eagerly first, so it still
    raises).
    """
    if torch.compiler.is_compiling() or _is_vmapped(ok):
        return
    if not bool(ok.all()):
        raise ValueError(message)


def _is_vmapped(t: Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap`` (at any level of functorch wrapping)."""
    try:
        functorch = torch._C._functorch
        while functorch.is_functorch_wrapped_tensor(t):
            if functorch.is_batchedtensor(t):
                return True
            t = functorch.get_unwrapped(t)
    except AttributeError:  # a torch without these internals: keep checking eagerly
        return False
    return False


def check_features(features: int, name: str) -> int:
    """Return ``features`` if it is a positive int, else raise ``ValueError`` naming ``name``."""
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ValueError(f"{name}: features must be a positive int, got {features!r}")
    return features


def check_input(
    x: Tensor,
    features: int,
    name: str,
    context: Tensor | None = None,
    context_features: int = 0,
) -> None:
    """Raise ``ValueError`` naming the layer unless ``x`` is ``(batch, features)`` and, for a
    conditional layer, ``context`` is ``(batch, context_features)``.

    Shapes are static, so this check costs nothing at run time and traces under
    ``torch.compile``.
    """
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(
            f"{name} expects input of shape (batch, {features}), got {tuple(x.shape)}"
        )
    if context_features > 0:
        if context is None:
            raise ValueError(
                f"{name} is conditional: pass a context of shape (batch, {context_features})"
            )
        if context.dim() != 2 or context.shape != (x.shape[0], context_features):
            raise ValueError(
                f"context must have shape ({x.shape[0]}, {context_features}), "
                f"got {tuple(context.shape)}"
            )
