"""Shared helpers for exactflow's tests: ``from tests.helpers import perturb, train_steps``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["perturb", "train_steps"]


def perturb(module: nn.Module, scale: float = 0.5, seed: int | None = None) -> nn.Module:
    """Add ``scale * N(0, 1)`` noise to every floating-point parameter of ``module``, in place.

    Many layers start as the identity (zero log-scales, zero weights), where a wrong log-det
    or inverse can still look right; tests check layers away from that point. With ``seed``
    the noise comes from its own generator (the same parameters on every run and device);
    without it, from torch's global generator, which the ``seed`` fixture resets per test.
    Buffers (permutations, masks, running statistics) are left alone.

    Returns:
        The same module, for chaining: ``t = perturb(LULinear(3).double())``.
    """
    if scale < 0:
        raise ValueError(f"scale must be non-negative, got {scale}")
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if not param.is_floating_point():
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            param.add_(scale * noise.to(device=param.device, dtype=param.dtype))
    return module


def train_steps(transform: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None,
                steps: int = 5, lr: float = 5e-2) -> None:
    """Take ``steps`` Adam steps on the NLL of ``x`` under ``transform`` with a standard
    normal base: the way a layer's parameters move in training, for checks after it."""
    opt = torch.optim.Adam(transform.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        z, ladj = transform(x, context)
        (0.5 * z.square().sum(1) - ladj).mean().backward()
        opt.step()
